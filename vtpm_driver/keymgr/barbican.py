"""The vTPM passphrase in Barbican: create (+ owner-only ACL), get, delete, list.

SPEC D1-D7, through python-barbicanclient on a keystoneauth1 session, at the
minimum number of round trips: create = 1 POST + 1 ACL PUT, unlock = 1 payload
GET, delete = 1 DELETE, and no Keystone request when the context carries the
token and the catalog. :mod:`vtpm_driver.keymgr.client` explains the two
adaptations that make the client reach that floor (no version discovery) and
keep bodies out of logs; :mod:`vtpm_driver.keymgr.errors` maps every failure,
from the HTTP status, in one place.

The passphrase and tokens never reach a log record or an exception: this
module logs secret and server UUIDs only.
"""

from __future__ import annotations

import base64
import os
import uuid as uuid_mod
from collections.abc import Mapping
from typing import Any

from keystoneauth1 import exceptions as ks_exc
from keystoneauth1.identity import v3 as ks_v3
from oslo_config import cfg
from oslo_log import log as logging
from oslo_utils import uuidutils

from vtpm_driver import conf as vtpm_conf
from vtpm_driver import exception
from vtpm_driver.keymgr import client as client_mod
from vtpm_driver.keymgr import context as vtpm_context
from vtpm_driver.keymgr.api import KeyManagerAPI, KeyManagerAuditAPI
from vtpm_driver.keymgr.errors import keystone_errors
from vtpm_driver.model import consent, request, rules
from vtpm_driver.model.server import (
    EK_CERT_KEY,
    SYSMETA_KEY,
    recorded_secret,
    require_recorded_secret,
)

__all__ = ["SYSMETA_KEY", "KeyManager"]

LOG = logging.getLogger(__name__)

SECRET_NAME_PREFIX = "vTPM secret for instance "
PASSPHRASE_BYTES = 384
PASSPHRASE_LENGTH = 4 * PASSPHRASE_BYTES // 3  # base64: 512 ASCII characters
PASSPHRASE_CONTENT_TYPE = "text/plain"
SECRET_TYPE = "passphrase"
#: The owner's copy of a server's EK certificate (``EKCertificateStore``).
EK_CERT_NAME_PREFIX = "vTPM EK certificate for instance "
EK_CERT_SECRET_TYPE = "certificate"
API_VERSION = client_mod.API_VERSION
LIST_PAGE_SIZE = 100


# -- pure helpers ---------------------------------------------------------------------


def new_passphrase() -> str:
    """Base64 of 384 bytes from the OS CSPRNG: 512 ASCII characters (D1, as Nova)."""
    return base64.b64encode(os.urandom(PASSPHRASE_BYTES)).decode("ascii")


def secret_name(instance_uuid: str) -> str:
    """The Barbican secret name Nova uses, so audits can match both."""
    return f"{SECRET_NAME_PREFIX}{instance_uuid}"


def api_root(endpoint: str) -> str:
    """Barbican's unversioned root URL (catalogs list it with or without ``/v1``)."""
    root = endpoint.rstrip("/")
    if root.endswith("/" + API_VERSION):
        root = root[: -len(API_VERSION) - 1]
    return root


def as_uuid(value: object) -> str | None:
    """``value`` as a canonical (lower-case, dashed) UUID, or None if it is not one."""
    if not uuidutils.is_uuid_like(value):
        return None
    return str(uuid_mod.UUID(str(value)))


def secret_uuid_from_ref(secret_ref: object) -> str | None:
    """The UUID at the end of a ``secret_ref`` URL, or None if there is none."""
    if not isinstance(secret_ref, str):
        return None
    return as_uuid(secret_ref.rstrip("/").rsplit("/", 1)[-1])


def check_payload(content_type: str | None, body: bytes, secret_uuid: str) -> str:
    """The passphrase from a payload reply, if it is one (D1).

    It must be ``text/plain``, strict ASCII and exactly 512 characters (base64
    of 384 bytes); anything else means Barbican (or something in between)
    answered wrongly, and handing it to libvirt would lock the TPM state.

    :raises KeyManagerUnavailable: naming the secret, never quoting the payload.
    """
    media = (content_type or "").split(";", 1)[0].strip().lower()
    problem = None
    text = ""
    if media != PASSPHRASE_CONTENT_TYPE:
        problem = f"as {request.show(media) if media else 'no content type'}, not text/plain"
    else:
        try:
            text = body.decode("ascii")
        except UnicodeDecodeError:
            problem = "with non-ASCII bytes"
        else:
            if len(text) != PASSPHRASE_LENGTH:
                problem = f"with {len(text)} characters instead of {PASSPHRASE_LENGTH}"
    if problem:
        raise exception.KeyManagerUnavailable(
            f"Barbican returned the payload of vTPM secret {secret_uuid} {problem}: "
            "it is not a vTPM passphrase; refusing to use it"
        )
    return text


class KeyManager(KeyManagerAPI, KeyManagerAuditAPI):
    """Barbican operations for vTPM passphrases (both interfaces of :mod:`.api`).

    ``user`` and ``host`` modes act with the caller's token (the server
    owner's), through a client built per call from the context (no request;
    the endpoint comes from configuration or the context's catalog);
    ``deployment`` mode acts as ``[service_user]`` through one client built on
    first use, and never sends the caller's token anywhere. All clients share
    this object's HTTP connections. Thread-safe: nothing here is mutated after
    construction except the cached service target.
    """

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        vtpm_conf.register_opts(conf)
        self._conf = conf
        self._timeout = float(conf.key_manager.timeout)
        self._session = client_mod.BarbicanSession(
            timeout=self._timeout, barbican_timeout=self._timeout,
            app_name=client_mod.APP_NAME)
        self._service: client_mod.Target | None = None

    def __repr__(self) -> str:
        return f"KeyManager(timeout={self._timeout})"

    # -- public API ---------------------------------------------------------

    def create_vtpm_secret(
        self, context: vtpm_context.RequestContext, instance: Any, secret_security: str
    ) -> tuple[str, str]:
        """Create the instance's passphrase in Barbican and record its UUID (D1-D3).

        One POST, then (with ``[vtpm] owner_only_acl``) one ACL PUT. Nothing
        readable by the project is left behind when this raises: if the ACL
        cannot be set the new secret is deleted again, and if Barbican accepts
        the POST but returns no usable ``secret_ref`` the secret is looked up
        by name and deleted (:meth:`_delete_unreferenced`).

        :returns: ``(secret_uuid, passphrase)``; the UUID is also stored in
            ``instance.system_metadata['vtpm_secret_uuid']``.
        :raises VTPMError: the instance already has a secret (it would be orphaned).
        :raises KeyManagerUnavailable: no usable ``secret_ref`` in the reply.
        """
        mode = request.check_mode(secret_security)
        existing = instance.system_metadata.get(SYSMETA_KEY)
        if existing:
            raise exception.VTPMError(
                f"server {instance.uuid} already has vTPM secret {existing} in "
                f"system_metadata['{SYSMETA_KEY}']; delete it first or use ensure_vtpm_secret"
            )
        target = self._target(context, mode)
        passphrase = new_passphrase()
        secret_uuid = self._store(target, secret_name(instance.uuid), passphrase, "create",
                                  "a secret", instance.uuid)
        LOG.debug("Created vTPM secret %s", secret_uuid, instance_uuid=instance.uuid)
        if self._conf.vtpm.owner_only_acl:
            self._set_owner_only_acl(target, secret_uuid, instance, context)
        instance.system_metadata[SYSMETA_KEY] = secret_uuid
        LOG.info("Stored vTPM secret %s in Barbican (%s mode)", secret_uuid, mode,
                 instance_uuid=instance.uuid)
        return secret_uuid, passphrase

    def ensure_vtpm_secret(
        self, context: vtpm_context.RequestContext, instance: Any, secret_security: str
    ) -> tuple[str, str]:
        """Nova's ``ensure_vtpm_secret``: fetch the recorded secret, else create one.

        A recorded UUID that Barbican no longer has raises
        ``VTPMSecretNotFound``; it is never silently replaced (D4).
        """
        secret_uuid = instance.system_metadata.get(SYSMETA_KEY)
        if secret_uuid:
            return secret_uuid, self.get_vtpm_secret(context, instance, secret_security)
        return self.create_vtpm_secret(context, instance, secret_security)

    def get_vtpm_secret(
        self,
        context: vtpm_context.RequestContext,
        instance: Any,
        secret_security: str | None = None,
    ) -> str:
        """The instance's passphrase: one GET of the payload (D4, D7).

        ``secret_security`` defaults to the mode in the instance's flavor.

        :raises VTPMSecretNotFound: no UUID recorded, or Barbican lost it.
        :raises KeyManagerUnavailable: the reply is not a vTPM passphrase
            (:func:`check_payload`).
        """
        mode = self._mode(secret_security, instance)
        # None recorded: require_recorded_secret raises VTPMSecretNotFound.
        secret_uuid = self._recorded_uuid(instance) or require_recorded_secret(instance)
        target = self._target(context, mode)
        with target.errors("read", secret_uuid, instance.uuid):
            resp = client_mod.http(target.client).request(
                f"secrets/{secret_uuid}/payload", "GET",
                headers={"Accept": PASSPHRASE_CONTENT_TYPE})
        return check_payload(resp.headers.get("Content-Type"), resp.content, secret_uuid)

    def delete_vtpm_secret(
        self,
        context: vtpm_context.RequestContext,
        instance: Any,
        secret_security: str | None = None,
    ) -> None:
        """Delete the instance's secret and its sysmeta key; idempotent (D6).

        No UUID recorded, or Barbican answers 404: nothing to do. On any other
        failure the key stays, so the delete can be retried.
        """
        secret_uuid = self._recorded_uuid(instance)
        if secret_uuid is None:
            instance.system_metadata.pop(SYSMETA_KEY, None)
            return
        target = self._target(context, self._mode(secret_security, instance))
        if self._delete(target, secret_uuid, instance.uuid):
            LOG.info("Deleted vTPM secret %s", secret_uuid, instance_uuid=instance.uuid)
        else:
            LOG.debug("vTPM secret %s already deleted or never existed", secret_uuid,
                      instance_uuid=instance.uuid)
        instance.system_metadata.pop(SYSMETA_KEY, None)

    def store_ek_certificate(self, context: vtpm_context.RequestContext, instance: Any,
                             secret_security: str, pem: str) -> str:
        """:meth:`EKCertificateStore.store_ek_certificate`: one POST, one ACL PUT.

        Stored as its passphrase is (:meth:`create_vtpm_secret`): by the owner
        (the service user in ``deployment`` mode), readable by the owner only
        with ``[vtpm] owner_only_acl``; a half-made one is deleted again.

        :raises VTPMError: one is already recorded.
        """
        mode = request.check_mode(secret_security)
        existing = instance.system_metadata.get(EK_CERT_KEY)
        if existing:
            raise exception.VTPMError(
                f"server {instance.uuid} already has EK certificate secret {existing}")
        target = self._target(context, mode)
        cert_uuid = self._store(target, f"{EK_CERT_NAME_PREFIX}{instance.uuid}", pem,
                                "create", "an EK certificate", instance.uuid,
                                secret_type=EK_CERT_SECRET_TYPE)
        if self._conf.vtpm.owner_only_acl:
            self._set_owner_only_acl(target, cert_uuid, instance, context)
        instance.system_metadata[EK_CERT_KEY] = cert_uuid
        LOG.info("Published the EK certificate of the vTPM in Barbican (%s)", cert_uuid,
                 instance_uuid=instance.uuid)
        return cert_uuid

    def delete_ek_certificate(self, context: vtpm_context.RequestContext, instance: Any,
                              secret_security: str | None = None) -> None:
        """:meth:`EKCertificateStore.delete_ek_certificate`; a 404 is done already."""
        cert_uuid = as_uuid(instance.system_metadata.get(EK_CERT_KEY))
        if cert_uuid is not None:
            target = self._target(context, self._mode(secret_security, instance))
            self._delete(target, cert_uuid, instance.uuid)
        instance.system_metadata.pop(EK_CERT_KEY, None)

    def list_vtpm_secrets(
        self, context: vtpm_context.RequestContext, secret_security: str = request.SECRET_USER
    ) -> list[dict[str, str | None]]:
        """vTPM secrets visible to the caller (or the service user), for audits.

        Pages through ``GET /v1/secrets`` filtered by name (Barbican matches
        ``name`` with SQL ``LIKE``, so a ``%`` suffix selects the prefix) and
        keeps secrets named ``vTPM secret for instance <uuid>``; metadata only,
        never payloads.
        """
        target = self._target(context, request.check_mode(secret_security))
        found: list[dict[str, str | None]] = []
        offset = 0
        while True:
            body = self._list_page(target, SECRET_NAME_PREFIX + "%", offset, LIST_PAGE_SIZE)
            page = body.get("secrets")
            if not isinstance(page, list) or not page:
                break
            found.extend(_vtpm_entry(item) for item in page if _is_vtpm_secret(item))
            offset += len(page)
            total = body.get("total")
            if not body.get("next") or (isinstance(total, int) and offset >= total):
                break
        return found

    # -- helpers --------------------------------------------------------------

    @staticmethod
    def _mode(secret_security: str | None, instance: Any) -> str:
        if secret_security:
            return request.check_mode(secret_security)
        return rules.secret_security(getattr(instance, "flavor", None), strict=True)

    @staticmethod
    def _recorded_uuid(instance: Any) -> str | None:
        value = recorded_secret(instance)
        if value is None:
            return None
        secret_uuid = as_uuid(value)
        if secret_uuid is None:
            raise exception.InvalidVTPMConfig(
                f"server {instance.uuid} has system_metadata['{SYSMETA_KEY}']="
                f"{request.show(value)}, which is not a UUID"
            )
        return secret_uuid

    @staticmethod
    def _delete(target: client_mod.Target, secret_uuid: str, instance_uuid: str | None) -> bool:
        """One DELETE; False if Barbican no longer has the secret.

        ``Secret.delete`` rather than ``SecretManager.delete``: below
        microversion 1.2 the latter first GETs the secret to look for consumers.
        """
        try:
            with target.errors("delete", secret_uuid, instance_uuid):
                target.client.secrets.get(secret_uuid).delete()
        except exception.VTPMSecretNotFound:
            return False
        return True

    @staticmethod
    def _list_page(target: client_mod.Target, name: str, offset: int,
                   limit: int) -> Mapping[str, Any]:
        params = {"limit": limit, "offset": offset, "name": name}
        with target.errors("list"):
            try:
                body = client_mod.http(target.client).get("secrets", params=params)
            except ValueError:  # not JSON
                return {}
        return body if isinstance(body, Mapping) else {}

    def _set_owner_only_acl(self, target: client_mod.Target, secret_uuid: str, instance: Any,
                            context: vtpm_context.RequestContext) -> None:
        """Read ACL: no project-wide access; only the owner (and the creator) (D3).

        In deployment mode the service user created the secret and is the only
        one who needs it, so no user is listed. Any failure, including a reply
        that cannot be read, deletes the secret again before raising.
        """
        users = [] if rules.owned_by_service_user(target.mode) else [
            instance.user_id or context.user_id]
        self._set_read_acl(target, secret_uuid, users, instance.uuid)

    def _set_read_acl(self, target: client_mod.Target, secret_uuid: str, users: list[str],
                      instance_uuid: str) -> None:
        """Read ACL of a secret just created: ``users`` (and its creator) only.

        Any failure, including an unreadable reply, deletes the secret again
        before raising.
        """
        acl = target.client.acls.create(entity_ref=secret_uuid, ref_type="secret",
                                        users=users, project_access=False)
        try:
            with target.errors("set the ACL of", secret_uuid, instance_uuid):
                try:
                    acl.submit()
                except (ValueError, TypeError, AttributeError):  # 2xx, unreadable body
                    raise exception.KeyManagerUnavailable(
                        f"Barbican at {target.root} gave an unreadable answer to the ACL "
                        f"of secret {secret_uuid}") from None
        except exception.VTPMError:
            self._rollback(target, secret_uuid, instance_uuid)
            raise

    def _rollback(self, target: client_mod.Target, secret_uuid: str, instance_uuid: str) -> None:
        """Delete a secret whose creation could not be completed; never raises."""
        try:
            self._delete(target, secret_uuid, instance_uuid)
        except exception.VTPMError as exc:
            LOG.error("Could not delete half-created vTPM secret %s, delete it by hand: %s",
                      secret_uuid, exc, instance_uuid=instance_uuid)
        else:
            LOG.warning("Deleted half-created vTPM secret %s", secret_uuid,
                        instance_uuid=instance_uuid)

    def _store(self, target: client_mod.Target, name: str, payload: str, operation: str,
               what: str, instance_uuid: str, secret_type: str = SECRET_TYPE) -> str:
        """One POST of a new secret ``name``; its UUID.

        A reply without a usable ``secret_ref`` leaves nothing behind: the
        secret is looked up by name and deleted (:meth:`_delete_unreferenced`),
        then ``KeyManagerUnavailable`` says so (naming ``what`` was created).
        """
        secret = target.client.secrets.create(name=name, payload=payload,
                                              secret_type=secret_type)
        with target.errors(operation, instance_uuid=instance_uuid):
            try:
                secret_ref = secret.store()  # a str payload is sent as text/plain
            except (ValueError, TypeError, AttributeError):  # 2xx, body not a JSON object
                secret_ref = None
        secret_uuid = secret_uuid_from_ref(secret_ref)
        if secret_uuid is None:
            self._delete_unreferenced(target, name, instance_uuid)
            raise exception.KeyManagerUnavailable(
                f"Barbican at {target.root} created {what} for server {instance_uuid} "
                "but returned no usable secret_ref"
            )
        return secret_uuid

    def _named(self, target: client_mod.Target, name: str) -> list[str]:
        """The UUIDs of the secrets named exactly ``name`` that ``target``'s user
        created (one GET; nobody else's secret is ever among them).

        :raises VTPMError: the listing failed.
        """
        items = self._list_page(target, name, 0, 10).get("secrets")
        return [found for item in (items if isinstance(items, list) else [])
                if isinstance(item, Mapping) and item.get("name") == name
                and target.user_id is not None and item.get("creator_id") == target.user_id
                and (found := secret_uuid_from_ref(item.get("secret_ref"))) is not None]

    def _delete_unreferenced(self, target: client_mod.Target, name: str,
                             instance_uuid: str) -> None:
        """Find and delete the secret a POST created but did not name; never raises.

        Looked up by its exact name, and only secrets created by the same user
        (or service user) are deleted. That is safe: a name is the server's
        passphrase's (``create_vtpm_secret`` runs only when the server records
        no secret, and operations on one server are serialised) or a consent
        record's (unique to one grant), so a secret of that name and creator
        belongs to no one (at worst an older half-created one, also an
        orphan). One GET plus one DELETE per match.
        """
        try:
            named = self._named(target, name)
        except exception.VTPMError as exc:
            LOG.error("Could not look up the secret %r just created, delete it by "
                      "hand: %s", name, exc, instance_uuid=instance_uuid)
            return
        for secret_uuid in named:
            self._rollback(target, secret_uuid, instance_uuid)

    def _target(self, context: vtpm_context.RequestContext, mode: str) -> client_mod.Target:
        if rules.owned_by_service_user(mode):
            target = self._service_target()
            with keystone_errors():  # a Keystone failure is not blamed on Barbican
                target.session.get_auth_headers()  # cached token: no request
            return target
        auth = context.barbican_auth(self._conf)
        root = api_root(str(auth.endpoint))
        return client_mod.Target(client_mod.new_client(self._session, root, auth), self._session,
                       root, mode, context.user_id, self._timeout)

    def _service_target(self) -> client_mod.Target:
        """The ``[service_user]`` client (built once; authenticates at first use)."""
        if self._service is not None:
            return self._service
        session = client_mod.service_session(self._conf, self._timeout)
        with keystone_errors():
            endpoint = (self._conf.key_manager.barbican_endpoint
                        or client_mod.catalog_endpoint(session, self._conf))
            user_id = session.get_user_id()
        root = api_root(str(endpoint))
        self._service = client_mod.Target(
            client_mod.new_client(session, root, None), session, root,
            request.SECRET_DEPLOYMENT, user_id, self._timeout)
        return self._service

    # -- an owner's consent (vtpm_driver.model.consent) --------------------------------

    def get_consent(self, record_id: str,
                    context: vtpm_context.RequestContext | None = None) -> consent.Consent:
        """The consent record ``record_id``, read as ``[service_user]`` (its ACL lets
        it), or as ``context`` (its owner, to withdraw it).

        Two GETs: the secret's metadata (its creator, whom the record speaks
        for) and its payload. Nothing of the payload is logged or quoted.

        :raises VTPMSecretNotFound: no such record (or not readable as found).
        :raises VTPMSecretForbidden: the record's ACL does not name the reader.
        :raises KeyManagerUnavailable: Barbican or Keystone cannot be reached.
        :raises consent.ConsentError: not a consent record.
        """
        target = (self._service_target() if context is None
                  else self._target(context, request.SECRET_USER))
        with target.errors("read consent record", record_id):
            meta = client_mod.http(target.client).request(f"secrets/{record_id}", "GET").json()
            resp = client_mod.http(target.client).request(
                f"secrets/{record_id}/payload", "GET", headers={"Accept": "text/plain"})
        return consent.parse(record_id, resp.content.decode("utf-8", "replace"),
                             str(meta.get("creator_id") or ""))

    def consent_context(self, granted: consent.Consent) -> vtpm_context.RequestContext:
        """The owner's request context from the consent's application credential.

        One Keystone request. The token acts as the owner and, by its access
        rules, reads the server's passphrase and nothing else.

        :raises VTPMSecretForbidden: Keystone refused the credential (expired,
            or deleted by its owner: Keystone then answers 404).
        :raises KeyManagerUnavailable: Keystone could not be reached.
        """
        keystone = self._service_target().session.auth.auth_url  # [service_user]'s Keystone
        session = client_mod.BarbicanSession(
            auth=ks_v3.ApplicationCredential(
                auth_url=keystone,
                application_credential_id=granted.credential_id,
                application_credential_secret=granted.credential_secret),
            timeout=self._timeout, barbican_timeout=self._timeout,
            app_name=client_mod.APP_NAME)
        try:
            session.get_auth_headers()  # the one Keystone request; from_session reuses it
        except ks_exc.NotFound:
            raise exception.VTPMSecretForbidden(
                f"Keystone at {keystone} has no application credential "
                f"{granted.credential_id} of consent record {granted.record_id} any more "
                "(its owner deleted it)") from None
        except ks_exc.ClientException:
            pass  # mapped, once, where the context is made
        return vtpm_context.RequestContext.from_session(session)

    def store_consent(self, context: vtpm_context.RequestContext, server_uuid: str,
                      name: str, payload: str, readers: list[str]) -> str:
        """Store the owner's consent record ``name`` (unique to this grant) for
        ``server_uuid``; its UUID.

        One POST and one ACL PUT: readable by the owner and ``readers`` (the
        cloud's service user) only. Nothing is left behind when this raises
        (no usable ``secret_ref``, or an ACL that cannot be set); nothing of
        the payload (it holds a credential's secret) is logged or quoted.

        :raises VTPMSecretForbidden, KeyManagerUnavailable:
        """
        target = self._target(context, request.SECRET_USER)
        record_id = self._store(target, name, payload, "store the consent record of",
                                "a consent record", server_uuid)
        self._set_read_acl(target, record_id, [str(context.user_id), *readers], server_uuid)
        return record_id

    def delete_consent(self, context: vtpm_context.RequestContext, record_id: str) -> bool:
        """Delete the owner's consent record; False if it was gone. Idempotent."""
        return self._delete(self._target(context, request.SECRET_USER), record_id, None)

    def vtpm_secret_of(self, context: vtpm_context.RequestContext, server_uuid: str) -> str:
        """The UUID of the caller's ``user``-mode vTPM secret of ``server_uuid`` (one GET).

        :raises VTPMSecretNotFound: the caller has none for that server (a
            server in another mode needs no consent).
        :raises VTPMSecretForbidden, KeyManagerUnavailable:
        """
        found = self._named(self._target(context, request.SECRET_USER),
                            secret_name(server_uuid))
        if found:
            return found[0]
        raise exception.VTPMSecretNotFound(
            f"you have no vTPM secret of server {server_uuid} in the key manager: only a "
            "'user'-mode server's owner has one, and only such a server needs consent")

    # -- repair (``vtpm-driver audit --repair``): by secret UUID ------------------------

    def secret_project_access(self, context: vtpm_context.RequestContext, secret_uuid: str,
                              secret_security: str = request.SECRET_USER) -> bool:
        """Whether the secret's read ACL lets the whole project read it (one GET).

        :raises VTPMSecretNotFound, VTPMSecretForbidden, KeyManagerUnavailable:
        """
        target = self._target(context, request.check_mode(secret_security))
        with target.errors("read the ACL of", secret_uuid):
            try:
                body = client_mod.http(target.client).get(f"secrets/{secret_uuid}/acl")
            except ValueError:  # not JSON
                body = None
        read = body.get("read") if isinstance(body, Mapping) else None
        if not isinstance(read, Mapping):
            return True  # no read ACL: Barbican's default is project access
        return read.get("project-access", True) is not False

    def set_owner_only_acl(self, context: vtpm_context.RequestContext, secret_uuid: str,
                           user_id: str | None,
                           secret_security: str = request.SECRET_USER) -> None:
        """Read ACL: no project-wide access, only ``user_id`` (and the creator); one PUT.

        Idempotent. Unlike the ACL set at create, a failure deletes nothing.
        """
        target = self._target(context, request.check_mode(secret_security))
        acl = target.client.acls.create(entity_ref=secret_uuid, ref_type="secret",
                                        users=[user_id] if user_id else [],
                                        project_access=False)
        with target.errors("set the ACL of", secret_uuid):
            try:
                acl.submit()
            except (ValueError, TypeError, AttributeError):  # 2xx, unreadable body
                pass
        LOG.info("Set an owner-only ACL on vTPM secret %s", secret_uuid)

    def delete_secret(self, context: vtpm_context.RequestContext, secret_uuid: str,
                      secret_security: str = request.SECRET_USER) -> bool:
        """Delete a vTPM secret by UUID (an orphan); False if it was already gone."""
        target = self._target(context, request.check_mode(secret_security))
        deleted = self._delete(target, secret_uuid, None)
        if deleted:
            LOG.info("Deleted orphaned vTPM secret %s", secret_uuid)
        return deleted


def _is_vtpm_secret(item: object) -> bool:
    return isinstance(item, Mapping) and str(item.get("name") or "").startswith(
        SECRET_NAME_PREFIX)


def _vtpm_entry(item: Mapping[str, Any]) -> dict[str, str | None]:
    name = str(item.get("name"))
    return {
        "uuid": secret_uuid_from_ref(item.get("secret_ref")),
        "name": name,
        "instance_uuid": as_uuid(name[len(SECRET_NAME_PREFIX):]),
        "created": item.get("created"),
        "creator": item.get("creator_id"),
    }
