"""Soak (issue 13): N workers, M servers, random operations at once; then every invariant.

Workers run random ``vtpm-driver`` commands (create, hard reboot, stop/start,
suspend/resume, shelve/unshelve, resize + confirm/revert, delete; as the owner
and as others) against a small pool of servers for a bounded time, loopback
only. Several workers hit the SAME server at once: the driver's per-server lock
serialises them; an answer that is the expected result of that (the server
locked past ``[vtpm] lock_timeout``, deleted or shelved by another worker, its
resize already confirmed) is counted as a refusal by kind, anything else as a
failure. At the end:

* every live server boots with its own EK, unchanged since it was created
  (none of these operations resets a TPM);
* no vtpm secret of a soak server is defined in libvirt, and the audit reports
  no orphan of a soak server (relative to before: the stack is shared);
* no passphrase of a soak server appears in any command output, console log or
  QEMU/swtpm log written during the run.

Bounds: ``VTPM_SOAK_SECONDS`` (default 75 here; ``python -m bench.soak`` runs
300), ``VTPM_SOAK_WORKERS`` (3), ``VTPM_SOAK_SERVERS`` (3). The figures are
printed (``-s``) and written as JSON to ``VTPM_SOAK_REPORT`` when set.
"""

from __future__ import annotations

import collections
import json
import os
import random
import threading
import time
import uuid
from pathlib import Path

import libvirt
import pytest
from keystoneauth1 import session as ks_session

from tests.functional import test_cli_servers as _servers
from tests.functional.fixtures_libvirt import Cleanup, TestGuest, parse_vtpm_results, read_console
from tests.functional.test_cli_servers import (
    CliRunner,
    barbican_passphrase,
    create_args,
    domain_exists,
)
from vtpm_driver.virt import secret as virt_secret

pytestmark = pytest.mark.functional

cli = _servers.cli
owner_session = _servers.owner_session

SECONDS = float(os.environ.get("VTPM_SOAK_SECONDS", "75"))
WORKERS = int(os.environ.get("VTPM_SOAK_WORKERS", "3"))
SERVERS = int(os.environ.get("VTPM_SOAK_SERVERS", "3"))
BOOT_TIMEOUT = 180.0  # a bound for a hung guest, not a speed check
LOG_DIRS = (Path("/var/log/libvirt/qemu"), Path("/var/log/swtpm/libvirt/qemu"))
OPS = ("create", "delete", "hard_reboot", "stop_start", "suspend_resume", "resize",
       "shelve_unshelve", "other_reboot", "member_reboot")


#: Answers that are the expected outcome of workers hitting the same server at once
#: (refusals, counted by kind), not failures: (kind, phrase in the error).
REFUSALS = (
    ("locked (ServerLocked)", "is in progress on it"),
    ("server gone (deleted or shelved by another worker)", "no server with name or uuid"),
    ("server gone (deleted or shelved by another worker)", "no shelved server"),
    ("state changed by another worker", "no resize in progress"),
    ("state changed by another worker", "is already in progress"),
    ("state changed by another worker", "while it is suspended"),
    ("state changed by another worker", "awaits confirm or revert"),
    ("state changed by another worker", "cannot suspend server"),
)


class Slot:
    """One server of the pool. ``lock`` guards only the test's bookkeeping (name, EK):
    the operations themselves run at once on the same server (the driver's per-server
    lock is what is being soaked)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.lock = threading.Lock()
        self.creating = False
        self.name: str | None = None
        self.uuid: str | None = None
        self.ek: str | None = None
        self.console: Path | None = None


class Soak:
    def __init__(self, cli: CliRunner, guest: TestGuest, conn: libvirt.virConnect,
                 session: ks_session.Session, cleanup: Cleanup, tmp: Path) -> None:
        self.cli, self.guest, self.conn, self.session = cli, guest, conn, session
        self.cleanup, self.tmp = cleanup, tmp
        self.slots = [Slot(i) for i in range(SERVERS)]
        self.ops: collections.Counter[str] = collections.Counter()
        self.failures: collections.Counter[str] = collections.Counter()
        self.refusals: collections.Counter[str] = collections.Counter()
        self.passphrases: set[str] = set()
        self.ever: set[str] = set()
        self.names: set[str] = set()
        self.guard = threading.Lock()

    def note(self, op: str, result: object) -> bool:
        """Count ``result``; True when it worked."""
        with self.guard:
            self.ops[op] += 1
            if result.rc == 0:
                return True
            err = result.err.lower()
            kind = next((k for k, phrase in REFUSALS if phrase in err), None)
            if kind is not None:
                self.refusals[kind] += 1
            else:
                words = " ".join(result.err.strip().split()[:7]) or f"rc={result.rc}"
                self.failures[f"{op}: {words}"] += 1
            return False

    def worker(self, seed: int, deadline: float) -> None:
        rnd = random.Random(seed)
        while time.monotonic() < deadline:
            slot = rnd.choice(self.slots)
            with slot.lock:
                if slot.name is None and slot.creating:
                    name, op = None, None
                elif slot.name is None:
                    slot.creating, name, op = True, None, "create"
                else:
                    name, op = slot.name, rnd.choice(OPS[1:])
            if op is None:
                time.sleep(0.2)
            elif op == "create":
                try:
                    self.create(slot)
                finally:
                    with slot.lock:
                        slot.creating = False
            else:
                self.run(slot, name, op, rnd)

    def create(self, slot: Slot) -> None:
        name = f"soak-{uuid.uuid4().hex[:8]}"
        console = self.tmp / f"{name}.log"
        with self.guard:
            self.names.add(name)
        result = self.cli(*create_args(self.guest, name, console, "--flavor-property",
                                       "hw:tpm_version=2.0",
                                       cmdline=f"{self.guest.cmdline} vtpm_test=stay"))
        if not self.note("create", result):
            return
        shown = json.loads(result.out)
        self.cleanup.domain(shown["uuid"])
        self.cleanup.secret(shown["vtpm_secret_uuid"])
        with self.guard:
            self.ever.add(shown["uuid"])
            self.passphrases.add(barbican_passphrase(self.session, shown["vtpm_secret_uuid"]))
        ek = wait_ek(console)
        with slot.lock:
            slot.name, slot.uuid, slot.console, slot.ek = name, shown["uuid"], console, ek

    def run(self, slot: Slot, name: str, op: str, rnd: random.Random) -> None:
        cli = self.cli
        if op == "delete":
            if self.note(op, cli("server", "delete", name)):
                with slot.lock:
                    if slot.name == name:
                        slot.name = slot.uuid = slot.ek = None
        elif op == "hard_reboot":
            self.note(op, cli("server", "reboot", "--hard", name))
        elif op == "stop_start":
            self.note("stop", cli("server", "stop", name))
            self.note("start", cli("server", "start", name))
        elif op == "suspend_resume":
            self.note("suspend", cli("server", "suspend", name))
            self.note("resume", cli("server", "resume", name))
        elif op == "shelve_unshelve":
            self.note("shelve", cli("server", "shelve", name))
            self.note("unshelve", cli("server", "unshelve", name))
        elif op == "resize":
            self.note("resize", cli("server", "resize", name, "--memory",
                                    rnd.choice(("256", "320"))))
            decision = rnd.choice(("confirm", "revert"))
            self.note(f"resize {decision}", cli("server", "resize", decision, name))
        elif op == "other_reboot":  # another project: refused
            result = cli("server", "reboot", "--hard", name, cloud="other")
            with self.guard:
                self.ops[op] += 1
                if result.rc == 0:
                    self.failures["other_reboot: ALLOWED for another project"] += 1
        elif op == "member_reboot":  # a project member without the passphrase: refused
            result = cli("server", "reboot", "--hard", name, cloud="member")
            with self.guard:
                self.ops[op] += 1
                if result.rc == 0:
                    self.failures["member_reboot: ALLOWED without the owner's secret"] += 1


def wait_ek(console: Path) -> str:
    """The EK of the first VTPM_RESULT in a fresh console log."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        results = parse_vtpm_results(read_console(console))
        if results:
            return results[0]["ek"]
        time.sleep(0.3)
    raise AssertionError(f"no VTPM_RESULT in {console}")


def orphans_of(report: dict, uuids: set[str]) -> list[dict]:
    return [o for kind in ("orphan_libvirt_secrets", "orphan_state_dirs",
                           "orphan_barbican_secrets", "orphan_offhost_copies",
                           "half_done_operations")
            for o in report[kind] if o["instance_uuid"] in uuids]


def test_soak(cli: CliRunner, test_guest: TestGuest, libvirt_conn: libvirt.virConnect,
              owner_session: ks_session.Session, cleanup: Cleanup, tmp_path: Path) -> None:
    soak = Soak(cli, test_guest, libvirt_conn, owner_session, cleanup, tmp_path)
    started = time.time()
    deadline = time.monotonic() + SECONDS
    threads = [threading.Thread(target=soak.worker, args=(seed, deadline), daemon=True)
               for seed in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SECONDS + 600)
    assert not any(t.is_alive() for t in threads), "a worker hung"

    violations: list[str] = []
    for slot in soak.slots:
        if slot.name is None:
            continue
        if not domain_exists(libvirt_conn, slot.uuid):
            # Left shelved (its unshelve was refused while another worker held it)?
            soak.note("unshelve", cli("server", "unshelve", slot.name))
        if not domain_exists(libvirt_conn, slot.uuid):
            violations.append(f"{slot.name}: its domain is gone")
            continue
        cli("server", "stop", slot.name)
        slot.console.unlink(missing_ok=True)  # our own file: the next boot writes a fresh one
        reboot = cli("server", "start", slot.name)
        if reboot.rc != 0:
            violations.append(f"{slot.name}: final start failed: {reboot.err.strip()}")
            continue
        ek = wait_ek(slot.console)
        if ek != slot.ek:
            violations.append(f"{slot.name}: EK changed ({slot.ek} -> {ek}): TPM lost")
    for instance_uuid in soak.ever:
        if virt_secret.lookup_vtpm_secret_by_instance(libvirt_conn, instance_uuid):
            violations.append(f"{instance_uuid}: a vtpm secret is left in libvirt")
    for slot in soak.slots:  # delete the survivors; deletion must be clean too
        if slot.name is not None:
            soak.note("delete", cli("server", "delete", slot.name))
    report = cli("audit", "-f", "json").json()
    violations += [f"orphan: {o}" for o in orphans_of(report, soak.ever)]

    texts = list(cli.outputs)
    for path in tmp_path.glob("*.log"):
        texts.append(read_console(path))
    for directory in LOG_DIRS:
        for name in soak.names:
            for path in directory.glob(f"{name}*"):
                if path.stat().st_mtime >= started - 1:
                    texts.append(path.read_text(errors="replace"))
    leaked = sum(1 for p in soak.passphrases for text in texts if p in text)
    if leaked:
        violations.append(f"{leaked} passphrase occurrence(s) in logs or output")

    figures = {"seconds": SECONDS, "workers": WORKERS, "servers": SERVERS,
               "operations": dict(soak.ops), "operations_total": sum(soak.ops.values()),
               "servers_created": len(soak.ever), "failures": dict(soak.failures),
               "refusals": dict(soak.refusals),
               "invariant_violations": violations}
    print("\nsoak:", json.dumps(figures, indent=1, sort_keys=True))
    if os.environ.get("VTPM_SOAK_REPORT"):
        Path(os.environ["VTPM_SOAK_REPORT"]).write_text(json.dumps(figures, indent=1))
    assert soak.ever, "the soak created no server"
    assert violations == []
