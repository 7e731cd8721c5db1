"""The one fake key manager (:class:`vtpm_driver.keymgr.KeyManagerAPI`), for unit tests."""

from __future__ import annotations

import base64
import os
import uuid

from vtpm_driver import exception
from vtpm_driver.keymgr.context import RequestContext
from vtpm_driver.model import consent, request


class FakeKeyManager:
    """Barbican as the core sees it (:class:`vtpm_driver.keymgr.KeyManagerAPI`).

    Owner-only in user/host mode; ``fail[op]`` makes ``create``/``get``/
    ``delete`` raise; every call is appended to ``events`` (shared with
    :class:`tests.fakes.libvirt.FakeLibvirt` so tests can assert the ORDER of
    Barbican and libvirt calls). ``listed`` is what the audit's listing sees.
    """

    def __init__(self, events: list[tuple[str, str]] | None = None) -> None:
        self.events = events if events is not None else []
        self.passphrases: dict[str, str] = {}
        self.owners: dict[str, str] = {}
        self.fail: dict[str, exception.VTPMError] = {}
        self.listed: dict[str, list[dict]] = {"user": [], "deployment": []}
        self.list_calls: list = []
        self.project_readable: set[str] = set()
        self.repairs: list[tuple] = []
        # owners' consents (vtpm_driver.model.consent): record id -> consent; the
        # credentials Keystone no longer accepts; the records the cloud acted by
        self.consents: dict[str, consent.Consent] = {}
        self.withdrawn: set[str] = set()
        self.used: list[str] = []
        # published EK certificates (EKCertificateStore): secret uuid -> PEM
        self.ek_certificates: dict[str, str] = {}

    def _maybe_fail(self, op: str) -> None:
        if op in self.fail:
            raise self.fail[op]

    def _check_access(self, context: RequestContext, secret_uuid: str, mode: str) -> None:
        if mode != request.SECRET_DEPLOYMENT and context.user_id != self.owners[secret_uuid]:
            raise exception.VTPMSecretForbidden(
                f"Barbican refused to read vTPM secret {secret_uuid} (HTTP 403)")

    def create_vtpm_secret(self, context, instance, secret_security):
        self.events.append(("barbican.create", instance.uuid))
        self._maybe_fail("create")
        secret_uuid = str(uuid.uuid4())
        passphrase = base64.b64encode(os.urandom(384)).decode()
        self.passphrases[secret_uuid] = passphrase
        self.owners[secret_uuid] = context.user_id
        instance.system_metadata["vtpm_secret_uuid"] = secret_uuid
        return secret_uuid, passphrase

    def ensure_vtpm_secret(self, context, instance, secret_security):
        secret_uuid = instance.system_metadata.get("vtpm_secret_uuid")
        if secret_uuid:
            return secret_uuid, self.get_vtpm_secret(context, instance, secret_security)
        return self.create_vtpm_secret(context, instance, secret_security)

    def get_vtpm_secret(self, context, instance, secret_security=None):
        secret_uuid = instance.system_metadata["vtpm_secret_uuid"]
        self.events.append(("barbican.get", secret_uuid))
        self._maybe_fail("get")
        if secret_uuid not in self.passphrases:
            raise exception.VTPMSecretNotFound(f"vTPM secret {secret_uuid} does not exist")
        self._check_access(context, secret_uuid, secret_security)
        return self.passphrases[secret_uuid]

    def store_ek_certificate(self, context, instance, secret_security, pem):
        self.events.append(("barbican.store_ek_certificate", instance.uuid))
        self._maybe_fail("store_ek_certificate")
        cert_uuid = str(uuid.uuid4())
        self.ek_certificates[cert_uuid] = pem
        instance.system_metadata["vtpm_ek_certificate_uuid"] = cert_uuid
        return cert_uuid

    def delete_ek_certificate(self, context, instance, secret_security=None):
        cert_uuid = instance.system_metadata.pop("vtpm_ek_certificate_uuid", None)
        self.events.append(("barbican.delete_ek_certificate", str(cert_uuid)))
        self._maybe_fail("delete_ek_certificate")
        self.ek_certificates.pop(cert_uuid, None)

    def delete_vtpm_secret(self, context, instance, secret_security=None):
        secret_uuid = instance.system_metadata.get("vtpm_secret_uuid")
        self.events.append(("barbican.delete", str(secret_uuid)))
        self._maybe_fail("delete")
        if secret_uuid in self.passphrases:
            self._check_access(context, secret_uuid, secret_security)
            del self.passphrases[secret_uuid]
        instance.system_metadata.pop("vtpm_secret_uuid", None)

    def list_vtpm_secrets(self, context, secret_security="user"):
        self.list_calls.append((context, secret_security))
        return self.listed[secret_security]

    def secret_project_access(self, context, secret_uuid, secret_security="user"):
        self._maybe_fail("acl")
        return secret_uuid in self.project_readable

    def set_owner_only_acl(self, context, secret_uuid, user_id, secret_security="user"):
        self._maybe_fail("acl")
        self.repairs.append(("acl", secret_uuid, user_id, secret_security))
        self.project_readable.discard(secret_uuid)

    def delete_secret(self, context, secret_uuid, secret_security="user"):
        self._maybe_fail("delete")
        self.repairs.append(("delete", secret_uuid, secret_security))
        listed = self.listed[secret_security]
        before = len(listed)
        listed[:] = [item for item in listed if item.get("uuid") != secret_uuid]
        self.passphrases.pop(secret_uuid, None)
        return len(listed) < before

    # -- owners' consents, as the service user reads them --------------------------------

    def get_consent(self, record_id, context=None):
        if record_id not in self.consents:
            raise exception.VTPMSecretNotFound(f"no consent record {record_id}")
        return self.consents[record_id]

    def consent_context(self, granted):
        if granted.credential_id in self.withdrawn:
            raise exception.VTPMSecretForbidden("Keystone: no such application credential")
        self.used.append(granted.record_id)
        return RequestContext(user_id=granted.owner, project_id="p-a", auth_token="tok-cred")

    def add_consent(self, server, operations=(consent.LIVE_MIGRATION,), owner="u-owner",
                    for_server=None, expires_at=None):
        """A consent record named in ``server``'s metadata; its id."""
        record_id = str(uuid.uuid4())
        self.consents[record_id] = consent.Consent(
            record_id=record_id, server=for_server or server.uuid, owner=owner,
            operations=frozenset(operations), expires_at=expires_at,
            credential_id=f"cred-{record_id}", credential_secret="cred-secret")
        server.metadata = {consent.METADATA_KEY: record_id}
        return record_id
