"""libvirt error mapping and the lazy connection (no libvirtd needed)."""

from __future__ import annotations

import libvirt
import pytest

from tests.fakes.libvirt import libvirt_error
from vtpm_driver import exception
from vtpm_driver.virt import connection


def test_error_name_knows_codes_and_falls_back() -> None:
    assert connection.error_name(libvirt.VIR_ERR_NO_SECRET) == "VIR_ERR_NO_SECRET"
    assert connection.error_name(libvirt.VIR_ERR_INTERNAL_ERROR) == "VIR_ERR_INTERNAL_ERROR"
    assert connection.error_name(99999) == "code 99999"
    assert connection.error_name(None) == "unknown error"


@pytest.mark.parametrize(
    ("code", "domain", "expected"),
    [
        (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU, exception.InstanceNotFound),
        (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_FROM_NONE, exception.HypervisorUnavailable),
        (libvirt.VIR_ERR_INVALID_CONN, libvirt.VIR_FROM_NONE, exception.HypervisorUnavailable),
        (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, exception.HypervisorUnavailable),
        (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_RPC, exception.HypervisorUnavailable),
        (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_REMOTE, exception.HypervisorUnavailable),
        # The same codes from the hypervisor itself are operation failures, not outages.
        (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_QEMU, exception.VirtError),
        (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_QEMU, exception.VirtError),
        (libvirt.VIR_ERR_NO_SECRET, libvirt.VIR_FROM_SECRET, exception.VirtError),
    ],
)
def test_to_vtpm_error_maps_by_code_and_domain(
    code: int, domain: int, expected: type[exception.VTPMError]
) -> None:
    raw = libvirt_error(code, domain, "the\n  reason")
    mapped = connection.to_vtpm_error(raw, "start domain 'vm1'")
    assert type(mapped) is expected
    text = str(mapped)
    assert text.startswith("start domain 'vm1' failed: the reason (")
    assert connection.error_name(code) in text
    assert "\n" not in text


def test_libvirt_error_code_follows_cause() -> None:
    raw = libvirt_error(libvirt.VIR_ERR_NO_SECRET, libvirt.VIR_FROM_SECRET)
    try:
        try:
            raise raw
        except libvirt.libvirtError as exc:
            raise connection.to_vtpm_error(exc, "x") from exc
    except exception.VTPMError as mapped:
        assert connection.libvirt_error_code(mapped) == libvirt.VIR_ERR_NO_SECRET
    assert connection.libvirt_error_code(raw) == libvirt.VIR_ERR_NO_SECRET
    assert connection.libvirt_error_code(ValueError("x")) is None
    assert connection.libvirt_error_code(None) is None


def test_connect_failure_is_one_line_naming_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(uri: str) -> None:
        raise libvirt_error(
            libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, "Failed to connect socket"
        )

    monkeypatch.setattr(libvirt, "open", fail)
    with pytest.raises(exception.HypervisorUnavailable) as info:
        connection.connect("qemu:///nowhere")
    text = str(info.value)
    assert "'qemu:///nowhere'" in text
    assert "Failed to connect socket" in text
    assert "\n" not in text
    assert connection.libvirt_error_code(info.value) == libvirt.VIR_ERR_SYSTEM_ERROR


def test_connect_silences_libvirt_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    registered = []
    monkeypatch.setattr(libvirt, "registerErrorHandler", lambda f, ctx: registered.append(f))
    monkeypatch.setattr(libvirt, "open", lambda uri: object())
    connection.connect("qemu:///system")
    assert registered == [connection._ignore_error]


def test_real_open_failure_prints_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    # A URI the qemu driver rejects locally: no daemon needed, libvirt would
    # otherwise print "libvirt:  error : ..." on stderr. Restore libvirt's
    # printing handler first, so the test shows connect() silences it.
    libvirt.registerErrorHandler(None, None)
    with pytest.raises(exception.HypervisorUnavailable):
        connection.connect("qemu:///no-such-path")
    out, err = capfd.readouterr()
    assert out == ""
    assert err == ""


class _FakeConn:
    def __init__(self) -> None:
        self.alive = True
        self.closed = False

    def isAlive(self) -> int:
        return int(self.alive)

    def close(self) -> int:
        self.closed = True
        return 0


def test_hypervisor_connects_lazily_once(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[_FakeConn] = []

    def fake_connect(uri: str) -> _FakeConn:
        opened.append(_FakeConn())
        return opened[-1]

    monkeypatch.setattr(connection, "connect", fake_connect)
    hv = connection.Hypervisor("qemu:///system")
    assert opened == []
    first = hv.conn
    assert hv.conn is first
    assert len(opened) == 1
    assert "qemu:///system" in repr(hv)


def test_hypervisor_reconnects_after_loss_and_closes(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[_FakeConn] = []

    def fake_connect(uri: str) -> _FakeConn:
        opened.append(_FakeConn())
        return opened[-1]

    monkeypatch.setattr(connection, "connect", fake_connect)
    with connection.Hypervisor("qemu:///system") as hv:
        first = hv.conn
        first.alive = False
        second = hv.conn
        assert second is not first
        assert first.closed
    assert second.closed
    assert len(opened) == 2
