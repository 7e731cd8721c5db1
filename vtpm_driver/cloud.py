"""What a server's owner does in the cloud to consent: Keystone and Nova, with their token.

An owner's consent (:mod:`vtpm_driver.model.consent`) is carried by an
application credential of theirs (Keystone) and named in their server's
metadata (Nova). :class:`OwnerCloud` makes those calls with the owner's own
token and the endpoints of their catalog, nothing else; the record itself is
the key manager's (:meth:`vtpm_driver.keymgr.barbican.KeyManager.store_consent`).

Foreign errors are mapped once, here, by status (:func:`error_for_status`);
messages name the service, the call and the status, never a reply's text,
which may quote what was sent.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator
from typing import Any

from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import session as ks_session

from vtpm_driver import exception
from vtpm_driver.keymgr.context import RequestContext, find_catalog_endpoint

IDENTITY, COMPUTE = "identity", "compute"
DEFAULT_TIMEOUT = 60.0


def error_for_status(status: int, *, service: str, call: str,
                     not_found: type[exception.VTPMError]) -> exception.VTPMError:
    """Our exception for an error reply of ``service`` to ``call``.

    401/403: ``NotAuthorized``; 404: ``not_found``; anything else: the
    service is unavailable (``OrchestratorUnavailable`` for Nova,
    ``KeyManagerUnavailable`` for Keystone).
    """
    said = f"{service} answered HTTP {status} to {call}"
    if status in (401, 403):
        return exception.NotAuthorized(f"{said}: not allowed with your credentials")
    if status == 404:
        return not_found(said)
    if service == "Nova":
        return exception.OrchestratorUnavailable(said)
    return exception.KeyManagerUnavailable(said)


class OwnerCloud:
    """Keystone's application credentials and Nova's server metadata, as the caller."""

    def __init__(self, context: RequestContext, *, timeout: float = DEFAULT_TIMEOUT,
                 interface: str = "public") -> None:
        """:raises NotAuthorized: the context carries no token (log in first)."""
        if not context.auth_token:
            raise exception.NotAuthorized(
                f"request context of user {context.user_id} carries no token; log in first")
        self._context = context
        self._interface = interface
        self._session = ks_session.Session(timeout=timeout)

    def __repr__(self) -> str:  # the context holds a token
        return f"OwnerCloud(user_id={self._context.user_id!r})"

    @property
    def user_id(self) -> str:
        return str(self._context.user_id)

    # -- Keystone ---------------------------------------------------------------------

    def create_application_credential(self, name: str, expires_at: datetime.datetime,
                                      access_rules: list[dict[str, str]]) -> tuple[str, str]:
        """A new application credential of the caller's; ``(id, secret)``.

        Keystone refuses it to a caller who logged in with an application
        credential or a trust (it would outlive what created it).

        :raises NotAuthorized, KeyManagerUnavailable:
        """
        body = {"application_credential": {
            "name": name, "expires_at": expires_at.astimezone(datetime.UTC).strftime(
                "%Y-%m-%dT%H:%M:%S.000000Z"),
            "access_rules": access_rules, "unrestricted": False}}
        reply = self._call("Keystone", "POST",
                           f"/users/{self.user_id}/application_credentials",
                           "create an application credential", exception.NotAuthorized,
                           json=body)
        cred = reply.json()["application_credential"]
        return str(cred["id"]), str(cred["secret"])

    def delete_application_credential(self, credential_id: str) -> bool:
        """Delete one of the caller's application credentials; False if it was gone.

        Idempotent. Its tokens stop working at once (Keystone revokes them).

        :raises NotAuthorized, KeyManagerUnavailable:
        """
        try:
            self._call("Keystone", "DELETE",
                       f"/users/{self.user_id}/application_credentials/{credential_id}",
                       f"delete application credential {credential_id}",
                       exception.VTPMSecretNotFound)
        except exception.VTPMSecretNotFound:
            return False
        return True

    # -- Nova -------------------------------------------------------------------------

    def server(self, server_id: str) -> dict[str, Any]:
        """``GET /servers/{id}`` as the caller sees it.

        :raises InstanceNotFound: no such server for the caller.
        :raises NotAuthorized, OrchestratorUnavailable:
        """
        reply = self._call("Nova", "GET", f"/servers/{server_id}", f"show server {server_id}",
                           exception.InstanceNotFound)
        return dict(reply.json()["server"])

    def set_server_metadata(self, server_id: str, key: str, value: str) -> None:
        """Set one metadata item of the server (Nova's ``server set --property``)."""
        self._call("Nova", "PUT", f"/servers/{server_id}/metadata/{key}",
                   f"set metadata {key} of server {server_id}", exception.InstanceNotFound,
                   json={"meta": {key: value}})

    def delete_server_metadata(self, server_id: str, key: str) -> bool:
        """Remove one metadata item; False if it was not there. Idempotent."""
        try:
            self._call("Nova", "DELETE", f"/servers/{server_id}/metadata/{key}",
                       f"remove metadata {key} of server {server_id}",
                       exception.InstanceNotFound)
        except exception.InstanceNotFound:
            return False
        return True

    # -- one place for the calls and their errors --------------------------------------

    def _endpoint(self, service: str) -> str:
        service_type = IDENTITY if service == "Keystone" else COMPUTE
        found = find_catalog_endpoint(self._context.service_catalog, service_type,
                                      self._interface)
        if not found:
            raise exception.InvalidConfiguration(
                f"your service catalog has no {service_type!r} endpoint for interface "
                f"{self._interface!r}")
        return found.rstrip("/")

    def _call(self, service: str, method: str, path: str, call: str,
              not_found: type[exception.VTPMError], **kwargs: Any) -> Any:
        url = self._endpoint(service)
        if service == "Keystone" and not url.endswith("/v3"):
            url += "/v3"
        with self._errors(service, call, not_found):
            return self._session.request(
                url + path, method, headers={"X-Auth-Token": self._context.auth_token},
                raise_exc=True, **kwargs)

    @staticmethod
    @contextlib.contextmanager
    def _errors(service: str, call: str,
                not_found: type[exception.VTPMError]) -> Iterator[None]:
        try:
            yield
        except ks_exc.HttpError as exc:
            raise error_for_status(exc.http_status, service=service, call=call,
                                   not_found=not_found) from None
        except ks_exc.ClientException as exc:  # out of reach, timed out, ...
            unavailable = (exception.OrchestratorUnavailable if service == "Nova"
                           else exception.KeyManagerUnavailable)
            raise unavailable(f"cannot reach {service} to {call}: "
                              f"{type(exc).__name__}") from None
