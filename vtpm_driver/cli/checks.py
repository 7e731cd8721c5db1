"""``request check`` and ``host check``: what a server asks for, what this host gives."""

from __future__ import annotations

import argparse

from cliff.show import ShowOne

from vtpm_driver.cli.common import DictColumn, ListColumn, add_property_options
from vtpm_driver.model import firmware, request, windows
from vtpm_driver.model.hostcheck import check_host


class RequestCheck(ShowOne):
    """Validate a vTPM request and show the vTPM and traits it needs.

    Reads flavor extra specs (hw:tpm_version, hw:tpm_model,
    hw:tpm_secret_security) and image properties (hw_tpm_version,
    hw_tpm_model) exactly as the driver does at spawn time; no service is
    contacted. Without a TPM version no vTPM is requested: vtpm is false and
    the other fields are empty.

    The firmware (firmware: bios or uefi from hw_firmware_type; secure_boot:
    required, optional or disabled from os:secure_boot / os_secure_boot) is
    checked as the driver checks it, and the PCR banks asked for
    (hw:tpm_pcr_banks / hw_tpm_pcr_banks) are listed.

    It also says whether Windows 11 would accept such a server (windows11:
    a TPM 2.0, UEFI firmware hw_firmware_type=uefi, Secure Boot
    os:secure_boot / os_secure_boot=required, a q35 machine type) and what is
    missing (windows11_missing). An image that says it is Windows 11
    (os_distro=windows with os_version 11, or vtpm_guest_os=windows11) on a
    request that lacks any of it is refused, naming each missing piece.

    Exit status: 0 the request is valid (with or without a vTPM); 1 it is
    invalid or flavor and image conflict (one line on stderr names the keys
    and values); 2 usage error.
    """

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        add_property_options(parser)
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple, tuple]:
        flavor = dict(parsed_args.flavor_properties)
        image = dict(parsed_args.image_properties)
        config = request.get_vtpm_config(flavor, image)
        windows.check(flavor, image, config)
        fw = firmware.get_firmware(flavor, image)
        gaps = windows.missing(flavor, image, config)
        columns = ("vtpm", "version", "model", "secret_security", "pcr_banks",
                   "required_traits", "firmware", "secure_boot", "windows11",
                   "windows11_missing")
        if config is None:
            return columns, (False, None, None, None, ListColumn([]), ListColumn([]),
                             fw.type, fw.secure_boot, False, ListColumn(list(gaps)))
        return columns, (
            True, config.version, config.model, config.secret_security,
            ListColumn(list(config.pcr_banks)), ListColumn(sorted(config.traits)), fw.type,
            fw.secure_boot, not gaps, ListColumn(list(gaps)),
        )


class HostCheck(ShowOne):
    """Check whether this host can run vTPM guests and show its TPM traits.

    Uses [libvirt] swtpm_enabled, virt_type, connection_uri, swtpm_user,
    swtpm_group and supported_tpm_secret_security from the configuration
    (--config-file, else /etc/vtpm-driver/vtpm-driver.conf when present),
    asks libvirt for its domain capabilities and looks for swtpm, swtpm_setup
    and swtpm_ioctl. Every problem found is listed; any problem makes every
    trait false.

    It also says whether libvirt offers UEFI firmware with Secure Boot for q35
    guests (secure_boot: an OVMF build its firmware descriptors list) and so
    whether this host can boot a server Windows 11 accepts (windows11, with
    what is missing in windows11_missing); neither is needed for a vTPM.

    Exit status: 0 the report was produced, whatever it says (read
    "supported"); 1 libvirt cannot be reached or the configuration is invalid
    (one line on stderr); 2 usage error.
    """

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple, tuple]:
        conf = self.app.conf
        probe = self.app.probe_factory(conf)
        try:
            report = check_host(conf, probe)
        finally:
            close = getattr(probe, "close", None)
            if close is not None:
                close()
        return ("supported", "traits", "problems", "versions", "secure_boot", "windows11",
                "windows11_missing"), (
            report.supported,
            DictColumn(report.traits),
            ListColumn(report.problems),
            DictColumn(report.versions),
            report.secure_boot,
            report.windows11,
            ListColumn(list(report.windows11_missing)),
        )


COMMANDS = {
    "request check": RequestCheck,
    "host check": HostCheck,
}
