"""UEFI Secure Boot with our vTPM, standalone, on the real stack (issue 22 part 2).

The guest is the test guest on a GPT disk (tools/build-guest.sh: ``uefi.img``):
Debian's OVMF with Microsoft's keys enrolled runs Debian's Microsoft-signed shim,
which runs Debian's signed GRUB, which runs Debian's signed kernel. The guest
reports ``secureboot=on`` only when the kernel found Secure Boot enforced, and the
size of the measured-boot event log the firmware left it. The server is asked for
with Nova's image properties (``hw_firmware_type=uefi``, ``os_secure_boot=required``).

A second disk holds the same kernel with its signature removed: the firmware chain
must refuse it, which shows Secure Boot is really enforced, not just reported.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.functional.fixtures_libvirt import read_console
from tests.functional.fixtures_server import ServersOnStack
from tests.functional.test_lifecycle import check_result, confirm, resize
from vtpm_driver.model.server import Flavor

pytestmark = [pytest.mark.functional]

SECURE_BOOT = {"hw_firmware_type": "uefi", "os_secure_boot": "required"}
TPM = {"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"}
#: What Debian's GRUB prints when shim will not verify the kernel.
REFUSED = "bad shim signature"
REFUSAL_TIMEOUT = 180  # a bound for a hung boot, not a speed check


#: Where libvirt's QEMU user can open a disk (pytest's own tmp_path is root's, 0700).
DISK_ROOT = "/var/lib/libvirt/images"


@pytest.fixture
def disks() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vtpm-secure-boot-", dir=DISK_ROOT) as where:
        Path(where).chmod(0o755)
        yield Path(where)


def disk_copy(source: Path | None, where: Path) -> str:
    if source is None:
        pytest.fail("the test guest's UEFI disks are missing: run tools/build-guest.sh")
    copy = where / source.name
    shutil.copyfile(source, copy)
    return str(copy)


def check_secure_boot(result: dict[str, str]) -> None:
    assert result["secureboot"] == "on", result
    assert int(result["eventlog"]) > 0, result


def test_secure_boot_guest_keeps_its_tpm_and_pcr7_through_the_lifecycle(
        servers_on_stack: ServersOnStack, disks: Path) -> None:
    env = servers_on_stack
    owner = env.owner
    inst = env.new_server(TPM, SECURE_BOOT, disk=disk_copy(env.guest.uefi_disk, disks))
    console = env.spawn(inst)
    first = console.wait_new()
    check_secure_boot(first)
    assert first["sealed_at"] == "new"
    tpm = check_result(first, "2.0", "tpm_crb")
    xml = env.domain(inst).XMLDesc(0)
    assert "<loader readonly='yes' secure='yes' type='pflash'" in xml, xml
    assert "<smm state='on'/>" in xml

    def boots_with_same_tpm(operation) -> None:
        console.mark()
        operation()
        result = console.wait_new()
        check_secure_boot(result)
        assert result["sealed_at"] == "kept", result
        # The sealed value unseals only under the same PCR 7: the Secure Boot state
        # (keys, shim, GRUB) measured again, into the same TPM.
        assert check_result(result, "2.0", "tpm_crb") == tpm

    boots_with_same_tpm(lambda: env.driver.reboot(owner, inst, None, "SOFT"))
    boots_with_same_tpm(lambda: env.driver.reboot(owner, inst, None, "HARD"))
    env.driver.power_off(inst, timeout=60, retry_interval=5)
    boots_with_same_tpm(lambda: env.driver.power_on(owner, inst, None))
    # A resize that keeps the TPM (more memory) defines the domain anew.
    boots_with_same_tpm(lambda: resize(env, inst, TPM, memory_mb=640))
    confirm(env, inst)
    assert inst.flavor == Flavor(vcpus=1, memory_mb=640, extra_specs=TPM)

    env.driver.destroy(owner, inst)
    env.assert_nothing_left(inst, None)


def test_secure_boot_refuses_a_kernel_that_is_not_signed(
        servers_on_stack: ServersOnStack, disks: Path) -> None:
    env = servers_on_stack
    inst = env.new_server(TPM, SECURE_BOOT, disk=disk_copy(env.guest.unsigned_disk, disks))
    env.spawn(inst)
    deadline = time.monotonic() + REFUSAL_TIMEOUT
    while REFUSED not in read_console(inst.console_log):
        tail = read_console(inst.console_log)[-2000:]
        assert time.monotonic() < deadline, f"no {REFUSED!r} in {REFUSAL_TIMEOUT} s:\n{tail}"
        time.sleep(0.5)
    text = read_console(inst.console_log)
    assert "VTPM_RESULT" not in text and "Linux version" not in text, text[-2000:]
    env.driver.destroy(env.owner, inst)
    env.assert_nothing_left(inst, None)


def test_without_secure_boot_the_same_disk_boots_uefi_with_secure_boot_off(
        servers_on_stack: ServersOnStack, disks: Path) -> None:
    """The unsigned kernel boots once Secure Boot is not asked for: what refused it
    above was Secure Boot, not a broken disk."""
    env = servers_on_stack
    inst = env.new_server(TPM, {"hw_firmware_type": "uefi", "os_secure_boot": "disabled"},
                          disk=disk_copy(env.guest.unsigned_disk, disks))
    result = env.spawn(inst).wait_new()
    assert result["secureboot"] == "off", result
    check_result(result, "2.0", "tpm_crb")
    env.driver.destroy(env.owner, inst)
    env.assert_nothing_left(inst, None)
