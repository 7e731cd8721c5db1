"""A TPM that outlives its host: shelve, unshelve, evacuate, rescue, rebuild, state backups.

Each command logs in with the global ``--os-*`` options and makes one call to
the application's :class:`~vtpm_driver.service.ServerService`
(:class:`~vtpm_driver.service_offhost.OffHostActions`). Off-host copies of the
TPM state live in ``[vtpm] state_backup_dir`` (see :mod:`vtpm_driver.statestore`).
"""

from __future__ import annotations

import argparse
import os

from cliff.lister import Lister
from cliff.show import ShowOne

from vtpm_driver.cli.common import CommandMixin, int_at_least, show_columns
from vtpm_driver.cli.server_actions import DEFAULT_SHUTDOWN_TIMEOUT, ServerAction

NON_NEGATIVE_INT = int_at_least(0)


def _abspath(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


class _ServerShow(ServerAction, ShowOne):
    """A server action that shows the server afterwards."""


class ServerShelve(_ServerShow):
    """Shelve a server: stop it, keep its TPM state off-host, free its host.

    The encrypted TPM state and the server record go to [vtpm] state_backup_dir;
    the domain, its TPM state and libvirt secrets leave the host. The server
    stays in 'server list' as shelved_offloaded, with no host. 'user' secret
    security: only the owner may shelve (only the owner can unshelve).
    """

    verb = "shelve"

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("--shutdown-timeout", metavar="SECONDS", type=NON_NEGATIVE_INT,
                            default=DEFAULT_SHUTDOWN_TIMEOUT,
                            help="Seconds to wait for a clean shutdown before powering off "
                                 f"(default {DEFAULT_SHUTDOWN_TIMEOUT}; 0: at once)")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple, tuple]:
        return show_columns(self.app.service.shelve(
            parsed_args.server, timeout=parsed_args.shutdown_timeout))


class ServerUnshelve(_ServerShow):
    """Bring a shelved server back on a host (default: the first, or --host), same TPM.

    Needs the passphrase ('user' secret security: the owner's credentials).
    A failed unshelve leaves nothing on the host and keeps the off-host copy.
    """

    verb = "unshelve"

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("--to", metavar="HOST", dest="dest",
                            help="Host to unshelve on (a name of [vtpm] hosts)")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple, tuple]:
        return show_columns(self.app.service.unshelve(parsed_args.server,
                                                      parsed_args.dest or self.app.options.host))


class ServerEvacuate(_ServerShow):
    """Rebuild a server of an unreachable host on another host from its off-host copy.

    Refused while its host answers (migrate instead), and when no copy exists
    ([vtpm] state_backup = off). A copy that may be older than the TPM the
    server last ran with is restored only with [vtpm] allow_stale_tpm_state
    (the TPM goes back in time: NV counters, lockout, keys made since). The
    output's restored_tpm_state says how old the restored state is. Once the
    failed host is back, 'vtpm-driver state reclaim HOST' removes the old copy.
    """

    verb = "evacuate"

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("--to", metavar="HOST", dest="dest", required=True,
                            help="Destination host (a name of [vtpm] hosts)")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple, tuple]:
        fields = self.app.service.evacuate(parsed_args.server, parsed_args.dest)
        self.app.stderr.write(f"restored TPM state: {fields['restored_tpm_state']}\n")
        return show_columns(fields)


class HostReclaim(CommandMixin, Lister):
    """On a host back from a failure, remove the servers evacuated away from it.

    Their domains, TPM state and libvirt secrets there go (the evacuated
    servers keep running elsewhere; Barbican is untouched).
    """

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("host", metavar="HOST", help="Host of [vtpm] hosts")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple, list]:
        return ("Removed",), [(name,) for name in self.app.service.reclaim(parsed_args.host)]


class _BootOptions:
    @staticmethod
    def add_boot(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--kernel", metavar="PATH", help="Kernel to boot")
        parser.add_argument("--initrd", metavar="PATH", help="Initial ramdisk")
        parser.add_argument("--cmdline", metavar="TEXT", help="Kernel command line")


class ServerRescue(ServerAction, _BootOptions):
    """Boot a server's rescue image with its own vTPM.

    Default rescue boot: the server's kernel and initrd with 'vtpm_rescue=1'
    added to its command line. Under another boot chain the PCRs differ, so
    secrets sealed to the normal boot stay sealed. 'server unrescue' returns.
    """

    verb = "rescue"

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        self.add_boot(parser)
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> int:
        self.app.service.rescue(parsed_args.server, kernel=_abspath(parsed_args.kernel),
                                initrd=_abspath(parsed_args.initrd),
                                cmdline=parsed_args.cmdline)
        return 0


class ServerUnrescue(ServerAction):
    """Return a rescued server to its normal boot (TPM state kept)."""

    verb = "unrescue"

    def take_action(self, parsed_args: argparse.Namespace) -> int:
        self.app.service.unrescue(parsed_args.server)
        return 0


class ServerRebuild(_ServerShow, _BootOptions):
    """Rebuild a server with a new image; its TPM is kept (as a reinstalled machine's).

    --reset-tpm manufactures a fresh TPM instead (new endorsement key; the
    Barbican secret stays and encrypts the new state). The output's 'tpm'
    field says which happened.
    """

    verb = "rebuild"

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        self.add_boot(parser)
        parser.add_argument("--reset-tpm", action="store_true",
                            help="Manufacture a fresh TPM (new endorsement key)")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple, tuple]:
        fields = self.app.service.rebuild(
            parsed_args.server, kernel=_abspath(parsed_args.kernel),
            initrd=_abspath(parsed_args.initrd), cmdline=parsed_args.cmdline,
            reset_tpm=parsed_args.reset_tpm)
        if parsed_args.reset_tpm:
            self.app.stderr.write(f"TPM: {fields['tpm']}\n")
        return show_columns(fields)


class StateBackup(CommandMixin, Lister):
    """Copy servers' TPM state off-host now ([vtpm] state_backup_dir).

    With no server named ([vtpm] state_backup = periodic; run it from cron):
    every vTPM server on every reachable host whose copy is older than
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
        columns = ("name", "uuid", "host", "running", "size", "error")
        return columns, [tuple(row.get(c) for c in columns) for row in rows]

    def run(self, parsed_args: argparse.Namespace) -> int:
        self.failed = False
        rc = super().run(parsed_args)
        return rc or (1 if self.failed else 0)


COMMANDS = {
    "server shelve": ServerShelve,
    "server unshelve": ServerUnshelve,
    "server evacuate": ServerEvacuate,
    "state reclaim": HostReclaim,
    "server rescue": ServerRescue,
    "server unrescue": ServerUnrescue,
    "server rebuild": ServerRebuild,
    "state backup": StateBackup,
}
