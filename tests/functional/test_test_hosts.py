"""tools/test-hosts.sh: two private libvirt hosts next to the system libvirtd.

What later multi-host work relies on, checked on the real daemons: each host
answers on its own loopback port with its own host UUID (libvirt refuses a
migration to "the same host" by UUID), keeps its guests and its swtpm state to
itself, and the script is idempotent and writes each host's configuration for
the command line (its URI and swtpm directory, as :func:`configure_test_host` does).
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from tests.functional.fixtures_libvirt import (
    HOST_URIS,
    HOSTS_DIR,
    HOSTS_SCRIPT,
    TestGuest,
    configure_test_host,
    host_swtpm_dir,
    read_console,
)
from tests.functional.support import run_tool_script
from vtpm_driver import conf as vtpm_conf
from vtpm_driver.guestreport import parse_vtpm_results
from vtpm_driver.virt import guest as virt_guest

BOOT_TIMEOUT = 120.0

# ``two_hosts`` (both hosts started, a connection to each) is fixtures_libvirt's.


def _host_uuid(conn: libvirt.virConnect) -> str:
    return etree.fromstring(conn.getCapabilities().encode()).findtext("host/uuid")


def test_each_host_has_its_own_identity_and_port(two_hosts, libvirt_conn):
    ids = {name: _host_uuid(conn) for name, conn in two_hosts.items()}
    system = _host_uuid(libvirt_conn)
    assert len(set(ids.values()) | {system}) == 3, (ids, system)
    for name, conn in two_hosts.items():
        assert conn.getURI() == HOST_URIS[name]


def test_start_is_idempotent_and_writes_each_hosts_conf(two_hosts):
    rc, output = run_tool_script(HOSTS_SCRIPT, "start", timeout=60, env={})
    assert rc == 0, output
    assert "already running" in output
    rc, output = run_tool_script(HOSTS_SCRIPT, "status", timeout=60, env={})
    assert rc == 0, output
    assert not (HOSTS_DIR / "vtpm-driver.conf").exists()  # no configuration of both
    for name in HOST_URIS:
        # What the script writes is what configure_test_host gives the tests.
        written = vtpm_conf.new_conf(config_files=[str(HOSTS_DIR / name / "vtpm-driver.conf")])
        ours = vtpm_conf.new_conf()
        configure_test_host(ours, name)
        assert written.libvirt.connection_uri == ours.libvirt.connection_uri == HOST_URIS[name]
        assert written.vtpm.swtpm_state_dir == ours.vtpm.swtpm_state_dir
        # The host's own swtpm directory (its libvirt creates it with the first TPM there).
        assert Path(ours.vtpm.swtpm_state_dir) == HOSTS_DIR / name / "lib" / "swtpm", name


def _tpm_domain_xml(name: str, dom_uuid: str, guest: TestGuest, console: Path) -> str:
    return f"""<domain type='qemu'><name>{name}</name><uuid>{dom_uuid}</uuid>
<memory unit='MiB'>256</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='q35'>hvm</type><kernel>{guest.kernel}</kernel>
<initrd>{guest.initrd}</initrd><cmdline>{guest.cmdline} vtpm_test=stay</cmdline></os>
<features><acpi/></features><on_poweroff>destroy</on_poweroff>
<devices><serial type='file'><source path='{console}'/></serial>
<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm></devices></domain>"""


def test_vtpm_guest_stays_on_its_host(two_hosts, libvirt_conn, test_guest, tmp_path):
    """A guest defined on host-a is seen only there, its swtpm state lives in
    host-a's own directory, and undefining it there removes that state. The guest
    stays up (``vtpm_test=stay``) until the test destroys it: one that powered
    itself off between ``isActive`` and ``destroy`` failed the cleanup."""
    conn = two_hosts["host-a"]
    dom_uuid = str(uuid.uuid4())
    name = f"vtpm-th-{dom_uuid[:8]}"
    console = tmp_path / "console.log"
    os.chmod(tmp_path, 0o755)
    dom = conn.defineXML(_tpm_domain_xml(name, dom_uuid, test_guest, console))
    try:
        dom.create()
        deadline = time.monotonic() + BOOT_TIMEOUT
        results: list[dict[str, str]] = []
        while time.monotonic() < deadline and not results:
            time.sleep(0.5)
            results = parse_vtpm_results(read_console(console))
        assert results, f"no VTPM_RESULT from the guest on host-a:\n{read_console(console)}"
        assert results[-1]["version"] == "2"
        own_state = host_swtpm_dir("host-a") / dom_uuid
        assert own_state.is_dir()
        assert not Path("/var/lib/libvirt/swtpm", dom_uuid).exists()
        for other in (two_hosts["host-b"], libvirt_conn):
            with pytest.raises(libvirt.libvirtError):
                other.lookupByUUIDString(dom_uuid)
    finally:
        virt_guest.remove(dom)
    assert not (host_swtpm_dir("host-a") / dom_uuid).exists()


def test_system_libvirtd_is_untouched(two_hosts):
    """The system daemon still answers on its own socket after the hosts started."""
    out = subprocess.run(["virsh", "-c", "qemu:///system", "uri"], capture_output=True,
                         text=True, timeout=30, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "qemu:///system", out.stderr
