"""Custody through the shim (issue 20): Nova's instance holds the current generation.

Shelve offload, unshelve, evacuation and live migration hand the TPM over
(``system_metadata['vtpm_generation']`` advances, saved first, then the copy
or the state here is stamped); a start, unshelve or evacuation of a copy of
another generation is refused naming the server, the copy and both
generations. Nova's own steps are recorded instead of run (``calls``).
"""

from __future__ import annotations

import shutil

import pytest
from nova import exception as nova_exception
from nova.compute import task_states, vm_states
from nova.virt.libvirt import driver as libvirt_driver

from tests.fakes.swtpm import make_state
from tests.nova import test_nova_shim_offhost as offhost
from tests.nova.nova_fakes import make_image
from vtpm_driver.model import custody
from vtpm_driver.model.rules import Change
from vtpm_driver.virt import state

# The off-host tests' fixtures and helpers (one of each kind).
calls, dirs, store, tpm_instance, xml = (offhost.calls, offhost.dirs, offhost.store,
                                         offhost.tpm_instance, offhost.xml)
evacuate, shelved_copy = offhost.evacuate, offhost.shelved_copy


def test_shelve_offload_hands_the_tpm_to_the_copy(tpm_instance, drv, ctx, dirs, store,
                                                  calls, xml):
    instance = tpm_instance(task_state=task_states.SHELVING_OFFLOADING,
                            vm_state=vm_states.SHELVED)
    make_state(dirs / "swtpm", instance.uuid)
    state.write_generation(dirs / "swtpm", instance.uuid, 4)
    custody.set_recorded(instance, 4)
    drv.destroy(ctx, instance, [])
    assert custody.recorded(instance) == 5
    assert store.get(instance.uuid).generation == 5


def test_a_failed_shelve_copy_keeps_the_generation(tpm_instance, drv, ctx, calls, xml):
    instance = tpm_instance(task_state=task_states.SHELVING_OFFLOADING,
                            vm_state=vm_states.SHELVED)   # no state here: the copy fails
    custody.set_recorded(instance, 4)
    with pytest.raises(nova_exception.NovaException):
        drv.destroy(ctx, instance, [])
    assert custody.recorded(instance) == 4


def unshelvable(dirs, store, instance, generation):
    """A shelved copy with ``generation`` of a server whose instance says 2."""
    shelved_copy(dirs, instance)
    store.update(instance.uuid, generation=generation)
    custody.set_recorded(instance, 2)


def test_unshelve_of_the_current_copy_advances_and_stamps_the_restored_state(
        tpm_instance, drv, ctx, dirs, store, monkeypatch):
    instance = tpm_instance(vm_state=vm_states.SHELVED_OFFLOADED)
    unshelvable(dirs, store, instance, 2)
    seen = []
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "spawn", lambda self, *a, **k: seen.append(
        state.read_generation(dirs / "swtpm", instance.uuid)))
    drv.spawn(ctx, instance, make_image(), [], None, {})
    assert seen == [3]                       # stamped before Nova defines and starts it
    assert custody.recorded(instance) == 3


@pytest.mark.parametrize("older", [1, None])
def test_unshelve_of_an_older_copy_is_refused_naming_both_generations(
        tpm_instance, drv, ctx, dirs, store, calls, older):
    instance = tpm_instance(vm_state=vm_states.SHELVED_OFFLOADED)
    unshelvable(dirs, store, instance, older)
    with pytest.raises(nova_exception.NovaException) as caught:
        drv.spawn(ctx, instance, make_image(), [], None, {})
    message = str(caught.value)
    shown = "none (taken before custody)" if older is None else str(older)
    assert f"generation is {shown}" in message and "generation 2 is current" in message
    assert instance.uuid in message and "off-host copy" in message
    assert str(dirs / "store") in message and "host-a" in message
    assert calls == [] and not (dirs / "swtpm" / instance.uuid).exists()
    assert custody.recorded(instance) == 2


def test_allow_stale_tpm_state_restores_an_older_copy(tpm_instance, drv, ctx, dirs, store,
                                                      flags, monkeypatch):
    flags.config(group="vtpm", allow_stale_tpm_state=True)
    instance = tpm_instance(vm_state=vm_states.SHELVED_OFFLOADED)
    unshelvable(dirs, store, instance, 1)
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "spawn", lambda self, *a, **k: None)
    drv.spawn(ctx, instance, make_image(), [], None, {})
    assert custody.recorded(instance) == 3
    assert state.read_generation(dirs / "swtpm", instance.uuid) == 3


def test_a_failed_unshelve_puts_the_generation_back(tpm_instance, drv, ctx, dirs, store,
                                                    monkeypatch):
    instance = tpm_instance(vm_state=vm_states.SHELVED_OFFLOADED)
    unshelvable(dirs, store, instance, 2)

    def fail(self, *args, **kwargs):
        raise nova_exception.NovaException("libvirt said no")

    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "spawn", fail)
    with pytest.raises(nova_exception.NovaException, match="libvirt said no"):
        drv.spawn(ctx, instance, make_image(), [], None, {})
    assert custody.recorded(instance) == 2   # the copy is current again: a retry works


def test_evacuation_from_an_older_copy_is_refused_before_anything(
        tpm_instance, drv, ctx, dirs, store, calls):
    instance = tpm_instance(task_state=task_states.REBUILDING)
    shelved_copy(dirs, instance, reason="stop", shelved=False)
    store.update(instance.uuid, generation=1)
    custody.set_recorded(instance, 2)
    with pytest.raises(nova_exception.NovaException,
                       match=r"generation is 1.*generation 2 is current"):
        evacuate(drv, ctx, instance)
    assert calls == [] and not (dirs / "swtpm" / instance.uuid).exists()


def test_evacuation_hands_the_tpm_to_the_new_host(tpm_instance, drv, ctx, dirs, store,
                                                  calls, monkeypatch):
    instance = tpm_instance(task_state=task_states.REBUILDING)
    shelved_copy(dirs, instance, reason="stop", shelved=False)
    store.update(instance.uuid, generation=2)
    custody.set_recorded(instance, 2)
    with pytest.raises(NotImplementedError):           # on to Nova's default rebuild
        evacuate(drv, ctx, instance)
    instance.task_state = task_states.REBUILD_SPAWNING
    drv.spawn(ctx, instance, make_image(), [], None, {})
    assert custody.recorded(instance) == 3
    assert state.read_generation(dirs / "swtpm", instance.uuid) == 3
    # The old host's state (generation 2) can never start again: a start there refuses it.


def test_a_start_of_an_older_state_is_refused_before_novas_hard_reboot(
        tpm_instance, drv, ctx, dirs, log, monkeypatch):
    instance = tpm_instance()
    make_state(dirs / "swtpm", instance.uuid)
    state.write_generation(dirs / "swtpm", instance.uuid, 2)
    custody.set_recorded(instance, 3)            # evacuated since: this host's copy is old
    seen = []
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "_hard_reboot",
                        lambda self, *a, **k: seen.append("hard_reboot"))
    with pytest.raises(nova_exception.NovaException) as caught:
        drv._hard_reboot(ctx, instance, [], None)
    message = str(caught.value)
    assert "generation is 2" in message and "generation 3 is current" in message
    assert str(dirs / "swtpm" / instance.uuid) in message
    assert seen == [] and log == []              # neither Nova nor Barbican was asked


def test_a_start_of_the_current_state_goes_on_and_an_unstamped_one_is_stamped_once(
        tpm_instance, drv, ctx, dirs, monkeypatch):
    instance = tpm_instance()
    make_state(dirs / "swtpm", instance.uuid)      # a server from before custody
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "_hard_reboot", lambda self, *a, **k: None)
    drv._hard_reboot(ctx, instance, [], None)
    assert custody.recorded(instance) == custody.FIRST
    assert state.read_generation(dirs / "swtpm", instance.uuid) == custody.FIRST
    drv._hard_reboot(ctx, instance, [], None)      # current: goes on, nothing changes
    assert custody.recorded(instance) == custody.FIRST


def test_live_migration_hands_the_tpm_to_the_destination(tpm_instance, drv, ctx, dirs,
                                                         monkeypatch):
    instance = tpm_instance()
    make_state(dirs / "swtpm", instance.uuid)      # what the migration stream brought
    custody.set_recorded(instance, 2)
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "post_live_migration_at_destination",
                        lambda self, *a, **k: None)
    monkeypatch.setattr("nova.virt.vtpm.migrate.incoming_running", lambda *a: None)
    drv.post_live_migration_at_destination(ctx, instance, [], False, None)
    assert custody.recorded(instance) == 3
    assert state.read_generation(dirs / "swtpm", instance.uuid) == 3


def test_a_cold_migration_hands_the_tpm_to_the_destination(tpm_instance, drv, ctx, dirs,
                                                           monkeypatch):
    instance = tpm_instance()
    instance.old_flavor = instance.new_flavor = instance.flavor
    moved = dirs / "instances" / instance.uuid / "swtpm" / instance.uuid
    live = dirs / "swtpm" / instance.uuid

    def nova_moves_it_into_place(self, *a, **k):  # Nova's restore_vtpm_dir
        shutil.rmtree(live, ignore_errors=True)
        shutil.move(moved, live)

    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "_finish_migration_vtpm",
                        nova_moves_it_into_place)
    make_state(moved.parent, instance.uuid)         # where Nova's migration saved it
    state.write_generation_in(moved, 2)
    custody.set_recorded(instance, 2)
    drv._finish_migration_vtpm(ctx, instance)
    assert custody.recorded(instance) == 3
    assert instance.system_metadata[custody.PRE_RESIZE_KEY] == "2"
    assert state.read_generation(dirs / "swtpm", instance.uuid) == 3

    make_state(moved.parent, instance.uuid)         # an older one arrives
    state.write_generation_in(moved, 1)
    with pytest.raises(nova_exception.NovaException,
                       match=r"take over.*generation is 1.*generation 3 is current"):
        drv._finish_migration_vtpm(ctx, instance)


def test_a_start_finishes_a_cold_migration_killed_before_the_state_was_put_in_place(
        tpm_instance, drv, ctx, dirs, flags, monkeypatch):
    """The destination's nova-compute died between Nova's copy of the TPM state (into the
    instance directory) and its move into place: the next start moves it (Nova's own
    restore_vtpm_dir) and custody accepts it (the record's generation)."""
    flags.config(instances_path=str(dirs / "instances"))
    instance = tpm_instance()
    in_transit = dirs / "instances" / instance.uuid / "swtpm" / instance.uuid
    make_state(in_transit.parent, instance.uuid)
    state.write_generation_in(in_transit, 2)
    custody.set_recorded(instance, 2)
    moved = []
    (dirs / "swtpm").mkdir(exist_ok=True)
    monkeypatch.setattr("nova.virt.libvirt.utils.restore_vtpm_dir",
                        lambda path: moved.append(shutil.move(path, dirs / "swtpm")))
    started = []
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "_hard_reboot",
                        lambda self, *a, **k: started.append("hard_reboot"))
    drv._hard_reboot(ctx, instance, [], None)
    assert moved and started == ["hard_reboot"]
    assert state.read_generation(dirs / "swtpm", instance.uuid) == 2


def test_a_start_with_the_tpm_state_missing_is_refused_not_made_again(
        tpm_instance, drv, ctx, log, monkeypatch):
    """The record says the TPM was made (generation 2) and no state is here or in
    transit: Nova's start would manufacture a new TPM. Refused before Nova and Barbican."""
    instance = tpm_instance()
    custody.set_recorded(instance, 2)
    seen = []
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "_hard_reboot",
                        lambda self, *a, **k: seen.append("hard_reboot"))
    with pytest.raises(nova_exception.NovaException, match="no TPM state"):
        drv._hard_reboot(ctx, instance, [], None)
    assert seen == [] and log == []


def test_novas_recovery_of_a_migration_killed_at_the_source_reverts_with_the_flavor(
        tpm_instance, drv, ctx, monkeypatch):
    """A source killed after migrate_disk_and_power_off: Nova's init_host reverts before
    the source recorded old_flavor, and its own vTPM step reads it. The revert sees the
    current flavor as the old one (unchanged then); old_flavor is unset again after."""
    instance = tpm_instance()
    instance.old_flavor, instance.new_flavor = None, instance.flavor
    seen = []

    def nova_revert(self, context, instance, *a, **k):
        seen.append((instance.old_flavor, self._vtpm_resize_change(instance)))

    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "finish_revert_migration", nova_revert)
    drv.finish_revert_migration(ctx, instance, [], None)
    assert seen == [(instance.flavor, Change.KEPT)]
    assert instance.old_flavor is None


def test_a_confirm_or_a_new_move_drops_the_pre_resize_generation(tpm_instance, drv, ctx,
                                                                  monkeypatch):
    """A revert compares its backup with the generation before ITS move: one left by an
    earlier, confirmed (or reset) move made the next revert refuse its own backup."""
    instance = tpm_instance()
    instance.old_flavor = instance.new_flavor = instance.flavor
    custody.set_recorded(instance, 3)
    instance.system_metadata[custody.PRE_RESIZE_KEY] = "2"      # the earlier move's
    drv._cleanup_resize_vtpm(ctx, instance)                       # confirm
    assert custody.pre_resize(instance) == 3
    instance.system_metadata[custody.PRE_RESIZE_KEY] = "2"
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "migrate_disk_and_power_off",
                        lambda self, *a, **k: "[]")
    drv.migrate_disk_and_power_off(ctx, instance, "h2", instance.flavor, [])
    assert custody.pre_resize(instance) == 3


def test_a_live_migrated_state_is_stamped_before_novas_step_at_the_destination(
        tpm_instance, drv, ctx, dirs, monkeypatch):
    """libvirt's stream carries swtpm's state, not our generation file: it is stamped with
    the record's generation before Nova's post_live_migration_at_destination, so a kill
    there leaves the current copy here, not one that looks older than the record."""
    instance = tpm_instance()
    make_state(dirs / "swtpm", instance.uuid)       # arrived, unstamped
    custody.set_recorded(instance, 2)
    seen = []
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "post_live_migration_at_destination",
                        lambda self, *a, **k: seen.append(
                            state.read_generation(dirs / "swtpm", instance.uuid)))
    monkeypatch.setattr("nova.virt.vtpm.migrate.incoming_running", lambda *a: None)
    drv.post_live_migration_at_destination(ctx, instance, [], False, None)
    assert seen == [2]                               # stamped when Nova's step ran
    assert state.read_generation(dirs / "swtpm", instance.uuid) == 3   # then handed over


def test_an_older_state_left_here_is_removed_before_the_current_copy_moves_in(
        tpm_instance, drv, ctx, dirs, monkeypatch):
    """A reverted move left this host's older state behind; the next move here removes it
    (custody: it can never start) so Nova can put the arriving copy in its place. A state
    as new as the record is never removed."""
    instance = tpm_instance()
    instance.old_flavor = instance.new_flavor = instance.flavor
    make_state(dirs / "swtpm", instance.uuid)
    state.write_generation(dirs / "swtpm", instance.uuid, 2)
    custody.set_recorded(instance, 3)
    seen = []
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "finish_migration",
                        lambda self, *a, **k: seen.append(state.has_tpm_state(
                            dirs / "swtpm", instance.uuid)))
    drv.finish_migration(ctx, None, instance, {}, [], make_image(), False, {})
    assert seen == [False]                    # gone before Nova's step, nothing refused
    make_state(dirs / "swtpm", instance.uuid)
    state.write_generation(dirs / "swtpm", instance.uuid, 3)
    drv._vtpm_offhost.remove_overtaken(instance)
    assert state.has_tpm_state(dirs / "swtpm", instance.uuid)
