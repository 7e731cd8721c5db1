"""The README's first command, ``tools/demo.sh``, and the honesty of its exit status.

``tools/demo.sh`` runs once per module (it prepares the host, then runs
``vtpm-driver demo`` as the stack's ``owner``); each test reads one aspect of
that run and checks it independently where it can (libvirt, the swtpm state
directory, Barbican with the owner's own token). The negative test points
Barbican at a closed port and expects exit status 1 with a clear line, and
nothing left behind.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import libvirt
import pytest
from keystoneauth1 import session as ks_session

from tests.functional.fixtures_keymgr import KeymgrStack
from tests.functional.fixtures_libvirt import (
    REPO_ROOT,
    SWTPM_STATE_ROOT,
    TestGuest,
)
from tests.functional.support import unavailable

pytestmark = pytest.mark.functional

DEMO_SH = REPO_ROOT / "tools" / "demo.sh"
CLI = Path(sys.executable).parent / "vtpm-driver"
# Bounds a hung run (a fresh host installs packages first); not a speed check.
DEMO_TIMEOUT = 1800
STEPS = ("host check", "log in", "create server", "guest saw", "key in Barbican",
         "key not in libvirt", "state on disk", "member reads the key",
         "member hard-reboots", "owner hard-reboots", "delete")
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


@dataclasses.dataclass(frozen=True)
class DemoOutput:
    returncode: int
    stdout: str
    stderr: str

    def step(self, title: str) -> str:
        """The result line of step ``title`` (exactly one must exist)."""
        found = [line for line in self.stdout.splitlines()
                 if re.match(rf"^(ok|FAIL|skip)\s+(\d+\.\d+ s)?\s+{re.escape(title)}: ", line)]
        assert len(found) == 1, f"expected one '{title}' line in:\n{self.stdout}"
        return found[0]

    def explain(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any OS_* credentials, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("OS_")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def demo(keymgr_stack: KeymgrStack, test_guest: TestGuest,
         tmp_path_factory: pytest.TempPathFactory) -> DemoOutput:
    """One run of tools/demo.sh, exactly as the README says (plus a private config path)."""
    if os.geteuid() != 0:
        unavailable("tools/demo.sh must run as root")
    conf = tmp_path_factory.mktemp("demo") / "demo.conf"
    env = _clean_env(VTPM_STACK_DIR=str(keymgr_stack.stack_dir),
                     VTPM_GUEST_DIR=str(test_guest.kernel.parent),
                     VTPM_DEMO_CONF=str(conf))
    proc = subprocess.run(["bash", str(DEMO_SH)], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=DEMO_TIMEOUT, check=False)
    return DemoOutput(proc.returncode, proc.stdout, proc.stderr)


def test_demo_passes_every_check(demo: DemoOutput) -> None:
    assert demo.returncode == 0, demo.explain()
    for title in STEPS:
        assert demo.step(title).startswith("ok "), demo.explain()
    assert re.search(rf"^PASS: all {len(STEPS)} checks held in \d+\.\d s$", demo.stdout,
                     re.MULTILINE), demo.explain()
    assert not re.search(r"^(FAIL|skip) ", demo.stdout, re.MULTILINE), demo.explain()
    assert "error" not in demo.stderr.lower(), demo.explain()


def test_demo_guest_sees_tpm2_on_crb(demo: DemoOutput) -> None:
    line = demo.step("guest saw")
    assert re.search(r"VTPM_RESULT version=2 driver=tpm_crb getrandom_rc=0 ek=[0-9a-f]{64} "
                     r"sealed=[0-9a-f]{64} sealed_at=new pcr7=[0-9a-f]{64} banks=sha256 "
                     r"secureboot=none eventlog=(\d+|none) ekcert=[0-9a-f]{64}$",
                     line), demo.explain()


def test_demo_shows_where_the_key_lives(demo: DemoOutput) -> None:
    barbican = demo.step("key in Barbican")
    assert re.search(rf"secret {UUID} 'vTPM secret for instance {UUID}', type passphrase",
                     barbican), barbican
    assert "project-access false, users [vtpm-owner] only" in barbican
    assert "no vtpm secret defined" in demo.step("key not in libvirt")
    state = demo.step("state on disk")
    assert re.search(rf"{SWTPM_STATE_ROOT}/{UUID}/tpm2/tpm2-00.permall encrypted", state), state


def test_demo_member_cannot_unlock(demo: DemoOutput) -> None:
    read = demo.step("member reads the key")
    assert re.search(r"vtpm-member is forbidden to read the secret \(HTTP 403, "
                     r"VTPMSecretForbidden\)$", read), read
    reboot = demo.step("member hard-reboots")
    assert "refused (VTPMSecretForbidden); server unchanged" in reboot, reboot


def test_demo_owner_reboot_keeps_tpm_identity(demo: DemoOutput) -> None:
    line = demo.step("owner hard-reboots")
    match = re.search(r"TPM identity kept \(ek ([0-9a-f]{16})\.\.\. before and after\) and "
                      r"the value it sealed to PCR 7 unsealed again \(sealed ([0-9a-f]{16})"
                      r"\.\.\.\)$", line)
    assert match, line
    # The identity and the sealed value the guest printed on its first boot are the ones kept.
    assert f"ek={match.group(1)}" in demo.step("guest saw")
    assert f"sealed={match.group(2)}" in demo.step("guest saw")


def test_demo_leaves_nothing(demo: DemoOutput, libvirt_conn: libvirt.virConnect,
                             keystone_session: Callable[..., ks_session.Session],
                             keymgr_stack: KeymgrStack) -> None:
    """Checked here independently of the demo's own 'delete' line."""
    assert "nothing left" in demo.step("delete")
    created = re.search(rf"create server: (vtpm-demo-[0-9a-f]+) \(({UUID})\)",
                        demo.step("create server"))
    secret = re.search(rf"secret ({UUID}) ", demo.step("key in Barbican"))
    assert created and secret, demo.explain()
    name, server_uuid = created.groups()
    with pytest.raises(libvirt.libvirtError):
        libvirt_conn.lookupByName(name)
    with pytest.raises(libvirt.libvirtError):
        libvirt_conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_VTPM, server_uuid)
    assert not (SWTPM_STATE_ROOT / server_uuid).exists()
    resp = keystone_session("owner").get(
        f"{keymgr_stack.barbican_url}/v1/secrets/{secret.group(1)}", raise_exc=False)
    assert resp.status_code == 404


def test_demo_prints_no_password(demo: DemoOutput, clouds: dict[str, dict[str, str]]) -> None:
    for name, creds in clouds.items():
        assert creds["password"] not in demo.stdout + demo.stderr, f"{name}'s password shown"


def _closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_demo_fails_honestly_when_barbican_is_down(
    keymgr_stack: KeymgrStack, test_guest: TestGuest, libvirt_conn: libvirt.virConnect,
    clouds: dict[str, dict[str, str]], tmp_path: Path,
) -> None:
    if os.geteuid() != 0:
        unavailable("the demo must run as root")
    port = _closed_port()
    conf = tmp_path / "demo.conf"
    conf.write_text("[libvirt]\nswtpm_enabled = True\nvirt_type = qemu\n"
                    f"[key_manager]\nbarbican_endpoint = http://127.0.0.1:{port}\n"
                    "timeout = 5\n")
    owner = clouds["owner"]
    env = _clean_env(
        OS_AUTH_URL=owner["auth_url"], OS_USERNAME=owner["username"],
        OS_PASSWORD=owner["password"], OS_PROJECT_NAME=owner["project_name"],
        OS_USER_DOMAIN_NAME=owner["user_domain_name"],
        OS_PROJECT_DOMAIN_NAME=owner["project_domain_name"],
    )
    proc = subprocess.run(
        [str(CLI), "--config-file", str(conf), "demo",
         "--clouds-file", str(keymgr_stack.clouds_file), "--member-cloud", "member",
         "--guest-dir", str(test_guest.kernel.parent)],
        env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
        timeout=DEMO_TIMEOUT, check=False)
    out = DemoOutput(proc.returncode, proc.stdout, proc.stderr)

    assert out.returncode == 1, out.explain()
    assert out.step("host check").startswith("ok "), out.explain()
    create = out.step("create server")
    assert create.startswith("FAIL "), out.explain()
    assert f"cannot reach Barbican at http://127.0.0.1:{port}" in create, create
    for title in STEPS[STEPS.index("create server") + 1:]:
        assert out.step(title).startswith("skip "), out.explain()
    assert re.search(r"^FAIL: 1 failed, 8 not run, of 11 checks", out.stdout, re.MULTILINE)
    assert "PASS" not in out.stdout
    # The verdict is the last stderr line; anything before it is a logged error line
    # (the driver logs its failed spawn), never a traceback.
    errors = [line for line in out.stderr.splitlines() if line.strip()]
    assert errors and all(line.startswith("vtpm-driver: ") for line in errors), out.explain()
    assert errors[-1].startswith("vtpm-driver: error: demo failed at 'create server': ")
    assert f"cannot reach Barbican at http://127.0.0.1:{port}" in errors[-1]
    # Nothing half-created: no domain, no libvirt secret, no state directory (checked
    # for this server only: other tests may create theirs meanwhile).
    cleanup = re.search(rf"^ok .* cleanup: nothing of demo server (vtpm-demo-[0-9a-f]+) "
                        rf"\(({UUID})\) left", out.stdout, re.MULTILINE)
    assert cleanup, out.explain()
    name, server_uuid = cleanup.groups()
    with pytest.raises(libvirt.libvirtError):
        libvirt_conn.lookupByName(name)
    with pytest.raises(libvirt.libvirtError):
        libvirt_conn.lookupByUUIDString(server_uuid)
    with pytest.raises(libvirt.libvirtError):
        libvirt_conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_VTPM, server_uuid)
    assert not (SWTPM_STATE_ROOT / server_uuid).exists()
