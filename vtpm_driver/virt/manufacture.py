"""Manufacture a new TPM before libvirt starts it: ``swtpm_setup`` with the deployment's CA.

libvirt manufactures a vTPM itself at its first start (``swtpm_setup
--createek --create-ek-cert --create-platform-cert --lock-nvram``, state
encrypted under the domain's secret), with the host's ``/etc/swtpm_setup.conf``:
Debian's signs the endorsement key (EK) and platform certificates with a CA
that ``swtpm_localca`` invents on each host, and the certificates never leave
the encrypted state. A deployment whose servers are attested (Keylime, SPIRE,
Windows' device health) needs every EK certificate signed by one CA it
configures, and the owner needs the certificate without asking the guest.

So a new TPM is made here, with exactly libvirt's arguments and layout
(``<swtpm_state_dir>/<uuid>/`` root 0711, ``tpm2`` or ``tpm1.2`` 0700 and
the state 0600, owned by libvirt's swtpm user, the log where libvirt writes
it), before the domain starts; libvirt finds a non-empty state directory and
runs no ``swtpm_setup`` of its own. With ``[vtpm] ek_ca_certificate`` and
``ek_ca_key``, ``swtpm_localca`` signs with them (configuration written to
``[vtpm] ek_ca_dir``, with its serial counter); ``--write-ek-cert-files`` hands
back the EK certificate, which is public and published for the owner.

``swtpm_setup`` runs as root, so the CA key can stay readable by root only;
the state is handed to the swtpm user afterwards. The passphrase reaches it
through a pipe, as libvirt passes it (``--pwdfile-fd``, ``aes-256-cbc``): the
state is never written unencrypted, and the passphrase is on no command line
and in no file.
"""

from __future__ import annotations

import base64
import dataclasses
import grp
import hashlib
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from oslo_log import log as logging

from vtpm_driver import exception
from vtpm_driver.model import request
from vtpm_driver.virt import state

LOG = logging.getLogger(__name__)

#: Where libvirt's swtpm_setup and swtpm log for a domain (qemu.conf's swtpm log dir).
LOG_DIR = "/var/log/swtpm/libvirt/qemu"
SETUP_TIMEOUT = 120  # seconds: a bound for a hung swtpm_setup, not a speed target
#: What ``--write-ek-cert-files`` calls the RSA 2048 EK certificate of a TPM 2.0
#: (NV index 0x01c00002, the one TPM 2.0 clients read first).
RSA_EK_CERT = "ek-rsa2048.crt"


@dataclasses.dataclass(frozen=True)
class CertificateAuthority:
    """The deployment's EK CA: its certificate and signing key (PEM files), and the
    directory for swtpm_localca's configuration and serial counter."""

    certificate: str
    key: str
    workdir: str

    def chain_pem(self) -> str:
        """The CA certificate(s), PEM, as published next to an EK certificate.

        :raises InvalidConfiguration: the file cannot be read.
        """
        try:
            return Path(self.certificate).read_text()
        except OSError as exc:
            raise exception.InvalidConfiguration(
                f"[vtpm] ek_ca_certificate {self.certificate}: {exc.strerror}") from None


@dataclasses.dataclass(frozen=True)
class EKCertificate:
    """A TPM's RSA EK certificate (DER) and the chain it was issued under (PEM)."""

    der: bytes
    chain_pem: str

    def __repr__(self) -> str:
        return f"EKCertificate(fingerprint={self.fingerprint})"

    @property
    def fingerprint(self) -> str:
        """sha256 of the DER encoding, lower-case hex (what ``openssl x509 -fingerprint
        -sha256`` prints, without the colons)."""
        return hashlib.sha256(self.der).hexdigest()

    @property
    def pem(self) -> str:
        return der_to_pem(self.der)


def certificate_authority(vtpm_opts: Any) -> CertificateAuthority | None:
    """The deployment's EK CA from ``[vtpm] ek_ca_certificate``, ``ek_ca_key`` and
    ``ek_ca_dir`` (``vtpm_opts``: that group of a configuration), or None when unset."""
    if not vtpm_opts.ek_ca_certificate or not vtpm_opts.ek_ca_key:
        return None
    return CertificateAuthority(certificate=vtpm_opts.ek_ca_certificate,
                                key=vtpm_opts.ek_ca_key, workdir=vtpm_opts.ek_ca_dir)


def der_to_pem(der: bytes) -> str:
    """One certificate, DER to PEM."""
    body = base64.b64encode(der).decode("ascii")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"


def log_file(domain_name: str) -> str:
    """libvirt's swtpm log of a domain."""
    return os.path.join(LOG_DIR, f"{domain_name}-swtpm.log")


def _write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (0600), unless it already says that."""
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def setup_config(ca: CertificateAuthority, localca: str) -> Path:
    """swtpm_setup's configuration for ``ca``, in ``ca.workdir`` (created 0700); idempotent.

    :raises InvalidConfiguration: the directory cannot be made or written.
    """
    work = Path(ca.workdir)
    try:
        work.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write(work / "swtpm-localca.conf",
               f"statedir = {work}\nsigningkey = {ca.key}\nissuercert = {ca.certificate}\n"
               f"certserial = {work}/certserial\n")
        _write(work / "swtpm-localca.options",
               "--platform-manufacturer vtpm-driver\n--platform-version 2.1\n"
               "--platform-model QEMU\n")
        _write(work / "swtpm_setup.conf",
               f"create_certs_tool = {localca}\n"
               f"create_certs_tool_config = {work}/swtpm-localca.conf\n"
               f"create_certs_tool_options = {work}/swtpm-localca.options\n")
    except OSError as exc:
        raise exception.InvalidConfiguration(
            f"[vtpm] ek_ca_dir {work}: cannot write swtpm_localca's configuration: "
            f"{exc.strerror}") from None
    return work / "swtpm_setup.conf"


def _ids(user: str, group: str) -> tuple[int, int]:
    try:
        return pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid
    except KeyError as exc:
        raise exception.InvalidConfiguration(
            f"swtpm user or group does not exist: {exc.args[0]}") from None


def _hand_over(root: Path, uid: int, gid: int) -> None:
    """Give the state to libvirt's swtpm user, files 0600 (swtpm_setup leaves 0640)."""
    for dirpath, dirnames, filenames in os.walk(root):
        os.chown(dirpath, uid, gid)
        for name in dirnames:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)
        for name in filenames:
            path = os.path.join(dirpath, name)
            os.chown(path, uid, gid, follow_symlinks=False)
            if not os.path.islink(path):  # (no lchmod on Linux; swtpm makes no links)
                os.chmod(path, 0o600)


def manufacture(base: str | os.PathLike[str], domain_uuid: str, domain_name: str,
                version: str, passphrase: str | bytes, *, pcr_banks: tuple[str, ...] = (),
                ca: CertificateAuthority | None = None, swtpm_user: str = "tss",
                swtpm_group: str = "tss") -> EKCertificate | None:
    """Make the TPM of a domain whose state does not exist yet, as libvirt would.

    Returns the RSA EK certificate of a TPM 2.0 signed by ``ca`` (None for a
    TPM 1.2, or without ``ca``: then the host's ``/etc/swtpm_setup.conf``
    decides, as it would for libvirt). On any failure whatever this call
    created is removed again and the error raised: the next start (libvirt's,
    or this again) finds no half-made TPM.

    Not idempotent by design: an existing state is never touched.

    :raises InstanceExists: the domain already has TPM state here.
    :raises InvalidConfiguration: swtpm_setup, swtpm_localca or the swtpm
        user is missing, or ``ca`` cannot be used.
    :raises VirtError: swtpm_setup failed (the last lines of its log quoted).
    """
    target = state.state_file(base, domain_uuid, version)
    tpm_dir = target.parent
    top = tpm_dir.parent
    if tpm_dir.exists() and any(tpm_dir.iterdir()):
        raise exception.InstanceExists(
            f"server {domain_uuid} already has TPM state in {tpm_dir}: not manufactured again")
    setup = shutil.which("swtpm_setup")
    if setup is None:
        raise exception.InvalidConfiguration("swtpm_setup not found in PATH (swtpm-tools)")
    config = None
    if ca is not None:
        localca = shutil.which("swtpm_localca")
        if localca is None:
            raise exception.InvalidConfiguration(
                "swtpm_localca not found in PATH (swtpm-tools): needed for [vtpm] ek_ca_*")
        config = setup_config(ca, localca)
    uid, gid = _ids(swtpm_user, swtpm_group)
    made_top = not top.exists()
    top.mkdir(mode=0o711, parents=True, exist_ok=True)
    tpm_dir.mkdir(mode=0o700, exist_ok=True)
    os.makedirs(LOG_DIR, mode=0o730, exist_ok=True)
    log = log_file(domain_name)
    try:
        with tempfile.TemporaryDirectory(prefix="vtpm-ek-") as certs:
            _run(setup, tpm_dir, domain_uuid, domain_name, version, passphrase, log,
                 pcr_banks, config, certs)
            der = None
            if version == request.VERSION_2_0 and ca is not None:
                cert = Path(certs, RSA_EK_CERT)
                if not cert.is_file():
                    raise exception.VirtError(
                        f"swtpm_setup wrote no {RSA_EK_CERT} for server {domain_uuid}")
                der = cert.read_bytes()
        _hand_over(tpm_dir, uid, gid)
        if os.path.exists(log):
            os.chown(log, uid, gid)
    except BaseException:
        shutil.rmtree(top if made_top else tpm_dir, ignore_errors=True)
        raise
    LOG.info("Manufactured the TPM %s of server %s%s", version, domain_uuid,
             " with an EK certificate from the deployment's CA" if der else "")
    return None if der is None else EKCertificate(der=der, chain_pem=ca.chain_pem())


def _run(setup: str, tpm_dir: Path, domain_uuid: str, domain_name: str, version: str,
         passphrase: str | bytes, log: str, pcr_banks: tuple[str, ...], config: Path | None,
         certs: str) -> None:
    read_end, write_end = os.pipe()
    try:
        data = passphrase.encode("utf-8") if isinstance(passphrase, str) else passphrase
        os.write(write_end, data)
    finally:
        os.close(write_end)
    argv = [setup]
    if version == request.VERSION_2_0:
        argv.append("--tpm2")
    argv += ["--pwdfile-fd", str(read_end), "--cipher", "aes-256-cbc",
             "--tpm-state", str(tpm_dir), "--vmid", f"{domain_name}:{domain_uuid}",
             "--logfile", log, "--createek", "--create-ek-cert", "--create-platform-cert",
             "--lock-nvram", "--not-overwrite", "--write-ek-cert-files", certs]
    if pcr_banks and version == request.VERSION_2_0:
        argv += ["--pcr-banks", ",".join(pcr_banks)]
    if config is not None:
        argv += ["--config", str(config)]
    try:
        proc = subprocess.run(argv, pass_fds=(read_end,), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=SETUP_TIMEOUT,
                              check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise exception.VirtError(f"cannot run swtpm_setup for server {domain_uuid}: "
                                  f"{exc}") from None
    finally:
        os.close(read_end)
    if proc.returncode != 0:
        try:
            tail = Path(log).read_text(errors="replace").strip().splitlines()[-4:]
        except OSError:
            tail = []
        detail = " | ".join(tail) or proc.stderr.strip()[-300:]
        raise exception.VirtError(
            f"swtpm_setup failed for server {domain_uuid} (exit {proc.returncode}): {detail}")
