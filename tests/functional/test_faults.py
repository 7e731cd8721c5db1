"""Fault injection on the real stack (SPEC G5, issue 13): kill the CLI at every step boundary.

Each case runs one ``vtpm-driver`` command with ``VTPM_FAULT_AT=<step>``
(:mod:`vtpm_driver.faults`: SIGKILL there, no cleanup runs) or with the next
external call failing (Barbican on a closed loopback port, libvirt at a wrong
URI), then converges the way an operator would: the same command once more, or
``server delete`` plus ``audit --repair`` scoped to that server. Then:

* no vtpm secret of the server is left in libvirt (no passphrase there);
* a server that still exists has its TPM state and Barbican secret, and its
  guest's EK (``VTPM_RESULT ek=``) is unchanged after the next start;
* a deleted server left nothing (domain, state, libvirt or Barbican secret).

Every case makes its own small server (the guest boots in ~2 s under TCG and
powers itself off). The results table is printed at the end of the module
(``pytest -s``) for the closing note.
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from keystoneauth1 import session as ks_session

from tests.functional import test_cli_servers as _servers
from tests.functional.fixtures_keymgr import BARBICAN_URL
from tests.functional.fixtures_libvirt import (
    SWTPM_STATE_ROOT,
    Cleanup,
    TestGuest,
    last_vtpm_result,
    wait_for_shutoff,
)
from tests.functional.test_cli_servers import (
    CLI,
    SECRET_NAME_PREFIX,
    CliRunner,
    Result,
    barbican_status,
    create_args,
    domain_exists,
)
from vtpm_driver import faults
from vtpm_driver.virt import secret as virt_secret
from vtpm_driver.virt import state as virt_state

pytestmark = pytest.mark.functional

# The command-line fixtures of test_cli_servers (a config for this host, the owner's session).
cli = _servers.cli
owner_session = _servers.owner_session

KILLED = -9
TABLE: dict[tuple[str, str], str] = {}

# (operation, fault): a step name of vtpm_driver.faults, or an external failure.
CASES = [
    ("create", "spawn.after_barbican"),
    ("create", "spawn.after_define"),
    ("create", "barbican-down"),
    ("create", "libvirt-down"),
    ("hard reboot", "reboot.after_secret_fetch"),
    ("hard reboot", "reboot.after_destroy"),
    ("hard reboot", "reboot.after_define"),
    ("hard reboot", "barbican-down"),
    ("start", "reboot.after_destroy"),
    ("start", "reboot.after_define"),
    ("start", "barbican-down"),
    ("resize revert", "revert.after_secret_fetch"),
    ("resize revert", "revert.after_restore"),
    ("resize revert", "revert.after_define"),
    ("resize revert", "revert.before_discard"),
    ("resize confirm", "confirm.before_discard"),
    ("delete", "delete.after_barbican"),
    ("delete", "delete.after_undefine"),
    ("delete", "delete.after_state"),
    ("delete", "barbican-down"),
]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass
class Faulty:
    """The CLI with one fault: a step to die at, or a broken Barbican/libvirt."""

    cli: CliRunner
    tmp: Path

    def run(self, fault: str | None, *args: str) -> Result:
        config = self.cli.config_file
        env = self.cli.env("owner")
        if fault == "barbican-down":
            config = self._config(f"barbican_endpoint = http://127.0.0.1:{closed_port()}")
        elif fault == "libvirt-down":
            config = self._config(f"connection_uri = qemu+tcp://127.0.0.1:{closed_port()}/system")
        elif fault:
            env[faults.ENV] = fault
        proc = subprocess.Popen([str(CLI), "--config-file", str(config), *args], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return self.cli.finish(proc)

    def _config(self, line: str) -> Path:
        key = line.split(" = ", 1)[0]
        text = "\n".join(
            line if raw.startswith(key + " ") else raw
            for raw in self.cli.config_file.read_text().splitlines())
        path = self.tmp / f"{key}-{uuid.uuid4().hex[:6]}.conf"
        path.write_text(text + "\n")
        return path


@pytest.fixture
def faulty(cli: CliRunner, tmp_path: Path) -> Faulty:
    return Faulty(cli, tmp_path)


@pytest.fixture(scope="module", autouse=True)
def table() -> Iterator[None]:
    yield
    rows = sorted(TABLE.items())
    print("\nfault-injection results (operation x fault -> outcome):")
    for (op, fault), outcome in rows:
        print(f"  {op:<15} {fault:<28} {outcome}")


# ----------------------------------------------------------------------------- checks


def barbican_secrets_named(session: ks_session.Session) -> dict[str, str]:
    """Barbican secret UUID -> instance UUID of the owner's vTPM secrets."""
    found: dict[str, str] = {}
    offset = 0
    while True:
        resp = session.get(f"{BARBICAN_URL}/v1/secrets", params={
            "name": SECRET_NAME_PREFIX + "%", "limit": 100, "offset": offset})
        page = resp.json().get("secrets") or []
        for item in page:
            ref = item["secret_ref"].rstrip("/").rsplit("/", 1)[-1]
            found[ref] = item["name"][len(SECRET_NAME_PREFIX):]
        offset += len(page)
        if not page or not resp.json().get("next"):
            return found


def no_passphrase_in_libvirt(conn: libvirt.virConnect, instance_uuid: str) -> None:
    leftover = virt_secret.lookup_vtpm_secret_by_instance(conn, instance_uuid)
    assert leftover is None, f"a vtpm secret of {instance_uuid} is still defined in libvirt"


def all_gone(conn: libvirt.virConnect, session: ks_session.Session, instance_uuid: str,
             secret_uuid: str | None) -> None:
    assert not domain_exists(conn, instance_uuid)
    assert not (SWTPM_STATE_ROOT / instance_uuid).exists()
    no_passphrase_in_libvirt(conn, instance_uuid)
    if secret_uuid:
        assert barbican_status(session, secret_uuid) == 404


def boot_ek(conn: libvirt.virConnect, instance_uuid: str, console: Path) -> str:
    wait_for_shutoff(conn.lookupByUUIDString(instance_uuid))
    return last_vtpm_result(console)["ek"]


def repair(cli: CliRunner, instance_uuid: str) -> Result:
    result = cli("audit", "--repair", "--min-age", "0", "--instance", instance_uuid,
                 "-f", "json")
    assert result.rc == 0, result.err
    return result


# ----------------------------------------------------------------------------- the suite


@pytest.mark.parametrize(("op", "fault"), CASES, ids=[f"{o}@{f}" for o, f in CASES])
def test_fault(op: str, fault: str, faulty: Faulty, cli: CliRunner, test_guest: TestGuest,
               libvirt_conn: libvirt.virConnect, owner_session: ks_session.Session,
               cleanup: Cleanup, tmp_path: Path) -> None:
    name = f"fault-{uuid.uuid4().hex[:8]}"
    console = tmp_path / "console.log"
    args = create_args(test_guest, name, console, "--flavor-property", "hw:tpm_version=2.0")
    TABLE[(op, fault)] = "FAILED (see test output)"

    if op == "create":
        before = barbican_secrets_named(owner_session)
        started = time.time()
        result = faulty.run(fault, *args)
        assert result.rc == (KILLED if "." in fault else 1), result.err
        if result.rc == 1:
            assert len(result.err.splitlines()) == 1 and "passphrase" not in result.err
        time.sleep(2)  # a concurrent create elsewhere has defined its domain by now
        new = {s: i for s, i in barbican_secrets_named(owner_session).items()
               if s not in before and not domain_exists(libvirt_conn, i)}
        instance = None
        if domain_exists(libvirt_conn, name):
            instance = libvirt_conn.lookupByName(name).UUIDString()
            cleanup.domain(instance)
            assert cli("server", "delete", name).rc == 0
        mine = {i for i in new.values()} | ({instance} if instance else set())
        assert len(mine) <= 1, f"more than one new secret in {time.time() - started:.0f} s"
        for instance_uuid in mine:
            repair(cli, instance_uuid)
            secret = next((s for s, i in new.items() if i == instance_uuid), None)
            all_gone(libvirt_conn, owner_session, instance_uuid, secret)
        # The retry works and leaves a working server.
        shown = cli(*args).json()
        cleanup.domain(shown["uuid"])
        boot_ek(libvirt_conn, shown["uuid"], console)
        no_passphrase_in_libvirt(libvirt_conn, shown["uuid"])
        assert cli("server", "delete", name).rc == 0
        all_gone(libvirt_conn, owner_session, shown["uuid"], shown["vtpm_secret_uuid"])
        TABLE[(op, fault)] = ("killed" if "." in fault else "refused") + \
            f"; repair removed {len(mine)} leftover; retry OK"
        return

    shown = cli(*args).json()
    uid, secret = shown["uuid"], shown["vtpm_secret_uuid"]
    cleanup.domain(uid)
    cleanup.secret(secret)
    ek = boot_ek(libvirt_conn, uid, console)
    state_file = virt_state.state_file(SWTPM_STATE_ROOT, uid, "2.0")

    if op.startswith("resize"):
        assert cli("server", "resize", name, "--memory", "320").rc == 0
        boot_ek(libvirt_conn, uid, console)
    command = {
        "hard reboot": ("server", "reboot", "--hard", name),
        "start": ("server", "start", name),
        "resize revert": ("server", "resize", "revert", name),
        "resize confirm": ("server", "resize", "confirm", name),
        "delete": ("server", "delete", name),
    }[op]
    result = faulty.run(fault, *command)
    assert result.rc == (KILLED if "." in fault else 1), result.err
    if result.rc == 1:
        assert "passphrase" not in result.err

    if op == "delete":
        retry = cli(*command)
        if retry.rc != 0:
            assert "no server" in retry.err
        repair(cli, uid)
        all_gone(libvirt_conn, owner_session, uid, secret)
        TABLE[(op, fault)] = ("killed" if "." in fault else "refused") + \
            f"; retry rc={retry.rc}; clean deletion"
        return

    retry = cli(*command)
    how = f"retry rc={retry.rc}"
    if retry.rc != 0:  # e.g. revert after the backup was discarded: no resize pending
        repair(cli, uid)
        start = cli("server", "start", name)
        assert start.rc == 0, start.err
        how += ", start OK"
    assert barbican_status(owner_session, secret) == 200
    assert virt_state.is_encrypted(state_file)
    assert boot_ek(libvirt_conn, uid, console) == ek, "the TPM changed: its state was lost"
    no_passphrase_in_libvirt(libvirt_conn, uid)
    assert cli("server", "delete", name).rc == 0
    all_gone(libvirt_conn, owner_session, uid, secret)
    TABLE[(op, fault)] = ("killed" if "." in fault else "refused") + f"; {how}; EK same"
