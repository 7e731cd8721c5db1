"""vtpm_driver.standalone.view: how a server is shown (power state names, show/list fields)."""

from __future__ import annotations

import types

import pytest

from vtpm_driver.keymgr.context import RequestContext
from vtpm_driver.standalone import servers, view

OWNER = RequestContext(user_id="u-owner", project_id="p-a", auth_token="t",
                       roles=("member",), user_name="alice", project_name="proj-a")


@pytest.mark.parametrize(
    ("state", "name"),
    [(0, "pending"), (1, "running"), (3, "paused"), (4, "shutdown"), (6, "crashed"),
     (7, "suspended"), (99, "state 99"), ("running", "running"), (None, "unknown")],
)
def test_power_state_names(state, name):
    assert view.power_state_name(types.SimpleNamespace(state=state)) == name


def test_server_fields_name_an_invalid_request_and_never_the_passphrase():
    instance = servers.new_instance("vm1", OWNER, flavor_extra_specs={"hw:tpm_version": "2.0"})
    instance.flavor.extra_specs["hw:tpm_model"] = "tpm-crb"
    instance.flavor.extra_specs["hw:tpm_version"] = "1.2"
    fields = view.server_fields(instance, "running")
    assert list(fields)[: len(view.SHOW_FIELDS)] == list(view.SHOW_FIELDS)
    assert fields["vtpm"] is False and "tpm-crb needs TPM version 2.0" in fields["vtpm_error"]


def test_summary_fields_show_owner_name_or_id():
    instance = servers.new_instance("vm1", OWNER, flavor_extra_specs={"hw:tpm_version": "1.2"})
    summary = view.summary_fields(instance, "shutdown")
    assert (summary["owner"], summary["project"], summary["vtpm_version"]) == (
        "alice", "proj-a", "1.2")
    instance.user_name = None
    assert view.summary_fields(instance, "shutdown")["owner"] == "u-owner"
