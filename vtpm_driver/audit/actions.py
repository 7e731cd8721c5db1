"""The service's audit and repair (SPEC F7, issue 13), mixed into :class:`ServerService`.

What ``vtpm-driver audit [--repair]`` calls: list the vTPM secrets Barbican
shows each scope, compare them with this host's servers, libvirt secrets,
swtpm state directories, journal entries and off-host copies
(:mod:`vtpm_driver.audit.report`, pure), and carry out a repair plan, each action
naming a server under that server's lock.

The swtpm state directories are those of the one host the command line
manages (:attr:`vtpm_driver.backend.ServerBackend.state_base`): a repair
removes only what the audit listed there. Off-host copies taken on other hosts
(the store is shared) are left to those hosts.

Where Nova is the orchestrator, the caller passes Nova's answer
(:func:`vtpm_driver.audit.orchestrator.ask`): what belongs to a server Nova knows is
no orphan (:func:`vtpm_driver.audit.report.vouch`), and when Nova could not be asked
the plan deletes no Barbican secret, off-host copy or state directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from vtpm_driver import exception, spec
from vtpm_driver.audit import plan as audit_plan
from vtpm_driver.audit import report as audit_report
from vtpm_driver.keymgr.api import KeyManagerAuditAPI
from vtpm_driver.keymgr.context import RequestContext
from vtpm_driver.ops import journal, locks
from vtpm_driver.virt import state


class AuditActions:
    """list_barbican, audit, repair_plan, repair (over ``backend``, ``conf``, ``store``)."""

    conf: Any
    backend: Any
    store: Any

    def list_barbican(self, keymgr: KeyManagerAuditAPI,
                      scopes: Sequence[tuple[RequestContext, str]]
                      ) -> list[audit_report.BarbicanSecret]:
        """The vTPM secrets each ``(context, mode)`` can list, with their read ACL.

        One listing per scope and one ACL GET per secret (metadata only).
        :raises VTPMError: Barbican or Keystone failed.
        """
        found: dict[str, audit_report.BarbicanSecret] = {}
        for context, mode in scopes:
            for item in keymgr.list_vtpm_secrets(context, mode):
                uuid = item.get("uuid")
                access = keymgr.secret_project_access(context, uuid, mode) if uuid else None
                found.setdefault(str(uuid), audit_report.BarbicanSecret(
                    uuid=uuid, name=str(item.get("name")),
                    instance_uuid=item.get("instance_uuid"), mode=mode,
                    project_access=access, created=item.get("created"),
                    creator=item.get("creator")))
        return list(found.values())

    def audit(self, barbican: Sequence[audit_report.BarbicanSecret] | None,
              orchestrator: audit_report.OrchestratorAnswer | None = None
              ) -> audit_report.AuditReport:
        """This host's vTPM servers and orphans (SPEC F7); changes nothing.

        ``barbican``: the vTPM secrets the caller could list, or None when
        Barbican was not checked (then no Barbican orphan is reported).
        ``orchestrator``: Nova's answer, or None on a standalone host.
        """
        backend = self.backend
        base = str(backend.state_base)
        report = audit_report.audit(
            backend.list(), backend.domain_uuids(),
            [audit_report.LibvirtSecret(s.uuid, s.usage_id, s.ephemeral, s.private)
             for s in backend.libvirt_vtpm_secrets()],
            state.list_state_dirs(base), None if barbican is None else list(barbican),
            state_dir_base=base)
        report = dataclasses.replace(report, half_done=self._half_done(backend))
        periodic = self.conf.vtpm.state_backup == "periodic"
        report = audit_report.offhost_copies(
            # This host as its copies name it (ServerService.site: the libvirt URI).
            report, self.store.list(), backend.domain_uuids(), host=backend.uri,
            now=time.time(),
            interval=float(self.conf.vtpm.state_backup_interval) if periodic else None,
            temporaries=self.store.temporaries(), store_root=str(self.store.root))
        return audit_report.vouch(report, orchestrator)

    def _half_done(self, backend: Any) -> tuple[audit_report.HalfDone, ...]:
        """The servers whose journal names an interrupted operation, with the facts
        :func:`vtpm_driver.ops.journal.decide` needs and a live lock holder, if any."""
        servers = backend.list()
        facts: dict[str, dict[str, bool]] = {}
        holders: dict[str, int] = {}
        for instance in servers:
            try:
                intent = journal.read(instance.system_metadata)
            except exception.InvalidJournalEntry:
                continue  # reported as such by half_done, no facts needed
            if intent is None:
                continue
            facts[instance.uuid] = {
                "backup_exists": bool(backend.resize_pending(instance)),
                "tmp_backup_exists": bool(intent.tmp_backup)
                and os.path.exists(intent.tmp_backup)}
            pid = (locks.read_holder(self.conf.vtpm.lock_path, instance.uuid) or {}).get("pid")
            if isinstance(pid, int) and _alive(pid):
                holders[instance.uuid] = pid
        return audit_report.half_done(servers, facts, holders)

    def repair_plan(self, report: audit_report.AuditReport, *, min_age: float,
                    only: Sequence[str] | None = None) -> audit_plan.RepairPlan:
        """:func:`vtpm_driver.audit.plan.plan`, keeping the Barbican secret of every server
        that has an off-host copy (a server Nova shelved or may evacuate lives in the
        state store)."""
        kept = {audit_report.canonical_uuid(copy.uuid) for copy in self.store.list()}
        if kept:
            report = dataclasses.replace(report, orphans=tuple(
                o for o in report.orphans
                if o.kind != audit_report.BARBICAN_SECRET or o.instance_uuid not in kept))
        full = audit_plan.plan(report, now=time.time(), min_age=min_age, only=only)
        return audit_plan.plan_copies(full, report, only)

    def repair(self, plan: audit_plan.RepairPlan, keymgr: KeyManagerAuditAPI,
               contexts: Mapping[str, RequestContext]) -> list[tuple[audit_plan.Action, str]]:
        """Do each action of ``plan``; returns (action, outcome) for each, never raises.

        Each action that names a server runs under that server's lock
        (:func:`vtpm_driver.ops.locks.server_lock`), so it never meets an
        operation in progress; a server still locked after ``[vtpm]
        lock_timeout`` is skipped. A state directory or Barbican secret is
        only removed if no domain of its UUID has appeared since the audit.
        A half-done operation is finished or rolled back by the driver
        (``VTPMDriver.recover``). ``contexts`` maps a secret security mode to
        the context its Barbican secrets were listed with.
        """
        done = []
        for action in plan.actions:
            try:
                with self._repair_lock(action):
                    outcome = self._do(action, keymgr, contexts)
            except exception.ServerLocked as exc:
                outcome = f"skipped: {exc}"
            except exception.VTPMError as exc:
                outcome = f"failed: {exc}"
            done.append((action, outcome))
        return done

    def _repair_lock(self, action: audit_plan.Action) -> contextlib.AbstractContextManager[None]:
        """The lock of the server ``action`` names (none for a name that is no UUID)."""
        instance_uuid = audit_report.canonical_uuid(action.instance_uuid)
        if instance_uuid is None:
            return contextlib.nullcontext()
        return locks.server_lock(self.conf, instance_uuid, "repair")

    def _recover(self, action: audit_plan.Action,
                 contexts: Mapping[str, RequestContext]) -> str:
        """Finish or roll back the server's interrupted operation (under its lock)."""
        backend = self.backend
        try:
            instance = backend.find(action.target)
        except exception.InstanceNotFound:
            return "already gone: no such server now"
        context = (contexts.get(spec.SECRET_USER) or contexts.get(spec.SECRET_DEPLOYMENT)
                   or RequestContext(user_id="", project_id=""))
        decision = backend.driver.recover(context, instance)
        if decision is None:
            return "already done: no interrupted operation now"
        return f"done: {decision.action.value}"

    def _do(self, action: audit_plan.Action, keymgr: KeyManagerAuditAPI,
            contexts: Mapping[str, RequestContext]) -> str:
        backend = self.backend
        if action.kind == audit_plan.RECOVER:
            return self._recover(action, contexts)
        if action.kind == audit_plan.REMOVE_COPY:
            return "done" if self.store.delete(action.target) else "already gone"
        if action.kind == audit_plan.UNDEFINE_SECRET:
            return "done" if backend.undefine_libvirt_secret(action.target) else "already gone"
        if action.kind in (audit_plan.REMOVE_STATE, audit_plan.DELETE_BARBICAN) and (
                action.instance_uuid and backend.domain_exists(action.instance_uuid)):
            return "skipped: a domain of that UUID exists now"
        if action.kind == audit_plan.REMOVE_STATE:
            gone = backend.remove_state_dir(action.instance_uuid)
            return "done" if gone else "already gone"
        context = contexts[action.mode or spec.SECRET_USER]
        if action.kind == audit_plan.DELETE_BARBICAN:
            gone = keymgr.delete_secret(context, action.target, action.mode)
            return "done" if gone else "already gone"
        keymgr.set_owner_only_acl(context, action.target, action.user_id, action.mode)
        return "done"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a lock holder file outlives a killed holder)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
