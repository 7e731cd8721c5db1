"""The shim uses an owner's consent (vtpm_driver.model.consent) only for what it covers.

A ``user``-mode server's passphrase is the owner's alone. Nova's restart after a
host reboot (``resume_state_on_host_boot``, no user's token), an admin's hard
reboot, an admin's live and cold migration and evacuation read it with the
owner's consent to that operation, named in the server's metadata; without one they are refused as
before, the guest untouched.
"""

from __future__ import annotations

import contextlib
import datetime
import uuid

import pytest
from nova import context as nova_context
from nova import exception as nova_exception
from nova.compute import utils as compute_utils
from nova.virt.libvirt import driver as libvirt_driver

from nova.virt.vtpm import offhost as vtpm_offhost
from tests.nova.nova_fakes import make_instance, nova_ctx
from vtpm_driver.model import consent


def admin_ctx() -> nova_context.RequestContext:
    return nova_context.RequestContext(user_id="admin", project_id="proj-admin",
                                       auth_token="tok-admin", roles=["admin"],
                                       user_name="admin", project_name="admin")


def consent_to(keymgr, instance, *operations: str, hours: int = 1) -> str:
    record_id = str(uuid.uuid4())
    keymgr.consents[record_id] = consent.Consent(
        record_id=record_id, server=instance.uuid, owner=instance.user_id,
        operations=frozenset(operations),
        expires_at=datetime.datetime.now(datetime.UTC) + datetime.timedelta(
            hours=hours),
        credential_id="cred", credential_secret="cred-secret")
    instance.metadata = {consent.METADATA_KEY: record_id}
    return record_id


@pytest.fixture
def started(drv, keymgr, log, monkeypatch):
    """A user-mode server with its secret; Nova's hard reboot recorded, not run."""
    instance = make_instance()
    keymgr.create_vtpm_secret(nova_ctx(), instance, "user")
    keymgr.owner_only = True  # as Barbican's owner-only ACL
    log.clear()

    def nova_hard_reboot(self, context, instance, *args, **kwargs):
        log.append(("nova_hard_reboot", None, instance.uuid, None))
        self._create_guest(context, "<domain/>", instance)

    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "_hard_reboot", nova_hard_reboot)
    monkeypatch.setattr(drv._host, "get_guest", lambda inst: pytest.fail("asked libvirt"),
                        raising=False)
    return instance


def restart_on_host_boot(drv, instance, monkeypatch):
    # Nova's resume_state_on_host_boot: the guest is not running, so a hard reboot.
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "resume_state_on_host_boot",
                        lambda self, context, inst, *a, **k: self._hard_reboot(
                            context, inst, [], None))
    drv.resume_state_on_host_boot(nova_context.get_admin_context(), instance, [], None)


def test_a_restart_after_a_host_reboot_uses_the_owners_consent(
        drv, keymgr, log, started, monkeypatch):
    record_id = consent_to(keymgr, started, consent.RESTART_ON_HOST_BOOT)
    restart_on_host_boot(drv, started, monkeypatch)
    assert [entry[0] for entry in log] == ["consent", "get", "nova_hard_reboot"]
    assert log[0][3] == record_id
    assert log[1][1].auth_token == "tok-by-consent"


@pytest.mark.parametrize("case", ["none", "another operation", "expired"])
def test_without_that_consent_the_restart_is_refused_before_the_guest_is_touched(
        drv, keymgr, log, started, monkeypatch, case):
    if case != "none":
        consent_to(keymgr, started, consent.HARD_REBOOT if case == "another operation"
                   else consent.RESTART_ON_HOST_BOOT, hours=-1 if case == "expired" else 1)
    faults: list = []
    monkeypatch.setattr(compute_utils, "add_instance_fault_from_exc",
                        lambda context, instance, exc, *a, **k: faults.append(str(exc)))
    with pytest.raises(nova_exception.VTPMSecretForbidden) as info:
        restart_on_host_boot(drv, started, monkeypatch)
    assert faults == [str(info.value)]  # what `openstack server show` says
    assert consent.RESTART_ON_HOST_BOOT in faults[0] and "TPM untouched" in faults[0]
    assert "nova_hard_reboot" not in [entry[0] for entry in log]
    assert "consent" not in [entry[0] for entry in log]
    assert drv._vtpm_operations == {}


def test_an_admins_hard_reboot_uses_a_consent_to_hard_reboot_only(
        drv, keymgr, log, started):
    consent_to(keymgr, started, consent.RESTART_ON_HOST_BOOT)
    with pytest.raises(nova_exception.NovaException):
        drv.reboot(admin_ctx(), started, [], "HARD")
    assert "nova_hard_reboot" not in [entry[0] for entry in log]
    consent_to(keymgr, started, consent.HARD_REBOOT)
    drv.reboot(admin_ctx(), started, [], "HARD")
    assert [entry[0] for entry in log][-3:] == ["consent", "get", "nova_hard_reboot"]


def test_an_admins_live_migration_passes_the_source_check_only_with_consent(
        drv, keymgr, started, monkeypatch):
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "check_can_live_migrate_source",
                        lambda self, *a, **k: "checked")
    with pytest.raises(nova_exception.NovaException, match="only its owner"):
        drv.check_can_live_migrate_source(admin_ctx(), started, None)
    consent_to(keymgr, started, consent.EVACUATION)
    with pytest.raises(nova_exception.NovaException, match="only its owner"):
        drv.check_can_live_migrate_source(admin_ctx(), started, None)
    consent_to(keymgr, started, consent.LIVE_MIGRATION)
    assert drv.check_can_live_migrate_source(admin_ctx(), started, None) == "checked"


def test_an_admins_cold_migration_is_refused_on_the_source_without_consent(
        drv, keymgr, started, monkeypatch):
    moved: list[str] = []
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "migrate_disk_and_power_off",
                        lambda self, context, instance, *a, **k: moved.append(instance.uuid))
    consent_to(keymgr, started, consent.LIVE_MIGRATION)
    with pytest.raises(nova_exception.InstanceFaultRollback) as info:
        drv.migrate_disk_and_power_off(admin_ctx(), started, "host-b", started.flavor, [])
    # Nova puts the server back as it was and records the inner refusal
    assert isinstance(info.value.inner_exception, nova_exception.MigrationPreCheckError)
    assert "only its owner" in str(info.value.inner_exception)
    assert moved == []
    consent_to(keymgr, started, consent.COLD_MIGRATION)
    drv.migrate_disk_and_power_off(admin_ctx(), started, "host-b", started.flavor, [])
    assert moved == [started.uuid]


def test_a_cold_migrations_destination_reads_the_passphrase_by_consent(
        drv, keymgr, log, started, monkeypatch):
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "finish_migration",
                        lambda self, context, migration, instance, *a, **k: log.append(
                            ("nova_finish_migration", None, instance.uuid, None)))
    monkeypatch.setattr(drv, "_vtpm_check_live", lambda *a, **k: None)
    record_id = consent_to(keymgr, started, consent.COLD_MIGRATION)
    drv.finish_migration(admin_ctx(), None, started, None, [], started.image_meta, False,
                         None)
    assert [entry[0] for entry in log][-3:] == ["consent", "get", "nova_finish_migration"]
    assert log[-3][3] == record_id


class _CopyAt:
    """An off-host copy to evacuate from, as far as the shim's checks go."""

    check_caller = staticmethod(vtpm_offhost.OffHost.check_caller)

    def __init__(self, state_base) -> None:
        self.state_base = state_base

    def check_evacuation(self, instance):
        return "copy of 1 min ago"

    def remove_overtaken(self, instance):
        pass

    def spawning(self, instance, unshelving):
        return contextlib.nullcontext()

    def started(self, instance):
        pass


@pytest.mark.parametrize("granted", [None, consent.LIVE_MIGRATION, consent.EVACUATION])
def test_an_admins_evacuation_restores_the_tpm_by_consent_only(
        drv, keymgr, log, started, monkeypatch, granted):
    monkeypatch.setattr(drv, "_vtpm_offhost", _CopyAt(drv._vtpm_offhost.state_base))
    monkeypatch.setattr(drv, "_vtpm_check_live", lambda *a, **k: None)
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "rebuild",  # Nova's: destroy + spawn
                        lambda self, context, instance, image_meta, *a, **k: self.spawn(
                            context, instance, image_meta, [], None, None))
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "spawn",
                        lambda self, context, instance, *a, **k: log.append(
                            ("nova_spawn", None, instance.uuid, None)))
    if granted:
        consent_to(keymgr, started, granted)
    evacuate = lambda: drv.rebuild(admin_ctx(), started, started.image_meta, [], None,  # noqa: E731
                                   None, [], None, None, evacuate=True)
    if granted != consent.EVACUATION:
        with pytest.raises(nova_exception.Forbidden, match="only its owner"):
            evacuate()
        assert "nova_spawn" not in [entry[0] for entry in log]
    else:
        evacuate()
        assert [entry[0] for entry in log][-1] == "nova_spawn"
        assert "get" in [entry[0] for entry in log]
    assert drv._vtpm_operations == {}
