"""vtpm_driver.virt.manufacture with Debian's real swtpm_setup and swtpm_localca, as root.

Everything goes into pytest's temporary directories (the state base, the CA's
work directory); the CA is made here with ``cryptography``.
"""

from __future__ import annotations

import datetime
import os
import shutil
import stat
import subprocess
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from vtpm_driver import exception
from vtpm_driver.virt import manufacture, state

PASSPHRASE = "not-a-real-passphrase-" + "x" * 40


def make_ca(where: Path, name: str = "vtpm-driver unit test EK CA", *, ca: bool = True,
            ski: bool = True) -> manufacture.CertificateAuthority:
    """A self-signed CA (``ca``/``ski`` False: without basicConstraints CA:TRUE or a
    subject key identifier) in ``where``, as an operator would configure one."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ski:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    where.mkdir(parents=True, exist_ok=True)
    (where / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file = where / "ca.key"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return manufacture.CertificateAuthority(certificate=str(where / "ca.pem"),
                                            key=str(key_file), workdir=str(where / "work"))


@pytest.fixture(autouse=True)
def _needs_swtpm_and_root(monkeypatch, tmp_path):
    if not shutil.which("swtpm_setup") or os.geteuid() != 0:
        pytest.fail("these tests need Debian's swtpm-tools and root (tools/setup-host.sh)")
    monkeypatch.setattr(manufacture, "LOG_DIR", str(tmp_path / "log"))


def test_a_tpm_2_with_an_ek_certificate_from_the_deployment_ca(tmp_path):
    ca = make_ca(tmp_path / "ca")
    server = str(uuid.uuid4())
    cert = manufacture.manufacture(tmp_path / "swtpm", server, "vm-a", "2.0", PASSPHRASE,
                                   pcr_banks=("sha256", "sha384"), ca=ca)
    assert cert is not None and len(cert.fingerprint) == 64
    ek = x509.load_der_x509_certificate(cert.der)
    issuer = x509.load_pem_x509_certificate(Path(ca.certificate).read_bytes())
    ek.verify_directly_issued_by(issuer)
    assert server in ek.subject.rfc4514_string()
    assert cert.chain_pem == Path(ca.certificate).read_text()
    assert x509.load_pem_x509_certificate(cert.pem.encode()).fingerprint(
        hashes.SHA256()).hex() == cert.fingerprint
    assert repr(cert) == f"EKCertificate(fingerprint={cert.fingerprint})"
    # libvirt's layout, handed to its swtpm user; encrypted at rest.
    top = state.state_dir(tmp_path / "swtpm", server)
    assert stat.S_IMODE(top.stat().st_mode) == 0o711
    tpm_dir = top / "tpm2"
    assert stat.S_IMODE(tpm_dir.stat().st_mode) == 0o700
    assert tpm_dir.owner() == "tss"
    permall = state.state_file(tmp_path / "swtpm", server, "2.0")
    assert permall.owner() == "tss" and state.is_encrypted(permall)
    assert state.check_permissions(top, "tss", "tss") == []


def test_the_passphrase_goes_through_a_pipe_never_the_command_line(tmp_path, monkeypatch):
    seen = []
    real_run = subprocess.run

    def spy(argv, **kwargs):
        seen.append(list(argv))
        return real_run(argv, **kwargs)

    monkeypatch.setattr(manufacture.subprocess, "run", spy)
    manufacture.manufacture(tmp_path / "swtpm", str(uuid.uuid4()), "vm-b", "2.0", PASSPHRASE)
    (argv,) = seen
    assert PASSPHRASE not in " ".join(argv)
    assert argv[argv.index("--cipher") + 1] == "aes-256-cbc" and "--pwdfile-fd" in argv
    for flag in ("--createek", "--create-ek-cert", "--create-platform-cert", "--lock-nvram",
                 "--not-overwrite", "--tpm2"):
        assert flag in argv  # exactly what libvirt asks for


def test_without_a_ca_the_hosts_configuration_decides_and_nothing_is_returned(tmp_path):
    server = str(uuid.uuid4())
    assert manufacture.manufacture(tmp_path / "swtpm", server, "vm-c", "1.2",
                                   PASSPHRASE) is None
    assert state.state_file(tmp_path / "swtpm", server, "1.2").is_file()


def test_existing_state_is_never_manufactured_again(tmp_path):
    server = str(uuid.uuid4())
    manufacture.manufacture(tmp_path / "swtpm", server, "vm-d", "2.0", PASSPHRASE)
    permall = state.state_file(tmp_path / "swtpm", server, "2.0")
    before = permall.read_bytes()
    with pytest.raises(exception.InstanceExists, match="not manufactured again"):
        manufacture.manufacture(tmp_path / "swtpm", server, "vm-d", "2.0", PASSPHRASE)
    assert permall.read_bytes() == before


def test_a_failed_manufacture_leaves_nothing(tmp_path):
    ca = make_ca(tmp_path / "ca")
    Path(ca.key).write_text("not a key\n")  # swtpm_localca cannot sign
    server = str(uuid.uuid4())
    with pytest.raises(exception.VirtError, match="swtpm_setup failed for server"):
        manufacture.manufacture(tmp_path / "swtpm", server, "vm-e", "2.0", PASSPHRASE, ca=ca)
    assert not state.state_dir(tmp_path / "swtpm", server).exists()


def test_the_ca_configuration_is_written_once_and_kept(tmp_path):
    ca = make_ca(tmp_path / "ca")
    conf = manufacture.setup_config(ca, "/usr/bin/swtpm_localca")
    mtime = conf.stat().st_mtime_ns
    assert manufacture.setup_config(ca, "/usr/bin/swtpm_localca") == conf
    assert conf.stat().st_mtime_ns == mtime
    assert f"signingkey = {ca.key}" in (conf.parent / "swtpm-localca.conf").read_text()
    assert stat.S_IMODE(conf.parent.stat().st_mode) == 0o700
