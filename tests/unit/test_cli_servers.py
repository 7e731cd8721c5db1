"""`vtpm-driver server ...`: arguments, driver calls, output shape, exit codes.

The driver and the record store are replaced by fakes (``backend_factory``) and
Keystone by a fixed context (``authenticate``), so these tests check only what
the commands themselves decide.
"""

from __future__ import annotations

import io
import json
import os
import types
import uuid

import pytest

from vtpm_driver import exception, servers
from vtpm_driver.cli import main as cli_main
from vtpm_driver.cli import servers as server_cli
from vtpm_driver.context import RequestContext

OWNER = RequestContext(user_id="u-owner", project_id="p-a", auth_token="tok-SECRET",
                       roles=("member",), user_name="alice", project_name="proj-a")
KERNEL_ARGS = ["--kernel", "/boot/vmlinuz", "--initrd", "/boot/initrd.img"]


class FakeDriver:
    """Records the lifecycle calls; ``fail[method] = exc`` makes one raise."""

    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend
        self.calls: list[tuple] = []
        self.fail: dict[str, Exception] = {}
        self.state = 1

    def _call(self, name: str, *args: object) -> None:
        self.calls.append((name, *args))
        if name in self.fail:
            raise self.fail[name]

    def spawn(self, context, instance, image_meta, injected_files, admin_password,
              allocations, network_info=None, block_device_info=None, power_on=True):
        self._call("spawn", context, instance.name)
        instance.system_metadata["vtpm_secret_uuid"] = "0b7e7f0c-3c1e-4a8e-9c7d-5b9b1d8e2f11"
        self.backend.instances.append(instance)

    def destroy(self, context, instance, network_info=None, block_device_info=None,
                destroy_disks=True, destroy_secrets=True):
        self._call("destroy", context, instance.name, destroy_disks, destroy_secrets)
        self.backend.instances = [i for i in self.backend.instances if i.uuid != instance.uuid]

    def reboot(self, context, instance, network_info, reboot_type):
        self._call("reboot", context, instance.name, reboot_type)

    def power_off(self, instance, timeout=0, retry_interval=0):
        self._call("power_off", instance.name, timeout, retry_interval)

    def power_on(self, context, instance, network_info):
        self._call("power_on", context, instance.name)

    def suspend(self, context, instance):
        self._call("suspend", context, instance.name)

    def resume(self, context, instance, network_info):
        self._call("resume", context, instance.name)

    def get_info(self, instance):
        self._call("get_info", instance.name)
        return types.SimpleNamespace(state=self.state)

    def migrate_disk_and_power_off(self, context, instance, dest, flavor, network_info,
                                   block_device_info=None, timeout=0, retry_interval=0):
        self._call("migrate_disk_and_power_off", context, instance.name, dest,
                   dict(instance.flavor.extra_specs), dict(flavor.extra_specs),
                   flavor.vcpus, flavor.memory_mb)
        self.backend.pending.add(instance.uuid)
        return "[]"

    def finish_migration(self, context, migration, instance, disk_info, network_info,
                         image_meta, resize_instance, allocations, block_device_info=None,
                         power_on=True):
        self._call("finish_migration", context, instance.name, disk_info,
                   dict(instance.flavor.extra_specs), dict(instance.old_flavor.extra_specs),
                   instance.new_flavor is instance.flavor, power_on)

    def confirm_migration(self, context, migration, instance, network_info):
        self._call("confirm_migration", context, instance.name)
        self.backend.pending.discard(instance.uuid)

    def finish_revert_migration(self, context, instance, network_info, migration,
                                block_device_info=None, power_on=True):
        self._call("finish_revert_migration", context, instance.name, power_on)
        self.backend.pending.discard(instance.uuid)


class FakeBackend:
    """Servers in a list; the real ``servers.new_instance`` builds new ones."""

    uri = "qemu:///fake"

    def __init__(self) -> None:
        self.instances: list = []
        self.pending: set[str] = set()
        self.driver = FakeDriver(self)
        self.closed = 0

    def connect(self) -> None:
        pass

    def find(self, name_or_uuid: str):
        for instance in self.instances:
            if name_or_uuid in (instance.name, instance.uuid):
                return instance
        raise exception.InstanceNotFound(
            f"no server with name or UUID {name_or_uuid!r} on this host")

    def list(self):
        return sorted(self.instances, key=lambda i: i.name)

    def new_instance(self, name, context, **kwargs):
        return servers.new_instance(name, context, **kwargs)

    def resize_pending(self, instance) -> bool:
        return instance.uuid in self.pending

    def close(self) -> None:
        self.closed += 1


@pytest.fixture(autouse=True)
def _no_default_config(monkeypatch, tmp_path):
    monkeypatch.setattr(cli_main, "DEFAULT_CONFIG_FILES", (str(tmp_path / "absent.conf"),))


@pytest.fixture
def backend(monkeypatch) -> FakeBackend:
    fake = FakeBackend()
    monkeypatch.setattr(server_cli, "backend_factory", lambda conf: fake)
    return fake


@pytest.fixture
def logins(monkeypatch) -> list:
    """Replace Keystone: every login returns OWNER and is recorded."""
    seen: list = []

    def fake_authenticate(parsed_args):
        seen.append(parsed_args)
        return OWNER

    monkeypatch.setattr(server_cli, "authenticate", fake_authenticate)
    return seen


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli_main.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def create(capsys, name: str, *args: str) -> tuple[int, str, str]:
    return run(capsys, "server", "create", name, *KERNEL_ARGS, *args, "-f", "json")


def add_server(backend: FakeBackend, name: str = "vm1", **specs: str):
    instance = servers.new_instance(name, OWNER, flavor_extra_specs=specs or
                                    {"hw:tpm_version": "2.0"}, kernel="/k")
    instance.system_metadata["vtpm_secret_uuid"] = str(uuid.uuid4())
    backend.instances.append(instance)
    return instance


# -- create ---------------------------------------------------------------------------


def test_create_spawns_and_shows_the_new_server(capsys, backend, logins):
    rc, out, err = create(capsys, "vm1", "--flavor-property", "hw:tpm_version=2.0",
                          "--image-property", "hw_tpm_model=tpm-crb", "--vcpus", "2",
                          "--memory", "128", "--console-log", "rel/console.log")
    assert (rc, err) == (0, "")
    shown = json.loads(out)
    assert shown["name"] == "vm1"
    assert (shown["user_id"], shown["project_id"]) == ("u-owner", "p-a")
    assert (shown["user_name"], shown["project_name"]) == ("alice", "proj-a")
    assert (shown["vtpm"], shown["vtpm_version"], shown["vtpm_model"],
            shown["secret_security"]) == (True, "2.0", "tpm-crb", "user")
    assert shown["vtpm_secret_uuid"] == "0b7e7f0c-3c1e-4a8e-9c7d-5b9b1d8e2f11"
    assert shown["flavor_extra_specs"] == {"hw:tpm_version": "2.0"}
    assert shown["image_properties"] == {"hw_tpm_model": "tpm-crb"}
    assert (shown["vcpus"], shown["memory_mb"]) == (2, 128)
    assert shown["console_log"] == os.path.abspath("rel/console.log")
    assert (shown["kernel"], shown["initrd"]) == ("/boot/vmlinuz", "/boot/initrd.img")
    assert shown["power_state"] == "running"
    assert backend.driver.calls[0] == ("spawn", OWNER, "vm1")
    assert len(logins) == 1
    assert "tok-SECRET" not in out


def test_create_makes_boot_paths_absolute(capsys, backend, logins):
    rc, out, _ = run(capsys, "server", "create", "vm1", "--disk", "img/disk.qcow2", "-f", "json")
    assert rc == 0
    shown = json.loads(out)
    assert shown["disk"] == os.path.abspath("img/disk.qcow2")
    assert shown["kernel"] is None
    assert shown["vtpm"] is False


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--flavor-property", "hw:tpm_version=1.2", "--flavor-property", "hw:tpm_model=tpm-crb"],
         "tpm-crb needs TPM version 2.0"),
        (["--flavor-property", "hw:tpm_version=2.0", "--image-property", "hw_tpm_version=1.2"],
         "flavor hw:tpm_version='2.0' conflicts with image hw_tpm_version='1.2'"),
        (["--flavor-property", "hw:tpm_version=2.0", "--flavor-property",
          "hw:tpm_secret_security=nobody"],
         "invalid hw:tpm_secret_security='nobody'"),
    ],
)
def test_invalid_request_is_refused_before_login_or_spawn(capsys, backend, logins, args, needle):
    rc, out, err = create(capsys, "vm1", *args)
    assert (rc, out) == (1, "")
    assert len(err.splitlines()) == 1
    assert err.startswith("vtpm-driver: error: ") and needle in err
    assert logins == [] and backend.driver.calls == [] and backend.instances == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "one of the arguments --kernel --disk is required"),
        (["--kernel", "/k", "--disk", "/d.raw"], "not allowed with argument"),
        (["--disk", "/d.raw", "--initrd", "/i"], "--initrd and --cmdline go with --kernel"),
        (["--kernel", "/k", "--vcpus", "0"], "expected a positive integer, got '0'"),
        (["--kernel", "/k", "--memory", "lots"], "expected a positive integer, got 'lots'"),
    ],
)
def test_create_usage_errors_exit_2(capsys, backend, logins, args, needle):
    rc, out, err = run(capsys, "server", "create", "vm1", *args)
    assert (rc, out) == (2, "")
    assert needle in err
    assert logins == [] and backend.driver.calls == []


def test_create_refuses_an_existing_name(capsys, backend, logins):
    existing = add_server(backend)
    rc, out, err = create(capsys, "vm1")
    assert (rc, out) == (1, "")
    assert err == (f"vtpm-driver: error: a server named 'vm1' already exists on this host "
                   f"(uuid {existing.uuid})\n")
    assert all(call[0] != "spawn" for call in backend.driver.calls)


def test_create_spawn_failure_is_one_line(capsys, backend, logins):
    backend.driver.fail["spawn"] = exception.KeyManagerUnavailable("Barbican is down")
    rc, out, err = create(capsys, "vm1", "--flavor-property", "hw:tpm_version=2.0")
    assert (rc, out, err) == (1, "", "vtpm-driver: error: Barbican is down\n")
    assert backend.closed == 1


# -- credentials ----------------------------------------------------------------------


_OS_VARS = ("OS_AUTH_URL", "OS_USERNAME", "OS_USER_ID", "OS_PASSWORD", "OS_PROJECT_NAME",
            "OS_PROJECT_ID", "OS_USER_DOMAIN_NAME", "OS_PROJECT_DOMAIN_NAME", "OS_AUTH_TYPE",
            "OS_TOKEN", "OS_CLOUD")


@pytest.fixture
def no_os_env(monkeypatch):
    for name in _OS_VARS:
        monkeypatch.delenv(name, raising=False)


def test_missing_credentials_are_named(capsys, backend, no_os_env, monkeypatch):
    monkeypatch.setenv("OS_USERNAME", "alice")
    rc, out, err = create(capsys, "vm1")
    assert (rc, out) == (1, "")
    assert len(err.splitlines()) == 1
    assert "missing credentials" in err
    assert "OS_AUTH_URL" in err and "OS_PASSWORD" in err and "OS_PROJECT_NAME" in err
    assert "OS_USERNAME" not in err
    assert backend.driver.calls == []


def test_unreachable_keystone_is_one_line_without_the_password(capsys, backend, no_os_env):
    password = "pw-" + uuid.uuid4().hex
    rc, out, err = run(capsys, "--debug", "server", "stop", "vm1",
                       "--os-auth-url", "http://127.0.0.1:9/v3", "--os-username", "alice",
                       "--os-password", password, "--os-project-name", "p",
                       "--os-user-domain-name", "Default", "--os-project-domain-name",
                       "Default")
    assert (rc, out) == (1, "")
    assert "Keystone" in err
    assert password not in err
    assert backend.driver.calls == []


def test_options_come_from_os_environment(monkeypatch, no_os_env):
    monkeypatch.setenv("OS_AUTH_URL", "http://keystone.example/v3")
    monkeypatch.setenv("OS_USERNAME", "alice")
    monkeypatch.setenv("OS_PASSWORD", "pw")
    monkeypatch.setenv("OS_PROJECT_NAME", "demo")
    import argparse

    parser = argparse.ArgumentParser()
    server_cli.add_auth_options(parser)
    parsed = parser.parse_args([])
    assert server_cli.credentials_given(parsed)
    assert server_cli._missing_credentials(parsed) == []
    assert (parsed.os_auth_type, parsed.os_auth_url, parsed.os_username) == (
        "password", "http://keystone.example/v3", "alice")
    parsed = parser.parse_args(["--os-username", "bob"])
    assert parsed.os_username == "bob"


def test_unknown_auth_type_is_one_line(capsys, backend, no_os_env, monkeypatch):
    monkeypatch.setenv("OS_AUTH_TYPE", "no-such-plugin")
    rc, out, err = run(capsys, "server", "start", "vm1")
    assert (rc, out) == (1, "")
    assert err.splitlines() == [
        "vtpm-driver: error: authentication type 'no-such-plugin' (OS_AUTH_TYPE or "
        "--os-auth-type) is not a keystoneauth1 plugin; use e.g. 'password'"
    ]


# -- list / show ----------------------------------------------------------------------


def test_list_shows_owner_vtpm_and_power_state(capsys, backend):
    add_server(backend, "b-vm", **{"hw:tpm_version": "1.2", "hw:tpm_secret_security": "host"})
    add_server(backend, "a-vm")
    plain = servers.new_instance("c-vm", OWNER, kernel="/k")
    backend.instances.append(plain)
    backend.driver.state = 4
    rc, out, err = run(capsys, "server", "list", "-f", "json")
    assert (rc, err) == (0, "")
    rows = json.loads(out)
    assert [row["Name"] for row in rows] == ["a-vm", "b-vm", "c-vm"]
    assert rows[1] == {
        "Name": "b-vm", "UUID": backend.find("b-vm").uuid, "Owner": "alice",
        "Project": "proj-a", "vTPM Version": "1.2", "vTPM Model": "tpm-tis",
        "Secret Security": "host", "Power State": "shutdown",
    }
    assert rows[2]["vTPM Version"] is None and rows[2]["Secret Security"] is None


def test_list_needs_no_credentials(capsys, backend, logins):
    add_server(backend)
    rc, _, _ = run(capsys, "server", "list")
    assert rc == 0 and logins == []


def test_list_shows_an_invalid_record_as_invalid(capsys, backend):
    add_server(backend)
    backend.instances[0].flavor.extra_specs["hw:tpm_model"] = "tpm-crb"
    backend.instances[0].flavor.extra_specs["hw:tpm_version"] = "1.2"
    rc, out, _ = run(capsys, "server", "list", "-f", "json")
    assert rc == 0 and json.loads(out)[0]["vTPM Version"] == "invalid"


def test_show_by_name_or_uuid(capsys, backend, logins):
    instance = add_server(backend, **{"hw:tpm_version": "2.0",
                                      "hw:tpm_secret_security": "deployment"})
    for key in ("vm1", instance.uuid):
        rc, out, err = run(capsys, "server", "show", key, "-f", "json")
        assert (rc, err) == (0, "")
        shown = json.loads(out)
        assert shown["uuid"] == instance.uuid
        assert shown["secret_security"] == "deployment"
        assert shown["vtpm_secret_uuid"] == instance.system_metadata["vtpm_secret_uuid"]
        assert shown["resize_status"] is None
    assert logins == []


def test_show_value_of_one_column(capsys, backend):
    add_server(backend)
    rc, out, _ = run(capsys, "server", "show", "vm1", "-f", "value", "-c", "vtpm_version")
    assert (rc, out) == (0, "2.0\n")


def test_show_missing_server_is_exit_1_one_line(capsys, backend):
    rc, out, err = run(capsys, "server", "show", "nope", "-f", "json")
    assert (rc, out) == (1, "")
    assert err == "vtpm-driver: error: no server with name or UUID 'nope' on this host\n"


def test_show_survives_a_failing_get_info(capsys, backend):
    add_server(backend)
    backend.driver.fail["get_info"] = exception.VirtError("libvirt hiccup")
    rc, out, _ = run(capsys, "-q", "server", "show", "vm1", "-f", "json")
    assert rc == 0 and json.loads(out)["power_state"] == "unknown"


# -- actions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "call"),
    [
        (["server", "reboot", "vm1"], ("reboot", OWNER, "vm1", "SOFT")),
        (["server", "reboot", "--hard", "vm1"], ("reboot", OWNER, "vm1", "HARD")),
        (["server", "stop", "vm1"], ("power_off", "vm1", 60, 10)),
        (["server", "stop", "--shutdown-timeout", "5", "vm1"], ("power_off", "vm1", 5, 10)),
        (["server", "stop", "--force", "vm1"], ("power_off", "vm1", 0, 0)),
        (["server", "start", "vm1"], ("power_on", OWNER, "vm1")),
        (["server", "suspend", "vm1"], ("suspend", OWNER, "vm1")),
        (["server", "resume", "vm1"], ("resume", OWNER, "vm1")),
        (["server", "delete", "vm1"], ("destroy", OWNER, "vm1", True, True)),
    ],
)
def test_actions_call_the_driver(capsys, backend, logins, argv, call):
    add_server(backend)
    rc, out, err = run(capsys, *argv)
    assert (rc, out, err) == (0, "", "")
    assert backend.driver.calls == [call]
    assert len(logins) == 1


def test_actions_work_by_uuid(capsys, backend, logins):
    instance = add_server(backend)
    rc, _, _ = run(capsys, "server", "start", instance.uuid)
    assert rc == 0 and backend.driver.calls == [("power_on", OWNER, "vm1")]


def test_second_delete_says_the_server_does_not_exist(capsys, backend, logins):
    add_server(backend)
    assert run(capsys, "server", "delete", "vm1") == (0, "", "")
    rc, out, err = run(capsys, "server", "delete", "vm1")
    assert (rc, out) == (1, "")
    assert err == "vtpm-driver: error: no server with name or UUID 'vm1' on this host\n"
    assert [c[0] for c in backend.driver.calls] == ["destroy"]


def test_refused_hard_reboot_is_one_line(capsys, backend, logins):
    add_server(backend)
    backend.driver.fail["reboot"] = exception.VTPMSecretForbidden(
        "Barbican refused to read vTPM secret x (HTTP 403): this needs the server owner's "
        "credentials (secret security mode 'user')")
    rc, out, err = run(capsys, "server", "reboot", "--hard", "vm1")
    assert (rc, out) == (1, "")
    assert len(err.splitlines()) == 1
    assert "needs the server owner's credentials" in err


def test_unsupported_operation_names_it(capsys, backend, logins):
    add_server(backend)
    backend.driver.fail["suspend"] = exception.OperationNotSupportedForVTPM(
        "suspend is not supported for servers with a vTPM: reason")
    rc, _, err = run(capsys, "server", "suspend", "vm1")
    assert rc == 1
    assert err == ("vtpm-driver: error: suspend is not supported for servers with a vTPM: "
                   "reason\n")


def test_action_without_a_server_argument_is_usage_error(capsys, backend, logins):
    rc, _, err = run(capsys, "server", "reboot")
    assert rc == 2 and "NAME|UUID" in err


# -- resize ---------------------------------------------------------------------------


def test_resize_merges_the_flavor_and_awaits_a_decision(capsys, backend, logins):
    add_server(backend, **{"hw:tpm_version": "2.0", "hw:cpu_policy": "shared"})
    rc, out, err = run(capsys, "server", "resize", "vm1", "--flavor-property",
                       "hw:tpm_model=tpm-crb", "--unset-flavor-property", "hw:cpu_policy",
                       "--memory", "512")
    assert (rc, out, err) == (0, "", "")
    old = {"hw:tpm_version": "2.0", "hw:cpu_policy": "shared"}
    new = {"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"}
    assert backend.driver.calls == [
        ("migrate_disk_and_power_off", OWNER, "vm1", None, old, new, 1, 512),
        ("finish_migration", OWNER, "vm1", "[]", new, old, True, True),
    ]
    rc, out, _ = run(capsys, "server", "show", "vm1", "-f", "value", "-c", "resize_status")
    assert (rc, out) == (0, "awaiting confirm or revert\n")


@pytest.mark.parametrize(
    ("argv", "call"),
    [
        (["server", "resize", "confirm", "vm1"], ("confirm_migration", OWNER, "vm1")),
        (["server", "resize", "--confirm", "vm1"], ("confirm_migration", OWNER, "vm1")),
        (["server", "resize", "revert", "vm1"], ("finish_revert_migration", OWNER, "vm1", True)),
        (["server", "resize", "--revert", "vm1"], ("finish_revert_migration", OWNER, "vm1", True)),
    ],
)
def test_resize_confirm_and_revert(capsys, backend, logins, argv, call):
    instance = add_server(backend)
    backend.pending.add(instance.uuid)
    assert run(capsys, *argv) == (0, "", "")
    assert backend.driver.calls == [call]
    assert not backend.resize_pending(instance)


@pytest.mark.parametrize("decision", ["confirm", "revert"])
def test_resize_decision_without_pending_resize_is_refused(capsys, backend, logins, decision):
    add_server(backend)
    rc, out, err = run(capsys, "server", "resize", decision, "vm1")
    assert (rc, out) == (1, "")
    assert err == (f"vtpm-driver: error: cannot {decision} the resize of server 'vm1': it has "
                   "no resize awaiting confirm or revert\n")
    assert backend.driver.calls == []


def test_second_resize_while_pending_is_refused(capsys, backend, logins):
    instance = add_server(backend)
    backend.pending.add(instance.uuid)
    rc, _, err = run(capsys, "server", "resize", "vm1", "--vcpus", "2")
    assert rc == 1
    assert "a resize is awaiting confirm or revert" in err
    assert "vtpm-driver server resize confirm|revert vm1" in err
    assert backend.driver.calls == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--flavor-property", "hw:tpm_model=tpm-crb", "--confirm"],
         "--confirm and --revert act on a pending resize and take no flavor changes"),
        (["--vcpus", "2", "--revert"], "take no flavor changes"),
        (["--confirm", "--revert"], "not allowed with argument"),
        ([], "nothing to resize"),
    ],
)
def test_resize_usage_errors(capsys, backend, logins, args, needle):
    add_server(backend)
    rc, out, err = run(capsys, "server", "resize", "vm1", *args)
    assert (rc, out) == (2, "")
    assert needle in err
    assert backend.driver.calls == [] and logins == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--flavor-property", "hw:tpm_version=1.2", "--flavor-property", "hw:tpm_model=tpm-crb"],
         "tpm-crb needs TPM version 2.0"),
        (["--unset-flavor-property", "hw:nope"],
         "--unset-flavor-property 'hw:nope': the server's flavor has no such extra spec"),
    ],
)
def test_invalid_resize_changes_nothing(capsys, backend, logins, args, needle):
    add_server(backend)
    rc, out, err = run(capsys, "server", "resize", "vm1", *args)
    assert (rc, out) == (1, "")
    assert needle in err and len(err.splitlines()) == 1
    assert backend.driver.calls == []


def test_command_help_mentions_resize_confirm(capsys):
    rc, out, _ = run(capsys, "server", "resize", "--help")
    assert rc == 0
    assert "vtpm-driver server resize confirm NAME" in out
    assert "vtpm-driver server resize revert NAME" in out


# -- progress -------------------------------------------------------------------------


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_on_a_terminal():
    tty, pipe = _Tty(), io.StringIO()
    for stream in (tty, pipe):
        with server_cli.progress(stream, "Starting server vm1"):
            pass
    assert tty.getvalue().startswith("Starting server vm1... done (")
    assert pipe.getvalue() == ""


def test_progress_says_failed_and_reraises():
    tty = _Tty()
    with pytest.raises(exception.VirtError), server_cli.progress(tty, "Starting"):
        raise exception.VirtError("boom")
    assert tty.getvalue() == "Starting... failed\n"


def test_progress_can_be_disabled():
    tty = _Tty()
    with server_cli.progress(tty, "Starting", enabled=False):
        pass
    assert tty.getvalue() == ""


@pytest.mark.parametrize(
    ("state", "name"),
    [(0, "pending"), (1, "running"), (3, "paused"), (4, "shutdown"), (6, "crashed"),
     (7, "suspended"), (99, "state 99"), ("running", "running"), (None, "unknown")],
)
def test_power_state_names(state, name):
    assert server_cli.power_state_name(types.SimpleNamespace(state=state)) == name


# -- who may act on a server (Nova's owner-project-or-admin rule) ---------------


def _ctx(project_id: str, roles: tuple[str, ...] = ("member",)):
    from vtpm_driver.context import RequestContext

    return RequestContext(user_id="u-1", project_id=project_id, auth_token="t",
                          roles=roles, user_name="alice")


def test_check_project_allows_project_members_and_admins():
    from vtpm_driver.cli.servers import check_project
    from vtpm_driver.objects import Instance

    inst = Instance(name="vm", user_id="owner", project_id="proj-a")
    check_project(_ctx("proj-a"), inst, "reboot")
    check_project(_ctx("proj-x", roles=("admin",)), inst, "reboot")


def test_check_project_refuses_other_projects_naming_server_and_project():
    from vtpm_driver import exception
    from vtpm_driver.cli.servers import check_project
    from vtpm_driver.objects import Instance

    inst = Instance(name="vm", user_id="owner", project_id="proj-a")
    with pytest.raises(exception.NotAuthorized,
                       match=r"cannot stop server vm: it belongs to project proj-a and alice"):
        check_project(_ctx("proj-b"), inst, "stop")


def test_int_at_least_accepts_the_bound_and_names_it_when_refusing():
    import argparse

    from vtpm_driver.cli.common import int_at_least

    assert int_at_least(0)("0") == 0
    assert int_at_least(1)("7") == 7
    for parse, text, wanted in ((int_at_least(0), "-1", "an integer >= 0"),
                                (int_at_least(1), "0", "a positive integer"),
                                (int_at_least(1), "1.5", "a positive integer")):
        with pytest.raises(argparse.ArgumentTypeError, match=f"expected {wanted}, got '{text}'"):
            parse(text)
