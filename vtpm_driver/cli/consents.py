"""``server grant`` and ``server revoke``: an owner's consent for one Nova server (issue 21).

Each command parses its options and makes one call to
:class:`vtpm_driver.ops.consents.Consents`, as the owner (``--os-*``
credentials). The server is a Nova server of the caller's, named by UUID; the
cloud's service user that may read the consent record is ``--cloud-user``
(default ``VTPM_CLOUD_USER``), which the cloud's operator publishes.
"""

from __future__ import annotations

import argparse
import datetime
import os
from typing import Any

from cliff.show import ShowOne

from vtpm_driver.cli.common import CommandMixin, positive_float, show_columns
from vtpm_driver.cloud import OwnerCloud
from vtpm_driver.keymgr import KeyManager
from vtpm_driver.model import consent
from vtpm_driver.ops.consents import Consents

CLOUD_USER_ENV = "VTPM_CLOUD_USER"
DEFAULT_HOURS = 24.0

def consents(app: Any) -> Consents:
    """The caller's consents, acting as the caller (logged in on first use)."""
    context = app.context
    return Consents(KeyManager(app.conf), OwnerCloud(context), context)


class ServerGrant(CommandMixin, ShowOne):
    """Let the cloud do named operations on your 'user'-mode server for a while.

    A 'user'-mode server's passphrase is yours alone, so the cloud cannot
    restart it after its host rebooted, nor move or hard-reboot it for an
    admin. This creates an application credential of yours that expires with
    the consent and can read that one passphrase and nothing else, stores it
    in a consent record only you and the cloud's service user can read, and
    names the record in the server's metadata (vtpm_consent). A consent the
    server named before is withdrawn. Nothing else of yours is opened.

    Operations: restart-on-host-boot, hard-reboot, live-migration,
    cold-migration, evacuation.
    """

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("server", metavar="UUID", help="Your Nova server")
        parser.add_argument("operations", metavar="OPERATION", nargs="+",
                            choices=consent.OPERATIONS,
                            help="What the cloud may do: " + ", ".join(consent.OPERATIONS))
        parser.add_argument("--hours", metavar="H", type=positive_float("--hours"),
                            default=DEFAULT_HOURS,
                            help=f"How long the consent lasts (default {DEFAULT_HOURS:g})")
        parser.add_argument("--cloud-user", metavar="USER_ID", action="append",
                            default=None,
                            help="The cloud's service user that reads the consent (repeat for "
                                 f"more; default ${CLOUD_USER_ENV})")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple, tuple]:
        readers = parsed_args.cloud_user or [
            user for user in os.environ.get(CLOUD_USER_ENV, "").split(",") if user]
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(
            hours=parsed_args.hours)
        granted = consents(self.app).grant(parsed_args.server, parsed_args.operations,
                                          expires, readers)
        return show_columns({
            "server": granted.server, "consent_record": granted.record_id,
            "application_credential": granted.credential_id,
            "operations": list(granted.operations),
            "expires_at": granted.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "replaced": granted.replaced or "",
        })


class ServerRevoke(CommandMixin, ShowOne):
    """Withdraw the consent your server names, at once (idempotent).

    Its application credential is deleted first (Keystone refuses it from
    then on), then the consent record and the server's vtpm_consent item.
    """

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("server", metavar="UUID", help="Your Nova server")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple, tuple]:
        withdrawn = consents(self.app).revoke(parsed_args.server)
        return show_columns({
            "server": withdrawn.server, "consent_record": withdrawn.record_id or "",
            "application_credential_deleted": withdrawn.credential_deleted,
            "record_deleted": withdrawn.record_deleted,
        })


COMMANDS = {
    "server grant": ServerGrant,
    "server revoke": ServerRevoke,
}
