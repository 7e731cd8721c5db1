"""Whether a flavor + image give a server that Windows 11 accepts (issue 22). Pure.

Windows 11 installs and boots only on a machine with a TPM 2.0 and UEFI
firmware with Secure Boot. A server that asks for it without them fails late,
inside the guest (the installer refuses, or BitLocker has no TPM), after the
cloud did all its work; so a request whose image says it is Windows 11 is
refused at request time, naming each missing piece by the key that gives it,
in Nova's names:

- a TPM 2.0: flavor ``hw:tpm_version=2.0`` (or image ``hw_tpm_version``), any
  model (Windows drives both ``tpm-tis`` and ``tpm-crb``);
- UEFI firmware: image ``hw_firmware_type=uefi``;
- Secure Boot: flavor ``os:secure_boot=required`` or image
  ``os_secure_boot=required`` (``optional`` gives it only where a host can);
- a machine type UEFI Secure Boot runs on: QEMU's ``q35`` (image
  ``hw_machine_type``, unset is the host's default, q35 on x86 in Nova).

The image says it is Windows 11 as Glance's common image properties say what
an image holds (``os_distro=windows`` with ``os_version`` 11 or 11.x), or by
``vtpm_guest_os=windows11``, for images that do not carry those.
"""

from __future__ import annotations

from collections.abc import Mapping

from vtpm_driver import exception
from vtpm_driver.model import firmware, request
from vtpm_driver.model.firmware import FIRMWARE_KEY, FLAVOR_SECURE_BOOT_KEY, IMAGE_SECURE_BOOT_KEY

OS_DISTRO_KEY = "os_distro"
OS_VERSION_KEY = "os_version"
#: Our image property for a Windows 11 image without os_distro/os_version.
GUEST_OS_KEY = "vtpm_guest_os"
WINDOWS_11 = "windows11"
MACHINE_TYPE_KEY = "hw_machine_type"


def _get(mapping: Mapping[str, str] | None, key: str) -> str:
    value = (mapping or {}).get(key)
    return value.strip().lower() if isinstance(value, str) else ""


def is_windows_11(image_properties: Mapping[str, str] | None) -> bool:
    """Whether the image says it holds Windows 11."""
    if _get(image_properties, GUEST_OS_KEY) == WINDOWS_11:
        return True
    version = _get(image_properties, OS_VERSION_KEY)
    return (_get(image_properties, OS_DISTRO_KEY) == "windows"
            and version.split(".", 1)[0] == "11")


def missing(flavor_extra_specs: Mapping[str, str] | None,
            image_properties: Mapping[str, str] | None,
            config: request.VTPMConfig | None) -> tuple[str, ...]:
    """What the request lacks for Windows 11, each piece with the key that gives it
    (empty: Windows 11 accepts it). ``config``: the request's vTPM
    (:func:`vtpm_driver.model.request.get_vtpm_config`).

    :raises InvalidFirmwareRequest: an unknown firmware value or a flavor/image
        conflict (:func:`vtpm_driver.model.firmware.asked`).
    """
    gaps = []
    if config is None:
        gaps.append(f"a TPM 2.0 (flavor {request.FLAVOR_VERSION_KEY}=2.0)")
    elif config.version != request.VERSION_2_0:
        gaps.append(f"a TPM 2.0, not {config.version} ({request.FLAVOR_VERSION_KEY}=2.0)")
    asked = firmware.asked(flavor_extra_specs, image_properties)
    if not asked.uefi:
        gaps.append(f"UEFI firmware (image {FIRMWARE_KEY}=uefi"
                    + (f", not {asked.type!r})" if FIRMWARE_KEY in (image_properties or {})
                       else ")"))
    if asked.secure_boot != firmware.REQUIRED:
        gaps.append(f"Secure Boot (flavor {FLAVOR_SECURE_BOOT_KEY}=required or image "
                    f"{IMAGE_SECURE_BOOT_KEY}=required)")
    machine = _get(image_properties, MACHINE_TYPE_KEY)
    if machine and "q35" not in machine:
        gaps.append(f"a q35 machine type for UEFI Secure Boot (image {MACHINE_TYPE_KEY}="
                    f"{request.show(machine)} is not one)")
    return tuple(gaps)


def check(flavor_extra_specs: Mapping[str, str] | None,
          image_properties: Mapping[str, str] | None,
          config: request.VTPMConfig | None) -> None:
    """Refuse a Windows 11 image on a flavor + image that Windows 11 would not accept.

    Not a Windows 11 image: nothing to check.

    :raises InvalidVTPMConfig: naming the image's claim and every missing piece.
    """
    if not is_windows_11(image_properties):
        return
    gaps = missing(flavor_extra_specs, image_properties, config)
    if gaps:
        raise exception.InvalidVTPMConfig(
            "the image is Windows 11 (" + _claim(image_properties) + "), which needs "
            + "; ".join(gaps))


def _claim(image_properties: Mapping[str, str] | None) -> str:
    if _get(image_properties, GUEST_OS_KEY) == WINDOWS_11:
        return f"{GUEST_OS_KEY}={WINDOWS_11}"
    return (f"{OS_DISTRO_KEY}=windows, "
            f"{OS_VERSION_KEY}={request.show((image_properties or {}).get(OS_VERSION_KEY))}")
