"""VTPMDriver over the fakes: refused operations (F6), C4, and the server store."""

from __future__ import annotations

import uuid

import pytest

from tests.unit.ops.conftest import (
    KERNEL,
    OWNER,
    Env,
    dataclasses_replace,
)
from vtpm_driver import exception, servers

# --------------------------------------------------------------------------- refused ops


@pytest.mark.parametrize(("call", "operation"), [
    (lambda d, i: d.rebuild(OWNER, i, None, [], None, {}, [], None, None), "rebuild"),
    (lambda d, i: d.rescue(OWNER, i, None, None, None, None, None), "rescue"),
    (lambda d, i: d.shelve(OWNER, i), "shelve"),
    (lambda d, i: d.evacuate(OWNER, i), "evacuate"),
    (lambda d, i: d.live_migration(OWNER, i, "h2", None, None), "live-migration"),
])
def test_f6_unsupported_operations(env: Env, call, operation: str) -> None:
    inst = env.instance()
    with pytest.raises(exception.OperationNotSupportedForVTPM) as err:
        call(env.drv, inst)
    assert str(err.value).startswith(
        f"operation '{operation}' is not supported for vTPM-enabled server 'vm1'")
    assert "Nova" in str(err.value)
    plain = servers.new_instance("plain", OWNER, kernel=KERNEL)
    with pytest.raises(exception.VTPMError, match="not implemented") as err:
        call(env.drv, plain)
    assert not isinstance(err.value, exception.OperationNotSupportedForVTPM)


def test_live_migration_reason_depends_on_the_mode(env: Env) -> None:
    with pytest.raises(exception.OperationNotSupportedForVTPM, match="not implemented"):
        env.drv.live_migration(OWNER, env.instance("host"), "h2", None, None)
    with pytest.raises(exception.OperationNotSupportedForVTPM, match="without the owner"):
        env.drv.live_migration(OWNER, env.instance("user"), "h2", None, None)


def test_c4_lists_domains_with_an_emulated_tpm(env: Env) -> None:
    with_tpm = env.spawn(env.instance(name="a"))
    env.spawn(servers.new_instance("b", OWNER, kernel=KERNEL))
    env.conn.defineXML(
        f"<domain><name>foreign</name><uuid>{uuid.uuid4()}</uuid><devices><tpm model='tpm-tis'>"
        "<backend type='passthrough'/></tpm></devices></domain>")
    assert env.drv._vtpm_servers_on_host() == [with_tpm.uuid]
    env.drv.conf.set_override("swtpm_enabled", False, group="libvirt")
    with pytest.raises(exception.InvalidConfiguration, match=with_tpm.uuid):
        env.drv.init_host()



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
