"""`vtpm-driver server create|list|show`: arguments, service calls, output, exit codes.

The driver and the record store are fakes (:mod:`tests.unit.cli.fakes`) and
Keystone a fixed login, so these tests check what the commands and the
service decide.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.fakes.service import OWNER, add_server
from vtpm_driver import exception
from vtpm_driver.standalone import servers

KERNEL_ARGS = ["--kernel", "/boot/vmlinuz", "--initrd", "/boot/initrd.img"]


def create(cli, name: str, *args: str) -> tuple[int, str, str]:
    return cli("server", "create", name, *KERNEL_ARGS, *args, "-f", "json")


# -- create ---------------------------------------------------------------------------


def test_create_spawns_and_shows_the_new_server(cli, backend, logins):
    rc, out, err = create(cli, "vm1", "--flavor-property", "hw:tpm_version=2.0",
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


def test_create_makes_boot_paths_absolute(cli, backend, logins):
    rc, out, _ = cli("server", "create", "vm1", "--disk", "img/disk.qcow2", "-f", "json")
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
def test_invalid_request_is_refused_before_login_or_spawn(cli, backend, logins, args, needle):
    rc, out, err = create(cli, "vm1", *args)
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
def test_create_usage_errors_exit_2(cli, backend, logins, args, needle):
    rc, out, err = cli("server", "create", "vm1", *args)
    assert (rc, out) == (2, "")
    assert needle in err
    assert logins == [] and backend.driver.calls == []


def test_create_refuses_an_existing_name(cli, backend, logins):
    existing = add_server(backend)
    rc, out, err = create(cli, "vm1")
    assert (rc, out) == (1, "")
    assert err == (f"vtpm-driver: error: a server named 'vm1' already exists on this host "
                   f"(uuid {existing.uuid})\n")
    assert all(call[0] != "spawn" for call in backend.driver.calls)


def test_create_spawn_failure_is_one_line(cli, backend, logins):
    backend.driver.fail["spawn"] = exception.KeyManagerUnavailable("Barbican is down")
    rc, out, err = create(cli, "vm1", "--flavor-property", "hw:tpm_version=2.0")
    assert (rc, out, err) == (1, "", "vtpm-driver: error: Barbican is down\n")
    assert backend.closed == 1


# -- list / show ----------------------------------------------------------------------


def test_list_shows_owner_vtpm_and_power_state(cli, backend):
    add_server(backend, "b-vm", **{"hw:tpm_version": "1.2", "hw:tpm_secret_security": "host"})
    add_server(backend, "a-vm")
    plain = servers.new_instance("c-vm", OWNER, kernel="/k")
    backend.instances.append(plain)
    backend.driver.state = 4
    rc, out, err = cli("server", "list", "-f", "json")
    assert (rc, err) == (0, "")
    rows = json.loads(out)
    assert [row["Name"] for row in rows] == ["a-vm", "b-vm", "c-vm"]
    assert rows[1] == {
        "Name": "b-vm", "UUID": backend.find("b-vm").uuid, "Owner": "alice",
        "Project": "proj-a", "vTPM Version": "1.2", "vTPM Model": "tpm-tis",
        "Secret Security": "host", "Power State": "shutdown",
    }
    assert rows[2]["vTPM Version"] is None and rows[2]["Secret Security"] is None


def test_list_needs_no_credentials(cli, backend, logins):
    add_server(backend)
    rc, _, _ = cli("server", "list")
    assert rc == 0 and logins == []


def test_list_shows_an_invalid_record_as_invalid(cli, backend):
    add_server(backend)
    backend.instances[0].flavor.extra_specs["hw:tpm_model"] = "tpm-crb"
    backend.instances[0].flavor.extra_specs["hw:tpm_version"] = "1.2"
    rc, out, _ = cli("server", "list", "-f", "json")
    assert rc == 0 and json.loads(out)[0]["vTPM Version"] == "invalid"


def test_show_by_name_or_uuid(cli, backend, logins):
    instance = add_server(backend, **{"hw:tpm_version": "2.0",
                                      "hw:tpm_secret_security": "deployment"})
    for key in ("vm1", instance.uuid):
        rc, out, err = cli("server", "show", key, "-f", "json")
        assert (rc, err) == (0, "")
        shown = json.loads(out)
        assert shown["uuid"] == instance.uuid
        assert shown["secret_security"] == "deployment"
        assert shown["vtpm_secret_uuid"] == instance.system_metadata["vtpm_secret_uuid"]
        assert shown["resize_status"] is None
    assert logins == []


def test_show_value_of_one_column(cli, backend):
    add_server(backend)
    rc, out, _ = cli("server", "show", "vm1", "-f", "value", "-c", "vtpm_version")
    assert (rc, out) == (0, "2.0\n")


def test_show_missing_server_is_exit_1_one_line(cli, backend):
    rc, out, err = cli("server", "show", "nope", "-f", "json")
    assert (rc, out) == (1, "")
    assert err == "vtpm-driver: error: no server with name or UUID 'nope' on this host\n"


def test_show_survives_a_failing_get_info(cli, backend):
    add_server(backend)
    backend.driver.fail["get_info"] = exception.VirtError("libvirt hiccup")
    rc, out, _ = cli("-q", "server", "show", "vm1", "-f", "json")
    assert rc == 0 and json.loads(out)["power_state"] == "unknown"


