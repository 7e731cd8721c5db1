"""VTPMDriver: init_host / get_traits (SPEC C1, C2, C4); rebuild, rescue."""

from __future__ import annotations

import types
import uuid

import pytest
from oslo_config import cfg

from tests.fakes.libvirt import FakeLibvirt
from tests.fakes.probe import FakeProbe
from tests.unit.conftest import KERNEL, MEMBER, OWNER, Env
from vtpm_driver import conf as vtpm_conf
from vtpm_driver import exception
from vtpm_driver.model import hostcheck, request, rules
from vtpm_driver.model.server import ImageMeta, is_rescued
from vtpm_driver.standalone import driver as vtpm_driver
from vtpm_driver.standalone import servers
from vtpm_driver.virt.probe import LibvirtHostProbe


def fake_hypervisor(*domains: tuple[str, str]) -> types.SimpleNamespace:
    """A hypervisor whose fake libvirt holds ``(uuid, devices)`` domains (never the host's)."""
    conn = FakeLibvirt()
    for dom_uuid, devices in domains:
        conn.defineXML(f"<domain><name>d-{dom_uuid[-2:]}</name><uuid>{dom_uuid}</uuid>"
                       f"<devices>{devices}</devices></domain>")
    return types.SimpleNamespace(conn=conn)


VTPM_DEVICES = ("<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>")
PASSTHROUGH_DEVICES = ("<tpm model='tpm-tis'><backend type='passthrough'/></tpm>")


@pytest.fixture
def env(env: Env) -> Env:
    """The shared harness, with lock files under tmp_path."""
    env.drv.conf.set_override("lock_path", str(env.tmp / "locks"), group="vtpm")
    return env


@pytest.fixture
def make_conf(tmp_path):
    """Config from a real file, as an operator would write it (no shared overrides)."""

    def make(**libvirt_opts) -> cfg.ConfigOpts:
        path = tmp_path / f"vtpm-driver-{len(list(tmp_path.iterdir()))}.conf"
        lines = ["[libvirt]"] + [f"{key} = {value}" for key, value in libvirt_opts.items()]
        path.write_text("\n".join(lines) + "\n")
        return vtpm_conf.new_conf(config_files=[str(path)])

    return make


def test_init_host_on_a_sound_host(make_conf):
    drv = vtpm_driver.VTPMDriver(make_conf(swtpm_enabled=True, virt_type="qemu"), FakeProbe())
    drv.init_host("compute-1")
    assert drv.get_traits() == dict.fromkeys(request.ALL_TRAITS, True)


def test_init_host_lists_every_problem(make_conf):
    conf = make_conf(swtpm_enabled=True, virt_type="qemu", swtpm_user="nobody-here")
    probe = FakeProbe(binaries={"swtpm"})
    drv = vtpm_driver.VTPMDriver(conf, probe)
    with pytest.raises(exception.InvalidConfiguration) as err:
        drv.init_host()
    message = str(err.value)
    assert message.startswith(
        "[libvirt] swtpm_enabled is True but this host cannot provide emulated TPMs: "
    )
    assert message.endswith("Fix the above, or set [libvirt] swtpm_enabled = False")
    for problem in hostcheck.check_host(conf, probe).problems:
        assert problem in message
    assert "swtpm_setup not found" in message and "swtpm_ioctl not found" in message
    assert "swtpm_user 'nobody-here'" in message
    assert "\n" not in message
    assert drv.get_traits() == dict.fromkeys(request.ALL_TRAITS, False)


def test_init_host_refuses_a_bad_virt_type(make_conf):
    drv = vtpm_driver.VTPMDriver(make_conf(swtpm_enabled=True, virt_type="lxc"), FakeProbe())
    with pytest.raises(exception.InvalidConfiguration, match="virt_type is 'lxc'"):
        drv.init_host()


def test_init_host_refuses_without_tpm_support_in_libvirt(make_conf):
    xml = "<domainCapabilities><devices/></domainCapabilities>"
    drv = vtpm_driver.VTPMDriver(make_conf(swtpm_enabled=True, virt_type="qemu"),
                                 FakeProbe(xml=xml))
    with pytest.raises(exception.InvalidConfiguration, match="does not support TPM devices"):
        drv.init_host()


def test_disabled_swtpm_starts_and_reports_no_traits(make_conf):
    # C1: nothing about swtpm matters when it is disabled.
    drv = vtpm_driver.VTPMDriver(make_conf(swtpm_enabled=False),
                                 FakeProbe(xml="<domainCapabilities/>", binaries=set(),
                                           users=set(), groups=set()),
                                 hypervisor=fake_hypervisor())
    drv.init_host()
    assert drv.get_traits() == dict.fromkeys(request.ALL_TRAITS, False)


def test_c4_disabled_swtpm_with_vtpm_servers_refuses(make_conf):
    class WithServers(vtpm_driver.VTPMDriver):
        def _vtpm_servers_on_host(self) -> list[str]:
            return ["2e1b6e8a-0000-4000-8000-000000000002", "2e1b6e8a-0000-4000-8000-000000000001"]

    drv = WithServers(make_conf(swtpm_enabled=False), FakeProbe())
    with pytest.raises(exception.InvalidConfiguration) as err:
        drv.init_host()
    assert str(err.value) == (
        "this host has 2 server(s) with a vTPM (2e1b6e8a-0000-4000-8000-000000000001, "
        "2e1b6e8a-0000-4000-8000-000000000002) but [libvirt] swtpm_enabled is False: "
        "set swtpm_enabled = True so they keep their TPM"
    )


def test_c4_only_emulator_tpm_domains_count(env: Env) -> None:
    with_tpm = env.spawn(env.instance(name="a"))
    env.conn.defineXML(
        f"<domain><name>passthrough</name><uuid>{uuid.uuid4()}</uuid><devices>"
        "<tpm model='tpm-tis'><backend type='passthrough'/></tpm></devices></domain>")
    assert env.drv._vtpm_servers_on_host() == [with_tpm.uuid]


def test_c4_counts_only_the_servers_the_driver_manages(env: Env) -> None:
    # Issue 13 item 8: a domain another tool defined, with its own emulated TPM, is
    # not the driver's; it must neither be counted nor block start-up.
    foreign = str(uuid.uuid4())
    env.conn.defineXML(
        f"<domain><name>foreign</name><uuid>{foreign}</uuid><devices><tpm model='tpm-crb'>"
        "<backend type='emulator' version='2.0'/></tpm></devices></domain>")
    env.drv.conf.set_override("swtpm_enabled", False, group="libvirt")
    assert env.drv._vtpm_servers_on_host() == []
    env.drv.init_host()  # no server of ours would lose its TPM
    env.drv.conf.set_override("swtpm_enabled", True, group="libvirt")
    ours = env.spawn(env.instance(name="ours"))
    env.drv.conf.set_override("swtpm_enabled", False, group="libvirt")
    with pytest.raises(exception.InvalidConfiguration, match=ours.uuid) as err:
        env.drv.init_host()
    assert foreign not in str(err.value)


def test_unreachable_libvirt_propagates(make_conf):
    drv = vtpm_driver.VTPMDriver(make_conf(swtpm_enabled=True, virt_type="qemu"),
                                 FakeProbe(version_info=exception.HypervisorUnavailable(
                                     "cannot connect to libvirt at test:///x: no")))
    with pytest.raises(exception.HypervisorUnavailable, match="test:///x"):
        drv.init_host()
    with pytest.raises(exception.HypervisorUnavailable):
        drv.get_traits()


def test_default_probe_is_libvirt_at_the_configured_uri(make_conf):
    drv = vtpm_driver.VTPMDriver(make_conf(connection_uri="qemu:///session"))
    assert isinstance(drv.probe, LibvirtHostProbe)
    assert drv.probe.uri == "qemu:///session"


# --------------------------------------------------------------------------- issue 15 ops


@pytest.fixture
def offhost_env(env: Env) -> Env:
    env.drv.conf.set_override("state_backup_dir", str(env.tmp / "store"), group="vtpm")
    env.drv.conf.set_override("lock_timeout", 0, group="vtpm")
    return env


def test_rebuild_hands_off_and_keeps_the_tpm_or_resets_it(offhost_env: Env) -> None:
    env = offhost_env
    inst = env.spawn(env.instance("host"))
    ek = env.state_file(inst).read_bytes()
    new_image = ImageMeta(kernel="/boot/other-vmlinuz", cmdline="console=ttyS0 new")
    env.drv.rebuild(OWNER, inst, new_image, [], None, {}, [], None, None)
    assert env.dom(inst).active and "/boot/other-vmlinuz" in env.dom(inst).xml
    assert env.state_file(inst).read_bytes() == ek, "same TPM"
    env.drv.rebuild(OWNER, inst, None, [], None, {}, [], None, None, reset_tpm=True)
    assert env.dom(inst).active and env.state_file(inst).read_bytes() != ek, "a new TPM"


def test_rescue_and_unrescue_hand_off_with_the_same_tpm(offhost_env: Env) -> None:
    env = offhost_env
    inst = env.spawn(env.instance("deployment"))
    ek = env.state_file(inst).read_bytes()
    env.drv.rescue(OWNER, inst, None, None, None, None)
    assert is_rescued(inst) and f"{rules.RESCUE_CMDLINE}" in env.dom(inst).xml
    assert env.state_file(inst).read_bytes() == ek
    env.drv.unrescue(OWNER, inst)
    assert not is_rescued(inst) and rules.RESCUE_CMDLINE not in env.dom(inst).xml
    assert env.dom(inst).active and env.state_file(inst).read_bytes() == ek


def test_a_members_rescue_of_a_user_mode_server_touches_nothing(offhost_env: Env) -> None:
    env = offhost_env
    inst = env.spawn(env.instance("user"))
    xml = env.dom(inst).xml
    env.reset()
    with pytest.raises(exception.VTPMSecretForbidden):
        env.drv.rescue(MEMBER, inst, None, None, None, None)
    assert env.dom(inst).active and env.dom(inst).xml == xml
    assert not is_rescued(inst)


def test_rebuild_as_an_evacuation_is_refused_naming_nova(offhost_env: Env) -> None:
    """One host: an evacuation (Nova's rebuild with ``evacuate``) is Nova's, not ours."""
    env = offhost_env
    inst = env.spawn(env.instance("host"))
    xml = env.dom(inst).xml
    with pytest.raises(exception.OperationNotSupportedForVTPM, match="evacuation is Nova's"):
        env.drv.rebuild(OWNER, inst, None, [], None, {}, [], None, None, evacuate=True)
    assert env.dom(inst).active and env.dom(inst).xml == xml


def test_c4_lists_domains_with_an_emulated_tpm(env: Env) -> None:
    with_tpm = env.spawn(env.instance(name="a"))
    env.spawn(servers.new_instance("b", OWNER, kernel=KERNEL))
    env.conn.defineXML(
        f"<domain><name>foreign</name><uuid>{uuid.uuid4()}</uuid><devices><tpm model='tpm-tis'>"
        "<backend type='passthrough'/></tpm></devices></domain>")
    assert env.drv._vtpm_servers_on_host() == [with_tpm.uuid]
    env.drv.conf.set_override("swtpm_enabled", False, group="libvirt")
    with pytest.raises(exception.InvalidConfiguration, match=with_tpm.uuid):
        env.drv.init_host()
