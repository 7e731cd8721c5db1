"""``server resize`` and ``server resize confirm|revert``: resize on this host.

Each command logs in with the global ``--os-*`` options and makes one call to
the application's :class:`~vtpm_driver.standalone.service.ServerService`, which computes
the new flavor, checks it, and drives the driver's two resize steps.
"""

from __future__ import annotations

import argparse

from vtpm_driver.cli.common import int_at_least, key_value
from vtpm_driver.cli.server_actions import ServerAction

POSITIVE_INT = int_at_least(1)


class ServerResize(ServerAction):
    """Resize a server to a new flavor; then confirm or revert.

    The new flavor is the current one with --flavor-property KEY=VALUE set,
    --unset-flavor-property KEY removed, and --vcpus / --memory changed. The
    request is checked first (an invalid one changes nothing). The server is
    stopped, moved to the new flavor and started again, and the resize then
    awaits a decision (server show: resize_status):

      vtpm-driver server resize confirm NAME   keep the new flavor; a vTPM the
                                               new flavor dropped is deleted
      vtpm-driver server resize revert NAME    go back to the old flavor and
                                               its vTPM state

    --confirm / --revert on this command do the same as those subcommands and
    take no flavor changes. A TPM whose version and model are unchanged keeps
    its state; changing either starts a fresh TPM; adding one creates a secret.
    """

    verb = "resize"

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument(
            "--flavor-property", metavar="KEY=VALUE", dest="flavor_properties",
            action="append", type=key_value, default=[],
            help="Set an extra spec of the new flavor, e.g. hw:tpm_model=tpm-crb (repeatable)")
        parser.add_argument(
            "--unset-flavor-property", metavar="KEY", dest="unset_flavor_properties",
            action="append", default=[],
            help="Remove an extra spec from the new flavor, e.g. hw:tpm_version (repeatable)")
        parser.add_argument("--vcpus", metavar="N", type=POSITIVE_INT,
                            help="Virtual CPUs of the new flavor (default: unchanged)")
        parser.add_argument("--memory", metavar="MIB", type=POSITIVE_INT,
                            help="Memory in MiB of the new flavor (default: unchanged)")
        decision = parser.add_mutually_exclusive_group()
        decision.add_argument("--confirm", action="store_true",
                              help="Confirm the pending resize (no flavor changes)")
        decision.add_argument("--revert", action="store_true",
                              help="Revert the pending resize (no flavor changes)")
        return parser

    def usage_problem(self, parsed_args: argparse.Namespace) -> str | None:
        ns = parsed_args
        changes = (ns.flavor_properties or ns.unset_flavor_properties
                   or ns.vcpus is not None or ns.memory is not None)
        if (ns.confirm or ns.revert) and changes:
            return "--confirm and --revert act on a pending resize and take no flavor changes"
        if not changes and not (ns.confirm or ns.revert):
            return ("nothing to resize: give --flavor-property, --unset-flavor-property, "
                    "--vcpus or --memory (or --confirm / --revert for a pending resize)")
        return None

    def take_action(self, parsed_args: argparse.Namespace) -> int:
        service = self.app.service
        if parsed_args.confirm:
            service.confirm_resize(parsed_args.server)
        elif parsed_args.revert:
            service.revert_resize(parsed_args.server)
        else:
            service.resize(parsed_args.server, set_specs=dict(parsed_args.flavor_properties),
                           unset=parsed_args.unset_flavor_properties,
                           vcpus=parsed_args.vcpus, memory_mb=parsed_args.memory)
        return 0


class ServerResizeConfirm(ServerAction):
    """Confirm a pending resize: keep the new flavor (drops the old vTPM state)."""

    verb = "confirm the resize of"

    def take_action(self, parsed_args: argparse.Namespace) -> int:
        self.app.service.confirm_resize(parsed_args.server)
        return 0


class ServerResizeRevert(ServerAction):
    """Revert a pending resize: back to the old flavor and its vTPM state."""

    verb = "revert the resize of"

    def take_action(self, parsed_args: argparse.Namespace) -> int:
        self.app.service.revert_resize(parsed_args.server)
        return 0


COMMANDS = {
    "server resize": ServerResize,
    "server resize confirm": ServerResizeConfirm,
    "server resize revert": ServerResizeRevert,
}
