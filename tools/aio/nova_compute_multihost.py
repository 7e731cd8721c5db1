"""nova-compute for the test hosts of the all-in-one cloud (host-a ... host-d).

Nova's ``nova-compute`` plus ONE test-environment change: live migrations get
libvirt's ``VIR_MIGRATE_UNSAFE`` flag. Both hosts keep their instances in one
local directory (``instances_path``, shared because they run on one machine,
as Nova assumes for a destination with the same ``my_ip``), but libvirt only
trusts network/cluster filesystems as shared storage and refuses with
"Unsafe migration: Migration without shared storage is unsafe". Between real
hosts the instances directory is NFS/Ceph and this flag is not needed; nothing
of the vTPM handling depends on it (the TPM state travels in the migration
stream). Run by tools/openstack-aio.sh with the AIO virtualenv's Python.
"""

import sys

from nova.cmd import compute  # first: Nova's own start-up (eventlet monkey patching)
from nova.virt.libvirt import driver as libvirt_driver

_prepare_migration_flags = libvirt_driver.LibvirtDriver._prepare_migration_flags


def _with_unsafe(self):  # type: ignore[no-untyped-def]
    live, block = _prepare_migration_flags(self)
    return live | libvirt_driver.libvirt.VIR_MIGRATE_UNSAFE, block


libvirt_driver.LibvirtDriver._prepare_migration_flags = _with_unsafe

if __name__ == "__main__":
    sys.exit(compute.main())
