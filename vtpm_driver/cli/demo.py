"""``vtpm-driver demo``: parse the options, run :func:`vtpm_driver.demo.runner.run_demo`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cliff.command import Command

from vtpm_driver.cli.common import CommandMixin, isatty, positive_float
from vtpm_driver.demo.clouds import cloud_credentials, load_clouds_file
from vtpm_driver.demo.runner import run_demo
from vtpm_driver.keymgr.context import RequestContext

DEFAULT_CLOUDS_FILE = "/var/lib/vtpm-driver/stack/clouds.yaml"
DEFAULT_MEMBER_CLOUD = "member"
DEFAULT_GUEST_DIR = "/var/cache/vtpm-driver/guest"
DEFAULT_BOOT_TIMEOUT = 120


class Demo(CommandMixin, Command):
    """Show, and check, what vtpm-driver does on this host, in about 15 seconds.

    As the regular user given by the OS_* variables (or --os-* options), the
    demo creates a server with an emulated TPM 2.0 on the CRB interface
    (secret security 'user'), booting the test guest of tools/build-guest.sh
    in its 'stay' mode, then shows, one line per step with its duration:

      host check            the host offers the TPM traits the server needs
      log in                the owner, and another member of the same project
      create server         as the owner: the Barbican secret, then the guest
      guest saw             the guest's own report (VTPM_RESULT line)
      key in Barbican       the passphrase's secret, its type, its owner-only
                            read ACL (read with the owner's token)
      key not in libvirt    no libvirt secret left once the guest runs
      state on disk         the swtpm state file is encrypted
      member reads the key  another user of the same project is forbidden
      member hard-reboots   ... and cannot restart the server, which is left
                            unchanged
      owner hard-reboots    the TPM's endorsement key (its identity) is kept
      delete                nothing is left: domain, libvirt secret, state
                            directory, Barbican secret

    The other user's credentials come from a clouds.yaml file (--clouds-file,
    --member-cloud; tools/keymgr-stack.sh writes one with a 'member' cloud).
    tools/demo.sh prepares the host and runs this command with the local
    stack's credentials.

    The demo server is deleted at the end whatever happens (also on Ctrl-C or
    SIGTERM). Exit status: 0 every check held; 1 a check failed (each failed
    step says what was seen, and one line on stderr names the first); 2 usage
    error.
    """

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument(
            "--clouds-file", metavar="PATH",
            default=os.environ.get("OS_CLIENT_CONFIG_FILE") or DEFAULT_CLOUDS_FILE,
            help="clouds.yaml holding the other user's credentials (default: "
                 f"$OS_CLIENT_CONFIG_FILE, else {DEFAULT_CLOUDS_FILE})")
        parser.add_argument(
            "--member-cloud", metavar="NAME", default=DEFAULT_MEMBER_CLOUD,
            help="Cloud in --clouds-file for another user of the owner's project: the "
                 f"one who must not unlock the server (default: {DEFAULT_MEMBER_CLOUD})")
        parser.add_argument(
            "--guest-dir", metavar="DIR",
            default=os.environ.get("VTPM_GUEST_DIR") or DEFAULT_GUEST_DIR,
            help="Directory with the test guest's vmlinuz and initrd.img (default: "
                 f"$VTPM_GUEST_DIR, else {DEFAULT_GUEST_DIR})")
        parser.add_argument(
            "--boot-timeout", metavar="SECONDS", type=positive_float("seconds"),
            default=DEFAULT_BOOT_TIMEOUT,
            help="Seconds to wait for the guest to report its TPM after each start "
                 f"(default {DEFAULT_BOOT_TIMEOUT})")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> int:
        conf, clouds_file = self.app.conf, parsed_args.clouds_file
        # Fail on a bad clouds file before anything is created.
        member = cloud_credentials(load_clouds_file(clouds_file), parsed_args.member_cloud,
                                   clouds_file)
        run_demo(
            conf, self.app.backend_factory(conf), self.app.stdout,
            live=isatty(self.app.stdout),
            owner_login=lambda: self.app.context,
            member_login=lambda: RequestContext.from_credentials(
                **member, timeout=float(conf.key_manager.timeout)),
            probe_factory=self.app.probe_factory,
            guest_dir=Path(parsed_args.guest_dir),
            boot_timeout=parsed_args.boot_timeout,
            member_label=f"cloud '{parsed_args.member_cloud}' of {clouds_file}",
        )
        return 0


COMMANDS = {
    "demo": Demo,
}
