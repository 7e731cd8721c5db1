"""vtpm_driver.standalone.backend: the one host's ServerBackend, its probe, CachedHostProbe."""

from __future__ import annotations

import types
from pathlib import Path

import libvirt
import pytest

from tests.fakes.libvirt import CapsConnection, libvirt_error
from tests.fakes.probe import FakeProbe, domcaps
from vtpm_driver import conf as vtpm_conf
from vtpm_driver import exception
from vtpm_driver.standalone.backend import CachedHostProbe, ServerBackend

URI = "qemu+tcp://127.0.0.1:16611/system"


@pytest.fixture(autouse=True)
def _fresh_facts():
    CachedHostProbe.forget()
    yield
    CachedHostProbe.forget()


def make_conf(tmp_path: Path):
    conf = vtpm_conf.new_conf()
    conf.set_override("virt_type", "qemu", group="libvirt")
    conf.set_override("swtpm_enabled", True, group="libvirt")
    for opt in ("swtpm_state_dir", "console_log_dir", "resize_backup_dir", "lock_path"):
        conf.set_override(opt, str(tmp_path / opt), group="vtpm")
    conf.set_override("guest_start_timeout", 1, group="vtpm")
    conf.set_override("connection_uri", URI, group="libvirt")
    return conf


# --------------------------------------------------------------------------- host facts


class CountingProbe(FakeProbe):
    def versions(self):
        self.asked_virt_types.append("versions")
        return super().versions()

    def pcr_banks(self):
        self.asked_virt_types.append("pcr_banks")
        return super().pcr_banks()


def test_host_facts_are_asked_once_per_uri_for_the_process():
    first, second, other = CountingProbe(), CountingProbe(), CountingProbe()
    for probe, uri in ((first, "qemu+tcp://a/system"), (second, "qemu+tcp://a/system"),
                       (other, "qemu+tcp://b/system")):
        cached = CachedHostProbe(uri, probe)
        assert cached.domain_capabilities("qemu") == domcaps()
        assert cached.versions()["libvirt"] == "9.0.0"
        assert cached.pcr_banks() == {"sha1", "sha256", "sha384", "sha512"}
    assert first.asked_virt_types == ["qemu", "versions", "pcr_banks"]
    assert second.asked_virt_types == []  # a second backend of that URI: no libvirt call
    assert other.asked_virt_types == ["qemu", "versions", "pcr_banks"]
    cached = CachedHostProbe("qemu+tcp://a/system", second)
    cached.versions()["libvirt"] = "changed"
    assert cached.versions()["libvirt"] == "9.0.0"  # callers get a copy
    assert cached.domain_capabilities("kvm") and second.asked_virt_types == ["kvm"]


def test_failed_answers_are_not_kept():
    probe = CountingProbe(xml=exception.HypervisorUnavailable("down"))
    cached = CachedHostProbe("qemu+tcp://a/system", probe)
    with pytest.raises(exception.HypervisorUnavailable):
        cached.domain_capabilities("qemu")
    probe.xml = domcaps()
    assert cached.domain_capabilities("qemu") == domcaps()
    assert probe.asked_virt_types == ["qemu", "qemu"]
    assert cached.which("swtpm") and cached.user_exists("tss") and cached.group_exists("tss")
    cached.close()
    assert probe.closed


def test_a_backends_probe_borrows_its_connection(tmp_path):
    backend = ServerBackend(make_conf(tmp_path))
    conn = CapsConnection(domcaps())
    closed = []
    backend.hypervisor = types.SimpleNamespace(conn=conn, uri=URI,
                                               close=lambda: closed.append(True))
    probe = backend.driver.probe
    assert isinstance(probe, CachedHostProbe)
    assert probe.domain_capabilities("qemu") == domcaps()
    assert conn.calls == [(None, None, None, "qemu")]  # asked over the backend's connection
    probe.close()
    assert not conn.closed  # not the probe's to close
    backend.close()
    assert closed == [True]


def test_a_lost_borrowed_connection_is_not_closed_by_the_probe(tmp_path):
    backend = ServerBackend(make_conf(tmp_path))
    conn = CapsConnection(error=libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR,
                                              libvirt.VIR_FROM_RPC, "connection reset"))
    backend.hypervisor = types.SimpleNamespace(conn=conn, uri=URI)
    with pytest.raises(exception.HypervisorUnavailable):
        backend.driver.probe.domain_capabilities("qemu")
    assert not conn.closed  # the Hypervisor reconnects on its next use


def test_the_one_host_is_connection_uri_and_swtpm_state_dir(tmp_path):
    backend = ServerBackend(make_conf(tmp_path))
    assert backend.uri == URI
    assert backend.state_base == str(tmp_path / "swtpm_state_dir")
    assert backend.driver.state_base == backend.state_base
