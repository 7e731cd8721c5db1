"""Never lose a TPM (issue 13), on the real stack through the installed command.

* item 4: a ``--console-log`` file the user chose is appended to, never truncated;
* item 7: ``kill -9`` of ``server create`` while the guest starts leaves the
  passphrase in a libvirt secret; ``server show`` tells the domain's real
  state, and the next operation on the server removes the secret;
* item 1: a second command on a server another command holds exits 1 with one
  line naming the holder; two resizes of one server at once: one runs, the
  other is refused, and the revert brings back the TPM (same EK).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import libvirt
import pytest
from keystoneauth1 import session as ks_session

from tests.functional import test_cli_servers
from tests.functional.fixtures_libvirt import (
    Cleanup,
    TestGuest,
    parse_vtpm_results,
    read_console,
    wait_for_shutoff,
)
from tests.functional.test_cli_servers import (
    BARBICAN_URL,
    SECRET_NAME_PREFIX,
    CliRunner,
    Servers,
    create_args,
)
from vtpm_driver import conf as vtpm_conf
from vtpm_driver.guestreport import tpm_of
from vtpm_driver.ops import journal
from vtpm_driver.virt import record
from vtpm_driver.virt import secret as virt_secret

pytestmark = pytest.mark.functional

# The command's fixtures (module-scoped there), shared with this module.
cli = test_cli_servers.cli
made = test_cli_servers.made
owner_session = test_cli_servers.owner_session

WAIT = 300.0  # a bound for something that must happen, not a speed check
STAY = "vtpm_test=stay"


def wait_until(what: str, check, timeout: float = WAIT, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def lookup(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def test_item4_user_console_log_is_appended_to(
    cli: CliRunner, made: Servers, test_guest: TestGuest, libvirt_conn: libvirt.virConnect,
    tmp_path: Path,
) -> None:
    console_log = tmp_path / "mine.log"
    console_log.write_text("precious line\n")
    name = made.name()
    shown = made.created(cli(*create_args(test_guest, name, console_log,
                                          "--flavor-property", "hw:tpm_version=2.0")).json())
    dom = libvirt_conn.lookupByUUIDString(shown["uuid"])
    wait_for_shutoff(dom)
    first = console_log.read_text()
    assert first.startswith("precious line\n") and first.count("VTPM_RESULT") == 1
    assert cli("server", "start", name).rc == 0
    wait_for_shutoff(dom)
    second = console_log.read_text()
    assert second.startswith(first) and second.count("VTPM_RESULT") == 2
    assert cli("server", "delete", name).rc == 0
    assert console_log.read_text() == second, "a file the user chose stays"


def test_item7_kill_9_of_create_leaves_no_passphrase_after_the_next_operation(
    cli: CliRunner, made: Servers, cleanup: Cleanup, test_guest: TestGuest,
    libvirt_conn: libvirt.virConnect, owner_session: ks_session.Session, tmp_path: Path,
) -> None:
    name = made.name()
    console_log = tmp_path / "console.log"
    proc = cli.popen(*create_args(test_guest, name, console_log, "--flavor-property",
                                  "hw:tpm_version=2.0", cmdline=f"{test_guest.cmdline} {STAY}"))
    try:
        dom = wait_until("the domain", lambda: lookup(libvirt_conn, name))
        uuid = cleanup.domain(dom.UUIDString())
        # The passphrase is in libvirt for the start: kill -9 the command now.
        secret = wait_until("the libvirt secret of the start", lambda: (
            virt_secret.lookup_vtpm_secret_by_instance(libvirt_conn, uuid)))
        cleanup.secret(secret.UUIDString())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=WAIT)
    assert proc.returncode == -signal.SIGKILL
    stored = record.record_from_domain(dom)
    made.created({"uuid": uuid, "vtpm_secret_uuid": stored.system_metadata["vtpm_secret_uuid"]})
    assert journal.read(stored.system_metadata).operation == journal.START

    # libvirtd goes on with the start the dead command asked for: paused while QEMU
    # starts up, then running. `server show` says what libvirt has at that moment.
    names = {libvirt.VIR_DOMAIN_PAUSED: "paused", libvirt.VIR_DOMAIN_RUNNING: "running",
             libvirt.VIR_DOMAIN_SHUTOFF: "shutdown"}
    before = names[dom.state()[0]]
    shown = cli("server", "show", name, "-f", "json").json()["power_state"]
    after = names[dom.state()[0]]
    assert shown in (before, after), (before, shown, after)

    stop = cli("server", "stop", name)
    assert stop.rc == 0, stop.err
    assert virt_secret.lookup_vtpm_secret_by_instance(libvirt_conn, uuid) is None
    assert journal.KEY not in record.record_from_domain(dom).system_metadata
    assert cli("server", "start", name).rc == 0
    assert virt_secret.lookup_vtpm_secret_by_instance(libvirt_conn, uuid) is None
    assert cli("server", "delete", name).rc == 0


def test_item1_command_on_a_locked_server_exits_1_naming_the_holder(
    cli: CliRunner, made: Servers, test_guest: TestGuest, tmp_path: Path,
) -> None:
    name = made.name()
    shown = made.created(cli(*create_args(test_guest, name, tmp_path / "c.log",
                                          "--flavor-property", "hw:tpm_version=2.0")).json())
    conf = vtpm_conf.new_conf(config_files=[str(cli.config_file)])
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, types\n"
         "from vtpm_driver.ops import locks\n"
         "cfg = types.SimpleNamespace(vtpm=types.SimpleNamespace(lock_path=sys.argv[1], "
         "lock_timeout=0))\n"
         "with locks.server_lock(cfg, sys.argv[2], 'resize'):\n"
         "    print('locked', flush=True)\n"
         "    sys.stdin.read()\n",
         conf.vtpm.lock_path, shown["uuid"]],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        fast = tmp_path / "fast.conf"
        fast.write_text("[vtpm]\nlock_timeout = 0\n")
        argv = ["--config-file", str(fast), "server", "delete", name]
        line = cli(*argv).one_error_line()
        assert f"operation 'resize' (pid {holder.pid}) is in progress" in line
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads(cli("server", "show", name, "-f", "json").out)["uuid"] == shown["uuid"]
    assert cli("server", "delete", name).rc == 0


def results_on(console_log: Path, count: int) -> list[dict[str, str]]:
    """Wait until the console holds ``count`` VTPM_RESULT lines (one per boot)."""
    return wait_until(f"{count} VTPM_RESULT lines", lambda: (
        found if len(found := parse_vtpm_results(read_console(console_log))) >= count
        else None), interval=0.2)


def test_item1_two_resizes_at_once_never_lose_the_tpm(
    cli: CliRunner, made: Servers, test_guest: TestGuest, tmp_path: Path,
) -> None:
    console_log = tmp_path / "console.log"
    name = made.name()
    made.created(cli(*create_args(test_guest, name, console_log, "--flavor-property",
                                  "hw:tpm_version=2.0",
                                  cmdline=f"{test_guest.cmdline} {STAY}")).json())
    ek = tpm_of(results_on(console_log, 1)[0])
    # A model change starts a fresh TPM: only the backup keeps the old one.
    resize = ("server", "resize", name, "--flavor-property", "hw:tpm_model=tpm-crb")
    both = [cli.popen(*resize), cli.popen(*resize)]
    results = sorted((cli.finish(proc) for proc in both), key=lambda r: r.rc)
    assert [r.rc for r in results] == [0, 1], [r.err for r in results]
    line = results[1].one_error_line()
    assert "in progress" in line or "awaiting confirm or revert" in line, line
    fresh = tpm_of(results_on(console_log, 2)[1])
    assert fresh.ek != ek.ek, "the resized server has a fresh TPM"
    assert fresh.sealed != ek.sealed, "what was sealed in the old TPM is gone with it"
    assert cli("server", "resize", "revert", name).rc == 0
    assert tpm_of(results_on(console_log, 3)[2]) == ek, "the old TPM came back"
    assert cli("server", "delete", name).rc == 0


def test_item3_non_owner_resize_leaves_the_server_running_and_unchanged(
    cli: CliRunner, made: Servers, test_guest: TestGuest, libvirt_conn: libvirt.virConnect,
    tmp_path: Path,
) -> None:
    console_log = tmp_path / "console.log"
    name = made.name()
    shown = made.created(cli(*create_args(test_guest, name, console_log, "--flavor-property",
                                          "hw:tpm_version=2.0",
                                          cmdline=f"{test_guest.cmdline} {STAY}")).json())
    results_on(console_log, 1)
    dom = libvirt_conn.lookupByUUIDString(shown["uuid"])
    before = dom.ID()
    line = cli("server", "resize", name, "--vcpus", "2", cloud="member").one_error_line()
    assert "403" in line or "refused" in line, line
    assert dom.isActive() and dom.ID() == before, "never stopped"
    again = cli("server", "show", name, "-f", "json").json()
    assert again["resize_status"] is None and again["vcpus"] == 1


def test_item2_failed_resize_that_added_a_vtpm_is_rolled_back(
    cli: CliRunner, made: Servers, test_guest: TestGuest, libvirt_conn: libvirt.virConnect,
    owner_session: ks_session.Session, tmp_path: Path,
) -> None:
    console_log = tmp_path / "console.log"
    name = made.name()
    shown = made.created(cli(*create_args(test_guest, name, console_log)).json())
    assert shown["vtpm"] is False
    # The new flavor's memory cannot be had: the resized guest fails to start.
    line = cli("server", "resize", name, "--flavor-property", "hw:tpm_version=2.0",
               "--memory", str(64 * 1024 * 1024)).one_error_line()
    assert "the resize was rolled back" in line, line
    again = cli("server", "show", name, "-f", "json").json()
    assert (again["vtpm"], again["vtpm_secret_uuid"], again["resize_status"]) == (
        False, None, None)
    assert again["memory_mb"] == 256
    dom = libvirt_conn.lookupByUUIDString(shown["uuid"])
    assert "<tpm" not in dom.XMLDesc(0)
    # No record names the created secret, and Barbican does not keep it either.
    created = [s for s in virt_secret.list_vtpm_secrets(libvirt_conn)
               if s.usage_id == shown["uuid"]]
    assert created == []
    listed = owner_session.get(
        f"{BARBICAN_URL}/v1/secrets", params={"name": SECRET_NAME_PREFIX + shown["uuid"]},
        headers={"Accept": "application/json"}).json()
    assert listed["total"] == 0, listed
    assert cli("server", "start", name).rc == 0


def test_item8_admin_of_another_project_cannot_add_a_vtpm(
    cli: CliRunner, made: Servers, test_guest: TestGuest, tmp_path: Path,
) -> None:
    name = made.name()
    made.created(cli(*create_args(test_guest, name, tmp_path / "console.log")).json())
    line = cli("server", "resize", name, "--flavor-property", "hw:tpm_version=2.0",
               cloud="admin").one_error_line()
    assert "a member of" in line and "must do this resize" in line, line
    again = cli("server", "show", name, "-f", "json").json()
    assert (again["vtpm"], again["vtpm_secret_uuid"], again["resize_status"]) == (
        False, None, None)
