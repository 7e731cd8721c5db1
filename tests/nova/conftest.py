"""Tests of the Nova shim (``nova.virt.vtpm``) against the real nova 34 wheel.

They run only in an interpreter where Nova is installed, with vtpm-driver
installed into it (which adds ``nova/virt/vtpm``)::

    /var/lib/vtpm-driver/nova-dev-venv/bin/python -m pytest tests/nova

The main suite's interpreter (``.venv``) has no Nova: there nothing in this
directory is collected at all (not skipped), so a plain ``pytest`` run is
unaffected. The check imports ``nova.version`` rather than ``nova``, because
this repository's ``nova/`` directory (which holds only ``nova/virt/vtpm``)
is importable as a namespace package from the repository root.

Every test here runs with castellan booby-trapped: the shim must never reach
Nova's castellan-based vTPM secret code.
"""

import importlib.util
import pathlib
from typing import Any

import pytest

try:
    from nova import version  # noqa: F401 - the installed Nova, not our namespace dir
except ImportError:
    collect_ignore_glob = ["*"]
else:
    # Test this checkout's shim even when the venv has another checkout
    # installed editable (its finder maps nova.virt.vtpm there).
    import nova.virt

    _VIRT = str(pathlib.Path(__file__).resolve().parents[2] / "nova" / "virt")
    if _VIRT not in nova.virt.__path__:
        nova.virt.__path__.insert(0, _VIRT)
    if importlib.util.find_spec("nova.virt.vtpm") is None:
        raise pytest.UsageError(
            "Nova is installed in this interpreter but nova.virt.vtpm is not: install "
            "vtpm-driver into it (pip install -e <repo>; pyproject.toml must list "
            "'nova.virt.vtpm*' in [tool.setuptools.packages.find] include)"
        )

    import castellan.key_manager
    from nova import crypto

    class CastellanReached(AssertionError):
        """Raised when anything reaches castellan."""

    @pytest.fixture(autouse=True)
    def no_castellan(monkeypatch: pytest.MonkeyPatch) -> None:
        """Any way into castellan (Nova's crypto module or castellan itself) fails."""

        def trap(*args: Any, **kwargs: Any) -> None:
            raise CastellanReached("castellan was used for a vTPM secret")

        monkeypatch.setattr(crypto, "_get_key_manager", trap)
        monkeypatch.setattr(castellan.key_manager, "API", trap)

    # The shim's driver over fakes (tests/nova/nova_fakes.py), for every module here;
    # a module that needs another one defines its own (pytest: the nearest wins).
    from nova.virt import fake as fake_virt

    from nova.virt.vtpm.driver import VTPMLibvirtDriver
    from tests.nova.nova_fakes import FakeKeyManager, FakeLibvirt, FakeProbe, Flags, nova_ctx

    @pytest.fixture
    def flags():
        overrides = Flags()
        overrides.config(group="libvirt", virt_type="qemu", swtpm_enabled=True)
        yield overrides
        overrides.clear()

    @pytest.fixture
    def log() -> list:
        return []

    @pytest.fixture
    def keymgr(log) -> FakeKeyManager:
        return FakeKeyManager(log)

    @pytest.fixture
    def conn() -> FakeLibvirt:
        return FakeLibvirt()

    @pytest.fixture
    def drv(flags, keymgr, conn, monkeypatch):
        driver = VTPMLibvirtDriver(fake_virt.FakeVirtAPI(), key_manager=keymgr,
                                   host_probe=FakeProbe())
        monkeypatch.setattr(driver._host, "get_connection", lambda: conn)
        return driver

    @pytest.fixture
    def ctx():
        return nova_ctx()
