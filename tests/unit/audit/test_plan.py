"""audit.plan: the pure repair plan (what to remove or fix, what to leave and why)."""

from __future__ import annotations

import dataclasses

import pytest

from tests.unit.audit.helpers import (
    NOW,
    OLD,
    a_server,
    a_uuid,
    journalled,
    lost_report,
)
from vtpm_driver.audit import plan as repair
from vtpm_driver.audit import report as audit
from vtpm_driver.ops import journal


def _kinds(plan) -> list[tuple[str, str]]:
    return [(a.kind, a.target) for a in plan.actions]


def test_plan_removes_each_orphan_kind_and_nothing_else():
    server = a_server(mode="host", secret=a_uuid())
    gone_secret, gone_usage, dead_dir, dead_instance, dead_barbican = (
        a_uuid() for _ in range(5))
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
    server = a_server(mode=mode, secret=a_uuid())
    report = audit.audit([server], [server.uuid],
                         [audit.LibvirtSecret(server.vtpm_secret_uuid, server.uuid)], [], None)
    (action,) = repair.plan(report, now=NOW).actions
    assert (action.kind, action.target, action.instance_uuid) == (
        repair.UNDEFINE_SECRET, server.vtpm_secret_uuid, server.uuid)
    assert "left defined" in action.reason


def test_plan_keeps_a_host_mode_secret():
    server = a_server(mode="host", secret=a_uuid())
    report = audit.audit([server], [server.uuid], [audit.LibvirtSecret(
        server.vtpm_secret_uuid, server.uuid, False, False)], [], None)
    assert repair.plan(report, now=NOW).actions == ()


def test_plan_deletes_only_old_barbican_orphans_named_for_a_gone_server():
    server = a_server(secret=a_uuid())
    young, old, unnamed, other, undated = (a_uuid() for _ in range(5))
    gone = a_uuid()
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
    server = a_server(secret=a_uuid())
    service_secret = a_uuid()
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
    gone = a_uuid()
    report = audit.audit([], [], [], [], [audit.BarbicanSecret(
        gone, "o", a_uuid(), project_access=True, created=OLD)])
    assert _kinds(repair.plan(report, now=NOW)) == [(repair.DELETE_BARBICAN, gone)]


def test_plan_recovers_half_done_operations_first():
    server = journalled(a_server(mode="user", secret=a_uuid()), journal.START)
    secret = server.system_metadata["vtpm_secret_uuid"]
    report = audit.audit([server], [server.uuid], [audit.LibvirtSecret(secret, server.uuid)],
                         [], None)
    report = dataclasses.replace(report, half_done=audit.half_done([server], {}))
    actions = repair.plan(report, now=0, min_age=0).actions
    assert [(a.kind, a.target) for a in actions] == [
        (repair.RECOVER, server.uuid), (repair.UNDEFINE_SECRET, secret)]
    assert "finish the interrupted start" in actions[0].reason
    assert repair.plan(report, now=0, min_age=0, only=[a_uuid()]).actions == ()


def _deleted(plan_) -> set[tuple[str, str | None]]:
    return {(a.kind, a.instance_uuid) for a in plan_.actions}


def _full_plan(report):
    return repair.plan_copies(repair.plan(report, now=NOW), report)


def test_without_nova_the_servers_nova_still_has_look_gone():
    """Why Nova must be asked: this host alone would delete their TPMs."""
    shelved, moved, dead, unknown = (a_uuid() for _ in range(4))
    deleted = _deleted(_full_plan(lost_report(shelved, moved, dead, unknown)))
    assert {(repair.REMOVE_STATE, shelved), (repair.DELETE_BARBICAN, shelved),
            (repair.REMOVE_COPY, moved), (repair.DELETE_BARBICAN, moved)} <= deleted


def test_what_belongs_to_a_server_nova_knows_is_no_orphan():
    shelved, moved, dead, unknown = (a_uuid() for _ in range(4))
    answer = audit.OrchestratorAnswer("Nova", {
        shelved: audit.KnownServer(shelved, "SHELVED_OFFLOADED", None),
        moved: audit.KnownServer(moved, "ACTIVE", "compute-2")})
    report = audit.vouch(lost_report(shelved, moved, dead, unknown), answer)
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
    shelved, moved, dead, unknown = (a_uuid() for _ in range(4))
    stray = a_uuid()
    report = lost_report(shelved, moved, dead, unknown)
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
