"""RequestContext: login, token capture, Barbican auth with no Keystone round trip."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from keystoneauth1 import session as ks_session
from keystoneauth1 import token_endpoint
from keystoneauth1.identity import v3

from tests.fakes.cloud import SERVICE, SERVICE_PASSWORD, FakeCloud
from vtpm_driver import conf as vtpm_conf
from vtpm_driver import exception
from vtpm_driver.keymgr import context as ctx_mod
from vtpm_driver.keymgr.context import RequestContext

TOKEN = "gAAAAAB-very-secret-token-value"


@pytest.fixture
def cloud() -> Iterator[FakeCloud]:
    with FakeCloud() as c:
        yield c


def login(cloud: FakeCloud, password: str = SERVICE_PASSWORD) -> RequestContext:
    return RequestContext.from_credentials(
        f"{cloud.url}/v3", "svc", password, "service", "Default", "Default")


def test_from_credentials_captures_everything(cloud: FakeCloud) -> None:
    context = login(cloud)
    user, project, token = SERVICE
    assert context.user_id == user
    assert context.project_id == project
    assert context.auth_token == token
    assert context.user_name == "svc"
    assert context.project_name == "service"
    assert set(context.roles) == {"member", "service"}
    assert context.service_catalog[0]["type"] == "key-manager"
    assert cloud.requests == [("POST", "/v3/auth/tokens")]


def test_from_session(cloud: FakeCloud) -> None:
    auth = v3.Password(auth_url=f"{cloud.url}/v3", username="svc", password=SERVICE_PASSWORD,
                       project_name="service", user_domain_name="Default",
                       project_domain_name="Default")
    context = RequestContext.from_session(ks_session.Session(auth=auth))
    assert context.user_id == SERVICE[0]
    assert context.auth_token == SERVICE[2]


def test_from_session_needs_identity_plugin() -> None:
    session = ks_session.Session(auth=token_endpoint.Token("http://x", "t"))
    with pytest.raises(exception.InvalidConfiguration, match="identity"):
        RequestContext.from_session(session)


def test_wrong_password_is_forbidden_and_not_echoed(cloud: FakeCloud) -> None:
    with pytest.raises(exception.VTPMSecretForbidden, match="HTTP 401") as ei:
        login(cloud, "wrong-pw-secret")
    assert "wrong-pw-secret" not in str(ei.value)


def test_keystone_down_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(exception.KeyManagerUnavailable, match=f"127.0.0.1:{port}"):
        RequestContext.from_credentials(f"http://127.0.0.1:{port}/v3", "u", "p", "proj")


@pytest.mark.parametrize("missing", ["auth_url", "username", "password", "project_name"])
def test_missing_credentials_are_named(missing: str) -> None:
    creds = {"auth_url": "http://k/v3", "username": "u", "password": "p", "project_name": "x"}
    creds[missing] = ""
    with pytest.raises(exception.InvalidConfiguration, match=missing):
        RequestContext.from_credentials(**creds)


def test_repr_hides_token() -> None:
    context = RequestContext(user_id="u", project_id="p", auth_token=TOKEN)
    assert TOKEN not in repr(context)
    assert TOKEN not in str(context)
    assert "***" in repr(context)
    assert "auth_token=None" in repr(RequestContext(user_id="u", project_id="p"))


def _v3_catalog(url: str, interface: str = "public", region: str = "RegionOne") -> list:
    return [
        {"type": "identity", "endpoints": [{"interface": "public", "url": "http://k"}]},
        {"type": "key-manager", "endpoints": [
            {"interface": interface, "region_id": region, "region": region, "url": url}]},
    ]


def test_barbican_auth_configured_endpoint_wins() -> None:
    conf = vtpm_conf.new_conf()
    conf.set_override("barbican_endpoint", "http://b:9311", group="key_manager")
    context = RequestContext(user_id="u", project_id="p", auth_token=TOKEN,
                             service_catalog=_v3_catalog("http://other:1"))
    auth = context.barbican_auth(conf)
    assert isinstance(auth, token_endpoint.Token)
    assert auth.endpoint == "http://b:9311"
    assert auth.get_headers(None) == {"X-Auth-Token": TOKEN}


def test_barbican_auth_from_catalog() -> None:
    conf = vtpm_conf.new_conf()
    conf.set_override("barbican_endpoint_type", "internal", group="key_manager")
    conf.set_override("barbican_region_name", "R2", group="key_manager")
    catalog = (_v3_catalog("http://pub:1", "public", "R2")
               + _v3_catalog("http://int-r1:1", "internal", "R1")
               + _v3_catalog("http://int-r2:1", "internal", "R2"))
    context = RequestContext(user_id="u", project_id="p", auth_token=TOKEN,
                             service_catalog=catalog)
    assert context.barbican_auth(conf).endpoint == "http://int-r2:1"


def test_barbican_auth_unknown_endpoint_names_option() -> None:
    conf = vtpm_conf.new_conf()
    context = RequestContext(user_id="u", project_id="p", auth_token=TOKEN,
                             service_catalog=_v3_catalog("http://x", "admin"))
    with pytest.raises(exception.KeyManagerUnavailable,
                       match=r"set \[key_manager\] barbican_endpoint") as ei:
        context.barbican_auth(conf)
    assert TOKEN not in str(ei.value)


def test_barbican_auth_needs_token() -> None:
    conf = vtpm_conf.new_conf()
    conf.set_override("barbican_endpoint", "http://b:9311", group="key_manager")
    with pytest.raises(exception.VTPMSecretForbidden, match="no token"):
        RequestContext(user_id="u", project_id="p").barbican_auth(conf)


def test_catalog_v2_form() -> None:
    catalog = [{"type": "key-manager", "endpoints": [
        {"region": "RegionOne", "publicURL": "http://pub", "internalURL": "http://int"}]}]
    assert ctx_mod.find_catalog_endpoint(catalog, "key-manager", "internal") == "http://int"
    assert ctx_mod.find_catalog_endpoint(catalog, "key-manager", "public",
                                         "RegionOne") == "http://pub"
    assert ctx_mod.find_catalog_endpoint(catalog, "key-manager", "public", "Other") is None
    assert ctx_mod.find_catalog_endpoint(catalog, "key-manager", "admin") is None


@pytest.mark.parametrize("catalog", [
    None, [], "key-manager", [None, 3, "x"], [{"type": "key-manager"}],
    [{"type": "key-manager", "endpoints": "http://x"}],
    [{"type": "key-manager", "endpoints": [None, {"interface": "public"}]}],
])
def test_malformed_catalogs_find_nothing(catalog: object) -> None:
    assert ctx_mod.find_catalog_endpoint(catalog, "key-manager", "public") is None


def test_catalog_mixed_forms_and_region_spellings() -> None:
    """keystoneauth1's catalog helpers: v3 ``region`` or ``region_id``, v2 next to v3."""
    catalog = [
        {"type": "identity", "endpoints": [{"interface": "public", "url": "http://k"}]},
        {"type": "key-manager", "endpoints": [
            {"interface": "public", "region": "R1", "url": "http://v3-r1"},
            {"interface": "public", "region_id": "R2", "url": "http://v3-r2"},
            {"region": "R3", "publicURL": "http://v2-r3", "adminURL": 7}]},
    ]
    find = ctx_mod.find_catalog_endpoint
    assert find(catalog, "key-manager", "public", "R1") == "http://v3-r1"
    assert find(catalog, "key-manager", "public", "R2") == "http://v3-r2"
    assert find(catalog, "key-manager", "public", "R3") == "http://v2-r3"
    assert find(catalog, "key-manager", "admin", "R3") is None  # not a string URL
    assert find(catalog, "key-manager", "internal") is None
    assert find(catalog, "identity", "public") == "http://k"
