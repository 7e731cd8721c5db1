"""Shared set-up of the ops tests: a VTPMDriver over the one fake libvirt and key manager.

The fakes keep the rules the driver relies on (see :mod:`tests.fakes.libvirt`)
and append every Barbican and libvirt step to one event list, so tests can
assert the ORDER of calls.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import pytest

from tests.fakes.keymgr import FakeKeyManager
from tests.fakes.libvirt import STATE_FILES, FakeDomain, FakeLibvirt
from tests.fakes.probe import FakeProbe
from vtpm_driver import conf as vtpm_conf
from vtpm_driver.driver import VTPMDriver
from vtpm_driver.keymgr.context import RequestContext
from vtpm_driver.model.server import Flavor, Instance
from vtpm_driver.standalone import servers

KERNEL = "/boot/test-vmlinuz"
INITRD = "/boot/test-initrd.img"
OWNER = RequestContext(user_id="owner-id", project_id="proj-a", auth_token="tok-owner",
                       user_name="alice", project_name="a")
MEMBER = RequestContext(user_id="member-id", project_id="proj-a", auth_token="tok-member")


class Env(types.SimpleNamespace):
    """One test's driver and fakes."""

    drv: VTPMDriver
    conn: FakeLibvirt
    km: FakeKeyManager
    events: list[tuple[str, str]]
    state_base: Path
    tmp: Path
    probe: FakeProbe

    def instance(self, mode: str = "user", version: str = "2.0", model: str | None = None,
                 name: str = "vm1", **extra: str) -> Instance:
        specs = {"hw:tpm_version": version, "hw:tpm_secret_security": mode, **extra}
        if model:
            specs["hw:tpm_model"] = model
        return servers.new_instance(name, OWNER, flavor_extra_specs=specs, kernel=KERNEL,
                                    initrd=INITRD)

    def spawn(self, inst: Instance, context: RequestContext = OWNER,
              power_on: bool = True) -> Instance:
        self.drv.spawn(context, inst, inst.image_meta, [], None, {}, power_on=power_on)
        return inst

    def dom(self, inst: Instance) -> FakeDomain:
        return self.conn.domains[inst.uuid]

    def state_file(self, inst: Instance, version: str = "2.0") -> Path:
        subdir, name = STATE_FILES[version]
        return self.state_base / inst.uuid / subdir / name

    def names(self) -> list[str]:
        return [what for what, _ in self.events]

    def reset(self) -> None:
        self.events.clear()

    def assert_nothing_left(self, inst: Instance) -> None:
        assert inst.uuid not in self.conn.domains
        assert not (self.state_base / inst.uuid).exists()
        assert self.conn.secrets == {}
        assert self.km.passphrases == {}
        assert "vtpm_secret_uuid" not in inst.system_metadata
        assert not Path(inst.console_log).exists()


@pytest.fixture
def env(tmp_path: Path) -> Env:
    conf = vtpm_conf.new_conf()
    conf.set_override("virt_type", "qemu", group="libvirt")
    conf.set_override("swtpm_enabled", True, group="libvirt")
    conf.set_override("swtpm_state_dir", str(tmp_path / "swtpm"), group="vtpm")
    conf.set_override("console_log_dir", str(tmp_path / "console"), group="vtpm")
    conf.set_override("resize_backup_dir", str(tmp_path / "resize"), group="vtpm")
    conf.set_override("guest_start_timeout", 1, group="vtpm")
    events: list[tuple[str, str]] = []
    state_base = tmp_path / "swtpm"
    state_base.mkdir()
    conn = FakeLibvirt(events, state_base)
    km = FakeKeyManager(events)
    conn.keymgr = km
    probe = FakeProbe()
    drv = VTPMDriver(conf, probe=probe, hypervisor=types.SimpleNamespace(conn=conn),
                     keymgr=km)
    return Env(drv=drv, conn=conn, km=km, events=events, state_base=state_base, tmp=tmp_path,
               probe=probe)


def touch_console(inst: Instance, text: str = "VTPM_RESULT old boot\n") -> None:
    Path(inst.console_log).write_text(text)


def dataclasses_replace(inst: Instance) -> Instance:
    """What a record keeps: everything but the flavor's name and resize bookkeeping."""
    return dataclasses.replace(inst, old_flavor=None, new_flavor=None,
                               flavor=dataclasses.replace(inst.flavor, name="standalone"))


def resize_to(env: Env, inst: Instance, extra_specs: dict[str, str],
              revert: bool = False, power_on: bool = True) -> None:
    """What Nova's compute manager does around the four driver calls."""
    new = Flavor(vcpus=2, memory_mb=512, extra_specs=extra_specs)
    inst.new_flavor = new
    env.drv.migrate_disk_and_power_off(OWNER, inst, None, new, None)
    inst.old_flavor, inst.flavor = inst.flavor, new
    env.drv.finish_migration(OWNER, None, inst, "[]", None, inst.image_meta, True, {},
                             power_on=power_on)
    if revert:
        inst.flavor = inst.old_flavor
        env.drv.finish_revert_migration(OWNER, inst, None, None)
    else:
        env.drv.confirm_migration(OWNER, None, inst, None)
    inst.old_flavor = inst.new_flavor = None


__all__ = ["INITRD", "KERNEL", "MEMBER", "OWNER", "Env", "FakeDomain", "dataclasses_replace",
           "env", "resize_to", "servers", "touch_console"]


@pytest.fixture
def ek_ca(env: Env, monkeypatch):
    """The driver configured with a deployment EK CA (real swtpm_setup, tmp paths)."""
    from tests.unit.virt.test_manufacture import make_ca
    from vtpm_driver.virt import manufacture

    monkeypatch.setattr(manufacture, "LOG_DIR", str(env.tmp / "swtpm-log"))
    ca = make_ca(env.tmp / "ca")
    env.probe.files.update({path: Path(path).read_bytes() for path in (ca.certificate, ca.key)})
    conf = env.drv.conf
    for name, value in (("ek_ca_certificate", ca.certificate), ("ek_ca_key", ca.key),
                        ("ek_ca_dir", ca.workdir)):
        conf.set_override(name, value, group="vtpm")
    yield ca
    for name in ("ek_ca_certificate", "ek_ca_key", "ek_ca_dir"):
        conf.clear_override(name, group="vtpm")
