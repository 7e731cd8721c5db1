"""ops.secrets: the passphrase's path from Barbican to swtpm (SPEC D6, E1, E3, F2, F5)."""

from __future__ import annotations

import logging

import pytest

from tests.fakes.keymgr import FakeKeyManager
from tests.fakes.libvirt import FakeConn
from vtpm_driver import exception
from vtpm_driver.keymgr.context import RequestContext
from vtpm_driver.model import request, rules
from vtpm_driver.model.server import SYSMETA_KEY, Flavor, Instance
from vtpm_driver.ops import secrets as ops_secrets
from vtpm_driver.virt import secret

OWNER = RequestContext(user_id="owner-id", project_id="proj-a", auth_token="tok-owner")
MEMBER = RequestContext(user_id="member-id", project_id="proj-a", auth_token="tok-member")
NO_TOKEN = RequestContext(user_id="owner-id", project_id="proj-a")
SECRET = "6f1c2a7e-0d1b-4c53-9a44-6a0b7b1f5d10"
PASSPHRASE = "c2VjcmV0LXBhc3NwaHJhc2U=" * 20


def _server(mode: str = "user") -> Instance:
    return Instance(name="vm1", user_id=OWNER.user_id, project_id=OWNER.project_id,
                            flavor=Flavor(extra_specs={
                                "hw:tpm_version": "2.0", "hw:tpm_secret_security": mode}))


@pytest.fixture
def world():
    conn = FakeConn()
    return conn, secret.LibvirtSecretStore(conn), FakeKeyManager()


def _start(persistent: bool = False) -> ops_secrets.StartSecret:
    return ops_secrets.StartSecret(SECRET, PASSPHRASE, persistent)


# -- secret_for_start (E3) --------------------------------------------------------------


def test_start_context_undefines_after_success(world) -> None:
    conn, store, _km = world
    inst = _server()
    with ops_secrets.secret_for_start(store, inst, _start()):
        assert set(conn.secrets) == {SECRET}
        assert conn.secrets[SECRET].private
    assert conn.secrets == {}


def test_start_context_undefines_after_failure_and_reraises(world) -> None:
    conn, store, _km = world
    inst = _server()
    with pytest.raises(exception.VirtError, match="start failed"):
        with ops_secrets.secret_for_start(store, inst, _start()):
            raise exception.VirtError("start failed")
    assert conn.secrets == {}
    with pytest.raises(KeyboardInterrupt):
        with ops_secrets.secret_for_start(store, inst, _start()):
            raise KeyboardInterrupt
    assert conn.secrets == {}


def test_start_context_keeps_host_mode_secret(world) -> None:
    conn, store, _km = world
    inst = _server("host")
    with ops_secrets.secret_for_start(store, inst, _start(persistent=True)):
        pass
    assert set(conn.secrets) == {SECRET} and not conn.secrets[SECRET].private
    with pytest.raises(RuntimeError):
        with ops_secrets.secret_for_start(store, inst, _start(persistent=True)):
            raise RuntimeError("boom")
    assert set(conn.secrets) == {SECRET}


def test_start_context_reports_cleanup_failure_after_success(world) -> None:
    conn, store, _km = world
    with pytest.raises(exception.VirtError, match=f"undefine libvirt secret {SECRET}"):
        with ops_secrets.secret_for_start(store, _server(), _start()):
            conn.fail_undefine = True


def test_start_context_keeps_original_error_when_cleanup_fails(world) -> None:
    conn, store, _km = world
    with pytest.raises(RuntimeError, match="original"):
        with ops_secrets.secret_for_start(store, _server(), _start()):
            conn.fail_undefine = True
            raise RuntimeError("original")


def test_start_context_replaces_a_leftover_secret_of_the_same_server(world) -> None:
    conn, store, _km = world
    inst = _server()
    leftover = "11111111-2222-4333-8444-555555555555"
    store.define(leftover, inst.uuid, PASSPHRASE, persistent=True)  # e.g. host mode before
    with ops_secrets.secret_for_start(store, inst, _start()):
        assert set(conn.secrets) == {SECRET}
    assert conn.secrets == {}


def test_no_vtpm_or_libvirt_already_holds_it_defines_nothing(world) -> None:
    conn, store, _km = world
    with ops_secrets.secret_for_start(store, _server(), None):
        pass
    with ops_secrets.secret_for_start(store, _server("host"),
                                      ops_secrets.StartSecret(SECRET, None, True)):
        pass
    assert conn.calls == []


# -- prepare_start (F2, F5) ---------------------------------------------------------------


def test_prepare_start_reads_barbican_first_and_refuses_others(world) -> None:
    _conn, store, km = world
    inst = _server()
    cfg = rules.vtpm_of(inst)
    created = ops_secrets.prepare_start(OWNER, inst, cfg, km, store, create=True)
    assert created.created and created.passphrase == km.passphrases[created.secret_uuid]
    again = ops_secrets.prepare_start(OWNER, inst, cfg, km, store)
    assert (again.secret_uuid, again.created) == (created.secret_uuid, False)
    with pytest.raises(exception.VTPMSecretForbidden):
        ops_secrets.prepare_start(MEMBER, inst, cfg, km, store)
    assert ops_secrets.prepare_start(OWNER, inst, None, km, store) is None


def test_prepare_start_without_a_recorded_secret_is_not_found(world) -> None:
    _conn, store, km = world
    inst = _server()
    with pytest.raises(exception.VTPMSecretNotFound, match="no vTPM secret recorded"):
        ops_secrets.prepare_start(OWNER, inst, rules.vtpm_of(inst), km, store)
    assert km.events == []


def test_prepare_start_host_mode_uses_the_persistent_secret(world) -> None:
    _conn, store, km = world
    inst = _server(request.SECRET_HOST)
    cfg = rules.vtpm_of(inst)
    start = ops_secrets.prepare_start(OWNER, inst, cfg, km, store, create=True)
    with ops_secrets.secret_for_start(store, inst, start):
        pass
    km.events.clear()
    reuse = ops_secrets.prepare_start(MEMBER, inst, cfg, km, store)
    assert (reuse.passphrase, reuse.persistent) == (None, True)
    assert km.events == []  # no Barbican call


HOSTS_OWN = "22222222-3333-4444-8555-666666666666"


def test_host_mode_reuses_an_unrecorded_host_secret_of_the_server_never_replacing_it(
        world) -> None:
    """The host's persistent secret (usage: this instance) unlocks its existing TPM
    state: it is reused and recorded, as Nova reuses it, never undefined and replaced."""
    conn, store, km = world
    inst = _server(request.SECRET_HOST)
    store.define(HOSTS_OWN, inst.uuid, PASSPHRASE, persistent=True)
    before = conn.secrets[HOSTS_OWN].stored
    start = ops_secrets.prepare_start(OWNER, inst, rules.vtpm_of(inst), km, store,
                                      create=True)
    with ops_secrets.secret_for_start(store, inst, start):
        pass
    assert set(conn.secrets) == {HOSTS_OWN}
    assert conn.secrets[HOSTS_OWN].stored == before
    assert (start.secret_uuid, start.passphrase, start.created) == (HOSTS_OWN, None, False)
    assert inst.system_metadata[SYSMETA_KEY] == HOSTS_OWN
    assert km.events == [] and km.passphrases == {}  # no new Barbican secret


def test_host_mode_refuses_a_host_secret_other_than_the_recorded_one(world) -> None:
    conn, store, km = world
    inst = _server(request.SECRET_HOST)
    ops_secrets.prepare_start(OWNER, inst, rules.vtpm_of(inst), km, store, create=True)
    recorded = inst.system_metadata[SYSMETA_KEY]
    store.define(HOSTS_OWN, inst.uuid, PASSPHRASE, persistent=True)
    before = dict(conn.secrets)
    with pytest.raises(exception.VTPMSecretConflict,
                       match=f"{HOSTS_OWN}.*{recorded}|{recorded}.*{HOSTS_OWN}"):
        start = ops_secrets.prepare_start(OWNER, inst, rules.vtpm_of(inst), km, store)
        with ops_secrets.secret_for_start(store, inst, start):
            pass
    assert conn.secrets == before  # the host's secret is still there


def test_start_secret_repr_hides_the_passphrase() -> None:
    shown = repr(_start())
    assert PASSPHRASE not in shown and PASSPHRASE[:8] not in shown and "***" in shown


# -- delete (D6) and cleanup ------------------------------------------------------------------


def test_delete_barbican_secret_is_idempotent(world) -> None:
    _conn, store, km = world
    inst = _server()
    ops_secrets.prepare_start(OWNER, inst, rules.vtpm_of(inst), km, store, create=True)
    assert ops_secrets.delete_barbican_secret(OWNER, inst, inst.flavor, km) is True
    assert SYSMETA_KEY not in inst.system_metadata and km.passphrases == {}
    assert ops_secrets.delete_barbican_secret(OWNER, inst, inst.flavor, km) is False


@pytest.mark.parametrize(("mode", "deleted"), [("user", False), ("host", False),
                                               ("deployment", True)])
def test_delete_without_a_token(world, caplog, mode: str, deleted: bool) -> None:
    _conn, store, km = world
    inst = _server(mode)
    start = ops_secrets.prepare_start(OWNER, inst, rules.vtpm_of(inst), km, store, create=True)
    caplog.set_level(logging.WARNING)
    assert ops_secrets.delete_barbican_secret(NO_TOKEN, inst, inst.flavor, km) is deleted
    assert SYSMETA_KEY not in inst.system_metadata
    assert (start.secret_uuid in km.passphrases) is not deleted
    if not deleted:
        assert f"Cannot delete vTPM secret {start.secret_uuid}" in caplog.text


def test_remove_libvirt_secrets_by_record_and_usage(world) -> None:
    conn, store, _km = world
    inst = _server("host")
    inst.system_metadata[SYSMETA_KEY] = SECRET
    store.define(SECRET, inst.uuid, PASSPHRASE, persistent=True)
    ops_secrets.remove_libvirt_secrets(store, inst)
    assert conn.secrets == {}
    other = "11111111-2222-4333-8444-555555555555"
    store.define(other, inst.uuid, PASSPHRASE, persistent=False)
    inst.system_metadata.clear()
    ops_secrets.remove_libvirt_secrets(store, inst, recorded=SECRET)
    assert conn.secrets == {}
    ops_secrets.remove_libvirt_secrets(store, inst)  # idempotent


# -- what a killed start or move left (issue 20, defect 6) --------------------------

def test_remove_start_leftovers_takes_user_and_deployment_secrets_of_the_named_servers(caplog):
    conn = FakeConn()
    store = secret.LibvirtSecretStore(conn)
    user, deployment = ("20000000-0000-4000-8000-000000000000",
                        "10000000-0000-4000-8000-000000000000")
    host_mode, resized, unnamed = ("30000000-0000-4000-8000-000000000000",
                                   "40000000-0000-4000-8000-000000000000",
                                   "50000000-0000-4000-8000-000000000000")
    left = {server: f"00000000-0000-4000-8000-00000000000{n}"
            for n, server in enumerate((user, deployment, resized, unnamed))}
    for server, secret_uuid in left.items():
        conn.secretDefineXML(secret.secret_xml(secret_uuid, server, ephemeral=True,
                                               private=True))
        conn.secrets[secret_uuid].stored = PASSPHRASE.encode()
    conn.secretDefineXML(secret.secret_xml("00000000-0000-4000-8000-00000000000a", host_mode,
                                           ephemeral=False, private=False))
    volume = "00000000-0000-4000-8000-00000000000b"
    conn.secretDefineXML(f"<secret ephemeral='yes' private='yes'><uuid>{volume}</uuid>"
                         f"<usage type='volume'><name>{user}</name></usage></secret>")
    servers = {user: (request.SECRET_USER,), deployment: (request.SECRET_DEPLOYMENT, None),
               host_mode: (request.SECRET_HOST,),
               resized: (request.SECRET_USER, request.SECRET_HOST),  # may be host mode's
               "60000000-0000-4000-8000-000000000000": (request.SECRET_USER,)}  # none here
    with caplog.at_level(logging.WARNING):
        removed = ops_secrets.remove_start_leftovers(store, servers)
    assert removed == [left[deployment], left[user]]  # in server UUID order
    assert set(conn.secrets) == {left[resized], left[unnamed],
                                 "00000000-0000-4000-8000-00000000000a", volume}
    for server in (user, deployment):
        assert left[server] in caplog.text and server in caplog.text
    assert PASSPHRASE not in caplog.text
    assert ops_secrets.remove_start_leftovers(store, servers) == []  # idempotent


def test_remove_start_leftovers_logs_a_libvirt_failure_and_goes_on(caplog, monkeypatch):
    conn = FakeConn()
    store = secret.LibvirtSecretStore(conn)
    first, second = ("10000000-0000-4000-8000-000000000000",
                     "20000000-0000-4000-8000-000000000000")
    for n, server in enumerate((first, second)):
        conn.secretDefineXML(secret.secret_xml(f"00000000-0000-4000-8000-00000000000{n}",
                                               server, ephemeral=True, private=True))
    real_undefine = store.undefine

    def undefine(secret_uuid):
        if secret_uuid.endswith("0"):
            raise exception.VirtError("libvirt refused to undefine it")
        return real_undefine(secret_uuid)

    monkeypatch.setattr(store, "undefine", undefine)
    modes = (request.SECRET_USER,)
    with caplog.at_level(logging.WARNING):
        removed = ops_secrets.remove_start_leftovers(store, {first: modes, second: modes})
    assert removed == ["00000000-0000-4000-8000-000000000001"]
    assert f"vTPM secret of server {first}" in caplog.text
    assert "libvirt refused to undefine it" in caplog.text
