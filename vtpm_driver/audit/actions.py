"""The audit's actions (SPEC F7, issue 13): gather the facts, carry a repair out.

What ``vtpm-driver audit [--repair]`` calls, once (:meth:`AuditActions.run`):
list the vTPM secrets Barbican shows each scope, ask Nova which servers exist
where Nova is the orchestrator (:mod:`vtpm_driver.audit.orchestrator`),
compare them with this host's servers, libvirt secrets, swtpm state
directories, journal entries and off-host copies
(:mod:`vtpm_driver.audit.report`, pure), plan the repair
(:mod:`vtpm_driver.audit.plan`, pure) and carry it out, each action naming a
server under that server's lock.

The swtpm state directories are those of the one host the command line
manages (:attr:`vtpm_driver.standalone.backend.ServerBackend.state_base`): a repair
removes only what the audit listed there. Off-host copies taken on other hosts
(the store is shared) are left to those hosts.

Where Nova is the orchestrator, what belongs to a server Nova knows is no
orphan (:func:`vtpm_driver.audit.report.vouch`), and when Nova could not be
asked the plan deletes no Barbican secret, off-host copy or state directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging

from vtpm_driver import exception, statestore
from vtpm_driver.audit import orchestrator
from vtpm_driver.audit import plan as audit_plan
from vtpm_driver.audit import report as audit_report
from vtpm_driver.keymgr import KeyManager
from vtpm_driver.keymgr.api import KeyManagerAuditAPI
from vtpm_driver.keymgr.context import RequestContext
from vtpm_driver.model import consent, request, rules
from vtpm_driver.ops import journal, locks
from vtpm_driver.virt import state

LOG = logging.getLogger(__name__)

Progress = Callable[[str], contextlib.AbstractContextManager[None]]
#: Whose Barbican secrets were listed: the context and its secret security mode.
Scope = tuple[RequestContext, str]


def _no_progress(_message: str) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


def service_user_configured(conf: cfg.ConfigOpts) -> bool:
    """Whether ``[service_user]`` names an auth plugin (deployment-mode secrets)."""
    try:
        return bool(conf.service_user.auth_type)
    except (cfg.NoSuchOptError, cfg.NoSuchGroupError):
        return False


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """What :meth:`AuditActions.run` found and did.

    ``scopes``: whose Barbican secrets were listed (none: Barbican not
    checked); ``plan`` and ``done`` (each action with its outcome, ``planned``
    on a dry run) only with a repair.
    """

    report: audit_report.AuditReport
    scopes: tuple[Scope, ...] = ()
    plan: audit_plan.RepairPlan | None = None
    done: tuple[tuple[audit_plan.Action, str], ...] = ()

    @property
    def failed(self) -> bool:
        """A repair action failed, or a deletion was held back because Nova could not
        be asked (the repair was refused in part)."""
        refusal = self.report.orchestrator.refusal if self.report.orchestrator else None
        return any(outcome.startswith("failed") for _a, outcome in self.done) or any(
            refusal is not None and item.reason == refusal
            for item in (self.plan.skipped if self.plan else ()))


class AuditActions:
    """The audit and repair of one host's vTPM servers.

    ``backend`` is called for the host's backend when first needed (the
    caller connects it, and closes it); ``keymgr_factory`` builds the key
    manager that lists Barbican's vTPM secrets, ``nova_factory`` the client
    that asks Nova; ``progress(msg)`` wraps each slow step.
    """

    def __init__(self, conf: cfg.ConfigOpts, backend: Callable[[], Any], *,
                 keymgr_factory: Callable[[cfg.ConfigOpts], KeyManagerAuditAPI] = KeyManager,
                 nova_factory: Callable[[cfg.ConfigOpts], orchestrator.NovaServers]
                 = orchestrator.NovaServers,
                 progress: Progress = _no_progress) -> None:
        self.conf = conf
        self._backend = backend
        self._keymgr_factory = keymgr_factory
        self._nova_factory = nova_factory
        self._progress = progress

    @property
    def backend(self) -> Any:
        return self._backend()

    @property
    def store(self) -> statestore.DirectoryStateStore:
        return statestore.DirectoryStateStore(self.conf.vtpm.state_backup_dir)

    def run(self, caller: Callable[[], RequestContext] | None, *, barbican: bool = True,
            repair: bool = False, dry_run: bool = False,
            min_age: float = audit_plan.DEFAULT_MIN_AGE,
            only: Sequence[str] | None = None) -> AuditResult:
        """The whole ``audit [--repair [--dry-run]]``: gather, report, plan, repair.

        ``caller``: the caller's context, logged in on first use (None: no
        credentials were given). ``barbican`` False: Barbican is not listed.
        Nothing is changed unless ``repair`` (and not ``dry_run``).

        :raises VTPMError: libvirt, Keystone or Barbican failed while gathering.
        """
        scopes = self._scopes(caller) if barbican else []
        keymgr = self._keymgr_factory(self.conf) if scopes else None
        listed = self._list_scopes(keymgr, scopes) if keymgr is not None else None
        answer = None
        if self.conf.vtpm.orchestrator == orchestrator.NOVA:
            with self._progress("Asking Nova which servers exist"):
                answer = orchestrator.ask(self.conf, self._nova_factory)
        report = self.audit(listed, answer)
        if answer is not None and answer.servers:
            report = dataclasses.replace(report, consents=self.consents(answer.servers))
        if not repair:
            return AuditResult(report, tuple(scopes))
        plan = self.repair_plan(report, min_age=min_age, only=only)
        if dry_run:
            done = [(action, "planned") for action in plan.actions]
        else:
            contexts = {mode: ctx for ctx, mode in scopes}
            if request.SECRET_USER not in contexts and caller is not None:
                # Finishing an interrupted resize may delete the secret it created.
                contexts[request.SECRET_USER] = caller()
            with self._progress("Repairing"):
                done = self.repair(plan, keymgr, contexts)
        return AuditResult(report, tuple(scopes), plan, tuple(done))

    def _scopes(self, caller: Callable[[], RequestContext] | None) -> list[Scope]:
        """Whose vTPM secrets to list: the caller's, and the service user's when configured."""
        with_service = service_user_configured(self.conf)
        if caller is None and not with_service:
            LOG.warning("Barbican not checked: no credentials (OS_* or --os-*) and no "
                        "[service_user]; orphaned Barbican secrets cannot be listed")
            return []
        context = caller() if caller is not None else None
        scopes: list[Scope] = []
        if context is not None:
            scopes.append((context, request.SECRET_USER))
        if with_service:
            scopes.append((context or RequestContext(user_id="", project_id=""),
                           request.SECRET_DEPLOYMENT))
        return scopes

    def _list_scopes(self, keymgr: KeyManagerAuditAPI, scopes: list[Scope]
                     ) -> list[audit_report.BarbicanSecret]:
        """The vTPM secrets of each scope; the service user's may fail if the caller's
        worked (that scope is then dropped from ``scopes``)."""
        found: list[audit_report.BarbicanSecret] = []
        for context, mode in list(scopes):
            try:
                with self._progress(f"Listing vTPM secrets in Barbican ({mode} mode)"):
                    found.extend(self.list_barbican(keymgr, [(context, mode)]))
            except exception.VTPMError as exc:
                if not rules.owned_by_service_user(mode) or len(scopes) == 1:
                    raise
                LOG.warning("Barbican secrets of [service_user] not checked: %s", exc)
                scopes.remove((context, mode))
        return found

    def list_barbican(self, keymgr: KeyManagerAuditAPI,
                      scopes: Sequence[tuple[RequestContext, str]]
                      ) -> list[audit_report.BarbicanSecret]:
        """The vTPM secrets each ``(context, mode)`` can list, with their read ACL.

        One listing per scope and one ACL GET per secret (metadata only). A
        secret deleted between the listing and its ACL GET (its server deleted
        meanwhile, by another host or Nova) is gone: it is left out.

        :raises VTPMError: Barbican or Keystone failed.
        """
        found: dict[str, audit_report.BarbicanSecret] = {}
        for context, mode in scopes:
            for item in keymgr.list_vtpm_secrets(context, mode):
                uuid = item.get("uuid")
                try:
                    access = (keymgr.secret_project_access(context, uuid, mode) if uuid
                              else None)
                except exception.VTPMSecretNotFound:
                    LOG.info("vTPM secret %s was deleted while the audit listed it", uuid)
                    continue
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

    def consents(self, servers: Mapping[str, audit_report.KnownServer]
                 ) -> tuple[audit_report.ConsentFinding, ...]:
        """The owners' consents Nova's servers name, each in force, expired or
        unusable (SPEC: issue 21). Read as the service user, as the shim reads
        them; one in force is also tried with Keystone (a credential its owner
        deleted is unusable). Changes nothing; never raises.
        """
        named = sorted((s.uuid, s.consent_record, s.owner or "")
                       for s in servers.values() if s.consent_record)
        if not named:
            return ()
        keymgr: Any = self._keymgr_factory(self.conf)
        now = datetime.datetime.now(datetime.UTC)
        found = []
        with self._progress("Checking the owners' consents"):
            for server, record_id, owner in named:
                try:
                    granted = keymgr.get_consent(record_id)
                    state, detail = consent.standing(granted, server=server, owner=owner,
                                                     now=now)
                    if state == consent.IN_FORCE:
                        keymgr.consent_context(granted)
                except (consent.ConsentError, exception.VTPMSecretNotFound,
                        exception.VTPMSecretForbidden) as exc:
                    state, detail = consent.UNUSABLE, str(exc)
                except exception.VTPMError as exc:
                    state, detail = "unchecked", str(exc)
                found.append(audit_report.ConsentFinding(server, str(record_id), state,
                                                         detail))
        return tuple(found)

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

    def repair(self, plan: audit_plan.RepairPlan, keymgr: KeyManagerAuditAPI | None,
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
        context = (contexts.get(request.SECRET_USER) or contexts.get(request.SECRET_DEPLOYMENT)
                   or RequestContext(user_id="", project_id=""))
        decision = backend.driver.recover(context, instance)
        if decision is None:
            return "already done: no interrupted operation now"
        return f"done: {decision.action.value}"

    def _do(self, action: audit_plan.Action, keymgr: KeyManagerAuditAPI | None,
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
        if keymgr is None:  # Barbican was not listed: no plan names its secrets
            return "skipped: Barbican was not listed"
        context = contexts[action.mode or request.SECRET_USER]
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
