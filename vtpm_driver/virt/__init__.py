"""The libvirt side of the driver: the ONLY package that imports ``libvirt``.

Modules, lowest first (each imports only the ones before it):

* :mod:`~vtpm_driver.virt.connection`: open libvirt; the one classification of
  ``libvirtError`` into :mod:`vtpm_driver.exception` types.
* :mod:`~vtpm_driver.virt.secret`: the libvirt ``vtpm`` secret that carries the
  passphrase to swtpm (SPEC E1, E3); ``LibvirtSecretStore``.
* :mod:`~vtpm_driver.virt.domain`: pure domain XML (``<tpm>``, a minimal guest) (E2).
* :mod:`~vtpm_driver.virt.record`: the server model
  (:class:`vtpm_driver.model.server.Instance`) serialised in the domain's ``<metadata>``.
* :mod:`~vtpm_driver.virt.state`: swtpm state directories on disk (SPEC G2).
* :mod:`~vtpm_driver.virt.guest`: thin operations on one domain (define, start,
  power off, managed save, undefine keeping or dropping the TPM state) and
  its power state in Nova's names.
* :mod:`~vtpm_driver.virt.domains`: questions about all domains (our servers,
  domains with an emulated TPM).
* :mod:`~vtpm_driver.virt.probe`: the real host probe (libvirt, ``PATH``, users).

Nothing is re-exported here so that importing the package stays cheap.
"""
