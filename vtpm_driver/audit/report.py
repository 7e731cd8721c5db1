"""Operator audit (SPEC F7): the vTPM servers of a host, and what is left over.

Pure functions over lists: the ``vtpm-driver audit`` command gathers what
libvirt, the swtpm state directory and Barbican hold, and :func:`audit` decides
what is an orphan. Keeping the decision here, free of I/O, lets every rule be
unit-tested with plain lists.

An orphan is something that holds or protects vTPM state but belongs to no
server:

* a libvirt ``vtpm`` secret whose usage name (the instance UUID) is no domain
  on this host, or whose domain records another secret;
* a swtpm state directory ``<base>/<uuid>`` with no domain of that UUID;
* a Barbican secret named ``vTPM secret for instance <uuid>`` whose UUID is no
  server on this host, or whose server records another secret.

Things that are wrong with an existing server (a ``user``-mode secret still
defined after start, a ``host``-mode secret missing, no secret recorded) are
listed as that server's problems instead: nothing there is orphaned.

A server whose record still holds an intent journal entry
(:mod:`vtpm_driver.ops.journal`) is in a half-done operation: :func:`half_done`
says what :func:`vtpm_driver.ops.journal.decide` would do about it, and
``audit --repair`` has the driver carry that out (``VTPMDriver.recover``,
under the server lock) before anything else.
"""

from __future__ import annotations

import dataclasses
import os.path
from collections.abc import Iterable, Mapping
from typing import Any

from vtpm_driver import exception
from vtpm_driver.model import request, rules
from vtpm_driver.model.server import SYSMETA_KEY, canonical_uuid, server_label
from vtpm_driver.ops import journal

LIBVIRT_SECRET = "libvirt_secret"
STATE_DIR = "state_dir"
BARBICAN_SECRET = "barbican_secret"
OFFHOST_COPY = "offhost_copy"
STORE_TEMPORARY = "store_temporary"
ORPHAN_KINDS = (LIBVIRT_SECRET, STATE_DIR, BARBICAN_SECRET, OFFHOST_COPY, STORE_TEMPORARY)
#: A half-done entry whose journal is garbled, and what a repair does about it: nothing.
INVALID_ENTRY = "invalid entry"
NO_ACTION = "none"
#: What a repair could delete that a server of the orchestrator still needs: where Nova
#: runs, a server shelved-offloaded (or on another compute) has no domain on this host,
#: yet these are its TPM (:func:`vouch`).
GUARDED_KINDS = (STATE_DIR, BARBICAN_SECRET, OFFHOST_COPY)


@dataclasses.dataclass(frozen=True)
class LibvirtSecret:
    """A libvirt vTPM secret as listed (``virt.secret.VTPMSecretInfo`` fits)."""

    uuid: str
    usage_id: str
    ephemeral: bool = True
    private: bool = True


@dataclasses.dataclass(frozen=True)
class BarbicanSecret:
    """A Barbican secret named ``vTPM secret for instance <uuid>`` (metadata only).

    ``mode`` is the secret security mode it was listed in (``user``: with the
    caller's token, ``deployment``: as the service user); ``project_access``
    is its read ACL's project-access flag (None: not read); ``created`` is
    Barbican's ISO 8601 creation time, ``creator`` the creating user.
    """

    uuid: str | None
    name: str
    instance_uuid: str | None
    mode: str = request.SECRET_USER
    project_access: bool | None = None
    created: str | None = None
    creator: str | None = None


@dataclasses.dataclass(frozen=True)
class ServerFinding:
    """A vTPM server (the :class:`~vtpm_driver.model.server.Instance` as recorded) and what is
    wrong with it.

    ``version``/``model``/``secret_security`` are None when its recorded
    request is invalid; ``config_error`` then says why.
    """

    instance: Any
    problems: tuple[str, ...] = ()
    version: str | None = None
    model: str | None = None
    secret_security: str | None = None
    secret_uuid: str | None = None
    config_error: str | None = None
    defined_secret: str | None = None

    @property
    def name(self) -> str:
        return self.instance.name

    @property
    def uuid(self) -> str:
        return self.instance.uuid


@dataclasses.dataclass(frozen=True)
class Orphan:
    """Something that holds or guards vTPM state and belongs to no server.

    ``id`` is the secret UUID (libvirt, Barbican) or the directory path
    (state directory); ``instance_uuid`` is the server it names, if any.
    """

    kind: str
    id: str
    instance_uuid: str | None
    reason: str


@dataclasses.dataclass(frozen=True)
class HalfDone:
    """An operation a server's journal says was started and not finished.

    ``action``/``reason``: what :func:`vtpm_driver.ops.journal.decide` would do
    about it (``finish``, ``roll back``, ``clear``); ``holder_pid``: a live
    process that holds the server's lock now (then the operation may simply
    be running, and a repair waits for it).
    """

    instance_uuid: str
    name: str
    operation: str
    step: str
    pid: int
    action: str
    reason: str
    holder_pid: int | None = None


@dataclasses.dataclass(frozen=True)
class KnownServer:
    """A server the orchestrator (Nova) knows and has not deleted, any status, any host.

    ``status`` as Nova shows it (``SHELVED_OFFLOADED``, ``SOFT_DELETED``, ...);
    ``host`` its compute (None: shelved-offloaded, or not scheduled yet).
    """

    uuid: str
    status: str
    host: str | None = None
    owner: str | None = None
    consent_record: str | None = None  # the owner's consent its metadata names


@dataclasses.dataclass(frozen=True)
class ConsentFinding:
    """An owner's consent a server names (:mod:`vtpm_driver.model.consent`): ``state``
    is ``in force``, ``expired``, ``unusable`` or ``unchecked``; ``detail`` says why."""

    server: str
    record_id: str
    state: str
    detail: str


@dataclasses.dataclass(frozen=True)
class OrchestratorAnswer:
    """What the orchestrator said about which servers exist.

    ``name`` is how reasons name it (``Nova``); ``servers`` maps a canonical
    instance UUID to the server, or is None when it could not be asked, then
    ``error`` says why. Where no orchestrator is configured (a standalone
    host) there is no answer at all (None), and this host alone decides.
    """

    name: str
    servers: Mapping[str, KnownServer] | None
    error: str | None = None

    @property
    def asked(self) -> bool:
        return self.servers is not None

    @property
    def refusal(self) -> str | None:
        """Why nothing of :data:`GUARDED_KINDS` may be deleted, or None if it may."""
        if self.servers is not None:
            return None
        return f"{self.name} could not be asked: {self.error or 'no answer'}"


@dataclasses.dataclass(frozen=True)
class Vouched:
    """Something this host alone would call an orphan, kept because the orchestrator
    knows its server (``status``, ``host``); ``reason`` is what this host saw."""

    kind: str
    id: str
    instance_uuid: str
    status: str
    host: str | None
    reason: str


@dataclasses.dataclass(frozen=True)
class AuditReport:
    """The audit's result; ``barbican_checked`` is False when Barbican was not listed.

    ``orchestrator``: Nova's answer (None: no orchestrator, a standalone host);
    ``vouched``: what Nova's answer kept from being an orphan.
    """

    servers: tuple[ServerFinding, ...]
    orphans: tuple[Orphan, ...]
    barbican_checked: bool
    readable: tuple[BarbicanSecret, ...] = ()
    half_done: tuple[HalfDone, ...] = ()
    barbican_secrets: tuple[BarbicanSecret, ...] = ()
    #: Off-host copies older than ``[vtpm] state_backup_interval`` (periodic) or overtaken.
    stale_copies: tuple[Orphan, ...] = ()
    orchestrator: OrchestratorAnswer | None = None
    vouched: tuple[Vouched, ...] = ()
    consents: tuple[ConsentFinding, ...] = ()

    def orphans_of(self, kind: str) -> tuple[Orphan, ...]:
        return tuple(orphan for orphan in self.orphans if orphan.kind == kind)

    @property
    def clean(self) -> bool:
        """No orphan, no project-readable secret, no half-done operation, no server problem."""
        return not (self.orphans or self.readable or self.half_done
                    or any(finding.problems for finding in self.servers))


def _canonical(value: object) -> str | None:
    return canonical_uuid(value)


def _finding(instance: Any) -> ServerFinding:
    """What the audit reads from a server (never raises)."""
    recorded = (getattr(instance, "system_metadata", None) or {}).get(SYSMETA_KEY)
    secret = recorded if isinstance(recorded, str) and recorded else None
    try:
        config = rules.vtpm_of(instance)
    except exception.VTPMError as exc:  # a bad record is a finding, not a crash
        return ServerFinding(instance, secret_uuid=secret,
                             config_error=f"invalid vTPM request: {exc}")
    if config is None:
        return ServerFinding(instance, secret_uuid=secret)
    return ServerFinding(instance, version=config.version, model=config.model,
                         secret_security=config.secret_security, secret_uuid=secret)


def _asks_for_vtpm(finding: ServerFinding) -> bool:
    """Whether the server asks for a vTPM (an invalid request counts)."""
    return finding.version is not None or finding.config_error is not None


def _server_problems(server: ServerFinding, libvirt_by_usage: Mapping[str, LibvirtSecret]
                     ) -> tuple[str, ...]:
    problems: list[str] = []
    if server.config_error:
        problems.append(server.config_error)
    defined = libvirt_by_usage.get(_canonical(server.uuid) or server.uuid)
    if server.version is not None and not server.secret_uuid:
        problems.append("no vtpm_secret_uuid in system_metadata: its vTPM state cannot be "
                        "unlocked")
    persistent = (server.secret_security is not None
                  and rules.uses_persistent_secret(server.secret_security))
    if persistent and server.secret_uuid and (
        defined is None or defined.uuid != _canonical(server.secret_uuid)
    ):
        problems.append(f"host-mode libvirt secret {server.secret_uuid} is not defined")
    if rules.left_after_start(server.secret_security) and (
        defined is not None and defined.uuid == _canonical(server.secret_uuid)
    ):
        problems.append(
            f"{server.secret_security}-mode libvirt secret {defined.uuid} is still defined; "
            "it must be undefined once the guest has started"
        )
    return tuple(problems)


def audit(
    servers: Iterable[Any],
    domain_uuids: Iterable[str],
    libvirt_secrets: Iterable[LibvirtSecret],
    state_dir_uuids: Iterable[str],
    barbican_secrets: Iterable[BarbicanSecret] | None,
    *,
    state_dir_base: str = "/var/lib/libvirt/swtpm",
) -> AuditReport:
    """Find orphans and per-server problems.

    ``servers`` are this host's servers (:class:`~vtpm_driver.model.server.Instance`,
    as recorded); ``domain_uuids`` every
    libvirt domain, ours or not (a foreign domain's secret or state is not an
    orphan); ``state_dir_uuids`` the ``<uuid>`` directories under
    ``state_dir_base``; ``barbican_secrets`` None when Barbican was not listed.
    UUIDs are compared in canonical form, whatever their case.
    """
    server_list = sorted((_finding(s) for s in servers), key=lambda s: (s.name, s.uuid))
    by_uuid = {_canonical(s.uuid) or s.uuid: s for s in server_list}
    domains = {_canonical(u) or u for u in domain_uuids} | set(by_uuid)
    secrets = sorted(libvirt_secrets, key=lambda s: (s.usage_id, s.uuid))
    libvirt_by_usage = {
        _canonical(s.usage_id) or s.usage_id: LibvirtSecret(
            _canonical(s.uuid) or s.uuid, _canonical(s.usage_id) or s.usage_id,
            s.ephemeral, s.private)
        for s in secrets
    }

    orphans: list[Orphan] = []
    for secret in libvirt_by_usage.values():
        server = by_uuid.get(secret.usage_id)
        if secret.usage_id not in domains:
            orphans.append(Orphan(LIBVIRT_SECRET, secret.uuid, secret.usage_id,
                                  f"its usage name {secret.usage_id} is no domain on this host"))
        elif server is not None and server.secret_uuid and (
            _canonical(server.secret_uuid) != secret.uuid
        ):
            orphans.append(Orphan(LIBVIRT_SECRET, secret.uuid, secret.usage_id,
                                  f"server {server.name!r} records vTPM secret "
                                  f"{server.secret_uuid}, not this one"))
    for dir_uuid in sorted({_canonical(u) or u for u in state_dir_uuids}):
        if dir_uuid not in domains:
            orphans.append(Orphan(STATE_DIR, os.path.join(state_dir_base, dir_uuid), dir_uuid,
                                  f"no domain with UUID {dir_uuid} on this host"))
    if barbican_secrets is not None:
        for item in sorted(barbican_secrets, key=lambda b: (b.name, b.uuid or "")):
            instance_uuid = _canonical(item.instance_uuid)
            secret_uuid = _canonical(item.uuid) or str(item.uuid)
            server = by_uuid.get(instance_uuid) if instance_uuid else None
            if instance_uuid is None:
                reason = f"its name {item.name!r} does not end with an instance UUID"
            elif server is None:
                reason = f"no server {instance_uuid} on this host"
            elif _canonical(server.secret_uuid) != secret_uuid:
                recorded = server.secret_uuid or "none"
                reason = f"server {server.name!r} records vTPM secret {recorded}, not this one"
            else:
                continue
            orphans.append(Orphan(BARBICAN_SECRET, secret_uuid, instance_uuid, reason))

    findings = tuple(
        dataclasses.replace(
            server, problems=_server_problems(server, libvirt_by_usage),
            defined_secret=getattr(libvirt_by_usage.get(_canonical(server.uuid) or server.uuid),
                                   "uuid", None))
        for server in server_list if _asks_for_vtpm(server)
    )
    readable = tuple(
        item for item in sorted(barbican_secrets or (), key=lambda b: (b.name, b.uuid or ""))
        if item.project_access)
    return AuditReport(servers=findings, orphans=tuple(orphans),
                       barbican_checked=barbican_secrets is not None, readable=readable,
                       barbican_secrets=tuple(barbican_secrets or ()))


def half_done(servers: Iterable[Any], facts: Mapping[str, Mapping[str, bool]],
              holders: Mapping[str, int] | None = None) -> tuple[HalfDone, ...]:
    """The half-done operations of ``servers`` (each as recorded), sorted by name. Pure.

    ``facts`` maps an instance UUID to the facts :func:`journal.decide` needs
    (``domain_exists``, ``backup_exists``, ``tmp_backup_exists``; a listed
    server's domain exists, the rest default to False); ``holders`` maps an
    instance UUID to the live pid holding its lock, if any. A garbled entry
    is listed as operation :data:`INVALID_ENTRY` (``step``: the offending
    field) with action :data:`NO_ACTION`: no repair can tell what to do.
    """
    found = []
    for instance in servers:
        uuid = _canonical(instance.uuid) or instance.uuid
        try:
            intent = journal.read(getattr(instance, "system_metadata", None),
                                  server_label(instance))
        except exception.InvalidJournalEntry as exc:
            found.append(HalfDone(uuid, instance.name, INVALID_ENTRY, exc.field, 0, NO_ACTION,
                                  str(exc), (holders or {}).get(uuid)))
            continue
        if intent is None:
            continue
        known = {"domain_exists": True, "backup_exists": False, "tmp_backup_exists": False}
        known.update(facts.get(uuid, {}))
        decision = journal.decide(intent, **known)
        found.append(HalfDone(uuid, instance.name, intent.operation, intent.step, intent.pid,
                              decision.action.value, decision.reason,
                              (holders or {}).get(uuid)))
    return tuple(sorted(found, key=lambda h: (h.name, h.instance_uuid)))


def offhost_copies(report: AuditReport, copies: Iterable[Any], server_uuids: Iterable[str],
                   *, host: str, now: float, interval: float | None,
                   temporaries: Iterable[str] = (), store_root: str = "") -> AuditReport:
    """``report`` with the off-host copies of no server (orphans), the stale ones,
    and the state store's leftover temporaries.

    ``copies`` are :class:`~vtpm_driver.statestore.CopyMeta`; ``server_uuids``
    every server of ``host``, the one host checked. The store is shared by
    every host, and this host cannot see the others' servers: a copy taken on
    another host is not judged here (neither orphan nor stale). A shelved copy
    IS its server, never an orphan. Stale: overtaken by a start, or
    (``interval``, periodic mode) older than it. ``temporaries``: names under
    ``store_root`` an interrupted write left
    (:meth:`~vtpm_driver.statestore.DirectoryStateStore.temporaries`); they are
    reported (kind :data:`STORE_TEMPORARY`), and no repair removes them: a
    write of the server may be under way elsewhere (the Nova shim writes
    without our lock). Pure.
    """
    known = {_canonical(u) or u for u in server_uuids}
    orphans, stale = [], []
    for copy in sorted(copies, key=lambda c: (c.name, c.uuid)):
        if copy.shelved or copy.source_host != host:
            continue
        if copy.uuid not in known:
            orphans.append(Orphan(OFFHOST_COPY, copy.uuid, copy.uuid,
                                  f"copy of server {copy.name!r}, which is no longer on "
                                  f"host {host}"))
        elif copy.started_after is not None or copy.server_running:
            stale.append(Orphan(OFFHOST_COPY, copy.uuid, copy.uuid,
                                "the server ran after this copy was taken"))
        elif interval is not None and now - copy.taken_at > interval:
            stale.append(Orphan(OFFHOST_COPY, copy.uuid, copy.uuid,
                                f"older than {int(interval)} s"))
    for name in sorted(temporaries):
        orphans.append(Orphan(
            STORE_TEMPORARY, os.path.join(store_root, name),
            _canonical(name.lstrip(".").split(".", 1)[0]),
            "left by an interrupted write of an off-host copy: remove it by hand once no "
            "write of that server is under way"))
    return dataclasses.replace(report, orphans=report.orphans + tuple(orphans),
                               stale_copies=tuple(stale))


def vouch(report: AuditReport, answer: OrchestratorAnswer | None) -> AuditReport:
    """``report`` as the orchestrator's ``answer`` corrects it. Pure, idempotent.

    This host sees only its own domains; where Nova is the orchestrator, a
    server shelved-offloaded or living on another compute has none here, yet
    its Barbican secret, off-host copy and state directory are its TPM. So an
    orphan of :data:`GUARDED_KINDS` whose server Nova knows (not deleted: any
    status, soft-deleted included, any host) is no orphan: it moves to
    ``vouched``. A Barbican secret of a server of this host (one that records
    another secret) stays an orphan: Nova's word adds nothing there.

    ``answer`` None (a standalone host): ``report`` unchanged. ``answer``
    without servers (Nova could not be asked): the orphans stay as they are and
    the report says so; :func:`vtpm_driver.audit.plan.plan` then deletes none of
    those kinds.
    """
    if answer is None:
        return report
    if answer.servers is None:
        return dataclasses.replace(report, orchestrator=answer)
    known = {(_canonical(u) or u): server for u, server in answer.servers.items()}
    here = {_canonical(f.uuid) or f.uuid for f in report.servers}
    orphans: list[Orphan] = []
    vouched = list(report.vouched)
    for orphan in report.orphans:
        server = known.get(orphan.instance_uuid) if orphan.instance_uuid else None
        if (server is None or orphan.kind not in GUARDED_KINDS
                or (orphan.kind == BARBICAN_SECRET and orphan.instance_uuid in here)):
            orphans.append(orphan)
            continue
        vouched.append(Vouched(orphan.kind, orphan.id, str(orphan.instance_uuid),
                               server.status, server.host, orphan.reason))
    return dataclasses.replace(report, orphans=tuple(orphans), vouched=tuple(vouched),
                               orchestrator=answer)
