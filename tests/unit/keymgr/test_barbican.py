"""barbican.barbican against the fake Barbican (+ Keystone) of :mod:`tests.fakes.cloud`,
served over real HTTP on 127.0.0.1: every mapping of SPEC D5, the ACL rollback
and the request counts of D7, end to end through keystoneauth1 and requests.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import json
import logging
import re
import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.fakes.cloud import (
    MEMBER,
    OTHER,
    OWNER,
    SERVICE,
    SERVICE_PASSWORD,
    FakeCloud,
    FakeSecret,
    make_conf,
)
from vtpm_driver import conf as vtpm_conf
from vtpm_driver import exception
from vtpm_driver.keymgr import barbican
from vtpm_driver.keymgr.context import RequestContext
from vtpm_driver.model import consent, rules
from vtpm_driver.model.server import Flavor, Instance

# -- fixtures -------------------------------------------------------------------------


@pytest.fixture
def cloud() -> Iterator[FakeCloud]:
    with FakeCloud() as c:
        yield c


def ctx(who: tuple[str, str, str], catalog: list | None = None) -> RequestContext:
    user, project, token = who
    return RequestContext(user_id=user, project_id=project, auth_token=token,
                          roles=("member",), service_catalog=catalog or [])


def server(mode: str | None = None, owner: tuple[str, str, str] = OWNER) -> Instance:
    specs = {"hw:tpm_version": "2.0"}
    if mode:
        specs["hw:tpm_secret_security"] = mode
    return Instance(name="vm", user_id=owner[0], project_id=owner[1],
                            flavor=Flavor(extra_specs=specs))


@pytest.fixture
def debug_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


def assert_not_leaked(texts: list[str], *secrets: str) -> None:
    for secret in secrets:
        probes = {secret, secret[:40], secret[-40:]}
        with contextlib.suppress(binascii.Error, ValueError):
            raw = base64.b64decode(secret, validate=True)
            probes |= {raw.hex()[:40], repr(raw)[2:40]}
        for text in texts:
            for probe in probes:
                assert probe not in text


def all_log_text(caplog: pytest.LogCaptureFixture) -> list[str]:
    out = []
    for rec in caplog.records:
        out.append(rec.getMessage())
        out.append(repr(rec.args))
        out.append(repr(rec.__dict__))
    return out


# -- pure helpers ---------------------------------------------------------------------


def test_passphrase_shape() -> None:
    p = barbican.new_passphrase()
    assert isinstance(p, str)
    assert len(p) == 512
    assert p.isascii()
    assert len(base64.b64decode(p, validate=True)) == 384
    assert barbican.new_passphrase() != p


def test_secret_name_and_ref_parsing() -> None:
    u = str(uuid.uuid4())
    assert barbican.secret_name(u) == f"vTPM secret for instance {u}"
    assert barbican.secret_uuid_from_ref(f"http://b:9311/v1/secrets/{u}") == u
    assert barbican.secret_uuid_from_ref(f"http://b:9311/v1/secrets/{u}/") == u
    assert barbican.secret_uuid_from_ref("http://b:9311/v1/secrets/not-a-uuid") is None
    assert barbican.secret_uuid_from_ref(None) is None


@pytest.mark.parametrize("endpoint", ["http://b:9311", "http://b:9311/", "http://b:9311/v1",
                                      "http://b:9311/v1/"])
def test_api_root(endpoint: str) -> None:
    assert barbican.api_root(endpoint) == "http://b:9311"


@pytest.mark.parametrize("value", ["bogus", 3, "USER", "user "])
def test_bad_mode_is_typed(value: object) -> None:
    inst = server()
    inst.flavor.extra_specs["hw:tpm_secret_security"] = value
    with pytest.raises(exception.InvalidVTPMConfig, match="hw:tpm_secret_security"):
        rules.secret_security(inst.flavor)


def test_mode_defaults_to_user() -> None:
    assert rules.secret_security(server().flavor) == "user"
    assert rules.secret_security(getattr(object(), "flavor", None)) == "user"
    assert rules.secret_security(server("deployment").flavor) == "deployment"
    # SPEC A2: an empty string counts as unset (rules.secret_security decides).
    blank = server()
    blank.flavor.extra_specs["hw:tpm_secret_security"] = ""
    assert rules.secret_security(blank.flavor) == "user"


# -- user mode over HTTP --------------------------------------------------------------


def test_create_get_delete_round_trip(cloud: FakeCloud, debug_log) -> None:
    km = barbican.KeyManager(make_conf(cloud))
    inst = server()
    sid, passphrase = km.create_vtpm_secret(ctx(OWNER), inst, "user")
    assert inst.system_metadata["vtpm_secret_uuid"] == sid
    stored = cloud.secrets[sid]
    assert stored.name == f"vTPM secret for instance {inst.uuid}"
    assert stored.secret_type == "passphrase"
    assert stored.content_type == "text/plain"
    assert stored.payload == passphrase
    assert len(base64.b64decode(passphrase)) == 384
    # D3: owner only.
    assert stored.project_access is False
    assert stored.acl_users == [OWNER[0]]
    # D7: exactly one POST and one ACL PUT, no discovery, no Keystone.
    assert cloud.requests == [("POST", "/v1/secrets/"), ("PUT", f"/v1/secrets/{sid}/acl")]

    cloud.requests.clear()
    assert km.get_vtpm_secret(ctx(OWNER), inst) == passphrase
    assert cloud.requests == [("GET", f"/v1/secrets/{sid}/payload")]

    cloud.requests.clear()
    km.delete_vtpm_secret(ctx(OWNER), inst)
    assert cloud.requests == [("DELETE", f"/v1/secrets/{sid}")]
    assert "vtpm_secret_uuid" not in inst.system_metadata
    assert sid not in cloud.secrets
    assert_not_leaked(all_log_text(debug_log), passphrase, OWNER[2])
    assert_not_leaked([repr(km), repr(km._target(ctx(OWNER), "user")), repr(ctx(OWNER))],
                      OWNER[2])
    # UUIDs are logged, so operators can follow a secret.
    assert any(sid in t for t in all_log_text(debug_log))


def test_ek_certificate_is_published_beside_the_passphrase_and_withdrawn(
        cloud: FakeCloud) -> None:
    km = barbican.KeyManager(make_conf(cloud))
    inst = server()
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    cert_uuid = km.store_ek_certificate(ctx(OWNER), inst, "user", pem)
    assert inst.system_metadata["vtpm_ek_certificate_uuid"] == cert_uuid
    stored = cloud.secrets[cert_uuid]
    assert (stored.name, stored.secret_type, stored.payload) == (
        f"vTPM EK certificate for instance {inst.uuid}", "certificate", pem)
    assert (stored.project_access, stored.acl_users) == (False, [OWNER[0]])
    with pytest.raises(exception.VTPMError, match="already has EK certificate secret"):
        km.store_ek_certificate(ctx(OWNER), inst, "user", pem)

    cloud.requests.clear()
    km.delete_ek_certificate(ctx(OWNER), inst)
    assert cloud.requests == [("DELETE", f"/v1/secrets/{cert_uuid}")]
    assert cert_uuid not in cloud.secrets
    assert "vtpm_ek_certificate_uuid" not in inst.system_metadata
    km.delete_ek_certificate(ctx(OWNER), inst)  # idempotent: nothing recorded
    inst.system_metadata["vtpm_ek_certificate_uuid"] = cert_uuid
    km.delete_ek_certificate(ctx(OWNER), inst)  # idempotent: Barbican has it no more
    assert "vtpm_ek_certificate_uuid" not in inst.system_metadata


def test_acl_off_leaves_project_access(cloud: FakeCloud) -> None:
    km = barbican.KeyManager(make_conf(cloud, acl=False))
    inst = server()
    sid, passphrase = km.create_vtpm_secret(ctx(OWNER), inst, "user")
    assert cloud.requests == [("POST", "/v1/secrets/")]
    assert cloud.secrets[sid].project_access is True
    assert km.get_vtpm_secret(ctx(MEMBER), inst) == passphrase


def test_member_and_other_are_forbidden(cloud: FakeCloud) -> None:
    km = barbican.KeyManager(make_conf(cloud))
    inst = server()
    sid, _ = km.create_vtpm_secret(ctx(OWNER), inst, "user")
    for who in (MEMBER, OTHER):
        with pytest.raises(exception.VTPMSecretForbidden, match="owner's credentials"):
            km.get_vtpm_secret(ctx(who), inst)
        with pytest.raises(exception.VTPMSecretForbidden):
            km.delete_vtpm_secret(ctx(who), inst)
        # A refused delete keeps the key, so the owner can still delete later.
        assert inst.system_metadata["vtpm_secret_uuid"] == sid


def test_bad_token_is_forbidden(cloud: FakeCloud) -> None:
    km = barbican.KeyManager(make_conf(cloud))
    inst = server()
    with pytest.raises(exception.VTPMSecretForbidden, match="invalid or expired") as ei:
        km.create_vtpm_secret(ctx(("u-owner", "p-a", "tok-bogus-token")), inst, "user")
    assert "tok-bogus-token" not in str(ei.value)
    assert "vtpm_secret_uuid" not in inst.system_metadata
    assert cloud.secrets == {}


def test_context_without_token(cloud: FakeCloud) -> None:
    km = barbican.KeyManager(make_conf(cloud))
    context = RequestContext(user_id="u", project_id="p")
    with pytest.raises(exception.VTPMSecretForbidden, match="no token"):
        km.create_vtpm_secret(context, server(), "user")
    assert cloud.requests == []


@pytest.mark.parametrize("status", [500, 503])
def test_acl_failure_rolls_back(cloud: FakeCloud, status: int, debug_log) -> None:
    km = barbican.KeyManager(make_conf(cloud))
    inst = server()
    cloud.fail("PUT", "/acl$", status)
    with pytest.raises(exception.KeyManagerUnavailable) as ei:
        km.create_vtpm_secret(ctx(OWNER), inst, "user")
    assert cloud.secrets == {}, "the half-created secret must be deleted"
    assert [m for m, _ in cloud.requests] == ["POST", "PUT", "DELETE"]
    assert "vtpm_secret_uuid" not in inst.system_metadata
    payload = json.loads(cloud.bodies[0])["payload"]
    assert_not_leaked([str(ei.value), repr(ei.value), *all_log_text(debug_log)], payload)


def test_acl_forbidden_rolls_back(cloud: FakeCloud) -> None:
    km = barbican.KeyManager(make_conf(cloud))
    cloud.fail("PUT", "/acl$", 403)
    with pytest.raises(exception.VTPMSecretForbidden):
        km.create_vtpm_secret(ctx(OWNER), server(), "user")
    assert cloud.secrets == {}


def test_acl_and_rollback_failure_reports_the_first_error(cloud: FakeCloud,
                                                          debug_log) -> None:
    km = barbican.KeyManager(make_conf(cloud))
    cloud.fail("PUT", "/acl$", 502)
    cloud.fail("DELETE", "/v1/secrets/", 500)
    with pytest.raises(exception.KeyManagerUnavailable, match="HTTP 502"):
        km.create_vtpm_secret(ctx(OWNER), server(), "user")
    (sid,) = cloud.secrets
    errors = [r.getMessage() for r in debug_log.records if r.levelno >= logging.ERROR]
    assert any(sid in m and "by hand" in m for m in errors)


@pytest.mark.parametrize(("status", "kind"), [
    (401, exception.VTPMSecretForbidden),
    (403, exception.VTPMSecretForbidden),
    (404, exception.VTPMSecretNotFound),
    (500, exception.KeyManagerUnavailable),
    (503, exception.KeyManagerUnavailable),
])
def test_get_status_mapping(cloud: FakeCloud, status: int, kind: type) -> None:
    km = barbican.KeyManager(make_conf(cloud))
    inst = server()
    km.create_vtpm_secret(ctx(OWNER), inst, "user")
    cloud.fail("GET", "/payload$", status)
    with pytest.raises(kind) as ei:
        km.get_vtpm_secret(ctx(OWNER), inst)
    assert type(ei.value) is kind
    assert inst.system_metadata["vtpm_secret_uuid"] in str(ei.value)


@pytest.mark.parametrize(("status", "kind"), [
    (401, exception.VTPMSecretForbidden),
    (403, exception.VTPMSecretForbidden),
    (500, exception.KeyManagerUnavailable),
])
def test_delete_status_mapping_keeps_key(cloud: FakeCloud, status: int, kind: type) -> None:
    km = barbican.KeyManager(make_conf(cloud))
    inst = server()
    sid, _ = km.create_vtpm_secret(ctx(OWNER), inst, "user")
    cloud.fail("DELETE", "/v1/secrets/", status)
    with pytest.raises(kind):
        km.delete_vtpm_secret(ctx(OWNER), inst)
    assert inst.system_metadata["vtpm_secret_uuid"] == sid
    km.delete_vtpm_secret(ctx(OWNER), inst)  # retry works
    assert "vtpm_secret_uuid" not in inst.system_metadata


@pytest.mark.parametrize("status", [400, 413])
def test_other_client_errors_are_typed(cloud: FakeCloud, status: int) -> None:
    km = barbican.KeyManager(make_conf(cloud))
    cloud.fail("POST", "/v1/secrets/?$", status)
    with pytest.raises(exception.VTPMError, match=f"HTTP {status}"):
        km.create_vtpm_secret(ctx(OWNER), server(), "user")


def test_create_404_means_wrong_endpoint(cloud: FakeCloud) -> None:
    c = make_conf(cloud)
    c.set_override("barbican_endpoint", f"{cloud.url}/wrong", group="key_manager")
    with pytest.raises(exception.KeyManagerUnavailable, match="barbican_endpoint"):
        barbican.KeyManager(c).create_vtpm_secret(ctx(OWNER), server(), "user")


def test_deleted_secret_is_not_found_and_not_recreated(cloud: FakeCloud) -> None:
    km = barbican.KeyManager(make_conf(cloud))
    inst = server()
    sid, _ = km.create_vtpm_secret(ctx(OWNER), inst, "user")
    del cloud.secrets[sid]
    cloud.requests.clear()
    with pytest.raises(exception.VTPMSecretNotFound, match="unrecoverable"):
        km.get_vtpm_secret(ctx(OWNER), inst)
    with pytest.raises(exception.VTPMSecretNotFound):
        km.ensure_vtpm_secret(ctx(OWNER), inst, "user")
    assert cloud.count("POST") == 0
    assert cloud.secrets == {}
    assert inst.system_metadata["vtpm_secret_uuid"] == sid


def test_ensure_returns_existing_or_creates(cloud: FakeCloud) -> None:
    km = barbican.KeyManager(make_conf(cloud))
    inst = server()
    first = km.ensure_vtpm_secret(ctx(OWNER), inst, "user")
    assert km.ensure_vtpm_secret(ctx(OWNER), inst, "user") == first
    assert len(cloud.secrets) == 1


def test_create_refuses_to_orphan_an_existing_secret(cloud: FakeCloud) -> None:
    km = barbican.KeyManager(make_conf(cloud))
    inst = server()
    sid, _ = km.create_vtpm_secret(ctx(OWNER), inst, "user")
    with pytest.raises(exception.VTPMError, match=sid):
        km.create_vtpm_secret(ctx(OWNER), inst, "user")
    assert len(cloud.secrets) == 1


def test_get_without_uuid(cloud: FakeCloud) -> None:
    km = barbican.KeyManager(make_conf(cloud))
    with pytest.raises(exception.VTPMSecretNotFound, match="vtpm_secret_uuid"):
        km.get_vtpm_secret(ctx(OWNER), server())
    assert cloud.requests == []


@pytest.mark.parametrize("bad", ["../../v3/auth", "not-a-uuid", "x" * 500])
def test_bad_recorded_uuid_is_typed(cloud: FakeCloud, bad: str) -> None:
    km = barbican.KeyManager(make_conf(cloud))
    inst = server()
    inst.system_metadata["vtpm_secret_uuid"] = bad
    with pytest.raises(exception.InvalidVTPMConfig, match="vtpm_secret_uuid"):
        km.get_vtpm_secret(ctx(OWNER), inst)
    with pytest.raises(exception.InvalidVTPMConfig):
        km.delete_vtpm_secret(ctx(OWNER), inst)
    assert cloud.requests == []


def test_delete_is_idempotent(cloud: FakeCloud) -> None:
    km = barbican.KeyManager(make_conf(cloud))
    inst = server()
    km.delete_vtpm_secret(ctx(OWNER), inst)  # never had one
    assert cloud.requests == []
    inst.system_metadata["vtpm_secret_uuid"] = ""
    km.delete_vtpm_secret(ctx(OWNER), inst)
    assert "vtpm_secret_uuid" not in inst.system_metadata
    sid, _ = km.create_vtpm_secret(ctx(OWNER), inst, "user")
    del cloud.secrets[sid]  # gone behind our back
    cloud.requests.clear()
    km.delete_vtpm_secret(ctx(OWNER), inst)
    assert cloud.requests == [("DELETE", f"/v1/secrets/{sid}")]
    assert "vtpm_secret_uuid" not in inst.system_metadata


# -- what Barbican answers (issue 13 items 5 and 6) ---------------------------------


@pytest.mark.parametrize(("payload", "content_type", "why"), [
    ("A" * 511, "text/plain", "511 characters"),
    ("A" * 513, "text/plain", "513 characters"),
    ("", "text/plain", "0 characters"),
    ("\xe9" * 512, "text/plain", "non-ASCII"),
    ("A" * 512, "application/octet-stream", "application/octet-stream"),
    ("A" * 512, "", "no content type"),
])
def test_payload_that_is_not_a_passphrase_is_refused(cloud: FakeCloud, payload: str,
                                                     content_type: str, why: str,
                                                     debug_log) -> None:
    km = barbican.KeyManager(make_conf(cloud))
    inst = server()
    sid, _ = km.create_vtpm_secret(ctx(OWNER), inst, "user")
    cloud.secrets[sid].payload = payload
    cloud.secrets[sid].content_type = content_type
    cloud.requests.clear()
    with pytest.raises(exception.KeyManagerUnavailable, match=why) as ei:
        km.get_vtpm_secret(ctx(OWNER), inst)
    assert sid in str(ei.value)
    assert cloud.requests == [("GET", f"/v1/secrets/{sid}/payload")]
    if payload:
        assert_not_leaked([str(ei.value), repr(ei.value), *all_log_text(debug_log)],
                          payload[:40])


def test_payload_content_type_parameters_are_accepted(cloud: FakeCloud) -> None:
    km = barbican.KeyManager(make_conf(cloud))
    inst = server()
    sid, passphrase = km.create_vtpm_secret(ctx(OWNER), inst, "user")
    cloud.secrets[sid].content_type = "Text/Plain; charset=utf-8"
    assert km.get_vtpm_secret(ctx(OWNER), inst) == passphrase


@pytest.mark.parametrize("reply", [{}, {"secret_ref": "http://b/v1/secrets/not-a-uuid"},
                                   [], "created"])
def test_create_without_usable_secret_ref_leaves_nothing(cloud: FakeCloud,
                                                         reply: object) -> None:
    km = barbican.KeyManager(make_conf(cloud))
    inst = server()
    # Someone else's secret with the same name is never touched.
    foreign = str(uuid.uuid4())
    cloud.secrets[foreign] = FakeSecret(barbican.secret_name(inst.uuid), "passphrase", "x",
                                        "text/plain", MEMBER[0], MEMBER[1], "t")
    cloud.fail("POST", "/v1/secrets/?$", 0, reply=reply)
    with pytest.raises(exception.KeyManagerUnavailable, match="no usable secret_ref"):
        km.create_vtpm_secret(ctx(OWNER), inst, "user")
    assert list(cloud.secrets) == [foreign], "the unnamed secret must be found and deleted"
    assert [m for m, _ in cloud.requests] == ["POST", "GET", "DELETE"]
    assert "vtpm_secret_uuid" not in inst.system_metadata


def test_create_without_secret_ref_and_failed_lookup_says_delete_by_hand(
        cloud: FakeCloud, debug_log) -> None:
    km = barbican.KeyManager(make_conf(cloud))
    inst = server()
    cloud.fail("POST", "/v1/secrets/?$", 0, reply={})
    cloud.fail("GET", r"/v1/secrets/?\?", 503)
    with pytest.raises(exception.KeyManagerUnavailable, match="no usable secret_ref"):
        km.create_vtpm_secret(ctx(OWNER), inst, "user")
    errors = [r.getMessage() for r in debug_log.records if r.levelno >= logging.ERROR]
    assert any(inst.uuid in m and "by hand" in m for m in errors)


def test_acl_reply_that_cannot_be_read_rolls_back(cloud: FakeCloud) -> None:
    km = barbican.KeyManager(make_conf(cloud))
    cloud.fail("PUT", "/acl$", 0, reply="ok")
    with pytest.raises(exception.KeyManagerUnavailable, match="ACL"):
        km.create_vtpm_secret(ctx(OWNER), server(), "user")
    assert cloud.secrets == {}


def test_401_without_title_is_forbidden_not_a_key_error(cloud: FakeCloud) -> None:
    """keystonemiddleware's 401 body has no ``title``: barbicanclient alone raises KeyError."""
    km = barbican.KeyManager(make_conf(cloud))
    inst = server()
    km.create_vtpm_secret(ctx(OWNER), inst, "user")
    middleware_401 = {"error": {"code": 401, "title": "Unauthorized",
                                "message": "The request you have made requires authentication."}}
    for method, path, call in (
            ("GET", "/payload$", lambda: km.get_vtpm_secret(ctx(OWNER), inst)),
            ("DELETE", "/v1/secrets/", lambda: km.delete_vtpm_secret(ctx(OWNER), inst)),
            ("POST", "/v1/secrets/?$", lambda: km.create_vtpm_secret(ctx(OWNER), server(),
                                                                     "user"))):
        cloud.fail(method, path, 401, reply=middleware_401)
        with pytest.raises(exception.VTPMSecretForbidden, match="HTTP 401"):
            call()


def test_no_version_discovery_and_one_client_per_target(cloud: FakeCloud) -> None:
    km = barbican.KeyManager(make_conf(cloud))
    target = km._target(ctx(OWNER), "user")
    assert cloud.requests == []  # building the client sent nothing
    assert target.client.client.endpoint_override == f"{cloud.url}/v1/"


# -- unavailability -------------------------------------------------------------------


def test_timeout_is_bounded_and_unavailable(cloud: FakeCloud) -> None:
    km = barbican.KeyManager(make_conf(cloud, timeout=0.3))
    inst = server()
    km.create_vtpm_secret(ctx(OWNER), inst, "user")
    cloud.fail("GET", "/payload$", 0, delay=1.5)
    with pytest.raises(exception.KeyManagerUnavailable, match=r"0\.3 s") as ei:
        km.get_vtpm_secret(ctx(OWNER), inst)
    assert cloud.url in str(ei.value)
    time.sleep(1.3)  # let the fake finish its delayed answer
    assert km.get_vtpm_secret(ctx(OWNER), inst)  # same call works once healthy


def test_dropped_connection_is_unavailable(cloud: FakeCloud) -> None:
    km = barbican.KeyManager(make_conf(cloud))
    cloud.fail("POST", "/v1/secrets/?$", 0, drop=True)
    with pytest.raises(exception.KeyManagerUnavailable, match=re.escape(cloud.url)):
        km.create_vtpm_secret(ctx(OWNER), server(), "user")


def test_connection_refused_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = vtpm_conf.new_conf()
    c.set_override("barbican_endpoint", f"http://127.0.0.1:{port}", group="key_manager")
    inst = server()
    inst.system_metadata["vtpm_secret_uuid"] = str(uuid.uuid4())
    km = barbican.KeyManager(c)
    for call in (lambda: km.create_vtpm_secret(ctx(OWNER), server(), "user"),
                 lambda: km.get_vtpm_secret(ctx(OWNER), inst),
                 lambda: km.delete_vtpm_secret(ctx(OWNER), inst)):
        with pytest.raises(exception.KeyManagerUnavailable, match=f"127.0.0.1:{port}"):
            call()
    assert "vtpm_secret_uuid" in inst.system_metadata


def test_unknown_endpoint_names_the_option(cloud: FakeCloud) -> None:
    km = barbican.KeyManager(make_conf(cloud, endpoint=False))
    with pytest.raises(exception.KeyManagerUnavailable, match=r"\[key_manager\] barbican_end"):
        km.create_vtpm_secret(ctx(OWNER), server(), "user")
    assert cloud.requests == []


def test_endpoint_from_catalog(cloud: FakeCloud) -> None:
    catalog = [{"type": "key-manager", "endpoints": [
        {"interface": "internal", "region_id": "RegionOne", "url": "http://wrong:1"},
        {"interface": "public", "region_id": "RegionOne", "url": cloud.url + "/v1"}]}]
    km = barbican.KeyManager(make_conf(cloud, endpoint=False))
    inst = server()
    km.create_vtpm_secret(ctx(OWNER, catalog), inst, "user")
    assert next(p for _, p in cloud.requests) == "/v1/secrets/"
    assert cloud.count(prefix="/v3") == 0


# -- deployment mode ------------------------------------------------------------------


def test_deployment_uses_service_user_never_owner_token(cloud: FakeCloud, debug_log) -> None:
    km = barbican.KeyManager(make_conf(cloud, service_user=True))
    inst = server("deployment")
    bogus = RequestContext(user_id=OWNER[0], project_id=OWNER[1], auth_token="tok-bogus-x")
    sid, passphrase = km.create_vtpm_secret(bogus, inst, "deployment")
    assert cloud.secrets[sid].creator == SERVICE[0]
    assert cloud.secrets[sid].project_access is False
    assert cloud.secrets[sid].acl_users == []
    assert km.get_vtpm_secret(bogus, inst) == passphrase
    # Even a context with no token at all works: the owner's token is not used.
    assert km.get_vtpm_secret(RequestContext(user_id="x", project_id="y"), inst) == passphrase
    km.delete_vtpm_secret(bogus, inst)
    assert cloud.secrets == {}
    # One Keystone token request for the whole KeyManager; the rest is Barbican.
    assert cloud.count(prefix="/v3") == 1
    assert [m for m, p in cloud.requests if p.startswith("/v1")] == [
        "POST", "PUT", "GET", "GET", "DELETE"]
    assert_not_leaked(all_log_text(debug_log), passphrase, SERVICE[2], SERVICE_PASSWORD)


def test_deployment_endpoint_from_service_catalog(cloud: FakeCloud) -> None:
    km = barbican.KeyManager(make_conf(cloud, endpoint=False, service_user=True))
    inst = server("deployment")
    km.create_vtpm_secret(ctx(OWNER), inst, "deployment")
    assert cloud.secrets[inst.system_metadata["vtpm_secret_uuid"]].creator == SERVICE[0]


def test_deployment_without_service_user_is_a_config_error(cloud: FakeCloud) -> None:
    km = barbican.KeyManager(make_conf(cloud))
    with pytest.raises(exception.InvalidConfiguration, match=r"\[service_user\] auth_type"):
        km.create_vtpm_secret(ctx(OWNER), server("deployment"), "deployment")


def test_deployment_bad_service_password(cloud: FakeCloud, debug_log) -> None:
    c = make_conf(cloud, service_user=True)
    c.set_override("password", "wrong-password-xyz", group="service_user")
    with pytest.raises(exception.VTPMSecretForbidden, match=r"\[service_user\]"):
        barbican.KeyManager(c).create_vtpm_secret(ctx(OWNER), server("deployment"),
                                                "deployment")
    assert cloud.count(prefix="/v1") == 0
    assert_not_leaked(all_log_text(debug_log), "wrong-password-xyz")


def test_deployment_403_names_the_service_user(cloud: FakeCloud) -> None:
    km = barbican.KeyManager(make_conf(cloud, service_user=True))
    inst = server("deployment")
    km.create_vtpm_secret(ctx(OWNER), inst, "deployment")
    cloud.fail("GET", "/payload$", 403)
    with pytest.raises(exception.VTPMSecretForbidden, match=r"\[service_user\]"):
        km.get_vtpm_secret(ctx(OWNER), inst)


# -- listing --------------------------------------------------------------------------


def test_list_pages_and_filters(cloud: FakeCloud, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(barbican, "LIST_PAGE_SIZE", 2)
    km = barbican.KeyManager(make_conf(cloud, acl=False))
    made = {}
    for _ in range(5):
        inst = server()
        made[km.create_vtpm_secret(ctx(OWNER), inst, "user")[0]] = inst.uuid
    for name in ("unrelated", "vTPM secret for instance not-a-uuid"):
        cloud.secrets[str(uuid.uuid4())] = FakeSecret(
            name, "opaque", "x", "text/plain", OWNER[0], OWNER[1], "t")
    cloud.requests.clear()
    listed = km.list_vtpm_secrets(ctx(OWNER))
    assert {e["uuid"]: e["instance_uuid"] for e in listed if e["instance_uuid"]} == made
    assert len(listed) == 6  # a badly named one is listed too (an audit wants to see it)
    assert all(e["creator"] == OWNER[0] and e["created"] for e in listed)
    assert all(e["name"].startswith("vTPM secret for instance ") for e in listed)
    assert cloud.count("GET") == 3  # 6 matching secrets, pages of 2
    assert all("payload" not in p for _, p in cloud.requests)
    assert km.list_vtpm_secrets(ctx(OTHER)) == []


# -- an owner's consent (vtpm_driver.model.consent) -------------------------------------

CRED_SECRET = "app-cred-secret-0123456789"


def stored_consent(cloud: FakeCloud, operations=(consent.LIVE_MIGRATION,),
                   readers=(SERVICE[0],)) -> tuple[str, str]:
    """(record id, server uuid): the owner's record, readable by ``readers``."""
    server_uuid = str(uuid.uuid4())
    cloud.app_creds["cred-1"] = CRED_SECRET
    payload = consent.record(server_uuid, frozenset(operations),
                             datetime.datetime(2099, 1, 1, tzinfo=datetime.UTC),
                             "cred-1", CRED_SECRET)
    _status, body, _ = cloud._create(OWNER[0], OWNER[1], {
        "name": f"{consent.NAME_PREFIX}{server_uuid}", "secret_type": "opaque",
        "payload": payload, "payload_content_type": "text/plain"})
    record_id = body["secret_ref"].rsplit("/", 1)[-1]
    cloud.secrets[record_id].acl_users = list(readers)
    cloud.secrets[record_id].project_access = False
    return record_id, server_uuid


def test_a_consent_record_is_read_as_the_service_user_and_speaks_for_its_creator(cloud):
    record_id, server_uuid = stored_consent(cloud)
    km = barbican.KeyManager(make_conf(cloud, service_user=True))
    granted = km.get_consent(record_id)
    assert (granted.record_id, granted.server, granted.owner) == (record_id, server_uuid,
                                                                 OWNER[0])
    assert granted.operations == {consent.LIVE_MIGRATION}
    assert CRED_SECRET not in repr(granted)


def test_a_record_the_service_user_may_not_read_is_refused(cloud):
    record_id, _ = stored_consent(cloud, readers=())
    km = barbican.KeyManager(make_conf(cloud, service_user=True))
    with pytest.raises(exception.VTPMSecretForbidden):
        km.get_consent(record_id)


def test_the_consent_context_is_the_owner_by_the_application_credential(cloud, debug_log):
    record_id, _ = stored_consent(cloud)
    km = barbican.KeyManager(make_conf(cloud, service_user=True))
    owner = km.consent_context(km.get_consent(record_id))
    assert (owner.user_id, owner.project_id) == OWNER[:2]
    assert owner.auth_token == OWNER[2]
    assert_not_leaked([debug_log.text, repr(owner)], CRED_SECRET, OWNER[2])


def test_a_withdrawn_application_credential_gives_no_context(cloud):
    record_id, _ = stored_consent(cloud)
    km = barbican.KeyManager(make_conf(cloud, service_user=True))
    granted = km.get_consent(record_id)
    del cloud.app_creds["cred-1"]                       # the owner deleted it
    with pytest.raises(exception.VTPMError):
        km.consent_context(granted)
