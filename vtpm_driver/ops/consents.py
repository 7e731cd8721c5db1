"""Whose context reads a ``user``-mode passphrase when the caller is not its owner.

The owner's, by their consent (:mod:`vtpm_driver.model.consent`), when the
server's metadata names a record that covers the operation now; otherwise the
caller's, so that the usual refusal (``VTPMSecretForbidden``, before the guest
is touched) follows. Every use of a consent is logged with the server, the
operation and the record's id, never a token or the credential.
"""

from __future__ import annotations

import datetime
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
