"""The Nova shim in-process, with the real nova 34 wheel (no services needed).

Nova's own code runs wherever it can: its driver loader, ``_create_guest``,
``power_on``, the compute manager's ``nova.vtpm.delete_secret`` and the API's
error translation. libvirt is a fake connection with libvirt's secret rules
(``tests/fakes/libvirt.py``), Barbican a fake KeyManager, and castellan is
booby-trapped (conftest.py) so that any use of it fails the test.
"""

from __future__ import annotations

import uuid
from unittest import mock

import libvirt
import nova.conf
import pytest
from lxml import etree
from nova import context as nova_context
from nova import exception as nova_exception
from nova import version as nova_version
from nova import vtpm as nova_vtpm
from nova.api.openstack import api_version_request, wsgi
from nova.compute import api as compute_api
from nova.compute import provider_tree, task_states, vm_states
from nova.virt import driver as virt_driver
from nova.virt import fake as fake_virt
from nova.virt import hardware
from nova.virt.libvirt import config as vconfig
from nova.virt.libvirt import driver as libvirt_driver
from oslo_config import cfg

import nova.virt.vtpm
from nova.virt.vtpm import release, translate
from nova.virt.vtpm.driver import VTPMLibvirtDriver
from tests.nova.nova_fakes import (
    CONF,
    PASSPHRASE,
    TOKEN,
    FakeProbe,
    make_flavor,
    make_image,
    make_instance,
    minimal_guest,
)
from vtpm_driver import conf as vtpm_conf
from vtpm_driver import exception
from vtpm_driver.keymgr import context as vtpm_context
from vtpm_driver.model import hostcheck, request
from vtpm_driver.virt import domain, secret

# --------------------------------------------------------------------------- fixtures


def operations(log: list) -> list[str]:
    return [entry[0] for entry in log]


# --------------------------------------------------------------------------- loading


def test_nova_loads_the_driver_from_compute_driver(flags):
    flags.config(compute_driver="vtpm.VTPMLibvirtDriver")
    loaded = virt_driver.load_compute_driver(fake_virt.FakeVirtAPI())
    assert type(loaded) is VTPMLibvirtDriver
    assert isinstance(loaded, libvirt_driver.LibvirtDriver)
    assert nova.virt.vtpm.VTPMLibvirtDriver is VTPMLibvirtDriver
    assert libvirt_driver.hardware is hardware  # no Nova module is patched


@pytest.mark.parametrize("found", ["33.1.0", "35.0.0", "2026.2", "unknown", ""])
def test_another_nova_release_is_refused_with_the_supported_one_named(
        flags, monkeypatch, found):
    monkeypatch.setattr(nova_version, "version_string", lambda: found)
    with pytest.raises(release.UnsupportedNovaRelease) as info:
        VTPMLibvirtDriver(fake_virt.FakeVirtAPI())
    message = str(info.value)
    assert "nova 34.x" in message
    assert "nova==34.*" in message
    assert repr(found) in message


def test_another_nova_release_stops_nova_compute_at_driver_load(flags, monkeypatch):
    """Nova's loader turns the ImportError subclass into 'Unable to load' + exit(1)."""
    monkeypatch.setattr(nova_version, "version_string", lambda: "33.0.0")
    flags.config(compute_driver="vtpm.VTPMLibvirtDriver")
    with pytest.raises(SystemExit) as info:
        virt_driver.load_compute_driver(fake_virt.FakeVirtAPI())
    assert info.value.code == 1


@pytest.mark.parametrize("found", ["34.0.0", "34.1.2", "34.0.1.dev7"])
def test_nova_34_releases_are_accepted(found):
    assert release.check_nova_release(found) == found


def test_the_installed_nova_is_the_supported_release():
    assert release.check_nova_release() == nova_version.version_string()


# --------------------------------------------------------------------------- options


def test_options_coexist_with_novas_in_one_conf(drv, flags):
    libvirt_group = CONF._groups["libvirt"]
    # Nova's own [libvirt] option objects stay (its help text, its choices).
    for name in ("virt_type", "connection_uri", "swtpm_enabled", "swtpm_user", "swtpm_group",
                 "supported_tpm_secret_security"):
        registered = libvirt_group._opts[name]["opt"]
        assert any(registered is o for o in nova.conf.libvirt.ALL_OPTS), name
        ours = {o.name: o for o in vtpm_conf.libvirt_opts}[name]
        assert (type(registered), registered.default) == (type(ours), ours.default), name
    # Ours are there and readable; Nova's values are what our package reads.
    flags.config(group="key_manager", barbican_endpoint="http://127.0.0.1:9311", timeout=3.5)
    flags.config(group="vtpm", owner_only_acl=False)
    flags.config(group="libvirt", supported_tpm_secret_security=["user", "host"])
    assert CONF.key_manager.barbican_endpoint == "http://127.0.0.1:9311"
    assert CONF.key_manager.timeout == 3.5
    assert CONF.vtpm.owner_only_acl is False
    assert CONF.key_manager.backend == "barbican"  # castellan's, untouched
    report = hostcheck.check_host(CONF, FakeProbe())
    assert report.traits[request.TRAIT_SECRET_DEPLOYMENT] is False
    assert report.traits[request.TRAIT_SECRET_HOST] is True
    # Registering again (a second driver, KeyManager(CONF)) is harmless.
    vtpm_conf.register_opts(CONF)
    VTPMLibvirtDriver(fake_virt.FakeVirtAPI())


def test_options_coexist_with_castellan_and_a_nova_conf_file(tmp_path):
    """A fresh ConfigOpts as nova-compute builds it: Nova's, castellan's, then ours."""
    from castellan import options as castellan_options
    from castellan.common import utils as castellan_utils

    conf = cfg.ConfigOpts()
    nova.conf.libvirt.register_opts(conf)
    nova.conf.key_manager.register_opts(conf)
    castellan_options.set_defaults(conf, backend="barbican")
    conf.register_opts(castellan_utils.credential_opts, group="key_manager")
    vtpm_conf.register_opts(conf)
    vtpm_conf.register_opts(conf)
    path = tmp_path / "nova.conf"
    path.write_text(
        "[libvirt]\nvirt_type = qemu\nswtpm_enabled = True\nswtpm_user = tss\n"
        "[key_manager]\nbackend = barbican\nbarbican_endpoint = http://127.0.0.1:9311\n"
        "barbican_endpoint_type = internal\ntimeout = 4\nauth_type = token\n"
        "[barbican]\nbarbican_endpoint = http://192.0.2.1:9311\n"
        "[vtpm]\nowner_only_acl = True\n")
    conf(["--config-file", str(path)], project="nova")
    assert conf.libvirt.swtpm_enabled is True
    assert conf.libvirt.virt_type == "qemu"
    assert conf.key_manager.barbican_endpoint == "http://127.0.0.1:9311"
    assert conf.key_manager.barbican_endpoint_type == "internal"
    assert conf.key_manager.timeout == 4.0
    assert conf.key_manager.auth_type == "token"  # castellan's option, same group
    assert conf.barbican.barbican_endpoint == "http://192.0.2.1:9311"  # castellan's, apart
    assert conf.vtpm.owner_only_acl is True
    assert vtpm_conf.libvirt_uri(conf) == "qemu:///system"


# --------------------------------------------------------------------------- host


@pytest.mark.parametrize("domcaps", ["domcaps-qemu-host.xml", "domcaps-only-2.0.xml",
                                     "domcaps-only-tis.xml", "domcaps-no-versions.xml"])
def test_traits_are_vtpm_driver_hosts(drv, domcaps):
    probe = FakeProbe(domcaps=domcaps)
    drv._vtpm_probe = probe
    drv._vtpm_report = None
    traits = drv._get_tpm_traits()
    report = hostcheck.check_host(CONF, probe).traits
    assert traits == {trait: report[trait] for trait in request.STANDARD_TRAITS}
    assert set(traits) == set(request.STANDARD_TRAITS)  # custom ones: update_provider_tree


def test_traits_only_2_0_host(drv):
    drv._vtpm_probe = FakeProbe(domcaps="domcaps-only-2.0.xml")
    drv._check_vtpm_support()
    traits = drv._get_tpm_traits()
    assert traits[request.TRAIT_TPM_2_0] is True
    assert traits[request.TRAIT_TPM_1_2] is False


def test_swtpm_disabled_reports_every_tpm_trait_false(drv, flags):
    flags.config(group="libvirt", swtpm_enabled=False)
    drv._check_vtpm_support()  # nothing to refuse
    assert drv._get_tpm_traits() == dict.fromkeys(request.STANDARD_TRAITS, False)


@pytest.mark.parametrize(("domcaps", "ours"), [("domcaps-qemu-host.xml", True),
                                              ("domcaps-no-tpm.xml", False)])
def test_our_trait_marks_a_node_that_runs_vtpm_guests(drv, monkeypatch, domcaps, ours):
    """``CUSTOM_VTPM_DRIVER`` (the nova-api component asks for it) and the PCR bank
    traits on top of Nova's; removed again when the host can no longer run vTPM guests."""
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "update_provider_tree",
                        lambda self, tree, nodename, allocations=None:
                        tree.add_traits(nodename, "COMPUTE_NET_VIF_MODEL_VIRTIO"))
    drv._vtpm_probe = FakeProbe(domcaps=domcaps)
    drv._vtpm_report = None
    tree = provider_tree.ProviderTree()
    tree.new_root("node", str(uuid.uuid4()))
    tree.add_traits("node", release.DRIVER_TRAIT, "CUSTOM_VTPM_PCR_BANK_SHA1")  # reported before
    drv.update_provider_tree(tree, "node")
    expected = {"COMPUTE_NET_VIF_MODEL_VIRTIO"} | (
        {release.DRIVER_TRAIT, *request.PCR_BANK_TRAITS.values()} if ours else set())
    assert tree.data("node").traits == expected


def test_start_up_refuses_a_host_that_cannot_deliver_listing_every_problem(drv):
    drv._vtpm_probe = FakeProbe(domcaps="domcaps-no-tpm.xml", binaries=("swtpm",))
    with pytest.raises(nova_exception.InvalidConfiguration) as info:
        drv._check_vtpm_support()
    message = str(info.value)
    assert "swtpm_setup not found" in message
    assert "swtpm_ioctl not found" in message
    assert "TPM" in message and "swtpm_enabled = False" in message
    assert drv._get_tpm_traits() == dict.fromkeys(request.STANDARD_TRAITS, False)


def test_start_up_refuses_an_unsupported_virt_type(drv, flags):
    flags.config(group="libvirt", virt_type="lxc")
    with pytest.raises(nova_exception.InvalidConfiguration, match="virt_type is 'lxc'"):
        drv._check_vtpm_support()


def test_start_up_refuses_vtpm_servers_when_swtpm_is_disabled(drv, flags):
    """Nova's _validate_vtpm_configuration, answering through our spec (SPEC C4)."""
    flags.config(group="libvirt", swtpm_enabled=False)
    plain, with_vtpm = make_instance(make_flavor()), make_instance()
    drv._validate_vtpm_configuration([plain])
    with pytest.raises(nova_exception.InvalidConfiguration, match="vTPM"):
        drv._validate_vtpm_configuration([plain, with_vtpm])


# --------------------------------------------------------------------------- validation

VALID = [
    ({}, {}),
    ({"hw:tpm_version": "2.0"}, {}),
    ({}, {"hw_tpm_version": "1.2"}),
    ({"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"}, {}),
    ({"hw:tpm_version": "2.0"}, {"hw_tpm_model": "tpm-crb"}),
    ({"hw:tpm_version": "2.0"}, {"hw_tpm_version": "2.0"}),
    ({"hw:tpm_model": "tpm-crb"}, {}),  # no version: no vTPM at all
]


@pytest.mark.parametrize(("specs", "props"), VALID)
def test_valid_requests_get_novas_answer(drv, specs, props):
    flavor, image = make_flavor(**specs), make_image(**props)
    ours = translate.vtpm_config(flavor, image)
    novas = hardware.get_vtpm_constraint(flavor, image)
    assert (None if ours is None else (ours.version, ours.model)) == (
        None if novas is None else tuple(novas))


INVALID = [
    ({"hw:tpm_version": "2.0"}, {"hw_tpm_version": "1.2"}, nova_exception.FlavorImageConflict),
    ({"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-tis"}, {"hw_tpm_model": "tpm-crb"},
     nova_exception.FlavorImageConflict),
    ({"hw:tpm_version": "3.0"}, {}, nova_exception.Invalid),
    ({"hw:tpm_version": "1.2", "hw:tpm_model": "tpm-crb"}, {}, nova_exception.Invalid),
    ({"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-spapr"}, {}, nova_exception.Invalid),
]


@pytest.mark.parametrize(("specs", "props", "error"), INVALID)
def test_invalid_requests_are_refused_as_nova_refuses_them(drv, specs, props, error):
    flavor, image = make_flavor(**specs), make_image(**props)
    with pytest.raises(error):
        translate.vtpm_config(flavor, image)
    with pytest.raises(error):
        hardware.get_vtpm_constraint(flavor, image)


def test_secret_security_is_validated_by_our_spec(drv):
    flavor = make_flavor(**{"hw:tpm_version": "2.0", "hw:tpm_secret_security": "everyone"})
    with pytest.raises(nova_exception.Invalid, match="hw:tpm_secret_security='everyone'"):
        translate.vtpm_config(flavor, make_image())


def test_pcr_banks_come_from_the_flavor(drv):
    flavor = make_flavor(**{"hw:tpm_version": "2.0", "hw:tpm_pcr_banks": "SHA384, sha256"})
    config = translate.vtpm_config(flavor, make_image())
    assert config.pcr_banks == ("sha256", "sha384")
    assert {"CUSTOM_VTPM_PCR_BANK_SHA256", "CUSTOM_VTPM_PCR_BANK_SHA384"} <= config.traits
    assert translate.vtpm_config(make_flavor(**{"hw:tpm_version": "2.0"}),
                                 make_image()).pcr_banks == ()


@pytest.mark.parametrize(("specs", "match"), [
    ({"hw:tpm_version": "1.2", "hw:tpm_pcr_banks": "sha256"}, "TPM 1.2"),
    ({"hw:tpm_version": "2.0", "hw:tpm_pcr_banks": "sha256,sha256"}, "named twice"),
    ({"hw:tpm_version": "2.0", "hw:tpm_pcr_banks": "md5"}, "'md5' is no PCR bank"),
])
def test_pcr_banks_nova_cannot_check_are_refused_at_the_compute(drv, specs, match):
    with pytest.raises(nova_exception.Invalid, match=match):
        translate.vtpm_config(make_flavor(**specs), make_image())


@pytest.mark.parametrize(("value", "valid"), [
    ("sha256", True), ("sha1,sha256,sha384,sha512", True), ("SHA384, sha256", True),
    ("", False), ("md5", False), ("sha256,", False), ("sha256;sha384", False),
])
def test_nova_api_validates_hw_tpm_pcr_banks_with_our_validator(value, valid):
    from nova.api.validation.extra_specs import validators

    from nova.virt.vtpm import extra_specs
    (validator,) = extra_specs.register()
    assert validator.name == "hw:tpm_pcr_banks"
    validators.VALIDATORS.setdefault(validator.name, validator)
    if valid:
        validators.validate("hw:tpm_pcr_banks", value)
    else:
        with pytest.raises(nova_exception.ValidationError):
            validators.validate("hw:tpm_pcr_banks", value)


def test_our_validator_is_an_installed_nova_plugin():
    """nova-api finds it through the entry point namespace Nova loads (pyproject.toml)."""
    from importlib import metadata
    found = {ep.name: ep.value
             for ep in metadata.entry_points(group="nova.api.extra_spec_validators")}
    assert found.get("vtpm") == "nova.virt.vtpm.extra_specs"


def test_no_nova_module_is_patched(drv):
    assert libvirt_driver.hardware is hardware
    assert compute_api.hardware is hardware


# --------------------------------------------------------------------------- <tpm>


@pytest.mark.parametrize(("specs", "props", "version", "model"), [
    ({"hw:tpm_version": "2.0"}, {}, "2.0", "tpm-tis"),
    ({"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"}, {}, "2.0", "tpm-crb"),
    ({}, {"hw_tpm_version": "1.2"}, "1.2", "tpm-tis"),
])
def test_guest_config_gets_our_tpm_element_with_the_secret(drv, specs, props, version, model):
    secret_uuid = str(uuid.uuid4())
    instance = make_instance(make_flavor(**specs), secret_uuid, **props)
    guest = minimal_guest()
    drv._add_vtpm_device(guest, instance.flavor, instance, make_image(**props))
    xml = guest.to_xml()
    assert domain.get_tpm(xml) == domain.TPMDevice(version, model, secret_uuid)
    root = etree.fromstring(xml.encode(), etree.XMLParser(remove_blank_text=True))
    assert len(root.findall("devices/tpm")) == 1
    # Exactly the element vtpm_driver.virt.domain.add_tpm writes.
    expected = etree.fromstring(
        domain.add_tpm("<domain><devices/></domain>", version, model, secret_uuid).encode(),
        etree.XMLParser(remove_blank_text=True)).find("devices/tpm")
    assert etree.tostring(root.find("devices/tpm"), method="c14n") == etree.tostring(
        expected, method="c14n")
    assert isinstance(guest.devices[-1], vconfig.LibvirtConfigGuestVTPM)
    assert PASSPHRASE not in xml


def test_no_tpm_without_a_request(drv):
    guest = minimal_guest()
    instance = make_instance(make_flavor())
    drv._add_vtpm_device(guest, instance.flavor, instance, make_image())
    assert domain.get_tpm(guest.to_xml()) is None


def test_no_tpm_without_a_secret(drv):
    instance = make_instance()
    with pytest.raises(nova_exception.Invalid, match="without a secret"):
        drv._add_vtpm_device(minimal_guest(), instance.flavor, instance, make_image())


# --------------------------------------------------------------------------- passphrase


def test_request_context_is_translated_from_novas(ctx):
    ours = translate.request_context(ctx.elevated())
    assert isinstance(ours, vtpm_context.RequestContext)
    assert (ours.user_id, ours.project_id, ours.auth_token) == ("owner", "proj-a", TOKEN)
    assert set(ours.roles) == {"member", "reader", "admin"}
    assert (ours.user_name, ours.project_name) == ("alice", "A")
    assert vtpm_context.find_catalog_endpoint(
        ours.service_catalog, "key-manager", "public") == "http://127.0.0.1:9311"
    assert TOKEN not in repr(ours)


def test_create_guest_defines_our_secret_around_the_start_never_castellan(
        drv, ctx, keymgr, conn, log):
    """Nova's real _create_guest: secret from our KeyManager, defined by our virt.secret."""
    instance = make_instance()
    drv._create_guest(ctx, "<domain/>", instance)
    assert operations(log) == ["create"]
    _, context, _, mode = log[0]
    assert isinstance(context, vtpm_context.RequestContext)
    assert (context.user_id, context.auth_token) == ("owner", TOKEN)
    assert mode == "user"
    secret_uuid = instance.system_metadata["vtpm_secret_uuid"]
    assert instance.saved == 1
    # libvirt held the passphrase, private, while the guest started ...
    assert conn.secrets_at_start == {secret_uuid: (PASSPHRASE.encode(), True)}
    xml = conn.defined_xml[0]
    assert secret.parse_secret_xml(xml) == secret.VTPMSecretInfo(
        secret_uuid, instance.uuid, ephemeral=True, private=True)
    assert PASSPHRASE not in xml
    # ... and not after it (SPEC E3).
    assert conn.secrets == {}


def test_failed_start_leaves_no_libvirt_secret(drv, ctx, conn):
    conn.fail_start = True
    instance = make_instance(secret_uuid=None)
    with pytest.raises(libvirt.libvirtError):
        drv._create_guest(ctx, "<domain/>", instance)
    assert conn.secrets_at_start
    assert conn.secrets == {}


def test_host_mode_secret_persists_and_is_reused_without_barbican(drv, ctx, conn, log):
    instance = make_instance(make_flavor(**{"hw:tpm_version": "2.0",
                                            "hw:tpm_secret_security": "host"}))
    drv._create_guest(ctx, "<domain/>", instance)
    secret_uuid = instance.system_metadata["vtpm_secret_uuid"]
    info = secret.parse_secret_xml(conn.secrets[secret_uuid].xml)
    assert (info.ephemeral, info.private) == (False, False)
    drv._create_guest(ctx, "<domain/>", instance)
    assert operations(log) == ["create"]  # the second start needed no Barbican call
    assert list(conn.secrets) == [secret_uuid]


def _hosts_own_secret(conn, instance) -> str:
    """A persistent host-mode secret of ``instance`` that its record does not name."""
    hosts_own = str(uuid.uuid4())
    conn.secretDefineXML(
        f"<secret ephemeral='no' private='no'><uuid>{hosts_own}</uuid>"
        f"<usage type='vtpm'><name>{instance.uuid}</name></usage></secret>")
    conn.secrets[hosts_own].setValue(b"the passphrase of the existing state")
    return hosts_own


def test_host_mode_secret_on_the_host_but_not_recorded_is_reused_never_replaced(
        drv, ctx, conn, log):
    """Defect 11: as Nova does, the host's secret is reused (and recorded here)."""
    instance = make_instance(make_flavor(**{"hw:tpm_version": "2.0",
                                            "hw:tpm_secret_security": "host"}))
    hosts_own = _hosts_own_secret(conn, instance)
    drv._create_guest(ctx, "<domain/>", instance)
    assert list(conn.secrets) == [hosts_own]
    assert conn.secrets[hosts_own].stored == b"the passphrase of the existing state"
    assert instance.system_metadata["vtpm_secret_uuid"] == hosts_own
    assert operations(log) == []  # no new passphrase


def test_host_mode_secret_other_than_the_recorded_one_is_refused_naming_both(
        drv, ctx, conn, log):
    recorded = str(uuid.uuid4())
    instance = make_instance(make_flavor(**{"hw:tpm_version": "2.0",
                                            "hw:tpm_secret_security": "host"}),
                             secret_uuid=recorded)
    hosts_own = _hosts_own_secret(conn, instance)
    with pytest.raises(nova_exception.NovaException, match=f"{hosts_own}.*{recorded}"):
        drv._create_guest(ctx, "<domain/>", instance)
    assert list(conn.secrets) == [hosts_own]
    assert conn.secrets[hosts_own].stored == b"the passphrase of the existing state"


def test_deployment_mode_is_passed_to_our_keymanager(drv, ctx, log):
    instance = make_instance(make_flavor(**{"hw:tpm_version": "2.0",
                                            "hw:tpm_secret_security": "deployment"}))
    drv._create_guest(ctx, "<domain/>", instance)
    assert [(op, mode) for op, _, _, mode in log] == [("create", "deployment")]


def test_spawn_creates_the_secret_once_and_the_start_reuses_it(drv, ctx, log, monkeypatch):
    instance = make_instance()

    def nova_spawn(self, context, instance, image_meta, *args, **kwargs):
        # What Nova's spawn does with a vTPM: secret recorded -> no pre-creation,
        # the XML gets the <tpm>, _create_guest starts the guest.
        assert instance.system_metadata.get("vtpm_secret_uuid")
        guest = minimal_guest()
        self._add_vtpm_device(guest, instance.flavor, instance, image_meta)
        self._create_guest(context, guest.to_xml(), instance)

    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "spawn", nova_spawn)
    drv.spawn(ctx, instance, make_image(), [], None, {})
    assert operations(log) == ["create"]
    assert drv._vtpm_starts == {}


def test_failed_spawn_deletes_the_secret_it_created(drv, ctx, keymgr, log, monkeypatch):
    """Issue 13 item 9: a spawn that fails after the secret was made leaves no
    passphrase in the key manager and no UUID in system_metadata."""
    instance = make_instance()

    def nova_spawn(self, context, instance, image_meta, *args, **kwargs):
        assert instance.system_metadata.get("vtpm_secret_uuid")
        raise nova_exception.InstanceNotFound(instance_id=instance.uuid)

    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "spawn", nova_spawn)
    with pytest.raises(nova_exception.InstanceNotFound):
        drv.spawn(ctx, instance, make_image(), [], None, {})
    assert operations(log) == ["create", "delete"]
    assert "vtpm_secret_uuid" not in instance.system_metadata
    assert drv._vtpm_starts == {}


def test_failed_start_of_a_recorded_secret_keeps_it(drv, ctx, keymgr, log, monkeypatch):
    instance = make_instance()
    keymgr.create_vtpm_secret(ctx, instance, "user")
    log.clear()
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "_hard_reboot",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        drv._hard_reboot(ctx, instance, None, None)
    assert "delete" not in operations(log)
    assert instance.system_metadata.get("vtpm_secret_uuid")


def test_spawn_refused_by_barbican_is_novas_forbidden_before_anything(
        drv, ctx, keymgr, conn, monkeypatch):
    keymgr.fail = exception.VTPMSecretForbidden("Barbican refused to create (HTTP 403)")
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "spawn",
                        lambda *a, **k: pytest.fail("Nova's spawn ran"))
    with pytest.raises(nova_exception.VTPMSecretForbidden, match="HTTP 403"):
        drv.spawn(ctx, make_instance(), make_image(), [], None, {})
    assert conn.calls == []


def test_hard_reboot_fetches_the_passphrase_before_nova_touches_the_guest(
        drv, ctx, keymgr, log, monkeypatch):
    instance = make_instance()
    secret_uuid, _ = keymgr.create_vtpm_secret(ctx, instance, "user")
    log.clear()

    def nova_hard_reboot(self, context, instance, *args, **kwargs):
        log.append(("nova_hard_reboot", None, instance.uuid, None))
        self._create_guest(context, "<domain/>", instance)

    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "_hard_reboot", nova_hard_reboot)
    drv.power_on(ctx, instance, network_info=[])  # Nova's power_on -> _hard_reboot
    assert operations(log) == ["get", "nova_hard_reboot"]
    assert instance.system_metadata["vtpm_secret_uuid"] == secret_uuid
    assert drv._vtpm_starts == {}


@pytest.mark.parametrize("method", ["resume", "finish_revert_migration"])
def test_other_starts_fetch_the_passphrase_first_too(drv, ctx, keymgr, log, monkeypatch,
                                                     method):
    instance = make_instance()
    keymgr.create_vtpm_secret(ctx, instance, "user")
    log.clear()

    def nova_start(self, context, instance, *args, **kwargs):
        log.append(("nova_" + method, None, instance.uuid, None))
        self._create_guest(context, "<domain/>", instance)

    monkeypatch.setattr(libvirt_driver.LibvirtDriver, method, nova_start)
    args = {"resume": ([],), "finish_revert_migration": ([], mock.Mock())}[method]
    getattr(drv, method)(ctx, instance, *args)
    assert operations(log) == ["get", "nova_" + method]


def test_host_mode_restart_needs_no_token_when_libvirt_has_the_secret(
        drv, ctx, keymgr, log, monkeypatch):
    """resume_state_on_host_boot runs with a token-less context: host mode still starts."""
    instance = make_instance(make_flavor(**{"hw:tpm_version": "2.0",
                                            "hw:tpm_secret_security": "host"}))
    drv._create_guest(ctx, "<domain/>", instance)
    log.clear()
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "_hard_reboot",
                        lambda self, context, instance, *a, **k: self._create_guest(
                            context, "<domain/>", instance))
    drv._hard_reboot(nova_context.get_admin_context(), instance, [], None)
    assert log == []


def test_hard_reboot_by_someone_who_may_not_read_leaves_the_guest_alone(
        drv, ctx, keymgr, monkeypatch):
    instance = make_instance()
    keymgr.create_vtpm_secret(ctx, instance, "user")
    keymgr.fail = exception.VTPMSecretForbidden(
        "Barbican refused to read the secret (HTTP 403): this needs the owner's credentials")
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "_hard_reboot",
                        lambda *a, **k: pytest.fail("the guest was touched"))
    with pytest.raises(nova_exception.VTPMSecretForbidden, match="owner's credentials"):
        drv.reboot(ctx, instance, [], "HARD")
    assert drv._vtpm_starts == {}


def test_hard_reboot_of_a_lost_secret_says_unrecoverable(drv, ctx, keymgr, monkeypatch):
    instance = make_instance(secret_uuid=str(uuid.uuid4()))
    keymgr.fail = exception.VTPMSecretNotFound("vTPM secret does not exist: unrecoverable")
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "_hard_reboot",
                        lambda *a, **k: pytest.fail("the guest was touched"))
    with pytest.raises(nova_exception.VTPMSecretNotFound, match="unrecoverable"):
        drv._hard_reboot(ctx, instance, [], None)


def test_barbican_down_is_novas_key_manager_error(drv, ctx, keymgr):
    keymgr.fail = exception.KeyManagerUnavailable("cannot reach Barbican at http://x")
    with pytest.raises(nova_exception.KeyManagerError, match="cannot reach Barbican"):
        drv._get_or_create_secret_for_vtpm(ctx, make_instance())


# --------------------------------------------------------------------------- delete


def test_delete_removes_the_secret_through_our_keymanager_first(drv, ctx, keymgr, log,
                                                                monkeypatch):
    instance = make_instance(task_state=task_states.DELETING)
    keymgr.create_vtpm_secret(ctx, instance, "user")
    log.clear()

    def nova_destroy(self, context, instance, *args, **kwargs):
        log.append(("nova_destroy", None, instance.uuid, args))

    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "destroy", nova_destroy)
    drv.destroy(ctx.elevated(), instance, [], None)
    assert operations(log) == ["delete", "nova_destroy"]
    assert "vtpm_secret_uuid" not in instance.system_metadata
    # The compute manager's own call afterwards (_complete_deletion_vtpm) is a
    # no-op: castellan would raise CastellanReached here.
    nova_vtpm.delete_secret(ctx, instance)
    assert keymgr.secrets == {}


def test_delete_refused_by_barbican_leaves_the_guest_running(drv, ctx, keymgr, monkeypatch):
    instance = make_instance(task_state=task_states.DELETING)
    keymgr.create_vtpm_secret(ctx, instance, "user")
    keymgr.fail = exception.VTPMSecretForbidden("refused to delete (HTTP 403)")
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "destroy",
                        lambda *a, **k: pytest.fail("the guest was touched"))
    with pytest.raises(nova_exception.VTPMSecretForbidden):
        drv.destroy(ctx, instance, [], None)
    assert instance.system_metadata["vtpm_secret_uuid"]


def test_delete_without_any_token_warns_and_still_cleans_up(drv, keymgr, log, monkeypatch):
    instance = make_instance(vm_state=vm_states.DELETED, secret_uuid=str(uuid.uuid4()))
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "destroy",
                        lambda self, context, instance, *a, **k: log.append(("nova_destroy",)))
    drv.destroy(nova_context.get_admin_context(), instance, [], None)
    assert operations(log) == ["nova_destroy"]
    assert "vtpm_secret_uuid" not in instance.system_metadata


@pytest.mark.parametrize(("task_state", "destroy_disks"), [
    (task_states.REBOOTING_HARD, False),  # Nova's _hard_reboot
    (task_states.RESIZE_REVERTING, True),  # revert on the destination
    (task_states.RESIZE_MIGRATING, False),  # resize source
    (None, True),
])
def test_destroy_that_is_not_a_delete_keeps_the_secret(drv, ctx, keymgr, log, monkeypatch,
                                                       task_state, destroy_disks):
    instance = make_instance(task_state=task_state)
    keymgr.create_vtpm_secret(ctx, instance, "user")
    log.clear()
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "destroy", lambda *a, **k: None)
    drv.destroy(ctx, instance, [], None, destroy_disks=destroy_disks)
    assert log == []
    assert instance.system_metadata["vtpm_secret_uuid"]


def test_cleanup_undefines_the_libvirt_secret_through_our_package(drv, ctx, conn,
                                                                 monkeypatch):
    instance = make_instance(make_flavor(**{"hw:tpm_version": "2.0",
                                            "hw:tpm_secret_security": "host"}))
    drv._create_guest(ctx, "<domain/>", instance)
    assert conn.secrets
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "_cleanup", lambda *a, **k: None)
    drv.cleanup(ctx, instance, [], destroy_disks=False)  # Nova's cleanup -> our _cleanup
    assert conn.secrets  # kept while the server's disks are
    drv.cleanup(ctx, instance, [], destroy_disks=True)
    assert conn.secrets == {}


def test_confirmed_resize_that_drops_the_vtpm_deletes_its_secret(drv, ctx, keymgr, log):
    old = make_flavor(**{"hw:tpm_version": "2.0", "hw:tpm_secret_security": "deployment"})
    instance = make_instance(old)
    keymgr.create_vtpm_secret(ctx, instance, "deployment")
    log.clear()
    instance.old_flavor, instance.new_flavor = old, make_flavor()
    drv._cleanup_resize_vtpm(ctx, instance)
    assert [(op, mode) for op, _, _, mode in log] == [("delete", "deployment")]
    assert "vtpm_secret_uuid" not in instance.system_metadata


def test_confirmed_resize_that_keeps_the_vtpm_keeps_its_secret(drv, ctx, keymgr, log):
    instance = make_instance()
    keymgr.create_vtpm_secret(ctx, instance, "user")
    log.clear()
    instance.old_flavor = instance.new_flavor = instance.flavor
    drv._cleanup_resize_vtpm(ctx, instance)
    assert log == []


def test_reverted_resize_that_added_a_vtpm_deletes_the_new_secret(drv, ctx, keymgr, log):
    new = make_flavor(**{"hw:tpm_version": "2.0"})
    instance = make_instance(make_flavor())
    keymgr.create_vtpm_secret(ctx, instance, "user")
    log.clear()
    instance.old_flavor, instance.new_flavor = make_flavor(), new
    drv._finish_revert_migration_vtpm(ctx, instance)
    assert [(op, mode) for op, _, _, mode in log] == [("delete", "user")]


def test_resize_that_adds_a_vtpm_creates_one_secret_before_the_start(
        drv, ctx, log, monkeypatch):
    old, new = make_flavor(), make_flavor(**{"hw:tpm_version": "2.0"})
    instance = make_instance(new)
    instance.old_flavor, instance.new_flavor = old, new

    def nova_finish_migration(self, context, migration, instance, *args, **kwargs):
        self._finish_migration_vtpm(context, instance)
        self._create_guest(context, "<domain/>", instance)

    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "finish_migration",
                        nova_finish_migration)
    drv.finish_migration(ctx, None, instance, {}, [], make_image(), True, {})
    assert operations(log) == ["create"]


# --------------------------------------------------------------------------- refusals


def test_operations_on_servers_without_vtpm_are_novas(drv, ctx, monkeypatch):
    instance = make_instance(make_flavor())
    with pytest.raises(NotImplementedError):  # the compute manager's default rebuild
        drv.rebuild(context=ctx, instance=instance, image_meta=None, injected_files=[],
                    admin_password=None, allocations={}, bdms=[], detach_block_devices=None,
                    attach_block_devices=None)
    called = []
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "rescue",
                        lambda *a, **k: called.append("rescue"))
    drv.rescue(ctx, instance, [], make_image(), "pw", None, None)
    assert called == ["rescue"]


def test_host_mode_live_migration_is_left_to_nova(drv, ctx, monkeypatch):
    instance = make_instance(make_flavor(**{"hw:tpm_version": "2.0",
                                            "hw:tpm_secret_security": "host"}))
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "check_can_live_migrate_source",
                        lambda *a, **k: "nova's checks")
    assert drv.check_can_live_migrate_source(ctx, instance, None) == "nova's checks"


def test_novas_api_refuses_vtpm_operations_with_a_clean_400_not_a_500(ctx):
    """Nova's API check, which the shim keeps (README.rst): HTTP 400 before any RPC."""
    import webob.exc

    instance = make_instance(secret_uuid=str(uuid.uuid4()))

    class Controller:
        @wsgi.expected_errors((404, 409))
        def action(self, req):
            compute_api.reject_vtpm_instances("rescue")(lambda self, c, i: None)(
                None, ctx, instance)

    class Request:
        api_version_request = api_version_request.APIVersionRequest("2.1")

    with pytest.raises(webob.exc.HTTPBadRequest) as info:
        Controller().action(Request())
    assert instance.uuid in info.value.explanation
