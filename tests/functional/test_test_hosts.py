"""tools/test-hosts.sh: two private libvirt hosts next to the system libvirtd.

What later multi-host work relies on, checked on the real daemons: each host
answers on its own loopback port with its own host UUID (libvirt refuses a
migration to "the same host" by UUID), keeps its guests and its swtpm state to
itself, and the script is idempotent and writes the configuration naming both.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from tests.functional.fixtures_libvirt import REPO_ROOT, TestGuest, read_console
from tests.functional.support import run_tool_script, unavailable
from vtpm_driver.guestreport import parse_vtpm_results

SCRIPT = REPO_ROOT / "tools" / "test-hosts.sh"
HOSTS_DIR = Path(os.environ.get("VTPM_HOSTS_DIR", "/var/lib/vtpm-driver/hosts"))
URIS = {
    "host-a": "qemu+tcp://127.0.0.1:16611/system",
    "host-b": "qemu+tcp://127.0.0.1:16612/system",
}
BOOT_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def test_hosts() -> Iterator[dict[str, libvirt.virConnect]]:
    """Both hosts started (idempotently) and a connection to each."""
    rc, output = run_tool_script(SCRIPT, "start", timeout=180, env={})
    if rc != 0:
        unavailable(f"tools/test-hosts.sh start failed ({rc}):\n{output[-2000:]}")
    conns = {name: libvirt.open(uri) for name, uri in URIS.items()}
    try:
        yield conns
    finally:
        for conn in conns.values():
            conn.close()


def _host_uuid(conn: libvirt.virConnect) -> str:
    return etree.fromstring(conn.getCapabilities().encode()).findtext("host/uuid")


def test_each_host_has_its_own_identity_and_port(test_hosts, libvirt_conn):
    ids = {name: _host_uuid(conn) for name, conn in test_hosts.items()}
    system = _host_uuid(libvirt_conn)
    assert len(set(ids.values()) | {system}) == 3, (ids, system)
    for name, conn in test_hosts.items():
        assert conn.getURI() == URIS[name]


def test_start_is_idempotent_and_conf_names_both(test_hosts):
    rc, output = run_tool_script(SCRIPT, "start", timeout=60, env={})
    assert rc == 0, output
    assert "already running" in output
    rc, output = run_tool_script(SCRIPT, "status", timeout=60, env={})
    assert rc == 0, output
    conf = (HOSTS_DIR / "vtpm-driver.conf").read_text()
    assert f"host-a={URIS['host-a']}" in conf and f"host-b={URIS['host-b']}" in conf


def _tpm_domain_xml(name: str, dom_uuid: str, guest: TestGuest, console: Path) -> str:
    return f"""<domain type='qemu'><name>{name}</name><uuid>{dom_uuid}</uuid>
<memory unit='MiB'>256</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='q35'>hvm</type><kernel>{guest.kernel}</kernel>
<initrd>{guest.initrd}</initrd><cmdline>{guest.cmdline}</cmdline></os>
<features><acpi/></features><on_poweroff>destroy</on_poweroff>
<devices><serial type='file'><source path='{console}'/></serial>
<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm></devices></domain>"""


def test_vtpm_guest_stays_on_its_host(test_hosts, libvirt_conn, test_guest, tmp_path):
    """A guest defined on host-a is seen only there, its swtpm state lives in
    host-a's own directory, and undefining it there removes that state."""
    conn = test_hosts["host-a"]
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
        own_state = HOSTS_DIR / "host-a" / "lib" / "swtpm" / dom_uuid
        assert own_state.is_dir()
        assert not Path("/var/lib/libvirt/swtpm", dom_uuid).exists()
        for other in (test_hosts["host-b"], libvirt_conn):
            with pytest.raises(libvirt.libvirtError):
                other.lookupByUUIDString(dom_uuid)
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_TPM)
    assert not (HOSTS_DIR / "host-a" / "lib" / "swtpm" / dom_uuid).exists()


def test_system_libvirtd_is_untouched(test_hosts):
    """The system daemon still answers on its own socket after the hosts started."""
    out = subprocess.run(["virsh", "-c", "qemu:///system", "uri"], capture_output=True,
                         text=True, timeout=30, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "qemu:///system", out.stderr
