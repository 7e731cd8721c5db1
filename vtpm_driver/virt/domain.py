"""Domain XML, pure: the ``<tpm>`` device (SPEC E2) and a minimal guest.

String-in/string-out helpers over lxml; no libvirt calls. The standalone
server record that also lives in the domain XML is
:mod:`vtpm_driver.virt.record`.
"""

from __future__ import annotations

import os.path
from typing import NamedTuple

from lxml import etree

from vtpm_driver import exception
from vtpm_driver.model import request
from vtpm_driver.model.request import show
from vtpm_driver.model.server import require_uuid

DEFAULT_CMDLINE = "console=ttyS0"
VIRT_TYPES = ("qemu", "kvm")
DISK_FORMATS = ("qcow2", "raw")
_DISK_EXTENSIONS = {".qcow2": "qcow2", ".qcow": "qcow2", ".raw": "raw", ".img": "raw"}
_MIN_MEMORY_MB = 16

_PARSER = etree.XMLParser(
    resolve_entities=False, no_network=True, remove_blank_text=True, huge_tree=False
)


class TPMDevice(NamedTuple):
    """What a domain's ``<tpm>`` says (None for an absent attribute)."""

    version: str | None
    model: str | None
    secret_uuid: str | None


# --------------------------------------------------------------------------- parsing


def parse_xml(domain_xml: str | bytes) -> etree._Element:
    """The ``<domain>`` root of ``domain_xml`` (entities never expanded).

    :raises VirtError: not text, not well-formed, or not a domain document.
    """
    if not isinstance(domain_xml, str | bytes):
        raise exception.VirtError(
            f"domain XML must be text, got {type(domain_xml).__name__}"
        )
    data = domain_xml.encode() if isinstance(domain_xml, str) else domain_xml
    try:
        root = etree.fromstring(data, _PARSER)
    except etree.XMLSyntaxError as exc:
        raise exception.VirtError(f"domain XML is not well-formed: {exc}") from None
    if root.tag != "domain":
        raise exception.VirtError(f"not a domain XML document: root element is <{root.tag}>")
    return root


def to_text(root: etree._Element) -> str:
    """The document of ``root``, pretty-printed."""
    return etree.tostring(root, encoding="unicode", pretty_print=True)


def _child(parent: etree._Element, tag: str) -> etree._Element:
    """``parent``'s first ``<tag>``, created (appended) when missing."""
    found = parent.find(tag)
    return found if found is not None else etree.SubElement(parent, tag)


# --------------------------------------------------------------------------- <tpm>


def add_tpm(domain_xml: str, version: str, model: str, secret_uuid: str | None,
            pcr_banks: tuple[str, ...] = ()) -> str:
    """``domain_xml`` with exactly one encrypted emulator ``<tpm>`` (SPEC E2).

    ``pcr_banks``: the banks libvirt has swtpm_setup activate when it
    manufactures the TPM (``<active_pcr_banks>``); empty: swtpm's default.

    An existing ``<tpm>`` is replaced, so calling this twice never duplicates
    the device. Like Nova, refuses a vTPM without a secret: swtpm would keep
    the state unencrypted.

    :raises InvalidVTPMConfig: bad version/model pair or missing/invalid secret UUID.
    :raises VirtError: ``domain_xml`` is not a domain document.
    """
    if version not in request.VERSIONS:
        raise exception.InvalidVTPMConfig(
            f"invalid TPM version={show(version)}: allowed values are "
            f"{', '.join(request.VERSIONS)}"
        )
    if model not in request.MODELS:
        raise exception.InvalidVTPMConfig(
            f"invalid TPM model={show(model)}: allowed values are {', '.join(request.MODELS)}"
        )
    if model == request.MODEL_CRB and version != request.VERSION_2_0:
        raise exception.InvalidVTPMConfig(
            f"invalid TPM model={model!r} with version={version!r}: "
            f"{request.MODEL_CRB} needs TPM version {request.VERSION_2_0}"
        )
    if not secret_uuid:
        raise exception.InvalidVTPMConfig(
            f"refusing to add a vTPM without a secret: vtpm_secret_uuid={show(secret_uuid)}"
        )
    secret_uuid = require_uuid(secret_uuid, "vtpm_secret_uuid", exception.InvalidVTPMConfig)
    root = parse_xml(domain_xml)
    devices = _child(root, "devices")
    for old in devices.findall("tpm"):
        devices.remove(old)
    tpm = etree.SubElement(devices, "tpm", model=model)
    backend = etree.SubElement(tpm, "backend", type="emulator", version=version)
    etree.SubElement(backend, "encryption", secret=secret_uuid)
    if pcr_banks:
        banks = etree.SubElement(backend, "active_pcr_banks")
        for bank in pcr_banks:
            etree.SubElement(banks, bank)
    return to_text(root)


def remove_tpm(domain_xml: str) -> str:
    """``domain_xml`` without any ``<tpm>`` device."""
    root = parse_xml(domain_xml)
    for devices in root.findall("devices"):
        for tpm in devices.findall("tpm"):
            devices.remove(tpm)
    return to_text(root)


def get_tpm(domain_xml: str) -> TPMDevice | None:
    """(version, model, secret_uuid) of the domain's ``<tpm>``, or None without one."""
    tpm = parse_xml(domain_xml).find("devices/tpm")
    if tpm is None:
        return None
    backend = tpm.find("backend")
    encryption = backend.find("encryption") if backend is not None else None
    return TPMDevice(
        version=backend.get("version") if backend is not None else None,
        model=tpm.get("model"),
        secret_uuid=encryption.get("secret") if encryption is not None else None,
    )


# --------------------------------------------------------------------------- guest


def _check_path(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or not value.isprintable():
        raise exception.VirtError(f"invalid {what}={show(value)}: expected an absolute path")
    if not os.path.isabs(value):
        raise exception.VirtError(f"invalid {what}={show(value)}: the path must be absolute")
    return os.path.normpath(value)


def _check_int(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise exception.VirtError(
            f"invalid {what}={show(value)}: expected an integer >= {minimum}"
        )
    return value


def _check_name(name: object) -> str:
    if (
        not isinstance(name, str)
        or not name.strip()
        or not name.isprintable()
        or "/" in name
        or len(name) > 255
    ):
        raise exception.VirtError(
            f"invalid name={show(name)}: expected 1-255 printable characters without '/'"
        )
    return name


def disk_format_for(path: str, disk_format: str | None = None) -> str:
    """``disk_format`` if given, else ``qcow2``/``raw`` from the file extension."""
    if disk_format is not None:
        if disk_format not in DISK_FORMATS:
            raise exception.VirtError(
                f"invalid disk_format={show(disk_format)}: allowed values are "
                f"{', '.join(DISK_FORMATS)}"
            )
        return disk_format
    ext = os.path.splitext(path)[1].lower()
    if ext not in _DISK_EXTENSIONS:
        raise exception.VirtError(
            f"cannot tell the format of disk={show(path)} from its extension "
            f"({', '.join(sorted(_DISK_EXTENSIONS))}): pass disk_format"
        )
    return _DISK_EXTENSIONS[ext]


def guest_xml(
    name: str,
    uuid: str,
    vcpus: int,
    memory_mb: int,
    *,
    console_log: str,
    kernel: str | None = None,
    initrd: str | None = None,
    cmdline: str | None = None,
    disk: str | None = None,
    disk_format: str | None = None,
    virt_type: str = "qemu",
    uefi: bool = False,
    secure_boot: bool | None = None,
) -> str:
    """A minimal q35 guest booting a kernel (+ initrd) or a virtio disk.

    ``uefi``: boot through UEFI firmware (libvirt picks an OVMF build from the
    host's firmware descriptors, and gives the domain its own NVRAM).
    ``secure_boot`` (UEFI only): True asks for Secure Boot with the vendors'
    keys enrolled (and the SMM it needs), False for firmware without it, None
    lets libvirt choose (its descriptors rank Secure Boot first).

    No network, no graphics, ACPI on (the TPM is found through ACPI), serial
    console appended to ``console_log`` (``append='on'``: QEMU would otherwise
    truncate the file at every start, and a file the user chose is only ever
    appended to; the driver empties its own logs itself); ``on_poweroff``
    destroys it. Paths are not checked for existence: libvirt reports that
    when it starts.

    :raises VirtError: a missing, contradictory or malformed argument.
    """
    name = _check_name(name)
    uuid = require_uuid(uuid, "uuid")
    vcpus = _check_int(vcpus, "vcpus", 1)
    memory_mb = _check_int(memory_mb, "memory_mb", _MIN_MEMORY_MB)
    console_log = _check_path(console_log, "console_log")
    if virt_type not in VIRT_TYPES:
        raise exception.VirtError(
            f"invalid virt_type={show(virt_type)}: allowed values are {', '.join(VIRT_TYPES)}"
        )
    if (kernel is None) == (disk is None):
        raise exception.VirtError(
            f"give either kernel or disk, not {'both' if kernel is not None else 'neither'}"
        )
    if disk is not None and (initrd is not None or cmdline is not None):
        raise exception.VirtError("initrd and cmdline go with kernel, not with disk")
    if cmdline is not None and (not isinstance(cmdline, str) or not cmdline.isprintable()):
        raise exception.VirtError(f"invalid cmdline={show(cmdline)}: expected printable text")
    if secure_boot is not None and not uefi:
        raise exception.VirtError("secure_boot goes with uefi firmware")

    root = etree.Element("domain", type=virt_type)
    etree.SubElement(root, "name").text = name
    etree.SubElement(root, "uuid").text = uuid
    etree.SubElement(root, "memory", unit="MiB").text = str(memory_mb)
    etree.SubElement(root, "vcpu").text = str(vcpus)
    os_el = etree.SubElement(root, "os")
    etree.SubElement(os_el, "type", arch="x86_64", machine="q35").text = "hvm"
    if uefi:
        os_el.set("firmware", "efi")
        if secure_boot is not None:
            wanted = "yes" if secure_boot else "no"
            fw = etree.SubElement(os_el, "firmware")
            etree.SubElement(fw, "feature", enabled=wanted, name="secure-boot")
            if secure_boot:
                etree.SubElement(fw, "feature", enabled="yes", name="enrolled-keys")
                # libvirt takes secure='no' as a conflict with autoselection, 'yes' not.
                etree.SubElement(os_el, "loader", secure="yes")
    if kernel is not None:
        etree.SubElement(os_el, "kernel").text = _check_path(kernel, "kernel")
        if initrd is not None:
            etree.SubElement(os_el, "initrd").text = _check_path(initrd, "initrd")
        etree.SubElement(os_el, "cmdline").text = (
            DEFAULT_CMDLINE if cmdline is None else cmdline
        )
    else:
        etree.SubElement(os_el, "boot", dev="hd")
    features = etree.SubElement(root, "features")
    etree.SubElement(features, "acpi")
    if secure_boot:
        # OVMF keeps Secure Boot's variables out of the guest's reach only in SMM.
        etree.SubElement(features, "smm", state="on")
    etree.SubElement(root, "clock", offset="utc")
    etree.SubElement(root, "on_poweroff").text = "destroy"
    etree.SubElement(root, "on_reboot").text = "restart"
    etree.SubElement(root, "on_crash").text = "destroy"

    devices = etree.SubElement(root, "devices")
    if disk is not None:
        disk = _check_path(disk, "disk")
        disk_el = etree.SubElement(devices, "disk", type="file", device="disk")
        etree.SubElement(disk_el, "driver", name="qemu", type=disk_format_for(disk, disk_format))
        etree.SubElement(disk_el, "source", file=disk)
        etree.SubElement(disk_el, "target", dev="vda", bus="virtio")
    serial = etree.SubElement(devices, "serial", type="file")
    etree.SubElement(serial, "source", path=console_log, append="on")
    etree.SubElement(serial, "target", port="0")
    console = etree.SubElement(devices, "console", type="file")
    etree.SubElement(console, "source", path=console_log, append="on")
    etree.SubElement(console, "target", type="serial", port="0")
    etree.SubElement(devices, "memballoon", model="none")
    return to_text(root)
