"""The server record: an Instance serialised in the domain's <metadata>."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from vtpm_driver import exception
from vtpm_driver.model.server import Flavor, ImageMeta, Instance
from vtpm_driver.virt import domain, record

SECRET = "6f1c2a7e-0d1b-4c53-9a44-6a0b7b1f5d10"
UUID = "0b7e6f0e-3a8a-4f51-8c1f-1d2a3b4c5d6e"
LOG = "/var/lib/vtpm-driver/console/vm1.log"


def _guest() -> str:
    return domain.guest_xml("vm1", UUID, 1, 256, console_log=LOG, kernel="/boot/vmlinuz",
                            initrd="/boot/initrd.img")


def _root(xml: str) -> etree._Element:
    return etree.fromstring(xml.encode())


def test_functions_refuse_non_domain_documents() -> None:
    with pytest.raises(exception.VirtError):
        record.get_server_record("<notadomain/>")


def _record(**kwargs: object) -> Instance:
    """A full Instance; keyword arguments use the record's flat field names."""
    values: dict[str, object] = {
        "name": "vm1",
        "uuid": UUID,
        "user_id": "u1",
        "project_id": "p1",
        "user_name": "alice",
        "project_name": "demo",
        "flavor_extra_specs": {"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"},
        "image_properties": {"hw_tpm_model": "tpm-crb"},
        "system_metadata": {"vtpm_secret_uuid": SECRET},
        "vcpus": 2,
        "memory_mb": 512,
        "kernel": "/boot/vmlinuz",
        "initrd": "/boot/initrd.img",
        "cmdline": "console=ttyS0",
        "console_log": LOG,
        "created_at": "2026-01-02T03:04:05+00:00",
    }
    values.update(kwargs)
    parts: dict[str, dict[str, object]] = {"": {}, "flavor": {}, "image_meta": {}}
    for field, value in values.items():
        holder, attr = record.FIELDS[field]
        parts[holder][attr] = value
    return Instance(flavor=Flavor(**parts["flavor"]),  # type: ignore[arg-type]
                            image_meta=ImageMeta(**parts["image_meta"]),  # type: ignore
                            **parts[""])  # type: ignore[arg-type]


def _model_attributes() -> set[tuple[str, str]]:
    found = {("", f.name) for f in dataclasses.fields(Instance)
             if f.name not in ("flavor", "image_meta")}
    found |= {("flavor", f.name) for f in dataclasses.fields(Flavor)}
    found |= {("image_meta", f.name) for f in dataclasses.fields(ImageMeta)}
    return found


def test_field_table_covers_every_attribute_of_the_model() -> None:
    stored = (
        record.REQUIRED_STR_FIELDS
        + record.OPTIONAL_STR_FIELDS
        + record.INT_FIELDS
        + record.DICT_FIELDS
    )
    assert sorted(stored) == sorted(record.FIELDS)
    assert len(set(stored)) == len(stored)
    assert set(record.FIELDS.values()) | record.NOT_STORED == _model_attributes()
    assert not set(record.FIELDS.values()) & record.NOT_STORED


def test_record_round_trip_in_domain_xml() -> None:
    server = _record()
    xml = record.set_server_record(_guest(), server)
    assert record.get_server_record(xml) == server
    assert server.vtpm_secret_uuid == SECRET
    root = _root(xml)
    (server,) = root.find("metadata")
    assert server.tag == f"{{{record.NS}}}server"
    assert server.prefix == "vtpm"
    assert server.find(f"{{{record.NS}}}name").text == "vm1"
    # <metadata> sits right after <uuid> (libvirt's order), devices untouched.
    tags = [el.tag for el in root]
    assert tags.index("metadata") == tags.index("uuid") + 1
    assert root.find("devices/serial") is not None


def test_record_set_twice_replaces_and_keeps_foreign_metadata() -> None:
    xml = (
        "<domain type='qemu'><name>x</name><metadata>"
        "<nova:instance xmlns:nova='http://openstack.org/xmlns/libvirt/nova/1.1'/>"
        "</metadata></domain>"
    )
    xml = record.set_server_record(xml, _record(name="first"))
    xml = record.set_server_record(xml, _record(name="second"))
    metadata = _root(xml).find("metadata")
    assert len(metadata) == 2
    assert record.get_server_record(xml).name == "second"
    assert record.get_server_record(record.remove_server_record(xml)) is None
    assert record.get_server_record(_guest()) is None


def test_record_with_minimal_fields_round_trips() -> None:
    server = Instance(name="n", uuid=UUID, user_id="", project_id="p")
    assert record.get_server_record(record.set_server_record(_guest(), server)) == server


def test_record_unqualified_form_for_set_metadata() -> None:
    server = _record()
    xml = record.record_xml(server, qualified=False)
    assert "xmlns" not in xml
    assert record.parse_record_xml(xml) == server
    # What virDomainGetMetadata returns: indented, no namespace.
    pretty = etree.tostring(etree.fromstring(xml), pretty_print=True, encoding="unicode")
    assert record.parse_record_xml(pretty) == server


def test_record_never_holds_a_passphrase_field() -> None:
    names = set(record.FIELDS)
    assert not any("pass" in n or "password" in n for n in names)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", None),
        ("vcpus", "2"),
        ("vcpus", True),
        ("kernel", 5),
        ("system_metadata", {"k": 1}),
        ("flavor_extra_specs", ["a"]),
    ],
)
def test_record_refuses_bad_types(field: str, value: object) -> None:
    with pytest.raises(exception.VirtError, match=field):
        record.set_server_record(_guest(), _record(**{field: value}))


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("<vtpm:name>x</vtpm:name>", "missing uuid"),
        (
            f"<vtpm:name>x</vtpm:name><vtpm:uuid>{UUID}</vtpm:uuid><vtpm:user_id>u</vtpm:user_id>"
            "<vtpm:project_id>p</vtpm:project_id><vtpm:vcpus>two</vtpm:vcpus>",
            "vcpus",
        ),
        (
            f"<vtpm:name encoding='base64'>!!!</vtpm:name><vtpm:uuid>{UUID}</vtpm:uuid>"
            "<vtpm:user_id>u</vtpm:user_id><vtpm:project_id>p</vtpm:project_id>",
            "base64",
        ),
        (
            f"<vtpm:name>x</vtpm:name><vtpm:uuid>{UUID}</vtpm:uuid><vtpm:user_id>u</vtpm:user_id>"
            "<vtpm:project_id>p</vtpm:project_id><vtpm:system_metadata><vtpm:item>v</vtpm:item>"
            "</vtpm:system_metadata>",
            "no key",
        ),
    ],
)
def test_malformed_record_is_a_virt_error(body: str, needle: str) -> None:
    xml = (
        f"<domain><metadata><vtpm:server xmlns:vtpm='{record.NS}'>{body}</vtpm:server>"
        "</metadata></domain>"
    )
    with pytest.raises(exception.VirtError, match="malformed") as info:
        record.get_server_record(xml)
    assert needle in str(info.value)


def test_record_in_another_namespace_is_ignored() -> None:
    xml = (
        "<domain><metadata><x:server xmlns:x='urn:other'><x:name>n</x:name></x:server>"
        "</metadata></domain>"
    )
    assert record.get_server_record(xml) is None


_text = st.text(max_size=40)
_mapping = st.dictionaries(_text, _text, max_size=5)


@settings(max_examples=150, deadline=None)
@given(
    name=_text,
    user_id=_text,
    user_name=st.none() | _text,
    cmdline=st.none() | _text,
    created_at=st.none() | _text,
    extra=_mapping,
    props=_mapping,
    sysmeta=_mapping,
    vcpus=st.integers(min_value=-(2**70), max_value=2**70),
)
def test_record_round_trips_any_strings(
    name: str,
    user_id: str,
    user_name: str | None,
    cmdline: str | None,
    created_at: str | None,
    extra: dict[str, str],
    props: dict[str, str],
    sysmeta: dict[str, str],
    vcpus: int,
) -> None:
    server = _record(
        name=name,
        user_id=user_id,
        user_name=user_name,
        cmdline=cmdline,
        created_at=created_at,
        flavor_extra_specs=extra,
        image_properties=props,
        system_metadata=sysmeta,
        vcpus=vcpus,
    )
    xml = record.set_server_record(_guest(), server)
    assert record.get_server_record(xml) == server
    assert record.parse_record_xml(record.record_xml(server, qualified=False)) == server


class _ResumedDomain:
    """A running guest resumed from a managed save: its live record is the save
    image's (older), its persistent record the latest write."""

    def __init__(self, live: str, config: str | None, transient: bool = False) -> None:
        self.live, self.config, self.transient = live, config, transient
        self.asked: list[int] = []

    def name(self) -> str:
        return "vm"

    def metadata(self, kind: int, uri: str, flags: int) -> str:
        import libvirt

        self.asked.append(flags)
        if flags & libvirt.VIR_DOMAIN_AFFECT_CONFIG:
            if self.transient:
                err = libvirt.libvirtError("transient domain has no persistent config")
                err.err = (libvirt.VIR_ERR_OPERATION_INVALID, 0, "", 0, "", None, None, 0, 0)
                raise err
            return self.config
        return self.live


def _with_intent(intent: str | None) -> str:
    inst = Instance(name="vm", uuid="0b5c1f7e-9a61-4c6d-9d8e-6a1f0c1d2e3f",
                            user_id="u", project_id="p")
    if intent:
        inst.system_metadata["vtpm_intent"] = intent
    return record.record_xml(inst)


def test_record_is_read_from_the_persistent_config_not_a_resumed_live_one():
    """A journal entry written just before a resume is seen by the next operation
    (issue 13 fault row resume@launch.started: the live XML of a guest restored
    from its save image lacks it)."""
    dom = _ResumedDomain(live=_with_intent(None), config=_with_intent('{"op": "start"}'))
    server = record.record_from_domain(dom)
    assert server.system_metadata.get("vtpm_intent") == '{"op": "start"}'


def test_record_of_a_transient_domain_is_read_live():
    dom = _ResumedDomain(live=_with_intent('{"op": "x"}'), config=None, transient=True)
    assert record.record_from_domain(dom).system_metadata["vtpm_intent"] == '{"op": "x"}'
    assert len(dom.asked) == 2
