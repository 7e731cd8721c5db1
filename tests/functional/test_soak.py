"""Soak (issue 13): N workers, M servers, random operations at once; then every invariant.

Workers run random ``vtpm-driver`` commands (create, hard reboot, stop/start,
suspend/resume, resize + confirm/revert, delete; as the owner
and as others) against a small pool of servers for a bounded time, loopback
only. Several workers hit the SAME server at once: the driver's per-server lock
serialises them. Every command is logged with its worker, server, outcome and
start/end times (:class:`Call`); a worker confirms or reverts only a resize it
made (or one that refused its own resize as pending).

A failed command counts as a *refusal* (by kind) only when both hold
(:func:`classify`, after the run, over the whole log):

* its message is the answer of one known check (:data:`RULES`: the server
  locked, gone, its resize already confirmed or reverted,
  a resize pending, suspended, not running; another project / a member
  without the owner's secret refused);
* the log proves the state really changed under it: a call of another
  worker on the same server overlapping it (locked), or a successful call
  that made that state (a delete for "gone", another worker's
  confirm/revert after this worker's resize for "no resize awaiting
  confirm or revert", ...) started before it ended, with no successful call
  undoing that state wholly in between.

Anything else is a failure, reported with its whole message (UUIDs and
server names replaced); a known message without that proof is a failure
named ``unproven <kind>``. The test fails on any failure. At the end:

* every live server boots with its own EK, unchanged since it was created
  (none of these operations resets a TPM);
* no vtpm secret of a soak server is defined in libvirt, no resize backup of
  one is left, and the audit reports no orphan of a soak server (relative to
  before: the stack is shared);
* no passphrase of a soak server appears in any command output, console log or
  QEMU/swtpm log written during the run.

Bounds: ``VTPM_SOAK_SECONDS`` (default 75 here; ``python -m bench.soak`` runs
300), ``VTPM_SOAK_WORKERS`` (3), ``VTPM_SOAK_SERVERS`` (3); a step a worker
follows up (confirm/revert) is retried at most ``RETRIES`` times
while the server is locked. The figures are printed (``-s``) and written as
JSON to ``VTPM_SOAK_REPORT`` when set; ``VTPM_SOAK_CALLS`` names a file for the
whole call log.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
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
from vtpm_driver.guestreport import GuestTPM, tpm_of
from vtpm_driver.virt import secret as virt_secret

pytestmark = pytest.mark.functional

cli = _servers.cli
owner_session = _servers.owner_session

SECONDS = float(os.environ.get("VTPM_SOAK_SECONDS", "75"))
WORKERS = int(os.environ.get("VTPM_SOAK_WORKERS", "3"))
SERVERS = int(os.environ.get("VTPM_SOAK_SERVERS", "3"))
RETRIES = 3  # a follow-up step refused as locked is tried again, at most this often
BOOT_TIMEOUT = 180.0  # a bound for a hung guest, not a speed check
LOG_DIRS = (Path("/var/log/libvirt/qemu"), Path("/var/log/swtpm/libvirt/qemu"))
RESIZE_BACKUP_DIR = Path("/var/lib/vtpm-driver/resize")  # [vtpm] resize_backup_dir default
OPS = ("create", "delete", "hard_reboot", "stop_start", "suspend_resume", "resize",
       "other_reboot", "member_reboot")
FINAL = -1  # the worker number of the checks after the run (nothing runs concurrently)


# --------------------------------------------------------------------------- the log


@dataclasses.dataclass(frozen=True)
class Call:
    """One command as run: by ``worker`` on server ``name``; times are ``time.monotonic()``.

    ``since``: when the worker's own step this one follows began (its resize
    before a confirm/revert), else -inf.
    """

    worker: int
    name: str
    op: str
    t0: float
    t1: float
    rc: int
    err: str = ""
    since: float = -math.inf

    @property
    def ok(self) -> bool:
        return self.rc == 0


@dataclasses.dataclass(frozen=True)
class Rule:
    """A refusal kind: the answer of one check, and the calls that prove it was due.

    ``phrases``: one of them is in the message. ``steps``: the operations it may
    answer. ``expected``: the answer itself is the point (another project refused),
    no proof needed. ``overlap``: proven by any call of another worker on the server
    running at the same time (the lock). Otherwise proven by a successful call in
    ``made_by`` on the server (of another worker when ``others_only``) that began
    before the refused one ended and ended after its ``since``, with no successful
    call in ``undone_by`` wholly between the two.
    """

    kind: str
    phrases: tuple[str, ...]
    steps: frozenset[str]
    made_by: frozenset[str] = frozenset()
    undone_by: frozenset[str] = frozenset()
    others_only: bool = False
    overlap: bool = False
    expected: bool = False


WORKER_STEPS = frozenset({"delete", "hard_reboot", "stop", "start", "suspend", "resume",
                          "resize", "resize confirm", "resize revert",
                          "other_reboot", "member_reboot"})
DECISIONS = frozenset({"resize confirm", "resize revert"})
STARTS = frozenset({"start", "resume", "hard_reboot", "resize", "resize revert"})

RULES = (
    Rule("locked: another worker's operation held the server (ServerLocked)",
         ("is in progress on it",), WORKER_STEPS, overlap=True),
    Rule("gone: deleted", ("no server with name or uuid",),
         WORKER_STEPS, made_by=frozenset({"delete"})),
    Rule("resize already confirmed or reverted by another worker",
         ("has no resize awaiting confirm or revert", "has no resize in progress"),
         DECISIONS, made_by=DECISIONS | {"delete"}, undone_by=frozenset({"resize"}),
         others_only=True),
    Rule("a resize awaits confirm or revert",
         ("a resize is awaiting confirm or revert", "is already in progress (backup in"),
         frozenset({"resize"}), made_by=frozenset({"resize"}),
         undone_by=DECISIONS | {"delete"}),
    Rule("suspended by another worker", ("while it is suspended",),
         frozenset({"resize"}), made_by=frozenset({"suspend"}),
         undone_by=frozenset({"resume", "start", "hard_reboot"})),
    Rule("not running: stopped or suspended by another call", ("cannot suspend server",),
         frozenset({"suspend"}), made_by=frozenset({"stop", "suspend"}), undone_by=STARTS),
    Rule("another project: refused (NotAuthorized)", ("is not a member of it",),
         frozenset({"other_reboot"}), expected=True),
    Rule("member without the owner's secret: refused (Barbican HTTP 403)", ("(http 403)",),
         frozenset({"member_reboot"}), expected=True),
)

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
_NAME = re.compile(r"soak-[0-9a-f]{8}")
_WAITED = re.compile(r"waited [0-9.]+ s")


def normalised(message: str) -> str:
    """A message as a failure kind: one line, UUIDs and server names replaced."""
    text = " ".join(message.split())
    return _WAITED.sub("waited N s", _NAME.sub("<server>", _UUID.sub("<uuid>", text)))


def proven(rule: Rule, refused: Call, calls: Sequence[Call]) -> bool:
    """True when ``calls`` show the state ``rule`` names was made under ``refused``."""
    if rule.expected:
        return True
    same = [c for c in calls if c.name == refused.name and c is not refused]
    if rule.overlap:
        # another project is refused before the lock is taken: it never holds it
        return any(c.worker != refused.worker and c.op != "other_reboot"
                   and c.t0 < refused.t1 and c.t1 > refused.t0 for c in same)
    for made in same:
        if not (made.ok and made.op in rule.made_by and made.t0 < refused.t1
                and made.t1 > refused.since):
            continue
        if rule.others_only and made.worker == refused.worker:
            continue
        if not any(u.ok and u.op in rule.undone_by and u.t0 > made.t1 and u.t1 < refused.t0
                   for u in same):
            return True
    return False


def classify(calls: Sequence[Call]) -> tuple[collections.Counter[str], collections.Counter[str],
                                             dict[str, str]]:
    """Refusals by kind, failures by kind, and one whole message per failure kind.

    A successful ``other_reboot``/``member_reboot`` is a failure (it must be refused);
    calls of the final checks (worker :data:`FINAL`) are never refusals.
    """
    refusals: collections.Counter[str] = collections.Counter()
    failures: collections.Counter[str] = collections.Counter()
    messages: dict[str, str] = {}
    for call in calls:
        if call.ok:
            if call.op in ("other_reboot", "member_reboot"):
                failures[f"{call.op}: ALLOWED"] += 1
            continue
        err = " ".join(call.err.lower().split())
        rule = None if call.worker == FINAL else next(
            (r for r in RULES if call.op in r.steps and any(p in err for p in r.phrases)), None)
        if rule is not None and proven(rule, call, calls):
            refusals[rule.kind] += 1
            continue
        text = normalised(call.err) or f"rc={call.rc}"
        kind = f"{call.op}: {text}" if rule is None else f"{call.op}: unproven {rule.kind}"
        failures[kind] += 1
        messages.setdefault(kind, text)
    return refusals, failures, messages


# --------------------------------------------------------------------------- the workers


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
        self.ek: GuestTPM | None = None
        self.console: Path | None = None


class Soak:
    def __init__(self, cli: CliRunner, guest: TestGuest, conn: libvirt.virConnect,
                 session: ks_session.Session, cleanup: Cleanup, tmp: Path) -> None:
        self.cli, self.guest, self.conn, self.session = cli, guest, conn, session
        self.cleanup, self.tmp = cleanup, tmp
        self.slots = [Slot(i) for i in range(SERVERS)]
        self.calls: list[Call] = []
        self.passphrases: set[str] = set()
        self.ever: set[str] = set()
        self.names: set[str] = set()
        self.guard = threading.Lock()

    def call(self, worker: int, name: str, op: str, *args: str, cloud: str = "owner",
             since: float = -math.inf) -> tuple[Call, object]:
        """Run ``vtpm-driver *args`` and log it as ``op`` on server ``name``."""
        t0 = time.monotonic()
        result = self.cli(*args, cloud=cloud)
        done = Call(worker, name, op, t0, time.monotonic(), result.rc, result.err, since)
        with self.guard:
            self.calls.append(done)
        return done, result

    def follow_up(self, worker: int, name: str, op: str, *args: str, since: float) -> Call:
        """A step following the worker's own (confirm/revert): tried again
        while the server is locked, at most :data:`RETRIES` times."""
        for _attempt in range(RETRIES):
            done, _result = self.call(worker, name, op, *args, since=since)
            if done.ok or "is in progress on it" not in done.err:
                break
        return done

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
                    self.create(seed, slot)
                finally:
                    with slot.lock:
                        slot.creating = False
            else:
                self.run(seed, slot, name, op, rnd)

    def create(self, worker: int, slot: Slot) -> None:
        name = f"soak-{uuid.uuid4().hex[:8]}"
        console = self.tmp / f"{name}.log"
        with self.guard:
            self.names.add(name)
        done, result = self.call(worker, name, "create", *create_args(
            self.guest, name, console, "--flavor-property", "hw:tpm_version=2.0",
            cmdline=f"{self.guest.cmdline} vtpm_test=stay"))
        if not done.ok:
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

    def run(self, worker: int, slot: Slot, name: str, op: str, rnd: random.Random) -> None:
        call = self.call
        if op == "delete":
            if call(worker, name, op, "server", "delete", name)[0].ok:
                with slot.lock:
                    if slot.name == name:
                        slot.name = slot.uuid = slot.ek = None
        elif op == "hard_reboot":
            call(worker, name, op, "server", "reboot", "--hard", name)
        elif op == "stop_start":
            call(worker, name, "stop", "server", "stop", name)
            call(worker, name, "start", "server", "start", name)
        elif op == "suspend_resume":
            call(worker, name, "suspend", "server", "suspend", name)
            call(worker, name, "resume", "server", "resume", name)
        elif op == "resize":
            resized = call(worker, name, "resize", "server", "resize", name, "--memory",
                           rnd.choice(("256", "320")))[0]
            # Its own resize, or the one pending that refused it (then it races the
            # worker that made it to confirm or revert).
            if resized.ok or "a resize is awaiting confirm or revert" in resized.err:
                decision = rnd.choice(("confirm", "revert"))
                self.follow_up(worker, name, f"resize {decision}", "server", "resize",
                               decision, name, since=resized.t0)
        elif op == "other_reboot":  # another project: refused
            call(worker, name, op, "server", "reboot", "--hard", name, cloud="other")
        elif op == "member_reboot":  # a project member without the passphrase: refused
            call(worker, name, op, "server", "reboot", "--hard", name, cloud="member")


def wait_ek(console: Path) -> GuestTPM:
    """The EK of the first VTPM_RESULT in a fresh console log."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        results = parse_vtpm_results(read_console(console))
        if results:
            return tpm_of(results[0])
        time.sleep(0.3)
    raise AssertionError(f"no VTPM_RESULT in {console}")


def orphans_of(report: dict, uuids: Iterable[str]) -> list[dict]:
    uuids = set(uuids)
    return [o for kind in ("orphan_libvirt_secrets", "orphan_state_dirs",
                           "orphan_barbican_secrets", "orphan_offhost_copies",
                           "half_done_operations")
            for o in report[kind] if o["instance_uuid"] in uuids]


# --------------------------------------------------------------------------- the test


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
    final = []

    def last(op: str, name: str, *args: str) -> Call:
        done = soak.call(FINAL, name, op, *args)[0]
        final.append(done)
        return done

    for slot in soak.slots:
        if slot.name is None:
            continue
        if not domain_exists(libvirt_conn, slot.uuid):
            violations.append(f"{slot.name}: its domain is gone")
            continue
        last("final stop", slot.name, "server", "stop", slot.name)
        slot.console.unlink(missing_ok=True)  # our own file: the next boot writes a fresh one
        reboot = last("final start", slot.name, "server", "start", slot.name)
        if not reboot.ok:
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
            last("final delete", slot.name, "server", "delete", slot.name)
    for instance_uuid in soak.ever:
        if (RESIZE_BACKUP_DIR / instance_uuid).exists():
            violations.append(f"{instance_uuid}: a resize backup is left in {RESIZE_BACKUP_DIR}")
    report = cli("audit", "-f", "json").json()
    violations += [f"orphan: {o}" for o in orphans_of(report, soak.ever)]
    violations += [f"{c.op} {c.name} failed: {normalised(c.err)}" for c in final if not c.ok]

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

    refusals, failures, messages = classify(soak.calls)
    figures = {"seconds": SECONDS, "workers": WORKERS, "servers": SERVERS,
               "operations": dict(collections.Counter(c.op for c in soak.calls)),
               "operations_total": len(soak.calls),
               "servers_created": len(soak.ever), "failures": dict(failures),
               "failure_messages": messages, "refusals": dict(refusals),
               "invariant_violations": violations}
    print("\nsoak:", json.dumps(figures, indent=1, sort_keys=True))
    if os.environ.get("VTPM_SOAK_REPORT"):
        Path(os.environ["VTPM_SOAK_REPORT"]).write_text(json.dumps(figures, indent=1))
    if os.environ.get("VTPM_SOAK_CALLS"):  # the whole log, to check a classification by hand
        Path(os.environ["VTPM_SOAK_CALLS"]).write_text(json.dumps(
            [dataclasses.asdict(c) | {"err": normalised(c.err)} for c in soak.calls], indent=0))
    assert soak.ever, "the soak created no server"
    assert violations == []
    assert failures == {}, messages  # every failed command explained, or it is a finding
