"""Rescue, unrescue and rebuild of a server with a vTPM (issue 15 items 4, 5).

* rescue: the server boots another kernel/initrd/command line (default: its
  own with ``vtpm_rescue=1``) with the SAME vTPM. Under another boot chain the
  PCRs differ, so secrets sealed to the normal boot stay sealed. The record
  keeps the normal boot and marks the server rescued
  (``system_metadata['vtpm_rescued']``).
* unrescue: back to the normal boot, TPM state kept.
* rebuild: a new image (kernel/initrd/command line) keeps the TPM, as
  reinstalling a physical machine keeps its TPM. ``reset_tpm`` manufactures
  a fresh one instead (new EK): the old state directory is removed (the
  domain stays defined, so its record never leaves libvirt) and libvirt runs
  ``swtpm_setup`` at the next start. The Barbican secret stays: the same
  passphrase encrypts the new state. The new TPM gets a new custody
  generation (:func:`vtpm_driver.model.custody.advance`): nothing can start the old
  state again. A plain rebuild keeps the TPM in place (no copy is made), so
  it keeps its generation.

Each is a restart: the passphrase is fetched BEFORE the guest is touched
(a ``user`` mode server needs its owner), then the guest is powered off,
redefined and started with the secret only around the start.
"""

from __future__ import annotations

from typing import Any

from oslo_log import log as logging

from vtpm_driver import exception, faults
from vtpm_driver.model import custody, rules
from vtpm_driver.model.server import RESCUE_KEY, is_rescued, server_label
from vtpm_driver.ops.guests import Guests
from vtpm_driver.virt import guest, state

LOG = logging.getLogger(__name__)


class RebuildOps:
    """rescue, unrescue, rebuild over one host's :class:`Guests`."""

    def __init__(self, guests: Guests, state_base: str | None = None) -> None:
        self.guests = guests
        self.state_base = state_base or guests.state_base

    def __repr__(self) -> str:
        return f"RebuildOps({self.guests!r})"

    def _restart(self, context: Any, instance: Any, xml_of: Any, *,
                 reset_tpm: bool = False) -> None:
        """Power off, (``reset_tpm``: remove the TPM state,) redefine, start.

        The domain is never undefined, only redefined in place: its record
        (owner, flavor, ``vtpm_secret_uuid``) is in libvirt at every step, so a
        process killed anywhere leaves the server findable and its Barbican
        secret owned (issue 20 defect 3; an undefined domain made ``audit
        --repair`` delete that secret). The state goes before the new
        definition: killed in between, the server keeps its old boot files and
        gets its fresh TPM at the next start (the new image never meets the old
        TPM); the rebuild can be run again.

        :raises VTPMError: suspended; or a step failed (see the callers).
        """
        cfg = rules.vtpm_of(instance)
        dom = self.guests.lookup(instance)
        if guest.has_managed_save(dom):
            raise exception.VTPMError(
                f"server {server_label(instance)} is suspended: resume it first")
        reset = reset_tpm and cfg is not None
        start = self.guests.prepare_start(context, instance, cfg, absent_ok=reset)
        if reset:
            faults.point("reset.after_secret_fetch")
            custody.advance(instance)  # a new TPM: a new generation, in the record first
        xml = xml_of(cfg)
        guest.destroy(dom)
        if reset:
            faults.point("reset.after_destroy")
            # A fresh TPM: swtpm_setup manufactures one at the next start when
            # there is no state. The domain stays defined (see above), and so
            # does the generation file: killed here, the next start (or this
            # rebuild again) makes the new TPM the user asked for.
            state.remove_tpm(self.state_base, instance.uuid)
            faults.point("reset.after_remove")
            # The old TPM's EK certificate goes; with the deployment's EK CA the new
            # TPM is made now and its certificate published, else libvirt makes it.
            self.guests.retire_ek_certificate(context, instance, cfg)
            self.guests.manufacture(context, instance, cfg, start)
            xml = xml_of(cfg)  # the record says which certificate is published now
        dom = guest.define(self.guests.conn, xml)
        if reset:
            self.guests.stamp(instance, dom)  # the new TPM's directory carries it
            faults.point("reset.after_define")
        self.guests.launch(dom, instance, start)

    def rescue(self, context: Any, instance: Any, *, kernel: str | None = None,
               initrd: str | None = None, cmdline: str | None = None) -> None:
        """Boot the rescue image with the server's own vTPM.

        :raises VTPMError: already rescued, or suspended.
        :raises VTPMSecretForbidden: ``user`` mode, not the owner (nothing touched).
        """
        label = server_label(instance)
        if is_rescued(instance):
            raise exception.VTPMError(f"server {label} is in rescue mode already")
        boot = rules.rescue_boot(instance.image_meta, kernel, initrd, cmdline)

        def rescue_xml(cfg: Any) -> str:
            normal = instance.image_meta
            saved = (normal.kernel, normal.initrd, normal.cmdline)
            normal.kernel, normal.initrd, normal.cmdline = boot
            try:
                base = self.guests.base_xml(instance)
            finally:
                normal.kernel, normal.initrd, normal.cmdline = saved
            instance.system_metadata[RESCUE_KEY] = "1"
            return self.guests.domain_xml(instance, cfg, base)

        try:
            self._restart(context, instance, rescue_xml)
        except BaseException:
            instance.system_metadata.pop(RESCUE_KEY, None)
            raise
        LOG.info("Rescued server %s (same vTPM)", instance.name, instance_uuid=instance.uuid)

    def unrescue(self, context: Any, instance: Any) -> None:
        """Back to the normal boot, TPM state kept. :raises VTPMError: not rescued."""
        if not is_rescued(instance):
            raise exception.VTPMError(
                f"server {server_label(instance)} is not in rescue mode")

        def normal_xml(cfg: Any) -> str:
            instance.system_metadata.pop(RESCUE_KEY, None)
            return self.guests.domain_xml(instance, cfg)

        self._restart(context, instance, normal_xml)
        LOG.info("Unrescued server %s", instance.name, instance_uuid=instance.uuid)

    def rebuild(self, context: Any, instance: Any, *, kernel: str | None = None,
                initrd: str | None = None, cmdline: str | None = None,
                reset_tpm: bool = False) -> bool:
        """Boot a new image; the TPM is kept unless ``reset_tpm``. Returns whether it was reset.

        :raises VTPMError: rescued (unrescue first) or suspended; bad boot files
            (checked before the guest is touched).
        """
        label = server_label(instance)
        if is_rescued(instance):
            raise exception.VTPMError(f"server {label} is in rescue mode: unrescue it first")
        image = instance.image_meta
        old = (image.kernel, image.initrd, image.cmdline)
        image.kernel = kernel or image.kernel
        image.initrd = initrd if initrd is not None else image.initrd
        image.cmdline = cmdline if cmdline is not None else image.cmdline
        try:
            self._restart(context, instance, lambda cfg: self.guests.domain_xml(instance, cfg),
                          reset_tpm=reset_tpm)
        except BaseException:
            image.kernel, image.initrd, image.cmdline = old
            raise
        reset = reset_tpm and rules.has_vtpm(instance)
        LOG.info("Rebuilt server %s (%s)", instance.name,
                 "fresh TPM: new endorsement key" if reset else "TPM kept",
                 instance_uuid=instance.uuid)
        return reset
