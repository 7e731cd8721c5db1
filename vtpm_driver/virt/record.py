"""The standalone server record: an :class:`~vtpm_driver.model.server.Instance` in ``<metadata>``.

libvirt is the only store of a standalone server: its owner, flavor extra
specs, image properties, system metadata and boot files live in the domain's
``<metadata>`` under our own XML namespace :data:`NS` (prefix
:data:`NS_PREFIX`), so ``server list`` works after a restart::

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

This module is the model's serialisation, nothing more: :data:`FIELDS` maps
each element to where it lives on an ``Instance`` (the instance itself, its
``flavor`` or its ``image_meta``). Child elements are read by local name:
libvirt hands the element back without namespaces from ``virDomainGetMetadata``
and requires unqualified children in ``virDomainSetMetadata``. A string that
would not survive XML whitespace handling unchanged is stored base64-encoded
with ``encoding="base64"`` (``key-encoding`` for item keys), so every record
round-trips exactly. The record never holds a passphrase: only the Barbican
secret's UUID, in ``system_metadata['vtpm_secret_uuid']``.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import libvirt
from lxml import etree

from vtpm_driver import exception
from vtpm_driver.model.request import show
from vtpm_driver.model.server import Flavor, ImageMeta, Instance
from vtpm_driver.virt import connection, domain

NS = "https://github.com/vtpm-driver/xmlns/server/1.0"
NS_PREFIX = "vtpm"
RECORD_TAG = "server"

# Element name -> (holder, attribute); holder "" is the Instance itself.
# A unit test checks every stored attribute of the model appears here.
FIELDS: dict[str, tuple[str, str]] = {
    "name": ("", "name"),
    "uuid": ("", "uuid"),
    "user_id": ("", "user_id"),
    "project_id": ("", "project_id"),
    "user_name": ("", "user_name"),
    "project_name": ("", "project_name"),
    "flavor_extra_specs": ("flavor", "extra_specs"),
    "image_properties": ("image_meta", "properties"),
    "system_metadata": ("", "system_metadata"),
    "vcpus": ("flavor", "vcpus"),
    "memory_mb": ("flavor", "memory_mb"),
    "kernel": ("image_meta", "kernel"),
    "initrd": ("image_meta", "initrd"),
    "cmdline": ("image_meta", "cmdline"),
    "disk": ("image_meta", "disk"),
    "console_log": ("", "console_log"),
    "created_at": ("", "created_at"),
}
#: Model attributes deliberately not stored (resize bookkeeping; the flavor's
#: display name, which a standalone server does not have).
NOT_STORED = frozenset({("", "old_flavor"), ("", "new_flavor"), ("flavor", "name")})

REQUIRED_STR_FIELDS = ("name", "uuid", "user_id", "project_id")
OPTIONAL_STR_FIELDS = (
    "user_name", "project_name", "kernel", "initrd", "cmdline", "disk", "console_log",
    "created_at",
)
INT_FIELDS = ("vcpus", "memory_mb")
DICT_FIELDS = ("flavor_extra_specs", "image_properties", "system_metadata")
_ENCODING_ATTR = "encoding"
_KEY_ATTR = "key"
_KEY_ENCODING_ATTR = "key-encoding"
_BASE64 = "base64"
_PARSER = etree.XMLParser(
    resolve_entities=False, no_network=True, remove_blank_text=True, huge_tree=False
)


def _get(instance: Any, field: str) -> Any:
    holder, attr = FIELDS[field]
    owner = getattr(instance, holder, None) if holder else instance
    return getattr(owner, attr, None)


def _is_plain(value: str) -> bool:
    """True if ``value`` survives XML parsing and libvirt's re-indenting unchanged."""
    return value.isprintable() and value == value.strip()


def _encode(value: str) -> tuple[str, bool]:
    if _is_plain(value):
        return value, False
    return base64.b64encode(value.encode("utf-8", "surrogatepass")).decode("ascii"), True


def _malformed(reason: str) -> exception.VirtError:
    return exception.VirtError(f"server record in domain <metadata> is malformed: {reason}")


def _decode(text: str, encoded: bool, what: str) -> str:
    if not encoded:
        return text
    try:
        return base64.b64decode(text.encode("ascii"), validate=True).decode(
            "utf-8", "surrogatepass"
        )
    except (binascii.Error, UnicodeError, ValueError):
        raise _malformed(f"{what} is not valid base64") from None


def _check(instance: Any) -> dict[str, Any]:
    """The values to store, type-checked. :raises VirtError: naming the bad field."""
    values = {field: _get(instance, field) for field in FIELDS}
    for field in REQUIRED_STR_FIELDS:
        if not isinstance(values[field], str):
            raise exception.VirtError(
                f"invalid server record {field}={show(values[field])}: expected text"
            )
    for field in OPTIONAL_STR_FIELDS:
        if values[field] is not None and not isinstance(values[field], str):
            raise exception.VirtError(
                f"invalid server record {field}={show(values[field])}: expected text or None"
            )
    for field in INT_FIELDS:
        value = values[field]
        if isinstance(value, bool) or not isinstance(value, int):
            raise exception.VirtError(
                f"invalid server record {field}={show(value)}: expected an integer"
            )
    for field in DICT_FIELDS:
        value = values[field] if values[field] is not None else {}
        if not hasattr(value, "items") or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise exception.VirtError(
                f"invalid server record {field}={show(value)}: expected a mapping of strings"
            )
        values[field] = dict(value)
    return values


def record_element(instance: Any, *, qualified: bool = True) -> etree._Element:
    """The ``<server>`` element of an Instance-shaped ``instance``.

    ``qualified=False`` gives the form ``virDomainSetMetadata`` wants: no
    namespace at all (libvirt puts the root in :data:`NS` itself).

    :raises VirtError: a stored attribute has the wrong type.
    """
    values = _check(instance)

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

    for field in REQUIRED_STR_FIELDS:
        put(root, field, values[field])
    for field in INT_FIELDS:
        etree.SubElement(root, tag(field)).text = str(values[field])
    for field in OPTIONAL_STR_FIELDS:
        if values[field] is not None:
            put(root, field, values[field])
    for field in DICT_FIELDS:
        container = etree.SubElement(root, tag(field))
        for key, value in sorted(values[field].items()):
            item = put(container, "item", value)
            key_text, key_encoded = _encode(key)
            item.set(_KEY_ATTR, key_text)
            if key_encoded:
                item.set(_KEY_ENCODING_ATTR, _BASE64)
    return root


def record_xml(instance: Any, *, qualified: bool = True) -> str:
    """:func:`record_element` as a string (never holds a passphrase)."""
    return etree.tostring(record_element(instance, qualified=qualified), encoding="unicode")


def _local(el: etree._Element) -> str | None:
    return etree.QName(el).localname if isinstance(el.tag, str) else None


def _text(el: etree._Element, what: str) -> str:
    return _decode(el.text or "", el.get(_ENCODING_ATTR) == _BASE64, what)


def _instance(values: dict[str, Any]) -> Instance:
    parts: dict[str, dict[str, Any]] = {"": {}, "flavor": {}, "image_meta": {}}
    for field, value in values.items():
        holder, attr = FIELDS[field]
        parts[holder][attr] = value
    return Instance(flavor=Flavor(**parts["flavor"]),
                            image_meta=ImageMeta(**parts["image_meta"]), **parts[""])


def parse_record_element(root: etree._Element) -> Instance:
    """The :class:`~vtpm_driver.model.server.Instance` a ``<server>`` element describes.

    :raises VirtError: a required field is missing or a value is malformed.
    """
    values: dict[str, Any] = {}
    for el in root:
        name = _local(el)
        if name in REQUIRED_STR_FIELDS or name in OPTIONAL_STR_FIELDS:
            values[name] = _text(el, name)
        elif name in INT_FIELDS:
            try:
                values[name] = int((el.text or "").strip())
            except ValueError:
                raise _malformed(f"{name}={show(el.text)} is not an integer") from None
        elif name in DICT_FIELDS:
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
    missing = [field for field in REQUIRED_STR_FIELDS if field not in values]
    if missing:
        raise _malformed(f"missing {', '.join(missing)}")
    return _instance(values)


def parse_record_xml(xml: str) -> Instance:
    """The Instance stored as the XML of a ``<server>`` element.

    :raises VirtError: not a well-formed record.
    """
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


def set_server_record(domain_xml: str, instance: Any) -> str:
    """``domain_xml`` with ``instance``'s record in its ``<metadata>`` (replacing an older one).

    :raises VirtError: not a domain document, or a stored attribute has the wrong type.
    """
    element = record_element(instance)
    root = domain.parse_xml(domain_xml)
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
    return domain.to_text(root)


def get_server_record(domain_xml: str) -> Instance | None:
    """The server stored in ``domain_xml``'s ``<metadata>``, or None without a record."""
    found = _record_elements(domain.parse_xml(domain_xml))
    return parse_record_element(found[0]) if found else None


def remove_server_record(domain_xml: str) -> str:
    """``domain_xml`` without our server record."""
    root = domain.parse_xml(domain_xml)
    for old in _record_elements(root):
        old.getparent().remove(old)
    return domain.to_text(root)


# --------------------------------------------------------------------------- live domains


def _domain_label(dom: libvirt.virDomain) -> str:
    try:
        return f"domain {dom.name()!r}"
    except libvirt.libvirtError:
        return "domain"


def record_from_domain(dom: libvirt.virDomain) -> Instance | None:
    """The server a defined domain records, or None when it has no record (not ours).

    Reads the persistent record (``VIR_DOMAIN_AFFECT_CONFIG``): every write
    (:func:`update_domain_record`) goes there, while a running guest's live
    record can be older — a guest resumed from a managed save carries the XML
    of its save image, without the journal entry written just before the
    resume. A transient domain (no persistent config) is read live.

    :raises InstanceNotFound: the domain is gone.
    :raises VirtError: the record is malformed or libvirt refused.
    """
    try:
        try:
            xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS,
                               libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
                raise
            xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS, 0)  # transient
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return None
        raise connection.to_vtpm_error(exc, f"read server record of {_domain_label(dom)}") from exc
    return parse_record_xml(xml)


def update_domain_record(dom: libvirt.virDomain, instance: Any) -> None:
    """Store ``instance``'s record in a defined domain (persistent config, and live if running).

    Idempotent.

    :raises VirtError: a stored attribute has the wrong type, or libvirt refused.
    """
    xml = record_xml(instance, qualified=False)
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
