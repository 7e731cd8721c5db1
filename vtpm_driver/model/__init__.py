"""The pure model: what a server is and asks for, and the rules over it. No I/O.

* :mod:`~vtpm_driver.model.server`: Instance / Flavor / ImageMeta (Nova's
  attribute names), UUID checks, the ``system_metadata`` keys and the readers
  of a server (its recorded secret, rescue mode, extra specs, image properties);
* :mod:`~vtpm_driver.model.request`: flavor + image -> :class:`VTPMConfig`,
  placement traits;
* :mod:`~vtpm_driver.model.rules`: who may do what, what an operation does to
  the TPM;
* :mod:`~vtpm_driver.model.custody`: which copy of a TPM state is current;
* :mod:`~vtpm_driver.model.hostcheck`: a host's probed facts -> traits and problems.

Nothing here talks to libvirt, Barbican, Keystone or the file system; every
layer may import it, and it imports only :mod:`vtpm_driver.exception` and
:mod:`vtpm_driver.conf` from the rest of the package.
"""
