"""vtpm_driver.ops.consents: whose context reads a user-mode passphrase."""

from __future__ import annotations

import datetime
import logging
import uuid
from collections.abc import Iterator

import pytest

from tests.fakes.cloud import OWNER as OWNER_IDS
from tests.fakes.cloud import SERVICE, FakeCloud, make_conf
from tests.fakes.keymgr import FakeKeyManager
from vtpm_driver import exception
from vtpm_driver.cloud import OwnerCloud
from vtpm_driver.keymgr import barbican
from vtpm_driver.keymgr.context import RequestContext
from vtpm_driver.model import consent
from vtpm_driver.model.server import Flavor, Instance
from vtpm_driver.ops import consents

NOW = datetime.datetime(2026, 12, 7, 12, 0, tzinfo=datetime.UTC)
OWNER = RequestContext(user_id="u-owner", project_id="p-a", auth_token="tok-owner")
ADMIN = RequestContext(user_id="u-admin", project_id="p-admin", auth_token="tok-admin",
                       user_name="admin")
CLOUD = RequestContext(user_id="", project_id="")  # Nova's admin context: no token


def user_server(mode: str = "user") -> Instance:
    inst = Instance(name="vm", user_id="u-owner", project_id="p-a",
                    flavor=Flavor(extra_specs={"hw:tpm_version": "2.0",
                                               "hw:tpm_secret_security": mode}))
    inst.metadata = {}
    return inst


@pytest.fixture
def records() -> FakeKeyManager:
    return FakeKeyManager()


def add(records: FakeKeyManager, inst: Instance, hours: int = 1, **kwargs) -> str:
    return records.add_consent(inst, expires_at=NOW + datetime.timedelta(hours=hours),
                               **kwargs)


def acting(records: FakeKeyManager, inst: Instance, context: RequestContext,
           operation: str = consent.LIVE_MIGRATION) -> RequestContext:
    return consents.acting_context(records, inst, context, operation, now=NOW)


def test_the_owners_consent_makes_the_cloud_act_as_the_owner_and_says_so(records, caplog):
    caplog.set_level(logging.INFO)
    inst = user_server()
    record_id = add(records, inst)
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
        record_id = add(
            records, inst,
            operations=(consent.EVACUATION,) if case == "another operation" else
            (consent.LIVE_MIGRATION,),
            hours=-1 if case == "expired" else 1,
            for_server="other-server" if case == "another server" else None,
            owner="u-admin" if case == "not the owner's" else "u-owner")
        if case == "withdrawn":
            records.withdrawn.add(f"cred-{record_id}")
        if case == "no such record":
            del records.consents[record_id]
    assert acting(records, inst, ADMIN) is ADMIN
    assert records.used == []


@pytest.mark.parametrize(("mode", "context"), [("user", OWNER), ("host", ADMIN),
                                               ("deployment", CLOUD)])
def test_who_may_read_it_anyway_never_uses_a_consent(records, mode, context):
    inst = user_server(mode)
    add(records, inst)
    assert acting(records, inst, context) is context
    assert records.used == []


def test_the_clouds_own_context_without_a_token_uses_the_consent(records):
    inst = user_server()
    add(records, inst, operations=(consent.RESTART_ON_HOST_BOOT,))
    used = acting(records, inst, CLOUD, consent.RESTART_ON_HOST_BOOT)
    assert used.user_id == "u-owner"


# -- the owner's side: grant and revoke, against the fake cloud over HTTP -----------------

SERVER = "6f0d5f5e-6d2a-4f43-9d7e-0c6c1d1e2a10"
LATER = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=2)


@pytest.fixture
def cloud() -> Iterator[FakeCloud]:
    with FakeCloud() as fake:
        fake.servers[SERVER] = {"id": SERVER, "user_id": OWNER_IDS[0], "metadata": {}}
        yield fake


def as_owner(cloud: FakeCloud, *, with_passphrase: bool = True
             ) -> tuple[consents.Consents, barbican.KeyManager, RequestContext]:
    """The owner's Consents over ``cloud``; their server's passphrase stored first."""
    owner = RequestContext(user_id=OWNER_IDS[0], project_id=OWNER_IDS[1],
                           auth_token=OWNER_IDS[2], service_catalog=cloud.catalog())
    keymgr = barbican.KeyManager(make_conf(cloud, service_user=True))
    if with_passphrase:
        keymgr.create_vtpm_secret(owner, Instance(uuid=SERVER, name="vm",
                                                  user_id=OWNER_IDS[0],
                                                  project_id=OWNER_IDS[1]), "user")
    return consents.Consents(keymgr, OwnerCloud(owner), owner), keymgr, owner


def passphrase_uuid(cloud: FakeCloud) -> str:
    (found,) = [sid for sid, s in cloud.secrets.items()
                if s.name == barbican.secret_name(SERVER)]
    return found


def test_a_grant_gives_the_cloud_that_one_passphrase_and_a_revoke_takes_it_back(cloud):
    service, keymgr, _owner = as_owner(cloud)
    granted = service.grant(SERVER, [consent.LIVE_MIGRATION, consent.HARD_REBOOT], LATER,
                            [SERVICE[0]])
    body = cloud.app_cred_bodies[granted.credential_id]
    assert body["access_rules"] == consent.access_rules(passphrase_uuid(cloud))
    assert body["unrestricted"] is False
    record = cloud.secrets[granted.record_id]
    assert (record.acl_users, record.project_access) == ([OWNER_IDS[0], SERVICE[0]], False)
    assert cloud.servers[SERVER]["metadata"] == {consent.METADATA_KEY: granted.record_id}
    assert cloud.app_creds[granted.credential_id] not in repr(granted)
    # the cloud's side: the service user reads the record, logs in as the owner with it
    read = keymgr.get_consent(granted.record_id)
    assert (read.server, read.owner, read.operations) == (
        SERVER, OWNER_IDS[0], {consent.LIVE_MIGRATION, consent.HARD_REBOOT})
    assert keymgr.consent_context(read).user_id == OWNER_IDS[0]

    withdrawn = service.revoke(SERVER)
    assert withdrawn == consents.Withdrawn(SERVER, granted.record_id, True, True)
    assert granted.record_id not in cloud.secrets and cloud.app_creds == {}
    assert cloud.servers[SERVER]["metadata"] == {}
    with pytest.raises(exception.VTPMSecretForbidden):
        keymgr.consent_context(read)                 # Keystone refuses it from now on
    assert service.revoke(SERVER) == consents.Withdrawn(SERVER, None, False, False)


def test_a_new_grant_withdraws_the_one_before(cloud):
    service, _keymgr, _owner = as_owner(cloud)
    first = service.grant(SERVER, [consent.EVACUATION], LATER, [SERVICE[0]])
    second = service.grant(SERVER, [consent.LIVE_MIGRATION], LATER, [SERVICE[0]])
    assert second.replaced == first.record_id
    assert first.record_id not in cloud.secrets and second.record_id in cloud.secrets
    assert list(cloud.app_creds) == [second.credential_id]


@pytest.mark.parametrize("failing", [("POST", r"/v1/secrets/?$"), ("PUT", r"/acl$"),
                                     ("PUT", r"/metadata/")])
def test_a_grant_that_fails_half_way_leaves_nothing(cloud, failing):
    service, _keymgr, _owner = as_owner(cloud)
    before = set(cloud.secrets)
    cloud.fail(*failing, status=503)
    with pytest.raises(exception.VTPMError):
        service.grant(SERVER, [consent.LIVE_MIGRATION], LATER, [SERVICE[0]])
    assert (set(cloud.secrets), cloud.app_creds) == (before, {})
    assert cloud.servers[SERVER]["metadata"] == {}


def test_a_record_barbican_stored_without_a_usable_reference_is_deleted_again(cloud):
    """The record holds the credential's secret: none may be left behind, and a consent
    in force before (another record of the same server) stays as it was."""
    service, _keymgr, _owner = as_owner(cloud)
    first = service.grant(SERVER, [consent.EVACUATION], LATER, [SERVICE[0]])
    before = set(cloud.secrets)
    cloud.fail("POST", r"/v1/secrets/?$", 0, reply={})       # stored; no secret_ref said
    with pytest.raises(exception.KeyManagerUnavailable,
                       match=r"created a consent record for server .* no usable secret_ref"):
        service.grant(SERVER, [consent.LIVE_MIGRATION], LATER, [SERVICE[0]])
    assert set(cloud.secrets) == before and list(cloud.app_creds) == [first.credential_id]
    assert cloud.servers[SERVER]["metadata"] == {consent.METADATA_KEY: first.record_id}


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"operations": []}, "at least one operation"),
    ({"operations": ["reboot"]}, "unknown operation 'reboot'"),
    ({"expires_at": NOW}, "must end in the future"),
    ({"cloud_users": []}, "--cloud-user"),
])
def test_a_grant_that_cannot_be_given_as_asked_creates_nothing(cloud, kwargs, match):
    service, _keymgr, _owner = as_owner(cloud)
    requests = len(cloud.requests)
    args = {"operations": [consent.LIVE_MIGRATION], "expires_at": LATER,
            "cloud_users": [SERVICE[0]], **kwargs}
    with pytest.raises(consent.ConsentError, match=match):
        service.grant(SERVER, **args)
    assert len(cloud.requests) == requests


def test_only_the_owner_of_a_user_mode_server_can_consent(cloud):
    cloud.servers[SERVER]["user_id"] = "u-someone"         # Nova: not the caller's
    service, _keymgr, _owner = as_owner(cloud)
    with pytest.raises(exception.InstanceNotFound):
        service.grant(SERVER, [consent.LIVE_MIGRATION], LATER, [SERVICE[0]])
    cloud.servers[SERVER]["user_id"] = OWNER_IDS[0]
    service, _keymgr, _owner = as_owner(cloud, with_passphrase=False)
    cloud.secrets.clear()                                   # no user-mode passphrase
    with pytest.raises(exception.VTPMSecretNotFound, match="only a 'user'-mode server"):
        service.grant(SERVER, [consent.LIVE_MIGRATION], LATER, [SERVICE[0]])
    assert cloud.app_creds == {}


def test_revoke_of_a_record_that_is_gone_still_clears_the_metadata(cloud):
    service, _keymgr, _owner = as_owner(cloud)
    cloud.servers[SERVER]["metadata"][consent.METADATA_KEY] = str(uuid.uuid4())
    withdrawn = service.revoke(SERVER)
    assert (withdrawn.credential_deleted, withdrawn.record_deleted) == (False, False)
    assert cloud.servers[SERVER]["metadata"] == {}
