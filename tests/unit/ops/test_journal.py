"""ops.journal: the intent entry and the pure finish-or-roll-back decision (issue 13)."""

from __future__ import annotations

import pytest

from vtpm_driver import exception
from vtpm_driver.ops import journal
from vtpm_driver.ops.journal import Action


def test_entry_round_trips_through_system_metadata() -> None:
    sysmeta = {"vtpm_secret_uuid": "s"}
    intent = journal.begin(journal.RESIZE_FINISH).with_step("secret created", new_secret="n")
    journal.write(sysmeta, intent)
    assert journal.read(sysmeta) == intent
    assert sysmeta["vtpm_secret_uuid"] == "s"
    assert journal.clear(sysmeta) and not journal.clear(sysmeta)
    assert journal.read(sysmeta) is None


def test_entry_of_an_unknown_operation_is_cleared() -> None:
    intent = journal.read({journal.KEY: '{"operation": "written_by_a_newer_version"}'})
    decision = journal.decide(intent, domain_exists=True, backup_exists=False,
                              tmp_backup_exists=False)
    assert decision.action is Action.CLEAR


@pytest.mark.parametrize(("raw", "field"), [
    ("{", "vtpm_intent"), ("[1]", "vtpm_intent"), ('{"step": "x"}', "operation"),
    ('{"operation": 3, "pid": []}', "operation"),
    ('{"operation": "resize_prepare", "tmp_backup": ["/etc"]}', "tmp_backup"),
    ('{"operation": "resize_prepare", "tmp_backup": 5}', "tmp_backup"),
    ('{"operation": "start", "pid": "12"}', "pid"),
    ('{"operation": "start", "pid": true}', "pid"),
    ('{"operation": "start", "started": "yesterday"}', "started"),
    ('{"operation": "start", "step": null}', "step"),
    ('{"operation": "resize_finish", "new_secret": {}}', "new_secret"),
])
def test_entry_with_a_field_of_the_wrong_type_is_a_typed_error(raw: str, field: str) -> None:
    """Never a TypeError (or a decision on a garbled entry) in every later operation."""
    with pytest.raises(exception.InvalidJournalEntry,
                       match=f"server 'vm1' \\(u-1\\): .*{field}") as err:
        journal.read({journal.KEY: raw}, server="'vm1' (u-1)")
    assert err.value.field == field


def decide(op: str, **facts: bool) -> journal.Decision:
    intent = journal.Intent(op, tmp_backup="/b/.u.x.tmp")
    return journal.decide(intent, **{"domain_exists": True, "backup_exists": False,
                                     "tmp_backup_exists": False, **facts})


def test_interrupted_start_drops_the_ephemeral_secret_and_keeps_the_server() -> None:
    decision = decide(journal.START)
    assert (decision.action, decision.drop_ephemeral_secret) == (Action.FINISH, True)
    assert decide(journal.START, domain_exists=False).action is Action.CLEAR


def test_interrupted_backup_is_rolled_back_removing_only_its_own_tmp() -> None:
    decision = decide(journal.RESIZE_PREPARE, tmp_backup_exists=True)
    assert decision.action is Action.ROLL_BACK
    assert decision.remove_tmp_backup == "/b/.u.x.tmp"
    assert decide(journal.RESIZE_PREPARE).remove_tmp_backup is None
    done = decide(journal.RESIZE_PREPARE, backup_exists=True)
    assert done.action is Action.FINISH and not done.revert_resize


def test_interrupted_finish_is_reverted() -> None:
    decision = decide(journal.RESIZE_FINISH, backup_exists=True)
    assert (decision.action, decision.revert_resize) == (Action.ROLL_BACK, True)
    assert decide(journal.RESIZE_FINISH).action is Action.CLEAR


def test_finish_interrupted_once_its_guest_was_started_is_finished_forward() -> None:
    """Issue 20 defect 1: never a backup restored over a state a guest has run on."""
    intent = journal.Intent(journal.RESIZE_FINISH, step=journal.STARTING)
    decision = journal.decide(intent, domain_exists=True, backup_exists=True,
                              tmp_backup_exists=False)
    assert decision.action is Action.FINISH
    assert decision.drop_ephemeral_secret and not decision.revert_resize
    assert decision.redo is None


@pytest.mark.parametrize("op", [journal.RESIZE_REVERT, journal.RESIZE_CONFIRM])
def test_interrupted_revert_or_confirm_is_run_again(op: str) -> None:
    assert decide(op, backup_exists=True).redo == op
    assert decide(op).action is Action.CLEAR
