"""A create parses its request (flavor + image -> VTPMConfig) once, and passes it on.

ServerService.create refuses a bad request before the caller logs in; the
config it parsed then goes to the new instance and to the driver's spawn,
which do not parse it again.
"""

from __future__ import annotations

import pytest

from tests.fakes.service import FakeBackend
from tests.unit.conftest import KERNEL, OWNER, Env
from vtpm_driver import exception
from vtpm_driver.model import request
from vtpm_driver.standalone import servers
from vtpm_driver.standalone.service import ServerService


class Backend(FakeBackend):
    """The real driver (``env.drv``) under the fake backend's records."""

    def __init__(self, drv) -> None:
        super().__init__()
        self.driver = drv

    def resize_pending(self, instance) -> bool:
        return False


@pytest.fixture
def parsed(monkeypatch) -> list[tuple[dict, dict]]:
    """Every call of the one parser, whoever makes it."""
    calls: list[tuple[dict, dict]] = []
    real = request.get_vtpm_config

    def counting(flavor_extra_specs, image_properties):
        calls.append((dict(flavor_extra_specs or {}), dict(image_properties or {})))
        return real(flavor_extra_specs, image_properties)

    monkeypatch.setattr(request, "get_vtpm_config", counting)
    return calls


def service(env: Env, logins: list[str]) -> ServerService:
    env.drv.conf.set_override("lock_path", str(env.tmp / "locks"), group="vtpm")
    env.drv.conf.set_override("state_backup_dir", str(env.tmp / "store"), group="vtpm")
    return ServerService(env.drv.conf, Backend(env.drv),
                         lambda: logins.append("login") or OWNER)


def test_create_parses_the_request_once(env: Env, parsed) -> None:
    specs = {"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb",
             "hw:tpm_secret_security": "host"}
    service(env, []).create("vm1", flavor_extra_specs=specs, image_properties={},
                            kernel=KERNEL)
    assert parsed == [(specs, {})]
    (dom,) = env.conn.domains.values()
    assert "tpm-crb" in dom.XMLDesc()


def test_create_without_a_vtpm_parses_once_too(env: Env, parsed) -> None:
    service(env, []).create("plain", flavor_extra_specs={}, image_properties={},
                            kernel=KERNEL)
    assert parsed == [({}, {})]


def test_a_bad_request_is_refused_before_login_and_nothing_is_created(env: Env,
                                                                      parsed) -> None:
    logins: list[str] = []
    with pytest.raises(exception.InvalidVTPMConfig):
        service(env, logins).create("vm1", image_properties={}, kernel=KERNEL,
                                    flavor_extra_specs={"hw:tpm_version": "3.0"})
    assert len(parsed) == 1 and logins == [] and env.conn.domains == {}


def test_the_driver_alone_still_parses_what_it_is_given(env: Env, parsed) -> None:
    inst = servers.new_instance("vm1", OWNER, kernel=KERNEL,
                                flavor_extra_specs={"hw:tpm_version": "2.0"})
    env.spawn(inst)
    assert len(parsed) == 2  # new_instance (SPEC A6) and spawn: two callers, no service
