"""The two test hosts with an off-host state store, for the issue 15 tests.

``cloud`` is test_migrate's fixture: :class:`tests.functional.test_migrate.Cloud`
(the service over host-a and host-b as
:func:`~tests.functional.fixtures_libvirt.configure_two_hosts` sets them, the
local Keymgr stack) with ``[vtpm] state_backup_dir`` in the test's own
directory. A test module uses it with::

    from tests.functional import fixtures_offhost
    cloud = fixtures_offhost.cloud

(pytest looks a fixture up in the requesting module; ``two_hosts``, which
``cloud`` uses, is fixtures_libvirt's and registered for every module).
"""

from __future__ import annotations

from pathlib import Path

from tests.functional.test_migrate import Cloud, cloud

__all__ = ["Cloud", "cloud", "store_dir"]


def store_dir(cloud: Cloud, server: dict) -> Path:
    """The server's copy in the state store."""
    return Path(cloud.conf.vtpm.state_backup_dir) / server["uuid"]
