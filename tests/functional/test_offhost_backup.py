"""State backups on the command line's one host (issue 15): periodic copies, audit, repair.

On host-a of ``tools/test-hosts.sh`` (the one host of ``[libvirt]
connection_uri``) and the local stack, with ``[vtpm] state_backup = periodic``:
``state backup`` (no name: the cron run) copies servers whose copy is missing
or older than ``[vtpm] state_backup_interval``, running ones included, and
leaves fresher copies alone; ``state backup NAME`` copies at once; the audit
reports stale copies and copies of no server, and ``--repair`` removes only
the latter. (Restoring a copy on another host is Nova's evacuation:
test_nova_offhost.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.functional import fixtures_offhost
from tests.functional.fixtures_offhost import Cloud, store_dir
from vtpm_driver.audit import actions
from vtpm_driver.audit import plan as repair
from vtpm_driver.audit import report as audit
from vtpm_driver.statestore import CopyMeta, DirectoryStateStore

pytestmark = pytest.mark.functional

cloud = fixtures_offhost.cloud


def store(cloud: Cloud) -> DirectoryStateStore:
    return DirectoryStateStore(cloud.conf.vtpm.state_backup_dir)


def audit_call(cloud: Cloud, method: str, *args, **kwargs):
    """``method`` of the audit over host-a's backend (the owner's service)."""
    service = cloud.service()
    try:
        return getattr(actions.AuditActions(cloud.conf, lambda: service.backend),
                       method)(*args, **kwargs)
    finally:
        service.close()


def copy_of(cloud: Cloud, server: dict) -> CopyMeta:
    meta = store(cloud).get(server["uuid"])
    assert meta is not None, f"no off-host copy of {server['name']}"
    return meta


# ----------------------------------------------------------------------------- periodic copies


def test_periodic_backup_audit_and_repair(cloud: Cloud, tmp_path: Path) -> None:
    cloud.conf.set_override("state_backup", "periodic", group="vtpm")
    interval = float(cloud.conf.vtpm.state_backup_interval)
    s1, s2 = cloud.create("user"), cloud.create("host")
    mine = {s1["uuid"], s2["uuid"]}
    cloud.running_report(s1)
    cloud.running_report(s2)

    def periodic() -> dict[str, dict]:
        """The cron run; other tests' servers on the hosts may be copied too: not ours."""
        rows = {r["uuid"]: r for r in cloud.call("backup_states") if r["uuid"] in mine}
        assert all(r["error"] is None for r in rows.values()), rows
        return rows

    def findings() -> tuple[dict[str, str], dict[str, str]]:
        """Our copies the audit reports as (of no server, stale), with why."""
        report = audit_call(cloud, "audit", None)
        return ({o.instance_uuid: o.reason for o in report.orphans_of(audit.OFFHOST_COPY)
                 if o.instance_uuid in mine},
                {o.instance_uuid: o.reason for o in report.stale_copies
                 if o.instance_uuid in mine})

    rows = cloud.call("backup_states", [s2["name"]])
    assert [r["uuid"] for r in rows] == [s2["uuid"]]
    fresh = copy_of(cloud, s2)
    assert (fresh.reason, fresh.server_running) == ("manual", True)

    # Due: s1 (no copy yet, running). Not due: s2 (copied just now).
    rows = periodic()
    assert list(rows) == [s1["uuid"]] and rows[s1["uuid"]]["running"] is True
    taken = copy_of(cloud, s1)
    assert (taken.reason, taken.server_running, taken.encrypted) == ("periodic", True, True)
    assert copy_of(cloud, s2) == fresh

    # s1's copy older than the interval: replaced. s2's still fresh: kept.
    store(cloud).update(s1["uuid"], taken_at=taken.taken_at - 2 * interval)
    assert list(periodic()) == [s1["uuid"]]
    assert copy_of(cloud, s1).taken_at >= taken.taken_at
    assert copy_of(cloud, s2) == fresh

    # A clean stop takes a current copy; the running server's copy is stale.
    cloud.call("stop", s2["name"], timeout=0)
    stopped = copy_of(cloud, s2)
    assert (stopped.reason, stopped.server_running, stopped.started_after) == (
        "stop", False, None)
    orphans, stale = findings()
    assert orphans == {} and list(stale) == [s1["uuid"]]
    assert "ran after this copy was taken" in stale[s1["uuid"]]

    # A current copy older than the interval is stale too, and due: refreshed.
    store(cloud).update(s2["uuid"], taken_at=stopped.taken_at - 2 * interval)
    _, stale = findings()
    assert stale[s2["uuid"]] == f"older than {int(interval)} s"
    rows = periodic()
    assert list(rows) == [s2["uuid"]] and rows[s2["uuid"]]["running"] is False
    assert copy_of(cloud, s2).taken_at >= stopped.taken_at
    _, stale = findings()
    assert list(stale) == [s1["uuid"]]

    # Started again: s2's copy is overtaken.
    cloud.call("start", s2["name"])
    assert copy_of(cloud, s2).started_after is not None

    # s1 deleted while the store was elsewhere: its copy belongs to no server.
    kept_at = cloud.conf.vtpm.state_backup_dir
    cloud.conf.set_override("state_backup_dir", str(tmp_path / "elsewhere"), group="vtpm")
    cloud.call("delete", s1["name"])
    cloud.conf.set_override("state_backup_dir", kept_at, group="vtpm")
    assert store_dir(cloud, s1).is_dir()
    orphans, stale = findings()
    assert list(orphans) == [s1["uuid"]] and "which is no longer on host" in orphans[s1["uuid"]]
    assert list(stale) == [s2["uuid"]]

    # The repair removes the copy of no server, and only it.
    report = audit_call(cloud, "audit", None)
    plan = audit_call(cloud, "repair_plan", report, min_age=repair.DEFAULT_MIN_AGE,
                      only=sorted(mine))
    assert [(a.kind, a.instance_uuid) for a in plan.actions] == [
        (repair.REMOVE_COPY, s1["uuid"])]
    done = audit_call(cloud, "repair", plan, None, {})
    assert [outcome for _action, outcome in done] == ["done"]
    assert not store_dir(cloud, s1).exists()
    assert copy_of(cloud, s2).started_after is not None  # stale, but its server's: kept

    # A shelved server lives in its copy: neither stale nor orphaned, never repaired.
    # (Nova shelves, through the shim: here the copy is marked as its shelve offload marks
    # it, on the real store.)
    store(cloud).update(s2["uuid"], shelved=True)
    assert copy_of(cloud, s2).shelved
    assert findings() == ({}, {})
    report = audit_call(cloud, "audit", None)
    plan = audit_call(cloud, "repair_plan", report, min_age=0.0, only=[s2["uuid"]])
    assert plan.actions == ()
    assert copy_of(cloud, s2).shelved
