"""Copies that are not current (issue 15): stale evacuation, periodic backups, audit and repair.

On the two real test hosts and the local stack, with ``[vtpm] state_backup =
periodic``:

* a copy taken by ``state backup NAME`` while the server runs is stale: after
  host-a fails (its guest dies without a clean stop and host-a stops
  answering), evacuating to host-b is refused by default, naming ``[vtpm]
  allow_stale_tpm_state`` and how old the copy is; allowed, it restores that
  state, says its age in the output and the log, and the guest reads the same
  EK (the EK is made when the TPM is manufactured, so an older state has it);
* ``state backup`` (no name: the cron run) copies servers whose copy is
  missing or older than ``[vtpm] state_backup_interval``, running ones
  included, and leaves fresher copies alone; the audit reports stale copies
  and copies of no server, and ``--repair`` removes only the latter.

host-a is made to fail by pointing ``[vtpm] hosts`` at a port nothing listens
on (what a dead host looks like to a client: connection refused), not by
stopping the shared host-a, whose other guests belong to other tests.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from pathlib import Path

import pytest

from tests.functional import fixtures_offhost
from tests.functional.fixtures_libvirt import HOST_URIS, host_swtpm_dir
from tests.functional.fixtures_offhost import store_dir
from tests.functional.test_migrate import Cloud
from vtpm_driver import audit, exception, repair
from vtpm_driver.statestore import CopyMeta, DirectoryStateStore

pytestmark = pytest.mark.functional

cloud = fixtures_offhost.cloud

_AGE = re.compile(r"taken ((?:\d+ (?:d|h|min|s) ?)+) ago on host (\S+) \((\w+)\)")
_UNITS = {"d": 86400, "h": 3600, "min": 60, "s": 1}


def store(cloud: Cloud) -> DirectoryStateStore:
    return DirectoryStateStore(cloud.conf.vtpm.state_backup_dir)


def copy_of(cloud: Cloud, server: dict) -> CopyMeta:
    meta = store(cloud).get(server["uuid"])
    assert meta is not None, f"no off-host copy of {server['name']}"
    return meta


def assert_says_age(text: str, meta: CopyMeta, before: float, after: float) -> None:
    """``text`` says the copy was taken on its host, for its reason, as long ago as it was."""
    found = _AGE.search(text)
    assert found, f"no age in {text!r}"
    seconds = sum(int(n) * _UNITS[u] for n, u in re.findall(r"(\d+) (d|h|min|s)", found[1]))
    assert int(before - meta.taken_at) <= seconds <= int(after - meta.taken_at), text
    assert (found[2], found[3]) == (meta.source_host, meta.reason)


def unreachable_uri() -> str:
    """A libvirt URI on loopback where nothing listens (a host that is down)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"qemu+tcp://127.0.0.1:{port}/system"


# ----------------------------------------------------------------------------- stale evacuation


def test_evacuate_with_a_stale_copy_needs_allow_stale_tpm_state(
        cloud: Cloud, caplog: pytest.LogCaptureFixture) -> None:
    cloud.conf.set_override("state_backup", "periodic", group="vtpm")
    server = cloud.create("user")
    sid, name = server["uuid"], server["name"]
    first = cloud.running_report(server)

    rows = cloud.call("backup_states", [name])
    assert [(r["uuid"], r["host"], r["running"], r["error"]) for r in rows] == [
        (sid, "host-a", True, None)]
    meta = copy_of(cloud, server)
    assert (meta.reason, meta.server_running, meta.shelved) == ("manual", True, False)
    assert meta.encrypted is True and meta.size > 0
    # The guest keeps running and using its TPM after the copy.
    assert cloud.later_report(server, first)["ek"] == first["ek"]

    # host-a fails: the guest dies without a clean stop (no new copy), host-a is gone.
    cloud.domain("host-a", sid).destroy()
    cloud.conf.set_override("hosts", {**HOST_URIS, "host-a": unreachable_uri()}, group="vtpm")
    try:
        assert cloud.conf.vtpm.allow_stale_tpm_state is False  # the default
        before = time.time()
        with pytest.raises(exception.OperationNotSupportedForVTPM,
                           match=r"\[vtpm\] allow_stale_tpm_state = True") as refused:
            cloud.call("evacuate", name, "host-b")
        after = time.time()
        assert "STALE: it was taken while the server ran" in str(refused.value)
        assert_says_age(str(refused.value), meta, before, after)
        assert cloud.domain("host-b", sid) is None
        assert not (host_swtpm_dir("host-b") / sid).exists()
        assert cloud.libvirt_secrets("host-b", sid) == []
        assert copy_of(cloud, server) == meta  # the refusal changed nothing

        cloud.conf.set_override("allow_stale_tpm_state", True, group="vtpm")
        with caplog.at_level(logging.INFO, logger="vtpm_driver.ops.shelve"):
            before = time.time()
            moved = cloud.call("evacuate", name, "host-b")
            after = time.time()
        described = moved["restored_tpm_state"]
        assert moved["host"] == "host-b"
        assert "STALE: it was taken while the server ran" in described
        assert_says_age(described, meta, before, after)
        logged = [r for r in caplog.records if r.getMessage().startswith("Evacuated server")]
        assert [(r.levelno, described in r.getMessage()) for r in logged] == [
            (logging.WARNING, True)]

        # The older state is the same TPM: the EK was made at manufacture.
        assert cloud.boot_report(server, first["boot"])["ek"] == first["ek"]
        cloud.assert_only_on("host-b", server, source_copy_on="host-a")
        after_start = copy_of(cloud, server)
        assert after_start.started_after is not None and after_start.taken_at == meta.taken_at
    finally:
        cloud.conf.set_override("hosts", dict(HOST_URIS), group="vtpm")
    # host-a answers again with its dead, stale definition: reclaimed.
    assert not cloud.domain("host-a", sid).isActive()
    assert cloud.call("reclaim", "host-a") == [name]
    cloud.assert_only_on("host-b", server)


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
        assert all(r["error"] is None and r["host"] == "host-a" for r in rows.values()), rows
        return rows

    def findings() -> tuple[dict[str, str], dict[str, str]]:
        """Our copies the audit reports as (of no server, stale), with why."""
        report = cloud.call("audit", None)
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
    assert list(orphans) == [s1["uuid"]] and "which is on no host" in orphans[s1["uuid"]]
    assert list(stale) == [s2["uuid"]]

    # The repair removes the copy of no server, and only it.
    report = cloud.call("audit", None)
    plan = cloud.call("repair_plan", report, min_age=repair.DEFAULT_MIN_AGE,
                      only=sorted(mine))
    assert [(a.kind, a.instance_uuid) for a in plan.actions] == [
        (repair.REMOVE_COPY, s1["uuid"])]
    done = cloud.call("repair", plan, None, {})
    assert [outcome for _action, outcome in done] == ["done"]
    assert not store_dir(cloud, s1).exists()
    assert copy_of(cloud, s2).started_after is not None  # stale, but its server's: kept

    # A shelved server lives in its copy: neither stale nor orphaned, never repaired.
    cloud.call("shelve", s2["name"], timeout=0)
    assert copy_of(cloud, s2).shelved
    assert findings() == ({}, {})
    report = cloud.call("audit", None)
    plan = cloud.call("repair_plan", report, min_age=0.0, only=[s2["uuid"]])
    assert plan.actions == ()
    assert copy_of(cloud, s2).shelved
