"""``audit``: this host's vTPM servers and the orphans they left (SPEC F7).

Parses the options, calls :meth:`vtpm_driver.audit.actions.AuditActions.run`
once (over this host's backend; it gathers what libvirt, the swtpm state
directory, Barbican and, where Nova is the orchestrator, Nova hold) and
formats its result.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping, Sequence

from cliff.columns import FormattableColumn
from cliff.show import ShowOne
from oslo_config import cfg

from vtpm_driver import exception
from vtpm_driver.audit import actions, orchestrator
from vtpm_driver.audit import plan as audit_plan
from vtpm_driver.audit import report as audit_report
from vtpm_driver.cli.common import CommandMixin, ListColumn
from vtpm_driver.keymgr import KeyManager, KeyManagerAuditAPI
from vtpm_driver.model import rules

keymgr_factory: Callable[[cfg.ConfigOpts], KeyManagerAuditAPI] = KeyManager
nova_factory: Callable[[cfg.ConfigOpts], orchestrator.NovaServers] = orchestrator.NovaServers

COLUMNS = (
    "servers", "orphan_libvirt_secrets", "orphan_state_dirs", "orphan_barbican_secrets",
    "project_readable_secrets", "half_done_operations",
    "orphan_offhost_copies", "stale_offhost_copies", "store_temporaries",
    "barbican_checked", "barbican_scope",
    "orchestrator", "orchestrator_asked", "orchestrator_error", "orchestrator_vouched",
    "consents", "clean",
)
REPAIR_COLUMNS = ("repair", "repair_skipped", "dry_run")


class RecordsColumn(FormattableColumn[list]):
    """A list of flat records: one ``key=value, ...`` line each in tables, JSON as is."""

    def __init__(self, value: Sequence[Mapping[str, object]]) -> None:
        super().__init__([dict(item) for item in value])

    def human_readable(self) -> str:
        def show(value: object) -> str:
            if isinstance(value, list | tuple):
                return "; ".join(map(str, value)) or "-"
            return "-" if value is None else str(value)

        return "\n".join(
            ", ".join(f"{key}={show(val)}" for key, val in item.items()) for item in self._value
        )


def _server_record(finding: audit_report.ServerFinding) -> dict[str, object]:
    return {
        "name": finding.name,
        "uuid": finding.uuid,
        "vtpm_version": finding.version,
        "vtpm_model": finding.model,
        "secret_security": finding.secret_security,
        "vtpm_secret_uuid": finding.secret_uuid,
        "problems": list(finding.problems),
    }


def _readable_record(item: audit_report.BarbicanSecret) -> dict[str, object]:
    return {"secret_uuid": item.uuid, "instance_uuid": item.instance_uuid, "mode": item.mode}


def _repair_records(done: Sequence[tuple[audit_plan.Action, str]]) -> list[dict[str, object]]:
    return [{"action": a.kind, "target": a.target, "instance_uuid": a.instance_uuid,
             "result": outcome, "reason": a.reason} for a, outcome in done]


def _skipped_records(skipped: Sequence[audit_plan.Skipped]) -> list[dict[str, object]]:
    return [{"target": s.target, "instance_uuid": s.instance_uuid, "reason": s.reason}
            for s in skipped]


def _half_done_record(entry: audit_report.HalfDone) -> dict[str, object]:
    return {"name": entry.name, "instance_uuid": entry.instance_uuid,
            "operation": entry.operation, "step": entry.step, "pid": entry.pid,
            "repair": entry.action, "reason": entry.reason,
            "locked_by_pid": entry.holder_pid}


def _orphan_record(orphan: audit_report.Orphan) -> dict[str, object]:
    key = {audit_report.STATE_DIR: "path", audit_report.OFFHOST_COPY: "copy",
           audit_report.STORE_TEMPORARY: "path"}.get(
        orphan.kind, "secret_uuid")
    return {key: orphan.id, "instance_uuid": orphan.instance_uuid, "reason": orphan.reason}


def _vouched_record(item: audit_report.Vouched) -> dict[str, object]:
    key = {audit_report.STATE_DIR: "path", audit_report.OFFHOST_COPY: "copy"}.get(
        item.kind, "secret_uuid")
    return {"kind": item.kind, key: item.id, "instance_uuid": item.instance_uuid,
            "status": item.status, "host": item.host, "seen_here": item.reason}


def report_columns(report: audit_report.AuditReport, scope: Sequence[str]
                   ) -> tuple[tuple[str, ...], tuple]:
    """The command's output for ``report``."""
    def orphans(kind: str) -> RecordsColumn:
        return RecordsColumn([_orphan_record(o) for o in report.orphans_of(kind)])

    return COLUMNS, (
        RecordsColumn([_server_record(f) for f in report.servers]),
        orphans(audit_report.LIBVIRT_SECRET),
        orphans(audit_report.STATE_DIR),
        orphans(audit_report.BARBICAN_SECRET),
        RecordsColumn([_readable_record(item) for item in report.readable]),
        RecordsColumn([_half_done_record(entry) for entry in report.half_done]),
        orphans(audit_report.OFFHOST_COPY),
        RecordsColumn([_orphan_record(o) for o in report.stale_copies]),
        orphans(audit_report.STORE_TEMPORARY),
        report.barbican_checked,
        ListColumn(list(scope)),
        report.orchestrator.name.lower() if report.orchestrator else orchestrator.NONE,
        bool(report.orchestrator and report.orchestrator.asked),
        report.orchestrator.error if report.orchestrator else None,
        RecordsColumn([_vouched_record(item) for item in report.vouched]),
        RecordsColumn([dataclasses.asdict(item) for item in report.consents]),
        report.clean,
    )


def _scope_label(scope: actions.Scope) -> str:
    """Whose Barbican secrets were listed, for ``barbican_scope``."""
    context, mode = scope
    if rules.owned_by_service_user(mode):
        return "[service_user] (deployment mode)"
    return (f"user {context.user_name or context.user_id} in project "
            f"{context.project_name or context.project_id}")


class Audit(CommandMixin, ShowOne):
    """List vTPM servers and find orphaned vTPM secrets and state.

    Shows each vTPM server of this host with its secret security mode, the
    UUID of its Barbican secret and any problem seen (e.g. a 'user'-mode
    libvirt secret still defined). Then lists orphans:

    - libvirt vtpm secrets whose usage name (an instance UUID) is no domain
      here, or whose domain records another secret;
    - swtpm state directories of this host with no domain, under [vtpm]
      swtpm_state_dir;
    - off-host copies ([vtpm] state_backup_dir) taken on this host of a
      server that is no longer here (copies other hosts took are theirs);
    - Barbican secrets named 'vTPM secret for instance <uuid>' whose UUID is
      no server here (only with credentials, OS_* or --os-*, which list the
      secrets that user can see; plus the [service_user]'s when configured).
      A project whose servers run on several hosts (Nova's computes, other
      standalone hosts) sees the other hosts' secrets as orphans here: audit
      each host, and compare, before --repair.

    Where Nova is the orchestrator ([vtpm] orchestrator = nova), it first asks
    Nova's compute API ([nova] admin credentials; every project, soft-deleted
    servers included) which servers exist: a state directory, off-host copy
    or Barbican secret of a server Nova knows (shelved-offloaded, on another
    compute...) is no orphan, and is listed under orchestrator_vouched. When
    Nova cannot be asked, orchestrator_error says why, and --repair deletes
    none of those three kinds. It also lists, under consents, the owners'
    consents Nova's servers name (metadata vtpm_consent): in force (until
    when, for which operations), expired, or unusable (a record that is not
    the server owner's or not for that server, or whose application
    credential Keystone refuses: withdrawn), read as [service_user] the way
    the shim reads them.

    It also lists half-done operations: servers whose record still names an
    operation that was interrupted (kill -9, a crash), with what a repair
    would do about it (finish or roll back), and leftover temporaries of the
    off-host state store ([vtpm] state_backup_dir) an interrupted write left
    (reported only: remove them by hand once no write is under way).

    Nothing is changed. Exit status: 0 the report was produced, whatever it
    says (read "clean"); 1 libvirt, Keystone or Barbican failed, or with
    --repair, an action failed or a deletion was held back because Nova could
    not be asked.
    """

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("--no-barbican", action="store_true",
                            help="Do not list Barbican secrets, even with credentials")
        parser.add_argument("--repair", action="store_true",
                            help="Finish or roll back half-done operations (under each "
                                 "server's lock), then remove what is reported as orphaned "
                                 "(libvirt vtpm secrets "
                                 "no starting guest needs, state directories of no server, "
                                 "Barbican vTPM secrets of no server) and set an owner-only "
                                 "ACL on project-readable vTPM secrets; nothing else. "
                                 "With [vtpm] orchestrator = nova, no state directory, "
                                 "off-host copy or Barbican secret of a server Nova knows, "
                                 "and none at all when Nova cannot be asked")
        parser.add_argument("--dry-run", action="store_true",
                            help="With --repair: show the plan, change nothing")
        parser.add_argument("--min-age", type=float, default=audit_plan.DEFAULT_MIN_AGE,
                            metavar="SECONDS",
                            help="With --repair: keep Barbican orphans younger than this "
                                 "(a create elsewhere may not have defined its server yet; "
                                 "default %(default).0f)")
        parser.add_argument("--instance", action="append", metavar="UUID", default=None,
                            help="With --repair: only what names this instance UUID "
                                 "(repeatable); default: everything reported")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple, tuple]:
        if parsed_args.dry_run and not parsed_args.repair:
            raise exception.VTPMError("--dry-run only goes with --repair")
        app = self.app
        result = actions.AuditActions(
            app.conf, lambda: app.service.backend, keymgr_factory=keymgr_factory,
            nova_factory=nova_factory, progress=app.progress,
        ).run((lambda: app.context) if app.credentials_given() else None,
              barbican=not parsed_args.no_barbican, repair=parsed_args.repair,
              dry_run=parsed_args.dry_run, min_age=parsed_args.min_age,
              only=parsed_args.instance)
        columns, values = report_columns(result.report, [_scope_label(s) for s in result.scopes])
        self.failed = result.failed
        if result.plan is None:
            return columns, values
        return (*columns, *REPAIR_COLUMNS), (
            *values, RecordsColumn(_repair_records(result.done)),
            RecordsColumn(_skipped_records(result.plan.skipped)), parsed_args.dry_run)

    def run(self, parsed_args: argparse.Namespace) -> int:
        self.failed = False
        rc = super().run(parsed_args)
        return rc or (1 if self.failed else 0)


COMMANDS = {
    "audit": Audit,
}
