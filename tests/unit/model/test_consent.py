"""vtpm_driver.model.consent: the owner's consent record and what it covers."""

from __future__ import annotations

import datetime
import json

import pytest

from vtpm_driver.model import consent

NOW = datetime.datetime(2026, 12, 7, 12, 0, tzinfo=datetime.UTC)
LATER = NOW + datetime.timedelta(hours=1)
SERVER = "8d2f0d1c-6c3e-4f0a-9a52-2b1e0d0f6a11"
SECRET = "s3cr3t-credential"


def stored(operations=(consent.LIVE_MIGRATION,), server=SERVER, expires_at=LATER,
           creator="owner-id") -> consent.Consent:
    payload = consent.record(server, frozenset(operations), expires_at, "cred-id", SECRET)
    return consent.parse("rec-1", payload, creator)


def test_a_record_reads_back_as_written_and_never_shows_its_secret():
    c = stored((consent.LIVE_MIGRATION, consent.RESTART_ON_HOST_BOOT))
    assert (c.server, c.owner, c.credential_id) == (SERVER, "owner-id", "cred-id")
    assert c.operations == {consent.LIVE_MIGRATION, consent.RESTART_ON_HOST_BOOT}
    assert c.expires_at == LATER
    assert c.credential_secret == SECRET
    assert SECRET not in repr(c)


def test_it_covers_exactly_its_server_owner_operations_and_time():
    c = stored()
    assert consent.refusal(c, server=SERVER, owner="owner-id",
                           operation=consent.LIVE_MIGRATION, now=NOW) is None
    cases = {
        "another server": dict(server="other", owner="owner-id",
                               operation=consent.LIVE_MIGRATION, now=NOW),
        "another owner": dict(server=SERVER, owner="someone",
                              operation=consent.LIVE_MIGRATION, now=NOW),
        "another operation": dict(server=SERVER, owner="owner-id",
                                  operation=consent.EVACUATION, now=NOW),
        "expired": dict(server=SERVER, owner="owner-id", operation=consent.LIVE_MIGRATION,
                        now=LATER),
    }
    reasons = {name: consent.refusal(c, **kw) for name, kw in cases.items()}
    assert "not other" in reasons["another server"]
    assert "not by the server's owner someone" in reasons["another owner"]
    assert "covers live-migration, not evacuation" in reasons["another operation"]
    assert "expired at 2026-12-07T13:00:00Z" in reasons["expired"]
    for reason in reasons.values():
        assert "rec-1" in reason and SECRET not in reason


@pytest.mark.parametrize("payload", [
    "not json", "[]", json.dumps({"version": 2}),
    json.dumps({"version": 1, "server": SERVER}),
    json.dumps({"version": 1, "server": SERVER, "operations": ["reboot-everything"],
                "expires_at": "2026-12-07T13:00:00Z", "application_credential_id": "c",
                "application_credential_secret": SECRET}),
    json.dumps({"version": 1, "server": SERVER, "operations": [consent.HARD_REBOOT],
                "expires_at": "2026-12-07T13:00:00", "application_credential_id": "c",
                "application_credential_secret": SECRET}),
])
def test_anything_else_is_refused_without_quoting_it(payload):
    with pytest.raises(consent.ConsentError) as info:
        consent.parse("rec-9", payload, "owner-id")
    assert "rec-9" in str(info.value)
    assert SECRET not in str(info.value)


def test_operations_are_checked_by_name():
    assert consent.check_operations([consent.EVACUATION]) == {consent.EVACUATION}
    with pytest.raises(consent.ConsentError, match="unknown operation 'migrate'"):
        consent.check_operations(["migrate"])
    with pytest.raises(consent.ConsentError, match="at least one"):
        consent.check_operations([])


def test_access_rules_open_one_secret_for_reading_only():
    rules = consent.access_rules("abc")
    assert {r["method"] for r in rules} == {"GET"}
    assert {r["service"] for r in rules} == {"key-manager"}
    assert {r["path"] for r in rules} == {"/v1/secrets/abc", "/v1/secrets/abc/payload"}


def test_the_server_metadata_names_the_record():
    assert consent.named_record({consent.METADATA_KEY: " rec-1 "}) == "rec-1"
    assert consent.named_record({}) is None
    assert consent.named_record(None) is None
    assert consent.named_record({consent.METADATA_KEY: ""}) is None
