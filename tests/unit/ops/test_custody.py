"""Custody on a standalone host (issue 20): only the current copy of a TPM ever starts.

Every start asks ``Guests.prepare_start`` first, which compares the live
state's generation (``<swtpm_state_dir>/<uuid>/vtpm-generation``) with the
server record's (``system_metadata['vtpm_generation']``); resize, revert and
``rebuild --reset-tpm`` hand the TPM over and advance it.
"""

from __future__ import annotations

import pytest

from tests.unit.conftest import OWNER, Env, resize_to
from vtpm_driver import exception
from vtpm_driver.model import custody
from vtpm_driver.model.server import Flavor, Instance
from vtpm_driver.ops import custody as ops_custody
from vtpm_driver.virt import record, state


def generations(env: Env, inst: Instance) -> tuple[int | None, int | None, int | None]:
    """(live state's, instance's, domain record's) generation."""
    stored = record.record_from_domain(env.dom(inst))
    return (state.read_generation(env.state_base, inst.uuid), custody.recorded(inst),
            custody.recorded(stored))


def set_record(env: Env, inst: Instance, generation: int | None) -> None:
    """The domain record says ``generation`` is current (None: none recorded)."""
    if generation is None:
        inst.system_metadata.pop(custody.GENERATION_KEY, None)
    else:
        custody.set_recorded(inst, generation)
    record.update_domain_record(env.dom(inst), inst)


def test_spawn_gives_a_new_tpm_generation_1_in_state_and_record(env: Env) -> None:
    inst = env.spawn(env.instance())
    assert generations(env, inst) == (1, 1, 1)


def test_an_older_state_is_refused_at_hard_reboot_before_the_guest_is_touched(
        env: Env) -> None:
    inst = env.spawn(env.instance())
    state.write_generation(env.state_base, inst.uuid, 1)
    set_record(env, inst, 3)                 # the TPM was handed over twice since
    env.reset()
    with pytest.raises(exception.StaleTPMState) as caught:
        env.drv.reboot(OWNER, inst, None, "HARD")
    message = str(caught.value)
    assert inst.uuid in message and str(env.state_base / inst.uuid) in message
    assert "generation is 1" in message and "generation 3 is current" in message
    assert env.names() == [] and env.dom(inst).active   # nothing touched, not even Barbican


def test_an_older_state_is_refused_at_power_on_and_resume(env: Env) -> None:
    inst = env.spawn(env.instance())
    env.drv.power_off(inst)
    set_record(env, inst, 2)
    with pytest.raises(exception.StaleTPMState, match="generation is 1"):
        env.drv.power_on(OWNER, inst, None)
    with pytest.raises(exception.StaleTPMState, match="generation is 1"):
        env.drv.resume(OWNER, inst, None)
    assert not env.dom(inst).active


def test_a_state_from_before_custody_is_current_once_and_stamped(env: Env) -> None:
    inst = env.spawn(env.instance())
    (env.state_base / inst.uuid / state.GENERATION_FILE).unlink()
    set_record(env, inst, None)
    env.drv.reboot(OWNER, inst, None, "HARD")
    assert generations(env, inst) == (1, 1, 1)


def test_an_unstamped_state_is_refused_once_the_record_has_a_generation(env: Env) -> None:
    inst = env.spawn(env.instance())
    (env.state_base / inst.uuid / state.GENERATION_FILE).unlink()
    with pytest.raises(exception.StaleTPMState, match=r"generation is none"):
        env.drv.reboot(OWNER, inst, None, "HARD")


def test_allow_stale_tpm_state_accepts_an_older_state_and_stamps_it(env: Env) -> None:
    inst = env.spawn(env.instance())
    set_record(env, inst, 4)
    env.drv.conf.set_override("allow_stale_tpm_state", True, group="vtpm")
    env.drv.reboot(OWNER, inst, None, "HARD")
    assert generations(env, inst) == (4, 4, 4)


@pytest.mark.parametrize("revert", [False, True])
def test_a_resize_hands_the_tpm_over_and_a_revert_again(env: Env, revert: bool) -> None:
    inst = env.spawn(env.instance())
    ek = env.state_file(inst).read_bytes()
    resize_to(env, inst, {"hw:tpm_version": "2.0"}, revert=revert)
    # finish_migration: 1 -> 2; the revert copies back the generation-1 backup: 2 -> 3.
    assert generations(env, inst) == ((3, 3, 3) if revert else (2, 2, 2))
    assert custody.PRE_RESIZE_KEY not in inst.system_metadata
    assert env.state_file(inst).read_bytes() == ek


def test_the_resized_state_never_starts_after_a_revert(env: Env) -> None:
    inst = env.spawn(env.instance())
    new = Flavor(vcpus=2, memory_mb=512, extra_specs={"hw:tpm_version": "2.0"})
    inst.new_flavor = new
    env.drv.migrate_disk_and_power_off(OWNER, inst, None, new, None)
    inst.old_flavor, inst.flavor = inst.flavor, new
    env.drv.finish_migration(OWNER, None, inst, "[]", None, inst.image_meta, True, {})
    assert inst.system_metadata[custody.PRE_RESIZE_KEY] == "1"
    inst.flavor = inst.old_flavor
    env.drv.finish_revert_migration(OWNER, inst, None, None)
    # The resized TPM had generation 2; the record is now 3: were it put back, it is refused.
    state.write_generation(env.state_base, inst.uuid, 2)
    with pytest.raises(exception.StaleTPMState, match=r"generation is 2.*generation 3"):
        env.drv.reboot(OWNER, inst, None, "HARD")


def test_a_revert_refuses_to_copy_back_a_backup_of_another_generation(env: Env) -> None:
    inst = env.spawn(env.instance())
    resize_to(env, inst, {"hw:tpm_version": "2.0"})            # generation 2 now
    new = Flavor(vcpus=4, memory_mb=512, extra_specs={"hw:tpm_version": "2.0"})
    inst.new_flavor = new
    env.drv.migrate_disk_and_power_off(OWNER, inst, None, new, None)
    inst.old_flavor, inst.flavor = inst.flavor, new
    env.drv.finish_migration(OWNER, None, inst, "[]", None, inst.image_meta, True, {})
    backup = env.tmp / "resize" / inst.uuid / "swtpm"
    state.write_generation_in(backup, 1)                         # an older backup put there
    inst.flavor = inst.old_flavor
    env.reset()
    with pytest.raises(exception.StaleTPMState) as caught:
        env.drv.finish_revert_migration(OWNER, inst, None, None)
    message = str(caught.value)
    assert "copy back" in message and str(env.tmp / "resize" / inst.uuid) in message
    assert "generation is 1" in message and "generation 2 is current" in message
    assert env.dom(inst).active and "virt.destroy" not in env.names()


def test_rebuild_keeps_the_generation_and_reset_tpm_advances_it(env: Env) -> None:
    inst = env.spawn(env.instance())
    old_ek = env.state_file(inst).read_bytes()
    env.drv.rebuild(OWNER, inst, None, [], None, {}, [], None, None)
    assert generations(env, inst) == (1, 1, 1)
    env.drv.rebuild(OWNER, inst, None, [], None, {}, [], None, None, reset_tpm=True)
    assert generations(env, inst) == (2, 2, 2)
    assert env.state_file(inst).read_bytes() != old_ek
    # The old TPM (generation 1) put back is never started.
    state.write_generation(env.state_base, inst.uuid, 1)
    with pytest.raises(exception.StaleTPMState, match="generation is 1"):
        env.drv.reboot(OWNER, inst, None, "HARD")


def test_a_missing_state_is_refused_not_made_again(env: Env) -> None:
    """The record says the TPM was made; its state is gone (an interrupted move took it
    away): a start would make a new TPM with a new EK. Refused, nothing touched."""
    inst = env.spawn(env.instance())
    env.drv.power_off(inst)
    state.remove_state(env.state_base, inst.uuid)
    with pytest.raises(exception.StaleTPMState, match="no TPM state") as caught:
        env.drv.power_on(OWNER, inst, None)
    assert "generation 1" in str(caught.value) and "_resize" in str(caught.value)
    assert not env.dom(inst).active
    assert not state.has_tpm_state(env.state_base, inst.uuid)


def test_a_reset_killed_after_removing_the_tpm_is_finished_by_the_next_start(
        env: Env) -> None:
    """rebuild --reset-tpm keeps the generation file where it removes the TPM: that place
    says a new TPM is wanted, so a start after a kill makes it (not a missing TPM)."""
    inst = env.spawn(env.instance())
    env.drv.power_off(inst)
    old_ek = env.state_file(inst).read_bytes()
    state.remove_tpm(env.state_base, inst.uuid)         # what the reset did before the kill
    assert state.read_generation(env.state_base, inst.uuid) == 1
    env.drv.power_on(OWNER, inst, None)
    assert env.dom(inst).active and env.state_file(inst).read_bytes() != old_ek


class _Saves:
    """The record as stored: what ``save`` stored last (a copy of system_metadata)."""

    def __init__(self, inst: Instance) -> None:
        self.inst = inst
        self.stored: dict[str, str] = {}

    def __call__(self) -> None:
        self.stored = dict(self.inst.system_metadata)


def test_hand_over_stores_the_record_naming_the_host_before_stamping(env: Env) -> None:
    inst = env.spawn(env.instance())
    saves = _Saves(inst)
    assert ops_custody.hand_over(inst, str(env.state_base), host="h2", save=saves) == 2
    assert saves.stored[custody.GENERATION_KEY] == "2"
    assert saves.stored[custody.HANDOVER_KEY] == "h2"           # stored before the stamp
    assert state.read_generation(env.state_base, inst.uuid) == 2
    assert custody.HANDOVER_KEY not in inst.system_metadata     # done once stamped


def test_a_hand_over_killed_before_its_stamp_is_finished_on_its_host_only(env: Env) -> None:
    """Stored record 2 naming h2, the state there still 1: h2's next start accepts and
    stamps it; the same state on any other host is older than the record, refused."""
    inst = env.spawn(env.instance())
    custody.advance(inst, to_host="h2")                        # stored, then killed
    with pytest.raises(exception.StaleTPMState, match="generation is 1"):
        ops_custody.check_live(inst, str(env.state_base), host="h1", allow_stale=False)
    verdict = ops_custody.check_live(inst, str(env.state_base), host="h2", allow_stale=False)
    assert verdict is custody.Verdict.HANDING_OVER
    assert ops_custody.stamp_live(inst, str(env.state_base)) == 2
    assert custody.HANDOVER_KEY not in inst.system_metadata
    # Two behind is no hand-over's copy.
    custody.advance(inst, to_host="h2")
    custody.advance(inst, to_host="h2")
    with pytest.raises(exception.StaleTPMState, match="generation is 2"):
        ops_custody.check_live(inst, str(env.state_base), host="h2", allow_stale=False)
