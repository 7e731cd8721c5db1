"""keymgr.api: the Barbican key manager and the unit tests' fake keep both interfaces."""

from __future__ import annotations

import inspect

import pytest

from tests.fakes.keymgr import FakeKeyManager
from vtpm_driver.keymgr import api
from vtpm_driver.keymgr.barbican import KeyManager


def _members(protocol: type) -> list[str]:
    return [name for name, value in vars(protocol).items()
            if inspect.isfunction(value) and not name.startswith("_")]


@pytest.mark.parametrize("protocol", [api.KeyManagerAPI, api.KeyManagerAuditAPI])
@pytest.mark.parametrize("implementation", [KeyManager, FakeKeyManager])
def test_implementations_have_every_method(protocol: type, implementation: type) -> None:
    members = _members(protocol)
    assert members
    for name in members:
        wanted = list(inspect.signature(getattr(protocol, name)).parameters)
        got = list(inspect.signature(getattr(implementation, name)).parameters)
        assert got == wanted, f"{implementation.__name__}.{name}{got} != {wanted}"
