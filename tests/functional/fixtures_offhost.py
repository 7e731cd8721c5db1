"""The two test hosts with an off-host state store, for the issue 15 tests.

``cloud`` is :class:`tests.functional.test_migrate.Cloud` (the service over
host-a and host-b as :func:`~tests.functional.fixtures_libvirt.configure_two_hosts`
sets them, the local Keymgr stack) with ``[vtpm] state_backup_dir`` in the
test's own directory. A test module uses it with::

    from tests.functional import fixtures_offhost
    cloud = fixtures_offhost.cloud

(pytest looks a fixture up in the requesting module; ``two_hosts``, which
``cloud`` uses, is fixtures_libvirt's and registered for every module).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from keystoneauth1 import session as ks_session

from tests.functional.fixtures_keymgr import KeymgrStack
from tests.functional.fixtures_libvirt import TestGuest, configure_two_hosts
from tests.functional.fixtures_server import driver_conf
from tests.functional.test_migrate import Cloud
from vtpm_driver.context import RequestContext


@pytest.fixture
def cloud(two_hosts, keymgr_stack: KeymgrStack,
          clouds: dict[str, dict[str, str]], stack_contexts: dict[str, RequestContext],
          test_guest: TestGuest, keystone_session: Callable[..., ks_session.Session],
          tmp_path: Path) -> Iterator[Cloud]:
    """host-a and host-b through the service, copies stored under ``tmp_path``."""
    os.chmod(tmp_path, 0o755)
    conf = driver_conf(keymgr_stack, clouds["service"], tmp_path / "console")
    configure_two_hosts(conf)
    conf.set_override("state_backup_dir", str(tmp_path / "store"), group="vtpm")
    env = Cloud(conf=conf, contexts=stack_contexts, guest=test_guest, conns=two_hosts,
                stack=keymgr_stack, admin=keystone_session("admin", project_name="vtpm-a"))
    try:
        yield env
    finally:
        leftovers = env.sweep()
    if leftovers:
        pytest.fail("cleanup had to sweep: " + "; ".join(leftovers), pytrace=False)


def store_dir(cloud: Cloud, server: dict) -> Path:
    """The server's copy in the state store."""
    return Path(cloud.conf.vtpm.state_backup_dir) / server["uuid"]
