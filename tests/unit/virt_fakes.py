"""Deprecated: the fake libvirt lives in :mod:`tests.fakes.libvirt`.

Kept only because ``tests/nova/nova_fakes.py`` still imports ``FakeConn`` from
here; remove once it imports from ``tests.fakes.libvirt``.
"""

from tests.fakes.libvirt import FakeConn, FakeSecret, libvirt_error

__all__ = ["FakeConn", "FakeSecret", "libvirt_error"]
