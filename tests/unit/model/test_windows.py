"""vtpm_driver.model.windows: what Windows 11 needs of a flavor + image."""

from __future__ import annotations

import pytest

from vtpm_driver import exception
from vtpm_driver.model import request, windows

READY_FLAVOR = {"hw:tpm_version": "2.0", "os:secure_boot": "required"}
READY_IMAGE = {"os_distro": "windows", "os_version": "11", "hw_firmware_type": "uefi"}


def gaps(flavor, image):
    return windows.missing(flavor, image, request.get_vtpm_config(flavor, image))


@pytest.mark.parametrize(("image", "expected"), [
    ({"os_distro": "windows", "os_version": "11"}, True),
    ({"os_distro": "Windows", "os_version": "11.24H2"}, True),
    ({"vtpm_guest_os": "windows11"}, True),
    ({"os_distro": "windows", "os_version": "10"}, False),
    ({"os_distro": "windows"}, False),
    ({"os_distro": "debian", "os_version": "11"}, False),
    ({}, False),
    (None, False),
    ({"os_distro": 11, "os_version": ["11"]}, False),  # odd values never crash
])
def test_what_says_windows_11(image, expected):
    assert windows.is_windows_11(image) is expected


def test_a_ready_request_lacks_nothing_with_either_model_and_q35():
    assert gaps(READY_FLAVOR, READY_IMAGE) == ()
    assert gaps({**READY_FLAVOR, "hw:tpm_model": "tpm-crb"},
                {**READY_IMAGE, "hw_machine_type": "pc-q35-7.2"}) == ()
    # Secure Boot from the image instead of the flavor
    assert gaps({"hw:tpm_version": "2.0"}, {**READY_IMAGE, "os_secure_boot": "required"}) == ()


@pytest.mark.parametrize(("flavor", "image", "named"), [
    ({"os:secure_boot": "required"}, READY_IMAGE, "a TPM 2.0 (flavor hw:tpm_version=2.0)"),
    ({**READY_FLAVOR, "hw:tpm_version": "1.2"}, READY_IMAGE,
     "a TPM 2.0, not 1.2 (hw:tpm_version=2.0)"),
    (READY_FLAVOR, {**READY_IMAGE, "hw_firmware_type": "bios"},
     "UEFI firmware (image hw_firmware_type=uefi, not 'bios')"),
    ({**READY_FLAVOR, "os:secure_boot": "optional"}, READY_IMAGE,
     "Secure Boot (flavor os:secure_boot=required or image os_secure_boot=required)"),
    (READY_FLAVOR, {**READY_IMAGE, "hw_machine_type": "pc-i440fx-7.2"},
     "a q35 machine type for UEFI Secure Boot (image hw_machine_type='pc-i440fx-7.2' is "
     "not one)"),
])
def test_each_missing_piece_is_named_by_its_key(flavor, image, named):
    assert gaps(flavor, image) == (named,)
    with pytest.raises(exception.InvalidVTPMConfig, match="the image is Windows 11") as info:
        windows.check(flavor, image, request.get_vtpm_config(flavor, image))
    assert str(info.value).endswith(named)


def test_everything_missing_is_said_at_once_and_other_images_are_not_refused():
    image = {"vtpm_guest_os": "windows11"}
    assert len(gaps({}, image)) == 3
    with pytest.raises(exception.InvalidVTPMConfig, match=r"vtpm_guest_os=windows11\), "
                                                          "which needs a TPM 2.0"):
        windows.check({}, image, None)
    windows.check({}, {"os_distro": "debian"}, None)  # not Windows 11: nothing to check
