"""vtpm_driver.cloud.OwnerCloud against the fake cloud: each foreign error mapped once."""

from __future__ import annotations

import datetime
from collections.abc import Iterator

import pytest

from tests.fakes.cloud import OWNER, FakeCloud
from vtpm_driver import exception
from vtpm_driver.cloud import OwnerCloud
from vtpm_driver.keymgr.context import RequestContext

SERVER = "7d8e2c1a-3b4f-4a5e-8c6d-9e0f1a2b3c4d"


@pytest.fixture
def cloud() -> Iterator[FakeCloud]:
    with FakeCloud() as fake:
        fake.servers[SERVER] = {"id": SERVER, "user_id": OWNER[0], "metadata": {}}
        yield fake


def owner(cloud: FakeCloud, catalog: list | None = None, token: str | None = OWNER[2]
          ) -> OwnerCloud:
    return OwnerCloud(RequestContext(user_id=OWNER[0], project_id=OWNER[1], auth_token=token,
                                     service_catalog=cloud.catalog() if catalog is None
                                     else catalog), timeout=2)


def test_metadata_and_credentials_round_trip(cloud):
    api = owner(cloud)
    api.set_server_metadata(SERVER, "vtpm_consent", "r-1")
    assert api.server(SERVER)["metadata"] == {"vtpm_consent": "r-1"}
    assert api.delete_server_metadata(SERVER, "vtpm_consent") is True
    assert api.delete_server_metadata(SERVER, "vtpm_consent") is False     # idempotent
    cred_id, secret = api.create_application_credential(
        "c", datetime.datetime.now(datetime.UTC), [])
    assert cloud.app_creds == {cred_id: secret}
    assert api.delete_application_credential(cred_id) is True
    assert api.delete_application_credential(cred_id) is False
    assert OWNER[2] not in repr(api)


@pytest.mark.parametrize(("status", "error"), [
    (403, exception.NotAuthorized), (404, exception.InstanceNotFound),
    (503, exception.OrchestratorUnavailable)])
def test_novas_error_replies(cloud, status, error):
    cloud.fail("GET", "/compute/", status=status)
    with pytest.raises(error, match=f"Nova answered HTTP {status} to show server"):
        owner(cloud).server(SERVER)


def test_keystones_error_replies(cloud):
    cloud.fail("POST", "/application_credentials", status=500)
    with pytest.raises(exception.KeyManagerUnavailable, match="Keystone answered HTTP 500"):
        owner(cloud).create_application_credential("c", datetime.datetime.now(datetime.UTC),
                                                   [])


def test_out_of_reach_no_endpoint_and_no_token(cloud):
    cloud.fail("GET", "/compute/", drop=True)
    with pytest.raises(exception.OrchestratorUnavailable, match="cannot reach Nova"):
        owner(cloud).server(SERVER)
    with pytest.raises(exception.InvalidConfiguration, match="no 'compute' endpoint"):
        owner(cloud, catalog=[c for c in cloud.catalog() if c["type"] != "compute"]
              ).server(SERVER)
    with pytest.raises(exception.NotAuthorized, match="carries no token"):
        owner(cloud, token=None)
