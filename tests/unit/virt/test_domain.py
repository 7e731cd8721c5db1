"""Pure domain XML: <tpm> (E2) and the minimal guest."""

from __future__ import annotations

import pytest
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


def test_add_tpm_with_pcr_banks_names_them_in_the_backend() -> None:
    xml = domain.add_tpm(_guest(), "2.0", "tpm-crb", SECRET, ("sha256", "sha384"))
    banks = _root(xml).find("devices/tpm/backend/active_pcr_banks")
    assert [bank.tag for bank in banks] == ["sha256", "sha384"]
    assert _root(domain.add_tpm(_guest(), "2.0", "tpm-crb", SECRET)).find(
        "devices/tpm/backend/active_pcr_banks") is None       # swtpm's default


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
    # Appended to, never truncated by QEMU at a start (issue 13 item 4).
    assert root.find("devices/serial/source").get("append") == "on"
    assert root.find("devices/console/source").get("append") == "on"
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


def _firmware(secure_boot: bool | None, uefi: bool = True) -> etree._Element:
    return _root(domain.guest_xml("vm1", UUID, 1, 256, console_log=LOG, disk="/img/a.raw",
                                  uefi=uefi, secure_boot=secure_boot))


def test_guest_xml_uefi_with_secure_boot_enrolled_keys_and_smm() -> None:
    root = _firmware(True)
    os_el = root.find("os")
    assert os_el.get("firmware") == "efi"
    assert {f.get("name"): f.get("enabled") for f in os_el.findall("firmware/feature")} == {
        "secure-boot": "yes", "enrolled-keys": "yes"}
    assert os_el.find("loader").get("secure") == "yes"
    assert root.find("features/smm").get("state") == "on"
    assert os_el.find("boot").get("dev") == "hd"


def test_guest_xml_uefi_without_secure_boot() -> None:
    root = _firmware(False)
    assert root.find("os").get("firmware") == "efi"
    assert [(f.get("name"), f.get("enabled")) for f in root.findall("os/firmware/feature")] == [
        ("secure-boot", "no")]
    assert root.find("os/loader") is None  # libvirt refuses secure='no' with autoselection
    assert root.find("features/smm") is None


def test_guest_xml_uefi_libvirt_chooses_and_bios_has_no_firmware_element() -> None:
    chosen = _firmware(None)
    assert chosen.find("os").get("firmware") == "efi"
    assert chosen.find("os/firmware") is None and chosen.find("os/loader") is None
    bios = _firmware(None, uefi=False)
    assert bios.find("os").get("firmware") is None and bios.find("features/smm") is None
    with pytest.raises(exception.VirtError, match="secure_boot goes with uefi"):
        _firmware(True, uefi=False)


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
