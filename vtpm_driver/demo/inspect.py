"""Looking at a demo server from the outside: libvirt, the swtpm state, Barbican.

The demo checks what the driver did without trusting the driver, so it asks
libvirt, the state directory and Barbican directly. Every function here only
reads, except :func:`remove_by_hand` (the cleanup's last resort). Errors are
:class:`~vtpm_driver.exception.VTPMError` subclasses; no secret value is ever
returned or shown.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from barbicanclient import client as barbican_client
from barbicanclient import exceptions as barbican_exc
from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import session as ks_session
from oslo_config import cfg

from vtpm_driver import exception
from vtpm_driver.keymgr.api import KeyManagerAuditAPI
from vtpm_driver.keymgr.context import RequestContext
from vtpm_driver.virt import guest, secret, state

# -- libvirt and the state directory ----------------------------------------------------


def domain_exists(conn: Any, instance_uuid: str) -> bool:
    try:
        guest.lookup(conn, instance_uuid)
    except exception.InstanceNotFound:
        return False
    return True


def domain_id(conn: Any, instance_uuid: str) -> int | None:
    """libvirt's id of the running domain (a new QEMU process gets a new one), or None."""
    try:
        dom = guest.lookup(conn, instance_uuid)
    except exception.InstanceNotFound:
        return None
    return dom.ID() if guest.is_active(dom) else None


def libvirt_secrets_of(conn: Any, instance_uuid: str, secret_uuid: str | None) -> list[str]:
    """UUIDs of the libvirt vtpm secrets for this server (by usage or by UUID)."""
    return [info.uuid for info in secret.list_vtpm_secrets(conn)
            if info.usage_id == instance_uuid or info.uuid == secret_uuid]


def state_header(base: str, instance_uuid: str, version: str
                 ) -> tuple[str, state.BlobHeader | None]:
    """The swtpm state file's path and blob header (None: no header).

    :raises VTPMError: the file does not exist.
    """
    path = state.state_file(base, instance_uuid, version)
    if not path.exists():
        raise exception.VTPMError(f"no swtpm state file at {path}")
    return str(path), state.read_blob_header(path)


def state_dir_left(base: str, instance_uuid: str) -> str | None:
    """The server's swtpm state directory if it still exists."""
    path = state.state_dir(base, instance_uuid)
    return str(path) if path.exists() else None


def remove_by_hand(conn: Any, base: str, instance_uuid: str, secret_uuid: str | None) -> None:
    """Domain, libvirt secrets and state directory of a server, whatever the driver left."""
    with contextlib.suppress(exception.InstanceNotFound):
        guest.remove(guest.lookup(conn, instance_uuid))
    for uuid in libvirt_secrets_of(conn, instance_uuid, secret_uuid):
        secret.undefine_vtpm_secret(conn, uuid)
    state.remove_state(base, instance_uuid)


# -- Barbican -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SecretView:
    """A Barbican secret's metadata and read ACL as its owner sees them (no payload)."""

    name: str | None
    secret_type: str | None
    read_project_access: bool | None
    read_users: tuple[str, ...]


class BarbicanRefused(exception.VTPMError):
    """Barbican answered with an HTTP error status (the message names it)."""


def _api_root(endpoint: str) -> str:
    root = endpoint.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def view_secret(conf: cfg.ConfigOpts, context: RequestContext, secret_uuid: str) -> SecretView:
    """Read a secret's metadata and ACL with ``context``'s token (python-barbicanclient).

    :raises BarbicanRefused: Barbican answered 4xx/5xx (the status is named).
    :raises KeyManagerUnavailable: Barbican could not be reached.
    """
    auth = context.barbican_auth(conf)
    root = _api_root(str(auth.endpoint))
    session = ks_session.Session(auth=auth, timeout=float(conf.key_manager.timeout),
                                 app_name="vtpm-driver-demo")
    who = context.user_name or context.user_id
    try:
        client = barbican_client.Client(session=session, endpoint=root)
        meta = client.secrets.get(f"{root}/v1/secrets/{secret_uuid}")
        name, secret_type = meta.name, meta.secret_type  # one GET of the metadata
        read = client.acls.get(f"{root}/v1/secrets/{secret_uuid}").get("read")
    except barbican_exc.HTTPError as exc:
        raise BarbicanRefused(f"Barbican refused to read secret {secret_uuid} for {who} "
                              f"(HTTP {exc.status_code})") from None
    except KeyError:  # python-barbicanclient 7.6 turns a 401 into KeyError('title')
        raise BarbicanRefused(f"Barbican refused to read secret {secret_uuid} for {who} "
                              "(HTTP 401)") from None
    except ks_exc.ConnectionError as exc:
        raise exception.KeyManagerUnavailable(
            f"cannot reach Barbican at {root}: {type(exc).__name__}") from None
    return SecretView(
        name=name, secret_type=secret_type,
        read_project_access=None if read is None else read.project_access,
        read_users=tuple(read.users or ()) if read is not None else (),
    )


def secret_listed(keymgr: KeyManagerAuditAPI, context: RequestContext, secret_uuid: str) -> bool:
    """Whether the caller still sees the secret among the vTPM secrets (metadata only)."""
    return any(item.get("uuid") == secret_uuid for item in keymgr.list_vtpm_secrets(context))
