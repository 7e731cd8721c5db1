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


# -- the owner's side: grant and revoke ---------------------------------------------------

SERVER = "6f0d5f5e-6d2a-4f43-9d7e-0c6c1d1e2a10"
NOVA_USER = "u-nova"


class OwnerCloud:
    """Keystone's application credentials and one Nova server, as the owner sees them."""

    user_id = "u-owner"

    def __init__(self, owner: str = "u-owner", fail: str | None = None) -> None:
        self.servers = {SERVER: {"id": SERVER, "user_id": owner, "metadata": {}}}
        self.credentials: dict[str, tuple] = {}
        self.fail = fail

    def server(self, server_id):
        if server_id not in self.servers:
            raise exception.InstanceNotFound(f"Nova answered HTTP 404 to show {server_id}")
        return self.servers[server_id]

    def create_application_credential(self, name, expires_at, access_rules):
        cred_id = f"cred-{len(self.credentials)}"
        self.credentials[cred_id] = (name, expires_at, access_rules)
        return cred_id, f"secret-of-{cred_id}"

    def delete_application_credential(self, credential_id):
        return self.credentials.pop(credential_id, None) is not None

    def set_server_metadata(self, server_id, key, value):
        if self.fail == "metadata":
            raise exception.OrchestratorUnavailable("Nova answered HTTP 503")
        self.servers[server_id]["metadata"][key] = value

    def delete_server_metadata(self, server_id, key):
        return self.servers[server_id]["metadata"].pop(key, None) is not None


class OwnerRecords(Records):
    """:class:`Records` as the owner's key manager: stores, reads and deletes records."""

    def __init__(self, passphrase_of: dict[str, str] | None = None, fail: bool = False) -> None:
        super().__init__()
        self.passphrase_of = passphrase_of if passphrase_of is not None else {SERVER: "s-1"}
        self.readers: dict[str, list[str]] = {}
        self.fail = fail

    def vtpm_secret_of(self, context, server_uuid):
        if server_uuid not in self.passphrase_of:
            raise exception.VTPMSecretNotFound(f"no vTPM secret of server {server_uuid}")
        return self.passphrase_of[server_uuid]

    def store_consent(self, context, server_uuid, payload, readers):
        if self.fail:
            raise exception.KeyManagerUnavailable("Barbican answered HTTP 503")
        record_id = str(uuid.uuid4())
        self.records[record_id] = consent.parse(record_id, payload, context.user_id)
        self.readers[record_id] = [context.user_id, *readers]
        return record_id

    def get_consent(self, record_id, context=None):
        return super().get_consent(record_id)

    def delete_consent(self, context, record_id):
        return self.records.pop(record_id, None) is not None


def owner_side(cloud=None, records=None):
    cloud = cloud or OwnerCloud()
    records = records or OwnerRecords()
    return consents.Consents(records, cloud, OWNER), cloud, records


LATER = NOW + datetime.timedelta(hours=2)


def test_a_grant_leaves_a_credential_for_that_passphrase_a_record_and_the_metadata():
    service, cloud, records = owner_side()
    granted = service.grant(SERVER, [consent.LIVE_MIGRATION, consent.HARD_REBOOT], LATER,
                            [NOVA_USER], now=NOW)
    (cred_id, (_name, expires, rules)), = cloud.credentials.items()
    assert (granted.credential_id, expires) == (cred_id, LATER)
    assert rules == consent.access_rules("s-1")            # that one passphrase, read only
    record = records.records[granted.record_id]
    assert (record.server, record.owner, record.credential_id) == (SERVER, "u-owner", cred_id)
    assert record.operations == {consent.LIVE_MIGRATION, consent.HARD_REBOOT}
    assert records.readers[granted.record_id] == ["u-owner", NOVA_USER]
    assert cloud.servers[SERVER]["metadata"] == {consent.METADATA_KEY: granted.record_id}
    assert "secret-of" not in repr(granted)


def test_a_new_grant_withdraws_the_one_before():
    service, cloud, records = owner_side()
    first = service.grant(SERVER, [consent.EVACUATION], LATER, [NOVA_USER], now=NOW)
    second = service.grant(SERVER, [consent.LIVE_MIGRATION], LATER, [NOVA_USER], now=NOW)
    assert second.replaced == first.record_id
    assert list(records.records) == [second.record_id]
    assert list(cloud.credentials) == [second.credential_id]


@pytest.mark.parametrize("fail", ["record", "metadata"])
def test_a_grant_that_fails_half_way_leaves_nothing(fail):
    service, cloud, records = owner_side(OwnerCloud(fail="metadata" if fail == "metadata"
                                                    else None),
                                         OwnerRecords(fail=fail == "record"))
    with pytest.raises(exception.VTPMError):
        service.grant(SERVER, [consent.LIVE_MIGRATION], LATER, [NOVA_USER], now=NOW)
    assert (cloud.credentials, records.records) == ({}, {})
    assert cloud.servers[SERVER]["metadata"] == {}


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"operations": []}, "at least one operation"),
    ({"operations": ["reboot"]}, "unknown operation 'reboot'"),
    ({"expires_at": NOW}, "must end in the future"),
    ({"cloud_users": []}, "--cloud-user"),
])
def test_a_grant_that_cannot_be_given_as_asked_creates_nothing(kwargs, match):
    service, cloud, records = owner_side()
    args = {"operations": [consent.LIVE_MIGRATION], "expires_at": LATER,
            "cloud_users": [NOVA_USER], **kwargs}
    with pytest.raises(consent.ConsentError, match=match):
        service.grant(SERVER, now=NOW, **args)
    assert (cloud.credentials, records.records) == ({}, {})


@pytest.mark.parametrize(("cloud", "records", "error"), [
    (OwnerCloud(owner="u-someone"), None, exception.NotAuthorized),
    (None, OwnerRecords(passphrase_of={}), exception.VTPMSecretNotFound),
])
def test_only_the_owner_of_a_user_mode_server_can_consent(cloud, records, error):
    service, cloud, records = owner_side(cloud, records)
    with pytest.raises(error):
        service.grant(SERVER, [consent.LIVE_MIGRATION], LATER, [NOVA_USER], now=NOW)
    assert (cloud.credentials, records.records) == ({}, {})


def test_revoke_deletes_the_credential_the_record_and_the_metadata_and_is_idempotent():
    service, cloud, records = owner_side()
    granted = service.grant(SERVER, [consent.LIVE_MIGRATION], LATER, [NOVA_USER], now=NOW)
    withdrawn = service.revoke(SERVER)
    assert withdrawn == consents.Withdrawn(SERVER, granted.record_id, True, True)
    assert (cloud.credentials, records.records) == ({}, {})
    assert cloud.servers[SERVER]["metadata"] == {}
    assert service.revoke(SERVER) == consents.Withdrawn(SERVER, None, False, False)


def test_revoke_of_a_record_that_is_gone_still_clears_the_metadata():
    service, cloud, _records = owner_side()
    cloud.servers[SERVER]["metadata"][consent.METADATA_KEY] = "not-there"
    assert service.revoke(SERVER) == consents.Withdrawn(SERVER, "not-there", False, False)
    assert cloud.servers[SERVER]["metadata"] == {}
