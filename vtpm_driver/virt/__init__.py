"""The libvirt side of the driver: connection, vTPM secrets, domain XML, swtpm state.

Modules, lowest first (each imports only the ones before it):

* :mod:`~vtpm_driver.virt.connection`: open libvirt, map ``libvirtError`` to
  :mod:`vtpm_driver.exception` types.
* :mod:`~vtpm_driver.virt.secret`: the libvirt ``vtpm`` secret that carries the
  passphrase to swtpm (SPEC E1, E3).
* :mod:`~vtpm_driver.virt.domain`: pure domain XML (``<tpm>``, a minimal guest,
  the server record in ``<metadata>``) (SPEC E2).
* :mod:`~vtpm_driver.virt.state`: swtpm state directories on disk (SPEC G2).
* :mod:`~vtpm_driver.virt.guest`: thin operations on a domain (define, start,
  power off, undefine keeping or dropping the TPM state).

Nothing is re-exported here so that importing the package stays cheap.
"""
