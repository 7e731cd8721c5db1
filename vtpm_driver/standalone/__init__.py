"""The command line's servers on one host (no Nova): what ``vtpm-driver server`` calls.

* :mod:`.driver`: :class:`VTPMDriver`, the Nova ``ComputeDriver``-shaped facade
  over :mod:`vtpm_driver.ops` for the one host (pinned as
  ``vtpm_driver.driver.VTPMDriver``);
* :mod:`.backend`: :class:`ServerBackend`, that host: its driver and the server
  records over one libvirt connection, and the host probe asked once;
* :mod:`.servers`: a new server's request checked, stored servers found;
* :mod:`.service`: :class:`ServerService`, what Nova's API and compute manager
  add around the driver (find, authorize, lock, keep off-host copies in step);
* :mod:`.view`: a server as plain fields (pure).

Moving a server to another host is Nova's job, through the shim; nothing here
does it. :mod:`vtpm_driver.cli` calls :class:`ServerService`, and
:mod:`vtpm_driver.audit` works over the same backend.
"""
