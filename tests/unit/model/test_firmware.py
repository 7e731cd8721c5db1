"""vtpm_driver.model.firmware: BIOS or UEFI, Secure Boot, with Nova's names and rules."""

from __future__ import annotations

import re

import pytest

from vtpm_driver import exception
from vtpm_driver.model import firmware
from vtpm_driver.model.firmware import Firmware


@pytest.mark.parametrize(("flavor", "image", "expected"), [
    ({}, {}, Firmware("bios", "disabled")),
    ({}, {"hw_firmware_type": "uefi"}, Firmware("uefi", "disabled")),
    ({"os:secure_boot": "required"}, {"hw_firmware_type": "uefi"}, Firmware("uefi", "required")),
    ({}, {"hw_firmware_type": " UEFI ", "os_secure_boot": "Required"},
     Firmware("uefi", "required")),
    ({}, {"hw_firmware_type": "uefi", "os_secure_boot": "optional"},
     Firmware("uefi", "optional")),
    ({"os:secure_boot": "optional"}, {}, Firmware("bios", "disabled")),  # none on BIOS
    ({"os:secure_boot": "required"}, {"hw_firmware_type": "uefi", "os_secure_boot": "required"},
     Firmware("uefi", "required")),
])
def test_get_firmware(flavor, image, expected):
    assert firmware.get_firmware(flavor, image) == expected
    assert firmware.get_firmware(flavor, image).uefi is (expected.type == "uefi")


@pytest.mark.parametrize(("flavor", "image", "message"), [
    ({}, {"hw_firmware_type": "efi"},
     "invalid image hw_firmware_type='efi': allowed values are bios, uefi"),
    ({}, {"hw_firmware_type": 1}, "invalid image hw_firmware_type=1"),
    ({"os:secure_boot": "on"}, {"hw_firmware_type": "uefi"},
     "invalid flavor os:secure_boot='on': allowed values are required, optional, disabled"),
    ({"os:secure_boot": "disabled"}, {"hw_firmware_type": "uefi", "os_secure_boot": "required"},
     "flavor os:secure_boot='disabled' conflicts with image os_secure_boot='required'"),
    ({"os:secure_boot": "required"}, {},
     "os:secure_boot=required needs UEFI firmware: set image hw_firmware_type=uefi "
     "(it is 'bios')"),
    ({}, {"hw_firmware_type": "bios", "os_secure_boot": "required"},
     "os_secure_boot=required needs UEFI firmware"),
])
def test_get_firmware_refuses_what_cannot_be_given(flavor, image, message):
    with pytest.raises(exception.InvalidFirmwareRequest, match=re.escape(message)) as info:
        firmware.get_firmware(flavor, image)
    assert isinstance(info.value, exception.InvalidVTPMConfig)  # a kind of invalid request


def test_asked_keeps_secure_boot_without_uefi_for_the_windows_check():
    assert firmware.asked({"os:secure_boot": "required"}, {}) == Firmware("bios", "required")


def test_secure_boot_needs_a_disk_not_a_directly_booted_kernel():
    secure = Firmware("uefi", "required")
    with pytest.raises(exception.InvalidFirmwareRequest, match="give a disk"):
        firmware.check_boot(secure, direct_kernel=True)
    firmware.check_boot(secure, direct_kernel=False)
    firmware.check_boot(Firmware("uefi", "disabled"), direct_kernel=True)
