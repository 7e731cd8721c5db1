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

Create and delete rows make their own small server (the guest boots in ~2 s
under TCG and powers itself off); the rows of every other operation share one
server per operation (each row leaves it working with its EK unchanged), which
keeps the whole table at a few minutes. The results table is printed at the end
of the module (``pytest -s``) for the closing note.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import signal
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
    parse_vtpm_results,
    read_console,
    wait_for_shutoff,
)
from tests.functional.fixtures_nova import (
    HOST_ATTR,
    MIGRATION_IN_PROGRESS,
    SECOND_PAIR_ZONE,
    AioCloud,
    ResourceTracker,
    aio_cloud,  # noqa: F401  (fixture)
    console_file,
    create_on_test_host,
    latest_migration,
    latest_report,
    other,
    swtpm_dir,
    virsh,
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
from vtpm_driver.guestreport import GuestTPM, tpm_of
from vtpm_driver.virt import secret as virt_secret
from vtpm_driver.virt import state as virt_state

pytestmark = [pytest.mark.functional]
#: Rows that need the shared services to themselves (marker "alone"): a killed create's
#: secret is found among every vTPM secret of the owner (its server has no domain yet), and
#: a restart of host-a's libvirtd pulls it from under the AIO's compute there. The other
#: rows look only at their own server and run next to the tests through the AIO.
ALONE = pytest.mark.alone

# The command-line fixtures of test_cli_servers (a config for this host, the owner's session).
cli = _servers.cli
owner_session = _servers.owner_session

KILLED = -9
TABLE: dict[tuple[str, str], str] = {}

# (operation, fault): a step name of vtpm_driver.faults, or an external failure.
CASES = [
    ("create", "spawn.after_barbican"),
    ("create", "spawn.after_define"),
    ("create", "launch.secret_defined"),
    ("create", "launch.started"),
    ("create", "barbican-down"),
    ("create", "libvirt-down"),
    ("hard reboot", "reboot.after_secret_fetch"),
    ("hard reboot", "reboot.after_destroy"),
    ("hard reboot", "reboot.after_define"),
    ("hard reboot", "launch.started"),
    ("hard reboot", "barbican-down"),
    ("start", "reboot.after_destroy"),
    ("start", "reboot.after_define"),
    ("start", "barbican-down"),
    ("resize revert", "revert.after_secret_fetch"),
    ("resize revert", "revert.after_restore"),
    ("resize revert", "revert.after_define"),
    ("resize revert", "revert.before_discard"),
    ("resize confirm", "confirm.before_discard"),
    # A new TPM on purpose: killed anywhere, the retry (or the next start) makes it.
    ("rebuild reset", "reset.after_secret_fetch"),
    ("rebuild reset", "reset.after_destroy"),
    ("rebuild reset", "reset.after_remove"),
    ("rebuild reset", "reset.after_define"),
    ("rebuild reset", "launch.secret_defined"),
    ("rebuild reset", "launch.started"),
    ("rebuild reset", "barbican-down"),
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


def boot_ek(conn: libvirt.virConnect, instance_uuid: str, console: Path) -> GuestTPM:
    wait_for_shutoff(conn.lookupByUUIDString(instance_uuid))
    return tpm_of(last_vtpm_result(console))


def repair(cli: CliRunner, instance_uuid: str) -> Result:
    result = cli("audit", "--repair", "--min-age", "0", "--instance", instance_uuid,
                 "-f", "json")
    assert result.rc == 0, result.err
    return result


# ----------------------------------------------------------------------------- the suite


@pytest.mark.parametrize(("op", "fault"), [
    pytest.param(o, f, id=f"{o}@{f}", marks=[ALONE] if o == "create" else [])
    for o, f in CASES])
def test_fault(op: str, fault: str, faulty: Faulty, cli: CliRunner, test_guest: TestGuest,
               libvirt_conn: libvirt.virConnect, owner_session: ks_session.Session,
               cleanup: Cleanup, tmp_path: Path, families) -> None:
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

    if op == "delete":
        shown = cli(*args).json()
        uid, secret = shown["uuid"], shown["vtpm_secret_uuid"]
        cleanup.domain(uid)
        cleanup.secret(secret)
        wait_for_shutoff(libvirt_conn.lookupByUUIDString(uid))
        command = ("server", "delete", name)
        result = faulty.run(fault, *command)
        assert result.rc == (KILLED if "." in fault else 1), result.err
        if result.rc == 1:
            assert "passphrase" not in result.err
        retry = cli(*command)
        if retry.rc != 0:
            assert "no server" in retry.err
        repair(cli, uid)
        all_gone(libvirt_conn, owner_session, uid, secret)
        TABLE[(op, fault)] = ("killed" if "." in fault else "refused") + \
            f"; retry rc={retry.rc}; clean deletion"
        return

    # One server per operation for its rows: each row leaves it working, EK unchanged
    # (a reset: a new EK, which the next start keeps).
    server = families(op)
    dom = libvirt_conn.lookupByUUIDString(server.uuid)
    state_file = virt_state.state_file(SWTPM_STATE_ROOT, server.uuid, "2.0")
    if op.startswith("resize"):
        seen = count_results(server.console)
        assert cli("server", "resize", server.name, "--memory", "320").rc == 0
        wait_results(server.console, seen)
        wait_for_shutoff(dom)
    command = {
        "hard reboot": ("server", "reboot", "--hard", server.name),
        "start": ("server", "start", server.name),
        "resize revert": ("server", "resize", "revert", server.name),
        "resize confirm": ("server", "resize", "confirm", server.name),
        "rebuild reset": ("server", "rebuild", "--reset-tpm", server.name),
    }[op]
    seen = count_results(server.console)
    result = faulty.run(fault, *command)
    assert result.rc == (KILLED if "." in fault else 1), result.err
    if result.rc == 1:
        assert "passphrase" not in result.err

    retry = cli(*command)
    how = f"retry rc={retry.rc}"
    if retry.rc != 0:  # e.g. revert after the backup was discarded: no resize pending
        repair(cli, server.uuid)
        start = cli("server", "start", server.name)
        assert start.rc == 0, start.err
        how += ", start OK"
    assert barbican_status(owner_session, server.secret) == 200
    assert virt_state.is_encrypted(state_file)
    wait_for_shutoff(dom)
    if count_results(server.console) == seen:  # nothing booted since the fault (confirm)
        assert cli("server", "start", server.name).rc == 0
        how += ", start OK"
    ek = tpm_of(wait_results(server.console, seen)[-1])
    wait_for_shutoff(dom)
    if op == "rebuild reset":
        assert ek.ek != server.ek.ek, "the reset kept the old TPM"
        assert ek.sealed != server.ek.sealed, "what was sealed in the old TPM is readable"
        seen = count_results(server.console)
        assert cli("server", "start", server.name).rc == 0
        assert tpm_of(wait_results(server.console, seen)[-1]) == ek, "the new TPM was lost"
        wait_for_shutoff(dom)
        server.ek = ek
        how += ", new EK, kept by the next start"
    else:
        assert ek == server.ek, "the TPM changed: its state was lost"
        how += ", EK same"
    no_passphrase_in_libvirt(libvirt_conn, server.uuid)
    assert half_done_of(cli, server.uuid) == []
    TABLE[(op, fault)] = ("killed" if "." in fault else "refused") + f"; {how}"


# ----------------------------------------------------------------------------- shared servers
# Rows below reuse one server per family (each row ends with that server clean and
# working, EK unchanged, which the next row relies on): a few minutes instead of one
# create/boot/delete per row.

BOOT_TIMEOUT = 240.0  # a bound for a hung guest on a busy 2-core machine, not a speed check


@dataclasses.dataclass
class Shared:
    name: str
    uuid: str
    secret: str
    ek: GuestTPM
    console: Path


def wait_results(console: Path, more_than: int) -> list[dict[str, str]]:
    """The console's VTPM_RESULTs once there are more than ``more_than`` of them."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        results = parse_vtpm_results(read_console(console))
        if len(results) > more_than:
            return results
        assert time.monotonic() < deadline, f"no new VTPM_RESULT in {console}"
        time.sleep(0.3)


def count_results(console: Path) -> int:
    return len(parse_vtpm_results(read_console(console)))


def shared_server(cli: CliRunner, guest: TestGuest, conn: libvirt.virConnect, tmp: Path,
                  prefix: str, stay: bool) -> Shared:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    console = tmp / f"{name}.log"
    shown = cli(*create_args(guest, name, console, "--flavor-property", "hw:tpm_version=2.0",
                             cmdline=f"{guest.cmdline} vtpm_test=stay" if stay else None)).json()
    (first,) = wait_results(console, 0)[:1]
    if not stay:
        wait_for_shutoff(conn.lookupByUUIDString(shown["uuid"]))
    return Shared(name, shown["uuid"], shown["vtpm_secret_uuid"], tpm_of(first), console)


def check_intact(cli: CliRunner, conn: libvirt.virConnect, session: ks_session.Session,
                 server: Shared, *, stay: bool) -> None:
    """Barbican secret and encrypted state there, no passphrase in libvirt, and a fresh
    boot shows the same EK."""
    assert barbican_status(session, server.secret) == 200
    assert virt_state.is_encrypted(virt_state.state_file(SWTPM_STATE_ROOT, server.uuid, "2.0"))
    no_passphrase_in_libvirt(conn, server.uuid)
    dom = conn.lookupByUUIDString(server.uuid)
    if not stay:
        wait_for_shutoff(dom)
    seen = count_results(server.console)
    booted = cli("server", "reboot", "--hard", server.name) if dom.isActive() else \
        cli("server", "start", server.name)
    assert booted.rc == 0, booted.err
    ek = tpm_of(wait_results(server.console, seen)[-1])
    assert ek == server.ek, "the TPM changed: its state was lost"
    if not stay:
        wait_for_shutoff(dom)
    no_passphrase_in_libvirt(conn, server.uuid)


def half_done_of(cli: CliRunner, instance_uuid: str) -> list[dict]:
    report = cli("audit", "-f", "json").json()
    return [h for h in report["half_done_operations"] if h["instance_uuid"] == instance_uuid]


@pytest.fixture(scope="module")
def families(cli: CliRunner, test_guest: TestGuest, libvirt_conn: libvirt.virConnect,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """``families(op)``: the one server the rows of ``op`` share (made on first use)."""
    made: dict[str, Shared] = {}

    def get(op: str) -> Shared:
        if op not in made:
            made[op] = shared_server(cli, test_guest, libvirt_conn,
                                     tmp_path_factory.mktemp("fam"),
                                     "fault-" + op.replace(" ", "-"), stay=False)
        return made[op]

    yield get
    for server in made.values():
        cli("server", "resize", "revert", server.name)
        cli("server", "delete", server.name)
        no_passphrase_in_libvirt(libvirt_conn, server.uuid)


@pytest.fixture(scope="module")
def resize_server(cli: CliRunner, test_guest: TestGuest, libvirt_conn: libvirt.virConnect,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    server = shared_server(cli, test_guest, libvirt_conn, tmp_path_factory.mktemp("rs"),
                           "fault-rs", stay=False)
    yield server
    cli("server", "resize", "revert", server.name)
    cli("server", "delete", server.name)


@pytest.fixture(scope="module")
def stay_server(cli: CliRunner, test_guest: TestGuest, libvirt_conn: libvirt.virConnect,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    server = shared_server(cli, test_guest, libvirt_conn, tmp_path_factory.mktemp("ss"),
                           "fault-ss", stay=True)
    yield server
    cli("server", "delete", server.name)


# (fault point, the half-done operation audit must report, what audit --repair does)
RESIZE_CASES = [
    ("resize.after_power_off", "resize_prepare", "roll back"),
    ("resize.after_backup", None, None),  # journal cleared: a resize awaits revert
    ("finish.after_secret", "resize_finish", "roll back"),
    ("finish.after_define", "resize_finish", "roll back"),
    # The guest started: its state is kept, the resize awaits revert (issue 20 defect 1).
    ("launch.started", "resize_finish", "finish"),
]


@pytest.mark.parametrize(("fault", "operation", "action"), RESIZE_CASES,
                         ids=[c[0] for c in RESIZE_CASES])
def test_resize_fault_audit_shows_half_done_and_repair_converges(
        fault: str, operation: str | None, action: str | None, faulty: Faulty,
        cli: CliRunner, libvirt_conn: libvirt.virConnect, owner_session: ks_session.Session,
        resize_server: Shared) -> None:
    server = resize_server
    TABLE[("resize", fault)] = "FAILED (see test output)"
    result = faulty.run(fault, "server", "resize", server.name, "--memory", "320")
    assert result.rc == KILLED, result.err
    half = half_done_of(cli, server.uuid)
    assert [(h["operation"], h["repair"]) for h in half] == (
        [(operation, action)] if operation else [])
    fixed = repair(cli, server.uuid).json()
    if operation:
        assert [(r["action"], r["result"]) for r in fixed["repair"]
                if r["action"] == "finish_or_roll_back"] == [
            ("finish_or_roll_back", f"done: {action}")]
    assert half_done_of(cli, server.uuid) == []
    no_passphrase_in_libvirt(libvirt_conn, server.uuid)
    shown = cli("server", "show", server.name, "-f", "json").json()
    how = f"audit: {operation or 'none'} -> {action or '-'}"
    if shown["resize_status"]:
        reverted = cli("server", "resize", "revert", server.name)
        assert reverted.rc == 0, reverted.err
        how += ", revert OK"
    # The retry works and is undone again (the next row starts from the same server); a
    # TPM lost by the fault would show as a new EK in the check after the revert.
    assert cli("server", "resize", server.name, "--memory", "320").rc == 0
    assert cli("server", "resize", "revert", server.name).rc == 0
    check_intact(cli, libvirt_conn, owner_session, server, stay=False)
    TABLE[("resize", fault)] = f"killed; {how}; retry resize+revert OK; EK same"


RESUME_POINTS = ["resume.after_secret_fetch", "launch.secret_defined", "launch.started"]


@pytest.mark.parametrize("fault", RESUME_POINTS)
def test_resume_fault(fault: str, faulty: Faulty, cli: CliRunner,
                      libvirt_conn: libvirt.virConnect, owner_session: ks_session.Session,
                      stay_server: Shared) -> None:
    server = stay_server
    TABLE[("resume", fault)] = "FAILED (see test output)"
    dom = libvirt_conn.lookupByUUIDString(server.uuid)
    assert cli("server", "suspend", server.name).rc == 0
    assert not dom.isActive() and dom.hasManagedSaveImage()
    result = faulty.run(fault, "server", "resume", server.name)
    assert result.rc == KILLED, result.err
    retry = cli("server", "resume", server.name)
    assert retry.rc == 0, retry.err
    assert dom.isActive()
    how = "retry resume OK (guest running)"
    # The retry finds the START journal entry in the persistent record (a guest restored
    # from managed save reports its save image's older live XML) and removes the secret.
    no_passphrase_in_libvirt(libvirt_conn, server.uuid)
    assert half_done_of(cli, server.uuid) == []
    check_intact(cli, libvirt_conn, owner_session, server, stay=True)
    TABLE[("resume", fault)] = f"killed; {how}; EK same"


def process_state(pid: int) -> str:
    """One-letter state of a process ("?" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"


def swtpm_pids(instance_uuid: str) -> list[int]:
    """swtpm processes serving the server: libvirt runs ``swtpm socket ... --tpmstate
    dir=<swtpm_state_dir>/<uuid>/tpm2`` (as tss), so the UUID is in its argv."""
    found = subprocess.run(["pgrep", "-f", f"swtpm socket .*{instance_uuid}"],
                           capture_output=True, text=True, check=False).stdout.split()
    return [int(pid) for pid in found if process_state(int(pid)) not in ("Z", "X", "?")]


def wait_swtpm(instance_uuid: str, running: bool) -> list[int]:
    """The server's swtpm pids once there are some (``running``) or none (killed, reaped)."""
    deadline = time.monotonic() + 60
    while True:
        pids = swtpm_pids(instance_uuid)
        if bool(pids) == running:
            return pids
        assert time.monotonic() < deadline, f"swtpm of {instance_uuid}: still {pids}"
        time.sleep(0.1)


SWTPM_KILLED = {  # op -> (command, expected rc)
    "suspend": (("server", "suspend"), 1),  # QEMU cannot save a TPM whose swtpm is gone
    "hard reboot": (("server", "reboot", "--hard"), 0),  # a new swtpm on the same state
    "stop": (("server", "stop"), 0),
}


@pytest.mark.parametrize("op", list(SWTPM_KILLED))
def test_swtpm_killed(op: str, cli: CliRunner, libvirt_conn: libvirt.virConnect,
                      owner_session: ks_session.Session, stay_server: Shared) -> None:
    """swtpm dies under a running guest: its TPM is gone until the next start; then the
    operation runs; the next (re)start brings the same EK back, no passphrase left."""
    server = stay_server
    TABLE[(op, "swtpm-killed")] = "FAILED (see test output)"
    dom = libvirt_conn.lookupByUUIDString(server.uuid)
    if not dom.isActive():
        seen = count_results(server.console)
        assert cli("server", "start", server.name).rc == 0
        wait_results(server.console, seen)
    for pid in wait_swtpm(server.uuid, running=True):
        os.kill(pid, signal.SIGKILL)
    wait_swtpm(server.uuid, running=False)
    assert dom.isActive(), "QEMU went down with swtpm"
    args, rc = SWTPM_KILLED[op]
    seen = count_results(server.console)
    result = cli(*args, server.name)
    assert result.rc == rc, result.err
    assert "passphrase" not in result.err
    no_passphrase_in_libvirt(libvirt_conn, server.uuid)
    assert not dom.hasManagedSaveImage()
    outcome = f"{op} rc={result.rc}"
    if op == "suspend":
        assert len(result.err.strip().splitlines()) == 1, result.err
        assert not swtpm_pids(server.uuid), "the TPM came back without a start"
        outcome += f" ({result.err.strip()[:50]}), TPM still gone"
        assert cli("server", "reboot", "--hard", server.name).rc == 0
        outcome += ", hard reboot OK"
    elif op == "stop":
        assert not dom.isActive()
        assert cli("server", "start", server.name).rc == 0
        outcome += ", start OK"
    wait_swtpm(server.uuid, running=True)
    assert tpm_of(wait_results(server.console, seen)[-1]) == server.ek, "the TPM changed"
    assert barbican_status(owner_session, server.secret) == 200
    no_passphrase_in_libvirt(libvirt_conn, server.uuid)
    TABLE[(op, "swtpm-killed")] = f"{outcome}; EK same; no secret left"


# ----------------------------------------------------------------------------- libvirtd restart
# On the private test host host-a (tools/test-hosts.sh), never the shared system daemon:
# only its libvirtd is restarted (its guests keep running, as with a real restart).

HOSTS_DIR = Path(os.environ.get("VTPM_HOSTS_DIR", "/var/lib/vtpm-driver/hosts"))
HOST_A_URI = "qemu+tcp://127.0.0.1:16611/system"
HOST_A_STATE = HOSTS_DIR / "host-a" / "lib" / "swtpm"
RESTART = r"""
kill -TERM "$(cat /run/libvirt/libvirtd.pid)"
for _ in $(seq 300); do
    [ -e /run/libvirt/libvirtd.pid ] && kill -0 "$(cat /run/libvirt/libvirtd.pid)" 2>/dev/null \
        || break
    sleep 0.1
done
rm -f /run/libvirt/libvirtd.pid
libvirtd -d --listen -p /run/libvirt/libvirtd.pid
"""


def restart_host_a_libvirtd() -> None:
    init = int((HOSTS_DIR / "host-a" / "init.pid").read_text())
    subprocess.run(["nsenter", "-t", str(init), "-m", "-p", "-u", "sh", "-c", RESTART],
                   check=True, timeout=120)
    deadline = time.monotonic() + 120
    while subprocess.run(["virsh", "-q", "-c", HOST_A_URI, "uri"], capture_output=True,
                         check=False).returncode != 0:
        assert time.monotonic() < deadline, "host-a's libvirtd did not come back"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def host_a(cli: CliRunner, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[CliRunner, libvirt.virConnect]]:
    script = Path(__file__).resolve().parents[2] / "tools" / "test-hosts.sh"
    subprocess.run(["bash", str(script), "start"], check=True, timeout=300,
                   capture_output=True)
    root = tmp_path_factory.mktemp("host-a")
    text = []
    for raw in cli.config_file.read_text().splitlines():
        if raw.startswith("connection_uri "):
            raw = f"connection_uri = {HOST_A_URI}"
        elif raw.startswith("swtpm_state_dir "):
            raw = f"swtpm_state_dir = {HOST_A_STATE}"
        text.append(raw)
    config = root / "host-a.conf"
    config.write_text("\n".join(text) + "\n")
    conn = libvirt.open(HOST_A_URI)
    yield CliRunner(config, cli.stack_dir, cli.console_dir), conn
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()


LIBVIRTD_CASES = [("hard reboot", "launch.secret_defined"),
                  ("hard reboot", "reboot.after_destroy"),
                  ("delete", "delete.after_barbican")]


@ALONE
@pytest.mark.parametrize(("op", "point"), LIBVIRTD_CASES, ids=[f"{o}@{p}" for o, p in
                                                                LIBVIRTD_CASES])
def test_libvirtd_restarted_mid_operation(op: str, point: str, host_a, owner_session,
                                         test_guest: TestGuest, tmp_path: Path) -> None:
    runner, _ = host_a
    fault = f"libvirtd-restart@{point}"
    TABLE[(op, fault)] = "FAILED (see test output)"
    name = f"fault-la-{uuid.uuid4().hex[:8]}"
    console = tmp_path / "console.log"
    shown = runner(*create_args(test_guest, name, console,
                                "--flavor-property", "hw:tpm_version=2.0")).json()
    server = Shared(name, shown["uuid"], shown["vtpm_secret_uuid"],
                    tpm_of(wait_results(console, 0)[0]), console)
    conn = libvirt.open(HOST_A_URI)
    try:
        wait_for_shutoff(conn.lookupByUUIDString(server.uuid))
        command = {"hard reboot": ("server", "reboot", "--hard", name),
                   "delete": ("server", "delete", name)}[op]
        env = runner.env("owner") | {faults.ENV: f"{point}:stop"}
        proc = subprocess.Popen([str(CLI), "--config-file", str(runner.config_file), *command],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while process_state(proc.pid) != "T":
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the command never reached the step"
            time.sleep(0.05)
        restart_host_a_libvirtd()
        os.kill(proc.pid, signal.SIGCONT)
        result = runner.finish(proc)
        assert "passphrase" not in result.err
        conn = libvirt.open(HOST_A_URI)
        leftover = virt_secret.lookup_vtpm_secret_by_instance(conn, server.uuid)
        assert leftover is None, "a vtpm secret is still defined on host-a"
        retry = runner(*command)
        outcome = f"rc={result.rc} ({result.err.strip()[:60] or 'ok'}); retry rc={retry.rc}"
        repaired = runner("audit", "--repair", "--min-age", "0", "--instance", server.uuid,
                          "-f", "json")
        assert repaired.rc == 0, repaired.err
        if op == "delete":
            assert retry.rc == 0 or "no server" in retry.err
            assert not domain_exists(conn, server.uuid)
            assert not (HOST_A_STATE / server.uuid).exists()
            assert barbican_status(owner_session, server.secret) == 404
            TABLE[(op, fault)] = f"{outcome}; clean deletion"
            return
        assert retry.rc == 0, retry.err
        dom = conn.lookupByUUIDString(server.uuid)
        wait_for_shutoff(dom)
        assert tpm_of(last_vtpm_result(console)) == server.ek, "the TPM changed"
        assert barbican_status(owner_session, server.secret) == 200
        assert virt_secret.lookup_vtpm_secret_by_instance(conn, server.uuid) is None
        TABLE[(op, fault)] = f"{outcome}; EK same"
    finally:
        runner("server", "delete", name)
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


# ----------------------------------------------------------------------------- through Nova
# Issue 20: every step of cold and live migration through Nova. The nova-compute of one
# test host runs with VTPM_FAULT_AT=<step> (the shim's fault points, nova/virt/vtpm/
# driver.py) and dies there, as a nova-compute killed by the OOM killer or a host crash
# would. It is started again without, and Nova's own start-up does what it does for a
# crashed compute (a RESIZE_MIGRATING server is reverted, an unfinished live migration
# reset; the shim's init_host undefines leftover ephemeral secrets). Then the operator
# converges with Nova's commands only (converge_through_nova) and the row checks that the
# server runs where Nova says, from the current copy, with the same EK; that no passphrase
# is left in libvirt where it does not belong; and that a TPM state left on the other host
# is older than the current one (never started again: custody).

NOVA_CASES = [
    # (operation, whose nova-compute dies, fault point)
    ("cold migrate", "source", "migrate_disk_and_power_off.done"),
    ("cold migrate", "dest", "finish_migration.before_state_in_place"),
    ("cold migrate", "dest", "finish_migration.after_hand_over"),
    ("cold migrate", "dest", "finish_migration.done"),
    ("resize confirm", "source", "confirm_migration.before_secret_removed"),
    ("resize revert", "source", "finish_revert_migration.after_hand_over"),
    ("resize revert", "source", "finish_revert_migration.done"),
    ("live migrate", "dest", "pre_live_migration.after_secret"),
    ("live migrate", "dest", "post_live_migration_at_destination.before_secret_removed"),
    ("live migrate", "dest", "post_live_migration_at_destination.done"),
    ("live migrate", "source", "post_live_migration.before_secret_removed"),
]
# Rows where libvirt finished the live migration but the kill may keep Nova's record on
# the source (it depends on how Nova's source handles the dead destination): the guest
# runs on the destination with its TPM. A start where Nova says either runs the current
# copy there, or is refused because the state is not there (making a new TPM there would
# fork the server) while the moved guest keeps running with its TPM.
RECORD_BEHIND = {"post_live_migration_at_destination.done",
                 "post_live_migration.before_secret_removed"}
# Cold moves with an ephemeral passphrase (Barbican, the service user's); live moves in
# host mode (a persistent libvirt secret that must follow the server), the mode Nova's API
# lets live-migrate.
NOVA_MODE = {"cold migrate": "deployment", "resize confirm": "deployment",
             "resize revert": "deployment", "live migrate": "host"}
NOVA_COMMAND = {"cold migrate": ("server", "migrate"),
                "resize confirm": ("server", "resize", "confirm"),
                "resize revert": ("server", "resize", "revert"),
                "live migrate": ("server", "migrate", "--live-migration")}
# How long Nova may still be busy with the server once the restarted compute reports: a
# cold move's recovery runs inside init_host; a live migration's source gives up on the
# dead destination after rpc_response_timeout (60 s) and rolls back. Bounds on a busy
# 2-core machine, not speed checks.
SETTLE_TIMEOUT = {"live migrate": 180.0}
SETTLE_DEFAULT = 20.0


@dataclasses.dataclass
class NovaServer:
    id: str
    mode: str
    ek: GuestTPM


@pytest.fixture(scope="module")
def nova_families(aio_cloud: AioCloud) -> Iterator:  # noqa: F811
    """``nova_families(mode)``: the one reporting server on the test hosts the rows of a
    secret mode share (made on first use; each row leaves it ACTIVE, EK unchanged)."""
    tracker = ResourceTracker(aio_cloud)
    made: dict[str, NovaServer] = {}

    def get(mode: str) -> NovaServer:
        if mode in made and aio_cloud.server("admin", made[mode].id)["status"] != "ACTIVE":
            # A row that failed leaves no trap for the next (nor its resources held).
            aio_cloud.run("admin", "server", "delete", "--wait", made.pop(mode).id)
        if mode not in made:
            server_id, _host = create_on_test_host(tracker, mode, SECOND_PAIR_ZONE)
            made[mode] = NovaServer(server_id, mode, tpm_of(latest_report(aio_cloud, server_id)))
        return made[mode]

    yield get
    tracker.cleanup()
    placement_audit(aio_cloud)


def placement_audit(cloud: AioCloud) -> None:
    """``nova-manage placement audit --delete``: Nova's own tool for the allocations a move
    it abandoned keeps (a confirm under way when its compute died holds the source's
    resources forever); without it the test hosts fill up for the tests after these."""
    manage = [str(cloud.aio_dir / "venv" / "bin" / "nova-manage"), "--config-file",
              str(cloud.aio_dir / "etc" / "nova" / "nova.conf"), "placement", "audit",
              "--delete"]
    proc = subprocess.run(manage, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode in (0, 3, 4), proc.stdout + proc.stderr  # 3/4: found, deleted


def restart_compute(cloud: AioCloud, host: str, fault: str | None = None) -> int:
    """Stop ``host``'s nova-compute and start it again (with ``VTPM_FAULT_AT=fault``);
    returns its new pid."""
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    env["VTPM_AIO_DIR"] = str(cloud.aio_dir)
    if fault:
        env[faults.ENV] = fault
    script = Path(__file__).resolve().parents[2] / "tools" / "openstack-aio.sh"
    proc = subprocess.run(["bash", str(script), "restart-compute", host], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return int((cloud.aio_dir / "run" / f"nova-compute-{host}.pid").read_text())


def progress(key: tuple[str, str], what: str) -> None:
    """One line per phase of a row in the stream's log (a row takes minutes)."""
    print(f"[{time.strftime('%H:%M:%S')}] {key[0]} {key[1]}: {what}", flush=True)


def wait_reporting(cloud: AioCloud, host: str, since: float) -> None:
    """``host``'s nova-compute reported its state after ``since`` (a Unix time): it has
    run init_host (Nova's recovery of its servers included) and serves requests."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        (service,) = cloud.compute("admin", "GET", f"/os-services?binary=nova-compute&host={host}"
                                   )["services"]
        stamp = service.get("updated_at")
        if stamp and datetime.datetime.fromisoformat(stamp).replace(
                tzinfo=datetime.UTC).timestamp() > since:
            return
        assert time.monotonic() < deadline, f"nova-compute on {host} did not come back"
        time.sleep(1)


def wait_killed(pid: int, step: str) -> None:
    """The fault point killed the process (gone, or a zombie nobody reaped)."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while process_state(pid) not in ("Z", "X", "?"):
        assert time.monotonic() < deadline, f"nova-compute never reached {step}"
        time.sleep(0.2)


#: How long Nova's answer must stay the same to be its last: a live migration's source
#: marks the migration failed a moment before it puts the server in ERROR.
SETTLE_STEADY = 5.0


def settle(cloud: AioCloud, server_id: str, timeout: float) -> dict:
    """The server once Nova has no task for it, its latest live migration is over and
    neither changed for :data:`SETTLE_STEADY` seconds (or ``timeout`` passed): Nova's
    answer."""
    deadline = time.monotonic() + timeout
    seen, since = None, time.monotonic()
    while True:
        server = cloud.server("admin", server_id)
        live = latest_migration(cloud, server_id, migration_type="live-migration")
        now = (server["status"], server.get("OS-EXT-STS:task_state"), server[HOST_ATTR],
               live and live["status"])
        if now != seen:
            seen, since = now, time.monotonic()
        busy = live is not None and live["status"] in MIGRATION_IN_PROGRESS
        steady = time.monotonic() - since >= SETTLE_STEADY
        if (not now[1] and not busy and steady) or time.monotonic() > deadline:
            return server
        time.sleep(1)


def converge_through_nova(cloud: AioCloud, server_id: str, settle_timeout: float
                          ) -> tuple[str, dict[str, str]]:
    """What an operator does after the crash, with Nova's commands only.

    Returns the steps taken and the guest's report from the boot of the hard reboot.

    A finished move awaiting confirmation is confirmed; a server left in ERROR or with a
    task that never ends is reset to active (``server set --state active``, Nova's
    documented recovery); then every server is hard-rebooted: the current copy must start
    where Nova says the server is.
    """
    steps = []
    server = settle(cloud, server_id, settle_timeout)
    status, task = server["status"], server.get("OS-EXT-STS:task_state")
    steps.append(f"Nova: {status}{'/' + task if task else ''}")
    if status == "VERIFY_RESIZE" and not task:
        confirmed = cloud.run("owner", "server", "resize", "confirm", server_id)
        if confirmed.returncode == 0:
            cloud.wait_server("owner", server_id, "ACTIVE")
            steps.append("resize confirm")
        else:  # a confirm already under way when its compute died: Nova keeps it so
            steps.append("resize confirm refused by Nova")
            status = "ERROR"
    if status == "ERROR" or task:
        cloud.cli("admin", "server", "set", "--state", "active", "--auto-approve", server_id)
        placement_audit(cloud)
        steps.append("set --state active, placement audit --delete")
    seen = boots_on_console(cloud, server_id)
    cloud.cli("owner", "server", "reboot", "--hard", server_id)
    cloud.wait_server("owner", server_id, "ACTIVE")
    steps.append("reboot --hard")
    return ", ".join(steps), report_of_a_new_boot(cloud, server_id, seen)


def record_behind(cloud: AioCloud, server: NovaServer, victim: str, who: str) -> str:
    """A row whose kill left Nova's record behind the guest: the operator's hard reboot
    where Nova says is refused (the TPM state is not there), nothing runs there, and the
    guest that libvirt moved still runs with its TPM. Returns the row's outcome."""
    settle(cloud, server.id, SETTLE_TIMEOUT["live migrate"])
    said = cloud.server("admin", server.id)[HOST_ATTR]
    cloud.cli("admin", "server", "set", "--state", "active", "--auto-approve", server.id)
    seen = boots_on_console(cloud, server.id)
    cloud.cli("owner", "server", "reboot", "--hard", server.id)
    try:
        cloud.wait_server("owner", server.id, "ACTIVE")
    except AssertionError as exc:
        refusal = str(exc)
    else:  # Nova's record caught up with the guest (the source gave up and moved it)
        assert tpm_of(report_of_a_new_boot(cloud, server.id, seen)) == server.ek
        assert server.id not in virsh(other(said), "list", "--uuid")
        placement_audit(cloud)
        return (f"killed on {who} ({victim}); Nova says {said}, where the guest runs: "
                "reboot --hard OK, EK same")
    assert "refusing to start" in refusal and "no TPM state" in refusal, refusal
    running = other(said)
    assert server.id not in virsh(said, "list", "--uuid")
    assert server.id in virsh(running, "list", "--uuid")
    assert tpm_of(latest_report(cloud, server.id)) == server.ek
    placement_audit(cloud)
    return (f"killed on {who} ({victim}); Nova says {said}, the guest runs on {running}: "
            f"reboot --hard refused (no TPM state on {said}), EK same on {running}")


def boots_on_console(cloud: AioCloud, server_id: str) -> set[str]:
    """The boot ids the guest reported on its console so far (none: no console log yet,
    e.g. a move killed before the guest was created where Nova says it is)."""
    try:
        text = console_file(cloud, server_id).read_text(errors="replace")
    except FileNotFoundError:
        return set()
    return {r["boot"] for r in parse_vtpm_results(text) if r.get("boot")}


def report_of_a_new_boot(cloud: AioCloud, server_id: str, seen: set[str]) -> dict[str, str]:
    """The guest's newest report from a boot not in ``seen``."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        with contextlib.suppress(FileNotFoundError):
            text = console_file(cloud, server_id).read_text(errors="replace")
            fresh = [r for r in parse_vtpm_results(text) if r.get("boot") not in seen]
            if fresh:
                return fresh[-1]
        assert time.monotonic() < deadline, f"{server_id} did not report from a new boot"
        time.sleep(1)


@pytest.mark.aio
@pytest.mark.second_pair
@pytest.mark.parametrize(("op", "who", "step"), NOVA_CASES,
                         ids=[f"nova-{o.replace(' ', '-')}@{s}" for o, _w, s in NOVA_CASES])
def test_fault_through_nova(op: str, who: str, step: str,
                            aio_cloud: AioCloud, nova_families) -> None:  # noqa: F811
    key = (f"{op} (Nova)", f"{who}@{step}")
    TABLE[key] = "FAILED (see test output)"
    server = nova_families(NOVA_MODE[op])
    source = aio_cloud.server("admin", server.id)[HOST_ATTR]
    dest = other(source)
    if op.startswith("resize"):  # a finished cold migration awaits confirm/revert
        aio_cloud.cli("owner", "server", "migrate", server.id)
        aio_cloud.wait_server("owner", server.id, "VERIFY_RESIZE")
        # confirm and revert run on the migration's source (the host Nova names now is
        # its destination)
    victim = source if who == "source" else dest
    progress(key, f"{server.id} on {source}; {victim}'s nova-compute dies at {step}")
    pid = restart_compute(aio_cloud, victim, fault=step)
    try:
        aio_cloud.cli("owner", *NOVA_COMMAND[op], server.id)
        wait_killed(pid, step)
        progress(key, "killed")
    finally:
        since = time.time()
        restart_compute(aio_cloud, victim)
        wait_reporting(aio_cloud, victim, since)
    progress(key, f"{victim}'s nova-compute is back; Nova says "
                  f"{aio_cloud.server('admin', server.id)['status']}")
    if step in RECORD_BEHIND:
        TABLE[key] = record_behind(aio_cloud, server, victim, who)
        return
    how, report = converge_through_nova(aio_cloud, server.id,
                                        SETTLE_TIMEOUT.get(op, SETTLE_DEFAULT))

    host = aio_cloud.server("admin", server.id)[HOST_ATTR]
    elsewhere = other(host)
    assert tpm_of(report) == server.ek, "the TPM changed: its state was lost"
    assert server.id in virsh(host, "list", "--uuid")
    assert server.id not in virsh(elsewhere, "list", "--uuid"), f"it also runs on {elsewhere}"
    # Passphrases: host mode keeps its persistent secret where the server is, nowhere else;
    # an ephemeral one is never left.
    assert server.id not in virsh(elsewhere, "secret-list"), f"a passphrase left on {elsewhere}"
    assert (server.id in virsh(host, "secret-list")) == (server.mode == "host")
    # Custody: a TPM state left on the other host is older than the current one.
    current = virt_state.read_generation(swtpm_dir(host), server.id)
    assert current is not None
    left = swtpm_dir(elsewhere) / server.id
    if left.exists():
        old = virt_state.read_generation(swtpm_dir(elsewhere), server.id)
        assert old is None or old < current, (old, current)
        how += f"; {elsewhere} keeps an older copy (generation {old} < {current})"
    TABLE[key] = f"killed on {who} ({victim}); {how}; on {host}; EK same"
