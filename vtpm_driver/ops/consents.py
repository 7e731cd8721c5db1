"""An owner's consent (:mod:`vtpm_driver.model.consent`): given, withdrawn, used.

:class:`Consents` is what the owner runs (``vtpm-driver server grant`` and
``revoke``): the same three things the owner can do with the ecosystem's own
tools (README): an expiring application credential that reads only the
server's passphrase, a record of it in the key manager readable by the owner
and the cloud's service user only, and the record named in the server's
metadata.

:func:`acting_context` is what the cloud does with it: whose context reads a
``user``-mode passphrase when the caller is not its owner. The owner's, by
their consent, when the server's metadata names a record that covers the
operation now; otherwise the caller's, so that the usual refusal
(``VTPMSecretForbidden``, before the guest is touched) follows. Every use of
a consent is logged with the server, the operation and the record's id, never
a token or the credential.
"""

from __future__ import annotations

import dataclasses
import datetime
import uuid
from typing import Any

from oslo_log import log as logging

from vtpm_driver import exception
from vtpm_driver.model import consent, request, rules

LOG = logging.getLogger(__name__)


def acting_context(key_manager: Any, instance: Any, context: Any, operation: str, *,
                   now: datetime.datetime | None = None) -> Any:
    """The context to read the server's passphrase with, for ``operation``.

    ``context`` itself when it may read it (not ``user`` mode, or the owner),
    or when no consent covers the operation (the caller then meets the usual
    refusal). Consent problems are logged, never raised: without a valid
    consent the behaviour is as without any.

    :raises KeyManagerUnavailable: Barbican or Keystone could not be asked.
    """
    if not _needs_owner(instance, context):
        return context
    record_id = consent.named_record(getattr(instance, "metadata", None))
    if record_id is None:
        return context
    label = f"server {instance.uuid}: {operation} by {_caller(context)}"
    try:
        granted = key_manager.get_consent(record_id)
    except (consent.ConsentError, exception.VTPMSecretNotFound,
            exception.VTPMSecretForbidden) as exc:
        LOG.warning("%s: consent record %s cannot be used (%s)", label, record_id, exc)
        return context
    reason = consent.refusal(granted, server=instance.uuid, owner=instance.user_id,
                             operation=operation,
                             now=now or datetime.datetime.now(datetime.UTC))
    if reason is not None:
        LOG.warning("%s: not by the owner's consent: %s", label, reason)
        return context
    try:
        owner = key_manager.consent_context(granted)
    except exception.VTPMSecretForbidden as exc:
        LOG.warning("%s: consent record %s: Keystone refused its credential (withdrawn "
                    "or expired): %s", label, record_id, exc)
        return context
    LOG.info("%s: by the owner's consent (record %s, until %s)", label, record_id,
             granted.expires_at.isoformat())
    return owner


def _needs_owner(instance: Any, context: Any) -> bool:
    cfg = rules.vtpm_of(instance)
    if cfg is None or cfg.secret_security != request.SECRET_USER:
        return False
    return not (getattr(context, "user_id", None) == instance.user_id
                and getattr(context, "auth_token", None))


def _caller(context: Any) -> str:
    return str(getattr(context, "user_name", None) or getattr(context, "user_id", None)
               or "the cloud (no user)")


@dataclasses.dataclass(frozen=True)
class Granted:
    """What :meth:`Consents.grant` did (no secret in it)."""

    server: str
    record_id: str
    credential_id: str
    operations: tuple[str, ...]
    expires_at: datetime.datetime
    replaced: str | None  # the record it withdrew, if the server named one


@dataclasses.dataclass(frozen=True)
class Withdrawn:
    """What :meth:`Consents.revoke` did."""

    server: str
    record_id: str | None  # None: the server named no consent
    credential_deleted: bool
    record_deleted: bool


class Consents:
    """The owner's side: give and withdraw consent for one of their servers.

    ``key_manager``: :class:`vtpm_driver.keymgr.barbican.KeyManager`;
    ``cloud``: :class:`vtpm_driver.cloud.OwnerCloud`, both acting as the owner.
    """

    def __init__(self, key_manager: Any, cloud: Any, context: Any) -> None:
        self._keymgr = key_manager
        self._cloud = cloud
        self._context = context

    def grant(self, server_id: str, operations: list[str], expires_at: datetime.datetime,
              cloud_users: list[str], *, now: datetime.datetime | None = None) -> Granted:
        """Consent to ``operations`` on ``server_id`` until ``expires_at``.

        Everything it needs is fetched first (the server, yours; its
        passphrase's UUID); then the credential, the record, the metadata,
        each undone again if a later one fails. A consent the server named
        before is withdrawn once the new one is in place.

        :raises ConsentError: no or unknown operations, an expiry not in the
            future, or no cloud user to read the record.
        :raises NotAuthorized: the server is not yours.
        :raises InstanceNotFound, VTPMSecretNotFound: no such server, or it has
            no ``user``-mode passphrase of yours.
        :raises KeyManagerUnavailable, OrchestratorUnavailable:
        """
        chosen = consent.check_operations(operations)
        now = now or datetime.datetime.now(datetime.UTC)
        if expires_at.tzinfo is None or expires_at <= now:
            raise consent.ConsentError(
                f"the consent must end in the future (asked: {expires_at.isoformat()})")
        if not cloud_users:
            raise consent.ConsentError(
                "name the cloud's service user that reads the consent (--cloud-user; your "
                "cloud's operator knows it: the user nova-compute's [service_user] logs in as)")
        server = self._owned(server_id)
        previous = consent.named_record(server.get("metadata"))
        secret_uuid = self._keymgr.vtpm_secret_of(self._context, server_id)
        # One name, unique to this grant, for the credential and the record that holds it.
        name = f"{consent.NAME_PREFIX}{server_id}-{uuid.uuid4().hex[:8]}"
        cred_id, cred_secret = self._cloud.create_application_credential(
            name, expires_at, consent.access_rules(secret_uuid))
        try:
            record_id = self._keymgr.store_consent(
                self._context, server_id, name,
                consent.record(server_id, chosen, expires_at, cred_id, cred_secret),
                list(cloud_users))
            try:
                self._cloud.set_server_metadata(server_id, consent.METADATA_KEY, record_id)
            except Exception:
                self._keymgr.delete_consent(self._context, record_id)
                raise
        except Exception:
            self._cloud.delete_application_credential(cred_id)
            raise
        LOG.info("server %s: consent record %s to %s until %s", server_id, record_id,
                 ", ".join(sorted(chosen)), expires_at.isoformat())
        if previous and previous != record_id:
            self._withdraw(server_id, previous)
        return Granted(server_id, record_id, cred_id, tuple(sorted(chosen)), expires_at,
                       previous)

    def revoke(self, server_id: str) -> Withdrawn:
        """Withdraw the consent the server names, at once. Idempotent.

        The credential goes first (Keystone refuses it from then on, the
        withdrawal proper), then the record, then the metadata item.

        :raises NotAuthorized: the server is not yours.
        :raises InstanceNotFound, KeyManagerUnavailable, OrchestratorUnavailable:
        """
        server = self._owned(server_id)
        record_id = consent.named_record(server.get("metadata"))
        if record_id is None:
            return Withdrawn(server_id, None, False, False)
        cred, record = self._withdraw(server_id, record_id)
        self._cloud.delete_server_metadata(server_id, consent.METADATA_KEY)
        return Withdrawn(server_id, record_id, cred, record)

    def _owned(self, server_id: str) -> dict[str, Any]:
        server = self._cloud.server(server_id)
        if server.get("user_id") != self._cloud.user_id:
            raise exception.NotAuthorized(
                f"server {server_id} belongs to user {server.get('user_id')}, not to you "
                f"({self._cloud.user_id}): only its owner can consent for it")
        return server

    def _withdraw(self, server_id: str, record_id: str) -> tuple[bool, bool]:
        """Delete a record's credential and the record; (credential, record) deleted."""
        try:
            granted = self._keymgr.get_consent(record_id, self._context)
        except (consent.ConsentError, exception.VTPMSecretNotFound,
                exception.VTPMSecretForbidden) as exc:
            LOG.warning("server %s: consent record %s: %s; nothing to withdraw there",
                        server_id, record_id, exc)
            return False, False
        cred = self._cloud.delete_application_credential(granted.credential_id)
        record = self._keymgr.delete_consent(self._context, record_id)
        LOG.info("server %s: consent record %s withdrawn", server_id, record_id)
        return cred, record
