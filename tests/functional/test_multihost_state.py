"""Several hosts: a command acting on host-a or host-b never touches THIS machine's
swtpm directories (``[vtpm] swtpm_state_dir``, the TPM state of the system
libvirtd's guests and of the all-in-one OpenStack).

Each test plants one harmless fake state directory ``<swtpm_state_dir>/<random
uuid>`` (no domain has that UUID anywhere), runs the real ``vtpm-driver``
command with the test hosts' configuration (``/var/lib/vtpm-driver/hosts/
vtpm-driver.conf``: ``[vtpm] hosts`` and ``host_state_dirs``) and checks the
planted directory is neither listed nor removed; it removes only what it
planted. ``audit --repair`` is limited to the planted UUID (``--instance``) and
runs with its own state store and lock directory, so nothing of another test
or service can be repaired away.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.functional.fixtures_libvirt import HOSTS_DIR, REPO_ROOT, host_swtpm_dir
from tests.functional.support import unavailable
from vtpm_driver import conf as vtpm_conf

# two_hosts (both test hosts started) is fixtures_libvirt's, registered for every module.
pytestmark = [pytest.mark.functional, pytest.mark.usefixtures("two_hosts")]

HOSTS_CONF = HOSTS_DIR / "vtpm-driver.conf"
CLI = REPO_ROOT / ".venv" / "bin" / "vtpm-driver"
CLI_TIMEOUT = 300  # a bound, not a speed check (2 cores, other helpers' guests)


@pytest.fixture
def planted() -> Iterator[Path]:
    """``<this machine's swtpm_state_dir>/<random uuid>/tpm2/tpm2-00.permall``."""
    base = Path(vtpm_conf.new_conf().vtpm.swtpm_state_dir)
    if not base.is_dir():
        unavailable(f"{base} (this machine's [vtpm] swtpm_state_dir) does not exist")
    path = base / str(uuid.uuid4())
    (path / "tpm2").mkdir(parents=True)
    (path / "tpm2" / "tpm2-00.permall").write_bytes(b"planted by test_multihost_state")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)  # only what this fixture created


@pytest.fixture
def own_conf(tmp_path: Path) -> Path:
    """The test's own state store and locks (never the shared ones)."""
    conf = tmp_path / "own.conf"
    conf.write_text(f"[vtpm]\nstate_backup_dir = {tmp_path / 'store'}\n"
                    f"lock_path = {tmp_path / 'locks'}\nlock_timeout = 0\n")
    return conf


def vtpm_driver(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLI), *args], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT, check=False)


def assert_untouched(planted: Path) -> None:
    assert (planted / "tpm2" / "tpm2-00.permall").read_bytes() == \
        b"planted by test_multihost_state"


@pytest.mark.parametrize("host", ["host-a", "host-b"])
def test_audit_repair_on_a_test_host_leaves_this_machines_state_dirs(
        planted: Path, own_conf: Path, host: str) -> None:
    if not HOSTS_CONF.exists():
        unavailable(f"{HOSTS_CONF} missing (tools/test-hosts.sh start writes it)")
    proc = vtpm_driver("--config-file", str(HOSTS_CONF), "--config-file", str(own_conf),
                       "--host", host, "audit", "--no-barbican", "--repair",
                       "--instance", planted.name, "-f", "json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert planted.name not in proc.stdout
    assert all(not str(entry).startswith(str(planted.parent))
               for entry in report["orphan_state_dirs"])
    assert_untouched(planted)


def test_a_host_without_host_state_dir_is_refused_before_anything(
        planted: Path, own_conf: Path, tmp_path: Path) -> None:
    if not HOSTS_CONF.exists():
        unavailable(f"{HOSTS_CONF} missing (tools/test-hosts.sh start writes it)")
    only_a = tmp_path / "only-a.conf"
    only_a.write_text("[vtpm]\nhost_state_dirs = "
                      f"host-a={host_swtpm_dir('host-a')}\n")
    proc = vtpm_driver("--config-file", str(HOSTS_CONF), "--config-file", str(own_conf),
                       "--config-file", str(only_a), "--host", "host-b", "audit",
                       "--no-barbican", "--repair", "--instance", planted.name)
    assert proc.returncode == 1
    assert "[vtpm] host_state_dirs" in proc.stderr and "'host-b'" in proc.stderr
    assert proc.stdout == ""
    assert_untouched(planted)
