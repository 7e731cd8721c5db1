"""The driver's off-host, rescue and rebuild methods (issue 15), mixed into
:class:`~vtpm_driver.driver.VTPMDriver`.

Nova ``ComputeDriver``-shaped like the rest of the driver: each method holds the
server's lock (:meth:`~vtpm_driver.driver.VTPMDriver.server_operation`) and
delegates to :class:`~vtpm_driver.ops.rebuild.RebuildOps` (rebuild, rescue,
unrescue) or :class:`~vtpm_driver.ops.shelve.OffHostOps` (shelve, evacuate) over
this host's :class:`~vtpm_driver.ops.shelve.Site`: its guests and its swtpm
directory as seen from here (:attr:`~vtpm_driver.driver.VTPMDriver.state_base`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from vtpm_driver import exception, policy, statestore
from vtpm_driver.ops.guests import Guests
from vtpm_driver.ops.rebuild import RebuildOps
from vtpm_driver.ops.resize import ResizeOps
from vtpm_driver.ops.shelve import OffHostOps, Site


class OffHostMethods:
    """Rebuild, rescue, unrescue, shelve, evacuate (see the module docstring)."""

    conf: Any
    host_name: str
    guests: Guests
    state_base: str
    resize_ops: ResizeOps
    server_operation: Callable[..., contextlib.AbstractContextManager[Any]]

    def _site(self) -> Site:
        """This host for :mod:`vtpm_driver.ops.shelve`: its swtpm directory as seen from
        here (:attr:`state_base`). :raises InvalidConfiguration: it is unknown."""
        return Site(self.host_name, self.guests, self.state_base)

    def _offhost(self) -> OffHostOps:
        return OffHostOps(statestore.DirectoryStateStore(self.conf.vtpm.state_backup_dir))

    def rebuild(self, context: Any, instance: Any, image_meta: Any, injected_files: Any,
                admin_password: Any, allocations: Any, bdms: Any, detach_block_devices: Any,
                attach_block_devices: Any, network_info: Any = None, evacuate: bool = False,
                block_device_info: Any = None, preserve_ephemeral: bool = False,
                accel_uuids: Any = None, reimage_boot_volume: bool = False, *,
                reset_tpm: bool = False) -> None:
        """Boot ``image_meta``'s kernel/initrd/command line (None: the server's own) with
        the same TPM, as a reinstalled machine keeps its TPM (``reset_tpm``: a fresh
        TPM, new EK). ``evacuate``: :meth:`evacuate` (Nova evacuates by a rebuild on
        the destination). Volumes, injected files and passwords do not apply here.

        :raises VTPMSecretForbidden: ``user`` mode and not the owner (nothing touched).
        :raises VTPMError: rescued or suspended; bad boot files.
        """
        if evacuate:
            self.evacuate(context, instance)
            return
        with self.server_operation(context, instance, "rebuild"):
            RebuildOps(self.guests, self._site().state_base).rebuild(
                context, instance, kernel=getattr(image_meta, "kernel", None),
                initrd=getattr(image_meta, "initrd", None),
                cmdline=getattr(image_meta, "cmdline", None), reset_tpm=reset_tpm)

    def rescue(self, context: Any, instance: Any, network_info: Any, image_meta: Any,
               rescue_password: Any, block_device_info: Any, share_info: Any = None) -> None:
        """Boot the rescue image (``image_meta``'s boot files; None: the server's own with
        ``vtpm_rescue=1``) with the server's own vTPM; the PCRs differ, so secrets
        sealed to the normal boot stay sealed. No guest agent: ``rescue_password``
        is not used.

        :raises VTPMSecretForbidden: ``user`` mode and not the owner (nothing touched).
        :raises VTPMError: already rescued, or suspended.
        """
        with self.server_operation(context, instance, "rescue"):
            RebuildOps(self.guests, self._site().state_base).rescue(
                context, instance, kernel=getattr(image_meta, "kernel", None),
                initrd=getattr(image_meta, "initrd", None),
                cmdline=getattr(image_meta, "cmdline", None))

    def unrescue(self, context: Any, instance: Any) -> None:
        """Back to the normal boot, TPM state kept. :raises VTPMError: not rescued."""
        with self.server_operation(context, instance, "unrescue"):
            RebuildOps(self.guests, self._site().state_base).unrescue(context, instance)

    def shelve(self, context: Any, instance: Any, timeout: float = 0) -> None:
        """Stop the server, store its TPM state and record off-host (``[vtpm]
        state_backup_dir``), free this host; what Nova's shelve + shelve_offload do.

        :raises VTPMSecretForbidden: ``user`` mode and not the owner (nothing touched).
        :raises VTPMError: a resize or migration awaits confirm or revert, the server
            is suspended, or the copy failed (then it stays, stopped, on this host).
        """
        with self.server_operation(context, instance, "shelve"):
            if self.resize_ops.has_backup(instance.uuid) or policy.migrated_from(instance):
                raise exception.VTPMError(
                    f"cannot shelve server {policy.server_label(instance)}: a resize or "
                    "migration awaits confirm or revert")
            self._offhost().shelve(context, self._site(), instance, timeout=timeout)

    def evacuate(self, context: Any, instance: Any) -> None:
        """Rebuild on THIS host, from its off-host copy, a server whose host failed.

        The caller makes sure that host is down (Nova's API checks its compute
        service; ``vtpm-driver server evacuate`` connects to it): this host cannot
        tell a failed host from an unreachable one. ``instance`` gets the
        restored server's system metadata (``vtpm_evacuated_from``).

        :raises OperationNotSupportedForVTPM: no copy (names ``[vtpm]
            state_backup``), or only a stale one and ``[vtpm] allow_stale_tpm_state``
            is False.
        :raises VTPMSecretForbidden, InstanceExists: nothing touched.
        """
        with self.server_operation(context, instance, "evacuate"):
            restored, _age = self._offhost().evacuate(
                context, self._site(), instance.uuid,
                allow_stale=bool(self.conf.vtpm.allow_stale_tpm_state),
                mode=str(self.conf.vtpm.state_backup), label=policy.server_label(instance))
        instance.system_metadata.clear()
        instance.system_metadata.update(restored.system_metadata)
