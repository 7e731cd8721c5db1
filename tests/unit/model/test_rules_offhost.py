"""The pure rules of issue 15 (off-host copies, evacuate, rescue) in vtpm_driver.model.rules."""

from __future__ import annotations

import types

import pytest

from vtpm_driver import exception
from vtpm_driver.audit import plan as repair
from vtpm_driver.model import request, rules

USER = request.VTPMConfig(version="2.0", model="tpm-crb", secret_security="user")
HOST = request.VTPMConfig(version="2.0", model="tpm-crb", secret_security="host")


def meta(**kw):
    base = {"taken_at": 100.0, "source_host": "a", "reason": "stop", "server_running": False,
            "started_after": None}
    return types.SimpleNamespace(**{**base, **kw})


def test_offload_needs_the_owner_in_user_mode_only() -> None:
    inst = types.SimpleNamespace(name="vm", uuid="u", user_id="alice")
    rules.check_may_offload(USER, inst, types.SimpleNamespace(user_id="alice"), "shelve")
    rules.check_may_offload(HOST, inst, types.SimpleNamespace(user_id="bob"), "shelve")
    rules.check_may_offload(None, inst, types.SimpleNamespace(user_id="bob"), "shelve")
    with pytest.raises(exception.VTPMSecretForbidden, match="cannot unshelve"):
        rules.check_may_offload(USER, inst, types.SimpleNamespace(user_id="bob"), "unshelve")


@pytest.mark.parametrize(("mode", "event", "wanted"), [
    ("off", "stop", False), ("on-stop", "stop", True), ("on-stop", "suspend", True),
    ("on-stop", "periodic", False), ("periodic", "periodic", True), ("bogus", "stop", False)])
def test_wants_backup(mode: str, event: str, wanted: bool) -> None:
    assert rules.wants_backup(mode, event) is wanted


def test_backup_due() -> None:
    assert rules.backup_due(None, 10, 60)
    assert not rules.backup_due(100, 159, 60)
    assert rules.backup_due(100, 160, 60)


def test_current_and_stale_copies() -> None:
    assert rules.copy_is_current(meta())
    assert not rules.copy_is_current(meta(server_running=True))
    assert not rules.copy_is_current(meta(started_after=150.0))
    assert "current" in rules.check_restore(meta(), allow_stale=False, now=190, label="x")
    with pytest.raises(exception.OperationNotSupportedForVTPM,
                       match=r"taken 1 min 30 s ago.*allow_stale_tpm_state"):
        rules.check_restore(meta(started_after=150.0), allow_stale=False, now=190, label="x")
    assert "STALE" in rules.check_restore(meta(server_running=True), allow_stale=True,
                                           now=190, label="x")


def test_no_copy_names_the_setting() -> None:
    with pytest.raises(exception.OperationNotSupportedForVTPM,
                       match=r"\[vtpm\] state_backup = off"):
        rules.check_copy_exists(None, "x", "a", "off")
    assert rules.check_copy_exists("m", "x", "a", "off") == "m"


@pytest.mark.parametrize(("seconds", "text"), [
    (5, "5 s"), (65, "1 min 5 s"), (3720, "1 h 2 min"), (90000, "1 d 1 h"), (-3, "0 s")])
def test_describe_age(seconds: float, text: str) -> None:
    assert rules.describe_age(seconds) == text


def test_rescue_boot_defaults_to_own_files_with_the_marker() -> None:
    image = types.SimpleNamespace(kernel="/k", initrd="/i", cmdline="console=ttyS0")
    assert rules.rescue_boot(image, None, None, None) == (
        "/k", "/i", "console=ttyS0 vtpm_rescue=1")
    assert rules.rescue_boot(image, "/k2", None, "x") == ("/k2", "/i", "x")


def _copy(uuid: str, **kw):
    base = {"uuid": uuid, "name": f"vm-{uuid[:4]}", "taken_at": 100.0, "shelved": False,
            "started_after": None, "server_running": False, "source_host": "h1"}
    return types.SimpleNamespace(**{**base, **kw})


def test_audit_reports_orphan_and_stale_copies_and_plans_removing_orphans_only() -> None:
    from vtpm_driver.audit import report as audit

    a, b, c, d, e = (f"{n}0000000-0000-4000-8000-000000000000" for n in "abcde")
    report = audit.AuditReport(servers=(), orphans=(), barbican_checked=False)
    copies = [_copy(a), _copy(b, shelved=True), _copy(c, started_after=150.0), _copy(d),
              _copy(e, source_host="h2", started_after=150.0)]
    report = audit.offhost_copies(report, copies, [c, d], host="h1", now=5000, interval=3600)
    # b is shelved; e was taken on another host (the store is shared): not h1's to judge.
    assert [o.id for o in report.orphans_of(audit.OFFHOST_COPY)] == [a]
    assert sorted(o.id for o in report.stale_copies) == [c, d]
    empty = repair.RepairPlan((), ())
    planned = repair.plan_copies(empty, report)
    assert [(x.kind, x.target) for x in planned.actions] == [(repair.REMOVE_COPY, a)]
    assert repair.plan_copies(empty, report, only=[b]).actions == ()


def _server(**kw):
    base = {"name": "vm", "uuid": "0b7e6f0e-3a8a-4f51-8c1f-1d2a3b4c5d6e",
            "user_id": "alice", "project_id": "proj-a"}
    return types.SimpleNamespace(**{**base, **kw})


def _copy_of(server, **kw):
    base = {"uuid": server.uuid, "user_id": server.user_id, "project_id": server.project_id,
            "tpm_version": "2.0", "secret_security": "user"}
    return types.SimpleNamespace(**{**base, **kw})


def test_a_copy_that_matches_its_server_may_be_restored() -> None:
    server = _server()
    rules.check_copy_matches(_copy_of(server), server, USER)
    rules.check_copy_matches(_copy_of(server, uuid=server.uuid.upper()), server, USER)
    rules.check_copy_matches(_copy_of(server, user_id=None), server, USER)  # older copies


@pytest.mark.parametrize(("field", "value"), [
    ("uuid", "11111111-2222-4333-8444-555555555555"), ("project_id", "proj-b"),
    ("user_id", "mallory"), ("tpm_version", "1.2"), ("secret_security", "host"),
    ("project_id", None)])
def test_a_copy_that_disagrees_with_its_server_is_refused_naming_both_values(field, value
                                                                              ) -> None:
    """The store's meta.json is never trusted over the server's own record."""
    server = _server()
    with pytest.raises(exception.CopyMismatch) as err:
        rules.check_copy_matches(_copy_of(server, **{field: value}), server, USER)
    message = str(err.value)
    assert f"server 'vm' ({server.uuid})" in message and repr(field) in message
    assert repr(value) in message and err.value.field == field
