"""Where Nova's own unit tests reach into the driver, the shim answers as Nova's driver does.

Each test here pins one seam that Nova's ``test_driver.py`` (run by
``tools/nova-vtpm-suite.sh``) relies on: Nova's start-up sentences, Nova's
``hardware.get_vtpm_constraint`` deciding whether a guest has a vTPM, how
secrets are handed to ``Host.create_secret``, and ``nova.crypto``'s save of a
new secret.
"""

from __future__ import annotations

import inspect
import uuid
from typing import Any
from unittest import mock

import pytest
from nova import exception as nova_exception
from nova import objects
from nova.tests import fixtures as nova_fixtures  # noqa: F401 - registers Nova's test opts
from nova.virt import fake as fake_virt
from nova.virt import hardware
from nova.virt.libvirt import driver as libvirt_driver

from nova.virt.vtpm import host as shim_host
from nova.virt.vtpm import keymgr as shim_keymgr
from nova.virt.vtpm import migrate as shim_migrate
from nova.virt.vtpm import translate
from nova.virt.vtpm.driver import VTPMLibvirtDriver
from tests.nova.nova_fakes import (
    CONF,
    PASSPHRASE,
    FakeKeyManager,
    FakeLibvirt,
    FakeProbe,
    make_flavor,
    make_image,
    make_instance,
    nova_ctx,
)
from vtpm_driver.model import request


@pytest.fixture
def drv(flags, monkeypatch):
    conn = FakeLibvirt()
    driver = VTPMLibvirtDriver(fake_virt.FakeVirtAPI(), host_probe=FakeProbe(),
                               key_manager=FakeKeyManager([]))
    monkeypatch.setattr(driver._host, "get_connection", lambda: conn)
    driver.conn = conn
    return driver


# ------------------------------------------------------------ start-up refusal


@pytest.mark.parametrize(("probe", "options", "novas"), [
    (FakeProbe(), {"virt_type": "lxc"},
     "vTPM support requires '[libvirt] virt_type' of 'qemu' or 'kvm'; found 'lxc'."),
    (FakeProbe(domcaps="domcaps-no-tpm.xml"), {},
     "vTPM support is configured but it's not supported by libvirt."),
    (FakeProbe(), {"swtpm_user": "lionel", "swtpm_group": "admins"},
     "The user configured in '[libvirt] swtpm_user' does not exist on this host; "
     "expected 'lionel'."),
    (FakeProbe(), {"swtpm_group": "admins"},
     "The group configured in '[libvirt] swtpm_group' does not exist on this host; "
     "expected 'admins'."),
])
def test_refusal_starts_with_novas_sentence_then_lists_every_problem(
        flags, monkeypatch, probe, options, novas):
    flags.config(group="libvirt", **options)
    monkeypatch.setattr(probe, "binaries", ())  # a problem Nova does not check, listed too
    driver = VTPMLibvirtDriver(fake_virt.FakeVirtAPI(), host_probe=probe)
    monkeypatch.setattr(driver._host, "get_connection", lambda: FakeLibvirt())
    with pytest.raises(nova_exception.InvalidConfiguration) as info:
        driver._check_vtpm_support()
    message = str(info.value)
    assert message.startswith(novas + " [libvirt] swtpm_enabled is True")
    assert "swtpm not found in PATH" in message


def test_refusal_without_a_problem_nova_checks_has_no_nova_sentence():
    conf = mock.Mock()
    message = translate.startup_refusal(["swtpm not found in PATH: install it"], conf)
    assert message.startswith("[libvirt] swtpm_enabled is True but this host cannot")


# ------------------------------------------------- hardware.get_vtpm_constraint


def test_novas_libvirt_driver_module_is_left_as_nova_ships_it(drv):
    assert libvirt_driver.hardware is hardware


def test_the_guests_vtpm_is_the_one_novas_get_vtpm_constraint_names(drv):
    flavor = make_flavor(**{"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb",
                            "hw:tpm_secret_security": "host"})
    config = translate.vtpm_config(flavor, make_image())
    assert (config.version, config.model, config.secret_security) == (
        "2.0", "tpm-crb", request.SECRET_HOST)
    with mock.patch.object(hardware, "get_vtpm_constraint", return_value=None) as asked:
        assert translate.vtpm_config(flavor, make_image()) is None  # Nova says none
    asked.assert_called_once_with(flavor, mock.ANY)


def test_an_invalid_request_is_refused_with_novas_exceptions(drv):
    with pytest.raises(nova_exception.Invalid, match="CRB"):
        translate.vtpm_config(
            make_flavor(**{"hw:tpm_version": "1.2", "hw:tpm_model": "tpm-crb"}), make_image())
    with pytest.raises(nova_exception.Invalid, match="hw:tpm_secret_security='everyone'"):
        translate.vtpm_config(make_flavor(**{"hw:tpm_version": "2.0",
                                             "hw:tpm_secret_security": "everyone"}),
                              make_image())


# ----------------------------------------------------- secrets through Host


class _RecordingHost:
    def __init__(self) -> None:
        self.created: list[tuple[tuple, dict]] = []
        self.secret = mock.Mock()

    def create_secret(self, *args: Any, **kwargs: Any) -> Any:
        self.created.append((args, kwargs))
        return self.secret

    def find_secret(self, usage_type: str, usage_id: str) -> Any:
        return self.secret if self.created and not self.secret.undefine.called else None


@pytest.mark.parametrize(("persistent", "extra"), [
    (False, {}), (True, {"ephemeral": False, "private": False})])
def test_secrets_are_defined_as_novas_driver_defines_them(persistent, extra):
    host = _RecordingHost()
    store = shim_host.NovaSecretStore(host)
    secret_uuid, instance_uuid = str(uuid.uuid4()), str(uuid.uuid4())
    host.secret.UUIDString.return_value = secret_uuid
    store.define(secret_uuid, instance_uuid, PASSPHRASE, persistent=persistent)
    assert host.created == [(("vtpm", instance_uuid),
                             {"password": PASSPHRASE.encode(), "uuid": secret_uuid, **extra})]
    assert store.libvirt_secret(secret_uuid) is host.secret
    assert store.undefine(secret_uuid) is True
    host.secret.undefine.assert_called_once_with()
    assert store.undefine(secret_uuid) is False
    assert store.libvirt_secret(secret_uuid) is None


def test_undefining_a_secret_gone_or_replaced_elsewhere_leaves_it_alone(drv):
    instance = make_instance()
    secret_uuid, other = str(uuid.uuid4()), str(uuid.uuid4())
    drv.vtpm_secrets.define(secret_uuid, instance.uuid, PASSPHRASE, persistent=False)
    drv.conn.secrets.clear()  # undefined behind the store's back ...
    drv.conn.secretDefineXML(  # ... and another one defined for the same server
        f"<secret ephemeral='yes' private='yes'><uuid>{other}</uuid>"
        f"<usage type='vtpm'><name>{instance.uuid}</name></usage></secret>")
    assert drv.vtpm_secrets.undefine(secret_uuid) is False
    assert list(drv.conn.secrets) == [other]


def test_host_mode_hands_nova_the_libvirt_secret_other_modes_our_handle(drv):
    host_mode = make_instance(make_flavor(**{"hw:tpm_version": "2.0",
                                             "hw:tpm_secret_security": "host"}))
    handle, mode = drv._get_or_create_secret_for_vtpm(nova_ctx(), host_mode)
    assert mode == request.SECRET_HOST
    assert handle is drv.vtpm_secrets.libvirt_secret(
        host_mode.system_metadata["vtpm_secret_uuid"])
    user_mode = make_instance()
    handle, mode = drv._get_or_create_secret_for_vtpm(nova_ctx(), user_mode)
    assert mode == request.SECRET_USER
    handle.undefine()  # Nova's _create_guest after the start: the core's after_start
    assert user_mode.system_metadata["vtpm_secret_uuid"] not in drv.conn.secrets


def test_nova_asking_for_a_secret_gets_one_in_the_flavors_mode(drv):
    """Nova calls it once its get_vtpm_constraint said "vTPM"; only the mode matters here."""
    instance = make_instance(make_flavor(**{"hw:tpm_secret_security": "host"}))
    handle, mode = drv._get_or_create_secret_for_vtpm(nova_ctx(), instance)
    assert mode == request.SECRET_HOST
    assert handle is not None


# ------------------------------------------------------ saving a new secret


def test_our_barbican_saves_the_instance_when_it_records_a_new_secret():
    km = shim_keymgr.OwnerOnlyBarbican(FakeKeyManager([]))
    instance = make_instance()
    km.ensure_vtpm_secret(nova_ctx(), instance, request.SECRET_USER)
    assert instance.saved == 1
    km.ensure_vtpm_secret(nova_ctx(), instance, request.SECRET_USER)  # read: nothing new
    assert instance.saved == 1
    km.create_vtpm_secret(nova_ctx(), make_instance(), request.SECRET_USER)


def test_conf_is_novas():
    assert CONF is libvirt_driver.CONF


# --------------------------------------- arguments and fields, as Nova's driver


def _nova_records(monkeypatch, name: str) -> list:
    """Nova's ``LibvirtDriver.<name>`` replaced by a recorder of how it was called."""
    calls: list = []
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, name,
                        lambda self, *args, **kwargs: calls.append((args, kwargs)))
    return calls


def _orphan() -> Any:
    """An Instance with only what Nova's driver reads on the paths below (any other
    field raises OrphanedObjectError, as in Nova's own tests)."""
    return objects.Instance(id=1, uuid=str(uuid.uuid4()), host="elsewhere")


def test_destroy_has_novas_signature_and_passes_the_call_on_as_it_came(drv, monkeypatch):
    assert inspect.signature(VTPMLibvirtDriver.destroy) == inspect.signature(
        libvirt_driver.LibvirtDriver.destroy)
    calls = _nova_records(monkeypatch, "destroy")
    ctx, instance = nova_ctx(), _orphan()
    drv.destroy(ctx, instance, [], destroy_disks=False, block_device_info=None,
                destroy_secrets=False)  # as Nova's _hard_reboot calls it
    drv.destroy(ctx, instance, [], None, False)  # as the compute manager does
    assert calls == [((ctx, instance, []), {"destroy_disks": False, "block_device_info": None,
                                            "destroy_secrets": False}),
                     ((ctx, instance, [], None, False), {})]


def test_live_migration_cleanups_follow_novas_migrate_data(drv, monkeypatch):
    forgotten: list = []
    monkeypatch.setattr(shim_migrate, "forget_source", lambda i, s: forgotten.append("src"))
    monkeypatch.setattr(shim_migrate, "forget_destination",
                        lambda i, s: forgotten.append("dst"))
    _nova_records(monkeypatch, "post_live_migration")
    _nova_records(monkeypatch, "rollback_live_migration_at_destination")
    _nova_records(monkeypatch, "post_live_migration_at_destination")
    no_vtpm = objects.LibvirtLiveMigrateData()
    drv.post_live_migration(nova_ctx(), {"id": "a dict"}, None, no_vtpm)
    drv.rollback_live_migration_at_destination(nova_ctx(), _orphan(), [], None, True, no_vtpm)
    drv.post_live_migration_at_destination(nova_ctx(), _orphan(), [])
    assert forgotten == []
    vtpm = objects.LibvirtLiveMigrateData(vtpm_secret_uuid=str(uuid.uuid4()),
                                          vtpm_secret_value=None)
    assert vtpm.has_vtpm  # Nova's own test in both methods
    drv.post_live_migration(nova_ctx(), make_instance(), None, vtpm)
    drv.rollback_live_migration_at_destination(nova_ctx(), make_instance(), [], None, True,
                                               vtpm)
    assert forgotten == ["src", "dst"]


def test_start_up_with_swtpm_disabled_probes_nothing(drv, flags):
    class Unreachable(FakeProbe):
        def versions(self) -> dict[str, str]:
            raise AssertionError("libvirt was probed")

    flags.config(group="libvirt", swtpm_enabled=False)
    drv._vtpm_probe = Unreachable()
    drv._check_vtpm_support()  # Nova's first check: nothing else asked
