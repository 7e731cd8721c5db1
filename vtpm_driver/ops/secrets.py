"""The passphrase's path from Barbican to swtpm, once for every caller.

Every start of a guest with a vTPM needs the passphrase in libvirt for the
moment swtpm reads it (SPEC E, F2, F5). The steps, in this order:

1. :func:`prepare_start` BEFORE the guest is touched: ``host`` mode reuses the
   persistent libvirt secret when the host has it (no Barbican call); every
   other case reads the passphrase from Barbican (or, when ``create`` is set and
   none is recorded, creates it). A caller who may not read it is refused while
   the server is still as it was.
2. :func:`secret_for_start` around the start: a leftover libvirt secret of the
   same server is undefined, the secret is defined, and (``user``/
   ``deployment``) undefined again as soon as the body ends, whether the start
   worked or not.
3. :func:`delete_barbican_secret` on delete or when a resize dropped the vTPM,
   with the one rule for requests that carry no token.

A kill (SIGKILL, power loss) between steps 2's define and undefine leaves the
passphrase defined in libvirtd; :func:`remove_start_leftovers`, at the service's
start-up, undefines what such a kill left for the servers the caller names
(:func:`vtpm_driver.model.rules.left_after_start` decides).

The libvirt side is a :class:`SecretStore`: :class:`vtpm_driver.virt.secret.
LibvirtSecretStore` for the standalone driver, an adapter over Nova's ``Host``
in the Nova shim. Passphrases only live in :class:`StartSecret` (repr hidden)
and local variables.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

from oslo_log import log as logging

from vtpm_driver import exception
from vtpm_driver.keymgr import KeyManagerAPI
from vtpm_driver.keymgr.api import EKCertificateStore
from vtpm_driver.model import rules
from vtpm_driver.model.request import VTPMConfig
from vtpm_driver.model.server import (
    EK_CERT_KEY,
    SYSMETA_KEY,
    recorded_secret,
    require_recorded_secret,
    server_label,
)

LOG = logging.getLogger(__name__)


class SecretStore(Protocol):
    """The libvirt ``vtpm`` secrets of one host (usage name = instance UUID).

    Implementations map their foreign errors to :mod:`vtpm_driver.exception`.
    """

    def find(self, instance_uuid: str) -> str | None:
        """UUID of the vTPM secret serving this instance, or None."""

    def define(self, secret_uuid: str, instance_uuid: str, passphrase: str, *,
               persistent: bool) -> None:
        """Define the secret (ephemeral + private unless ``persistent``) and set its value."""

    def undefine(self, secret_uuid: str) -> bool:
        """Undefine it; True if it existed. Idempotent."""


@dataclasses.dataclass(frozen=True, repr=False)
class StartSecret:
    """What a start needs to unlock the TPM state.

    ``passphrase`` None means libvirt already holds it (a ``host`` mode
    persistent secret) and nothing has to be defined.
    """

    secret_uuid: str
    passphrase: str | None
    persistent: bool
    created: bool = False  # made by this operation: undo deletes it

    def __repr__(self) -> str:  # never show the passphrase
        shown = "***" if self.passphrase else None
        return (f"StartSecret(secret_uuid={self.secret_uuid!r}, persistent={self.persistent}, "
                f"created={self.created}, passphrase={shown})")


def prepare_start(context: Any, instance: Any, cfg: VTPMConfig | None,
                  keymgr: KeyManagerAPI, secrets: SecretStore, *,
                  create: bool = False) -> StartSecret | None:
    """Everything a start needs to unlock the TPM, fetched before the guest is touched.

    Not idempotent when ``create`` makes a new Barbican secret (the UUID is
    recorded in ``system_metadata``; the caller saves the instance and, if it
    then fails, deletes it again: ``StartSecret.created`` says so).

    :returns: None when the server has no vTPM.
    :raises VTPMSecretNotFound: no secret recorded (and not ``create``), or Barbican lost it.
    :raises VTPMSecretForbidden: the caller may not read the passphrase (F5).
    :raises KeyManagerUnavailable: Barbican is down.
    """
    if cfg is None:
        return None
    return prepare_start_in_mode(context, instance, cfg.secret_security, keymgr, secrets,
                                 create=create)


def prepare_start_in_mode(context: Any, instance: Any, mode: str, keymgr: KeyManagerAPI,
                          secrets: SecretStore, *, create: bool = False) -> StartSecret:
    """:func:`prepare_start` for a server known to have a vTPM, by its secret ``mode``.

    For callers told "this guest has a vTPM" by their framework (Nova's
    ``_get_or_create_secret_for_vtpm``), which need only the secret mode.
    Same steps, errors and idempotency as :func:`prepare_start`; ``host``
    mode follows :func:`host_secret_reusable` (an unrecorded host secret of
    the server is reused and recorded in ``system_metadata``).

    :raises VTPMSecretConflict: ``host`` mode, and the host's secret for the
        server is not the recorded one (nothing is touched).
    """
    persistent = rules.uses_persistent_secret(mode)
    recorded = recorded_secret(instance)
    if persistent:
        existing = secrets.find(instance.uuid)
        if host_secret_reusable(instance, recorded, existing):
            if recorded is None:
                instance.system_metadata[SYSMETA_KEY] = existing
                LOG.warning("Reusing the host's libvirt vTPM secret %s, which the server's "
                            "record did not name (now recorded)", existing,
                            instance_uuid=instance.uuid)
            LOG.debug("Using the host's libvirt secret %s", existing,
                      instance_uuid=instance.uuid)
            return StartSecret(str(existing), None, persistent=True)
    if recorded is None and not create:
        require_recorded_secret(instance)  # raises VTPMSecretNotFound
    secret_uuid, passphrase = keymgr.ensure_vtpm_secret(context, instance, mode)
    return StartSecret(secret_uuid, passphrase, persistent, created=recorded is None)


def host_secret_reusable(instance: Any, recorded: str | None, existing: str | None) -> bool:
    """Whether a ``host``-mode start reuses the host's libvirt secret ``existing``
    (found by usage: this instance) instead of reading Barbican. Pure.

    The TPM state may be encrypted with the host's secret, so it is never
    undefined and replaced: the recorded one is reused; one the record does not
    name is reused too, as Nova's driver does (the caller records it), when
    nothing is recorded.

    :raises VTPMSecretConflict: the record names another secret: which one
        encrypts the state is unknown, so neither is replaced; names both.
    """
    if existing is None:
        return False
    if recorded is None or existing == recorded:
        return True
    raise exception.VTPMSecretConflict(
        f"server {server_label(instance)}: this host holds libvirt vTPM secret "
        f"{existing} for it, but its record names secret {recorded}; refusing to replace "
        f"the host's secret (its TPM state may be encrypted with it). Check which one "
        f"unlocks the state, then undefine the other (virsh secret-undefine) or fix "
        f"vtpm_secret_uuid")


def define_for_start(secrets: SecretStore, instance: Any, start: StartSecret) -> None:
    """Define the libvirt secret a start needs, replacing a leftover of the same server.

    A leftover is e.g. the persistent secret of a server resized from ``host``
    to ``user`` mode, or an ephemeral one a killed operation left behind.
    No-op when libvirt already holds the persistent secret.
    """
    if start.passphrase is None:
        return
    leftover = secrets.find(instance.uuid)
    if leftover is not None:
        secrets.undefine(leftover)
        LOG.info("Removed leftover libvirt vTPM secret %s before start", leftover,
                 instance_uuid=instance.uuid)
    secrets.define(start.secret_uuid, instance.uuid, start.passphrase,
                   persistent=start.persistent)


def after_start(secrets: SecretStore, instance: Any, start: StartSecret | None) -> None:
    """Undefine an ephemeral secret once swtpm has read it (SPEC E3); idempotent."""
    if start is None or start.persistent:
        return
    secrets.undefine(start.secret_uuid)


@contextlib.contextmanager
def secret_for_start(secrets: SecretStore, instance: Any,
                     start: StartSecret | None) -> Iterator[None]:
    """Define the secret for the duration of a guest start; undefine it after (E3).

    The ephemeral secret is undefined whether the body worked or not: swtpm
    has read the key by then, and a failed start must not leave an orphan.

    :raises VirtError: the secret could not be undefined after a successful body.
    """
    if start is None:
        yield
        return
    define_for_start(secrets, instance, start)
    try:
        yield
    except BaseException:
        try:
            after_start(secrets, instance, start)
        except exception.VTPMError as cleanup_error:
            LOG.error("Could not undefine libvirt vTPM secret %s after a failed start: %s",
                      start.secret_uuid, cleanup_error, instance_uuid=instance.uuid)
        raise
    after_start(secrets, instance, start)


def remove_start_leftovers(secrets: SecretStore,
                           servers: Mapping[str, Sequence[str | None]]) -> list[str]:
    """Undefine what killed starts or moves left in libvirt; at the service's start-up only.

    ``servers``: server UUID -> the secret mode of every flavor it may have on
    this host (:func:`vtpm_driver.model.rules.left_after_start`), for each
    server whose secret may be here by the caller's record (Nova's: the
    instances on the host and those its unfinished migrations name). Only the
    service that starts guests here defines ``user``/``deployment`` secrets,
    each for one step; while it starts none of its steps is in progress, so
    such a server's secret found here (by usage, the server's UUID) is a
    leftover. A ``host`` mode one stays, as do secrets of other usage types
    and of servers not named (the audit judges those).

    Each secret undefined is logged with its UUID and its server's (never the
    value). A libvirt failure for one server is logged and the others are
    still swept, so nothing raises for libvirt. Idempotent: a second sweep
    finds nothing.

    :returns: the UUIDs of the secrets undefined, in server UUID order.
    """
    removed: list[str] = []
    for server_uuid in sorted(servers):
        if not rules.left_after_start(*servers[server_uuid]):
            continue
        try:
            leftover = secrets.find(server_uuid)
            if leftover is None or not secrets.undefine(leftover):
                continue
        except exception.VTPMError as exc:
            LOG.error("Could not remove the libvirt vTPM secret of server %s left by an "
                      "interrupted start or move: %s", server_uuid, exc)
            continue
        LOG.warning("Removed libvirt vTPM secret %s of server %s, left defined by an "
                    "interrupted start or move", leftover, server_uuid)
        removed.append(leftover)
    return removed


def remove_libvirt_secrets(secrets: SecretStore, instance: Any, *,
                           recorded: str | None = None) -> None:
    """Undefine every libvirt vTPM secret of the server (recorded UUID and by usage).

    ``recorded``: the secret UUID the server had before a Barbican delete
    dropped it from ``system_metadata`` (default: the one recorded now).
    Idempotent; used by delete and by cleanups of a moved server.
    """
    recorded = recorded or recorded_secret(instance)
    if recorded:
        secrets.undefine(recorded)
    leftover = secrets.find(instance.uuid)
    if leftover is not None:
        secrets.undefine(leftover)


def delete_barbican_secret(context: Any, instance: Any, flavor: Any,
                           keymgr: KeyManagerAPI) -> bool:
    """Delete the recorded Barbican secret and its ``system_metadata`` key (SPEC D6).

    Idempotent: nothing recorded is a no-op. The mode comes from ``flavor``
    (the one the secret was made for), read leniently so a bad flavor never
    blocks a delete. A request with no token (Nova's periodic tasks, start-up)
    cannot delete a ``user``/``host`` secret: it is left in Barbican with a
    warning naming it (``vtpm-driver audit`` lists it) and the key is dropped,
    rather than failing the server's cleanup.

    :returns: True if Barbican was asked to delete it.
    :raises VTPMSecretForbidden: a token was given but may not delete it.
    :raises KeyManagerUnavailable: Barbican is down (the key stays; retry).
    """
    return delete_secret(context, instance, flavor, keymgr, token_required=True)


def delete_secret(context: Any, instance: Any, flavor: Any, keymgr: KeyManagerAPI, *,
                  token_required: bool) -> bool:
    """:func:`delete_barbican_secret` for any key manager.

    ``token_required``: the key manager acts with the request's token (our
    Barbican client), so a request without one cannot delete a ``user``/``host``
    secret and the rule above applies. A key manager that finds its own
    credentials (castellan's, configured by the operator) is always asked.

    :returns: True if the key manager was asked to delete it.
    :raises VTPMSecretForbidden: the caller may not delete it.
    :raises KeyManagerUnavailable: the key manager is down (the key stays; retry).
    """
    secret_uuid = recorded_secret(instance)
    if secret_uuid is None:
        return False
    mode = rules.secret_security(flavor, strict=False)
    if (token_required and not rules.owned_by_service_user(mode)
            and not getattr(context, "auth_token", None)):
        LOG.warning("Cannot delete vTPM secret %s from Barbican without the owner's token "
                    "(this request carries none); delete it by hand", secret_uuid,
                    instance_uuid=instance.uuid)
        instance.system_metadata.pop(SYSMETA_KEY, None)
        return False
    if instance.system_metadata.get(EK_CERT_KEY) and isinstance(keymgr, EKCertificateStore):
        keymgr.delete_ek_certificate(context, instance, mode)  # the published EK certificate
    keymgr.delete_vtpm_secret(context, instance, mode)
    return True
