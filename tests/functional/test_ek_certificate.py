"""EK certificates from the deployment's CA, standalone, on the real stack (issue 22 part 4).

With ``[vtpm] ek_ca_certificate`` and ``ek_ca_key`` the driver manufactures a
new TPM itself (``swtpm_setup`` + ``swtpm_localca`` with that CA) before
libvirt starts it, and publishes the EK certificate: in the server's record
(``server show``: ``ek_certificate``, ``ek_fingerprint``) and as a Barbican
certificate secret of the owner. The guest reads the certificate from its
TPM's NV index 0x01c00002 (``ekcert`` in its report): the same bytes, signed by
the configured CA, kept over reboots; gone from Barbican with the server.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from keystoneauth1 import session as ks_session

from tests.functional.fixtures_server import ServersOnStack
from tests.functional.test_lifecycle import check_result
from tests.unit.virt.test_manufacture import make_ca
from vtpm_driver.model.server import EK_CERT_KEY
from vtpm_driver.standalone import view
from vtpm_driver.virt import manufacture

pytestmark = [pytest.mark.functional]

TPM = {"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"}


@pytest.fixture
def with_ek_ca(servers_on_stack: ServersOnStack, tmp_path: Path
               ) -> Iterator[manufacture.CertificateAuthority]:
    """The driver configured with a CA made for this test (root-only files)."""
    ca = make_ca(tmp_path / "deployment-ca", name="vtpm-driver functional test EK CA")
    conf = servers_on_stack.conf
    conf.set_override("ek_ca_certificate", ca.certificate, group="vtpm")
    conf.set_override("ek_ca_key", ca.key, group="vtpm")
    conf.set_override("ek_ca_dir", ca.workdir, group="vtpm")
    try:
        yield ca
    finally:
        for name in ("ek_ca_certificate", "ek_ca_key", "ek_ca_dir"):
            conf.clear_override(name, group="vtpm")


def barbican_payload(sess: ks_session.Session, url: str, cert_uuid: str) -> tuple[int, str]:
    resp = sess.get(f"{url}/v1/secrets/{cert_uuid}/payload", raise_exc=False,
                    headers={"Accept": "text/plain"})
    return resp.status_code, resp.text


def test_ek_certificate_is_published_verifies_and_equals_the_guests(
        servers_on_stack: ServersOnStack, with_ek_ca: manufacture.CertificateAuthority,
        keystone_session: Callable[..., ks_session.Session], tmp_path: Path) -> None:
    env = servers_on_stack
    inst = env.new_server(TPM, stay=True)
    console = env.spawn(inst)
    first = console.wait_new()
    tpm = check_result(first, "2.0", "tpm_crb")

    shown = view.server_fields(inst, "running")
    # What the guest read from its own TPM is what the cloud publishes.
    assert first["ekcert"] == shown["ek_fingerprint"], (first, shown)
    ek = x509.load_pem_x509_certificate(shown["ek_certificate"].encode())
    issuer = x509.load_pem_x509_certificate(Path(with_ek_ca.certificate).read_bytes())
    ek.verify_directly_issued_by(issuer)
    assert inst.uuid in ek.subject.rfc4514_string()
    pem = tmp_path / "ek.pem"
    pem.write_text(shown["ek_certificate"])
    verified = subprocess.run(["openssl", "verify", "-CAfile", with_ek_ca.certificate,
                               str(pem)], capture_output=True, text=True, check=False)
    assert verified.returncode == 0 and verified.stdout.strip().endswith(": OK"), verified

    # The owner gets it, with the CA chain, from the key manager with their own
    # credentials; another member of the project does not (owner-only ACL).
    cert_uuid = shown["ek_certificate_secret"]
    assert cert_uuid == inst.system_metadata[EK_CERT_KEY]
    url = env.stack.barbican_url
    status, body = barbican_payload(keystone_session("owner"), url, cert_uuid)
    # (Barbican keeps a text payload without its final newline.)
    assert status == 200
    assert body.strip() == (shown["ek_certificate"] + with_ek_ca.chain_pem()).strip()
    assert barbican_payload(keystone_session("member"), url, cert_uuid)[0] == 403

    # libvirt started the TPM we made (it ran no swtpm_setup of its own): the same
    # certificate after a hard reboot, with the same EK and sealed value.
    console.mark()
    env.driver.reboot(env.owner, inst, None, "HARD")
    again = console.wait_new()
    assert again["ekcert"] == first["ekcert"]
    assert check_result(again, "2.0", "tpm_crb") == tpm

    env.driver.destroy(env.owner, inst)
    env.assert_nothing_left(inst, None)
    assert barbican_payload(keystone_session("owner"), url, cert_uuid)[0] == 404


def test_without_a_deployment_ca_libvirt_manufactures_and_nothing_is_published(
        servers_on_stack: ServersOnStack) -> None:
    env = servers_on_stack
    inst = env.new_server(TPM)
    result = env.spawn(inst).wait_new()
    check_result(result, "2.0", "tpm_crb")
    assert len(result["ekcert"]) == 64  # the host's own swtpm_localca CA signed one
    shown = view.server_fields(inst, "shutdown")
    assert (shown["ek_fingerprint"], shown["ek_certificate"],
            shown["ek_certificate_secret"]) == (None, None, None)
    env.wait_shutoff(inst)
    env.driver.destroy(env.owner, inst)
    env.assert_nothing_left(inst, None)
