"""``state backup``: off-host copies of this host's TPM states, now.

The command logs in with the global ``--os-*`` options and makes one call to
the application's :class:`~vtpm_driver.standalone.service.ServerService`. Copies live in
``[vtpm] state_backup_dir`` (see :mod:`vtpm_driver.statestore`), where Nova's
shelve/unshelve and evacuation (through the shim) find them too.
"""

from __future__ import annotations

import argparse

from cliff.lister import Lister

from vtpm_driver.cli.common import CommandMixin


class StateBackup(CommandMixin, Lister):
    """Copy servers' TPM state off-host now ([vtpm] state_backup_dir).

    With no server named ([vtpm] state_backup = periodic; run it from cron):
    every vTPM server of this host whose copy is older than
    [vtpm] state_backup_interval. Named servers are copied at once. A server
    whose copy fails is listed with its error (exit status 1); the others are
    still copied.
    """

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("servers", metavar="NAME|UUID", nargs="*",
                            help="Servers to copy now (default: every one due)")
        parser.add_argument("--all", action="store_true",
                            help="Copy every vTPM server now, whatever [vtpm] state_backup says")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple, list]:
        rows = self.app.service.backup_states(parsed_args.servers, force=parsed_args.all)
        self.failed = any(row.get("error") for row in rows)
        columns = ("name", "uuid", "running", "size", "error")
        return columns, [tuple(row.get(c) for c in columns) for row in rows]

    def run(self, parsed_args: argparse.Namespace) -> int:
        self.failed = False
        rc = super().run(parsed_args)
        return rc or (1 if self.failed else 0)


COMMANDS = {
    "state backup": StateBackup,
}
