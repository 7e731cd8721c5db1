"""Global `--os-*` options: from OS_* variables, one-line errors, no password shown."""

from __future__ import annotations

import argparse
import uuid

import pytest

from tests.fakes.service import add_server
from vtpm_driver.cli import auth

KERNEL_ARGS = ["--kernel", "/boot/vmlinuz", "--initrd", "/boot/initrd.img"]


_OS_VARS = ("OS_AUTH_URL", "OS_USERNAME", "OS_USER_ID", "OS_PASSWORD", "OS_PROJECT_NAME",
            "OS_PROJECT_ID", "OS_USER_DOMAIN_NAME", "OS_PROJECT_DOMAIN_NAME", "OS_AUTH_TYPE",
            "OS_TOKEN", "OS_CLOUD")


@pytest.fixture
def no_os_env(monkeypatch):
    for name in _OS_VARS:
        monkeypatch.delenv(name, raising=False)


def test_missing_credentials_are_named(cli, backend, no_os_env, monkeypatch):
    monkeypatch.setenv("OS_USERNAME", "alice")
    rc, out, err = cli("server", "create", "vm1", *KERNEL_ARGS, keystone=True)
    assert (rc, out) == (1, "")
    assert len(err.splitlines()) == 1
    assert "missing credentials" in err
    assert "OS_AUTH_URL" in err and "OS_PASSWORD" in err and "OS_PROJECT_NAME" in err
    assert "OS_USERNAME" not in err
    assert backend.driver.calls == []


def test_unreachable_keystone_is_one_line_without_the_password(cli, backend, no_os_env):
    password = "pw-" + uuid.uuid4().hex
    rc, out, err = cli("--debug", "server", "stop", "vm1",
                       "--os-auth-url", "http://127.0.0.1:9/v3", "--os-username", "alice",
                       "--os-password", password, "--os-project-name", "p",
                       "--os-user-domain-name", "Default", "--os-project-domain-name",
                       "Default", keystone=True)
    assert (rc, out) == (1, "")
    assert "Keystone" in err
    assert password not in err
    assert backend.driver.calls == []


def test_options_come_from_os_environment(monkeypatch, no_os_env):
    monkeypatch.setenv("OS_AUTH_URL", "http://keystone.example/v3")
    monkeypatch.setenv("OS_USERNAME", "alice")
    monkeypatch.setenv("OS_PASSWORD", "pw")
    monkeypatch.setenv("OS_PROJECT_NAME", "demo")
    parser = argparse.ArgumentParser()
    assert auth.add_auth_options(parser, []) is None
    parsed = parser.parse_args([])
    assert auth.credentials_given(parsed)
    assert auth.missing_credentials(parsed) == []
    assert (parsed.os_auth_type, parsed.os_auth_url, parsed.os_username) == (
        "password", "http://keystone.example/v3", "alice")
    parsed = parser.parse_args(["--os-username", "bob"])
    assert parsed.os_username == "bob"


def test_plugin_options_follow_the_auth_type_on_the_command_line(no_os_env):
    parser = argparse.ArgumentParser()
    assert auth.add_auth_options(parser, ["server", "list", "--os-auth-type", "token"]) is None
    parsed = parser.parse_args(["--os-auth-type", "token", "--os-token", "t"])
    assert (parsed.os_auth_type, parsed.os_token) == ("token", "t")
    assert auth.credentials_given(parsed)
    assert auth.missing_credentials(parsed) == []  # keystoneauth1 names what is missing


def test_missing_password_credentials_say_how_to_give_them(no_os_env):
    parser = argparse.ArgumentParser()
    auth.add_auth_options(parser, [])
    parsed = parser.parse_args(["--os-username", "alice"])
    assert auth.missing_credentials(parsed) == [
        "auth URL (OS_AUTH_URL or --os-auth-url)", "password (OS_PASSWORD or --os-password)",
        "project (OS_PROJECT_NAME or --os-project-name)"]


@pytest.mark.parametrize("where", ["before", "after"])
def test_os_options_are_global_before_or_after_the_command(cli, backend, logins, no_os_env,
                                                           where):
    options = ["--os-username", "bob", "--os-auth-url", "http://k/v3"]
    command = ["server", "start", "vm1"]
    add_server(backend)
    argv = [*options, *command] if where == "before" else [*command, *options]
    assert cli(*argv) == (0, "", "")
    assert [(o.os_username, o.os_auth_url) for o in logins] == [("bob", "http://k/v3")]


def test_one_login_per_run_even_for_several_calls(cli, backend, logins):
    add_server(backend)
    assert cli("server", "resize", "vm1", "--vcpus", "2")[0] == 0
    assert len(logins) == 1


def test_unknown_auth_type_is_one_line(cli, backend, no_os_env, monkeypatch):
    monkeypatch.setenv("OS_AUTH_TYPE", "no-such-plugin")
    rc, out, err = cli("server", "start", "vm1")
    assert (rc, out) == (1, "")
    assert err.splitlines() == [
        "vtpm-driver: error: authentication type 'no-such-plugin' (OS_AUTH_TYPE or "
        "--os-auth-type) is not a keystoneauth1 plugin; use e.g. 'password'"
    ]




def test_unknown_auth_type_does_not_stop_commands_without_credentials(cli, no_os_env,
                                                                      monkeypatch):
    monkeypatch.setenv("OS_AUTH_TYPE", "no-such-plugin")
    assert cli("server", "list", "-f", "json", keystone=True) == (0, "[]\n", "")
