"""What ``vtpm-driver audit --repair`` does about an audit report (pure).

:func:`plan` turns the findings of :func:`vtpm_driver.audit.report.audit` into a
:class:`RepairPlan`: actions (undefine an orphaned libvirt secret, remove a
state directory of no server, delete an old Barbican secret of a gone server,
make a project-readable secret owner-only, finish or roll back a half-done
operation, remove an off-host copy of no server) and what is left alone, with
why. No I/O: the service carries the plan out (``ServerService.repair``).
Nothing outside what the audit reported as orphaned or half-done is touched.

Where an orchestrator (Nova) is configured and could not be asked which
servers exist (:attr:`vtpm_driver.audit.report.OrchestratorAnswer.refusal`), no
Barbican secret, off-host copy or state directory is deleted: each is listed
as skipped with the reason (``Nova could not be asked: ...``).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable

from vtpm_driver.audit.report import (
    BARBICAN_SECRET,
    LIBVIRT_SECRET,
    NO_ACTION,
    OFFHOST_COPY,
    STATE_DIR,
    STORE_TEMPORARY,
    AuditReport,
    BarbicanSecret,
    Orphan,
)
from vtpm_driver.model import rules
from vtpm_driver.model.server import canonical_uuid

UNDEFINE_SECRET = "undefine_libvirt_secret"
REMOVE_STATE = "remove_state_dir"
DELETE_BARBICAN = "delete_barbican_secret"
FIX_ACL = "set_owner_only_acl"
RECOVER = "finish_or_roll_back"
REMOVE_COPY = "remove_offhost_copy"
#: The deletions an orchestrator that could not be asked holds back (audit.GUARDED_KINDS).
_GUARDED = (REMOVE_STATE, DELETE_BARBICAN, REMOVE_COPY)
#: Barbican orphans younger than this (seconds) are left alone by default: a
#: create in another process may have made the secret and not yet its domain.
DEFAULT_MIN_AGE = 600.0


@dataclasses.dataclass(frozen=True)
class Action:
    """One thing ``audit --repair`` does.

    ``target`` is a secret UUID (libvirt, Barbican) or a state directory path;
    ``mode`` the secret security mode a Barbican secret was listed in;
    ``user_id`` the one user an owner-only ACL names (None: nobody but the creator).
    """

    kind: str
    target: str
    instance_uuid: str | None
    reason: str
    mode: str | None = None
    user_id: str | None = None


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Something the audit reported that the repair leaves alone, and why."""

    target: str
    instance_uuid: str | None
    reason: str


@dataclasses.dataclass(frozen=True)
class RepairPlan:
    actions: tuple[Action, ...]
    skipped: tuple[Skipped, ...]


def age_seconds(created: str | None, now: float) -> float | None:
    """Seconds since Barbican's ``created`` (ISO 8601, naive = UTC); None if unreadable."""
    if not created:
        return None
    try:
        when = datetime.datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return now - when.timestamp()


def _barbican_action(orphan: Orphan, item: BarbicanSecret | None, *, now: float,
                     min_age: float) -> Action | Skipped:
    """Delete a Barbican orphan only if it is ours by name, its server is gone, and it is old."""
    def skip(why: str) -> Skipped:
        return Skipped(orphan.id, orphan.instance_uuid, why)

    if item is None or orphan.instance_uuid is None:
        return skip("not named 'vTPM secret for instance <uuid>': not created by vtpm-driver")
    if not orphan.reason.startswith("no server "):
        return skip(f"kept: {orphan.reason} (its server exists; check its record by hand)")
    if min_age > 0:
        age = age_seconds(item.created, now)
        if age is None:
            return skip("kept: Barbican gave no readable creation time")
        if age < min_age:
            return skip(f"kept: created {age:.0f} s ago (less than --min-age {min_age:.0f} s); "
                        "a create may still be under way")
    return Action(DELETE_BARBICAN, orphan.id, orphan.instance_uuid,
                  f"delete Barbican secret: {orphan.reason}", mode=item.mode)


def _unless_refused(decided: Action | Skipped, report: AuditReport) -> Action | Skipped:
    """``decided``, or Skipped when it deletes what the orchestrator could not vouch for."""
    refusal = report.orchestrator.refusal if report.orchestrator is not None else None
    if refusal is None or not isinstance(decided, Action) or decided.kind not in _GUARDED:
        return decided
    return Skipped(decided.target, decided.instance_uuid, refusal)


def plan(report: AuditReport, *, now: float, min_age: float = DEFAULT_MIN_AGE,
         only: Iterable[str] | None = None) -> RepairPlan:
    """What ``audit --repair`` does about ``report``: a pure function of the findings.

    * orphaned libvirt vtpm secrets, and ``user``/``deployment`` secrets left
      defined after a start: undefined (no starting guest needs them);
    * orphaned state directories (only ``<base>/<uuid>`` with no domain): removed;
    * Barbican secrets named for a server that exists nowhere checked, older
      than ``min_age`` seconds: deleted; any other Barbican orphan is kept;
    * project-readable vTPM secrets that are not being deleted: owner-only ACL;
    * first of all, half-done operations: finished or rolled back by the
      driver (``VTPMDriver.recover``, which takes the server lock: one still
      running is waited for, then has nothing left to do); a garbled journal
      entry is left alone (listed as skipped: fix it by hand).

    ``only`` limits the plan to what names these instance UUIDs. Nothing else
    is ever planned. When ``report`` says the orchestrator could not be asked,
    no state directory or Barbican secret is deleted (skipped, with why).
    """
    if only is not None:
        return _limited(plan(report, now=now, min_age=min_age), only)
    actions: list[Action] = [
        Action(RECOVER, entry.instance_uuid, entry.instance_uuid,
               f"{entry.action} the interrupted {entry.operation} (at step {entry.step!r}, "
               f"pid {entry.pid}): {entry.reason}")
        for entry in report.half_done if entry.action != NO_ACTION]
    skipped: list[Skipped] = [
        Skipped(entry.instance_uuid, entry.instance_uuid, f"kept: {entry.reason}")
        for entry in report.half_done if entry.action == NO_ACTION]
    for orphan in report.orphans_of(LIBVIRT_SECRET):
        actions.append(Action(UNDEFINE_SECRET, orphan.id, orphan.instance_uuid,
                              f"undefine libvirt secret: {orphan.reason}"))
    for finding in report.servers:
        if (rules.left_after_start(finding.secret_security)
                and finding.defined_secret
                and finding.defined_secret == canonical_uuid(finding.secret_uuid)):
            actions.append(Action(
                UNDEFINE_SECRET, finding.defined_secret, canonical_uuid(finding.uuid),
                f"undefine libvirt secret: {finding.secret_security}-mode secret of server "
                f"{finding.name!r} left defined after its start"))
    for orphan in report.orphans_of(STATE_DIR):
        decided = _unless_refused(Action(REMOVE_STATE, orphan.id, orphan.instance_uuid,
                                         f"remove state directory: {orphan.reason}"), report)
        (actions if isinstance(decided, Action) else skipped).append(decided)
    by_uuid = {canonical_uuid(b.uuid): b for b in report.barbican_secrets if b.uuid}
    deleted = set()
    for orphan in report.orphans_of(BARBICAN_SECRET):
        decided = _unless_refused(
            _barbican_action(orphan, by_uuid.get(orphan.id), now=now, min_age=min_age),
            report)
        if isinstance(decided, Action):
            actions.append(decided)
            deleted.add(decided.target)
        else:
            skipped.append(decided)
    servers = {canonical_uuid(f.uuid): f for f in report.servers}
    for item in report.readable:
        secret_uuid = canonical_uuid(item.uuid)
        if secret_uuid is None or secret_uuid in deleted:
            continue
        server = servers.get(canonical_uuid(item.instance_uuid))
        owner = getattr(server.instance, "user_id", None) if server is not None else None
        user = None if rules.owned_by_service_user(item.mode) else (owner or item.creator)
        actions.append(Action(FIX_ACL, secret_uuid, canonical_uuid(item.instance_uuid),
                              "set an owner-only ACL: the project can read it",
                              mode=item.mode, user_id=user))
    return RepairPlan(tuple(actions), tuple(skipped))


def _limited(full: RepairPlan, only: Iterable[str]) -> RepairPlan:
    wanted = {canonical_uuid(u) or u for u in only}
    return RepairPlan(tuple(a for a in full.actions if a.instance_uuid in wanted),
                      tuple(s for s in full.skipped if s.instance_uuid in wanted))


# --------------------------------------------------------------------------- off-host copies


def plan_copies(repair: RepairPlan, report: AuditReport, only: Iterable[str] | None = None
                ) -> RepairPlan:
    """``repair`` plus removing the orphaned off-host copies ``report`` found (this host's
    only: :func:`vtpm_driver.audit.report.offhost_copies`); the state store's leftover
    temporaries are listed as kept (a write may be under way). When ``report`` says
    the orchestrator could not be asked, no copy is removed (skipped, with why)."""
    wanted = None if only is None else {canonical_uuid(u) or u for u in only}
    actions = list(repair.actions)
    skipped = list(repair.skipped)
    for orphan in report.orphans_of(OFFHOST_COPY):
        if wanted is not None and orphan.instance_uuid not in wanted:
            continue
        decided = _unless_refused(Action(REMOVE_COPY, orphan.id, orphan.instance_uuid,
                                         f"remove off-host copy: {orphan.reason}"), report)
        (actions if isinstance(decided, Action) else skipped).append(decided)
    for orphan in report.orphans_of(STORE_TEMPORARY):
        if wanted is None or orphan.instance_uuid in wanted:
            skipped.append(Skipped(orphan.id, orphan.instance_uuid, f"kept: {orphan.reason}"))
    return RepairPlan(tuple(actions), tuple(skipped))
