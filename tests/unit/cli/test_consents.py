"""``server grant`` / ``server revoke``: one call each, as the owner, against the fake cloud."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.fakes.cloud import OWNER, SERVICE, FakeCloud
from vtpm_driver.cli import main as cli_main
from vtpm_driver.keymgr import barbican
from vtpm_driver.keymgr.context import RequestContext
from vtpm_driver.model import consent
from vtpm_driver.model.server import Instance

SERVER = "0b8f3c5e-1d9a-4f4e-9a55-1f1b0f3e2c77"


@pytest.fixture
def cloud(tmp_path, monkeypatch) -> Iterator[tuple[FakeCloud, str, RequestContext]]:
    """The fake cloud with the owner's server and passphrase; a config file naming it."""
    with FakeCloud() as fake:
        fake.servers[SERVER] = {"id": SERVER, "user_id": OWNER[0], "metadata": {}}
        conf = tmp_path / "vtpm.conf"
        conf.write_text(f"[key_manager]\nbarbican_endpoint = {fake.url}\n")
        owner = RequestContext(user_id=OWNER[0], project_id=OWNER[1], auth_token=OWNER[2],
                               service_catalog=fake.catalog())
        barbican.KeyManager(cli_main.load_conf([str(conf)])).create_vtpm_secret(
            owner, Instance(uuid=SERVER, name="vm", user_id=OWNER[0], project_id=OWNER[1]),
            "user")
        monkeypatch.delenv("VTPM_CLOUD_USER", raising=False)
        yield fake, str(conf), owner


def run(capsys, cloud, *argv: str) -> tuple[int, str, str]:
    _fake, conf, owner = cloud
    rc = cli_main.main(["--config-file", conf, *argv], login=lambda options: owner)
    out, err = capsys.readouterr()
    return rc, out, err


def test_grant_then_revoke(capsys, cloud, monkeypatch):
    fake = cloud[0]
    monkeypatch.setenv("VTPM_CLOUD_USER", SERVICE[0])
    rc, out, err = run(capsys, cloud, "server", "grant", SERVER, "live-migration",
                       "restart-on-host-boot", "--hours", "2", "-f", "json")
    assert (rc, err) == (0, "")
    shown = json.loads(out)
    assert shown["operations"] == ["live-migration", "restart-on-host-boot"]
    assert fake.servers[SERVER]["metadata"] == {consent.METADATA_KEY: shown["consent_record"]}
    assert fake.secrets[shown["consent_record"]].acl_users == [OWNER[0], SERVICE[0]]
    assert fake.app_creds[shown["application_credential"]] not in out   # never shown

    rc, out, err = run(capsys, cloud, "server", "revoke", SERVER, "-f", "json")
    assert (rc, err) == (0, "")
    assert json.loads(out) == {"server": SERVER, "consent_record": shown["consent_record"],
                               "application_credential_deleted": True,
                               "record_deleted": True}
    assert fake.app_creds == {} and fake.servers[SERVER]["metadata"] == {}


def test_grant_names_what_is_missing(capsys, cloud):
    rc, _out, err = run(capsys, cloud, "server", "grant", SERVER, "live-migration")
    assert rc == 1 and "--cloud-user" in err
    rc, _out, err = run(capsys, cloud, "server", "grant", SERVER, "reboot")
    assert rc == 2 and "invalid choice: 'reboot'" in err
    assert cloud[0].app_creds == {}
