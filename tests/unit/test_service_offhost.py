"""ServerService's off-host actions on two fake hosts: each host's site (its guests and
swtpm directory) comes from its backend's ``state_base``, never from this machine's
``[vtpm] swtpm_state_dir``, and a host missing from ``[vtpm] host_state_dirs`` is
refused before anything moves."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit import test_hosts
from vtpm_driver import exception
from vtpm_driver.hosts import CachedHostProbe


@pytest.fixture(autouse=True)
def _fresh_facts():
    CachedHostProbe.forget()
    yield
    CachedHostProbe.forget()


@pytest.fixture
def world(tmp_path):
    return test_hosts.World(tmp_path)


def _create_on_b(world) -> str:
    created = world.service(host="host-b").create(
        "vm1", flavor_extra_specs={"hw:tpm_version": "2.0"}, image_properties={},
        kernel="/boot/k", initrd="/boot/i")
    return created["uuid"]


def _planted(base: Path, name: str) -> Path:
    path = base / name / "tpm2"
    path.mkdir(parents=True)
    (path / "tpm2-00.permall").write_bytes(b"planted")
    return base / name


def test_each_hosts_site_is_its_backends_state_base(world):
    service = world.service(host="host-a")
    for name in ("host-a", "host-b"):
        site = service.site(name)
        assert site.name == name
        assert site.state_base == service._hosts.backend(name).state_base
        assert site.state_base == str(world.conns[name].state_base)
    assert service.site().name == "host-a"  # default: the host the command acts on
    assert str(world.local) not in {service.site(n).state_base for n in ("host-a", "host-b")}


def test_shelve_on_host_b_and_unshelve_on_host_a_use_their_own_directories(world):
    uuid = _create_on_b(world)
    on_b = Path(world.conns["host-b"].state_base, uuid)
    ek = (on_b / "tpm2" / "tpm2-00.permall").read_bytes()
    local = _planted(world.local, uuid)  # same UUID on this machine: not host-b's
    world.service().shelve("vm1")
    assert not on_b.exists() and world.where(uuid) == []
    stored = Path(world.conf.vtpm.state_backup_dir, uuid)
    assert [p.read_bytes() for p in stored.rglob("tpm2-00.permall")] == [ek]
    world.service().unshelve("vm1", host="host-a")
    assert world.where(uuid) == ["host-a"]
    on_a = Path(world.conns["host-a"].state_base, uuid, "tpm2", "tpm2-00.permall")
    assert on_a.read_bytes() == ek
    assert (local / "tpm2" / "tpm2-00.permall").read_bytes() == b"planted"


def test_a_site_of_a_host_missing_from_host_state_dirs_is_refused(world):
    uuid = _create_on_b(world)
    world.conf.set_override("host_state_dirs",
                            {"host-a": str(world.conns["host-a"].state_base)}, group="vtpm")
    service = world.service(host="host-b")
    for what in (lambda: service.site(), lambda: service.shelve("vm1")):
        with pytest.raises(exception.InvalidConfiguration,
                           match=r"\[vtpm\] host_state_dirs does not name host 'host-b': "
                                 r"cannot tell where it keeps its swtpm state"):
            what()
    assert world.where(uuid) == ["host-b"]
    assert world.conns["host-b"].domains[uuid].active
    assert Path(world.conns["host-b"].state_base, uuid).exists()
    assert not Path(world.conf.vtpm.state_backup_dir, uuid).exists()
    assert service.site("host-a").state_base == str(world.conns["host-a"].state_base)
