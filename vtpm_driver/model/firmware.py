"""Which firmware a server boots: BIOS or UEFI, with or without Secure Boot. Pure.

In Nova's names and with Nova's rules (``nova.virt.hardware``
``get_secure_boot_constraint``, the libvirt driver's firmware choice):

- image ``hw_firmware_type``: ``bios`` (the default) or ``uefi``;
- Secure Boot, image ``os_secure_boot`` or flavor ``os:secure_boot``:
  ``required`` (enforced, or the server is refused), ``optional`` (where the
  host's firmware offers it), ``disabled`` (the default). Flavor and image
  must not disagree; ``required`` needs ``uefi``.

A UEFI server boots its disk through OVMF; with Secure Boot required, OVMF
comes with Microsoft's keys enrolled, so a shim-signed boot chain (every
mainstream distribution, Windows) boots and an unsigned kernel is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from vtpm_driver import exception
from vtpm_driver.model.request import show

FIRMWARE_KEY = "hw_firmware_type"
FLAVOR_SECURE_BOOT_KEY = "os:secure_boot"
IMAGE_SECURE_BOOT_KEY = "os_secure_boot"
BIOS = "bios"
UEFI = "uefi"
FIRMWARE_TYPES = (BIOS, UEFI)
REQUIRED = "required"
OPTIONAL = "optional"
DISABLED = "disabled"
SECURE_BOOT_POLICIES = (REQUIRED, OPTIONAL, DISABLED)


@dataclasses.dataclass(frozen=True)
class Firmware:
    """What a server's domain boots through.

    ``secure_boot``: :data:`REQUIRED` (enforced), :data:`OPTIONAL` (libvirt
    picks; enforced where the host's firmware offers it) or :data:`DISABLED`.
    """

    type: str = BIOS
    secure_boot: str = DISABLED

    @property
    def uefi(self) -> bool:
        return self.type == UEFI


def _value(mapping: Mapping[str, object] | None, key: str, allowed: tuple[str, ...],
           where: str) -> str | None:
    value = (mapping or {}).get(key)
    if value is None:
        return None
    if not isinstance(value, str) or value.strip().lower() not in allowed:
        raise exception.InvalidFirmwareRequest(
            f"invalid {where} {key}={show(value)}: allowed values are {', '.join(allowed)}")
    return value.strip().lower()


def asked(flavor_extra_specs: Mapping[str, object] | None,
          image_properties: Mapping[str, object] | None) -> Firmware:
    """What a flavor + image say, before the rule that ties Secure Boot to UEFI
    (:func:`get_firmware` applies it; :mod:`vtpm_driver.model.windows` names
    each missing piece instead).

    :raises InvalidFirmwareRequest: an unknown value (naming key and value), or
        a flavor and an image that disagree on Secure Boot.
    """
    kind = _value(image_properties, FIRMWARE_KEY, FIRMWARE_TYPES, "image") or BIOS
    flavor_sb = _value(flavor_extra_specs, FLAVOR_SECURE_BOOT_KEY,
                       SECURE_BOOT_POLICIES, "flavor")
    image_sb = _value(image_properties, IMAGE_SECURE_BOOT_KEY, SECURE_BOOT_POLICIES, "image")
    if flavor_sb and image_sb and flavor_sb != image_sb:
        raise exception.InvalidFirmwareRequest(
            f"flavor {FLAVOR_SECURE_BOOT_KEY}={flavor_sb!r} conflicts with image "
            f"{IMAGE_SECURE_BOOT_KEY}={image_sb!r}: set one, or both to the same policy")
    return Firmware(type=kind, secure_boot=flavor_sb or image_sb or DISABLED)


def get_firmware(flavor_extra_specs: Mapping[str, object] | None,
                 image_properties: Mapping[str, object] | None) -> Firmware:
    """The firmware a server of this flavor + image boots through.

    :raises InvalidFirmwareRequest: as :func:`asked`, or Secure Boot required
        without UEFI.
    """
    fw = asked(flavor_extra_specs, image_properties)
    if fw.uefi:
        return fw
    if fw.secure_boot == REQUIRED:
        key = (FLAVOR_SECURE_BOOT_KEY if (flavor_extra_specs or {}).get(FLAVOR_SECURE_BOOT_KEY)
               else IMAGE_SECURE_BOOT_KEY)
        raise exception.InvalidFirmwareRequest(
            f"{key}=required needs UEFI firmware: set image {FIRMWARE_KEY}=uefi "
            f"(it is {fw.type!r})")
    return Firmware()  # Secure Boot is UEFI's: optional means none on BIOS


def check_boot(firmware: Firmware, *, direct_kernel: bool) -> None:
    """Refuse Secure Boot for a kernel libvirt hands to the guest directly.

    Such a kernel reaches the guest through QEMU's fw_cfg, not through the
    signed boot chain on a disk, so nothing would be verified.

    :raises InvalidFirmwareRequest: Secure Boot required with a direct kernel boot.
    """
    if direct_kernel and firmware.secure_boot == REQUIRED:
        raise exception.InvalidFirmwareRequest(
            f"{IMAGE_SECURE_BOOT_KEY}=required boots a signed boot chain from a disk: "
            "give a disk (--disk), not a kernel")
