"""Never lose a TPM (issue 13): races, interrupted operations, Barbican first, console log.

Races are forced with the fake's ``on_event`` hook (a step blocks until the
test lets it go); a process killed mid-way is a BaseException raised there
(no ``except Exception`` undo runs, as with ``kill -9``).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest

from tests.fakes.swtpm import custody_free
from tests.unit.conftest import KERNEL, MEMBER, OWNER, Env
from vtpm_driver import exception
from vtpm_driver.audit import plan as repair
from vtpm_driver.audit import report as vtpm_audit
from vtpm_driver.keymgr.context import RequestContext
from vtpm_driver.model.server import Flavor, Instance
from vtpm_driver.ops import journal
from vtpm_driver.standalone import servers
from vtpm_driver.virt import domain, record

ADMIN = RequestContext(user_id="admin-id", project_id="proj-admin", auth_token="tok-admin",
                       roles=("admin",))


class Killed(BaseException):
    """The process died here (kill -9): no undo runs."""


def kill_at(env: Env, event: str) -> None:
    """The process dies at ``event``: that call and every later libvirt call raise
    :class:`Killed` (an undo that would run on Ctrl-C gets nowhere)."""
    dead = []

    def hook(what: str, _detail: str) -> None:
        if what == event or dead:
            dead.append(what)
            raise Killed(what)
    env.conn.on_event = hook


def revive(env: Env) -> None:
    """A new process: libvirt answers again."""
    env.conn.on_event = None


class Pause:
    """Block the thread that reaches ``event`` until :meth:`go`."""

    def __init__(self, env: Env, event: str) -> None:
        self.reached = threading.Event()
        self.release = threading.Event()
        self.event = event
        self.env = env
        env.conn.on_event = self.hook

    def hook(self, what: str, _detail: str) -> None:
        if what == self.event and not self.reached.is_set():
            self.reached.set()
            self.release.wait(timeout=600)  # a failing test must not hang the run

    def go(self) -> None:
        self.env.conn.on_event = None
        self.release.set()


def in_thread(fn) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def reread(env: Env, inst: Instance) -> Instance:
    """The server as a new command finds it."""
    return servers.find(env.conn, inst.uuid)


NEW_FLAVOR = {"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"}


# --------------------------------------------------------------------------- item 1: races


def test_item1_second_resize_never_removes_the_first_ones_backup(env: Env) -> None:
    inst = env.spawn(env.instance())
    ek = env.state_file(inst).read_bytes()
    backups = env.drv.resize_ops.backups
    backups.make(inst, inst, keep_state=True)
    backup = backups.backup_dir(inst.uuid)
    with pytest.raises(exception.VTPMError, match="already in place"):
        backups.make(inst, inst, keep_state=True)
    assert (backup / "swtpm" / "tpm2" / "tpm2-00.permall").read_bytes() == ek
    assert sorted(p.name for p in backup.parent.iterdir()) == [inst.uuid], "no tmp left"


def test_item1_concurrent_resize_is_refused_while_the_first_runs(env: Env) -> None:
    inst = env.spawn(env.instance())
    ek = env.state_file(inst).read_bytes()
    env.drv.conf.set_override("lock_timeout", 0, group="vtpm")
    new = Flavor(extra_specs=NEW_FLAVOR)
    pause = Pause(env, "virt.destroy")  # the first resize is stopping the guest
    first, errors = in_thread(
        lambda: env.drv.migrate_disk_and_power_off(OWNER, inst, None, new, None))
    pause.reached.wait()
    second = reread(env, inst)
    try:
        with pytest.raises(exception.ServerLocked, match="operation 'resize'"):
            env.drv.migrate_disk_and_power_off(OWNER, second, None, new, None)
    finally:
        pause.go()
    first.join()
    assert errors == []
    inst.old_flavor, inst.flavor = inst.flavor, new
    env.drv.finish_migration(OWNER, None, inst, "[]", None, None, True, {})
    inst.flavor = inst.old_flavor
    env.drv.finish_revert_migration(OWNER, inst, None, None)
    assert env.state_file(inst).read_bytes() == ek, "the old TPM came back"


def test_item1_delete_during_hard_reboot_waits_and_nothing_is_redefined(env: Env) -> None:
    inst = env.spawn(env.instance())
    env.drv.conf.set_override("lock_timeout", 0, group="vtpm")
    pause = Pause(env, "virt.define")  # destroyed, about to be defined again
    reboot, errors = in_thread(lambda: env.drv.reboot(OWNER, inst, None, "HARD"))
    pause.reached.wait()
    try:
        with pytest.raises(exception.ServerLocked, match="operation 'hard reboot'"):
            env.drv.destroy(OWNER, reread(env, inst))
        assert env.km.passphrases, "the delete touched nothing"
    finally:
        pause.go()
    reboot.join()
    assert errors == [] and env.dom(inst).active
    env.drv.destroy(OWNER, reread(env, inst))
    assert inst.uuid not in env.conn.domains and env.km.passphrases == {}


def test_item1_a_command_that_waited_acts_on_the_server_as_it_is_now(env: Env) -> None:
    # A hard reboot read the server before a resize added its vTPM, and got the lock
    # after: with its old copy it would define the domain without the TPM.
    inst = env.spawn(servers.new_instance("plain", OWNER, kernel=KERNEL))
    stale = reread(env, inst)
    new = Flavor(extra_specs={"hw:tpm_version": "2.0"})
    env.drv.migrate_disk_and_power_off(OWNER, inst, None, new, None)
    inst.old_flavor, inst.flavor = inst.flavor, new
    env.drv.finish_migration(OWNER, None, inst, "[]", None, None, True, {})
    env.drv.confirm_migration(OWNER, None, inst, None)
    secret_uuid = inst.system_metadata["vtpm_secret_uuid"]
    env.drv.reboot(OWNER, stale, None, "HARD")
    assert domain.get_tpm(env.dom(inst).xml) == ("2.0", "tpm-tis", secret_uuid)
    assert custody_free(record.record_from_domain(env.dom(inst)).system_metadata) == {
        "vtpm_secret_uuid": secret_uuid}
    env.drv.destroy(OWNER, dataclasses.replace(stale, system_metadata={}))  # an old copy
    assert env.km.passphrases == {}, "the secret recorded now was deleted"


# --------------------------------------------------------------------------- item 3 and 8


def test_item3_non_owner_resize_is_refused_before_the_guest_is_touched(env: Env) -> None:
    inst = env.spawn(env.instance("user"))
    env.reset()
    new = Flavor(vcpus=2, extra_specs={"hw:tpm_version": "2.0",
                                               "hw:tpm_secret_security": "user"})
    with pytest.raises(exception.VTPMSecretForbidden):
        env.drv.migrate_disk_and_power_off(MEMBER, inst, None, new, None)
    assert env.dom(inst).active, "still running"
    assert not env.drv.resize_ops.has_backup(inst.uuid), "no resize pending"
    assert [e for e in env.names() if e != "barbican.get"] == []


def test_item8_admin_of_another_project_cannot_add_a_vtpm(env: Env) -> None:
    inst = env.spawn(servers.new_instance("plain", OWNER, kernel=KERNEL))
    env.reset()
    new = Flavor(extra_specs={"hw:tpm_version": "2.0"})
    with pytest.raises(exception.VTPMSecretForbidden, match=r"proj-admin.*proj-a"):
        env.drv.migrate_disk_and_power_off(ADMIN, inst, None, new, None)
    assert env.events == [] and env.dom(inst).active
    deployment = Flavor(extra_specs={"hw:tpm_version": "2.0",
                                             "hw:tpm_secret_security": "deployment"})
    env.drv.migrate_disk_and_power_off(ADMIN, inst, None, deployment, None)


# --------------------------------------------------------------------------- interrupted ops


def test_item7_killed_start_leaves_no_passphrase_after_the_next_operation(env: Env) -> None:
    inst = env.instance("user")
    kill_at(env, "virt.start")
    with pytest.raises(Killed):
        env.spawn(inst)
    revive(env)
    env.dom(inst).active = env.dom(inst).paused = True  # libvirt kept it, paused
    assert len(env.conn.secrets) == 1, "the passphrase is still in libvirt"
    found = reread(env, inst)
    assert journal.read(found.system_metadata).operation == journal.START
    assert env.drv.get_info(found) == "paused", "never shown as running"
    env.drv.power_off(found)
    assert env.conn.secrets == {}
    assert journal.KEY not in record.record_from_domain(env.dom(inst)).system_metadata
    env.dom(inst).paused = False
    env.drv.power_on(OWNER, reread(env, inst), None)
    assert env.dom(inst).active and env.conn.secrets == {}


def test_killed_backup_is_rolled_back_by_the_next_operation(env: Env) -> None:
    inst = env.spawn(env.instance())
    root = env.tmp / "resize"
    root.mkdir()
    foreign = root / f".{inst.uuid}.not-ours"
    foreign.mkdir()
    new = Flavor(extra_specs=NEW_FLAVOR)
    backups = env.drv.resize_ops.backups
    make = backups.make

    def dying_make(*args, **kwargs):
        tmp = kwargs["tmp"]
        tmp.mkdir()
        (tmp / "record.xml").write_text("half")
        kill_at(env, "virt.setmetadata")  # the journal is never cleared
        raise Killed("make")

    backups.make = dying_make
    with pytest.raises(Killed):
        env.drv.migrate_disk_and_power_off(OWNER, inst, None, new, None)
    backups.make = make
    revive(env)
    found = reread(env, inst)
    tmp = Path(journal.read(found.system_metadata).tmp_backup)
    assert tmp.exists()
    env.drv.power_on(OWNER, found, None)
    assert not tmp.exists() and foreign.exists(), "only its own tmp was removed"
    assert env.dom(inst).active and not backups.has_backup(inst.uuid)


def test_killed_finish_is_reverted_by_the_next_operation(env: Env) -> None:
    inst = servers.new_instance("plain", OWNER, kernel=KERNEL)
    env.spawn(inst)
    new = Flavor(extra_specs={"hw:tpm_version": "2.0"})
    env.drv.migrate_disk_and_power_off(OWNER, inst, None, new, None)
    inst.old_flavor, inst.flavor = inst.flavor, new
    kill_at(env, "virt.define")
    with pytest.raises(Killed):
        env.drv.finish_migration(OWNER, None, inst, "[]", None, None, True, {})
    revive(env)
    assert len(env.km.passphrases) == 1, "a new secret, recorded in the journal"
    found = reread(env, inst)
    assert journal.read(found.system_metadata).new_secret in env.km.passphrases
    env.drv.power_on(OWNER, found, None)
    assert env.km.passphrases == {} and env.conn.secrets == {}
    assert domain.get_tpm(env.dom(inst).xml) is None and env.dom(inst).active
    assert custody_free(record.record_from_domain(env.dom(inst)).system_metadata) == {}
    assert not env.drv.resize_ops.has_backup(inst.uuid)


def test_killed_revert_is_finished_by_the_revert_run_again(env: Env) -> None:
    inst = env.spawn(env.instance())
    ek = env.state_file(inst).read_bytes()
    new = Flavor(extra_specs={"hw:tpm_version": "1.2"})
    env.drv.migrate_disk_and_power_off(OWNER, inst, None, new, None)
    inst.old_flavor, inst.flavor = inst.flavor, new
    env.drv.finish_migration(OWNER, None, inst, "[]", None, None, True, {})
    kill_at(env, "virt.define")
    with pytest.raises(Killed):
        env.drv.finish_revert_migration(OWNER, reread(env, inst), None, None)
    revive(env)
    env.drv.finish_revert_migration(OWNER, reread(env, inst), None, None)
    assert env.state_file(inst).read_bytes() == ek
    assert domain.get_tpm(env.dom(inst).xml)[0] == "2.0" and env.dom(inst).active
    assert not env.drv.resize_ops.has_backup(inst.uuid)


# --------------------------------------------------------------------------- item 4


def test_item4_user_console_log_is_appended_to_never_truncated(env: Env) -> None:
    chosen = env.tmp / "mine.log"
    chosen.write_text("precious line\n")
    inst = servers.new_instance("vm1", OWNER, kernel=KERNEL, console_log=str(chosen),
                                flavor_extra_specs={"hw:tpm_version": "2.0"})
    env.spawn(inst)
    env.drv.reboot(OWNER, inst, None, "HARD")
    assert chosen.read_text() == "precious line\n"
    xml = domain.parse_xml(env.dom(inst).xml)
    assert {s.get("append") for s in xml.iter("source") if s.get("path") == str(chosen)} == {
        "on"}
    env.drv.destroy(OWNER, inst)
    assert chosen.read_text() == "precious line\n"


def test_repair_path_finishes_an_interrupted_start(env: Env) -> None:
    inst = env.instance("deployment")
    kill_at(env, "virt.start")
    with pytest.raises(Killed):
        env.spawn(inst)
    revive(env)
    found = reread(env, inst)
    decision = env.drv.recover(None, found)
    assert decision is not None and decision.action is journal.Action.FINISH
    assert env.conn.secrets == {}
    assert env.drv.recover(None, reread(env, inst)) is None, "idempotent"


def test_operation_on_a_server_with_a_garbled_journal_entry_is_a_typed_refusal(env: Env
                                                                              ) -> None:
    """A wrong-typed field used to crash every operation (TypeError in os.path.exists)."""
    inst = env.spawn(env.instance())
    env.drv.power_off(inst)
    found = reread(env, inst)
    found.system_metadata[journal.KEY] = '{"operation": "resize_prepare", "tmp_backup": [1]}'
    env.drv.guests.update_record(env.dom(inst), found)
    with pytest.raises(exception.InvalidJournalEntry,
                       match=f"server 'vm1' \\({inst.uuid}\\).*'tmp_backup'"):
        env.drv.power_on(OWNER, reread(env, inst), None)
    assert not env.dom(inst).active


# --------------------------------------------------------------------------- issue 20 defect 1


def test_i20_d1_resize_killed_after_the_start_is_finished_forward_not_rolled_back(env: Env
                                                                                ) -> None:
    """Days later the owner's own ``resize confirm`` used to restore the pre-resize
    backup over the state the running guest had been writing."""
    inst = env.spawn(env.instance())
    secret_uuid = inst.system_metadata["vtpm_secret_uuid"]
    new = Flavor(vcpus=2, memory_mb=512, extra_specs={"hw:tpm_version": "2.0"})
    env.drv.migrate_disk_and_power_off(OWNER, inst, None, new, None)
    inst.old_flavor, inst.flavor = inst.flavor, new
    kill_at(env, "virt.secret.undefine")  # the guest started; the process dies
    with pytest.raises(Killed):
        env.drv.finish_migration(OWNER, None, inst, "[]", None, None, True, {})
    revive(env)
    assert env.dom(inst).active
    assert journal.read(reread(env, inst).system_metadata).operation == journal.RESIZE_FINISH
    env.state_file(inst).write_bytes(b"written by the running guest")
    env.drv.confirm_migration(OWNER, None, reread(env, inst), None)
    assert env.state_file(inst).read_bytes() == b"written by the running guest"
    assert env.dom(inst).active, "the running guest was left alone"
    stored = record.record_from_domain(env.dom(inst))
    assert (stored.flavor.vcpus, stored.flavor.memory_mb) == (2, 512)
    assert custody_free(stored.system_metadata) == {"vtpm_secret_uuid": secret_uuid}
    assert env.conn.secrets == {}, "the passphrase the start left was removed"
    assert not env.drv.resize_ops.has_backup(inst.uuid), "confirmed"


def test_i20_d1_resize_killed_after_the_start_awaits_confirm_or_revert(env: Env) -> None:
    """The next operation finishes it as a finished resize: the backup stays, and
    only the user's revert brings the old state back."""
    inst = env.spawn(env.instance())
    ek = env.state_file(inst).read_bytes()
    new = Flavor(vcpus=2, memory_mb=512, extra_specs={"hw:tpm_version": "2.0"})
    env.drv.migrate_disk_and_power_off(OWNER, inst, None, new, None)
    inst.old_flavor, inst.flavor = inst.flavor, new
    kill_at(env, "virt.secret.undefine")
    with pytest.raises(Killed):
        env.drv.finish_migration(OWNER, None, inst, "[]", None, None, True, {})
    revive(env)
    env.state_file(inst).write_bytes(b"written by the running guest")
    decision = env.drv.recover(None, reread(env, inst))
    assert decision is not None and decision.action is journal.Action.FINISH
    assert not decision.revert_resize
    assert env.state_file(inst).read_bytes() == b"written by the running guest"
    assert env.drv.resize_ops.has_backup(inst.uuid), "the resize awaits confirm or revert"
    assert journal.KEY not in record.record_from_domain(env.dom(inst)).system_metadata
    env.drv.finish_revert_migration(OWNER, reread(env, inst), None, None)
    assert env.state_file(inst).read_bytes() == ek, "the user asked for the revert"


# --------------------------------------------------------------------------- issue 20 defect 3


@pytest.mark.parametrize("event", ["virt.destroy", "virt.define",
                                   "virt.start", "virt.secret.undefine"])
def test_i20_d3_rebuild_with_reset_killed_at_any_step_keeps_the_server_and_its_secret(
        env: Env, event: str) -> None:
    """A ``rebuild --reset-tpm`` killed between undefine and define used to lose the
    server's record: its Barbican secret then looked orphaned and repair deleted it."""
    inst = env.spawn(env.instance("user"))
    secret_uuid = inst.system_metadata["vtpm_secret_uuid"]
    created = "2000-01-01T00:00:00"  # old enough for repair's min_age
    kill_at(env, event)
    with pytest.raises(Killed):
        env.drv.rebuild(OWNER, inst, None, [], None, {}, [], None, None, reset_tpm=True)
    revive(env)
    found = reread(env, inst)  # the server is still there, its secret recorded
    assert found.system_metadata["vtpm_secret_uuid"] == secret_uuid
    listed = servers.list_all(env.conn)
    report = vtpm_audit.audit(
        listed, [s.uuid for s in listed], [], [],
        [vtpm_audit.BarbicanSecret(secret_uuid, f"vTPM secret for instance {inst.uuid}",
                                   inst.uuid, created=created)])
    assert report.orphans_of(vtpm_audit.BARBICAN_SECRET) == ()
    plan = repair.plan(report, now=time.time(), min_age=0)
    assert repair.DELETE_BARBICAN not in [a.kind for a in plan.actions]
    env.drv.power_on(OWNER, found, None)  # the next operation works, with the secret
    assert env.dom(inst).active and secret_uuid in env.km.passphrases
    assert env.conn.secrets == {}


def test_i20_revert_killed_after_its_define_is_finished_not_copied_back_again(env: Env
                                                                             ) -> None:
    """A revert killed once the domain was redefined (the backup copied back, the TPM
    handed over) is finished by the next operation: the backup, now older than the
    record, is not copied back a second time (custody refused it, and every later
    operation with it) and the server starts on the restored TPM."""
    inst = env.spawn(env.instance())
    ek = env.state_file(inst).read_bytes()
    new = Flavor(vcpus=2, memory_mb=512, extra_specs={"hw:tpm_version": "2.0"})
    env.drv.migrate_disk_and_power_off(OWNER, inst, None, new, None)
    inst.old_flavor, inst.flavor = inst.flavor, new
    env.drv.finish_migration(OWNER, None, inst, "[]", None, None, True, {})
    kill_at(env, "virt.secret.define")  # redefined with the old flavor; not started
    with pytest.raises(Killed):
        env.drv.finish_revert_migration(OWNER, reread(env, inst), None, None)
    revive(env)
    entry = journal.read(reread(env, inst).system_metadata)
    assert (entry.operation, entry.step) == (journal.RESIZE_REVERT, journal.RESTORED)
    decision = env.drv.recover(None, reread(env, inst))
    assert decision is not None and decision.action is journal.Action.FINISH
    assert env.state_file(inst).read_bytes() == ek
    assert not env.drv.resize_ops.has_backup(inst.uuid), "the revert is complete"
    assert journal.KEY not in record.record_from_domain(env.dom(inst)).system_metadata
    env.drv.power_on(OWNER, reread(env, inst), None)
    assert env.dom(inst).active
