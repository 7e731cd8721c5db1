"""``VTPMLibvirtDriver``: Nova's libvirt driver with every vTPM decision made by vtpm_driver.

Load it with ``[DEFAULT] compute_driver = vtpm.VTPMLibvirtDriver`` (see
README.rst beside this file). It is Nova's ``LibvirtDriver`` except for the
vTPM seams below, each a translation between Nova's objects and this
project's package:

============================================  =========================================
Nova method (overridden)                      routed to
============================================  =========================================
``_check_vtpm_support`` (init_host)           :func:`vtpm_driver.host.check_host`
``_get_tpm_traits`` (placement traits)        ``check_host(...).traits`` (all 7 traits)
``hardware.get_vtpm_constraint`` (8 calls)    :mod:`vtpm_driver.spec` (:mod:`.seams`)
``_add_vtpm_device`` (guest XML)              :func:`vtpm_driver.virt.domain.add_tpm`
``_get_or_create_secret_for_vtpm``            :class:`vtpm_driver.keymgr.KeyManager` +
                                              :mod:`vtpm_driver.virt.secret`
``spawn``, ``finish_migration``               passphrase created (owner-only ACL) first
``_hard_reboot`` (reboot, power on),          passphrase fetched BEFORE the guest (or
``resume``, ``finish_revert_migration``       its VIFs) is touched
``destroy`` (server delete)                   Barbican secret deleted through our
                                              KeyManager before the guest is touched
``cleanup``                                   libvirt secret undefined through
                                              :mod:`vtpm_driver.virt.secret`
``_cleanup_resize_vtpm``,                     Barbican secret of a removed vTPM
``_finish_revert_migration_vtpm``             deleted through our KeyManager
``_finish_migration_vtpm``                    no second secret for a vTPM gained
``rebuild``, ``rescue``, ``power_off`` and    ``OperationNotSupportedForVTPM`` (Nova's
``destroy`` while shelving,                   own exception; its API refuses these
``check_can_live_migrate_source``             first, with HTTP 400)
============================================  =========================================

Nova never reaches castellan for a vTPM on this driver: the compute manager's
own ``nova.vtpm.delete_secret`` call at the end of a delete finds no
``vtpm_secret_uuid`` left, because :meth:`VTPMLibvirtDriver.destroy` has
already deleted the secret and removed the key.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import nova.conf
from nova import exception as nova_exception
from nova.compute import instance_actions, task_states, vm_states
from nova.virt.libvirt import driver as libvirt_driver
from oslo_log import log as logging

from nova.virt.vtpm import release, seams, translate
from vtpm_driver import conf as vtpm_conf
from vtpm_driver import exception, keymgr, spec, vtpm_ops
from vtpm_driver.host import HostProbe, HostReport, LibvirtHostProbe, check_host
from vtpm_driver.virt import secret

LOG = logging.getLogger(__name__)
CONF = nova.conf.CONF

SYSMETA_KEY = keymgr.SYSMETA_KEY

# What a power_off or destroy is part of, told by the task state Nova set.
_REFUSED_TASKS = {
    task_states.SHELVING: instance_actions.SHELVE,
    task_states.SHELVING_OFFLOADING: instance_actions.SHELVE_OFFLOAD,
}
_DELETING_VM_STATES = (vm_states.DELETED, vm_states.SOFT_DELETED)


class NovaConnectionProbe(LibvirtHostProbe):
    """The package's host probe over the libvirt connection Nova's ``Host`` owns.

    ``close`` only forgets the connection: closing it would cut Nova off.
    """

    def __init__(self, nova_host: Any) -> None:
        super().__init__(vtpm_conf.libvirt_uri(CONF),
                         open_connection=lambda _uri: nova_host.get_connection())

    def close(self) -> None:
        self._conn = None


class LibvirtSecretHandle:
    """What Nova's ``_create_guest`` does with the secret we return: ``undefine()`` it.

    Undefining goes through :func:`vtpm_driver.virt.secret.undefine_vtpm_secret`
    (idempotent, errors mapped), not the raw ``virSecret``.
    """

    def __init__(self, conn: Any, secret_uuid: str) -> None:
        self._conn = conn
        self._uuid = secret_uuid

    def __repr__(self) -> str:
        return f"LibvirtSecretHandle({self._uuid!r})"

    def UUIDString(self) -> str:
        return self._uuid

    def undefine(self) -> None:
        with translate.nova_errors():
            secret.undefine_vtpm_secret(self._conn, self._uuid)


def _being_deleted(instance: Any) -> bool:
    """Whether ``destroy`` is part of deleting the server (not reboot, resize, shelve...)."""
    if getattr(instance, "task_state", None) == task_states.DELETING:
        return True
    return getattr(instance, "vm_state", None) in _DELETING_VM_STATES


class VTPMLibvirtDriver(libvirt_driver.LibvirtDriver):
    """Nova's libvirt driver whose vTPM handling is vtpm-driver's."""

    def __init__(self, virtapi: Any, read_only: bool = False, *,
                 key_manager: vtpm_ops.KeyManagerAPI | None = None,
                 host_probe: HostProbe | None = None) -> None:
        """Nova passes ``virtapi`` (and ``read_only``); tests may inject the key
        manager and host probe, which default to the real ones built on first use.

        :raises UnsupportedNovaRelease: the installed Nova is not 34.x.
        """
        release.check_nova_release()
        vtpm_conf.register_opts(CONF)
        super().__init__(virtapi, read_only)
        seams.install()
        self._vtpm_keymgr = key_manager
        self._vtpm_probe = host_probe
        self._vtpm_report: HostReport | None = None
        # instance uuid -> passphrase fetched (or created) before the guest was
        # touched, for the one operation in progress; StartSecret hides it in repr.
        self._vtpm_starts: dict[str, vtpm_ops.StartSecret] = {}

    # -- our package's objects -------------------------------------------------

    @property
    def vtpm_key_manager(self) -> vtpm_ops.KeyManagerAPI:
        """Barbican access: :class:`vtpm_driver.keymgr.KeyManager` on Nova's CONF."""
        if self._vtpm_keymgr is None:
            self._vtpm_keymgr = keymgr.KeyManager(CONF)
        return self._vtpm_keymgr

    @property
    def vtpm_host_probe(self) -> HostProbe:
        """What the host offers, read through Nova's own libvirt connection."""
        if self._vtpm_probe is None:
            self._vtpm_probe = NovaConnectionProbe(self._host)
        return self._vtpm_probe

    def vtpm_host_report(self, refresh: bool = False) -> HostReport:
        """:func:`vtpm_driver.host.check_host` for this host, computed once."""
        if self._vtpm_report is None or refresh:
            with translate.nova_errors():
                self._vtpm_report = check_host(CONF, self.vtpm_host_probe)
        return self._vtpm_report

    # -- host checks and traits -----------------------------------------------

    def _check_vtpm_support(self) -> None:
        """Refuse to start when ``swtpm_enabled`` is set but the host cannot deliver.

        Every problem is listed at once (virt_type, libvirt's TPM support and
        ``emulator`` backend, swtpm binaries, swtpm user/group, secret modes).

        :raises nova.exception.InvalidConfiguration:
        """
        report = self.vtpm_host_report(refresh=True)
        if not CONF.libvirt.swtpm_enabled:
            return
        if report.problems:
            raise nova_exception.InvalidConfiguration(
                message="[libvirt] swtpm_enabled is True but this host cannot provide "
                f"emulated TPMs: {'; '.join(report.problems)}. Fix the above, or set "
                "[libvirt] swtpm_enabled = False"
            )
        LOG.info("Emulated TPM support enabled: %s",
                 ", ".join(sorted(t for t, ok in report.traits.items() if ok)))

    def _get_tpm_traits(self) -> dict[str, bool]:
        """All seven ``COMPUTE_SECURITY_TPM_*`` traits; False ones are removed from placement."""
        return dict(self.vtpm_host_report().traits)

    # -- guest XML ---------------------------------------------------------------

    def _add_vtpm_device(self, guest: Any, flavor: Any, instance: Any,
                         image_meta: Any) -> None:
        """Add the ``<tpm>`` our package builds, when the flavor or image asks for one."""
        config = translate.vtpm_config(flavor, image_meta)
        if config is None:
            return
        guest.add_device(translate.GuestVTPM(config, instance.system_metadata.get(SYSMETA_KEY)))

    # -- passphrase and libvirt secret ----------------------------------------------

    def _get_or_create_secret_for_vtpm(self, context: Any,
                                       instance: Any) -> tuple[Any, str | None]:
        """Define the libvirt secret for a guest start; returns ``(secret, mode)``.

        ``host`` mode reuses the persistent secret when libvirt has it (no
        Barbican call). Otherwise the passphrase is the one fetched before the
        operation touched the guest, else it is read (or created, with the
        owner-only ACL) now. Nova's ``_create_guest`` undefines the secret
        right after the start unless the mode is ``host`` (SPEC E3).
        """
        config = translate.vtpm_config(instance.flavor, instance.image_meta)
        mode = config.secret_security if config else translate.flavor_secret_security(
            instance.flavor)
        persistent = mode == spec.SECRET_HOST
        conn = self._host.get_connection()
        with translate.nova_errors():
            existing = secret.lookup_vtpm_secret_by_instance(conn, instance.uuid)
            if existing is not None and persistent:
                return LibvirtSecretHandle(conn, existing.UUIDString()), mode
            start = self._vtpm_starts.get(instance.uuid)
            if start is None or start.passphrase is None:
                start = self._fetch_or_create(context, instance, mode)
            if existing is not None:  # a leftover (e.g. host mode before a resize)
                secret.undefine_vtpm_secret(conn, existing.UUIDString())
            secret.define_vtpm_secret(conn, start.secret_uuid, instance.uuid,
                                      start.passphrase, persistent=persistent)
        return LibvirtSecretHandle(conn, start.secret_uuid), mode

    def _fetch_or_create(self, context: Any, instance: Any, mode: str,
                         create: bool = True) -> vtpm_ops.StartSecret:
        """One Barbican GET (secret recorded) or POST + ACL PUT (none yet, ``create``).

        :raises VTPMSecretNotFound: none recorded and ``create`` is False.
        """
        had_secret = bool(instance.system_metadata.get(SYSMETA_KEY))
        if not had_secret and not create:
            raise exception.VTPMSecretNotFound(
                f"server {instance.uuid} has no vTPM secret recorded in "
                f"system_metadata['{SYSMETA_KEY}']: its vTPM state cannot be unlocked"
            )
        secret_uuid, passphrase = self.vtpm_key_manager.ensure_vtpm_secret(
            translate.request_context(context), instance, mode)
        if not had_secret:
            instance.save()  # the new vtpm_secret_uuid, as nova.crypto does
        return vtpm_ops.StartSecret(secret_uuid, passphrase, mode == spec.SECRET_HOST)

    @contextlib.contextmanager
    def _vtpm_passphrase_first(self, context: Any, instance: Any, image_meta: Any = None,
                               *, create: bool) -> Iterator[None]:
        """Get the passphrase before the body touches the guest; forget it afterwards.

        A caller who may not read the secret (``user`` mode, not the owner)
        is refused while the server is still as it was (SPEC F5), instead of
        after Nova has destroyed the running guest. ``create`` (spawn, a
        resize that adds a vTPM) makes the secret when none is recorded.
        """
        config = None
        if CONF.libvirt.swtpm_enabled:
            config = translate.vtpm_config(
                instance.flavor, image_meta if image_meta is not None else instance.image_meta)
        if config is None:
            yield
            return
        mode = config.secret_security
        with translate.nova_errors():
            if mode == spec.SECRET_HOST and secret.lookup_vtpm_secret_by_instance(
                    self._host.get_connection(), instance.uuid) is not None:
                start = None  # libvirt has it; no Barbican call
            else:
                start = self._fetch_or_create(context, instance, mode, create=create)
        if start is not None:
            self._vtpm_starts[instance.uuid] = start
        try:
            yield
        finally:
            self._vtpm_starts.pop(instance.uuid, None)

    def spawn(self, context: Any, instance: Any, image_meta: Any, *args: Any,
              **kwargs: Any) -> None:
        """Create the Barbican secret (owner-only ACL) first, then Nova's spawn.

        Nova's spawn would create it through castellan and read it back once
        more in ``_create_guest``; here it costs one POST and one ACL PUT.
        """
        with self._vtpm_passphrase_first(context, instance, image_meta, create=True):
            super().spawn(context, instance, image_meta, *args, **kwargs)

    def _hard_reboot(self, context: Any, instance: Any, *args: Any, **kwargs: Any) -> Any:
        """Nova's hard reboot (also power on) with the passphrase fetched first."""
        with self._vtpm_passphrase_first(context, instance, create=False):
            return super()._hard_reboot(context, instance, *args, **kwargs)

    def resume(self, context: Any, instance: Any, *args: Any, **kwargs: Any) -> None:
        """Nova's resume with the passphrase fetched before VIFs and guest are touched."""
        with self._vtpm_passphrase_first(context, instance, create=False):
            super().resume(context, instance, *args, **kwargs)

    def finish_revert_migration(self, context: Any, instance: Any, *args: Any,
                                **kwargs: Any) -> None:
        """Resize revert on the source: the old vTPM's passphrase is fetched first."""
        with self._vtpm_passphrase_first(context, instance, create=False):
            super().finish_revert_migration(context, instance, *args, **kwargs)

    def finish_migration(self, context: Any, migration: Any, instance: Any, *args: Any,
                         **kwargs: Any) -> None:
        """Resize/cold migration target: passphrase (created if the vTPM is new) first."""
        with self._vtpm_passphrase_first(context, instance, create=True):
            super().finish_migration(context, migration, instance, *args, **kwargs)

    def _finish_migration_vtpm(self, context: Any, instance: Any) -> None:
        """Nova's TPM state handling; a newly added vTPM's secret already exists."""
        old = translate.vtpm_config(instance.old_flavor, instance.image_meta)
        new = translate.vtpm_config(instance.new_flavor, instance.image_meta)
        if old is None and new is not None:
            return  # created by finish_migration before the guest was touched
        super()._finish_migration_vtpm(context, instance)

    # -- deleting the Barbican secret -------------------------------------------

    def _vtpm_delete_secret(self, context: Any, instance: Any, flavor: Any) -> None:
        """Delete the recorded Barbican secret through our KeyManager (idempotent).

        Nova's internal contexts (periodic tasks: reaping deleted servers,
        auto-confirming resizes; start-up) carry no token, and in ``user`` or
        ``host`` mode only the owner's token may delete the secret. Then the
        secret is left in Barbican with a warning naming it (``vtpm-driver
        audit`` lists it as an orphan) rather than failing the server's
        cleanup; a refusal with a token (HTTP 403) still fails the operation.
        """
        secret_uuid = instance.system_metadata.get(SYSMETA_KEY)
        if not secret_uuid:
            return
        mode = translate.flavor_secret_security(flavor)
        if mode != spec.SECRET_DEPLOYMENT and not getattr(context, "auth_token", None):
            LOG.warning("Cannot delete vTPM secret %s from Barbican without the owner's "
                        "token (this request carries none); delete it by hand",
                        secret_uuid, instance=instance)
            instance.system_metadata.pop(SYSMETA_KEY, None)
        else:
            with translate.nova_errors():
                self.vtpm_key_manager.delete_vtpm_secret(
                    translate.request_context(context), instance, mode)
        instance.save()

    def destroy(self, context: Any, instance: Any, network_info: Any,
                block_device_info: Any = None, destroy_disks: bool = True,
                destroy_secrets: bool = True) -> None:
        """Nova's destroy; on a server delete the Barbican secret goes first.

        Deleting it before the guest is touched means a caller who may not
        delete it leaves the server running as it was. The key is removed
        from ``system_metadata``, so the compute manager's own
        ``nova.vtpm.delete_secret`` call afterwards has nothing to do.
        """
        self._refuse_for_task(instance)
        if destroy_disks and destroy_secrets and _being_deleted(instance):
            self._vtpm_delete_secret(context, instance, instance.flavor)
        super().destroy(context, instance, network_info, block_device_info,
                        destroy_disks, destroy_secrets)

    def cleanup(self, context: Any, instance: Any, network_info: Any,
                block_device_info: Any = None, destroy_disks: bool = True,
                migrate_data: Any = None, destroy_vifs: bool = True,
                destroy_secrets: bool = True) -> Any:
        """Nova's cleanup; the libvirt vTPM secret is undefined through our package."""
        if destroy_disks:
            with translate.nova_errors():
                conn = self._host.get_connection()
                leftover = secret.lookup_vtpm_secret_by_instance(conn, instance.uuid)
                if leftover is not None:
                    secret.undefine_vtpm_secret(conn, leftover.UUIDString())
        return super().cleanup(context, instance, network_info, block_device_info,
                               destroy_disks, migrate_data, destroy_vifs, destroy_secrets)

    def _cleanup_resize_vtpm(self, context: Any, instance: Any) -> None:
        """Confirming a resize that removed the vTPM: delete its Barbican secret."""
        old = translate.vtpm_config(instance.old_flavor, instance.image_meta)
        new = translate.vtpm_config(instance.new_flavor, instance.image_meta)
        if old is not None and new is None:
            LOG.info("New flavor no longer requests vTPM; deleting its secret.",
                     instance=instance)
            self._vtpm_delete_secret(context, instance, instance.old_flavor)

    def _finish_revert_migration_vtpm(self, context: Any, instance: Any) -> None:
        """Reverting a resize that added a vTPM deletes the new secret; else Nova's."""
        old = translate.vtpm_config(instance.old_flavor, instance.image_meta)
        new = translate.vtpm_config(instance.new_flavor, instance.image_meta)
        if old is None and new is not None:
            self._vtpm_delete_secret(context, instance, instance.new_flavor)
            return
        super()._finish_revert_migration_vtpm(context, instance)

    # -- operations refused for vTPM servers (SPEC F6) -----------------------------

    def _has_vtpm(self, instance: Any) -> bool:
        """Whether the server asks for a vTPM (an invalid request counts as one)."""
        try:
            return translate.vtpm_config(instance.flavor, instance.image_meta) is not None
        except nova_exception.NovaException:
            return True

    def _refuse_for_vtpm(self, instance: Any, operation: str) -> None:
        """Nova's ``OperationNotSupportedForVTPM`` (HTTP 400 at the API) for vTPM servers."""
        if self._has_vtpm(instance):
            raise nova_exception.OperationNotSupportedForVTPM(
                instance_uuid=instance.uuid, operation=operation)

    def _refuse_for_task(self, instance: Any) -> None:
        """Refuse a power off or destroy that is part of shelving a vTPM server."""
        operation = _REFUSED_TASKS.get(getattr(instance, "task_state", None))
        if operation is not None:
            self._refuse_for_vtpm(instance, operation)

    def rebuild(self, context: Any, instance: Any, *args: Any, **kwargs: Any) -> None:
        """Refused for vTPM servers (rebuild and evacuate); others get Nova's default."""
        operation = instance_actions.EVACUATE if kwargs.get("evacuate") else (
            instance_actions.REBUILD)
        self._refuse_for_vtpm(instance, operation)
        super().rebuild(context, instance, *args, **kwargs)

    def rescue(self, context: Any, instance: Any, *args: Any, **kwargs: Any) -> None:
        """Refused for vTPM servers: the rescue image would get the server's TPM."""
        self._refuse_for_vtpm(instance, instance_actions.RESCUE)
        super().rescue(context, instance, *args, **kwargs)

    def power_off(self, instance: Any, *args: Any, **kwargs: Any) -> None:
        """Nova's power off, refused when it is the first step of shelving a vTPM server."""
        self._refuse_for_task(instance)
        super().power_off(instance, *args, **kwargs)

    def check_can_live_migrate_source(self, context: Any, instance: Any, *args: Any,
                                      **kwargs: Any) -> Any:
        """Live migration keeps Nova's rule: only ``host`` secret security may move."""
        config = translate.vtpm_config(instance.flavor, instance.image_meta)
        if config is not None and config.secret_security != spec.SECRET_HOST:
            raise nova_exception.OperationNotSupportedForVTPM(
                instance_uuid=instance.uuid, operation=instance_actions.LIVE_MIGRATION)
        return super().check_can_live_migrate_source(context, instance, *args, **kwargs)
