"""``audit``: this host's vTPM servers and the orphans they left (SPEC F7).

Gathers what libvirt, the swtpm state directory and (with credentials)
Barbican hold, and hands it to the pure :func:`vtpm_driver.audit.audit`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cliff.columns import FormattableColumn
from cliff.show import ShowOne
from oslo_config import cfg
from oslo_log import log as logging

from vtpm_driver import audit as vtpm_audit
from vtpm_driver import exception, spec
from vtpm_driver.cli.common import CommandMixin, ListColumn
from vtpm_driver.context import RequestContext
from vtpm_driver.keymgr import KeyManager

LOG = logging.getLogger(__name__)

keymgr_factory: Callable[[cfg.ConfigOpts], Any] = KeyManager

COLUMNS = (
    "servers", "orphan_libvirt_secrets", "orphan_state_dirs", "orphan_barbican_secrets",
    "barbican_checked", "barbican_scope", "clean",
)


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


def _server_record(finding: vtpm_audit.ServerFinding) -> dict[str, object]:
    server = finding.server
    return {
        "name": server.name,
        "uuid": server.uuid,
        "vtpm_version": server.version,
        "vtpm_model": server.model,
        "secret_security": server.secret_security,
        "vtpm_secret_uuid": server.secret_uuid,
        "problems": list(finding.problems),
    }


def _orphan_record(orphan: vtpm_audit.Orphan) -> dict[str, object]:
    key = "path" if orphan.kind == vtpm_audit.STATE_DIR else "secret_uuid"
    return {key: orphan.id, "instance_uuid": orphan.instance_uuid, "reason": orphan.reason}


def report_columns(report: vtpm_audit.AuditReport, scope: Sequence[str]
                   ) -> tuple[tuple[str, ...], tuple]:
    """The command's output for ``report``."""
    def orphans(kind: str) -> RecordsColumn:
        return RecordsColumn([_orphan_record(o) for o in report.orphans_of(kind)])

    return COLUMNS, (
        RecordsColumn([_server_record(f) for f in report.servers]),
        orphans(vtpm_audit.LIBVIRT_SECRET),
        orphans(vtpm_audit.STATE_DIR),
        orphans(vtpm_audit.BARBICAN_SECRET),
        report.barbican_checked,
        ListColumn(list(scope)),
        report.clean,
    )


def _barbican_entries(items: Sequence[Mapping[str, Any]]) -> list[vtpm_audit.BarbicanSecret]:
    return [
        vtpm_audit.BarbicanSecret(
            uuid=item.get("uuid"), name=str(item.get("name")),
            instance_uuid=item.get("instance_uuid"))
        for item in items
    ]


def _service_user_configured(conf: cfg.ConfigOpts) -> bool:
    try:
        return bool(conf.service_user.auth_type)
    except (cfg.NoSuchOptError, cfg.NoSuchGroupError):
        return False


class Audit(CommandMixin, ShowOne):
    """List vTPM servers and find orphaned vTPM secrets and state.

    Shows each vTPM server of this host with its secret security mode, the
    UUID of its Barbican secret and any problem seen (e.g. a 'user'-mode
    libvirt secret still defined). Then lists orphans:

    - libvirt vtpm secrets whose usage name (an instance UUID) is no domain
      here, or whose domain records another secret;
    - swtpm state directories under [vtpm] swtpm_state_dir with no domain;
    - Barbican secrets named 'vTPM secret for instance <uuid>' whose UUID is
      no server here (only with credentials, OS_* or --os-*, which list the
      secrets that user can see; plus the [service_user]'s when configured).
      A project whose servers run on several hosts sees the other hosts'
      secrets as orphans here: audit each host, and compare.

    Nothing is changed. Exit status: 0 the report was produced, whatever it
    says (read "clean"); 1 libvirt, Keystone or Barbican failed.
    """

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("--no-barbican", action="store_true",
                            help="Do not list Barbican secrets, even with credentials")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple, tuple]:
        barbican: list[vtpm_audit.BarbicanSecret] | None = None
        scope: list[str] = []
        if not parsed_args.no_barbican:
            barbican, scope = self._list_barbican(self.app.conf)
        return report_columns(self.app.service.audit(barbican), scope)

    def _list_barbican(self, conf: cfg.ConfigOpts
                       ) -> tuple[list[vtpm_audit.BarbicanSecret] | None, list[str]]:
        """The vTPM secrets the caller (and the service user) can list, and whose they are."""
        with_user = self.app.credentials_given()
        with_service = _service_user_configured(conf)
        if not with_user and not with_service:
            LOG.warning("Barbican not checked: no credentials (OS_* or --os-*) and no "
                        "[service_user]; orphaned Barbican secrets cannot be listed")
            return None, []
        keymgr = keymgr_factory(conf)
        found: dict[str, dict[str, Any]] = {}
        scope = []
        context: RequestContext | None = None
        if with_user:
            context = self.app.context
            with self.app.progress("Listing vTPM secrets in Barbican"):
                items = keymgr.list_vtpm_secrets(context, spec.SECRET_USER)
            found.update((str(item.get("uuid")), item) for item in items)
            scope.append(f"user {context.user_name or context.user_id} in project "
                         f"{context.project_name or context.project_id}")
        if with_service:
            service_context = context or RequestContext(user_id="", project_id="")
            try:
                with self.app.progress("Listing the service user's vTPM secrets in Barbican"):
                    items = keymgr.list_vtpm_secrets(service_context, spec.SECRET_DEPLOYMENT)
            except exception.VTPMError as exc:
                if not with_user:
                    raise
                LOG.warning("Barbican secrets of [service_user] not checked: %s", exc)
            else:
                found.update((str(item.get("uuid")), item) for item in items)
                scope.append("[service_user] (deployment mode)")
        return _barbican_entries(list(found.values())), scope


COMMANDS = {
    "audit": Audit,
}
