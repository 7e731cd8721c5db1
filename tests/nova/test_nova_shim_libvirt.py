"""The Nova shim against the real libvirtd (functional): guest XML and the libvirt secret.

Nova's own ``_get_guest_config`` builds a whole guest from the host's real
capabilities, and the secret is defined in (and removed from) the real
daemon. Barbican is still a fake: these tests are about Nova + libvirt.
Needs ``libvirtd`` on ``qemu:///system`` (``tools/setup-host.sh``); without it
they fail, they are never skipped.
"""

from __future__ import annotations

import uuid

import nova.conf
import pytest
from nova.virt import fake as fake_virt
from nova.virt.libvirt import blockinfo

from nova.virt.vtpm.driver import VTPMLibvirtDriver
from tests.nova.nova_fakes import (
    PASSPHRASE,
    FakeKeyManager,
    FakeProbe,
    Flags,
    make_flavor,
    make_image,
    make_instance,
    nova_ctx,
)
from vtpm_driver.model import hostcheck, request
from vtpm_driver.virt import domain, secret
from vtpm_driver.virt.probe import LibvirtHostProbe

pytestmark = pytest.mark.functional

CONF = nova.conf.CONF


@pytest.fixture
def flags():
    overrides = Flags()
    overrides.config(group="libvirt", virt_type="qemu", swtpm_enabled=True,
                     connection_uri="qemu:///system")
    yield overrides
    overrides.clear()


@pytest.fixture
def log() -> list:
    return []


def real_driver(read_only: bool, log: list, tmp_path) -> VTPMLibvirtDriver:
    CONF.set_override("instances_path", str(tmp_path))
    return VTPMLibvirtDriver(fake_virt.FakeVirtAPI(), read_only,
                             key_manager=FakeKeyManager(log), host_probe=FakeProbe())


@pytest.fixture
def cleanup_instances_path():
    yield
    CONF.clear_override("instances_path")


@pytest.mark.parametrize(("specs", "version", "model"), [
    ({"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"}, "2.0", "tpm-crb"),
    ({"hw:tpm_version": "1.2"}, "1.2", "tpm-tis"),
])
def test_novas_guest_config_carries_our_tpm(flags, log, tmp_path, cleanup_instances_path,
                                            specs, version, model):
    drv = real_driver(True, log, tmp_path)
    secret_uuid = str(uuid.uuid4())
    instance = make_instance(make_flavor(**specs), secret_uuid)
    image_meta = make_image()
    disk_info = blockinfo.get_disk_info(CONF.libvirt.virt_type, instance, image_meta)
    xml = drv._get_guest_config(instance, [], image_meta, disk_info).to_xml()
    assert domain.get_tpm(xml) == domain.TPMDevice(version, model, secret_uuid)
    assert xml.count("<tpm ") == 1
    assert log == []  # building XML needs no passphrase


def test_novas_guest_config_without_vtpm_has_no_tpm(flags, log, tmp_path,
                                                    cleanup_instances_path):
    drv = real_driver(True, log, tmp_path)
    instance = make_instance(make_flavor())
    disk_info = blockinfo.get_disk_info(CONF.libvirt.virt_type, instance, make_image())
    xml = drv._get_guest_config(instance, [], make_image(), disk_info).to_xml()
    assert domain.get_tpm(xml) is None


@pytest.mark.parametrize(("mode", "persistent"), [(request.SECRET_USER, False),
                                                  (request.SECRET_HOST, True)])
def test_libvirt_secret_is_defined_and_removed_through_our_package(
        flags, log, tmp_path, cleanup_instances_path, mode, persistent):
    drv = real_driver(False, log, tmp_path)
    instance = make_instance(make_flavor(**{"hw:tpm_version": "2.0",
                                            "hw:tpm_secret_security": mode}))
    conn = drv._host.get_connection()
    try:
        handle, got_mode = drv._get_or_create_secret_for_vtpm(nova_ctx(), instance)
        secret_uuid = instance.system_metadata["vtpm_secret_uuid"]
        assert (got_mode, handle.UUIDString()) == (mode, secret_uuid)
        listed = {info.uuid: info for info in secret.list_vtpm_secrets(conn)}
        assert listed[secret_uuid] == secret.VTPMSecretInfo(
            secret_uuid, instance.uuid, ephemeral=not persistent, private=not persistent)
        if persistent:
            # Nova's own object, as Nova's driver returns it (Nova never undefines it).
            assert conn.secretLookupByUUIDString(secret_uuid).value() == PASSPHRASE.encode()
            assert drv.vtpm_secrets.undefine(secret_uuid) is True
            assert secret.lookup_vtpm_secret(conn, secret_uuid) is None
            assert drv.vtpm_secrets.undefine(secret_uuid) is False  # idempotent
        else:
            handle.undefine()  # what Nova's _create_guest calls after the start
            assert secret.lookup_vtpm_secret(conn, secret_uuid) is None
            handle.undefine()  # idempotent
    finally:
        leftover = secret.lookup_vtpm_secret_by_instance(conn, instance.uuid)
        if leftover is not None:
            leftover.undefine()


def test_host_check_and_traits_through_novas_own_connection(flags, log, tmp_path,
                                                             cleanup_instances_path):
    """No injected probe: the driver reads the host through Nova's libvirt connection."""
    CONF.set_override("instances_path", str(tmp_path))
    drv = VTPMLibvirtDriver(fake_virt.FakeVirtAPI(), False, key_manager=FakeKeyManager(log))
    drv._check_vtpm_support()  # this host is set up for vTPM (tools/setup-host.sh)
    traits = drv._get_tpm_traits()
    with LibvirtHostProbe.from_conf(CONF) as own_probe:
        expected = hostcheck.check_host(CONF, own_probe)
    assert expected.supported, expected.problems
    assert traits == {trait: expected.traits[trait] for trait in request.STANDARD_TRAITS}
    assert all(expected.traits[trait] for trait in request.PCR_BANK_TRAITS.values())
    assert traits[request.TRAIT_TPM_2_0] and traits[request.TRAIT_TPM_TIS]
    # Nova's connection is still open and usable afterwards.
    assert drv._host.get_connection().getLibVersion() > 0
