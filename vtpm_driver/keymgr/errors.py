"""Barbican and Keystone failures -> :mod:`vtpm_driver.exception` (SPEC D5).

The one place that decides what a failed key manager call means.
:func:`error_for_status` maps an HTTP status, never message text;
:func:`barbican_errors` turns whatever the transport raised (keystoneauth1's
``HttpError`` with ``http_status``, python-barbicanclient's ``HTTPError`` with
``status_code``, connection failures) into a status or an unavailability and
raises our exception from it; :func:`keystone_errors` does the same for a
login to Keystone (the caller's, or the service user's). Messages name
endpoints, secret and server UUIDs, never tokens or payloads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import requests
from barbicanclient import exceptions as barbican_exc
from keystoneauth1 import exceptions as ks_exc

from vtpm_driver import exception
from vtpm_driver.keymgr.api import KEY_MANAGER_SERVICE_TYPE
from vtpm_driver.model import rules

API_VERSION = "v1"
_MAX_DETAIL = 200  # characters of Barbican's error description quoted in a message


def _credentials_of(mode: str) -> str:
    if rules.owned_by_service_user(mode):
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


def error_detail(resp: requests.Response | None) -> str | None:
    """Barbican's error title/description (JSON), without ever failing."""
    if resp is None:
        return None
    try:
        body = resp.json()
    except ValueError:
        return None
    if not isinstance(body, Mapping):
        return None
    parts = [str(body[k]) for k in ("title", "description") if body.get(k)]
    return ": ".join(parts) or None


def status_of(exc: BaseException) -> int | None:
    """The HTTP status a transport exception stands for, or None if it has none.

    python-barbicanclient 7.x builds ``HTTPAuthError`` without setting
    ``status_code`` (its ``__init__`` skips ``HTTPError``'s), so a 401 is
    recognised by its class.
    """
    if isinstance(exc, ks_exc.HttpError):
        return exc.http_status
    if isinstance(exc, barbican_exc.HTTPAuthError):
        return 401
    if isinstance(exc, barbican_exc.HTTPError):
        return getattr(exc, "status_code", None) or None
    return None


@contextlib.contextmanager
def barbican_errors(
    *,
    endpoint: str,
    mode: str,
    operation: str,
    timeout: float,
    secret_uuid: str | None = None,
    instance_uuid: str | None = None,
) -> Iterator[None]:
    """Raise our exception for any failure of the Barbican call inside (D5).

    HTTP errors go through :func:`error_for_status`; a timeout or a connection
    that cannot be made or breaks raises ``KeyManagerUnavailable``; any other
    keystoneauth1 failure (the auth plugin) raises ``VTPMSecretForbidden``.
    """
    target = secret_uuid or "vTPM secrets"
    try:
        yield
    except (ks_exc.HttpError, barbican_exc.HTTPError) as exc:
        status = status_of(exc)
        response = getattr(exc, "response", None)
        error = error_for_status(
            status or 500, operation=operation, endpoint=endpoint, mode=mode,
            secret_uuid=secret_uuid, instance_uuid=instance_uuid,
            detail=error_detail(response))
        raise (error or exception.KeyManagerUnavailable(
            f"Barbican at {endpoint} failed to {operation} {target}")) from None
    except ks_exc.ConnectTimeout:
        raise exception.KeyManagerUnavailable(
            f"Barbican at {endpoint} did not answer within {timeout:g} s "
            f"([key_manager] timeout) to {operation} {target}"
        ) from None
    except ks_exc.ConnectionError as exc:
        raise exception.KeyManagerUnavailable(
            f"cannot reach Barbican at {endpoint} to {operation} {target}: "
            f"{type(exc).__name__}"
        ) from None
    except ks_exc.ClientException as exc:  # auth plugin trouble, never Barbican's status
        raise exception.VTPMSecretForbidden(
            f"cannot authenticate to Barbican at {endpoint}: {type(exc).__name__}"
        ) from None


SERVICE_USER = "the service user configured in [service_user]"


@contextlib.contextmanager
def keystone_errors(who: str = SERVICE_USER, *, auth_url: str | None = None,
                    hint: str | None = None) -> Iterator[None]:
    """Raise our exception for any keystoneauth1 failure while ``who`` logs in (D5).

    Refused credentials (HTTP 401/403) raise ``VTPMSecretForbidden`` (with
    ``hint``, what to check); any other status, or Keystone out of reach,
    ``KeyManagerUnavailable``, as does a catalog without a key manager; any
    other keystoneauth1 failure (the auth plugin) ``InvalidConfiguration``.
    Messages name Keystone's URL, the status or the exception's class, never
    its text (which may quote credentials).
    """
    where = f"Keystone at {auth_url}" if auth_url else "Keystone"
    try:
        yield
    except ks_exc.HttpError as exc:
        status = exc.http_status
        if status in (401, 403):
            suffix = f": {hint}" if hint else ""
            raise exception.VTPMSecretForbidden(
                f"{where} refused the credentials of {who} (HTTP {status}){suffix}"
            ) from None
        raise exception.KeyManagerUnavailable(
            f"{where} answered HTTP {status} while authenticating {who}") from None
    except ks_exc.EndpointNotFound:
        raise exception.KeyManagerUnavailable(
            f"Barbican endpoint unknown: the catalog of {who} has no "
            f"{KEY_MANAGER_SERVICE_TYPE!r} endpoint; set [key_manager] barbican_endpoint"
        ) from None
    except ks_exc.ConnectionError as exc:
        raise exception.KeyManagerUnavailable(
            f"cannot reach {where} to authenticate {who}: {type(exc).__name__}"
        ) from None
    except ks_exc.ClientException as exc:
        raise exception.InvalidConfiguration(
            f"cannot authenticate {who} with {where}: {type(exc).__name__}"
        ) from None
