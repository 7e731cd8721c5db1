"""The real host probe (vtpm_driver.virt.probe) over a fake libvirt connection."""

from __future__ import annotations

import stat

import libvirt
import pytest

from tests.fakes.libvirt import CapsConnection, libvirt_error
from tests.fakes.probe import FakeProbe
from tests.unit.model.test_hostcheck import make_conf
from vtpm_driver import exception
from vtpm_driver.virt import probe as virt_probe


def test_probe_reads_domain_capabilities_with_the_virt_type():
    conn = CapsConnection(caps="<domainCapabilities/>")
    opened = []
    probe = virt_probe.LibvirtHostProbe("qemu:///system",
                                  lambda uri: opened.append(uri) or conn)
    assert probe.domain_capabilities("kvm") == "<domainCapabilities/>"
    assert probe.domain_capabilities("qemu") == "<domainCapabilities/>"
    assert conn.calls == [(None, None, None, "kvm"), (None, None, None, "qemu")]
    assert opened == ["qemu:///system"]  # one connection, reused
    probe.close()
    assert conn.closed


def test_probe_unreachable_libvirt_is_one_line_naming_the_uri():
    def refuse(uri):
        raise libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC,
            "Failed to connect socket to '/nonexistent':\nNo such file")

    probe = virt_probe.LibvirtHostProbe("qemu+unix:///system?socket=/nonexistent", refuse)
    with pytest.raises(exception.HypervisorUnavailable) as err:
        probe.versions()
    assert str(err.value) == (
        "cannot connect to libvirt at qemu+unix:///system?socket=/nonexistent: "
        "Failed to connect socket to '/nonexistent': No such file"
    )
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_probe_lost_connection_is_hypervisor_unavailable():
    conn = CapsConnection(error=libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC,
            "End of file while reading data"))
    probe = virt_probe.LibvirtHostProbe("qemu:///system", lambda uri: conn)
    with pytest.raises(exception.HypervisorUnavailable, match="qemu:///system"):
        probe.domain_capabilities("qemu")
    assert conn.closed  # a later call reconnects


def test_probe_system_error_outside_the_transport_is_virt_error():
    # e.g. QEMU's driver failing to probe a binary: libvirtd itself answered.
    conn = CapsConnection(error=libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_QEMU,
            "cannot execute binary /usr/bin/qemu-kvm"))
    probe = virt_probe.LibvirtHostProbe("qemu:///system", lambda uri: conn)
    with pytest.raises(exception.VirtError) as err:
        probe.domain_capabilities("kvm")
    assert not isinstance(err.value, exception.HypervisorUnavailable)
    assert not conn.closed


def test_probe_refused_query_is_virt_error():
    conn = CapsConnection(error=libvirt_error(
        libvirt.VIR_ERR_CONFIG_UNSUPPORTED, libvirt.VIR_FROM_QEMU,
        "unsupported configuration: KVM is not supported"))
    probe = virt_probe.LibvirtHostProbe("qemu:///system", lambda uri: conn)
    with pytest.raises(exception.VirtError) as err:
        probe.domain_capabilities("kvm")
    assert not isinstance(err.value, exception.HypervisorUnavailable)
    assert str(err.value) == ("libvirt at qemu:///system refused to report domain capabilities: "
                              "unsupported configuration: KVM is not supported")


def test_probe_versions(monkeypatch, tmp_path):
    swtpm = tmp_path / "swtpm"
    swtpm.write_text("#!/bin/sh\necho 'TPM emulator version 0.7.1, Copyright (c) 2014-2021 IBM'\n")
    swtpm.chmod(swtpm.stat().st_mode | stat.S_IXUSR)
    probe = virt_probe.LibvirtHostProbe("qemu:///system", lambda uri: CapsConnection())
    monkeypatch.setattr(probe, "which", lambda name: str(swtpm) if name == "swtpm" else None)
    assert probe.versions() == {"libvirt": "9.0.0", "qemu": "7.2.22", "swtpm": "0.7.1"}


def test_probe_versions_without_swtpm(monkeypatch):
    probe = virt_probe.LibvirtHostProbe("qemu:///system", lambda uri: CapsConnection())
    monkeypatch.setattr(probe, "which", lambda name: None)
    assert probe.versions() == {"libvirt": "9.0.0", "qemu": "7.2.22"}


def test_probe_accounts_and_binaries():
    probe = virt_probe.LibvirtHostProbe("qemu:///system")
    assert probe.user_exists("root") is True
    assert probe.group_exists("root") is True
    assert probe.user_exists("vtpm-no-such-user") is False
    assert probe.group_exists("vtpm-no-such-group") is False
    assert probe.user_exists("bad\0name") is False
    assert probe.which("sh")
    assert probe.which("vtpm-no-such-binary") is None


def test_probe_from_conf_uses_the_configured_uri():
    conf = make_conf(connection_uri="qemu:///session")
    assert virt_probe.LibvirtHostProbe.from_conf(conf).uri == "qemu:///session"
    conf.reset()  # new_conf() is not isolated yet (test_new_conf_is_isolated)
    assert virt_probe.LibvirtHostProbe.from_conf(make_conf(virt_type="kvm")).uri == "qemu:///system"


def test_real_probe_satisfies_the_protocol():
    for name in ("domain_capabilities", "which", "user_exists", "group_exists", "versions"):
        assert callable(getattr(virt_probe.LibvirtHostProbe, name))
        assert callable(getattr(FakeProbe, name))


# -- the PCR banks swtpm implements -------------------------------------------

def _pcrs_response(*banks: tuple[int, bytes], rc: int = 0) -> bytes:
    body = b"\x00" + (5).to_bytes(4, "big") + len(banks).to_bytes(4, "big") + b"".join(
        alg.to_bytes(2, "big") + len(select).to_bytes(1, "big") + select
        for alg, select in banks)
    return b"\x80\x01" + (10 + len(body)).to_bytes(4, "big") + rc.to_bytes(4, "big") + body


def test_banks_in_lists_implemented_banks_active_or_not():
    response = _pcrs_response((0x0004, b"\0\0\0"), (0x000B, b"\xff\xff\xff"),
                              (0x0012, b"\0\0\0"), (0x000D, b"\0\0\0"))
    assert virt_probe._banks_in(response) == {"sha1", "sha256", "sha512"}  # sm3 has no trait


@pytest.mark.parametrize("response", [
    _pcrs_response(rc=0x101),                                # an error code
    _pcrs_response((0x000B, b"\xff\xff\xff"))[:-2],          # cut short
])
def test_banks_in_refuses_what_it_cannot_read(response):
    with pytest.raises(ValueError):
        virt_probe._banks_in(response)


def test_swtpm_pcr_banks_without_swtpm_is_empty():
    assert virt_probe.swtpm_pcr_banks(None) == frozenset()


def test_swtpm_pcr_banks_that_will_not_start_is_empty_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(virt_probe.tempfile, "tempdir", None)
    assert virt_probe.swtpm_pcr_banks("/bin/false") == frozenset()
    assert list(tmp_path.iterdir()) == []


def test_swtpm_pcr_banks_asks_the_real_swtpm(tmp_path, monkeypatch):
    """Debian's swtpm 0.7 (libtpms 0.9) implements all four; nothing is left behind."""
    swtpm = virt_probe.shutil.which("swtpm")
    if swtpm is None:
        pytest.fail("swtpm is not installed (tools/setup-host.sh installs it)")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(virt_probe.tempfile, "tempdir", None)
    assert virt_probe.swtpm_pcr_banks(swtpm) == {"sha1", "sha256", "sha384", "sha512"}
    assert list(tmp_path.iterdir()) == []
