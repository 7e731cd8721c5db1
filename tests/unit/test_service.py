"""The server service's pure rules: power state names, who may act, a resize's flavor."""

from __future__ import annotations

import types

import pytest

from vtpm_driver import exception, servers, service
from vtpm_driver.context import RequestContext
from vtpm_driver.objects import Flavor, Instance

OWNER = RequestContext(user_id="u-owner", project_id="p-a", auth_token="t",
                       roles=("member",), user_name="alice", project_name="proj-a")


@pytest.mark.parametrize(
    ("state", "name"),
    [(0, "pending"), (1, "running"), (3, "paused"), (4, "shutdown"), (6, "crashed"),
     (7, "suspended"), (99, "state 99"), ("running", "running"), (None, "unknown")],
)
def test_power_state_names(state, name):
    assert service.power_state_name(types.SimpleNamespace(state=state)) == name


# -- who may act on a server (Nova's owner-project-or-admin rule) ---------------


def _ctx(project_id: str, roles: tuple[str, ...] = ("member",)):
    return RequestContext(user_id="u-1", project_id=project_id, auth_token="t",
                          roles=roles, user_name="alice")


def test_check_project_allows_project_members_and_admins():

    inst = Instance(name="vm", user_id="owner", project_id="proj-a")
    service.check_project(_ctx("proj-a"), inst, "reboot")
    service.check_project(_ctx("proj-x", roles=("admin",)), inst, "reboot")


def test_check_project_refuses_other_projects_naming_server_and_project():

    inst = Instance(name="vm", user_id="owner", project_id="proj-a")
    with pytest.raises(exception.NotAuthorized,
                       match=r"cannot stop server vm: it belongs to project proj-a and alice"):
        service.check_project(_ctx("proj-b"), inst, "stop")




def test_new_flavor_sets_unsets_and_resizes():
    old = Flavor(vcpus=1, memory_mb=256, extra_specs={"hw:tpm_version": "2.0", "x": "1"})
    new = service.new_flavor(old, {"hw:tpm_model": "tpm-crb"}, ["x"], None, 512)
    assert new.extra_specs == {"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"}
    assert (new.vcpus, new.memory_mb) == (1, 512)
    assert old.extra_specs == {"hw:tpm_version": "2.0", "x": "1"}  # the old one is untouched


def test_new_flavor_refuses_to_unset_what_is_not_there():
    old = Flavor(vcpus=1, memory_mb=256, extra_specs={"hw:tpm_version": "2.0"})
    with pytest.raises(exception.InvalidVTPMConfig,
                       match=r"'hw:nope': the server's flavor has no such extra spec "
                             r"\(it has: hw:tpm_version\)"):
        service.new_flavor(old, {}, ["hw:nope"], None, None)


def test_server_fields_name_an_invalid_request_and_never_the_passphrase():
    instance = servers.new_instance("vm1", OWNER, flavor_extra_specs={"hw:tpm_version": "2.0"})
    instance.flavor.extra_specs["hw:tpm_model"] = "tpm-crb"
    instance.flavor.extra_specs["hw:tpm_version"] = "1.2"
    fields = service.server_fields(instance, "running")
    assert list(fields)[: len(service.SHOW_FIELDS)] == list(service.SHOW_FIELDS)
    assert fields["vtpm"] is False and "tpm-crb needs TPM version 2.0" in fields["vtpm_error"]


def test_summary_fields_show_owner_name_or_id():
    instance = servers.new_instance("vm1", OWNER, flavor_extra_specs={"hw:tpm_version": "1.2"})
    summary = service.summary_fields(instance, "shutdown")
    assert (summary["owner"], summary["project"], summary["vtpm_version"]) == (
        "alice", "proj-a", "1.2")
    instance.user_name = None
    assert service.summary_fields(instance, "shutdown")["owner"] == "u-owner"


def test_configured_hosts_read_name_uri_items_and_tolerate_no_option():
    from oslo_config import cfg

    conf = cfg.ConfigOpts()
    conf.register_opts([cfg.ListOpt("hosts", default=[])], group="vtpm")
    conf([], default_config_files=[])
    assert service._configured_hosts(conf) == []
    conf.set_override("hosts", ["a=qemu+tcp://h:1/system", "b=", "c"], group="vtpm")
    assert service._configured_hosts(conf) == [("a", "qemu+tcp://h:1/system")]
    bare = cfg.ConfigOpts()
    bare.register_group(cfg.OptGroup("vtpm"))
    bare([], default_config_files=[])
    assert service._configured_hosts(bare) == []
