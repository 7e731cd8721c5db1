"""Orchestration of vTPM operations, written once for the standalone driver and the Nova shim.

Modules here decide nothing themselves (rules are in :mod:`vtpm_driver.model.rules`
and :mod:`vtpm_driver.model.request`); they order the steps: passphrase first, then the
guest; define and always undefine the libvirt secret; move, back up and
restore TPM state. They reach libvirt only through :mod:`vtpm_driver.virt` (or
the Nova shim's adapters of the same interfaces) and Barbican only through a
:class:`vtpm_driver.keymgr.KeyManagerAPI`.
"""
