"""standalone.servers: a new server's request checked at once; servers found from libvirt."""

from __future__ import annotations

import uuid

import pytest

from tests.unit.conftest import OWNER, Env, dataclasses_replace
from vtpm_driver import exception
from vtpm_driver.standalone import servers


def test_new_instance_refuses_a_bad_request_at_once() -> None:
    with pytest.raises(exception.FlavorImageConflict):
        servers.new_instance("x", OWNER, flavor_extra_specs={"hw:tpm_version": "2.0"},
                             image_properties={"hw_tpm_version": "1.2"})
    with pytest.raises(exception.InvalidVTPMConfig, match="flavor extra specs entry"):
        servers.new_instance("x", OWNER, flavor_extra_specs={"hw:tpm_version": 2})


def test_servers_round_trip_through_the_domain_record(env: Env) -> None:
    inst = env.spawn(env.instance(name="b"))
    env.spawn(env.instance(name="a"))
    found = servers.find(env.conn, inst.uuid)
    assert found == dataclasses_replace(inst)
    assert servers.find(env.conn, "b") == found
    assert [i.name for i in servers.list_all(env.conn)] == ["a", "b"]
    env.conn.defineXML(f"<domain><name>notours</name><uuid>{uuid.uuid4()}</uuid></domain>")
    with pytest.raises(exception.InstanceNotFound, match="not a vtpm-driver server"):
        servers.find(env.conn, "notours")
    with pytest.raises(exception.InstanceNotFound):
        servers.find(env.conn, "nothing")
