"""`vtpm-driver demo`: what the command checks before anything is created."""

from __future__ import annotations

import pytest


def test_bad_boot_timeout_is_a_usage_error(cli, backend):
    rc, out, err = cli("demo", "--boot-timeout", "0")
    assert (rc, out) == (2, "")
    assert "expected a positive number of seconds, got '0'" in err


def test_missing_clouds_file_is_one_line_before_anything_is_created(cli, backend, logins,
                                                                      tmp_path):
    missing = tmp_path / "clouds.yaml"
    rc, out, err = cli("demo", "--clouds-file", str(missing))
    assert (rc, out) == (1, "")
    assert err.splitlines() == [
        f"vtpm-driver: error: --clouds-file '{missing}': cannot read it (No such file or "
        "directory); run 'tools/keymgr-stack.sh start' or pass --clouds-file"]
    assert logins == [] and backend.driver.calls == []


@pytest.mark.parametrize(
    ("text", "needle"),
    [("clouds: {owner: {auth: {}}}\n", "--member-cloud 'member': "),
     ("clouds: {member: {auth: {username: bob}}}\n", "cloud 'member' in "),
     ("clouds: [\n", "is not valid YAML")],
)
def test_unusable_member_cloud_is_named(cli, backend, logins, tmp_path, text, needle):
    clouds = tmp_path / "clouds.yaml"
    clouds.write_text(text)
    rc, out, err = cli("demo", "--clouds-file", str(clouds))
    assert (rc, out) == (1, "")
    assert len(err.splitlines()) == 1 and needle in err
    assert logins == [] and backend.driver.calls == []
