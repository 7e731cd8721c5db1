"""Lifecycle of one existing server: reboot, stop, start, suspend, resume, delete,
rescue, unrescue, rebuild.

Every command logs in with the global ``--os-*`` options (the caller must be
in the server's project, and in 'user' mode only the owner can unlock the
vTPM), makes one call to the application's
:class:`~vtpm_driver.standalone.service.ServerService` and prints nothing on success
(rebuild shows the server).
"""

from __future__ import annotations

import argparse
import os

from cliff.command import Command
from cliff.show import ShowOne

from vtpm_driver.cli.common import CommandMixin, int_at_least, show_columns

NON_NEGATIVE_INT = int_at_least(0)
DEFAULT_SHUTDOWN_TIMEOUT = 60


def _abspath(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


class ServerAction(CommandMixin, Command):
    """A change to one server named by its NAME or UUID (base class)."""

    verb = "act on"

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("server", metavar="NAME|UUID", help="Server to " + self.verb)
        return parser


class ServerReboot(ServerAction):
    """Reboot a server (soft by default: the guest reboots itself).

    --hard powers the guest off and starts it again, which unlocks the vTPM
    state again: in 'user' mode that needs the owner's credentials, and a
    refusal leaves the server as it was.
    """

    verb = "reboot"

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("--hard", action="store_true",
                            help="Power off and start again instead of a guest reboot")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> int:
        self.app.service.reboot(parsed_args.server, hard=parsed_args.hard)
        return 0


class ServerStop(ServerAction):
    """Stop a server: press its power button, pull the plug after a timeout.

    The vTPM state is kept. --force pulls the plug at once.
    """

    verb = "stop"

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("--force", action="store_true",
                            help="Power off at once, without asking the guest to shut down")
        parser.add_argument("--shutdown-timeout", metavar="SECONDS", type=NON_NEGATIVE_INT,
                            default=DEFAULT_SHUTDOWN_TIMEOUT,
                            help="Seconds to wait for a clean shutdown before powering off "
                                 f"(default {DEFAULT_SHUTDOWN_TIMEOUT})")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> int:
        timeout = 0 if parsed_args.force else parsed_args.shutdown_timeout
        self.app.service.stop(parsed_args.server, timeout=timeout)
        return 0


class ServerStart(ServerAction):
    """Start a stopped server (unlocks its vTPM: owner's credentials in 'user' mode)."""

    verb = "start"

    def take_action(self, parsed_args: argparse.Namespace) -> int:
        self.app.service.start(parsed_args.server)
        return 0


class ServerSuspend(ServerAction):
    """Suspend a server: save its memory to disk and stop it (vTPM state kept)."""

    verb = "suspend"

    def take_action(self, parsed_args: argparse.Namespace) -> int:
        self.app.service.suspend(parsed_args.server)
        return 0


class ServerResume(ServerAction):
    """Resume a suspended server (unlocks its vTPM: owner's credentials in 'user' mode)."""

    verb = "resume"

    def take_action(self, parsed_args: argparse.Namespace) -> int:
        self.app.service.resume(parsed_args.server)
        return 0


class ServerDelete(ServerAction):
    """Delete a server: its domain, swtpm state, libvirt secret and Barbican secret.

    In 'user' mode deleting the Barbican secret needs the owner's credentials.
    Deleting a server that does not exist exits 1.
    """

    verb = "delete"

    def take_action(self, parsed_args: argparse.Namespace) -> int:
        self.app.service.delete(parsed_args.server)
        return 0


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
    Other boot files than the server's own need its owner (or an admin of its
    project), in every secret security mode.
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


class ServerRebuild(ServerAction, ShowOne, _BootOptions):
    """Rebuild a server with a new image; its TPM is kept (as a reinstalled machine's).

    --reset-tpm manufactures a fresh TPM instead (new endorsement key; the
    Barbican secret stays and encrypts the new state). The output's 'tpm'
    field says which happened. --reset-tpm, or other boot files than the
    server's own, need its owner (or an admin of its project), in every secret
    security mode.
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


COMMANDS = {
    "server reboot": ServerReboot,
    "server stop": ServerStop,
    "server start": ServerStart,
    "server suspend": ServerSuspend,
    "server resume": ServerResume,
    "server delete": ServerDelete,
    "server rescue": ServerRescue,
    "server unrescue": ServerUnrescue,
    "server rebuild": ServerRebuild,
}
