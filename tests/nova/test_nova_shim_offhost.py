"""The shim keeps the TPM through shelve, unshelve, evacuate, rebuild and rescue (issue 15).

Nova's driver methods run for real over the fake libvirt connection; the
steps of Nova's own driver that would need a real hypervisor (its
``destroy``, ``spawn``, ``power_off``, ``_undefine_domain``) are replaced by
recorders that also check what the shim did BEFORE them. The off-host store
is a temporary directory (``[vtpm] state_backup_dir``), the host's swtpm
state another one (``[vtpm] swtpm_state_dir``).
"""

from __future__ import annotations

import shutil
import time
import uuid

import pytest
from nova import context as nova_context
from nova import exception as nova_exception
from nova.compute import task_states, vm_states
from nova.virt.libvirt import driver as libvirt_driver

from tests.fakes.swtpm import make_state
from tests.nova.nova_fakes import PASSPHRASE, make_flavor, make_image, make_instance, minimal_guest
from vtpm_driver.ops.shelve import OffHostOps
from vtpm_driver.statestore import DirectoryStateStore

DOMAIN_XML = "<domain type='qemu'><name>instance-00000001</name></domain>"


@pytest.fixture
def dirs(flags, tmp_path):
    flags.config(group="vtpm", state_backup_dir=str(tmp_path / "store"),
                 swtpm_state_dir=str(tmp_path / "swtpm"))
    return tmp_path


@pytest.fixture
def store(dirs) -> DirectoryStateStore:
    return DirectoryStateStore(dirs / "store")


@pytest.fixture
def calls(monkeypatch) -> list:
    """Nova's own steps, recorded instead of run."""
    seen: list = []
    for name in ("destroy", "spawn", "power_off", "_undefine_domain", "rescue", "unrescue"):
        monkeypatch.setattr(libvirt_driver.LibvirtDriver, name,
                            lambda self, *a, _n=name, **k: seen.append((_n, a, k)))
    return seen


@pytest.fixture
def xml(drv, monkeypatch):
    monkeypatch.setattr(drv, "_vtpm_domain_xml", lambda instance: DOMAIN_XML)


@pytest.fixture
def tpm_instance(keymgr):
    """A server with a vTPM whose secret the fake Barbican holds."""

    def make(mode: str = "deployment", **kwargs):
        flavor = make_flavor(**{"hw:tpm_version": "2.0", "hw:tpm_secret_security": mode})
        secret_uuid = str(uuid.uuid4())
        keymgr.secrets[secret_uuid] = PASSPHRASE
        return make_instance(flavor, secret_uuid=secret_uuid, **kwargs)

    return make


def shelved_copy(dirs, instance, **changes) -> None:
    """A shelved server's copy, as the shim's shelve offload leaves it (host-a's state)."""
    make_state(dirs / "host-a", instance.uuid)
    OffHostOps(DirectoryStateStore(dirs / "store")).store_state(
        instance, host="host-a", state_base=str(dirs / "host-a"), record_text=DOMAIN_XML,
        reason=changes.pop("reason", "shelve"), running=changes.pop("running", False),
        shelved=changes.pop("shelved", True))


def stranger() -> nova_context.RequestContext:
    """An admin of the project who is not the owner (also oslo.context's current one)."""
    return nova_context.RequestContext(user_id="admin", project_id="proj-a",
                                       roles=["admin", "member"], user_name="root-admin")


# ----------------------------------------------------------------------------- shelve


def test_shelve_offload_copies_the_state_before_novas_destroy(
        tpm_instance, drv, ctx, dirs, store, calls, xml, log):
    instance = tpm_instance(task_state=task_states.SHELVING_OFFLOADING,
                            vm_state=vm_states.SHELVED)
    make_state(dirs / "swtpm", instance.uuid)
    drv.destroy(ctx, instance, [])

    assert [c[0] for c in calls] == ["destroy"]
    meta = store.get(instance.uuid)
    assert meta.shelved and meta.reason == "shelve" and meta.encrypted
    assert (store.path(instance.uuid) / "swtpm" / "tpm2" / "tpm2-00.permall").is_file()
    assert store.record(instance.uuid) == DOMAIN_XML
    assert [entry[0] for entry in log] == []          # the Barbican secret stays
    assert instance.system_metadata["vtpm_secret_uuid"]


def test_a_shelve_offload_that_cannot_copy_removes_nothing(
        tpm_instance, drv, ctx, dirs, store, calls, xml):
    instance = tpm_instance(task_state=task_states.SHELVING_OFFLOADING,
                            vm_state=vm_states.SHELVED)  # no state on this host
    with pytest.raises(nova_exception.NovaException, match="does not exist"):
        drv.destroy(ctx, instance, [])
    assert calls == []                                 # Nova's destroy never ran
    assert store.get(instance.uuid) is None


def test_a_non_owner_shelve_of_a_user_mode_server_is_refused_before_the_power_off(
        tpm_instance, drv, dirs, calls):
    instance = tpm_instance("user", task_state=task_states.SHELVING)
    stranger()  # the request's context for this thread, as Nova's RPC layer sets it
    with pytest.raises(nova_exception.Forbidden, match="only its owner"):
        drv.power_off(instance)
    assert calls == []


def test_the_owner_may_shelve_a_user_mode_server(tpm_instance, drv, ctx, calls):
    instance = tpm_instance("user", task_state=task_states.SHELVING)
    drv.power_off(instance)
    assert [c[0] for c in calls] == ["power_off"]


# ----------------------------------------------------------------------------- unshelve


@pytest.mark.parametrize(("backup", "kept"), [("off", False), ("on-stop", True)])
def test_unshelve_restores_the_state_before_novas_spawn(
        tpm_instance, drv, ctx, dirs, store, flags, monkeypatch, log, backup, kept):
    flags.config(group="vtpm", state_backup=backup)
    instance = tpm_instance(vm_state=vm_states.SHELVED_OFFLOADED)
    shelved_copy(dirs, instance)
    restored = dirs / "swtpm" / instance.uuid / "tpm2" / "tpm2-00.permall"
    seen = []
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "spawn",
                        lambda self, *a, **k: seen.append(restored.is_file()))

    drv.spawn(ctx, instance, make_image(), [], None, {})

    assert seen == [True]                              # state in place when Nova defines
    assert [entry[0] for entry in log] == ["get"]     # the same secret, read first
    meta = store.get(instance.uuid)
    assert (meta is not None) is kept
    if kept:
        assert not meta.shelved and meta.started_after is not None


def test_a_failed_unshelve_removes_the_restored_state_and_keeps_the_copy(
        tpm_instance, drv, ctx, dirs, store, monkeypatch):
    instance = tpm_instance(vm_state=vm_states.SHELVED_OFFLOADED)
    shelved_copy(dirs, instance)

    def fail(self, *args, **kwargs):
        raise nova_exception.NovaException("libvirt said no")

    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "spawn", fail)
    with pytest.raises(nova_exception.NovaException, match="libvirt said no"):
        drv.spawn(ctx, instance, make_image(), [], None, {})
    assert not (dirs / "swtpm" / instance.uuid).exists()
    assert store.get(instance.uuid).shelved


def test_a_failed_unshelve_never_removes_a_state_another_writer_made(
        tpm_instance, drv, ctx, dirs, store, monkeypatch):
    """Issue 20 defect 4: while Nova's spawn ran, another writer replaced the state
    the unshelve had restored; the failed unshelve's cleanup removed that one."""
    instance = tpm_instance(vm_state=vm_states.SHELVED_OFFLOADED)
    shelved_copy(dirs, instance)
    theirs = dirs / "swtpm" / instance.uuid

    def raced_and_failed(self, *args, **kwargs):
        shutil.rmtree(theirs)
        make_state(dirs / "swtpm", instance.uuid, payload=b"another writer's TPM")
        raise nova_exception.NovaException("libvirt said no")

    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "spawn", raced_and_failed)
    with pytest.raises(nova_exception.NovaException, match="libvirt said no"):
        drv.spawn(ctx, instance, make_image(), [], None, {})
    assert theirs.is_dir(), "not this unshelve's to remove"
    assert store.get(instance.uuid).shelved


def test_a_non_owner_unshelve_of_a_user_mode_server_changes_nothing(
        tpm_instance, drv, dirs, store, calls, log):
    instance = tpm_instance("user", vm_state=vm_states.SHELVED_OFFLOADED)
    shelved_copy(dirs, instance)
    with pytest.raises(nova_exception.Forbidden, match="only its owner"):
        drv.spawn(stranger(), instance, make_image(), [], None, {})
    assert calls == [] and log == []
    assert not (dirs / "swtpm" / instance.uuid).exists()
    assert store.get(instance.uuid).shelved


@pytest.mark.parametrize(("field", "value"), [("project_id", "proj-b"), ("user_id", "mallory"),
                                              ("secret_security", "host")])
def test_unshelve_from_a_copy_of_another_owner_is_refused_before_anything(
        tpm_instance, drv, ctx, dirs, store, calls, log, field, value):
    """The copy's meta.json is checked against Nova's instance, never trusted as is."""
    instance = tpm_instance(vm_state=vm_states.SHELVED_OFFLOADED)
    shelved_copy(dirs, instance)
    store.update(instance.uuid, **{field: value})
    with pytest.raises(nova_exception.NovaException,
                       match=f"{instance.uuid}.*{field}.*{value}"):
        drv.spawn(ctx, instance, make_image(), [], None, {})
    assert calls == []
    assert not (dirs / "swtpm" / instance.uuid).exists()
    assert store.get(instance.uuid).shelved


def test_evacuating_from_a_copy_of_another_project_is_refused(
        tpm_instance, drv, ctx, dirs, store, calls):
    instance = tpm_instance(task_state=task_states.REBUILDING)
    shelved_copy(dirs, instance, reason="stop", shelved=False)
    store.update(instance.uuid, project_id="proj-b")
    with pytest.raises(nova_exception.NovaException, match=r"project_id.*proj-b"):
        evacuate(drv, ctx, instance)
    assert calls == [] and not (dirs / "swtpm" / instance.uuid).exists()


def test_unshelve_without_a_copy_is_refused_before_novas_spawn(
        tpm_instance, drv, ctx, dirs, calls):
    instance = tpm_instance(vm_state=vm_states.SHELVED_OFFLOADED)
    with pytest.raises(nova_exception.NovaException, match="no shelved copy"):
        drv.spawn(ctx, instance, make_image(), [], None, {})
    assert calls == []


# ----------------------------------------------------------------------------- evacuate


def evacuate(drv, ctx, instance):
    drv.rebuild(context=ctx, instance=instance, image_meta=None, injected_files=[],
                admin_password=None, allocations={}, bdms=[], detach_block_devices=None,
                attach_block_devices=None, evacuate=True)


def test_evacuate_without_a_copy_is_refused_naming_the_setting(
        tpm_instance, drv, ctx, dirs, calls):
    instance = tpm_instance(task_state=task_states.REBUILDING)
    with pytest.raises(nova_exception.OperationNotSupportedForVTPM,
                       match=r"\[vtpm\] state_backup"):
        evacuate(drv, ctx, instance)
    assert calls == []


def test_evacuate_with_a_stale_copy_needs_allow_stale_tpm_state(
        tpm_instance, drv, ctx, dirs, store, flags, monkeypatch):
    instance = tpm_instance(task_state=task_states.REBUILDING)
    shelved_copy(dirs, instance, reason="periodic", running=True, shelved=False)
    with pytest.raises(nova_exception.OperationNotSupportedForVTPM,
                       match="allow_stale_tpm_state"):
        evacuate(drv, ctx, instance)

    flags.config(group="vtpm", allow_stale_tpm_state=True)
    with pytest.raises(NotImplementedError):           # on to Nova's default rebuild
        evacuate(drv, ctx, instance)
    seen = []
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "spawn",
                        lambda self, *a, **k: seen.append(
                            (dirs / "swtpm" / instance.uuid).is_dir()))
    instance.task_state = task_states.REBUILD_SPAWNING
    before = time.time()
    drv.spawn(ctx, instance, make_image(), [], None, {})
    assert seen == [True]
    assert store.get(instance.uuid).started_after >= before   # the copy is overtaken


def test_evacuating_a_user_mode_server_needs_its_owner(tpm_instance, drv, dirs, calls):
    instance = tpm_instance("user", task_state=task_states.REBUILDING)
    shelved_copy(dirs, instance, reason="stop", shelved=False)
    with pytest.raises(nova_exception.Forbidden, match="only its owner"):
        evacuate(drv, stranger(), instance)


# ----------------------------------------------------------------------------- rebuild


def test_rebuild_reads_the_passphrase_first_and_keeps_the_tpm_state(
        tpm_instance, drv, ctx, calls, log):
    instance = tpm_instance(task_state=task_states.REBUILDING)
    with pytest.raises(NotImplementedError):           # Nova's default rebuild follows
        drv.rebuild(context=ctx, instance=instance, image_meta=None, injected_files=[],
                    admin_password=None, allocations={}, bdms=[],
                    detach_block_devices=None, attach_block_devices=None)
    assert [entry[0] for entry in log] == ["get"]
    drv._undefine_domain(instance)
    assert calls == [("_undefine_domain", (instance,),
                      {"keep_vtpm": True, "keep_nvram": False})]


def test_a_rebuild_that_cannot_read_the_passphrase_touches_nothing(
        tpm_instance, drv, ctx, keymgr, calls):
    from vtpm_driver import exception

    instance = tpm_instance("user", task_state=task_states.REBUILDING)
    keymgr.fail = exception.VTPMSecretForbidden("Barbican: 403 Forbidden")
    with pytest.raises(nova_exception.NovaException, match="403"):
        drv.rebuild(context=ctx, instance=instance, image_meta=None, injected_files=[],
                    admin_password=None, allocations={}, bdms=[],
                    detach_block_devices=None, attach_block_devices=None)
    assert calls == []


def test_a_delete_undefines_without_keeping_the_tpm(tpm_instance, drv, calls):
    instance = tpm_instance(task_state=task_states.DELETING)
    drv._undefine_domain(instance)
    assert calls[0][2]["keep_vtpm"] is False


# ----------------------------------------------------------------------------- stop, delete


@pytest.mark.parametrize(("backup", "copied"), [("off", False), ("on-stop", True),
                                                ("periodic", True)])
def test_a_stop_copies_the_state_with_state_backup_on(
        tpm_instance, drv, dirs, store, flags, calls, xml, backup, copied):
    flags.config(group="vtpm", state_backup=backup)
    instance = tpm_instance(task_state=task_states.POWERING_OFF)
    make_state(dirs / "swtpm", instance.uuid)
    drv.power_off(instance)
    meta = store.get(instance.uuid)
    assert (meta is not None) is copied
    if copied:
        assert meta.reason == "stop" and not meta.shelved and not meta.server_running


def test_deleting_a_server_removes_its_copy(tpm_instance, drv, ctx, dirs, store, calls, log):
    instance = tpm_instance(task_state=task_states.DELETING)
    shelved_copy(dirs, instance, reason="stop", shelved=False)
    drv.destroy(ctx, instance, [])
    assert store.get(instance.uuid) is None
    assert [entry[0] for entry in log] == ["delete"]


# ----------------------------------------------------------------------------- rescue


def test_the_rescue_boot_gets_the_servers_vtpm_whatever_the_rescue_image(drv):
    instance = make_instance(make_flavor(), secret_uuid=str(uuid.uuid4()),
                             task_state=task_states.RESCUING, hw_tpm_version="2.0")
    guest = minimal_guest()
    drv._add_vtpm_device(guest, instance.flavor, instance, make_image())  # no TPM asked
    assert "<tpm" in guest.to_xml()


def test_rescue_and_unrescue_read_the_passphrase_first(tpm_instance, drv, ctx, calls, log):
    instance = tpm_instance()
    drv.rescue(ctx, instance, [], make_image(), "pw", None, None)
    drv.unrescue(ctx, instance)
    assert [entry[0] for entry in log] == ["get", "get"]
    assert [c[0] for c in calls] == ["rescue", "unrescue"]


def _context(user_id: str, project_id: str, *roles: str) -> nova_context.RequestContext:
    return nova_context.RequestContext(user_id=user_id, project_id=project_id,
                                       roles=list(roles), user_name=user_id)


def _rescue_image(image_id: str):
    image = make_image()
    image.id = image_id
    return image


OTHER_IMAGE = "0ddba11e-0000-4000-8000-000000000001"


@pytest.mark.parametrize("mode", ["host", "deployment"])
@pytest.mark.parametrize("caller", [_context("bob", "proj-a", "member"),
                                    _context("root", "proj-x", "admin")],
                         ids=["project-member", "admin-of-another-project"])
def test_a_non_owner_cannot_rescue_with_another_image_against_the_tpm(
        tpm_instance, drv, calls, mode, caller):
    """Issue 20 defect 9: in host and deployment mode no Barbican ACL stopped a member
    (or any project's admin) from booting their own rescue image with the owner's TPM."""
    instance = tpm_instance(mode)
    with pytest.raises(nova_exception.VTPMSecretForbidden, match="owner"):
        drv.rescue(caller, instance, [], _rescue_image(OTHER_IMAGE), "pw", None, None)
    assert calls == [], "Nova's rescue never ran"


@pytest.mark.parametrize("mode", ["host", "deployment"])
def test_a_member_may_rescue_with_the_servers_own_image_and_the_owner_with_any(
        tpm_instance, drv, calls, mode):
    instance = tpm_instance(mode)
    member = _context("bob", "proj-a", "member")
    drv.rescue(member, instance, [], _rescue_image(instance.image_ref), "pw", None, None)
    project_admin = _context("boss", "proj-a", "admin")
    drv.rescue(project_admin, instance, [], _rescue_image(OTHER_IMAGE), "pw", None, None)
    drv.rescue(_context("owner", "proj-a", "member"), instance, [],
               _rescue_image(OTHER_IMAGE), "pw", None, None)
    assert [c[0] for c in calls] == ["rescue", "rescue", "rescue"]


@pytest.mark.parametrize(("lives_on", "kept"), [("elsewhere", False), ("here", True)])
def test_nova_destroy_leaves_no_tpm_state_of_a_server_that_lives_elsewhere(
        tpm_instance, drv, ctx, dirs, calls, lives_on, kept):
    """An evacuation's source, back up, destroys its old copy of the server (shared disks)."""
    instance = tpm_instance()
    instance.host = "host-b" if lives_on == "elsewhere" else drv._vtpm_offhost.host
    make_state(dirs / "swtpm", instance.uuid)
    drv.destroy(ctx, instance, [], destroy_disks=False)
    assert [c[0] for c in calls] == ["destroy"]
    assert (dirs / "swtpm" / instance.uuid).is_dir() is kept
