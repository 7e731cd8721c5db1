"""An owner's consent to named operations on one ``user``-mode server (issue 21). Pure.

A ``user``-mode server's passphrase is readable by its owner only (owner-only
ACL), so the cloud cannot restart it after a host reboot, live-migrate,
cold-migrate, evacuate or hard-reboot it for anyone else. Instead of opening
the secret to admins, the owner may consent, for one server, to named
operations (:data:`OPERATIONS`) until a time, and withdraw that at any time.

The carrier is Keystone's own: an **application credential** of the owner's,
expiring, whose access rules allow ``GET`` of that server's passphrase (its
metadata and payload, :func:`access_rules`) on the key manager and nothing
else. Its token acts as the owner, so the owner-only ACL lets it read that one
passphrase; Barbican's auth_token middleware refuses it everywhere else
(``tests/functional/test_keymgr_consent_carriers.py`` shows both, and that a
trust to the service user would open everything of the owner's instead).
Keystone enforces its expiry and its deletion (the owner's withdrawal).

The **record** the cloud reads is a key-manager secret the owner stores
(:func:`record`): the server, the operations, the expiry and the credential.
The owner authors it; only the owner and the cloud's service user may read it
(its ACL), and nobody can change a stored payload. The server's metadata names
it (:data:`METADATA_KEY`), which anyone with the server may edit, so the record
is believed only when its creator is the server's owner and it names that
server (:func:`refusal`): pointing the metadata at another record gains nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Any

from vtpm_driver import exception

#: The operations an owner may consent to, by name.
RESTART_ON_HOST_BOOT = "restart-on-host-boot"
HARD_REBOOT = "hard-reboot"
LIVE_MIGRATION = "live-migration"
COLD_MIGRATION = "cold-migration"
EVACUATION = "evacuation"
OPERATIONS = (RESTART_ON_HOST_BOOT, HARD_REBOOT, LIVE_MIGRATION, COLD_MIGRATION, EVACUATION)

#: Server metadata key naming the consent record (its key-manager secret UUID).
METADATA_KEY = "vtpm_consent"
#: ``name`` of the record's secret and of the application credential.
NAME_PREFIX = "vtpm-consent-"
RECORD_VERSION = 1


class ConsentError(exception.VTPMError, ValueError):
    """A consent record that cannot be read, or a consent that cannot be given as asked."""


@dataclasses.dataclass(frozen=True)
class Consent:
    """One owner's consent, for one server, to ``operations`` until ``expires_at``."""

    record_id: str
    server: str
    owner: str
    operations: frozenset[str]
    expires_at: datetime.datetime
    credential_id: str
    credential_secret: str = dataclasses.field(repr=False)

    def expired(self, now: datetime.datetime) -> bool:
        return now >= self.expires_at


def access_rules(secret_uuid: str) -> list[dict[str, str]]:
    """The application credential's access rules: that one secret, read only."""
    return [{"service": "key-manager", "method": "GET", "path": f"/v1/secrets/{secret_uuid}"},
            {"service": "key-manager", "method": "GET",
             "path": f"/v1/secrets/{secret_uuid}/payload"}]


def check_operations(operations: list[str] | tuple[str, ...]) -> frozenset[str]:
    """The operations, each one of :data:`OPERATIONS`.

    :raises ConsentError: none given, or one unknown (named, with the allowed ones).
    """
    if not operations:
        raise ConsentError(f"name at least one operation: {', '.join(OPERATIONS)}")
    unknown = [op for op in operations if op not in OPERATIONS]
    if unknown:
        raise ConsentError(f"unknown operation {unknown[0]!r}: allowed are "
                           f"{', '.join(OPERATIONS)}")
    return frozenset(operations)


def record(server: str, operations: frozenset[str], expires_at: datetime.datetime,
           credential_id: str, credential_secret: str) -> str:
    """The record's payload (JSON) the owner stores; :func:`parse` reads it back."""
    return json.dumps({
        "version": RECORD_VERSION, "server": server, "operations": sorted(operations),
        "expires_at": _stamp(expires_at), "application_credential_id": credential_id,
        "application_credential_secret": credential_secret,
    }, sort_keys=True)


def parse(record_id: str, payload: str, creator: str) -> Consent:
    """The consent in a record's payload, stored by ``creator``.

    :raises ConsentError: not a consent record of this version (never quoting it:
        it holds a credential's secret).
    """
    try:
        data = json.loads(payload)
        if data.get("version") != RECORD_VERSION:
            raise ConsentError(f"consent record {record_id} has version "
                               f"{data.get('version')!r}, not {RECORD_VERSION}")
        return Consent(
            record_id=record_id, server=str(data["server"]), owner=creator,
            operations=check_operations(list(data["operations"])),
            expires_at=_parse_stamp(str(data["expires_at"])),
            credential_id=str(data["application_credential_id"]),
            credential_secret=str(data["application_credential_secret"]))
    except ConsentError as exc:
        if record_id in str(exc):
            raise
        raise ConsentError(f"consent record {record_id}: {exc}") from None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ConsentError(f"consent record {record_id} is not a vtpm-driver consent "
                           f"({type(exc).__name__})") from None


def refusal(consent: Consent, *, server: str, owner: str, operation: str,
            now: datetime.datetime) -> str | None:
    """Why ``consent`` does not let the cloud do ``operation`` on ``server``; None if it does."""
    if consent.owner != owner:
        return (f"consent record {consent.record_id} was stored by {consent.owner}, not by "
                f"the server's owner {owner}")
    if consent.server != server:
        return f"consent record {consent.record_id} is for server {consent.server}, not {server}"
    if operation not in consent.operations:
        return (f"consent record {consent.record_id} covers "
                f"{', '.join(sorted(consent.operations))}, not {operation}")
    if consent.expired(now):
        return f"consent record {consent.record_id} expired at {_stamp(consent.expires_at)}"
    return None


#: What an audit says of a consent (:func:`standing`).
IN_FORCE, EXPIRED, UNUSABLE = "in force", "expired", "unusable"


def standing(consent: Consent, *, server: str, owner: str,
             now: datetime.datetime) -> tuple[str, str]:
    """Whether ``consent``, named by ``server`` of ``owner``, is in force: ``(state, why)``.

    Unusable: not the owner's, or for another server (the metadata points at a
    record nobody may use there). The credential itself is Keystone's to judge.
    """
    if consent.owner != owner or consent.server != server:
        reason = refusal(consent, server=server, owner=owner,
                         operation=min(consent.operations), now=now)
        return UNUSABLE, str(reason)
    if consent.expired(now):
        return EXPIRED, f"expired at {_stamp(consent.expires_at)}"
    return IN_FORCE, (f"{', '.join(sorted(consent.operations))} until "
                      f"{_stamp(consent.expires_at)}")


def named_record(metadata: Any) -> str | None:
    """The record id the server's metadata names, or None."""
    value = (metadata or {}).get(METADATA_KEY)
    return str(value).strip() or None if value else None


def _stamp(when: datetime.datetime) -> str:
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_stamp(text: str) -> datetime.datetime:
    when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if when.tzinfo is None:
        raise ValueError("expires_at has no time zone")
    return when
