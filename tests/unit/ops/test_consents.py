"""vtpm_driver.ops.consents: whose context reads a user-mode passphrase."""

from __future__ import annotations

import datetime
import logging
import uuid

import pytest

from vtpm_driver import exception
from vtpm_driver.keymgr.context import RequestContext
from vtpm_driver.model import consent
from vtpm_driver.model.server import Flavor, Instance
from vtpm_driver.ops import consents

NOW = datetime.datetime(2026, 12, 7, 12, 0, tzinfo=datetime.UTC)
OWNER = RequestContext(user_id="u-owner", project_id="p-a", auth_token="tok-owner")
ADMIN = RequestContext(user_id="u-admin", project_id="p-admin", auth_token="tok-admin",
                       user_name="admin")
CLOUD = RequestContext(user_id="", project_id="")  # Nova's admin context: no token


class Records:
    """The consent records a key manager would read, and the contexts it would make."""

    def __init__(self) -> None:
        self.records: dict[str, consent.Consent] = {}
        self.withdrawn: set[str] = set()
        self.used: list[str] = []

    def get_consent(self, record_id: str) -> consent.Consent:
        if record_id not in self.records:
            raise exception.VTPMSecretNotFound(f"no consent record {record_id}")
        return self.records[record_id]

    def consent_context(self, granted: consent.Consent) -> RequestContext:
        if granted.credential_id in self.withdrawn:
            raise exception.VTPMSecretForbidden("Keystone: no such application credential")
        self.used.append(granted.record_id)
        return RequestContext(user_id=granted.owner, project_id="p-a", auth_token="tok-cred")

    def add(self, server: Instance, operations=(consent.LIVE_MIGRATION,), owner="u-owner",
            for_server: str | None = None, hours: int = 1) -> str:
        record_id = str(uuid.uuid4())
        self.records[record_id] = consent.Consent(
            record_id=record_id, server=for_server or server.uuid, owner=owner,
            operations=frozenset(operations),
            expires_at=NOW + datetime.timedelta(hours=hours),
            credential_id=f"cred-{record_id}", credential_secret="cred-secret")
        server.metadata = {consent.METADATA_KEY: record_id}
        return record_id


def user_server(mode: str = "user") -> Instance:
    inst = Instance(name="vm", user_id="u-owner", project_id="p-a",
                    flavor=Flavor(extra_specs={"hw:tpm_version": "2.0",
                                               "hw:tpm_secret_security": mode}))
    inst.metadata = {}
    return inst


@pytest.fixture
def records() -> Records:
    return Records()


def acting(records: Records, inst: Instance, context: RequestContext,
           operation: str = consent.LIVE_MIGRATION) -> RequestContext:
    return consents.acting_context(records, inst, context, operation, now=NOW)


def test_the_owners_consent_makes_the_cloud_act_as_the_owner_and_says_so(records, caplog):
    caplog.set_level(logging.INFO)
    inst = user_server()
    record_id = records.add(inst)
    used = acting(records, inst, ADMIN)
    assert (used.user_id, used.auth_token) == ("u-owner", "tok-cred")
    assert records.used == [record_id]
    logged = caplog.text
    assert inst.uuid in logged and record_id in logged and "live-migration" in logged
    assert "cred-secret" not in logged and "tok-cred" not in logged


@pytest.mark.parametrize("case", ["none named", "another operation", "expired",
                                  "another server", "not the owner's", "withdrawn",
                                  "no such record"])
def test_without_a_covering_consent_the_caller_acts_and_meets_the_usual_refusal(
        records, case):
    inst = user_server()
    if case != "none named":
        record_id = records.add(
            inst,
            operations=(consent.EVACUATION,) if case == "another operation" else
            (consent.LIVE_MIGRATION,),
            hours=-1 if case == "expired" else 1,
            for_server="other-server" if case == "another server" else None,
            owner="u-admin" if case == "not the owner's" else "u-owner")
        if case == "withdrawn":
            records.withdrawn.add(f"cred-{record_id}")
        if case == "no such record":
            del records.records[record_id]
    assert acting(records, inst, ADMIN) is ADMIN
    assert records.used == []


@pytest.mark.parametrize(("mode", "context"), [("user", OWNER), ("host", ADMIN),
                                               ("deployment", CLOUD)])
def test_who_may_read_it_anyway_never_uses_a_consent(records, mode, context):
    inst = user_server(mode)
    records.add(inst)
    assert acting(records, inst, context) is context
    assert records.used == []


def test_the_clouds_own_context_without_a_token_uses_the_consent(records):
    inst = user_server()
    records.add(inst, operations=(consent.RESTART_ON_HOST_BOOT,))
    used = acting(records, inst, CLOUD, consent.RESTART_ON_HOST_BOOT)
    assert used.user_id == "u-owner"
