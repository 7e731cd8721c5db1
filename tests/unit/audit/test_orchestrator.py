"""orchestrator: asking Nova which servers exist, and every failure mapped once."""

from __future__ import annotations

import uuid

import pytest
from keystoneauth1 import exceptions as ks_exc

from tests.fakes.nova import FakeNovaAdapter, server
from vtpm_driver import conf as vtpm_conf
from vtpm_driver import exception
from vtpm_driver.audit import orchestrator


def _uuid() -> str:
    return str(uuid.uuid4())


def _conf(*args: str):
    return vtpm_conf.new_conf(list(args))


def _nova(adapter: FakeNovaAdapter) -> orchestrator.NovaServers:
    return orchestrator.NovaServers(_conf(), adapter=adapter)


def test_known_lists_every_live_server_and_the_soft_deleted_ones():
    shelved, active, soft, gone = _uuid(), _uuid(), _uuid(), _uuid()
    adapter = FakeNovaAdapter(
        live=[server(shelved, "SHELVED_OFFLOADED", None), server(active.upper(), "ACTIVE")],
        deleted=[server(soft, "SOFT_DELETED"), server(gone, "DELETED")])
    known = _nova(adapter).known()
    assert set(known) == {shelved, active, soft}
    assert (known[shelved].status, known[shelved].host) == ("SHELVED_OFFLOADED", None)
    assert known[active].host == "compute-1"
    assert [(url, params, mv) for url, params, mv in adapter.calls] == [
        ("/servers/detail", {"all_tenants": 1, "limit": 1000}, "2.1"),
        ("/servers/detail", {"all_tenants": 1, "limit": 1000, "deleted": 1}, "2.1"),
    ]


def test_known_follows_every_page():
    uuids = [_uuid() for _ in range(5)]
    adapter = FakeNovaAdapter(live=[server(u) for u in uuids], page_size=2)
    assert set(_nova(adapter).known()) == set(uuids)
    assert [params.get("marker") for _u, params, _mv in adapter.calls[:4]] == [
        None, uuids[1], uuids[3], None]


@pytest.mark.parametrize(("status", "words"), [
    (401, "rejected the [nova] credentials (HTTP 401)"),
    (403, "needs the admin role"),
    (503, "failed (HTTP 503)"),
    (400, "refused the request (HTTP 400)"),
])
def test_http_errors_are_mapped_from_the_status(status, words):
    with pytest.raises(exception.OrchestratorUnavailable) as caught:
        _nova(FakeNovaAdapter(status=status)).known()
    assert words in str(caught.value)
    assert "GET /servers/detail?all_tenants=1" in str(caught.value)


def test_error_for_status_passes_success():
    assert orchestrator.error_for_status(200, path="/x") is None


@pytest.mark.parametrize(("raised", "words"), [
    (ks_exc.ConnectTimeout("http://admin:pw@nova/"), "within 30 s: ConnectTimeout"),
    (ks_exc.ConnectFailure("http://admin:pw@nova/"), "cannot reach"),
    (ks_exc.EndpointNotFound(), "no 'compute' endpoint"),
    (ks_exc.DiscoveryFailure("http://admin:pw@keystone/"), "cannot reach Keystone at [nova]"),
    (ks_exc.Unauthorized("token tok-SECRET"), "Keystone refused the [nova] credentials"),
    (ks_exc.AuthorizationFailure("pw"), "cannot authenticate the [nova] user"),
])
def test_transport_errors_are_mapped_and_never_quoted(raised, words):
    with pytest.raises(exception.OrchestratorUnavailable) as caught:
        _nova(FakeNovaAdapter(fail=raised)).known()
    assert words in str(caught.value)
    assert "pw" not in str(caught.value) and "SECRET" not in str(caught.value)


def test_a_list_without_hosts_is_not_trusted():
    """No OS-EXT-SRV-ATTR:host: not an admin's view, so perhaps not every project's."""
    item = {"id": _uuid(), "status": "ACTIVE"}
    with pytest.raises(exception.OrchestratorUnavailable, match="does not see servers as an"):
        _nova(FakeNovaAdapter(live=[item])).known()


@pytest.mark.parametrize("body", [[], {"servers": "x"}, {"servers": [{"id": "nope"}]}])
def test_a_garbled_answer_is_no_answer(body):
    adapter = FakeNovaAdapter()
    adapter.get = lambda *a, **k: type("R", (), {"status_code": 200, "json": lambda s: body})()
    with pytest.raises(exception.OrchestratorUnavailable):
        _nova(adapter).known()


def test_no_credentials_in_nova_group():
    with pytest.raises(exception.OrchestratorUnavailable, match=r"no credentials to ask Nova"):
        orchestrator.NovaServers(_conf()).known()


def test_incomplete_credentials_name_what_is_missing(tmp_path):
    path = tmp_path / "v.conf"
    path.write_text("[nova]\nauth_type = password\n")
    with pytest.raises(exception.OrchestratorUnavailable, match=r"\[nova\] lacks auth_url"):
        orchestrator.NovaServers(_conf("--config-file", str(path))).known()


def test_ask_on_a_standalone_host_asks_nobody():
    def factory(conf):
        raise AssertionError("asked Nova")

    assert orchestrator.ask(_conf(), factory) is None


def test_ask_says_why_nova_could_not_be_asked(tmp_path):
    path = tmp_path / "v.conf"
    path.write_text("[vtpm]\norchestrator = nova\n")
    conf = _conf("--config-file", str(path))
    answer = orchestrator.ask(conf, lambda c: orchestrator.NovaServers(
        c, adapter=FakeNovaAdapter(fail=ks_exc.ConnectTimeout())))
    assert answer is not None and not answer.asked and answer.servers is None
    assert answer.refusal.startswith("Nova could not be asked: cannot reach Nova's compute API")
    known = _uuid()
    answer = orchestrator.ask(conf, lambda c: orchestrator.NovaServers(
        c, adapter=FakeNovaAdapter(live=[server(known)])))
    assert answer.asked and set(answer.servers) == {known} and answer.refusal is None
