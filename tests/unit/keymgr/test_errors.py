"""keymgr.errors: Barbican's and Keystone's failures mapped by HTTP status (SPEC D5)."""

from __future__ import annotations

import pytest
from barbicanclient import exceptions as barbican_exc
from keystoneauth1 import exceptions as ks_exc

from vtpm_driver import exception
from vtpm_driver.keymgr import errors


@pytest.mark.parametrize(("status", "kind"), [
    (401, exception.VTPMSecretForbidden),
    (403, exception.VTPMSecretForbidden),
    (404, exception.VTPMSecretNotFound),
    (500, exception.KeyManagerUnavailable),
    (502, exception.KeyManagerUnavailable),
    (503, exception.KeyManagerUnavailable),
    (400, exception.VTPMError),
])
def test_error_for_status(status: int, kind: type) -> None:
    err = errors.error_for_status(status, operation="read", endpoint="http://b", mode="user",
                                  secret_uuid="s-1", instance_uuid="i-1")
    assert type(err) is kind
    assert "s-1" in str(err) and "i-1" in str(err)


def test_error_messages_say_what_to_do() -> None:
    kw = {"operation": "read", "endpoint": "http://b", "secret_uuid": "s"}
    assert "owner's credentials" in str(errors.error_for_status(403, mode="user", **kw))
    assert "owner's credentials" in str(errors.error_for_status(403, mode="host", **kw))
    assert "[service_user]" in str(errors.error_for_status(403, mode="deployment", **kw))
    assert "expired" in str(errors.error_for_status(401, mode="user", **kw))
    assert "unrecoverable" in str(errors.error_for_status(404, mode="user", **kw))
    assert "http://b" in str(errors.error_for_status(503, mode="user", **kw))
    assert errors.error_for_status(200, mode="user", **kw) is None
    # 404 with no secret involved means a wrong endpoint, not a lost secret.
    no_secret = errors.error_for_status(404, operation="create", endpoint="http://b",
                                        mode="user")
    assert isinstance(no_secret, exception.KeyManagerUnavailable)
    assert "barbican_endpoint" in str(no_secret)


def test_mapping_ignores_message_text() -> None:
    # A 500 whose text says "Forbidden" is still a server error.
    err = errors.error_for_status(500, operation="read", endpoint="e", mode="user",
                                  secret_uuid="s", detail="Forbidden: nope")
    assert isinstance(err, exception.KeyManagerUnavailable)


@pytest.mark.parametrize(("exc", "status"), [
    (barbican_exc.HTTPAuthError("Unauthorized"), 401),
    (barbican_exc.HTTPClientError("Forbidden", 403), 403),
    (barbican_exc.HTTPServerError("Bad Gateway", 502), 502),
    (ks_exc.NotFound(http_status=404), 404),
    (ValueError("x"), None),
])
def test_status_of_foreign_exceptions(exc: Exception, status: int | None) -> None:
    assert errors.status_of(exc) == status


def test_barbicanclient_errors_map_by_status() -> None:
    for exc, kind in ((barbican_exc.HTTPAuthError("x"), exception.VTPMSecretForbidden),
                      (barbican_exc.HTTPClientError("x", 404), exception.VTPMSecretNotFound),
                      (barbican_exc.HTTPServerError("Forbidden", 500),
                       exception.KeyManagerUnavailable)):
        with pytest.raises(kind, match="s-1"), errors.barbican_errors(
                endpoint="http://b", mode="user", operation="read", timeout=1,
                secret_uuid="s-1"):
            raise exc


@pytest.mark.parametrize(("raised", "kind", "words"), [
    (ks_exc.Unauthorized(http_status=401), exception.VTPMSecretForbidden,
     "Keystone at http://k refused the credentials of the caller (HTTP 401): check"),
    (ks_exc.Forbidden(http_status=403), exception.VTPMSecretForbidden, "(HTTP 403)"),
    (ks_exc.InternalServerError(http_status=500), exception.KeyManagerUnavailable,
     "answered HTTP 500 while authenticating the caller"),
    (ks_exc.ConnectFailure("http://user:pw@k"), exception.KeyManagerUnavailable,
     "cannot reach Keystone at http://k to authenticate the caller: ConnectFailure"),
    (ks_exc.EndpointNotFound(), exception.KeyManagerUnavailable, "'key-manager' endpoint"),
    (ks_exc.DiscoveryFailure("pw"), exception.InvalidConfiguration, "DiscoveryFailure"),
])
def test_keystone_errors_one_mapping_for_every_login(raised: Exception, kind: type,
                                                     words: str) -> None:
    with pytest.raises(kind) as caught, errors.keystone_errors(
            "the caller", auth_url="http://k", hint="check the password"):
        raise raised
    assert words in str(caught.value)
    assert "pw" not in str(caught.value)


def test_keystone_errors_name_the_service_user_by_default() -> None:
    with pytest.raises(exception.VTPMSecretForbidden, match=r"configured in \[service_user\]"):
        with errors.keystone_errors():
            raise ks_exc.Unauthorized(http_status=401)
