"""``server create``, ``server list``, ``server show``.

Each command parses its options and makes one call to the application's
:class:`~vtpm_driver.standalone.service.ServerService`; Keystone is asked only by
``create`` (the user who creates a server owns it), with the global ``--os-*``
options.
"""

from __future__ import annotations

import argparse

from cliff.lister import Lister
from cliff.show import ShowOne

from vtpm_driver.cli.common import CommandMixin, add_property_options, int_at_least, show_columns

POSITIVE_INT = int_at_least(1)


class ServerCreate(CommandMixin, ShowOne):
    """Create a server (libvirt guest) and start it; show the new server.

    The vTPM is asked for the way Nova asks for it: flavor extra specs
    hw:tpm_version, hw:tpm_model, hw:tpm_secret_security and image properties
    hw_tpm_version, hw_tpm_model. The whole request is checked before anything
    is created; an invalid one exits 1 naming the key and value, leaving no
    domain and no Barbican secret behind.

    Boot either a kernel (--kernel, --initrd, --cmdline) or a disk image
    (--disk, .qcow2 or .raw). The serial console is appended to --console-log.

    Needs credentials (OS_* or --os-*): the authenticated user owns the server
    and, in 'user' secret security mode (the default), only that user can
    later start it, hard-reboot it or resume it.
    """

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("name", metavar="NAME", help="Name of the new server")
        add_property_options(parser)
        boot = parser.add_mutually_exclusive_group(required=True)
        boot.add_argument("--kernel", metavar="PATH", help="Kernel to boot directly")
        boot.add_argument("--disk", metavar="PATH",
                          help="Disk image to boot (.qcow2 or .raw; not with --kernel)")
        parser.add_argument("--initrd", metavar="PATH", help="Initial ramdisk (with --kernel)")
        parser.add_argument("--cmdline", metavar="TEXT",
                            help="Kernel command line (with --kernel; default console=ttyS0)")
        parser.add_argument("--vcpus", metavar="N", type=POSITIVE_INT, default=1,
                            help="Virtual CPUs (default 1)")
        parser.add_argument("--memory", metavar="MIB", type=POSITIVE_INT, default=256,
                            help="Memory in MiB (default 256)")
        parser.add_argument("--console-log", metavar="PATH",
                            help="File the serial console is appended to (default: under "
                                 "[vtpm] console_log_dir)")
        return parser

    def usage_problem(self, parsed_args: argparse.Namespace) -> str | None:
        if parsed_args.kernel is None and (parsed_args.initrd is not None
                                           or parsed_args.cmdline is not None):
            return "--initrd and --cmdline go with --kernel, not with --disk"
        return None

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple, tuple]:
        return show_columns(self.app.service.create(
            parsed_args.name,
            flavor_extra_specs=dict(parsed_args.flavor_properties),
            image_properties=dict(parsed_args.image_properties),
            kernel=parsed_args.kernel, initrd=parsed_args.initrd,
            cmdline=parsed_args.cmdline, disk=parsed_args.disk,
            vcpus=parsed_args.vcpus, memory_mb=parsed_args.memory,
            console_log=parsed_args.console_log,
        ))


class ServerList(CommandMixin, Lister):
    """List the servers of this host with their owner, vTPM and power state.

    Reads the records kept in libvirt (no credentials needed). Servers whose
    vTPM request is invalid show 'invalid' as their vTPM version.
    """

    # (column heading, field of vtpm_driver.standalone.view.summary_fields)
    COLUMNS = (("Name", "name"), ("UUID", "uuid"), ("Owner", "owner"),
               ("Project", "project"), ("vTPM Version", "vtpm_version"),
               ("vTPM Model", "vtpm_model"), ("Secret Security", "secret_security"),
               ("Power State", "power_state"))

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple, list]:
        rows = self.app.service.list()
        return (tuple(title for title, _ in self.COLUMNS),
                [tuple(row[field] for _, field in self.COLUMNS) for row in rows])


class ServerShow(CommandMixin, ShowOne):
    """Show a server: owner, vTPM configuration, secret UUID, power state.

    The vTPM secret's passphrase is never shown (only its Barbican UUID,
    vtpm_secret_uuid). No credentials needed.
    """

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("server", metavar="NAME|UUID", help="Server to show")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple, tuple]:
        return show_columns(self.app.service.show(parsed_args.server))


COMMANDS = {
    "server create": ServerCreate,
    "server list": ServerList,
    "server show": ServerShow,
}
