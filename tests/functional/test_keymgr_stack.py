"""The local Keystone + Barbican stack behaves as the other functional tests assume.

Owner stores and reads back a secret, another project's member gets 403, the
credentials files are complete and private, and the access-log counter sees
exactly the requests made.
"""

from __future__ import annotations

import secrets
import stat
import uuid

import pytest
from barbicanclient import client as barbican_client
from barbicanclient import exceptions as barbican_exc

from tests.functional.fixtures_keymgr import CLOUD_NAMES, AccessLogCounter

# Counts the shared Keystone/Barbican's requests or lists every secret: run alone.
pytestmark = [pytest.mark.functional, pytest.mark.alone]

KEY_MANAGER = {"service_type": "key-manager", "interface": "public"}


def _secret_uuid(ref: str) -> str:
    return ref.rstrip("/").rsplit("/", 1)[-1]


@pytest.fixture
def owner_secret(keystone_session):
    """(ref, payload) of a passphrase the owner stored; deleted afterwards."""
    client = barbican_client.Client(session=keystone_session("owner"))
    payload = secrets.token_urlsafe(24)
    ref = client.secrets.create(
        name=f"keymgr-stack-test-{uuid.uuid4()}", payload=payload, secret_type="passphrase"
    ).store()
    yield ref, payload
    try:
        client.secrets.delete(ref)
    except barbican_exc.HTTPClientError as e:  # the test deleted it already
        if e.status_code != 404:
            raise


def test_owner_stores_and_reads_back(keystone_session, access_log_counter):
    client = barbican_client.Client(session=keystone_session("owner"))
    payload = secrets.token_urlsafe(24)
    ref = client.secrets.create(
        name=f"keymgr-stack-test-{uuid.uuid4()}", payload=payload, secret_type="passphrase"
    ).store()
    sid = _secret_uuid(ref)
    try:
        assert ref.startswith("http://127.0.0.1:9311/v1/secrets/")
        secret = client.secrets.get(ref)
        assert secret.payload == payload
        assert secret.secret_type == "passphrase"
    finally:
        client.secrets.delete(ref)

    with pytest.raises(barbican_exc.HTTPClientError) as info:
        client.secrets.get(ref).payload  # noqa: B018 - the GET is the point
    assert info.value.status_code == 404

    # Counting by the secret's UUID keeps other tests' requests out.
    assert access_log_counter.barbican("POST", "/v1/secrets") >= 1
    assert access_log_counter.barbican("GET", f"/v1/secrets/{sid}/payload") == 1
    assert access_log_counter.barbican("DELETE", f"/v1/secrets/{sid}") == 1
    # The owner logged in; Barbican validated the new token with Keystone.
    assert access_log_counter.keystone("POST", "/v3/auth/tokens") >= 1
    assert access_log_counter.keystone("GET", "/v3/auth/tokens") >= 1


def test_other_project_member_gets_403(owner_secret, keystone_session):
    ref, payload = owner_secret
    other = keystone_session("other")

    for url in (ref, ref + "/payload"):
        resp = other.get(url, headers={"Accept": "text/plain"}, raise_exc=False)
        assert resp.status_code == 403, (url, resp.status_code)
        assert payload not in resp.text

    other_client = barbican_client.Client(session=other)
    with pytest.raises(barbican_exc.HTTPClientError) as info:
        other_client.secrets.get(ref).payload  # noqa: B018
    assert info.value.status_code == 403

    # Not a broken secret: its owner still reads it.
    owner = keystone_session("owner")
    resp = owner.get(ref + "/payload", headers={"Accept": "text/plain"})
    assert resp.text == payload


def test_same_project_member_reads_without_acl(owner_secret, keystone_session):
    """Barbican's default: any member of the project reads it (why D3 sets an ACL)."""
    ref, payload = owner_secret
    resp = keystone_session("member").get(ref + "/payload", headers={"Accept": "text/plain"})
    assert resp.text == payload


def test_counter_counts_only_matching_requests(owner_secret, keystone_session, keymgr_stack):
    ref, _ = owner_secret
    sid = _secret_uuid(ref)
    owner = keystone_session("owner")
    owner.get_token()  # the login is not what this test counts
    counter = AccessLogCounter(keymgr_stack.stack_dir)

    assert counter.barbican(path=sid) == 0
    owner.get(ref, headers={"Accept": "application/json"})
    owner.get(ref, headers={"Accept": "application/json"})
    assert counter.barbican("GET", sid) == 2
    assert counter.barbican("get", sid) == 2  # method is case-insensitive
    assert counter.barbican("DELETE", sid) == 0
    # Reading again sends marker requests; they are never counted.
    assert counter.barbican(path=sid) == 2
    assert all("vtpm-log-sync" not in e.path for e in counter.entries("barbican"))

    counter.mark()
    assert counter.barbican(path=sid) == 0


def test_credentials_files(clouds, keymgr_stack):
    assert set(CLOUD_NAMES) <= set(clouds)
    assert stat.S_IMODE(keymgr_stack.clouds_file.stat().st_mode) == 0o600
    for name in CLOUD_NAMES:
        rc = keymgr_stack.stack_dir / f"openrc-{name}"
        assert stat.S_IMODE(rc.stat().st_mode) == 0o600
        exports = dict(
            line.removeprefix("export ").split("=", 1)
            for line in rc.read_text().splitlines()
            if line.startswith("export ")
        )
        assert exports["OS_AUTH_URL"] == "http://127.0.0.1:5000/v3"
        assert exports["OS_USERNAME"] == clouds[name]["username"]
        assert exports["OS_PASSWORD"].strip("'") == clouds[name]["password"]
        assert exports["OS_PROJECT_NAME"] == clouds[name]["project_name"]
        assert exports["OS_USER_DOMAIN_NAME"] == "Default"
        assert exports["OS_PROJECT_DOMAIN_NAME"] == "Default"
        assert exports["OS_IDENTITY_API_VERSION"] == "3"
        assert exports["OS_REGION_NAME"] == "RegionOne"


@pytest.mark.parametrize(
    ("cloud", "project", "roles"),
    [
        ("owner", None, {"member"}),
        ("member", None, {"member"}),
        ("other", None, {"member"}),
        ("admin", None, {"admin"}),
        ("admin", "vtpm-a", {"admin"}),
        ("service", None, {"member", "service"}),
    ],
)
def test_users_have_their_roles(keystone_session, clouds, cloud, project, roles):
    sess = keystone_session(cloud, project_name=project)
    access = sess.auth.get_access(sess)
    assert access.project_name == (project or clouds[cloud]["project_name"])
    assert roles <= set(access.role_names)
    assert access.service_catalog.url_for(**KEY_MANAGER) == "http://127.0.0.1:9311"
