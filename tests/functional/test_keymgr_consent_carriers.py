"""Which Keystone delegation can carry an owner's consent to read one vTPM passphrase?

Evidence for issue 21 part 2, on the real Keystone + Barbican of
``tools/keymgr-stack.sh``. The owner stores a passphrase with vtpm-driver's
owner-only ACL (read: the owner only, project access off), as a ``user``-mode
server's passphrase is stored, and delegates in Keystone's two ways:

* an **application credential** of the owner's with access rules limited to
  ``GET`` of that one secret's payload on the key manager, expiring;
* a **trust** from the owner to the cloud's service user, with impersonation,
  the owner's ``member`` role, expiring.

Both tokens act as the owner, so Barbican's owner-only ACL lets both read the
passphrase. What else they open differs: the application credential's token
reads nothing else (another secret of the owner's, the owner's secret list,
Keystone), because Barbican's auth_token middleware, with its
``service_type = key-manager``, checks the access rules on every request; the
trust's token can do whatever the owner's member role can, in every service,
until it expires. Both stop working at expiry and when the owner deletes them.
"""

from __future__ import annotations

import datetime
import secrets
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import session as ks_session
from keystoneauth1.identity import v3

from tests.functional.fixtures_keymgr import BARBICAN_URL, KEYSTONE_URL

pytestmark = [pytest.mark.functional]

KEY_MANAGER = {"service_type": "key-manager", "interface": "public"}
IDENTITY = {"service_type": "identity", "interface": "public"}


def store_owner_only(owner: ks_session.Session) -> tuple[str, str]:
    """(secret uuid, payload) stored by the owner with vtpm-driver's owner-only ACL."""
    payload = secrets.token_urlsafe(24)
    ref = owner.post("/v1/secrets", endpoint_filter=KEY_MANAGER, json={
        "name": f"vtpm-consent-evidence-{uuid.uuid4()}", "payload": payload,
        "payload_content_type": "text/plain", "secret_type": "passphrase",
    }).json()["secret_ref"]
    secret_id = ref.rstrip("/").rsplit("/", 1)[-1]
    owner.put(f"/v1/secrets/{secret_id}/acl", endpoint_filter=KEY_MANAGER, json={
        "read": {"project-access": False, "users": [owner.get_user_id()]}})
    return secret_id, payload


def payload_as(sess: ks_session.Session, secret_id: str) -> tuple[int, str]:
    """HTTP status and body of ``GET /v1/secrets/{id}/payload`` with ``sess``'s token."""
    resp = sess.get(f"{BARBICAN_URL}/v1/secrets/{secret_id}/payload", raise_exc=False,
                    headers={"Accept": "text/plain"})
    return resp.status_code, resp.text


def status_as(sess: ks_session.Session, url: str) -> int:
    try:
        return sess.get(url, raise_exc=False).status_code
    except ks_exc.Unauthorized:
        return 401


def in_seconds(seconds: int) -> str:
    when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
    return when.strftime("%Y-%m-%dT%H:%M:%S.000000Z")


@pytest.fixture
def owner(keystone_session: Callable[..., ks_session.Session]) -> Iterator[ks_session.Session]:
    """The owner's session; every secret and delegation made in a test removed after it."""
    sess = keystone_session("owner")
    made: list[str] = []
    sess.made = made  # type: ignore[attr-defined]
    yield sess
    for url in reversed(made):
        sess.delete(url, raise_exc=False)


def remember(owner: ks_session.Session, url: str) -> str:
    owner.made.append(url)  # type: ignore[attr-defined]
    return url


def test_an_application_credential_limited_to_one_payload_reads_it_and_nothing_else(
        owner: ks_session.Session) -> None:
    secret_id, payload = store_owner_only(owner)
    remember(owner, f"{BARBICAN_URL}/v1/secrets/{secret_id}")
    other_id, _ = store_owner_only(owner)
    remember(owner, f"{BARBICAN_URL}/v1/secrets/{other_id}")
    user_id = owner.get_user_id()
    cred = owner.post(f"/users/{user_id}/application_credentials", endpoint_filter=IDENTITY,
                      json={"application_credential": {
                          "name": f"vtpm-consent-{uuid.uuid4()}",
                          "expires_at": in_seconds(600),
                          "access_rules": [{"service": "key-manager", "method": "GET",
                                            "path": f"/v1/secrets/{secret_id}/payload"}],
                      }}).json()["application_credential"]
    cred_url = remember(owner, f"{KEYSTONE_URL}/users/{user_id}/application_credentials/"
                               f"{cred['id']}")
    cloud = ks_session.Session(auth=v3.ApplicationCredential(
        auth_url=KEYSTONE_URL, application_credential_id=cred["id"],
        application_credential_secret=cred["secret"]))

    assert cloud.get_user_id() == user_id                      # acts as the owner
    assert payload_as(cloud, secret_id) == (200, payload)      # the owner-only ACL lets it
    assert payload_as(cloud, other_id)[0] == 401               # not another of the owner's
    assert status_as(cloud, f"{BARBICAN_URL}/v1/secrets") == 401        # nor the list
    assert status_as(cloud, f"{BARBICAN_URL}/v1/secrets/{secret_id}") == 401  # nor metadata
    assert status_as(cloud, f"{KEYSTONE_URL}/users/{user_id}/application_credentials") == 401

    owner.delete(cred_url)                                     # the owner revokes it
    with pytest.raises(ks_exc.NotFound):  # Keystone: no such application credential
        ks_session.Session(auth=v3.ApplicationCredential(
            auth_url=KEYSTONE_URL, application_credential_id=cred["id"],
            application_credential_secret=cred["secret"])).get_token()


def test_an_application_credential_stops_at_its_expiry(owner: ks_session.Session) -> None:
    secret_id, payload = store_owner_only(owner)
    remember(owner, f"{BARBICAN_URL}/v1/secrets/{secret_id}")
    user_id = owner.get_user_id()
    cred = owner.post(f"/users/{user_id}/application_credentials", endpoint_filter=IDENTITY,
                      json={"application_credential": {
                          "name": f"vtpm-consent-{uuid.uuid4()}", "expires_at": in_seconds(4),
                          "access_rules": [{"service": "key-manager", "method": "GET",
                                            "path": f"/v1/secrets/{secret_id}/payload"}],
                      }}).json()["application_credential"]
    remember(owner, f"{KEYSTONE_URL}/users/{user_id}/application_credentials/{cred['id']}")

    def fresh() -> ks_session.Session:
        return ks_session.Session(auth=v3.ApplicationCredential(
            auth_url=KEYSTONE_URL, application_credential_id=cred["id"],
            application_credential_secret=cred["secret"]))

    assert payload_as(fresh(), secret_id) == (200, payload)
    time.sleep(6)
    with pytest.raises(ks_exc.Unauthorized):
        fresh().get_token()


def trust_session(creds: dict[str, str], trust_id: str) -> ks_session.Session:
    """The trustee (``creds``) with a token scoped to ``trust_id``."""
    return ks_session.Session(auth=v3.Password(
        auth_url=creds["auth_url"], username=creds["username"], password=creds["password"],
        user_domain_name=creds["user_domain_name"], trust_id=trust_id))


def test_a_trust_to_the_service_user_reads_it_and_everything_else_of_the_owner(
        owner: ks_session.Session, clouds: dict[str, dict[str, str]],
        keystone_session: Callable[..., ks_session.Session]) -> None:
    secret_id, payload = store_owner_only(owner)
    remember(owner, f"{BARBICAN_URL}/v1/secrets/{secret_id}")
    other_id, other_payload = store_owner_only(owner)
    remember(owner, f"{BARBICAN_URL}/v1/secrets/{other_id}")
    service = keystone_session("service")
    trust = owner.post("/OS-TRUST/trusts", endpoint_filter=IDENTITY, json={"trust": {
        "trustor_user_id": owner.get_user_id(), "trustee_user_id": service.get_user_id(),
        "project_id": owner.get_project_id(), "impersonation": True,
        "roles": [{"name": "member"}], "expires_at": in_seconds(600),
    }}).json()["trust"]
    trust_url = remember(owner, f"{KEYSTONE_URL}/OS-TRUST/trusts/{trust['id']}")
    cloud = trust_session(clouds["service"], trust["id"])

    assert cloud.get_user_id() == owner.get_user_id()          # impersonation: the owner
    assert payload_as(cloud, secret_id) == (200, payload)
    # ... and everything else the owner's member role opens, anywhere:
    assert payload_as(cloud, other_id) == (200, other_payload)
    assert status_as(cloud, f"{BARBICAN_URL}/v1/secrets") == 200

    owner.delete(trust_url)                                    # the owner revokes it
    with pytest.raises(ks_exc.Unauthorized):  # Keystone: the trust is gone
        trust_session(clouds["service"], trust["id"]).get_token()
