"""Pure domain XML: <tpm> (E2), the minimal guest, and the server record."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from vtpm_driver import exception
from vtpm_driver.virt import domain

SECRET = "6f1c2a7e-0d1b-4c53-9a44-6a0b7b1f5d10"
OTHER_SECRET = "11111111-2222-4333-8444-555555555555"
UUID = "0b7e6f0e-3a8a-4f51-8c1f-1d2a3b4c5d6e"
LOG = "/var/lib/vtpm-driver/console/vm1.log"


def _guest(**kwargs: object) -> str:
    args: dict[str, object] = {
        "console_log": LOG,
        "kernel": "/boot/vmlinuz",
        "initrd": "/boot/initrd.img",
    }
    args.update(kwargs)
    return domain.guest_xml("vm1", UUID, 1, 256, **args)  # type: ignore[arg-type]


def _root(xml: str) -> etree._Element:
    return etree.fromstring(xml.encode())


# ------------------------------------------------------------------ <tpm>


@pytest.mark.parametrize(
    ("version", "model"), [("1.2", "tpm-tis"), ("2.0", "tpm-tis"), ("2.0", "tpm-crb")]
)
def test_add_tpm_exactly_one_device(version: str, model: str) -> None:
    xml = domain.add_tpm(_guest(), version, model, SECRET)
    tpms = _root(xml).findall("devices/tpm")
    assert len(tpms) == 1
    tpm = tpms[0]
    assert tpm.get("model") == model
    backend = tpm.find("backend")
    assert (backend.get("type"), backend.get("version")) == ("emulator", version)
    assert backend.find("encryption").get("secret") == SECRET
    assert domain.get_tpm(xml) == (version, model, SECRET)


def test_add_tpm_twice_replaces() -> None:
    once = domain.add_tpm(_guest(), "2.0", "tpm-tis", SECRET)
    twice = domain.add_tpm(once, "2.0", "tpm-crb", OTHER_SECRET)
    assert len(_root(twice).findall("devices/tpm")) == 1
    assert domain.get_tpm(twice) == ("2.0", "tpm-crb", OTHER_SECRET)
    assert domain.add_tpm(once, "2.0", "tpm-tis", SECRET) == once


def test_add_tpm_replaces_duplicates_and_keeps_other_devices() -> None:
    xml = (
        "<domain type='qemu'><name>x</name><devices><disk type='file'/>"
        "<tpm model='tpm-tis'><backend type='passthrough'/></tpm><tpm model='tpm-crb'/>"
        "</devices></domain>"
    )
    root = _root(domain.add_tpm(xml, "1.2", "tpm-tis", SECRET))
    assert len(root.findall("devices/tpm")) == 1
    assert root.find("devices/disk") is not None


def test_add_tpm_creates_devices() -> None:
    xml = domain.add_tpm("<domain type='qemu'><name>x</name></domain>", "2.0", "tpm-tis", SECRET)
    assert domain.get_tpm(xml) == ("2.0", "tpm-tis", SECRET)


@pytest.mark.parametrize("missing", [None, ""])
def test_add_tpm_refuses_without_secret(missing: str | None) -> None:
    with pytest.raises(exception.InvalidVTPMConfig, match="without a secret"):
        domain.add_tpm(_guest(), "2.0", "tpm-tis", missing)


@pytest.mark.parametrize(
    ("version", "model", "secret", "needle"),
    [
        ("3.0", "tpm-tis", SECRET, "'3.0'"),
        ("2.0", "tpm-foo", SECRET, "'tpm-foo'"),
        ("1.2", "tpm-crb", SECRET, "tpm-crb"),
        ("2.0", "tpm-tis", "not-a-uuid", "'not-a-uuid'"),
        ("2.0", "tpm-tis", "'/><evil/>", "vtpm_secret_uuid"),
    ],
)
def test_add_tpm_refuses_bad_values(version: str, model: str, secret: str, needle: str) -> None:
    with pytest.raises(exception.InvalidVTPMConfig) as info:
        domain.add_tpm(_guest(), version, model, secret)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "bad", ["", "<notclosed>", "<secret/>", "<!DOCTYPE x [<!ENTITY a 'b'>]><x/>"]
)
def test_xml_functions_refuse_non_domain_documents(bad: str) -> None:
    for call in (
        lambda: domain.add_tpm(bad, "2.0", "tpm-tis", SECRET),
        lambda: domain.remove_tpm(bad),
        lambda: domain.get_tpm(bad),
        lambda: domain.get_server_record(bad),
    ):
        with pytest.raises(exception.VirtError):
            call()


def test_entities_are_not_expanded() -> None:
    xml = (
        "<!DOCTYPE domain [<!ENTITY e SYSTEM 'file:///etc/passwd'>]>"
        "<domain type='qemu'><name>&e;</name></domain>"
    )
    out = domain.add_tpm(xml, "2.0", "tpm-tis", SECRET)
    assert "root:" not in out


def test_remove_and_get_tpm() -> None:
    xml = domain.add_tpm(_guest(), "2.0", "tpm-tis", SECRET)
    removed = domain.remove_tpm(xml)
    assert domain.get_tpm(removed) is None
    assert _root(removed).find("devices/serial") is not None
    assert domain.get_tpm(_guest()) is None
    bare = (
        "<domain><devices><tpm model='tpm-tis'><backend type='passthrough'/></tpm>"
        "</devices></domain>"
    )
    assert domain.get_tpm(bare) == (None, "tpm-tis", None)


# ------------------------------------------------------------------ guest


def test_guest_xml_kernel_boot() -> None:
    root = _root(_guest())
    assert root.tag == "domain" and root.get("type") == "qemu"
    assert root.findtext("name") == "vm1"
    assert root.findtext("uuid") == UUID
    assert root.find("memory").get("unit") == "MiB" and root.findtext("memory") == "256"
    assert root.findtext("vcpu") == "1"
    os_type = root.find("os/type")
    assert (os_type.text, os_type.get("arch"), os_type.get("machine")) == ("hvm", "x86_64", "q35")
    assert root.findtext("os/kernel") == "/boot/vmlinuz"
    assert root.findtext("os/initrd") == "/boot/initrd.img"
    assert root.findtext("os/cmdline") == "console=ttyS0"
    assert root.find("features/acpi") is not None
    assert root.findtext("on_poweroff") == "destroy"
    assert root.find("devices/serial").get("type") == "file"
    assert root.find("devices/serial/source").get("path") == LOG
    assert root.find("devices/console/source").get("path") == LOG
    assert root.find("devices/interface") is None
    assert root.find("devices/disk") is None


def test_guest_xml_cmdline_and_kvm() -> None:
    root = _root(_guest(cmdline="console=ttyS0 vtpm_test=stay", virt_type="kvm"))
    assert root.findtext("os/cmdline") == "console=ttyS0 vtpm_test=stay"
    assert root.get("type") == "kvm"


@pytest.mark.parametrize(
    ("path", "fmt", "expected"),
    [
        ("/img/a.qcow2", None, "qcow2"),
        ("/img/a.QCOW2", None, "qcow2"),
        ("/img/a.raw", None, "raw"),
        ("/img/a.img", None, "raw"),
        ("/img/a.disk", "raw", "raw"),
    ],
)
def test_guest_xml_disk_boot(path: str, fmt: str | None, expected: str) -> None:
    root = _root(
        domain.guest_xml("vm1", UUID, 2, 512, console_log=LOG, disk=path, disk_format=fmt)
    )
    disk = root.find("devices/disk")
    assert (disk.get("type"), disk.get("device")) == ("file", "disk")
    assert disk.find("driver").get("type") == expected
    assert disk.find("source").get("file") == path
    assert disk.find("target").get("bus") == "virtio"
    assert root.find("os/kernel") is None
    assert root.findtext("vcpu") == "2"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"kernel": None}, "neither"),
        ({"disk": "/img/a.qcow2"}, "both"),
        ({"kernel": None, "initrd": None, "disk": "/img/a.vmdk"}, "disk_format"),
        ({"kernel": None, "initrd": None, "disk": "/a", "disk_format": "vmdk"}, "'vmdk'"),
        ({"kernel": "vmlinuz"}, "absolute"),
        ({"console_log": "console.log"}, "absolute"),
        ({"console_log": ""}, "console_log"),
        ({"virt_type": "xen"}, "'xen'"),
        ({"cmdline": "a\nb"}, "cmdline"),
        ({"kernel": "/boot/vm\x00linuz"}, "kernel"),
    ],
)
def test_guest_xml_refuses_bad_arguments(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(exception.VirtError) as info:
        _guest(**kwargs)
    assert needle in str(info.value)


def test_guest_xml_refuses_disk_with_initrd() -> None:
    with pytest.raises(exception.VirtError, match="initrd"):
        domain.guest_xml(
            "vm1", UUID, 1, 256, console_log=LOG, disk="/a.raw", initrd="/i"
        )


@pytest.mark.parametrize(
    ("name", "uuid", "vcpus", "memory_mb", "needle"),
    [
        ("", UUID, 1, 256, "name"),
        ("a/b", UUID, 1, 256, "name"),
        ("x", "nope", 1, 256, "uuid"),
        ("x", UUID, 0, 256, "vcpus"),
        ("x", UUID, True, 256, "vcpus"),
        ("x", UUID, 1, 8, "memory_mb"),
        ("x", UUID, 1, "256", "memory_mb"),
    ],
)
def test_guest_xml_refuses_bad_identity(
    name: str, uuid: str, vcpus: int, memory_mb: int, needle: str
) -> None:
    with pytest.raises(exception.VirtError, match=needle):
        domain.guest_xml(name, uuid, vcpus, memory_mb, console_log=LOG, kernel="/k")


def test_guest_xml_escapes_text() -> None:
    root = _root(domain.guest_xml("a<b>&'\"", UUID, 1, 256, console_log=LOG, kernel="/k"))
    assert root.findtext("name") == "a<b>&'\""


# ------------------------------------------------------------------ server record


def _record(**kwargs: object) -> domain.ServerRecord:
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
    return domain.ServerRecord(**values)  # type: ignore[arg-type]


def test_field_table_covers_every_field() -> None:
    stored = (
        domain._REQUIRED_STR_FIELDS
        + domain._OPTIONAL_STR_FIELDS
        + domain._INT_FIELDS
        + domain._DICT_FIELDS
    )
    assert sorted(stored) == sorted(f.name for f in dataclasses.fields(domain.ServerRecord))
    assert len(set(stored)) == len(stored)


def test_record_round_trip_in_domain_xml() -> None:
    record = _record()
    xml = domain.set_server_record(_guest(), record)
    assert domain.get_server_record(xml) == record
    assert record.vtpm_secret_uuid == SECRET
    root = _root(xml)
    (server,) = root.find("metadata")
    assert server.tag == f"{{{domain.NS}}}server"
    assert server.prefix == "vtpm"
    assert server.find(f"{{{domain.NS}}}name").text == "vm1"
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
    xml = domain.set_server_record(xml, _record(name="first"))
    xml = domain.set_server_record(xml, _record(name="second"))
    metadata = _root(xml).find("metadata")
    assert len(metadata) == 2
    assert domain.get_server_record(xml).name == "second"
    assert domain.get_server_record(domain.remove_server_record(xml)) is None
    assert domain.get_server_record(_guest()) is None


def test_record_with_minimal_fields_round_trips() -> None:
    record = domain.ServerRecord(name="n", uuid=UUID, user_id="", project_id="p")
    assert domain.get_server_record(domain.set_server_record(_guest(), record)) == record


def test_record_unqualified_form_for_set_metadata() -> None:
    record = _record()
    xml = domain.record_xml(record, qualified=False)
    assert "xmlns" not in xml
    assert domain.parse_record_xml(xml) == record
    # What virDomainGetMetadata returns: indented, no namespace.
    pretty = etree.tostring(etree.fromstring(xml), pretty_print=True, encoding="unicode")
    assert domain.parse_record_xml(pretty) == record


def test_record_never_holds_a_passphrase_field() -> None:
    names = {f.name for f in dataclasses.fields(domain.ServerRecord)}
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
        domain.set_server_record(_guest(), _record(**{field: value}))


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
        f"<domain><metadata><vtpm:server xmlns:vtpm='{domain.NS}'>{body}</vtpm:server>"
        "</metadata></domain>"
    )
    with pytest.raises(exception.VirtError, match="malformed") as info:
        domain.get_server_record(xml)
    assert needle in str(info.value)


def test_record_in_another_namespace_is_ignored() -> None:
    xml = (
        "<domain><metadata><x:server xmlns:x='urn:other'><x:name>n</x:name></x:server>"
        "</metadata></domain>"
    )
    assert domain.get_server_record(xml) is None


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
    record = _record(
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
    xml = domain.set_server_record(_guest(), record)
    assert domain.get_server_record(xml) == record
    assert domain.parse_record_xml(domain.record_xml(record, qualified=False)) == record
