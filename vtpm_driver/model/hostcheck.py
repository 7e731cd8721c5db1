"""What this host can give: libvirt domain capabilities, swtpm, user/group -> traits.

SPEC C1-C3. The decision (:func:`check_host`) is a pure function of the
configuration and of facts read through a :class:`HostProbe`; the real probe
(:class:`vtpm_driver.virt.probe.LibvirtHostProbe`, since only ``virt`` imports
libvirt) is the only part that talks to libvirt, ``PATH`` and the user
database, so every rule can be unit-tested with a fake probe and captured
``virsh domcapabilities`` output.

Unlike Nova, which reports only the secret-security traits it supports, every
TPM trait (:data:`vtpm_driver.model.request.ALL_TRAITS`: Nova's seven and our
PCR bank ones) is always reported (``False`` when unsupported), so a stale
trait is removed from the resource provider.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from lxml import etree
from oslo_config import cfg
from oslo_log import log as logging

from vtpm_driver import conf as vtpm_conf
from vtpm_driver import exception
from vtpm_driver.model import request

LOG = logging.getLogger(__name__)

SUPPORTED_VIRT_TYPES = ("kvm", "qemu")
SWTPM_BINARIES = ("swtpm", "swtpm_setup", "swtpm_ioctl")
EMULATOR_BACKEND = "emulator"
#: libvirt learnt ``<active_pcr_banks>`` (and runs swtpm_setup to set them) in 8.0.0.
MIN_LIBVIRT_PCR_BANKS = (8, 0, 0)


@dataclasses.dataclass(frozen=True)
class TPMCapabilities:
    """The ``<tpm>`` element of libvirt's domain capabilities."""

    supported: bool = False
    models: frozenset[str] = frozenset()
    backend_models: frozenset[str] = frozenset()
    backend_versions: frozenset[str] = frozenset()  # empty: libvirt lists none (< 8.6)


@dataclasses.dataclass(frozen=True)
class HostReport:
    """Whether this host can run vTPM guests, and which traits it reports.

    ``secure_boot``: libvirt offers UEFI firmware with Secure Boot for q35
    guests (what :mod:`vtpm_driver.model.firmware` asks for with
    ``os_secure_boot=required``); ``windows11``: this host can boot a server
    Windows 11 accepts (that and a TPM 2.0), with ``windows11_missing`` saying
    what it lacks. Neither makes a host unsupported for vTPM guests.
    """

    supported: bool
    traits: dict[str, bool]
    problems: list[str]
    versions: dict[str, str]
    secure_boot: bool = False
    windows11_missing: tuple[str, ...] = ()

    @property
    def windows11(self) -> bool:
        return self.supported and not self.windows11_missing


class HostProbe(Protocol):
    """The facts :func:`check_host` needs; tests pass a fake with these methods."""

    def domain_capabilities(self, virt_type: str, machine: str | None = None) -> str:
        """libvirt's domain capabilities XML for ``virt_type`` (and ``machine``: a
        machine type such as ``q35``; None: the emulator's default).

        :raises HypervisorUnavailable: libvirt cannot be reached.
        :raises VirtError: libvirt answered but refused the query.
        """

    def which(self, name: str) -> str | None:
        """Path of executable ``name`` on ``PATH``, or None."""

    def user_exists(self, name: str) -> bool:
        """Whether the system user ``name`` exists."""

    def group_exists(self, name: str) -> bool:
        """Whether the system group ``name`` exists."""

    def versions(self) -> dict[str, str]:
        """Component versions for the report (libvirt, hypervisor, swtpm).

        :raises HypervisorUnavailable: libvirt cannot be reached.
        """

    def pcr_banks(self) -> frozenset[str]:
        """The PCR banks this host's swtpm implements (empty when it cannot tell)."""

    def read_file(self, path: str) -> bytes:
        """A file's bytes (the EK CA's certificate and key).

        :raises OSError: it cannot be read.
        """


def _xml_parser() -> etree.XMLParser:
    # libvirt's output is trusted, but never resolve entities or fetch anything.
    return etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


def _enum_values(tpm: etree._Element, name: str) -> frozenset[str]:
    values = tpm.xpath("./enum[@name=$name]/value/text()", name=name)
    return frozenset(v.strip() for v in values if v.strip())


def _domain_capabilities(xml: str) -> etree._Element:
    try:
        root = etree.fromstring(xml.encode("utf-8"), _xml_parser())
    except (etree.XMLSyntaxError, ValueError) as exc:
        raise exception.VirtError(
            f"libvirt returned domain capabilities that are not XML: {exc}"
        ) from None
    if root.tag != "domainCapabilities":
        raise exception.VirtError(
            f"libvirt returned <{root.tag}> where <domainCapabilities> was expected"
        )
    return root


def parse_domain_capabilities(xml: str) -> TPMCapabilities:
    """The TPM part of ``virConnectGetDomainCapabilities`` output.

    No ``<devices><tpm>`` element, or ``supported`` other than ``yes``, gives
    ``supported=False`` (what libvirt reports when QEMU has no TPM support).

    :raises VirtError: the text is not a ``<domainCapabilities>`` document.
    """
    root = _domain_capabilities(xml)
    tpm = root.find("./devices/tpm")
    if tpm is None:
        return TPMCapabilities()
    return TPMCapabilities(
        supported=tpm.get("supported") == "yes",
        models=_enum_values(tpm, "model"),
        backend_models=_enum_values(tpm, "backendModel"),
        backend_versions=_enum_values(tpm, "backendVersion"),
    )


#: The machine type UEFI Secure Boot runs on (SMM), as Windows 11 and Nova ask for it.
SECURE_BOOT_MACHINE = "q35"


def offers_secure_boot(xml: str) -> bool:
    """Whether domain capabilities (of a q35 machine) offer UEFI firmware with Secure Boot:
    ``efi`` among the firmware values and a loader that can be ``secure='yes'``. libvirt
    lists them only when a firmware descriptor (``/usr/share/qemu/firmware``) has it.

    :raises VirtError: the text is not a ``<domainCapabilities>`` document.
    """
    root = _domain_capabilities(xml)
    firmware = {v.strip() for v in root.xpath("./os/enum[@name='firmware']/value/text()")}
    secure = {v.strip() for v in root.xpath("./os/loader/enum[@name='secure']/value/text()")}
    return "efi" in firmware and "yes" in secure


def tpm_traits(caps: TPMCapabilities, secret_security: Iterable[str],
               pcr_banks: Iterable[str] = ()) -> dict[str, bool]:
    """Every TPM trait for a host whose vTPM support is otherwise sound.

    libvirt older than 8.6 does not list backend versions: then both versions
    are assumed, as Nova does. ``pcr_banks``: the banks this host can activate
    (:func:`activatable_banks`).
    """
    modes = set(secret_security)
    traits = dict.fromkeys(request.ALL_TRAITS, False)
    for bank in pcr_banks:
        traits[request.PCR_BANK_TRAITS[bank]] = True
    for model, trait in request.MODEL_TRAITS.items():
        traits[trait] = model in caps.models
    for version, trait in request.VERSION_TRAITS.items():
        traits[trait] = not caps.backend_versions or version in caps.backend_versions
    for mode, trait in request.SECRET_SECURITY_TRAITS.items():
        traits[trait] = mode in modes
    return traits


def activatable_banks(libvirt_version: str | None, implemented: Iterable[str]) -> frozenset[str]:
    """The banks a server here can ask for: swtpm implements them and libvirt can set them.

    ``libvirt_version``: as :meth:`HostProbe.versions` reports it; unknown or
    older than :data:`MIN_LIBVIRT_PCR_BANKS` gives none.
    """
    try:
        numbers = tuple(int(part) for part in (libvirt_version or "").split("."))
    except ValueError:
        return frozenset()
    if not numbers or numbers < MIN_LIBVIRT_PCR_BANKS:
        return frozenset()
    return frozenset(bank for bank in implemented if bank in request.PCR_BANK_TRAITS)


def no_traits() -> dict[str, bool]:
    """Every TPM trait reported unsupported (so placement drops stale ones)."""
    return dict.fromkeys(request.ALL_TRAITS, False)


def _capability_problems(uri: str, virt_type: str, caps: TPMCapabilities) -> list[str]:
    where = f"libvirt at {uri} (virt_type {virt_type})"
    if not caps.supported:
        return [
            f"{where} does not support TPM devices: its domain capabilities lack "
            "<tpm supported='yes'>; install a QEMU build with TPM support and restart libvirtd"
        ]
    if EMULATOR_BACKEND not in caps.backend_models:
        offered = ", ".join(sorted(caps.backend_models)) or "none"
        return [
            f"{where} does not offer the '{EMULATOR_BACKEND}' TPM backend (offers: {offered}); "
            "install swtpm and restart libvirtd so that it detects it"
        ]
    return []


def _secret_security_problems(modes: Iterable[str]) -> list[str]:
    allowed = ", ".join(request.SECRET_SECURITY_MODES)
    return [
        f"[libvirt] supported_tpm_secret_security contains unknown value {request.show(mode)}: "
        f"allowed values are {allowed}"
        for mode in modes
        if mode not in request.SECRET_SECURITY_MODES
    ]


def _binary_problems(probe: HostProbe) -> list[str]:
    return [
        f"{name} not found in PATH: install the swtpm and swtpm-tools packages"
        for name in SWTPM_BINARIES
        if not probe.which(name)
    ]


def _account_problems(user: str, group: str, probe: HostProbe) -> list[str]:
    problems = []
    if not probe.user_exists(user):
        problems.append(
            f"[libvirt] swtpm_user {request.show(user)} does not exist on this host: create it "
            "or set swtpm_user to the user libvirt runs swtpm as (swtpm_user in "
            "/etc/libvirt/qemu.conf, 'tss' by default)"
        )
    if not probe.group_exists(group):
        problems.append(
            f"[libvirt] swtpm_group {request.show(group)} does not exist on this host: create it "
            "or set swtpm_group to the group libvirt runs swtpm as (swtpm_group in "
            "/etc/libvirt/qemu.conf, 'tss' by default)"
        )
    return problems


def _ek_ca_problems(cert_path: str | None, key_path: str | None, probe: HostProbe
                    ) -> list[str]:
    """Whether ``[vtpm] ek_ca_certificate`` / ``ek_ca_key`` can sign EK certificates."""
    if not cert_path and not key_path:
        return []
    if not cert_path or not key_path:
        return ["[vtpm] ek_ca_certificate and ek_ca_key go together: set both or neither"]
    problems = [] if probe.which("swtpm_localca") else [
        "swtpm_localca not found in PATH: install swtpm-tools (it signs with [vtpm] ek_ca_*)"]
    try:
        cert_pem, key_pem = probe.read_file(cert_path), probe.read_file(key_path)
    except OSError as exc:
        return [*problems, f"[vtpm] EK CA: cannot read {exc.filename}: {exc.strerror}"]
    return problems + ek_ca_problems(cert_pem, key_pem)


def ek_ca_problems(cert_pem: bytes, key_pem: bytes,
                   now: datetime.datetime | None = None) -> list[str]:
    """What keeps a certificate and key from being an EK CA (empty: nothing). Pure.

    The certificate must be a CA's (basicConstraints CA:TRUE) with a subject
    key identifier, valid now, and the key (unencrypted PEM: swtpm_localca
    cannot ask for a password) its own.
    """
    try:
        ca = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return ["[vtpm] ek_ca_certificate is not a PEM certificate"]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return ["[vtpm] ek_ca_key is not an unencrypted PEM private key"]
    problems = []
    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        problems.append("[vtpm] ek_ca_certificate is not a CA certificate "
                        "(basicConstraints CA:TRUE)")
    try:
        ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        problems.append("[vtpm] ek_ca_certificate has no subjectKeyIdentifier, which "
                        "swtpm_localca copies into each certificate as its authority key id")
    moment = now or datetime.datetime.now(datetime.UTC)
    if not ca.not_valid_before_utc <= moment <= ca.not_valid_after_utc:
        problems.append(f"[vtpm] ek_ca_certificate is valid only from "
                        f"{ca.not_valid_before_utc:%Y-%m-%d} to {ca.not_valid_after_utc:%Y-%m-%d}")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, spki)
            != ca.public_key().public_bytes(serialization.Encoding.DER, spki)):
        problems.append("[vtpm] ek_ca_key is not the key of ek_ca_certificate")
    return problems


def check_host(conf: cfg.ConfigOpts, probe: HostProbe) -> HostReport:
    """Decide what this host supports (SPEC C1-C3) and why not, in one pass.

    Every problem is collected (not just the first) so an operator fixes them
    all at once. Any problem makes every trait False: a half-working host must
    not attract vTPM servers. libvirt is consulted (for versions) even with
    ``swtpm_enabled = False``: the driver cannot run without it either way.

    :raises HypervisorUnavailable: libvirt cannot be reached.
    """
    versions = probe.versions()
    opts = conf.libvirt
    if not opts.swtpm_enabled:
        return HostReport(
            supported=False,
            traits=no_traits(),
            problems=[
                "[libvirt] swtpm_enabled is False: set it to True to offer emulated TPMs"
            ],
            versions=versions,
        )

    uri = vtpm_conf.libvirt_uri(conf)
    virt_type = opts.virt_type
    modes = list(opts.supported_tpm_secret_security)
    problems: list[str] = []
    caps = TPMCapabilities()
    if virt_type not in SUPPORTED_VIRT_TYPES:
        problems.append(
            f"[libvirt] virt_type is {request.show(virt_type)}: emulated TPMs need 'kvm' or "
            "'qemu'; change virt_type or set swtpm_enabled = False"
        )
    else:
        try:
            caps = parse_domain_capabilities(probe.domain_capabilities(virt_type))
        except exception.HypervisorUnavailable:
            raise
        except exception.VirtError as exc:
            problems.append(
                f"libvirt at {uri} cannot report domain capabilities for virt_type "
                f"{virt_type}: {exc}"
            )
        else:
            problems += _capability_problems(uri, virt_type, caps)
    problems += _binary_problems(probe)
    problems += _account_problems(opts.swtpm_user, opts.swtpm_group, probe)
    problems += _ek_ca_problems(conf.vtpm.ek_ca_certificate, conf.vtpm.ek_ca_key, probe)
    problems += _secret_security_problems(modes)

    if problems:
        LOG.debug("vTPM not supported on this host: %s", "; ".join(problems))
        return HostReport(supported=False, traits=no_traits(), problems=problems,
                          versions=versions)
    traits = tpm_traits(caps, modes, activatable_banks(versions.get("libvirt"),
                                                       probe.pcr_banks()))
    LOG.debug("vTPM supported on this host; traits %s", traits)
    secure_boot, missing = _windows11_missing(probe, virt_type, traits)
    return HostReport(supported=True, traits=traits, problems=[], versions=versions,
                      secure_boot=secure_boot, windows11_missing=missing)


def _windows11_missing(probe: HostProbe, virt_type: str, traits: dict[str, bool]
                       ) -> tuple[bool, tuple[str, ...]]:
    """Whether libvirt offers Secure Boot firmware here, and what a Windows 11 server
    could not get on this otherwise sound host.

    :raises HypervisorUnavailable: libvirt cannot be reached.
    """
    missing = []
    if not traits[request.TRAIT_TPM_2_0]:
        missing.append("a TPM 2.0 (libvirt offers no TPM 2.0 emulator backend)")
    try:
        secure_boot = offers_secure_boot(
            probe.domain_capabilities(virt_type, SECURE_BOOT_MACHINE))
    except exception.HypervisorUnavailable:
        raise
    except exception.VirtError as exc:
        secure_boot = False
        missing.append(f"UEFI Secure Boot firmware: libvirt cannot report the "
                       f"{SECURE_BOOT_MACHINE} machine's capabilities ({exc})")
    else:
        if not secure_boot:
            missing.append(
                f"UEFI Secure Boot firmware: libvirt offers no {SECURE_BOOT_MACHINE} loader "
                "with secure='yes' (install Debian's ovmf package, whose firmware "
                "descriptors in /usr/share/qemu/firmware list it, and restart libvirtd)")
    return secure_boot, tuple(missing)

