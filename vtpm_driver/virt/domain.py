"""Domain XML: the ``<tpm>`` device, a minimal guest, and the server record.

Pure string-in/string-out helpers (lxml, no libvirt calls) except the two
``*_domain_record`` functions at the end, which read and write the record of a
defined domain.

The server record (owner, flavor extra specs, image properties, system
metadata, boot files) lives in the domain's ``<metadata>`` under our own XML
namespace :data:`NS` with the prefix :data:`NS_PREFIX`, so libvirt is the only
store and ``server list`` works after a restart::

    <metadata>
      <vtpm:server xmlns:vtpm="https://github.com/vtpm-driver/xmlns/server/1.0">
        <vtpm:name>vm1</vtpm:name>
        <vtpm:uuid>...</vtpm:uuid>
        ...
        <vtpm:system_metadata>
          <vtpm:item key="vtpm_secret_uuid">...</vtpm:item>
        </vtpm:system_metadata>
      </vtpm:server>
    </metadata>

Child elements are read by local name: libvirt hands the element back without
namespaces from ``virDomainGetMetadata`` and requires unqualified children in
``virDomainSetMetadata``. A string that would not survive XML whitespace
handling unchanged (control characters, leading/trailing blanks, ...) is stored
base64-encoded with ``encoding="base64"`` (``key-encoding`` for item keys), so
every record round-trips exactly. The record never holds a passphrase: only the
Barbican secret's UUID, in ``system_metadata['vtpm_secret_uuid']``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os.path
from typing import Any, NamedTuple

import libvirt
from lxml import etree

from vtpm_driver import exception, spec
from vtpm_driver.virt import connection
from vtpm_driver.virt._validate import canonical_uuid, show

NS = "https://github.com/vtpm-driver/xmlns/server/1.0"
NS_PREFIX = "vtpm"
RECORD_TAG = "server"

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


def _parse(domain_xml: str) -> etree._Element:
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


def _serialize(root: etree._Element) -> str:
    return etree.tostring(root, encoding="unicode", pretty_print=True)


def _child(parent: etree._Element, tag: str) -> etree._Element:
    """``parent``'s first ``<tag>``, created (appended) when missing."""
    found = parent.find(tag)
    return found if found is not None else etree.SubElement(parent, tag)


# --------------------------------------------------------------------------- <tpm>


def add_tpm(domain_xml: str, version: str, model: str, secret_uuid: str | None) -> str:
    """``domain_xml`` with exactly one encrypted emulator ``<tpm>`` (SPEC E2).

    An existing ``<tpm>`` is replaced, so calling this twice never duplicates
    the device. Like Nova, refuses a vTPM without a secret: swtpm would keep
    the state unencrypted.

    :raises InvalidVTPMConfig: bad version/model pair or missing/invalid secret UUID.
    :raises VirtError: ``domain_xml`` is not a domain document.
    """
    if version not in spec.VERSIONS:
        raise exception.InvalidVTPMConfig(
            f"invalid TPM version={show(version)}: allowed values are {', '.join(spec.VERSIONS)}"
        )
    if model not in spec.MODELS:
        raise exception.InvalidVTPMConfig(
            f"invalid TPM model={show(model)}: allowed values are {', '.join(spec.MODELS)}"
        )
    if model == spec.MODEL_CRB and version != spec.VERSION_2_0:
        raise exception.InvalidVTPMConfig(
            f"invalid TPM model={model!r} with version={version!r}: "
            f"{spec.MODEL_CRB} needs TPM version {spec.VERSION_2_0}"
        )
    if not secret_uuid:
        raise exception.InvalidVTPMConfig(
            f"refusing to add a vTPM without a secret: vtpm_secret_uuid={show(secret_uuid)}"
        )
    secret_uuid = canonical_uuid(secret_uuid, "vtpm_secret_uuid", exception.InvalidVTPMConfig)
    root = _parse(domain_xml)
    devices = _child(root, "devices")
    for old in devices.findall("tpm"):
        devices.remove(old)
    tpm = etree.SubElement(devices, "tpm", model=model)
    backend = etree.SubElement(tpm, "backend", type="emulator", version=version)
    etree.SubElement(backend, "encryption", secret=secret_uuid)
    return _serialize(root)


def remove_tpm(domain_xml: str) -> str:
    """``domain_xml`` without any ``<tpm>`` device."""
    root = _parse(domain_xml)
    for devices in root.findall("devices"):
        for tpm in devices.findall("tpm"):
            devices.remove(tpm)
    return _serialize(root)


def get_tpm(domain_xml: str) -> TPMDevice | None:
    """(version, model, secret_uuid) of the domain's ``<tpm>``, or None without one."""
    tpm = _parse(domain_xml).find("devices/tpm")
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
) -> str:
    """A minimal q35 guest booting a kernel (+ initrd) or a virtio disk.

    No network, no graphics, ACPI on (the TPM is found through ACPI), serial
    console appended to ``console_log``; ``on_poweroff`` destroys it. Paths
    are not checked for existence: libvirt reports that when it starts.

    :raises VirtError: a missing, contradictory or malformed argument.
    """
    name = _check_name(name)
    uuid = canonical_uuid(uuid, "uuid")
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

    root = etree.Element("domain", type=virt_type)
    etree.SubElement(root, "name").text = name
    etree.SubElement(root, "uuid").text = uuid
    etree.SubElement(root, "memory", unit="MiB").text = str(memory_mb)
    etree.SubElement(root, "vcpu").text = str(vcpus)
    os_el = etree.SubElement(root, "os")
    etree.SubElement(os_el, "type", arch="x86_64", machine="q35").text = "hvm"
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
    etree.SubElement(serial, "source", path=console_log)
    etree.SubElement(serial, "target", port="0")
    console = etree.SubElement(devices, "console", type="file")
    etree.SubElement(console, "source", path=console_log)
    etree.SubElement(console, "target", type="serial", port="0")
    etree.SubElement(devices, "memballoon", model="none")
    return _serialize(root)


# --------------------------------------------------------------------------- server record


@dataclasses.dataclass
class ServerRecord:
    """Everything a standalone server needs besides its domain XML.

    ``system_metadata`` carries ``vtpm_secret_uuid`` (the Barbican secret's
    UUID), never a passphrase.
    """

    name: str
    uuid: str
    user_id: str
    project_id: str
    user_name: str | None = None
    project_name: str | None = None
    flavor_extra_specs: dict[str, str] = dataclasses.field(default_factory=dict)
    image_properties: dict[str, str] = dataclasses.field(default_factory=dict)
    system_metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    vcpus: int = 1
    memory_mb: int = 256
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    disk: str | None = None
    console_log: str | None = None
    created_at: str | None = None

    @property
    def vtpm_secret_uuid(self) -> str | None:
        return self.system_metadata.get("vtpm_secret_uuid")


# How each field is stored; a unit test checks this covers every field.
_REQUIRED_STR_FIELDS = ("name", "uuid", "user_id", "project_id")
_OPTIONAL_STR_FIELDS = (
    "user_name", "project_name", "kernel", "initrd", "cmdline", "disk", "console_log",
    "created_at",
)
_INT_FIELDS = ("vcpus", "memory_mb")
_DICT_FIELDS = ("flavor_extra_specs", "image_properties", "system_metadata")
_ENCODING_ATTR = "encoding"
_KEY_ATTR = "key"
_KEY_ENCODING_ATTR = "key-encoding"
_BASE64 = "base64"


def _is_plain(value: str) -> bool:
    """True if ``value`` survives XML parsing and libvirt's re-indenting unchanged."""
    return value.isprintable() and value == value.strip()


def _encode(value: str) -> tuple[str, bool]:
    if _is_plain(value):
        return value, False
    return base64.b64encode(value.encode("utf-8", "surrogatepass")).decode("ascii"), True


def _decode(text: str, encoded: bool, what: str) -> str:
    if not encoded:
        return text
    try:
        return base64.b64decode(text.encode("ascii"), validate=True).decode(
            "utf-8", "surrogatepass"
        )
    except (binascii.Error, UnicodeError, ValueError):
        raise _malformed(f"{what} is not valid base64") from None


def _malformed(reason: str) -> exception.VirtError:
    return exception.VirtError(f"server record in domain <metadata> is malformed: {reason}")


def _check_record(record: ServerRecord) -> None:
    if not isinstance(record, ServerRecord):
        raise exception.VirtError(f"expected a ServerRecord, got {type(record).__name__}")
    for field in _REQUIRED_STR_FIELDS:
        if not isinstance(getattr(record, field), str):
            raise exception.VirtError(
                f"invalid server record {field}={show(getattr(record, field))}: expected text"
            )
    for field in _OPTIONAL_STR_FIELDS:
        value = getattr(record, field)
        if value is not None and not isinstance(value, str):
            raise exception.VirtError(
                f"invalid server record {field}={show(value)}: expected text or None"
            )
    for field in _INT_FIELDS:
        value = getattr(record, field)
        if isinstance(value, bool) or not isinstance(value, int):
            raise exception.VirtError(
                f"invalid server record {field}={show(value)}: expected an integer"
            )
    for field in _DICT_FIELDS:
        value = getattr(record, field)
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise exception.VirtError(
                f"invalid server record {field}={show(value)}: expected a mapping of strings"
            )


def record_element(record: ServerRecord, *, qualified: bool = True) -> etree._Element:
    """The ``<server>`` element of ``record``.

    ``qualified=False`` gives the form ``virDomainSetMetadata`` wants: no
    namespace at all (libvirt puts the root in :data:`NS` itself).
    """
    _check_record(record)

    def tag(name: str) -> str:
        return f"{{{NS}}}{name}" if qualified else name

    root = etree.Element(tag(RECORD_TAG), nsmap={NS_PREFIX: NS} if qualified else None)

    def put(parent: etree._Element, name: str, value: str) -> etree._Element:
        el = etree.SubElement(parent, tag(name))
        text, encoded = _encode(value)
        el.text = text
        if encoded:
            el.set(_ENCODING_ATTR, _BASE64)
        return el

    for field in _REQUIRED_STR_FIELDS:
        put(root, field, getattr(record, field))
    for field in _INT_FIELDS:
        etree.SubElement(root, tag(field)).text = str(getattr(record, field))
    for field in _OPTIONAL_STR_FIELDS:
        value = getattr(record, field)
        if value is not None:
            put(root, field, value)
    for field in _DICT_FIELDS:
        container = etree.SubElement(root, tag(field))
        for key, value in sorted(getattr(record, field).items()):
            item = put(container, "item", value)
            key_text, key_encoded = _encode(key)
            item.set(_KEY_ATTR, key_text)
            if key_encoded:
                item.set(_KEY_ENCODING_ATTR, _BASE64)
    return root


def record_xml(record: ServerRecord, *, qualified: bool = True) -> str:
    """:func:`record_element` as a string."""
    return etree.tostring(record_element(record, qualified=qualified), encoding="unicode")


def _local(el: etree._Element) -> str | None:
    return etree.QName(el).localname if isinstance(el.tag, str) else None


def _text(el: etree._Element, what: str) -> str:
    return _decode(el.text or "", el.get(_ENCODING_ATTR) == _BASE64, what)


def parse_record_element(root: etree._Element) -> ServerRecord:
    """A :class:`ServerRecord` from its ``<server>`` element (any namespace form).

    :raises VirtError: a required field is missing or a value is malformed.
    """
    values: dict[str, Any] = {}
    for el in root:
        name = _local(el)
        if name in _REQUIRED_STR_FIELDS or name in _OPTIONAL_STR_FIELDS:
            values[name] = _text(el, name)
        elif name in _INT_FIELDS:
            try:
                values[name] = int((el.text or "").strip())
            except ValueError:
                raise _malformed(f"{name}={show(el.text)} is not an integer") from None
        elif name in _DICT_FIELDS:
            mapping: dict[str, str] = {}
            for item in el:
                if _local(item) != "item":
                    continue
                raw_key = item.get(_KEY_ATTR)
                if raw_key is None:
                    raise _malformed(f"an item of {name} has no key")
                key = _decode(raw_key, item.get(_KEY_ENCODING_ATTR) == _BASE64, f"{name} key")
                mapping[key] = _text(item, f"{name}[{key!r}]")
            values[name] = mapping
        # Unknown elements are ignored: a newer writer may add fields.
    missing = [field for field in _REQUIRED_STR_FIELDS if field not in values]
    if missing:
        raise _malformed(f"missing {', '.join(missing)}")
    return ServerRecord(**values)


def parse_record_xml(xml: str) -> ServerRecord:
    """A :class:`ServerRecord` from the XML of its ``<server>`` element."""
    try:
        root = etree.fromstring(xml.encode(), _PARSER)
    except etree.XMLSyntaxError as exc:
        raise _malformed(f"not well-formed XML: {exc}") from None
    if _local(root) != RECORD_TAG:
        raise _malformed(f"root element is <{root.tag}>, expected <{RECORD_TAG}>")
    return parse_record_element(root)


def _record_elements(root: etree._Element) -> list[etree._Element]:
    metadata = root.find("metadata")
    if metadata is None:
        return []
    return [el for el in metadata if isinstance(el.tag, str) and el.tag == f"{{{NS}}}{RECORD_TAG}"]


def set_server_record(domain_xml: str, record: ServerRecord) -> str:
    """``domain_xml`` with ``record`` in its ``<metadata>`` (replacing an older one)."""
    element = record_element(record)
    root = _parse(domain_xml)
    metadata = root.find("metadata")
    if metadata is None:
        metadata = etree.Element("metadata")
        # libvirt's schema wants <metadata> after name/uuid/title/description.
        anchor = 0
        for index, el in enumerate(root):
            if el.tag in ("name", "uuid", "genid", "title", "description"):
                anchor = index + 1
        root.insert(anchor, metadata)
    for old in _record_elements(root):
        metadata.remove(old)
    metadata.append(element)
    return _serialize(root)


def get_server_record(domain_xml: str) -> ServerRecord | None:
    """The server record in ``domain_xml``'s ``<metadata>``, or None without one."""
    found = _record_elements(_parse(domain_xml))
    return parse_record_element(found[0]) if found else None


def remove_server_record(domain_xml: str) -> str:
    """``domain_xml`` without our server record."""
    root = _parse(domain_xml)
    for old in _record_elements(root):
        old.getparent().remove(old)
    return _serialize(root)


# --------------------------------------------------------------------------- live domains


def _domain_label(dom: libvirt.virDomain) -> str:
    try:
        return f"domain {dom.name()!r}"
    except libvirt.libvirtError:
        return "domain"


def record_from_domain(dom: libvirt.virDomain) -> ServerRecord | None:
    """The server record of a defined domain, or None when it has none.

    Reads the live record of a running domain and the persistent one otherwise
    (``VIR_DOMAIN_AFFECT_CURRENT``).
    """
    try:
        xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS, 0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return None
        raise connection.to_vtpm_error(exc, f"read server record of {_domain_label(dom)}") from exc
    return parse_record_xml(xml)


def update_domain_record(dom: libvirt.virDomain, record: ServerRecord) -> None:
    """Store ``record`` in a defined domain (persistent config, and live if running)."""
    xml = record_xml(record, qualified=False)
    label = _domain_label(dom)
    try:
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        if dom.isActive():
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        try:
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, NS_PREFIX, NS, flags)
        except libvirt.libvirtError as exc:
            if not flags & libvirt.VIR_DOMAIN_AFFECT_LIVE or exc.get_error_code() != (
                libvirt.VIR_ERR_OPERATION_INVALID
            ):
                raise
            # It stopped between isActive() and setMetadata(): config only.
            dom.setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, NS_PREFIX, NS,
                libvirt.VIR_DOMAIN_AFFECT_CONFIG,
            )
    except libvirt.libvirtError as exc:
        raise connection.to_vtpm_error(exc, f"store server record of {label}") from exc
