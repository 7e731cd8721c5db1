"""Operator audit (SPEC F7): the pure orphan rules and the `vtpm-driver audit` command."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import types
import uuid

import pytest
from keystoneauth1 import exceptions as ks_exc

from tests.fakes import swtpm
from tests.fakes.keymgr import FakeKeyManager
from tests.fakes.nova import FakeNovaAdapter
from tests.fakes.nova import server as nova_server
from tests.fakes.service import OWNER, FakeBackend
from vtpm_driver import exception, objects, servers, statestore
from vtpm_driver.audit import orchestrator
from vtpm_driver.audit import plan as repair
from vtpm_driver.audit import report as audit
from vtpm_driver.cli import audit as audit_cli
from vtpm_driver.cli import main as cli_main
from vtpm_driver.ops import journal, locks


def _uuid() -> str:
    return str(uuid.uuid4())


def _server(name="vm1", mode="user", secret=None, version="2.0", uid=None) -> objects.Instance:
    """A server as the audit gets it: the model (objects.Instance) read from its record."""
    specs = {"hw:tpm_version": version, "hw:tpm_secret_security": mode} if version else {}
    return objects.Instance(name=name, uuid=uid or _uuid(), user_id="u", project_id="p",
                            flavor=objects.Flavor(extra_specs=specs),
                            system_metadata={"vtpm_secret_uuid": secret} if secret else {})


# -- pure rules -----------------------------------------------------------------------


def test_clean_host_has_no_orphans():
    secret = _uuid()
    server = _server(mode="host", secret=secret)
    report = audit.audit(
        [server], [server.uuid], [audit.LibvirtSecret(secret, server.uuid, False, False)],
        [server.uuid], [audit.BarbicanSecret(secret, "n", server.uuid)])
    assert report.orphans == ()
    assert report.clean and report.barbican_checked
    (finding,) = report.servers
    assert finding.instance is server and finding.problems == ()
    assert (finding.name, finding.uuid, finding.version, finding.model, finding.secret_security,
            finding.secret_uuid) == ("vm1", server.uuid, "2.0", "tpm-tis", "host", secret)


def test_libvirt_secret_without_domain_is_an_orphan():
    gone, secret = _uuid(), _uuid()
    report = audit.audit([], [], [audit.LibvirtSecret(secret, gone)], [], None)
    assert report.orphans == (audit.Orphan(
        audit.LIBVIRT_SECRET, secret, gone, f"its usage name {gone} is no domain on this host"),)
    assert not report.clean and not report.barbican_checked


def test_secret_of_a_foreign_domain_is_not_an_orphan():
    foreign = _uuid()
    report = audit.audit([], [foreign.upper()], [audit.LibvirtSecret(_uuid(), foreign)],
                         [foreign], None)
    assert report.orphans == ()


def test_libvirt_secret_other_than_the_recorded_one_is_an_orphan():
    server = _server(mode="host", secret=_uuid())
    stale = _uuid()
    report = audit.audit([server], [server.uuid], [audit.LibvirtSecret(stale, server.uuid)],
                         [], None)
    assert [(o.kind, o.id) for o in report.orphans] == [(audit.LIBVIRT_SECRET, stale)]
    assert "records vTPM secret" in report.orphans[0].reason
    assert report.servers[0].problems == (
        f"host-mode libvirt secret {server.vtpm_secret_uuid} is not defined",)


def test_state_dir_without_domain_is_an_orphan():
    live, dead = _uuid(), _uuid()
    report = audit.audit([], [live], [], [live, dead], None, state_dir_base="/srv/swtpm")
    assert report.orphans == (audit.Orphan(
        audit.STATE_DIR, f"/srv/swtpm/{dead}", dead, f"no domain with UUID {dead} on this host"),)


def test_barbican_secret_rules():
    server = _server(secret=_uuid())
    unknown_instance, other_secret, stray, bad = _uuid(), _uuid(), _uuid(), _uuid()
    report = audit.audit(
        [server], [server.uuid], [], [],
        [
            audit.BarbicanSecret(server.vtpm_secret_uuid.upper(), "ok", server.uuid),
            audit.BarbicanSecret(other_secret, "b", server.uuid),
            audit.BarbicanSecret(stray, "a", unknown_instance),
            audit.BarbicanSecret(bad, "vTPM secret for instance x", None),
        ])
    assert all(o.kind == audit.BARBICAN_SECRET for o in report.orphans)
    assert {o.id: o.reason for o in report.orphans} == {
        stray: f"no server {unknown_instance} on this host",
        other_secret: f"server 'vm1' records vTPM secret {server.vtpm_secret_uuid}, not this one",
        bad: "its name 'vTPM secret for instance x' does not end with an instance UUID",
    }


def test_barbican_not_listed_finds_no_barbican_orphans():
    report = audit.audit([], [], [], [], None)
    assert report.orphans_of(audit.BARBICAN_SECRET) == () and not report.barbican_checked
    assert report.clean


@pytest.mark.parametrize("mode", ["user", "deployment"])
def test_ephemeral_mode_secret_still_defined_is_a_server_problem(mode):
    server = _server(mode=mode, secret=_uuid())
    report = audit.audit([server], [server.uuid],
                         [audit.LibvirtSecret(server.vtpm_secret_uuid, server.uuid)], [], None)
    assert report.orphans == ()
    assert len(report.servers[0].problems) == 1
    assert "must be undefined once the guest has started" in report.servers[0].problems[0]


def test_vtpm_server_without_secret_uuid_is_a_problem():
    server = _server(secret=None)
    report = audit.audit([server], [server.uuid], [], [], None)
    assert report.servers[0].problems == (
        "no vtpm_secret_uuid in system_metadata: its vTPM state cannot be unlocked",)


def test_only_vtpm_servers_are_listed():
    plain = _server(name="plain", version=None)
    vtpm = _server(name="vtpm", secret=_uuid())
    report = audit.audit([vtpm, plain], [plain.uuid, vtpm.uuid], [], [], None)
    assert [f.name for f in report.servers] == ["vtpm"]


def _finding(server) -> audit.ServerFinding | None:
    found = audit.audit([server], [server.uuid], [], [], None).servers
    return found[0] if found else None


def _instance(specs, sysmeta, props=None) -> objects.Instance:
    return objects.Instance(name="a", uuid=_uuid(), user_id="", project_id="",
                            flavor=objects.Flavor(extra_specs=specs),
                            image_meta=objects.ImageMeta(properties=props or {}),
                            system_metadata=sysmeta)


def test_audit_never_raises_on_a_bad_record():
    good = _finding(_instance({"hw:tpm_version": "2.0"}, {"vtpm_secret_uuid": "s"},
                              {"hw_tpm_model": "tpm-crb"}))
    assert (good.version, good.model, good.secret_security, good.secret_uuid) == (
        "2.0", "tpm-crb", "user", "s")
    bad = _finding(_instance({"hw:tpm_version": "9"}, {}))
    assert bad.version is None
    assert bad.config_error.startswith("invalid vTPM request: ")
    assert bad.problems[0] == bad.config_error
    assert _finding(_instance({}, {})) is None
    odd = _finding(_instance({"hw:tpm_version": 2.0}, {"vtpm_secret_uuid": 1}))
    assert odd.secret_uuid is None and odd.config_error


# -- the command ----------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setattr(cli_main, "DEFAULT_CONFIG_FILES", (str(tmp_path / "absent.conf"),))
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
    instance.system_metadata["vtpm_secret_uuid"] = _uuid()
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
    dead_dir, dead_secret, dead_instance, barbican_secret = _uuid(), _uuid(), _uuid(), _uuid()
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
    (state / _uuid()).mkdir()
    rc, out, _ = _run(capsys, env, "-q")
    assert rc == 0
    assert "name=vm1" in out and "secret_security=host" in out and "problems=host-mode" in out
    assert "reason=no domain with UUID" in out


# -- repair: the pure plan ------------------------------------------------------------

NOW = 1_800_000_000.0
OLD = "2020-01-01T00:00:00"


def _kinds(plan) -> list[tuple[str, str]]:
    return [(a.kind, a.target) for a in plan.actions]


def test_plan_removes_each_orphan_kind_and_nothing_else():
    server = _server(mode="host", secret=_uuid())
    gone_secret, gone_usage, dead_dir, dead_instance, dead_barbican = (
        _uuid() for _ in range(5))
    report = audit.audit(
        [server], [server.uuid],
        [audit.LibvirtSecret(server.vtpm_secret_uuid, server.uuid, False, False),
         audit.LibvirtSecret(gone_secret, gone_usage)],
        [server.uuid, dead_dir],
        [audit.BarbicanSecret(server.vtpm_secret_uuid, "n", server.uuid, created=OLD),
         audit.BarbicanSecret(dead_barbican, "n", dead_instance, created=OLD)],
        state_dir_base="/srv/swtpm")
    plan = repair.plan(report, now=NOW)
    assert _kinds(plan) == [
        (repair.UNDEFINE_SECRET, gone_secret),
        (repair.REMOVE_STATE, f"/srv/swtpm/{dead_dir}"),
        (repair.DELETE_BARBICAN, dead_barbican),
    ]
    assert plan.skipped == ()


@pytest.mark.parametrize("mode", ["user", "deployment"])
def test_plan_undefines_an_ephemeral_secret_left_defined(mode):
    server = _server(mode=mode, secret=_uuid())
    report = audit.audit([server], [server.uuid],
                         [audit.LibvirtSecret(server.vtpm_secret_uuid, server.uuid)], [], None)
    (action,) = repair.plan(report, now=NOW).actions
    assert (action.kind, action.target, action.instance_uuid) == (
        repair.UNDEFINE_SECRET, server.vtpm_secret_uuid, server.uuid)
    assert "left defined" in action.reason


def test_plan_keeps_a_host_mode_secret():
    server = _server(mode="host", secret=_uuid())
    report = audit.audit([server], [server.uuid], [audit.LibvirtSecret(
        server.vtpm_secret_uuid, server.uuid, False, False)], [], None)
    assert repair.plan(report, now=NOW).actions == ()


def test_plan_deletes_only_old_barbican_orphans_named_for_a_gone_server():
    server = _server(secret=_uuid())
    young, old, unnamed, other, undated = (_uuid() for _ in range(5))
    gone = _uuid()
    report = audit.audit([server], [server.uuid], [], [], [
        audit.BarbicanSecret(young, "y", gone, created="2027-01-15T07:59:00"),
        audit.BarbicanSecret(old, "o", gone, created=OLD),
        audit.BarbicanSecret(unnamed, "vTPM secret for instance x", None, created=OLD),
        audit.BarbicanSecret(other, "b", server.uuid, created=OLD),
        audit.BarbicanSecret(undated, "u", gone),
    ])
    plan = repair.plan(report, now=NOW)
    assert _kinds(plan) == [(repair.DELETE_BARBICAN, old)]
    reasons = {s.target: s.reason for s in plan.skipped}
    assert set(reasons) == {young, unnamed, other, undated}
    assert "less than --min-age" in reasons[young]
    assert "not created by vtpm-driver" in reasons[unnamed]
    assert "its server exists" in reasons[other]
    assert "no readable creation time" in reasons[undated]
    assert sorted(_kinds(repair.plan(report, now=NOW, min_age=0))) == sorted([
        (repair.DELETE_BARBICAN, young), (repair.DELETE_BARBICAN, old),
        (repair.DELETE_BARBICAN, undated)])


def test_plan_sets_owner_only_acl_on_project_readable_secrets():
    server = _server(secret=_uuid())
    service_secret = _uuid()
    report = audit.audit([server], [server.uuid], [], [], [
        audit.BarbicanSecret(server.vtpm_secret_uuid, "a", server.uuid, project_access=True),
        audit.BarbicanSecret(service_secret, "b", server.uuid, mode="deployment",
                             project_access=True, created=OLD),
    ])
    assert [s.uuid for s in report.readable] == [server.vtpm_secret_uuid, service_secret]
    assert not report.clean
    acls = [a for a in repair.plan(report, now=NOW).actions if a.kind == repair.FIX_ACL]
    assert [(a.target, a.user_id, a.mode) for a in acls] == [
        (server.vtpm_secret_uuid, "u", "user"), (service_secret, None, "deployment")]


def test_plan_does_not_fix_the_acl_of_a_secret_it_deletes():
    gone = _uuid()
    report = audit.audit([], [], [], [], [audit.BarbicanSecret(
        gone, "o", _uuid(), project_access=True, created=OLD)])
    assert _kinds(repair.plan(report, now=NOW)) == [(repair.DELETE_BARBICAN, gone)]


# -- repair: the command --------------------------------------------------------------


def _orphans(env):
    backend, keymgr, state, _conf = env
    _add(backend, "vm1")
    dead_dir, dead_secret, dead_instance, barbican_secret = (_uuid() for _ in range(4))
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
    dead_dir = _uuid()
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
    mine, other = _uuid(), _uuid()
    (state / mine).mkdir()
    (state / other).mkdir()
    rc, out, _ = _run(capsys, env, "--repair", "--no-barbican", "--instance", mine.upper(),
                      "-f", "json")
    assert rc == 0
    assert [r["instance_uuid"] for r in json.loads(out)["repair"]] == [mine]
    assert not (state / mine).exists() and (state / other).is_dir()
    assert backend.removed == [("state_dir", mine)]


# -- half-done operations (the intent journal) ------------------------------------------


def _journalled(server, operation, **fields):
    journal.write(server.system_metadata, journal.begin(operation, **fields))
    return server


def test_half_done_reports_what_decide_would_do():
    prepared = _journalled(_server("a"), journal.RESIZE_PREPARE, tmp_backup="/x/tmp")
    finishing = _journalled(_server("b"), journal.RESIZE_FINISH)
    started = _journalled(_server("c"), journal.START)
    quiet = _server("d")
    found = audit.half_done(
        [quiet, started, finishing, prepared],
        {prepared.uuid: {"backup_exists": False, "tmp_backup_exists": True},
         finishing.uuid: {"backup_exists": True}},
        holders={started.uuid: 4242})
    assert [(h.name, h.operation, h.action, h.holder_pid) for h in found] == [
        ("a", journal.RESIZE_PREPARE, "roll back", None),
        ("b", journal.RESIZE_FINISH, "roll back", None),
        ("c", journal.START, "finish", 4242),
    ]
    assert found[0].instance_uuid == prepared.uuid and found[0].step == "begin"


def test_half_done_resize_prepare_with_its_backup_in_place_is_finished():
    server = _journalled(_server(), journal.RESIZE_PREPARE)
    (entry,) = audit.half_done([server], {server.uuid.upper(): {"backup_exists": True}})
    # Facts keyed by a non-canonical UUID do not count: the default (no backup) applies.
    assert entry.action == "roll back"
    (entry,) = audit.half_done([server], {server.uuid: {"backup_exists": True}})
    assert entry.action == "finish" and "awaits confirm or revert" in entry.reason


def test_half_done_reports_a_garbled_journal_entry_and_repair_leaves_it():
    server = _server("bad")
    server.system_metadata[journal.KEY] = '{"operation": "start", "pid": "12"}'
    (entry,) = audit.half_done([server], {})
    assert (entry.name, entry.operation, entry.action) == ("bad", "invalid entry", "none")
    assert "'pid'" in entry.reason and server.uuid in entry.reason
    report = dataclasses.replace(audit.audit([server], [server.uuid], [], [], None),
                                 half_done=(entry,))
    assert not report.clean
    planned = repair.plan(report, now=0, min_age=0)
    assert planned.actions == ()
    assert [(s.target, s.instance_uuid) for s in planned.skipped] == [
        (server.uuid, server.uuid)]


def test_audit_command_reports_a_garbled_journal_entry(capsys, env):
    backend, _keymgr, _state, _conf = env
    vm = _add(backend, "vm1")
    vm.system_metadata[journal.KEY] = '{"operation": "resize_prepare", "tmp_backup": 7}'
    rc, out, err = _run(capsys, env, "-f", "json", "--no-barbican")
    assert (rc, err) == (0, "")
    (row,) = json.loads(out)["half_done_operations"]
    assert (row["instance_uuid"], row["repair"]) == (vm.uuid, "none")
    assert "'tmp_backup'" in row["reason"]


def test_report_with_a_half_done_operation_is_not_clean():
    server = _journalled(_server(secret=_uuid()), journal.START)
    report = audit.audit([server], [server.uuid], [], [], None)
    assert report.clean
    report = dataclasses.replace(report, half_done=audit.half_done([server], {}))
    assert not report.clean


def test_plan_recovers_half_done_operations_first():
    server = _journalled(_server(mode="user", secret=_uuid()), journal.START)
    secret = server.system_metadata["vtpm_secret_uuid"]
    report = audit.audit([server], [server.uuid], [audit.LibvirtSecret(secret, server.uuid)],
                         [], None)
    report = dataclasses.replace(report, half_done=audit.half_done([server], {}))
    actions = repair.plan(report, now=0, min_age=0).actions
    assert [(a.kind, a.target) for a in actions] == [
        (repair.RECOVER, server.uuid), (repair.UNDEFINE_SECRET, secret)]
    assert "finish the interrupted start" in actions[0].reason
    assert repair.plan(report, now=0, min_age=0, only=[_uuid()]).actions == ()


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
    vm = _journalled(_add(backend, "vm1"), journal.RESIZE_FINISH)
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
    _journalled(_add(backend, "vm1"), journal.START)
    _recorder(backend, None, None)
    rc, out, _ = _run(capsys, env, "--repair", "-f", "json", "--no-barbican")
    (done,) = json.loads(out)["repair"]
    assert rc == 0 and done["result"] == "already done: no interrupted operation now"


def test_repair_skips_a_server_whose_lock_is_held(capsys, env, tmp_path):
    backend, _keymgr, state, _conf = env
    vm = _journalled(_add(backend, "vm1"), journal.START)
    dead = _uuid()
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
    dead = _uuid()
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
    _journalled(_add(backend, "vm1"), journal.RESIZE_REVERT)

    def recover(context, instance):
        raise exception.VirtError("libvirt went away")

    backend.driver.recover = recover
    rc, out, _ = _run(capsys, env, "--repair", "-f", "json", "--no-barbican")
    (done,) = json.loads(out)["repair"]
    assert rc == 1 and done["result"] == "failed: libvirt went away"


# -- where Nova is the orchestrator (issue 20) ------------------------------------------

HERE = "qemu:///fake"  # FakeBackend.uri: this host as its off-host copies name it


def _copy(uid, *, shelved=False, source_host=HERE):
    return statestore.CopyMeta(uuid=uid, name="vm", taken_at=NOW - 60, source_host=source_host,
                               reason="shelve" if shelved else "stop", shelved=shelved,
                               tpm_version="2.0")


def _lost_report(shelved, moved, dead, unknown):
    """What this host alone sees: ``shelved`` (shelved-offloaded: a leftover state directory
    and its Barbican secret), ``moved`` (on another compute: the copy taken here before it
    left and its Barbican secret), ``dead`` and ``unknown`` (a state directory and a
    Barbican secret each). No domain of any of them here."""
    barbican = [audit.BarbicanSecret(f"{u[:8]}-0000-4000-8000-000000000000", "n", u,
                                     created=OLD) for u in (shelved, moved, dead, unknown)]
    report = audit.audit([], [], [], [shelved, dead, unknown], barbican,
                         state_dir_base="/srv/swtpm")
    return audit.offhost_copies(report, [_copy(moved)], [], host=HERE, now=NOW,
                                interval=None)


def _deleted(plan_) -> set[tuple[str, str | None]]:
    return {(a.kind, a.instance_uuid) for a in plan_.actions}


def _full_plan(report):
    return repair.plan_copies(repair.plan(report, now=NOW), report)


def test_without_nova_the_servers_nova_still_has_look_gone():
    """Why Nova must be asked: this host alone would delete their TPMs."""
    shelved, moved, dead, unknown = (_uuid() for _ in range(4))
    deleted = _deleted(_full_plan(_lost_report(shelved, moved, dead, unknown)))
    assert {(repair.REMOVE_STATE, shelved), (repair.DELETE_BARBICAN, shelved),
            (repair.REMOVE_COPY, moved), (repair.DELETE_BARBICAN, moved)} <= deleted


def test_what_belongs_to_a_server_nova_knows_is_no_orphan():
    shelved, moved, dead, unknown = (_uuid() for _ in range(4))
    answer = audit.OrchestratorAnswer("Nova", {
        shelved: audit.KnownServer(shelved, "SHELVED_OFFLOADED", None),
        moved: audit.KnownServer(moved, "ACTIVE", "compute-2")})
    report = audit.vouch(_lost_report(shelved, moved, dead, unknown), answer)
    assert {o.instance_uuid for o in report.orphans} == {dead, unknown}
    assert sorted((v.kind, v.instance_uuid, v.status, v.host) for v in report.vouched) == sorted([
        (audit.STATE_DIR, shelved, "SHELVED_OFFLOADED", None),
        (audit.BARBICAN_SECRET, shelved, "SHELVED_OFFLOADED", None),
        (audit.OFFHOST_COPY, moved, "ACTIVE", "compute-2"),
        (audit.BARBICAN_SECRET, moved, "ACTIVE", "compute-2")])
    # Nova says deleted or does not know them: planned as before.
    assert _deleted(_full_plan(report)) == {
        (repair.REMOVE_STATE, dead), (repair.DELETE_BARBICAN, dead),
        (repair.REMOVE_STATE, unknown), (repair.DELETE_BARBICAN, unknown)}
    assert audit.vouch(report, answer) == report  # idempotent


def test_nova_could_not_be_asked_deletes_no_secret_copy_or_state_dir():
    shelved, moved, dead, unknown = (_uuid() for _ in range(4))
    stray = _uuid()
    report = _lost_report(shelved, moved, dead, unknown)
    report = dataclasses.replace(report, orphans=(
        *report.orphans, audit.Orphan(audit.LIBVIRT_SECRET, stray, dead, "no domain")))
    answer = audit.OrchestratorAnswer("Nova", None, "cannot reach Nova: ConnectTimeout")
    report = audit.vouch(report, answer)
    assert report.vouched == () and report.orchestrator is answer
    full = _full_plan(report)
    # Only the libvirt secret (a copy of what Barbican holds) is still undefined.
    assert _deleted(full) == {(repair.UNDEFINE_SECRET, dead)}
    held = {s.target: s.reason for s in full.skipped}
    assert len(held) == 8  # 3 state directories, 4 Barbican secrets, 1 copy
    assert set(held.values()) == {"Nova could not be asked: cannot reach Nova: ConnectTimeout"}
    limited = repair.plan_copies(repair.plan(report, now=NOW, only=[moved]), report, [moved])
    assert limited.actions == () and len(limited.skipped) == 2


def test_a_barbican_secret_of_a_server_here_stays_an_orphan_nova_or_not():
    server = _server(secret=_uuid())
    other = _uuid()
    report = audit.audit([server], [server.uuid], [], [],
                         [audit.BarbicanSecret(other, "n", server.uuid, created=OLD)])
    answer = audit.OrchestratorAnswer(
        "Nova", {server.uuid: audit.KnownServer(server.uuid, "ACTIVE", "compute-1")})
    assert audit.vouch(report, answer).orphans == report.orphans


def test_a_standalone_host_decides_alone():
    report = _lost_report(*(_uuid() for _ in range(4)))
    assert audit.vouch(report, None) is report


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
    shelved, dead = _uuid(), _uuid()
    store = statestore.DirectoryStateStore(tmp_path / "store")
    for uid in (shelved, dead):
        store.put(_copy(uid, shelved=uid == shelved), "<domain/>",
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
