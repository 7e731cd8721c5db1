"""ops.power through VTPMDriver: reboot, stop/start, suspend/resume (SPEC F2, F5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.conftest import (
    MEMBER,
    OWNER,
    Env,
    touch_console,
)
from vtpm_driver import exception

# --------------------------------------------------------------------------- reboot, power


def test_f2_hard_reboot_reads_barbican_before_touching_the_guest(env: Env) -> None:
    inst = env.spawn(env.instance())
    ek = env.state_file(inst).read_bytes()
    touch_console(inst)
    env.reset()
    env.drv.reboot(OWNER, inst, None, "HARD")
    names = env.names()
    assert names.index("barbican.get") < names.index("virt.destroy") < names.index(
        "virt.define") < names.index("virt.start")
    assert "virt.undefine" not in names, "redefined in place: the record never disappears"
    assert env.state_file(inst).read_bytes() == ek
    assert env.conn.secrets == {}
    assert not Path(inst.console_log).exists(), "fresh boot, fresh console"


def test_f5_hard_reboot_by_another_user_leaves_the_server_alone(env: Env) -> None:
    inst = env.spawn(env.instance())
    xml = env.dom(inst).xml
    env.reset()
    with pytest.raises(exception.VTPMSecretForbidden):
        env.drv.reboot(MEMBER, inst, None, "HARD")
    assert env.names() == ["barbican.get"]
    assert env.dom(inst).active and env.dom(inst).xml == xml
    env.drv.reboot(OWNER, inst, None, "HARD")
    assert env.dom(inst).active


def test_host_mode_restarts_without_barbican(env: Env) -> None:
    inst = env.spawn(env.instance("host"))
    env.reset()
    env.drv.reboot(MEMBER, inst, None, "HARD")
    env.drv.power_off(inst)
    env.drv.power_on(MEMBER, inst, None)
    assert not [e for e in env.names() if e.startswith("barbican")]
    assert "virt.secret.define" not in env.names()
    assert env.dom(inst).active
    # The persistent secret vanished (libvirtd lost it): read Barbican once, define it again.
    env.conn.secrets.clear()
    env.reset()
    env.drv.reboot(OWNER, inst, None, "HARD")
    assert env.names()[0] == "barbican.get"
    assert list(env.conn.secrets) == [inst.system_metadata["vtpm_secret_uuid"]]


def test_soft_reboot_needs_no_secret_and_falls_back_to_hard(env: Env) -> None:
    inst = env.spawn(env.instance())
    env.reset()
    env.drv.reboot(MEMBER, inst, None, "SOFT")  # the guest reboots itself: no secret
    assert env.names() == ["virt.reboot"]
    env.conn.fail_reboot = True
    env.reset()
    env.drv.reboot(OWNER, inst, None, "SOFT")
    assert env.names()[:2] == ["virt.reboot", "barbican.get"]
    assert "virt.start" in env.names()
    env.drv.power_off(inst)
    env.reset()
    env.drv.reboot(OWNER, inst, None, "SOFT")  # stopped: soft reboot starts it
    assert "virt.reboot" not in env.names() and env.dom(inst).active
    with pytest.raises(exception.VTPMError, match="reboot_type='WARM'"):
        env.drv.reboot(OWNER, inst, None, "WARM")


def test_power_off_and_on(env: Env) -> None:
    inst = env.spawn(env.instance("deployment"))
    env.drv.power_off(inst, timeout=5, retry_interval=1)
    assert "virt.shutdown" in env.names()
    assert env.drv.get_info(inst) == "shutdown"
    env.reset()
    env.drv.power_on(OWNER, inst, None)
    assert env.names()[0] == "barbican.get"
    assert env.drv.get_info(inst) == "running" and env.conn.secrets == {}
    env.reset()
    env.drv.power_on(OWNER, inst, None)  # already running: nothing
    assert env.names() == []


def test_suspend_and_resume(env: Env) -> None:
    inst = env.spawn(env.instance())
    touch_console(inst)
    env.drv.suspend(None, inst)
    assert env.drv.get_info(inst) == "suspended"
    with pytest.raises(exception.VirtError, match="it is shut off"):
        env.drv.suspend(None, inst)
    env.reset()
    with pytest.raises(exception.VTPMSecretForbidden):
        env.drv.resume(MEMBER, inst, None)
    assert env.names() == ["barbican.get"] and env.drv.get_info(inst) == "suspended"
    env.drv.resume(OWNER, inst, None)
    assert env.drv.get_info(inst) == "running" and env.conn.secrets == {}
    assert Path(inst.console_log).exists(), "a resume continues the same boot"
    env.drv.suspend(None, inst)
    env.drv.power_on(OWNER, inst, None)  # start of a suspended server resumes it
    assert env.drv.get_info(inst) == "running"
    env.drv.suspend(None, inst)
    env.drv.reboot(OWNER, inst, None, "HARD")  # a hard reboot discards the saved state
    assert not env.dom(inst).managed_save and env.dom(inst).active
