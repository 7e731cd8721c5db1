"""``server migrate`` and ``server live-migrate``: move a server to another host.

Each command logs in with the global ``--os-*`` options and makes one call to
the application's :class:`~vtpm_driver.service.ServerService`, which finds the
server on whichever host of ``[vtpm] hosts`` has it and moves it with
:mod:`vtpm_driver.ops.migrate`. A cold migration then awaits
``server resize confirm|revert NAME``, as a resize does.
"""

from __future__ import annotations

import argparse

from vtpm_driver.cli.common import int_at_least
from vtpm_driver.cli.server_actions import ServerAction

POSITIVE_INT = int_at_least(1)


class _MoveCommand(ServerAction):
    live = False

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("--to", metavar="HOST", dest="dest", required=True,
                            help="Destination host (a name of [vtpm] hosts)")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> int:
        self.app.service.migrate(parsed_args.server, parsed_args.dest, live=self.live)
        return 0


class ServerMigrate(_MoveCommand):
    """Cold-migrate a server to another host; then confirm or revert.

    The server is stopped, its encrypted TPM state and its definition move to
    the destination through libvirt's migration stream (same TPM, same
    Barbican secret) and it starts there. Then:

      vtpm-driver server resize confirm NAME   keep it there; the source copy,
                                               its TPM state and secret go
      vtpm-driver server resize revert NAME    back to the source with the old
                                               TPM state

    'user' secret security: only the owner can move it (the destination needs
    the passphrase). A failed move leaves the server on the source as it was.
    """

    verb = "migrate"


class ServerLiveMigrate(_MoveCommand):
    """Live-migrate a running server to another host (same boot, same TPM).

    Every secret security mode moves: 'host' (the host's libvirt secret is
    defined on the destination first and removed from the source after),
    'user' (only the owner: the passphrase is read once and handed to the
    destination as an ephemeral secret, undefined once the guest runs there),
    'deployment' (the same with the service user's credentials). A failed
    move leaves the guest running on the source and nothing on the
    destination. --abort cancels a running live migration of the server.
    """

    verb = "live-migrate"
    live = True

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super(_MoveCommand, self).get_parser(prog_name)
        target = parser.add_mutually_exclusive_group(required=True)
        target.add_argument("--to", metavar="HOST", dest="dest",
                            help="Destination host (a name of [vtpm] hosts)")
        target.add_argument("--abort", action="store_true",
                            help="Cancel the server's running live migration")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> int:
        if parsed_args.abort:
            if not self.app.service.live_migration_abort(parsed_args.server):
                self.app.stderr.write("no live migration of that server is running\n")
                return 1
            return 0
        return super().take_action(parsed_args)


COMMANDS = {
    "server migrate": ServerMigrate,
    "server live-migrate": ServerLiveMigrate,
}
