"""audit.report: the pure findings (orphans, server problems, half-done operations,
what Nova vouches for)."""

from __future__ import annotations

import dataclasses

import pytest

from tests.unit.audit.helpers import (
    OLD,
    a_server,
    a_uuid,
    journalled,
    lost_report,
)
from vtpm_driver.audit import plan as repair
from vtpm_driver.audit import report as audit
from vtpm_driver.model.server import Flavor, ImageMeta, Instance
from vtpm_driver.ops import journal


def test_clean_host_has_no_orphans():
    secret = a_uuid()
    server = a_server(mode="host", secret=secret)
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
    gone, secret = a_uuid(), a_uuid()
    report = audit.audit([], [], [audit.LibvirtSecret(secret, gone)], [], None)
    assert report.orphans == (audit.Orphan(
        audit.LIBVIRT_SECRET, secret, gone, f"its usage name {gone} is no domain on this host"),)
    assert not report.clean and not report.barbican_checked


def test_secret_of_a_foreign_domain_is_not_an_orphan():
    foreign = a_uuid()
    report = audit.audit([], [foreign.upper()], [audit.LibvirtSecret(a_uuid(), foreign)],
                         [foreign], None)
    assert report.orphans == ()


def test_libvirt_secret_other_than_the_recorded_one_is_an_orphan():
    server = a_server(mode="host", secret=a_uuid())
    stale = a_uuid()
    report = audit.audit([server], [server.uuid], [audit.LibvirtSecret(stale, server.uuid)],
                         [], None)
    assert [(o.kind, o.id) for o in report.orphans] == [(audit.LIBVIRT_SECRET, stale)]
    assert "records vTPM secret" in report.orphans[0].reason
    assert report.servers[0].problems == (
        f"host-mode libvirt secret {server.vtpm_secret_uuid} is not defined",)


def test_state_dir_without_domain_is_an_orphan():
    live, dead = a_uuid(), a_uuid()
    report = audit.audit([], [live], [], [live, dead], None, state_dir_base="/srv/swtpm")
    assert report.orphans == (audit.Orphan(
        audit.STATE_DIR, f"/srv/swtpm/{dead}", dead, f"no domain with UUID {dead} on this host"),)


def test_barbican_secret_rules():
    server = a_server(secret=a_uuid())
    unknown_instance, other_secret, stray, bad = a_uuid(), a_uuid(), a_uuid(), a_uuid()
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
    server = a_server(mode=mode, secret=a_uuid())
    report = audit.audit([server], [server.uuid],
                         [audit.LibvirtSecret(server.vtpm_secret_uuid, server.uuid)], [], None)
    assert report.orphans == ()
    assert len(report.servers[0].problems) == 1
    assert "must be undefined once the guest has started" in report.servers[0].problems[0]


def test_vtpm_server_without_secret_uuid_is_a_problem():
    server = a_server(secret=None)
    report = audit.audit([server], [server.uuid], [], [], None)
    assert report.servers[0].problems == (
        "no vtpm_secret_uuid in system_metadata: its vTPM state cannot be unlocked",)


def test_only_vtpm_servers_are_listed():
    plain = a_server(name="plain", version=None)
    vtpm = a_server(name="vtpm", secret=a_uuid())
    report = audit.audit([vtpm, plain], [plain.uuid, vtpm.uuid], [], [], None)
    assert [f.name for f in report.servers] == ["vtpm"]


def _finding(server) -> audit.ServerFinding | None:
    found = audit.audit([server], [server.uuid], [], [], None).servers
    return found[0] if found else None


def _instance(specs, sysmeta, props=None) -> Instance:
    return Instance(name="a", uuid=a_uuid(), user_id="", project_id="",
                            flavor=Flavor(extra_specs=specs),
                            image_meta=ImageMeta(properties=props or {}),
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


def test_half_done_reports_what_decide_would_do():
    prepared = journalled(a_server("a"), journal.RESIZE_PREPARE, tmp_backup="/x/tmp")
    finishing = journalled(a_server("b"), journal.RESIZE_FINISH)
    started = journalled(a_server("c"), journal.START)
    quiet = a_server("d")
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
    server = journalled(a_server(), journal.RESIZE_PREPARE)
    (entry,) = audit.half_done([server], {server.uuid.upper(): {"backup_exists": True}})
    # Facts keyed by a non-canonical UUID do not count: the default (no backup) applies.
    assert entry.action == "roll back"
    (entry,) = audit.half_done([server], {server.uuid: {"backup_exists": True}})
    assert entry.action == "finish" and "awaits confirm or revert" in entry.reason


def test_half_done_reports_a_garbled_journal_entry_and_repair_leaves_it():
    server = a_server("bad")
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


def test_report_with_a_half_done_operation_is_not_clean():
    server = journalled(a_server(secret=a_uuid()), journal.START)
    report = audit.audit([server], [server.uuid], [], [], None)
    assert report.clean
    report = dataclasses.replace(report, half_done=audit.half_done([server], {}))
    assert not report.clean


def test_a_barbican_secret_of_a_server_here_stays_an_orphan_nova_or_not():
    server = a_server(secret=a_uuid())
    other = a_uuid()
    report = audit.audit([server], [server.uuid], [], [],
                         [audit.BarbicanSecret(other, "n", server.uuid, created=OLD)])
    answer = audit.OrchestratorAnswer(
        "Nova", {server.uuid: audit.KnownServer(server.uuid, "ACTIVE", "compute-1")})
    assert audit.vouch(report, answer).orphans == report.orphans


def test_a_standalone_host_decides_alone():
    report = lost_report(*(a_uuid() for _ in range(4)))
    assert audit.vouch(report, None) is report
