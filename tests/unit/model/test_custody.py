"""vtpm_driver.model.custody: the pure rule of which copy of a TPM is current (issue 20)."""

from __future__ import annotations

import types

import pytest

from vtpm_driver import exception
from vtpm_driver.model import custody
from vtpm_driver.model.custody import Verdict


def server(generation: str | None = None, **sysmeta: str) -> types.SimpleNamespace:
    if generation is not None:
        sysmeta[custody.GENERATION_KEY] = generation
    return types.SimpleNamespace(name="vm1", uuid="6d2f0d4e-0000-4000-8000-000000000001",
                                 system_metadata=sysmeta)


@pytest.mark.parametrize(("record", "found", "present", "verdict"), [
    (3, 3, True, Verdict.CURRENT),
    (3, 2, True, Verdict.OLDER),
    (3, None, True, Verdict.OLDER),       # unstamped while the record is: missed a hand-over
    (3, 4, True, Verdict.NEWER),
    (None, None, True, Verdict.UNSTAMPED),  # older than custody: current once
    (None, 5, True, Verdict.ADOPT),
    (3, None, False, Verdict.MISSING),    # a TPM was made: its state is gone
    (None, None, False, Verdict.FRESH),   # a first start
])
def test_judge(record, found, present, verdict) -> None:
    assert custody.judge(record, found, present=present) is verdict
    assert verdict.startable is (
        verdict not in (Verdict.OLDER, Verdict.NEWER, Verdict.MISSING))


def test_no_state_is_a_new_tpm_only_when_the_caller_makes_one() -> None:
    assert custody.judge(3, None, present=False, absent_ok=True) is Verdict.FRESH
    assert custody.judge(3, 3, present=False) is Verdict.FRESH   # a place prepared for one


def test_a_copy_one_behind_is_the_hand_overs_only_on_the_host_it_names() -> None:
    assert custody.judge(3, 2, handed_here=True) is Verdict.HANDING_OVER
    assert Verdict.HANDING_OVER.startable
    assert custody.judge(3, 2) is Verdict.OLDER
    assert custody.judge(3, 1, handed_here=True) is Verdict.OLDER
    assert custody.judge(3, 4, handed_here=True) is Verdict.NEWER


def test_a_missing_state_is_refused_naming_the_server_the_record_and_where_to_look() -> None:
    inst = server("5")
    with pytest.raises(exception.StaleTPMState) as caught:
        custody.check(inst, None, copy="/s/x on host host-a", present=False)
    message = str(caught.value)
    assert "vm1" in message and "/s/x on host host-a" in message
    assert "generation 5" in message and "_resize" in message and "reset" in message
    assert custody.check(inst, None, copy="c", present=False, absent_ok=True) is Verdict.FRESH


def test_an_older_copy_is_refused_naming_server_copy_both_generations_and_what_to_do() -> None:
    inst = server("5")
    with pytest.raises(exception.StaleTPMState) as caught:
        custody.check(inst, 4, copy="the swtpm state /s/x on host host-a", doing="start")
    message = str(caught.value)
    for part in ("'vm1'", inst.uuid, "/s/x on host host-a", "generation is 4",
                 "generation 5 is current", "allow_stale_tpm_state"):
        assert part in message
    assert (caught.value.found, caught.value.current) == (4, 5)
    assert caught.value.copy == "the swtpm state /s/x on host host-a"


def test_allow_stale_accepts_an_older_copy_and_says_so() -> None:
    assert custody.check(server("5"), 4, copy="c", allow_stale=True) is Verdict.OLDER


def test_record_override_compares_with_the_pre_resize_generation() -> None:
    inst = server("6", **{custody.PRE_RESIZE_KEY: "5"})
    assert custody.pre_resize(inst) == 5
    assert custody.check(inst, 5, copy="backup", record=custody.pre_resize(inst)) \
        is Verdict.CURRENT
    with pytest.raises(exception.StaleTPMState, match="generation 5 is current"):
        custody.check(inst, 4, copy="backup", record=5)


def test_advance_counts_up_and_keeps_the_pre_resize_generation_once() -> None:
    inst = server()
    assert custody.advance(inst) == custody.FIRST + 1
    assert custody.advance(inst, resize=True) == 3
    assert custody.advance(inst, resize=True) == 4          # a second hand-over, same resize
    assert inst.system_metadata[custody.PRE_RESIZE_KEY] == "2"
    custody.forget_resize(inst)
    custody.forget_resize(inst)                               # idempotent
    assert custody.PRE_RESIZE_KEY not in inst.system_metadata
    assert custody.recorded(inst) == 4 and custody.pre_resize(inst) == 4


@pytest.mark.parametrize("bad", ["", "x", "-1", "0", None, True])
def test_a_garbled_generation_counts_as_none(bad) -> None:
    assert custody.recorded(server(**{custody.GENERATION_KEY: bad})) is None
    assert custody.parse(bad if isinstance(bad, str) else None) is None


def test_settled_is_the_record_else_the_copy_else_first() -> None:
    assert custody.settled(server("3"), 9) == 3
    assert custody.settled(server(), 9) == 9
    assert custody.settled(server(), None) == custody.FIRST
