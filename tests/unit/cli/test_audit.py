"""``vtpm-driver audit [--repair [--dry-run]]``: the command over a fake host, Barbican
and Nova (audit.actions carrying it out)."""

from __future__ import annotations

import datetime
import json
import os
import threading
import types

import pytest
from keystoneauth1 import exceptions as ks_exc

from tests.fakes import swtpm
from tests.fakes.keymgr import FakeKeyManager
from tests.fakes.nova import FakeNovaAdapter
from tests.fakes.nova import server as nova_server
from tests.fakes.service import OWNER, FakeBackend
from tests.unit.audit.helpers import (
    OLD,
    a_copy,
    a_uuid,
    journalled,
)
from vtpm_driver import exception, statestore
from vtpm_driver.audit import orchestrator
from vtpm_driver.audit import plan as repair
from vtpm_driver.audit import report as audit
from vtpm_driver.cli import audit as audit_cli
from vtpm_driver.cli import main as cli_main
from vtpm_driver.ops import journal, locks
from vtpm_driver.standalone import servers


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    """No OS_* credentials from the environment (conftest: no default config file)."""
    for name in ("OS_AUTH_URL", "OS_USERNAME", "OS_PASSWORD", "OS_PROJECT_NAME", "OS_TOKEN",
                 "OS_USER_ID", "OS_AUTH_TYPE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def env(monkeypatch, tmp_path):
    backend, keymgr = FakeBackend(), FakeKeyManager()
    monkeypatch.setattr(audit_cli, "keymgr_factory", lambda conf: keymgr)
    state = tmp_path / "swtpm"
    state.mkdir()
    backend.state_base = str(state)
    conf = tmp_path / "vtpm.conf"
    conf.write_text(f"[vtpm]\nswtpm_state_dir = {state}\nlock_path = {tmp_path / 'locks'}\n"
                    f"state_backup_dir = {tmp_path / 'store'}\nlock_timeout = 0\n")
    return backend, keymgr, state, str(conf)


def _run(capsys, env, *argv):
    backend, _, _, conf = env
    rc = cli_main.main(["--config-file", conf, "audit", *argv],
                       backend_factory=lambda _conf: backend, login=lambda options: OWNER)
    out, err = capsys.readouterr()
    return rc, out, err


def _add(backend, name, secret_security="user"):
    instance = servers.new_instance(name, OWNER, kernel="/k", flavor_extra_specs={
        "hw:tpm_version": "2.0", "hw:tpm_secret_security": secret_security})
    instance.system_metadata["vtpm_secret_uuid"] = a_uuid()
    backend.instances.append(instance)
    return instance


def test_audit_json_clean(capsys, env):
    backend, keymgr, state, _conf = env
    vm = _add(backend, "vm1")
    (state / vm.uuid).mkdir()
    keymgr.listed["user"] = [{"uuid": vm.system_metadata["vtpm_secret_uuid"],
                             "name": f"vTPM secret for instance {vm.uuid}",
                             "instance_uuid": vm.uuid}]
    rc, out, err = _run(capsys, env, "-f", "json", "--os-username", "alice")
    assert (rc, err) == (0, "")
    report = json.loads(out)
    assert report == {
        "servers": [{"name": "vm1", "uuid": vm.uuid, "vtpm_version": "2.0",
                     "vtpm_model": "tpm-tis", "secret_security": "user",
                     "vtpm_secret_uuid": vm.system_metadata["vtpm_secret_uuid"],
                     "problems": []}],
        "orphan_libvirt_secrets": [], "orphan_state_dirs": [], "orphan_barbican_secrets": [],
        "project_readable_secrets": [], "half_done_operations": [],
        "orphan_offhost_copies": [], "stale_offhost_copies": [], "store_temporaries": [],
        "barbican_checked": True, "barbican_scope": ["user alice in project proj-a"],
        "orchestrator": "none", "orchestrator_asked": False, "orchestrator_error": None,
        "orchestrator_vouched": [],
        "consents": [],
        "clean": True,
    }
    assert keymgr.list_calls == [(OWNER, "user")]


def test_audit_reports_leftover_temporaries_of_the_state_store(capsys, env, tmp_path):
    """A killed write of an off-host copy leaves a temporary: reported, never removed."""
    vm = _add(_backend := env[0], "vm1")
    (env[2] / vm.uuid).mkdir()
    store = tmp_path / "store"
    (store / f".{vm.uuid}.0a1b2c.tmp").mkdir(parents=True)
    rc, out, err = _run(capsys, env, "-f", "json", "--no-barbican")
    assert (rc, err) == (0, "")
    report = json.loads(out)
    assert report["store_temporaries"] == [{
        "path": str(store / f".{vm.uuid}.0a1b2c.tmp"), "instance_uuid": vm.uuid,
        "reason": "left by an interrupted write of an off-host copy: remove it by hand "
                  "once no write of that server is under way"}]
    assert report["clean"] is False
    rc, out, _err = _run(capsys, env, "-f", "json", "--no-barbican", "--repair")
    assert rc == 0 and json.loads(out)["repair"] == []
    assert [s["target"] for s in json.loads(out)["repair_skipped"]] == [
        str(store / f".{vm.uuid}.0a1b2c.tmp")]
    assert (store / f".{vm.uuid}.0a1b2c.tmp").is_dir()


def test_audit_finds_each_kind_of_orphan(capsys, env):
    backend, keymgr, state, _conf = env
    _add(backend, "vm1")
    dead_dir, dead_secret, dead_instance, barbican_secret = a_uuid(), a_uuid(), a_uuid(), a_uuid()
    (state / dead_dir).mkdir()
    (state / "not-a-uuid").mkdir()
    backend.secrets = [audit.LibvirtSecret(dead_secret, dead_instance)]
    keymgr.listed["user"] = [{"uuid": barbican_secret, "name": "x",
                             "instance_uuid": dead_instance}]
    rc, out, _ = _run(capsys, env, "-f", "json", "--os-username", "alice")
    assert rc == 0
    report = json.loads(out)
    assert report["orphan_state_dirs"] == [{
        "path": str(state / dead_dir), "instance_uuid": dead_dir,
        "reason": f"no domain with UUID {dead_dir} on this host"}]
    assert [o["secret_uuid"] for o in report["orphan_libvirt_secrets"]] == [dead_secret]
    assert report["orphan_barbican_secrets"] == [{
        "secret_uuid": barbican_secret, "instance_uuid": dead_instance,
        "reason": f"no server {dead_instance} on this host"}]
    assert report["clean"] is False


def test_audit_without_credentials_skips_barbican_with_a_warning(capsys, env):
    _, keymgr, _, _conf = env
    rc, out, err = _run(capsys, env, "-f", "json")
    assert rc == 0
    report = json.loads(out)
    assert report["barbican_checked"] is False and report["barbican_scope"] == []
    assert keymgr.list_calls == []
    assert err.startswith("vtpm-driver: warning: Barbican not checked")


def test_audit_no_barbican_option(capsys, env):
    _, keymgr, _, _conf = env
    rc, out, err = _run(capsys, env, "-f", "json", "--os-username", "alice", "--no-barbican")
    assert (rc, err) == (0, "")
    assert json.loads(out)["barbican_checked"] is False and keymgr.list_calls == []


def test_audit_table_is_readable(capsys, env):
    backend, _, state, _conf = env
    _add(backend, "vm1", "host")
    (state / a_uuid()).mkdir()
    rc, out, _ = _run(capsys, env, "-q")
    assert rc == 0
    assert "name=vm1" in out and "secret_security=host" in out and "problems=host-mode" in out
    assert "reason=no domain with UUID" in out


def _orphans(env):
    backend, keymgr, state, _conf = env
    _add(backend, "vm1")
    dead_dir, dead_secret, dead_instance, barbican_secret = (a_uuid() for _ in range(4))
    (state / dead_dir / "tpm2").mkdir(parents=True)
    (state / "not-a-uuid").mkdir()
    backend.secrets = [audit.LibvirtSecret(dead_secret, dead_instance)]
    keymgr.listed["user"] = [{"uuid": barbican_secret, "name": "x",
                              "instance_uuid": dead_instance, "created": OLD}]
    return dead_dir, dead_secret, barbican_secret


def test_repair_dry_run_shows_the_plan_and_changes_nothing(capsys, env):
    backend, keymgr, state, _conf = env
    dead_dir, dead_secret, barbican_secret = _orphans(env)
    rc, out, err = _run(capsys, env, "--repair", "--dry-run", "-f", "json",
                        "--os-username", "alice")
    assert (rc, err) == (0, "")
    report = json.loads(out)
    assert report["dry_run"] is True
    assert [(r["action"], r["target"], r["result"]) for r in report["repair"]] == [
        (repair.UNDEFINE_SECRET, dead_secret, "planned"),
        (repair.REMOVE_STATE, str(state / dead_dir), "planned"),
        (repair.DELETE_BARBICAN, barbican_secret, "planned"),
    ]
    assert backend.removed == [] and keymgr.repairs == []
    assert (state / dead_dir).is_dir() and backend.secrets


def test_repair_removes_the_orphans_and_then_audit_is_clean(capsys, env):
    backend, keymgr, state, _conf = env
    dead_dir, _dead_secret, barbican_secret = _orphans(env)
    rc, out, err = _run(capsys, env, "--repair", "-f", "json", "--os-username", "alice")
    assert (rc, err) == (0, "")
    assert [r["result"] for r in json.loads(out)["repair"]] == ["done"] * 3
    assert not (state / dead_dir).exists() and (state / "not-a-uuid").is_dir()
    assert backend.secrets == []
    assert keymgr.repairs == [("delete", barbican_secret, "user")]
    rc, out, _ = _run(capsys, env, "-f", "json", "--os-username", "alice")
    assert json.loads(out)["clean"] is True


def test_repair_keeps_a_state_dir_whose_domain_appeared(capsys, env, monkeypatch):
    backend, _keymgr, state, _conf = env
    dead_dir = a_uuid()
    (state / dead_dir).mkdir()
    monkeypatch.setattr(backend, "domain_exists", lambda uuid: True)
    rc, out, _ = _run(capsys, env, "--repair", "-f", "json", "--no-barbican")
    assert rc == 0
    (row,) = json.loads(out)["repair"]
    assert row["result"] == "skipped: a domain of that UUID exists now"
    assert (state / dead_dir).is_dir()


def test_repair_fixes_project_readable_acls(capsys, env):
    backend, keymgr, _state, _conf = env
    vm = _add(backend, "vm1")
    secret = vm.system_metadata["vtpm_secret_uuid"]
    keymgr.listed["user"] = [{"uuid": secret, "name": "n", "instance_uuid": vm.uuid}]
    keymgr.project_readable.add(secret)
    rc, out, _ = _run(capsys, env, "-f", "json", "--os-username", "alice")
    assert json.loads(out)["project_readable_secrets"] == [
        {"secret_uuid": secret, "instance_uuid": vm.uuid, "mode": "user"}]
    rc, out, _ = _run(capsys, env, "--repair", "-f", "json", "--os-username", "alice")
    assert rc == 0
    assert keymgr.repairs == [("acl", secret, vm.user_id, "user")]
    rc, out, _ = _run(capsys, env, "-f", "json", "--os-username", "alice")
    assert json.loads(out)["clean"] is True


def test_repair_failure_exits_1_and_goes_on(capsys, env):
    from vtpm_driver import exception

    _backend, keymgr, state, _conf = env
    dead_dir, _dead_secret, _barbican = _orphans(env)
    keymgr.fail["delete"] = exception.KeyManagerUnavailable("Barbican down")
    rc, out, _ = _run(capsys, env, "--repair", "-f", "json", "--os-username", "alice")
    assert rc == 1
    results = [r["result"] for r in json.loads(out)["repair"]]
    assert results[:2] == ["done", "done"] and results[2] == "failed: Barbican down"
    assert not (state / dead_dir).exists()


def test_dry_run_needs_repair(capsys, env):
    rc, _out, err = _run(capsys, env, "--dry-run")
    assert rc == 1 and "--dry-run only goes with --repair" in err


def test_repair_limited_to_one_instance(capsys, env):
    backend, _keymgr, state, _conf = env
    mine, other = a_uuid(), a_uuid()
    (state / mine).mkdir()
    (state / other).mkdir()
    rc, out, _ = _run(capsys, env, "--repair", "--no-barbican", "--instance", mine.upper(),
                      "-f", "json")
    assert rc == 0
    assert [r["instance_uuid"] for r in json.loads(out)["repair"]] == [mine]
    assert not (state / mine).exists() and (state / other).is_dir()
    assert backend.removed == [("state_dir", mine)]


def test_audit_command_reports_a_garbled_journal_entry(capsys, env):
    backend, _keymgr, _state, _conf = env
    vm = _add(backend, "vm1")
    vm.system_metadata[journal.KEY] = '{"operation": "resize_prepare", "tmp_backup": 7}'
    rc, out, err = _run(capsys, env, "-f", "json", "--no-barbican")
    assert (rc, err) == (0, "")
    (row,) = json.loads(out)["half_done_operations"]
    assert (row["instance_uuid"], row["repair"]) == (vm.uuid, "none")
    assert "'tmp_backup'" in row["reason"]


def _recorder(backend, conf_lock_path, decision):
    calls = []

    def recover(context, instance):
        calls.append((context.user_id, instance.uuid, locks.held_operation(instance.uuid)))
        journal.clear(instance.system_metadata)
        return decision

    backend.driver.recover = recover
    return calls


def test_audit_lists_half_done_and_repair_recovers_under_the_lock(capsys, env):
    backend, _keymgr, _state, _conf = env
    vm = journalled(_add(backend, "vm1"), journal.RESIZE_FINISH)
    backend.pending.add(vm.uuid)
    rc, out, _ = _run(capsys, env, "-f", "json", "--no-barbican")
    report = json.loads(out)
    assert rc == 0 and report["clean"] is False
    (row,) = report["half_done_operations"]
    assert (row["name"], row["operation"], row["repair"], row["instance_uuid"]) == (
        "vm1", journal.RESIZE_FINISH, "roll back", vm.uuid)
    decision = journal.Decision(journal.Action.ROLL_BACK, "revert")
    calls = _recorder(backend, None, decision)
    rc, out, _ = _run(capsys, env, "--repair", "--dry-run", "-f", "json", "--no-barbican")
    assert rc == 0 and calls == []
    rc, out, _ = _run(capsys, env, "--repair", "-f", "json", "--no-barbican",
                      "--os-username", "alice")
    assert rc == 0
    (done,) = json.loads(out)["repair"]
    assert (done["action"], done["result"]) == (repair.RECOVER, "done: roll back")
    assert calls == [("u-owner", vm.uuid, "repair")]
    rc, out, _ = _run(capsys, env, "-f", "json", "--no-barbican")
    assert json.loads(out)["half_done_operations"] == []


def test_repair_of_a_half_done_operation_already_finished_says_so(capsys, env):
    backend, _keymgr, _state, _conf = env
    journalled(_add(backend, "vm1"), journal.START)
    _recorder(backend, None, None)
    rc, out, _ = _run(capsys, env, "--repair", "-f", "json", "--no-barbican")
    (done,) = json.loads(out)["repair"]
    assert rc == 0 and done["result"] == "already done: no interrupted operation now"


def test_repair_skips_a_server_whose_lock_is_held(capsys, env, tmp_path):
    backend, _keymgr, state, _conf = env
    vm = journalled(_add(backend, "vm1"), journal.START)
    dead = a_uuid()
    (state / dead).mkdir()
    calls = _recorder(backend, None, None)
    conf = types.SimpleNamespace(vtpm=types.SimpleNamespace(lock_path=str(tmp_path / "locks"),
                                                            lock_timeout=0))
    got, release = threading.Event(), threading.Event()

    def hold():
        with locks.server_lock(conf, vm.uuid, "resize"):
            got.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert got.wait(30)
        rc, out, _ = _run(capsys, env, "--repair", "-f", "json", "--no-barbican")
        rows = json.loads(out)
        (half,) = rows["half_done_operations"]
        assert half["locked_by_pid"] == os.getpid()
    finally:
        release.set()
        holder.join(30)
    recovered, removed = rows["repair"]
    assert rc == 0 and calls == []
    assert recovered["result"].startswith("skipped: cannot repair server")
    assert "operation 'resize'" in recovered["result"]
    assert removed["result"] == "done" and not (state / dead).exists()


def test_repair_of_an_orphan_takes_its_server_lock(capsys, env, monkeypatch):
    backend, _keymgr, state, _conf = env
    dead = a_uuid()
    (state / dead).mkdir()
    seen = []
    real = backend.remove_state_dir

    def remove(uuid_):
        seen.append(locks.held_operation(uuid_))
        return real(uuid_)

    monkeypatch.setattr(backend, "remove_state_dir", remove)
    rc, _out, _ = _run(capsys, env, "--repair", "-f", "json", "--no-barbican")
    assert rc == 0 and seen == ["repair"]
    assert locks.held_operation(dead) is None


def test_repair_failure_of_a_recovery_exits_1(capsys, env):
    backend, _keymgr, _state, _conf = env
    journalled(_add(backend, "vm1"), journal.RESIZE_REVERT)

    def recover(context, instance):
        raise exception.VirtError("libvirt went away")

    backend.driver.recover = recover
    rc, out, _ = _run(capsys, env, "--repair", "-f", "json", "--no-barbican")
    (done,) = json.loads(out)["repair"]
    assert rc == 1 and done["result"] == "failed: libvirt went away"


@pytest.fixture
def nova(env, monkeypatch):
    """``env`` with ``[vtpm] orchestrator = nova``; Nova is a FakeNovaAdapter."""
    conf = env[3]
    with open(conf, "a") as f:
        f.write("orchestrator = nova\n")
    adapter = FakeNovaAdapter()
    monkeypatch.setattr(audit_cli, "nova_factory",
                        lambda c: orchestrator.NovaServers(c, adapter=adapter))
    return adapter


def _shelved_offloaded(env, tmp_path):
    """A server Nova shelved-offloaded: no domain, its copy in the store, a state
    directory left here, its Barbican secret; and a server Nova deleted, with the same."""
    _backend, keymgr, state, _conf = env
    shelved, dead = a_uuid(), a_uuid()
    store = statestore.DirectoryStateStore(tmp_path / "store")
    for uid in (shelved, dead):
        store.put(a_copy(uid, shelved=uid == shelved), "<domain/>",
                  swtpm.make_state(tmp_path / "src", uid))
        (state / uid).mkdir()
    keymgr.listed["user"] = [{"uuid": f"{u[:8]}-0000-4000-8000-000000000000", "name": "x",
                              "instance_uuid": u, "created": OLD} for u in (shelved, dead)]
    return shelved, dead, store


def test_repair_keeps_a_shelved_offloaded_server_nova_lists(capsys, env, nova, tmp_path):
    _backend, keymgr, state, _conf = env
    shelved, dead, store = _shelved_offloaded(env, tmp_path)
    nova.live = [nova_server(shelved, "SHELVED_OFFLOADED", None)]
    nova.deleted = [nova_server(dead, "DELETED", None)]
    rc, out, err = _run(capsys, env, "--repair", "-f", "json", "--os-username", "alice")
    assert (rc, err) == (0, "")
    report = json.loads(out)
    assert (report["orchestrator"], report["orchestrator_asked"],
            report["orchestrator_error"]) == ("nova", True, None)
    assert {(v["kind"], v["instance_uuid"], v["status"]) for v in
            report["orchestrator_vouched"]} == {
        (audit.STATE_DIR, shelved, "SHELVED_OFFLOADED"),
        (audit.BARBICAN_SECRET, shelved, "SHELVED_OFFLOADED")}
    # The deleted server's Barbican secret outlives its copy by one run (as before).
    assert {(r["action"], r["instance_uuid"], r["result"]) for r in report["repair"]} == {
        (repair.REMOVE_STATE, dead, "done"), (repair.REMOVE_COPY, dead, "done")}
    assert (state / shelved).is_dir() and not (state / dead).exists()
    assert store.get(shelved) is not None and store.get(dead) is None
    rc, out, err = _run(capsys, env, "--repair", "-f", "json", "--os-username", "alice")
    assert [(r["action"], r["instance_uuid"]) for r in json.loads(out)["repair"]] == [
        (repair.DELETE_BARBICAN, dead)]
    assert [r[1][:8] for r in keymgr.repairs] == [dead[:8]]
    assert (state / shelved).is_dir() and store.get(shelved) is not None


def test_repair_deletes_nothing_when_nova_cannot_be_asked(capsys, env, nova, tmp_path):
    _backend, keymgr, state, _conf = env
    shelved, dead, store = _shelved_offloaded(env, tmp_path)
    nova.fail = ks_exc.ConnectTimeout()
    rc, out, err = _run(capsys, env, "--repair", "-f", "json", "--os-username", "alice")
    assert rc == 1
    assert "warning: Nova could not be asked which servers exist" in err
    report = json.loads(out)
    assert report["orchestrator_asked"] is False
    assert report["orchestrator_error"].startswith("cannot reach Nova's compute API")
    assert report["repair"] == []
    reasons = {s["reason"] for s in report["repair_skipped"]}
    assert reasons == {f"Nova could not be asked: {report['orchestrator_error']}"}
    assert sorted((s["instance_uuid"], s["target"]) for s in report["repair_skipped"]) == sorted(
        [(shelved, str(state / shelved)), (dead, str(state / dead)), (dead, dead)])
    assert (state / shelved).is_dir() and (state / dead).is_dir()
    assert store.get(dead) is not None and keymgr.repairs == []


def test_audit_says_nova_could_not_be_asked(capsys, env, nova):
    nova.status = 403
    rc, out, err = _run(capsys, env, "-f", "json", "--no-barbican")
    assert rc == 0 and "needs the admin role" in err
    report = json.loads(out)
    assert report["orchestrator"] == "nova" and report["orchestrator_asked"] is False
    assert "HTTP 403" in report["orchestrator_error"]


def test_audit_lists_the_owners_consents_nova_servers_name(capsys, env, nova):
    """In force, expired, withdrawn (Keystone refuses the credential), not the owner's,
    and a record that is gone: each said, as the shim would judge it."""
    _backend, keymgr, _state, _conf = env
    now = datetime.datetime.now(datetime.UTC)
    cases = {"in force": {}, "expired": {"expires_at": now - datetime.timedelta(minutes=1)},
             "withdrawn": {}, "not the owner's": {"owner": "u-someone"}, "gone": {}}
    records = {}
    for case, kwargs in cases.items():
        server = types.SimpleNamespace(uuid=a_uuid(), metadata={})
        kwargs.setdefault("expires_at", now + datetime.timedelta(hours=1))
        records[case] = (server.uuid, keymgr.add_consent(server, **kwargs))
        nova.live.append({**nova_server(server.uuid), "user_id": "u-owner",
                          "metadata": server.metadata})
    keymgr.withdrawn.add(f"cred-{records['withdrawn'][1]}")
    del keymgr.consents[records["gone"][1]]
    nova.live.append(nova_server(a_uuid()))                  # no consent: not listed
    rc, out, err = _run(capsys, env, "-f", "json", "--no-barbican")
    assert (rc, err) == (0, "")
    found = {(c["server"], c["record_id"]): (c["state"], c["detail"])
             for c in json.loads(out)["consents"]}
    said = {case: found[key] for case, key in records.items()}
    assert said["in force"][0] == "in force" and "live-migration until" in said["in force"][1]
    assert said["expired"][0] == "expired"
    assert said["withdrawn"] == ("unusable", "Keystone: no such application credential")
    assert said["not the owner's"][0] == "unusable" and "u-someone" in said["not the owner's"][1]
    assert said["gone"][0] == "unusable"
    assert len(found) == len(cases)
    assert "cred-secret" not in out


def test_audit_leaves_out_a_secret_deleted_while_it_lists(capsys, env):
    """Its server was deleted meanwhile (by another host, or Nova): gone, not an error."""
    _backend, keymgr, _state, _conf = env
    keymgr.listed["user"] = [{"uuid": a_uuid(), "name": f"vTPM secret for instance {a_uuid()}",
                              "instance_uuid": a_uuid()}]
    keymgr.fail["acl"] = exception.VTPMSecretNotFound("vTPM secret ... does not exist")
    rc, out, err = _run(capsys, env, "-f", "json", "--os-username", "alice")
    assert (rc, err) == (0, "")
    assert json.loads(out)["orphan_barbican_secrets"] == []
