"""The vTPM passphrase in Barbican: create (+ owner-only ACL), get, delete, list.

SPEC D1-D7. Requests go straight through a keystoneauth1 session to Barbican's
v1 REST API rather than through python-barbicanclient: the client object does a
``GET /`` version discovery each time it is built, reads a payload with two
GETs, and turns a 401 into ``KeyError('title')``. Speaking HTTP directly gives
exactly one request per step (create = 1 POST + 1 ACL PUT, unlock = 1 GET,
delete = 1 DELETE) and lets errors be mapped from the HTTP status alone.

The passphrase and tokens never reach a log record or an exception: requests
are sent with keystoneauth1's request/response logging off (``log=False``) and
this module logs method, path (secret UUID only), status and latency itself.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import os
import time
import uuid as uuid_mod
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import requests
from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import loading as ks_loading
from keystoneauth1 import plugin as ks_plugin
from keystoneauth1 import session as ks_session
from oslo_config import cfg
from oslo_log import log as logging

from vtpm_driver import conf as vtpm_conf
from vtpm_driver import context as vtpm_context
from vtpm_driver import exception, spec

LOG = logging.getLogger(__name__)

SYSMETA_KEY = "vtpm_secret_uuid"
SECRET_NAME_PREFIX = "vTPM secret for instance "
PASSPHRASE_BYTES = 384
SECRET_TYPE = "passphrase"
API_VERSION = "v1"
LIST_PAGE_SIZE = 100
_MAX_DETAIL = 200  # characters of Barbican's error description quoted in a message


def new_passphrase() -> str:
    """Base64 of 384 bytes from the OS CSPRNG: 512 ASCII characters (D1, as Nova)."""
    return base64.b64encode(os.urandom(PASSPHRASE_BYTES)).decode("ascii")


def secret_name(instance_uuid: str) -> str:
    """The Barbican secret name Nova uses, so audits can match both."""
    return f"{SECRET_NAME_PREFIX}{instance_uuid}"


def api_root(endpoint: str) -> str:
    """Barbican's unversioned root URL (catalogs list it with or without ``/v1``)."""
    root = endpoint.rstrip("/")
    if root.endswith("/" + API_VERSION):
        root = root[: -len(API_VERSION) - 1]
    return root


def secret_uuid_from_ref(secret_ref: object) -> str | None:
    """The UUID at the end of a ``secret_ref`` URL, or None if there is none."""
    if not isinstance(secret_ref, str):
        return None
    tail = secret_ref.rstrip("/").rsplit("/", 1)[-1]
    return _as_uuid(tail)


def _as_uuid(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        return str(uuid_mod.UUID(value))
    except ValueError:
        return None


def secret_security_of(instance: Any) -> str:
    """The instance's secret security mode, from its flavor only (SPEC A5).

    :raises InvalidVTPMConfig: the flavor names an unknown mode.
    """
    flavor = getattr(instance, "flavor", None)
    extra_specs = getattr(flavor, "extra_specs", None)
    value = (
        extra_specs.get(spec.FLAVOR_SECRET_SECURITY_KEY)
        if isinstance(extra_specs, Mapping) else None
    )
    if value is None:
        return spec.DEFAULT_SECRET_SECURITY
    return _check_mode(value)


def _check_mode(value: object) -> str:
    if not isinstance(value, str) or value not in spec.SECRET_SECURITY_MODES:
        raise exception.InvalidVTPMConfig(
            f"invalid {spec.FLAVOR_SECRET_SECURITY_KEY}={spec.show(value)}: allowed values "
            f"are {', '.join(spec.SECRET_SECURITY_MODES)}"
        )
    return value


def _credentials_of(mode: str) -> str:
    if mode == spec.SECRET_DEPLOYMENT:
        return "the credentials of the service user configured in [service_user]"
    return "the server owner's credentials"


def error_for_status(
    status: int,
    *,
    operation: str,
    endpoint: str,
    mode: str,
    secret_uuid: str | None = None,
    instance_uuid: str | None = None,
    detail: str | None = None,
) -> exception.VTPMError | None:
    """Map a Barbican HTTP status to our exception (D5); None for success.

    Decided from the status alone, never from message text. ``operation`` is a
    verb phrase such as ``"read"``; ``detail`` (Barbican's own description) is
    quoted only where the status alone does not explain the refusal.
    """
    if status < 400:
        return None
    what = f"vTPM secret {secret_uuid}" if secret_uuid else "vTPM secrets"
    if instance_uuid:
        what += f" of server {instance_uuid}"
    if status == 401:
        return exception.VTPMSecretForbidden(
            f"Barbican at {endpoint} rejected the token used to {operation} {what} "
            f"(HTTP 401): the token is invalid or expired; authenticate again with "
            f"{_credentials_of(mode)}"
        )
    if status == 403:
        return exception.VTPMSecretForbidden(
            f"Barbican at {endpoint} refused to {operation} {what} (HTTP 403): "
            f"this needs {_credentials_of(mode)} (secret security mode {mode!r})"
        )
    if status == 404 and secret_uuid:
        return exception.VTPMSecretNotFound(
            f"{what} does not exist in Barbican at {endpoint} (HTTP 404 on {operation}): "
            "without it the server's vTPM state cannot be decrypted and is unrecoverable; "
            "no new secret is created automatically"
        )
    if status == 404:
        return exception.KeyManagerUnavailable(
            f"Barbican at {endpoint} does not serve the {API_VERSION} secrets API "
            f"(HTTP 404 on {operation}): check [key_manager] barbican_endpoint"
        )
    if status >= 500:
        return exception.KeyManagerUnavailable(
            f"Barbican at {endpoint} failed to {operation} {what} (HTTP {status}); "
            "retry when the key manager is healthy again"
        )
    suffix = f": {detail[:_MAX_DETAIL]}" if detail else ""
    return exception.VTPMError(
        f"Barbican at {endpoint} refused to {operation} {what} (HTTP {status}){suffix}"
    )


def _error_detail(resp: requests.Response) -> str | None:
    """Barbican's error title/description (JSON), without ever failing."""
    try:
        body = resp.json()
    except ValueError:
        return None
    if not isinstance(body, Mapping):
        return None
    parts = [str(body[k]) for k in ("title", "description") if body.get(k)]
    return ": ".join(parts) or None


class KeyManagerAPI(Protocol):
    """What the vTPM core needs from a key manager (SPEC D).

    :class:`KeyManager` (Barbican, owner-only ACL, minimal round trips) is the
    implementation; the Nova shim may supply one over castellan. Every method
    maps foreign errors to :mod:`vtpm_driver.exception` types.
    """

    def create_vtpm_secret(self, context: Any, instance: Any,
                           secret_security: str) -> tuple[str, str]: ...

    def ensure_vtpm_secret(self, context: Any, instance: Any,
                           secret_security: str) -> tuple[str, str]: ...

    def get_vtpm_secret(self, context: Any, instance: Any,
                        secret_security: str | None = None) -> str: ...

    def delete_vtpm_secret(self, context: Any, instance: Any,
                           secret_security: str | None = None) -> None: ...



@dataclasses.dataclass(frozen=True)
class _Target:
    """Where Barbican is and as whom to talk to it."""

    session: ks_session.Session
    auth: ks_plugin.BaseAuthPlugin | None  # None: the session's own (service user)
    root: str
    mode: str

    def __repr__(self) -> str:  # the auth plugin holds a token
        return f"_Target(root={self.root!r}, mode={self.mode!r})"


class KeyManager:
    """Barbican operations for vTPM passphrases, one HTTP session per instance.

    ``user`` and ``host`` modes act with the caller's token (the server
    owner's); ``deployment`` mode acts as ``[service_user]`` and never sends
    the caller's token anywhere.
    """

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        vtpm_conf.register_opts(conf)
        self._conf = conf
        self._timeout = float(conf.key_manager.timeout)
        self._session = ks_session.Session(timeout=self._timeout, app_name="vtpm-driver")
        self._service: _Target | None = None

    def __repr__(self) -> str:
        return f"KeyManager(timeout={self._timeout})"

    # -- public API ---------------------------------------------------------

    def create_vtpm_secret(
        self, context: vtpm_context.RequestContext, instance: Any, secret_security: str
    ) -> tuple[str, str]:
        """Create the instance's passphrase in Barbican and record its UUID (D1-D3).

        One POST, then (with ``[vtpm] owner_only_acl``) one ACL PUT. If the ACL
        cannot be set the new secret is deleted again before the error is
        raised, so no readable-by-the-project secret is left behind.

        :returns: ``(secret_uuid, passphrase)``; the UUID is also stored in
            ``instance.system_metadata['vtpm_secret_uuid']``.
        :raises VTPMError: the instance already has a secret (it would be orphaned).
        """
        mode = _check_mode(secret_security)
        existing = instance.system_metadata.get(SYSMETA_KEY)
        if existing:
            raise exception.VTPMError(
                f"server {instance.uuid} already has vTPM secret {existing} in "
                f"system_metadata['{SYSMETA_KEY}']; delete it first or use ensure_vtpm_secret"
            )
        target = self._target(context, mode)
        passphrase = new_passphrase()
        body = {
            "name": secret_name(instance.uuid),
            "secret_type": SECRET_TYPE,
            "payload": passphrase,
            "payload_content_type": "text/plain",
        }
        resp = self._request(target, "POST", "secrets", operation="create",
                             instance_uuid=instance.uuid, json=body)
        secret_uuid = secret_uuid_from_ref(_json(resp).get("secret_ref"))
        if secret_uuid is None:
            raise exception.KeyManagerUnavailable(
                f"Barbican at {target.root} created a secret for server {instance.uuid} "
                "but returned no usable secret_ref"
            )
        LOG.debug("Created vTPM secret %s", secret_uuid, instance_uuid=instance.uuid)
        if self._conf.vtpm.owner_only_acl:
            self._set_owner_only_acl(target, secret_uuid, instance, context)
        instance.system_metadata[SYSMETA_KEY] = secret_uuid
        LOG.info("Stored vTPM secret %s in Barbican (%s mode)", secret_uuid, mode,
                 instance_uuid=instance.uuid)
        return secret_uuid, passphrase

    def ensure_vtpm_secret(
        self, context: vtpm_context.RequestContext, instance: Any, secret_security: str
    ) -> tuple[str, str]:
        """Nova's ``ensure_vtpm_secret``: fetch the recorded secret, else create one.

        A recorded UUID that Barbican no longer has raises
        ``VTPMSecretNotFound``; it is never silently replaced (D4).
        """
        secret_uuid = instance.system_metadata.get(SYSMETA_KEY)
        if secret_uuid:
            return secret_uuid, self.get_vtpm_secret(context, instance, secret_security)
        return self.create_vtpm_secret(context, instance, secret_security)

    def get_vtpm_secret(
        self,
        context: vtpm_context.RequestContext,
        instance: Any,
        secret_security: str | None = None,
    ) -> str:
        """The instance's passphrase: one GET of the payload (D4, D7).

        ``secret_security`` defaults to the mode in the instance's flavor.

        :raises VTPMSecretNotFound: no UUID recorded, or Barbican lost it.
        """
        mode = _check_mode(secret_security) if secret_security else secret_security_of(instance)
        secret_uuid = self._recorded_uuid(instance)
        if secret_uuid is None:
            raise exception.VTPMSecretNotFound(
                f"server {instance.uuid} has no vTPM secret recorded in "
                f"system_metadata['{SYSMETA_KEY}']: its vTPM state cannot be unlocked"
            )
        target = self._target(context, mode)
        resp = self._request(target, "GET", f"secrets/{secret_uuid}/payload", operation="read",
                             secret_uuid=secret_uuid, instance_uuid=instance.uuid,
                             headers={"Accept": "text/plain"})
        return resp.content.decode("ascii", errors="replace")

    def delete_vtpm_secret(
        self,
        context: vtpm_context.RequestContext,
        instance: Any,
        secret_security: str | None = None,
    ) -> None:
        """Delete the instance's secret and its sysmeta key; idempotent (D6).

        No UUID recorded, or Barbican answers 404: nothing to do. On any other
        failure the key stays, so the delete can be retried.
        """
        secret_uuid = self._recorded_uuid(instance)
        if secret_uuid is None:
            instance.system_metadata.pop(SYSMETA_KEY, None)
            return
        mode = _check_mode(secret_security) if secret_security else secret_security_of(instance)
        target = self._target(context, mode)
        resp = self._request(target, "DELETE", f"secrets/{secret_uuid}", operation="delete",
                             secret_uuid=secret_uuid, instance_uuid=instance.uuid,
                             ok_statuses=(404,))
        if resp.status_code == 404:
            LOG.debug("vTPM secret %s already deleted or never existed", secret_uuid,
                      instance_uuid=instance.uuid)
        else:
            LOG.info("Deleted vTPM secret %s", secret_uuid, instance_uuid=instance.uuid)
        instance.system_metadata.pop(SYSMETA_KEY, None)

    def list_vtpm_secrets(
        self, context: vtpm_context.RequestContext, secret_security: str = spec.SECRET_USER
    ) -> list[dict[str, str | None]]:
        """vTPM secrets visible to the caller (or the service user), for audits.

        Pages through ``GET /v1/secrets`` filtered by name (Barbican matches
        ``name`` with SQL ``LIKE``, so a ``%`` suffix selects the prefix) and
        keeps secrets named ``vTPM secret for instance <uuid>``; metadata only,
        never payloads.
        """
        mode = _check_mode(secret_security)
        target = self._target(context, mode)
        found: list[dict[str, str | None]] = []
        offset = 0
        while True:
            params = {"limit": LIST_PAGE_SIZE, "offset": offset,
                      "name": SECRET_NAME_PREFIX + "%"}
            resp = self._request(target, "GET", "secrets", operation="list",
                                 headers={"Accept": "application/json"}, params=params)
            body = _json(resp)
            page = body.get("secrets")
            if not isinstance(page, list) or not page:
                break
            found.extend(_vtpm_entry(item) for item in page if _is_vtpm_secret(item))
            offset += len(page)
            total = body.get("total")
            if not body.get("next") or (isinstance(total, int) and offset >= total):
                break
        return found

    # -- helpers --------------------------------------------------------------

    def _recorded_uuid(self, instance: Any) -> str | None:
        value = instance.system_metadata.get(SYSMETA_KEY)
        if not value:
            return None
        secret_uuid = _as_uuid(value)
        if secret_uuid is None:
            raise exception.InvalidVTPMConfig(
                f"server {instance.uuid} has system_metadata['{SYSMETA_KEY}']="
                f"{spec.show(value)}, which is not a UUID"
            )
        return secret_uuid

    def _set_owner_only_acl(self, target: _Target, secret_uuid: str, instance: Any,
                            context: vtpm_context.RequestContext) -> None:
        """Read ACL: no project-wide access; only the owner (and the creator) (D3).

        In deployment mode the service user created the secret and is the only
        one who needs it, so no user is listed.
        """
        users = [] if target.mode == spec.SECRET_DEPLOYMENT else [
            instance.user_id or context.user_id]
        acl = {"read": {"project-access": False, "users": users}}
        try:
            self._request(target, "PUT", f"secrets/{secret_uuid}/acl", operation="set the ACL of",
                          secret_uuid=secret_uuid, instance_uuid=instance.uuid, json=acl)
        except exception.VTPMError:
            self._rollback(target, secret_uuid, instance.uuid)
            raise

    def _rollback(self, target: _Target, secret_uuid: str, instance_uuid: str) -> None:
        """Delete a secret whose creation could not be completed; never raises."""
        try:
            self._request(target, "DELETE", f"secrets/{secret_uuid}", operation="delete",
                          secret_uuid=secret_uuid, instance_uuid=instance_uuid,
                          ok_statuses=(404,))
        except exception.VTPMError as exc:
            LOG.error("Could not delete half-created vTPM secret %s, delete it by hand: %s",
                      secret_uuid, exc, instance_uuid=instance_uuid)
        else:
            LOG.warning("Deleted half-created vTPM secret %s", secret_uuid,
                        instance_uuid=instance_uuid)

    def _target(self, context: vtpm_context.RequestContext, mode: str) -> _Target:
        if mode == spec.SECRET_DEPLOYMENT:
            return self._service_target()
        auth = context.barbican_auth(self._conf)
        return _Target(self._session, auth, api_root(str(auth.endpoint)), mode)

    def _service_target(self) -> _Target:
        """The ``[service_user]`` session (built once; authenticates at first use)."""
        if self._service is not None:
            return self._service
        group = vtpm_conf.SERVICE_USER_GROUP
        try:
            auth = ks_loading.load_auth_from_conf_options(self._conf, group)
        except ks_exc.MissingRequiredOptions as exc:
            names = ", ".join(opt.dest for opt in exc.options)
            raise exception.InvalidConfiguration(
                f"deployment secret security needs [{group}] {names}"
            ) from None
        except ks_exc.NoMatchingPlugin as exc:
            raise exception.InvalidConfiguration(
                f"[{group}] auth_type={spec.show(exc.name)} is not a keystoneauth1 plugin"
            ) from None
        if auth is None:
            raise exception.InvalidConfiguration(
                f"deployment secret security needs a service user: set [{group}] auth_type "
                "(e.g. password), auth_url, username, password, project_name and domains"
            )
        timeout = getattr(self._conf[group], "timeout", None) or self._timeout
        session = ks_loading.load_session_from_conf_options(
            self._conf, group, auth=auth, timeout=timeout, app_name="vtpm-driver")
        endpoint = self._conf.key_manager.barbican_endpoint
        if not endpoint:
            endpoint = self._service_catalog_endpoint(session)
        self._service = _Target(session, None, api_root(str(endpoint)), spec.SECRET_DEPLOYMENT)
        return self._service

    def _service_catalog_endpoint(self, session: ks_session.Session) -> str:
        km = self._conf.key_manager
        with _keystone_errors():
            endpoint = session.get_endpoint(
                service_type=vtpm_context.KEY_MANAGER_SERVICE_TYPE,
                interface=km.barbican_endpoint_type,
                region_name=km.barbican_region_name,
            )
        if not endpoint:
            raise exception.KeyManagerUnavailable(
                "Barbican endpoint unknown: the service user's catalog has no "
                f"{vtpm_context.KEY_MANAGER_SERVICE_TYPE!r} endpoint for interface "
                f"{km.barbican_endpoint_type!r}; set [key_manager] barbican_endpoint"
            )
        return endpoint

    def _request(
        self,
        target: _Target,
        method: str,
        path: str,
        *,
        operation: str,
        secret_uuid: str | None = None,
        instance_uuid: str | None = None,
        ok_statuses: tuple[int, ...] = (),
        **kwargs: Any,
    ) -> requests.Response:
        """One Barbican request, errors mapped from the status (D5), nothing secret logged."""
        if target.auth is None:
            # Service user: get (or reuse) its token first, so a Keystone
            # failure is reported as such and not blamed on Barbican.
            with _keystone_errors():
                target.session.get_auth_headers()
        url = f"{target.root}/{API_VERSION}/{path}"
        started = time.monotonic()
        try:
            resp = target.session.request(
                url, method, auth=target.auth, raise_exc=False, log=False,
                connect_retries=0, timeout=self._timeout, **kwargs)
        except ks_exc.ConnectTimeout:
            raise exception.KeyManagerUnavailable(
                f"Barbican at {target.root} did not answer within {self._timeout:g} s "
                f"([key_manager] timeout) to {operation} {secret_uuid or 'vTPM secrets'}"
            ) from None
        except ks_exc.ConnectionError as exc:
            raise exception.KeyManagerUnavailable(
                f"cannot reach Barbican at {target.root} to {operation} "
                f"{secret_uuid or 'vTPM secrets'}: {type(exc).__name__}"
            ) from None
        except ks_exc.ClientException as exc:  # auth plugin trouble, never Barbican's status
            raise exception.VTPMSecretForbidden(
                f"cannot authenticate to Barbican at {target.root}: {type(exc).__name__}"
            ) from None
        elapsed_ms = (time.monotonic() - started) * 1000.0
        LOG.debug("Barbican %s /%s/%s -> %s in %.1f ms", method, API_VERSION, path,
                  resp.status_code, elapsed_ms)
        if resp.status_code in ok_statuses:
            return resp
        error = error_for_status(
            resp.status_code, operation=operation, endpoint=target.root, mode=target.mode,
            secret_uuid=secret_uuid, instance_uuid=instance_uuid,
            detail=_error_detail(resp) if resp.status_code >= 400 else None)
        if error is not None:
            raise error
        return resp


@contextlib.contextmanager
def _keystone_errors() -> Iterator[None]:
    """Map keystoneauth1 failures while getting the service user's token."""
    try:
        yield
    except (ks_exc.Unauthorized, ks_exc.Forbidden) as exc:
        raise exception.VTPMSecretForbidden(
            "Keystone refused the credentials of the service user configured in "
            f"[service_user] (HTTP {exc.http_status})"
        ) from None
    except ks_exc.EndpointNotFound:
        raise exception.KeyManagerUnavailable(
            "Barbican endpoint unknown: the service user's catalog has no "
            f"{vtpm_context.KEY_MANAGER_SERVICE_TYPE!r} endpoint; "
            "set [key_manager] barbican_endpoint"
        ) from None
    except (ks_exc.ConnectionError, ks_exc.HttpError) as exc:
        raise exception.KeyManagerUnavailable(
            "cannot get a token for the service user configured in [service_user] "
            f"from Keystone: {type(exc).__name__}"
        ) from None
    except ks_exc.ClientException as exc:
        raise exception.InvalidConfiguration(
            "cannot authenticate the service user configured in [service_user]: "
            f"{type(exc).__name__}"
        ) from None


def _json(resp: requests.Response) -> Mapping[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, Mapping) else {}


def _is_vtpm_secret(item: object) -> bool:
    return isinstance(item, Mapping) and str(item.get("name") or "").startswith(
        SECRET_NAME_PREFIX)


def _vtpm_entry(item: Mapping[str, Any]) -> dict[str, str | None]:
    name = str(item.get("name"))
    return {
        "uuid": secret_uuid_from_ref(item.get("secret_ref")),
        "name": name,
        "instance_uuid": _as_uuid(name[len(SECRET_NAME_PREFIX):]),
        "created": item.get("created"),
        "creator": item.get("creator_id"),
    }
