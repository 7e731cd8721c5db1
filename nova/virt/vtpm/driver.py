"""``VTPMLibvirtDriver``: Nova's libvirt driver whose vTPM steps are vtpm_driver's.

Load it with ``[DEFAULT] compute_driver = vtpm.VTPMLibvirtDriver`` (see
README.rst beside this file). It is Nova's ``LibvirtDriver`` except for the
vTPM seams below. Each override only translates: Nova's objects, contexts and
exceptions in, a call to :mod:`vtpm_driver.model.rules` or
:mod:`vtpm_driver.ops.secrets` (steps) with our adapters of Nova's ``Host``
(:mod:`.host`) and key manager (:mod:`.keymgr`), Nova's exceptions out.

============================================  =========================================
Nova method (overridden)                      routed to
============================================  =========================================
``_check_vtpm_support`` (init_host)           :func:`vtpm_driver.model.hostcheck.check_host`
``init_host`` (after Nova's)                  ``ops.secrets.remove_start_leftovers``
                                              (a killed start or move's secrets,
                                              of the servers Nova's record
                                              places here)
``_get_tpm_traits`` (placement traits)        ``check_host(...).traits`` (all 7 traits)
``update_provider_tree``                      + ``DRIVER_TRAIT`` (``check_host().supported``)
``_add_vtpm_device`` (guest XML)              :func:`vtpm_driver.virt.domain.add_tpm`
``spawn``, ``_hard_reboot`` (reboot, power    ``ops.secrets.prepare_start``: passphrase
on), ``resume``, ``finish_migration``,        read (or created) BEFORE the guest is
``finish_revert_migration``                   touched
``_get_or_create_secret_for_vtpm``            ``ops.secrets.define_for_start`` /
                                              ``after_start`` (Nova's _create_guest)
``destroy`` (server delete),                  ``ops.secrets.delete_secret``
``_cleanup_resize_vtpm``,                     (``rules.resize_change`` says when)
``_finish_revert_migration_vtpm``
``_finish_migration_vtpm``                    Nova's state handling; an added vTPM's
                                              secret already exists
``_cleanup`` (disks removed)                  ``ops.secrets.remove_libvirt_secrets``
``power_off``, ``destroy`` while shelving,    :mod:`.offhost` (shelve, unshelve,
``spawn`` unshelving, ``rebuild``,            evacuate, rebuild, rescue keep the
``_undefine_domain``, ``rescue``, unrescue``  TPM; ``ops.shelve.OffHostOps``)
``spawn``, ``_hard_reboot``, ``resume``,      custody (:mod:`vtpm_driver.model.custody`):
``rescue``, ``unrescue`` (every start);       the state started must have the
``_finish_migration_vtpm``,                   instance's generation; hand-overs
``_finish_revert_migration_vtpm``,            advance it (``_vtpm_hand_over``)
``post_live_migration_at_destination``
``check_can_live_migrate_source``,           :mod:`.migrate` (every secret mode;
``_add_vtpm_secret_to_live_migrate_data``,    ``ops.migrate`` secret steps)
``pre_live_migration``,
``post_live_migration`` (``_at_destination``),
``rollback_live_migration_at_destination``
============================================  =========================================
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator
from typing import Any

import nova.conf
from nova import context as nova_context
from nova import exception as nova_exception
from nova import objects
from nova import utils as nova_utils
from nova.compute import task_states, vm_states
from nova.compute import utils as compute_utils
from nova.virt.libvirt import driver as libvirt_driver
from nova.virt.libvirt import utils as libvirt_utils
from oslo_log import log as logging

from nova.virt.vtpm import host as nova_host
from nova.virt.vtpm import keymgr as nova_keymgr
from nova.virt.vtpm import migrate as vtpm_migrate
from nova.virt.vtpm import offhost as vtpm_offhost
from nova.virt.vtpm import release, translate
from vtpm_driver import conf as vtpm_conf
from vtpm_driver import exception, faults
from vtpm_driver.keymgr.api import EKCertificateStore
from vtpm_driver.model import consent, custody, request, rules, windows
from vtpm_driver.model.hostcheck import HostProbe, HostReport, check_host
from vtpm_driver.model.server import (
    EK_CERT_KEY,
    EK_FINGERPRINT_KEY,
    SYSMETA_KEY,
    recorded_secret,
)
from vtpm_driver.ops import custody as ops_custody
from vtpm_driver.ops import secrets as ops_secrets
from vtpm_driver.virt import manufacture
from vtpm_driver.virt import state as vtpm_state
from vtpm_driver.virt.probe import LibvirtHostProbe

LOG = logging.getLogger(__name__)
CONF = nova.conf.CONF

_DELETING_VM_STATES = (vm_states.DELETED, vm_states.SOFT_DELETED)
_NOVA_DRIVER = libvirt_driver.LibvirtDriver  # the class we extend


# Signatures of Nova's methods an override passes on unchanged (read once, at import).
_NOVA_SIGNATURES: dict[str, inspect.Signature] = {
    name: inspect.signature(getattr(_NOVA_DRIVER, name)) for name in ("destroy",)
}


def _nova_signature(override: Any) -> Any:
    """An override taking ``(self, *args, **kwargs)`` gets Nova's method's signature.

    The override passes the call on to Nova's method exactly as it came
    (positional stays positional, keyword stays keyword, as Nova's callers
    chose) and reads the arguments it needs through :func:`_arguments`.
    Introspection (``inspect.signature``, Nova's ``test_public_api_signatures``)
    sees Nova's signature.
    """
    override.__signature__ = _NOVA_SIGNATURES[override.__name__]
    return override


def _arguments(name: str, driver: Any, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name, Nova's defaults filled in (as Nova's method sees them).

    :raises TypeError: the call does not fit Nova's signature (as Nova's method would).
    """
    bound = _NOVA_SIGNATURES[name].bind(driver, *args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def _being_deleted(instance: Any) -> bool:
    """Whether ``destroy`` is part of deleting the server (not reboot, resize, shelve...)."""
    if getattr(instance, "task_state", None) == task_states.DELETING:
        return True
    return getattr(instance, "vm_state", None) in _DELETING_VM_STATES


class VTPMLibvirtDriver(_NOVA_DRIVER):
    """Nova's libvirt driver whose vTPM handling is vtpm-driver's."""

    def __init__(self, virtapi: Any, read_only: bool = False, *,
                 key_manager: Any = None, host_probe: HostProbe | None = None) -> None:
        """Nova passes ``virtapi`` (and ``read_only``).

        Tests may inject ``key_manager`` (a :class:`vtpm_driver.keymgr.KeyManagerAPI`
        taking our request context, used as the Barbican one) and ``host_probe``;
        by default they follow ``[key_manager] backend`` and Nova's ``Host``.

        :raises UnsupportedNovaRelease: the installed Nova is not 34.x.
        """
        release.check_nova_release()
        vtpm_conf.register_opts(CONF)
        super().__init__(virtapi, read_only)
        self._vtpm_keymgr = (None if key_manager is None
                             else nova_keymgr.OwnerOnlyBarbican(key_manager))
        self._vtpm_probe = host_probe
        self._vtpm_os_facts: nova_host.OSFacts = LibvirtHostProbe.from_conf(CONF)
        self._vtpm_secrets = nova_host.NovaSecretStore(self._host)
        self._vtpm_report: HostReport | None = None
        # instance uuid -> passphrase read (or created) before the guest was
        # touched, for the one operation in progress; StartSecret hides it in repr.
        self._vtpm_starts: dict[str, ops_secrets.StartSecret] = {}
        # instance uuid -> the secret defined for an incoming live migration, until
        # the guest runs here (post_live_migration_at_destination) or the move fails.
        self._vtpm_incoming: dict[str, ops_secrets.StartSecret] = {}
        # instance uuid -> the consent operation (vtpm_driver.model.consent) a start
        # in progress serves: restart-on-host-boot (resume_state_on_host_boot's hard
        # reboot; any other hard reboot is hard-reboot), evacuation (rebuild's spawn).
        self._vtpm_operations: dict[str, str] = {}
        self._vtpm_offhost = vtpm_offhost.OffHost(CONF, CONF.host)

    # -- our adapters ------------------------------------------------------------

    @property
    def vtpm_key_manager(self) -> Any:
        """The key manager ``[key_manager] backend`` names (:func:`.keymgr.build`)."""
        if self._vtpm_keymgr is None:
            self._vtpm_keymgr = nova_keymgr.build(CONF)
        return self._vtpm_keymgr

    @property
    def vtpm_secrets(self) -> nova_host.NovaSecretStore:
        """libvirt secrets through Nova's ``Host``."""
        return self._vtpm_secrets

    @property
    def vtpm_host_probe(self) -> HostProbe:
        """What the host offers: libvirt through Nova's ``Host``, plus the OS facts."""
        if self._vtpm_probe is not None:
            return self._vtpm_probe
        return nova_host.NovaHostProbe(self._host, self._vtpm_os_facts)

    def _vtpm_host_report(self, refresh: bool = False) -> HostReport:
        """:func:`vtpm_driver.model.hostcheck.check_host` for this host, computed once.

        Private: Nova's ``ComputeDriver`` API is the driver's whole public
        contract (Nova's ``test_public_api_signatures``).
        """
        if self._vtpm_report is None or refresh:
            with translate.nova_errors():
                self._vtpm_report = check_host(CONF, self.vtpm_host_probe)
        return self._vtpm_report

    # -- host checks and traits -----------------------------------------------

    def _check_vtpm_support(self) -> None:
        """Refuse to start when ``swtpm_enabled`` is set but the host cannot deliver.

        Every problem is listed at once (virt_type, libvirt's TPM support and
        ``emulator`` backend, swtpm binaries, swtpm user/group, secret modes),
        after the sentence Nova's own check would have started with. This
        replaces Nova's check (it checks a superset); replacing this method
        is, as for Nova's driver, how a site or a test says otherwise.

        :raises nova.exception.InvalidConfiguration:
        """
        if not CONF.libvirt.swtpm_enabled:
            # Nova's first check too: nothing is probed at start-up. The traits
            # (all False) are computed when first asked for.
            self._vtpm_report = None
            return
        report = self._vtpm_host_report(refresh=True)
        if report.problems:
            raise nova_exception.InvalidConfiguration(
                message=translate.startup_refusal(report.problems, CONF))
        LOG.info("Emulated TPM support enabled: %s",
                 ", ".join(sorted(t for t, ok in report.traits.items() if ok)))

    def init_host(self, host: Any) -> None:
        """Nova's; then what a killed nova-compute left defined in libvirt goes.

        ``user``/``deployment`` passphrases are defined (ephemeral, private)
        only for a start or a move's hand-over, and undefined right after. A
        kill in between leaves one in libvirtd until libvirtd restarts. No step
        of ours is in progress while nova-compute starts (Nova calls this
        before its ``_init_instance`` and before the service takes RPC calls),
        so the secret of such a server is a leftover. Which servers may have
        one here is Nova's record, read as Nova's resource tracker reads it
        (:meth:`_vtpm_servers_here`); each one's secret is found by usage
        (``Host.find_secret``) and undefined
        (:func:`vtpm_driver.ops.secrets.remove_start_leftovers`, by
        :func:`vtpm_driver.model.rules.left_after_start`); ``host`` mode's
        persistent secrets and other usage types stay.

        Only with ``swtpm_enabled`` (Nova's own condition for touching anything
        vTPM). Raises nothing of its own: a database or libvirt failure here is
        logged and start-up goes on (the server's next start replaces its
        leftover; ``vtpm-driver audit --repair`` finds it too). Idempotent.
        """
        super().init_host(host)
        if not CONF.libvirt.swtpm_enabled:
            return
        try:
            servers = self._vtpm_servers_here(nova_context.get_admin_context(), host)
            ops_secrets.remove_start_leftovers(self.vtpm_secrets, servers)
        except Exception:  # the database (conductor) or libvirt: start-up goes on
            LOG.exception("Could not remove the vTPM secrets an interrupted operation left "
                          "in libvirt")

    def _vtpm_servers_here(self, context: Any, host: str) -> dict[str, tuple[str | None, ...]]:
        """Server UUID -> its secret modes (:func:`.translate.secret_modes`), for each
        server whose vTPM secret may be in this host's libvirt, by Nova's record.

        That is what Nova's resource tracker counts as this host's: the
        instances on it (``InstanceList.get_by_host``) and those its unfinished
        or failed migrations name (``MigrationList.get_in_progress_and_error``
        per node). The latter covers a live migration's destination killed
        before ``post_live_migration_at_destination``, while ``instance.host``
        still names the source. A server whose vTPM request cannot be read is
        left out (logged): its secret mode is unknown, so its secret stays. Any
        exception counts there, not only Nova's documented ``Invalid`` and
        ``FlavorImageConflict``: Nova's ``get_vtpm_constraint`` formats a
        conflict with the image's name, which an ``image_meta`` rebuilt from
        ``system_metadata`` lacks (``NotImplementedError``), and one server
        must not stop the others' sweep.

        :raises Exception: whatever Nova's objects raise for the database or
            conductor, and ``get_available_nodes`` for libvirt.
        """
        attrs = ["flavor", "system_metadata"]
        instances = list(objects.InstanceList.get_by_host(context, host, expected_attrs=attrs))
        here = {instance.uuid for instance in instances}
        moving = {migration.instance_uuid
                  for node in self.get_available_nodes()
                  for migration in objects.MigrationList.get_in_progress_and_error(
                      context, host, node)} - here
        if moving:
            instances.extend(objects.InstanceList.get_by_filters(
                context, {"uuid": sorted(moving)}, expected_attrs=attrs))
        servers = {}
        for instance in instances:
            try:
                servers[instance.uuid] = translate.secret_modes(instance)
            except Exception as exc:  # any: see the docstring
                LOG.warning("Keeping any libvirt vTPM secret of server %s: cannot tell its "
                            "secret mode (%s: %s)", instance.uuid, type(exc).__name__, exc)
        return servers

    def _get_tpm_traits(self) -> dict[str, bool]:
        """Nova's seven ``COMPUTE_SECURITY_TPM_*`` traits; False ones leave placement.

        The custom PCR bank ones go with :meth:`update_provider_tree`: Nova's
        static traits drop every trait os-traits does not know.
        """
        traits = self._vtpm_host_report().traits
        return {trait: traits[trait] for trait in request.STANDARD_TRAITS}

    def update_provider_tree(self, provider_tree: Any, nodename: str,
                             allocations: Any = None) -> None:
        """Nova's, plus our custom traits: each added when true here, else removed.

        :data:`release.DRIVER_TRAIT`, while this host can run vTPM guests, tells
        the nova-api component (``api.py``) that Nova's API may let a vTPM
        operation through for a server here, and the scheduler that this node
        may receive one; a PCR bank trait, that this host can activate that
        bank. Nova's static traits keep standard traits only, hence here rather
        than in :meth:`_get_tpm_traits`.
        """
        super().update_provider_tree(provider_tree, nodename, allocations=allocations)
        report = self._vtpm_host_report()
        ours = {release.DRIVER_TRAIT: report.supported}
        ours.update((trait, report.traits[trait]) for trait in request.PCR_BANK_TRAITS.values())
        provider_tree.add_traits(nodename, *(trait for trait, on in ours.items() if on))
        provider_tree.remove_traits(nodename, *(trait for trait, on in ours.items() if not on))

    # -- guest XML ---------------------------------------------------------------

    def _add_vtpm_device(self, guest: Any, flavor: Any, instance: Any,
                         image_meta: Any) -> None:
        """Add the ``<tpm>`` our package builds, when the flavor or image asks for one.

        A rescue boot gets the server's own vTPM, whatever the rescue image says.
        """
        if getattr(instance, "task_state", None) == task_states.RESCUING:
            image_meta = instance.image_meta
        config = translate.vtpm_config(flavor, image_meta)
        if config is None:
            return
        guest.add_device(translate.GuestVTPM(config, recorded_secret(instance)))

    # -- passphrase first, then the guest -----------------------------------------

    def _vtpm_prepare(self, context: Any, instance: Any, config: Any, *,
                      create: bool) -> ops_secrets.StartSecret | None:
        """:func:`vtpm_driver.ops.secrets.prepare_start`; the key manager saves a new secret."""
        with translate.nova_errors():
            start = ops_secrets.prepare_start(context, instance, config,
                                              self.vtpm_key_manager, self.vtpm_secrets,
                                              create=create)
        return start

    def _get_or_create_secret_for_vtpm(self, context: Any,
                                       instance: Any) -> tuple[Any, str | None]:
        """Define the libvirt secret for a guest start; returns ``(secret, mode)``.

        Nova calls it once its ``get_vtpm_constraint`` said the guest has a
        vTPM; the secret mode is the flavor's. The passphrase is the one read
        before the operation touched the guest, else it is read (or created)
        now (:func:`vtpm_driver.ops.secrets.prepare_start_in_mode`). Returned
        as Nova's driver does: ``host`` mode gets the persistent libvirt
        secret from Nova's ``Host``; the others a :class:`.host.StartedSecret`,
        whose ``undefine()`` Nova's ``_create_guest`` calls after the start.
        """
        with translate.nova_errors():
            mode = rules.secret_security(instance.flavor)
        start = self._vtpm_starts.get(instance.uuid)
        if start is None:
            with translate.nova_errors():
                start = ops_secrets.prepare_start_in_mode(
                    context, instance, mode, self.vtpm_key_manager, self.vtpm_secrets,
                    create=True)
        with translate.nova_errors():
            ops_secrets.define_for_start(self.vtpm_secrets, instance, start)
        if start.persistent:
            return self.vtpm_secrets.libvirt_secret(start.secret_uuid), mode
        return nova_host.StartedSecret(self.vtpm_secrets, instance, start), mode

    @contextlib.contextmanager
    def _vtpm_passphrase_first(self, context: Any, instance: Any, image_meta: Any = None,
                               *, create: bool, arriving: bool = False,
                               operation: str | None = None
                               ) -> Iterator[ops_secrets.StartSecret | None]:
        """Read the passphrase before the body touches the guest; forget it afterwards.

        Custody first: the TPM state here must be the current copy. ``arriving``:
        the body brings the state here (a spawn from an off-host copy, a cold
        migration's or a revert's copy, each checked once it is in place), so no
        state here yet is not a missing TPM.

        A caller who may not read the secret (``user`` mode, not the owner)
        is refused while the server is still as it was (SPEC F5). Whether the
        guest has a vTPM is Nova's rule, asked as Nova asks it
        (``swtpm_enabled`` and :func:`.translate.has_vtpm`); the secret mode is
        the flavor's. Yields the start (None: no vTPM). ``operation`` (one of
        :data:`vtpm_driver.model.consent.OPERATIONS`): a caller who may not
        read the secret reads it with the owner's consent to it, if any.
        """
        if not (CONF.libvirt.swtpm_enabled and translate.has_vtpm(
                instance.flavor, image_meta if image_meta is not None else instance.image_meta)):
            yield None
            return
        if arriving:  # an overtaken leftover here would stand where the copy goes
            self._vtpm_offhost.remove_overtaken(instance)
        else:
            self._vtpm_take_in_transit(instance)
        self._vtpm_check_live(instance, absent_ok=arriving)
        with translate.nova_errors():
            if operation is not None:
                context = self._vtpm_acting(context, instance, operation)
            start = ops_secrets.prepare_start_in_mode(
                context, instance, rules.secret_security(instance.flavor),
                self.vtpm_key_manager, self.vtpm_secrets, create=create)
        self._vtpm_starts[instance.uuid] = start
        try:
            yield start
        except BaseException:
            if start.created:
                self._vtpm_undo_created(context, instance, start)
            raise
        finally:
            self._vtpm_starts.pop(instance.uuid, None)
        self._vtpm_settle(instance)

    # -- custody: only the current copy of the TPM ever starts (vtpm_driver.model.custody) ----

    def _vtpm_acting(self, context: Any, instance: Any, operation: str) -> Any:
        """Who reads the passphrase for ``operation``: the caller, or the owner by
        their consent to it (:func:`vtpm_driver.ops.consents.acting_context`).

        :raises nova.exception.NovaException: the key manager or Keystone could not
            be asked (translated).
        """
        with translate.nova_errors():
            return self.vtpm_key_manager.acting_context(context, instance, operation)

    def _vtpm_check_live(self, instance: Any, *, doing: str = "start",
                         record: int | None = None, absent_ok: bool = False) -> None:
        """Refuse, before the guest is touched, a TPM state here that is not the current copy.

        The instance's ``system_metadata['vtpm_generation']`` is the record
        (no request). No state here while the record has a generation is a
        missing TPM, refused (a start would manufacture a new one), unless
        ``absent_ok``: a new server, an unshelve or evacuation that restores it
        next, a migration that moves it in, a resize that makes a new TPM.

        :raises nova.exception.InternalError: the state is older (or newer)
            than the record (:class:`vtpm_driver.exception.StaleTPMState`'s
            message: server, this state, both generations, what to do).
        """
        with translate.nova_errors():
            ops_custody.check_live(instance, self._vtpm_offhost.state_base, host=CONF.host,
                                   allow_stale=CONF.vtpm.allow_stale_tpm_state, doing=doing,
                                   record=record, absent_ok=absent_ok)

    def _vtpm_take_in_transit(self, instance: Any) -> None:
        """Put a TPM state a killed cold migration left in transit here where libvirt looks.

        Nova copies the state to ``<instance dir>/swtpm/<uuid>`` on the
        destination and moves it into libvirt's swtpm directory in
        ``finish_migration``; a nova-compute killed in between leaves the
        server here (Nova's record) with its TPM in transit. Its next start
        finishes that step with Nova's own ``restore_vtpm_dir``; custody then
        decides, as for any state, whether it may start (its generation must
        be the record's). A state already in place, or none in transit:
        nothing done. Idempotent.
        """
        if self._vtpm_offhost.has_state(instance.uuid):
            return
        in_transit = os.path.join(libvirt_utils.get_instance_path(instance), "swtpm",
                                  instance.uuid)
        if not os.path.isdir(in_transit):
            return
        LOG.warning("Putting the TPM state an interrupted migration left in %s in place",
                    in_transit, instance=instance)
        libvirt_utils.restore_vtpm_dir(in_transit)

    def _vtpm_settle(self, instance: Any) -> None:
        """After a start: the state here and the instance agree on the generation.

        A TPM manufactured by this start (or one from before custody, current
        once) is stamped, and the instance saved when its record changed. No
        state here (nothing started one): nothing written. Idempotent.
        """
        before = custody.recorded(instance)
        with translate.nova_errors():
            ops_custody.stamp_live(instance, self._vtpm_offhost.state_base, create=False)
        if custody.recorded(instance) != before:
            instance.save()

    def _vtpm_hand_over(self, instance: Any, *, resize: bool = False) -> None:
        """The TPM state here becomes the server's current copy: advance, save, stamp.

        Its callers are ``finish_migration``, ``finish_revert_migration`` and
        ``post_live_migration_at_destination``. The instance is saved with the
        new generation and this host named as the hand-over's
        (:func:`vtpm_driver.ops.custody.hand_over`) before the state here is
        stamped: a nova-compute killed at any point leaves a record that this
        host's copy, and only it, satisfies (its next start finishes the
        hand-over); the copy left elsewhere is older. With no state here (a
        new TPM Nova's start manufactures) nothing is handed over:
        :meth:`_vtpm_settle` stamps it after the start. Not idempotent.
        """
        with translate.nova_errors():
            new = ops_custody.hand_over(instance, self._vtpm_offhost.state_base,
                                        host=CONF.host, save=instance.save, resize=resize)
        if new is not None:
            LOG.info("TPM handed over: generation %d is the current copy", new,
                     instance=instance)

    def _vtpm_undo_created(self, context: Any, instance: Any,
                           start: ops_secrets.StartSecret) -> None:
        """A spawn (or a resize adding a vTPM) that failed deletes the secret it made.

        Nova may reschedule, put the server in ERROR or leave it in BUILD
        until it is deleted; either way the next attempt creates its own
        secret, and this one would be left in Barbican with no server
        (issue 13 item 9). Best effort: a failure is logged with the secret's
        UUID (``vtpm-driver audit`` lists it) and the original error wins.
        """
        try:
            with translate.nova_errors():
                ops_secrets.delete_barbican_secret(context, instance, instance.flavor,
                                                   self.vtpm_key_manager)
            instance.system_metadata.pop(SYSMETA_KEY, None)
            instance.save()
        except Exception as exc:  # the operation's own error is the one to report
            LOG.error("Could not delete vTPM secret %s created by the failed operation: %s",
                      start.secret_uuid, exc, instance=instance)
        else:
            LOG.info("Deleted vTPM secret %s created by the failed operation",
                     start.secret_uuid, instance=instance)

    def _vtpm_manufacture(self, context: Any, instance: Any, image_meta: Any,
                          start: ops_secrets.StartSecret | None) -> None:
        """A new server, with the deployment's EK CA: its TPM made before Nova's spawn.

        libvirt then finds the state and runs no ``swtpm_setup`` of its own
        (:mod:`vtpm_driver.virt.manufacture`). The EK certificate is published
        in the key manager as the owner's, its fingerprint in the instance's
        system metadata (saved). Nothing to do without ``[vtpm] ek_ca_*``, for a
        server whose secret already existed (an unshelve or evacuation brings
        its TPM back), or when the state is here. A failure removes the new
        state; the spawn fails with it (and its secret is deleted).
        """
        ca = manufacture.certificate_authority(CONF.vtpm)
        if (ca is None or start is None or not start.created or start.passphrase is None
                or self._vtpm_offhost.has_state(instance.uuid)):
            return
        state_base = self._vtpm_offhost.state_base
        with translate.nova_errors():
            config = translate.vtpm_config(instance.flavor, image_meta)
            cert = manufacture.manufacture(
                state_base, instance.uuid, instance.name, config.version, start.passphrase,
                pcr_banks=config.pcr_banks, ca=ca, swtpm_user=CONF.libvirt.swtpm_user,
                swtpm_group=CONF.libvirt.swtpm_group)
        try:
            if cert is not None:
                instance.system_metadata[EK_FINGERPRINT_KEY] = cert.fingerprint
                keymgr = self.vtpm_key_manager
                if isinstance(keymgr, EKCertificateStore):
                    with translate.nova_errors():
                        keymgr.store_ek_certificate(context, instance, config.secret_security,
                                                    cert.pem + cert.chain_pem)
                instance.save()
        except BaseException:
            instance.system_metadata.pop(EK_FINGERPRINT_KEY, None)
            vtpm_state.remove_state(state_base, instance.uuid)
            raise

    def _vtpm_check_windows_11(self, instance: Any, image_meta: Any) -> None:
        """Refuse a Windows 11 image on a server Windows 11 would not accept, naming
        each missing piece (:mod:`vtpm_driver.model.windows`), before anything is made.

        The first moment a driver sees a request: Nova schedules without asking
        it. Raised as Nova's ``ImageUnacceptable``, so Nova aborts the build (no
        reschedule: no other host would do better) and shows the reason as the
        server's fault. The image's properties are read as Nova recorded them
        in the instance (``image_*`` system metadata): ``os_version`` and our
        ``vtpm_guest_os`` are not among the fields Nova's image object keeps.
        """
        properties = nova_utils.get_image_from_system_metadata(
            instance.system_metadata).get("properties") or {}
        with translate.nova_errors():
            config = translate.vtpm_config(instance.flavor, image_meta)
        try:
            windows.check(instance.flavor.extra_specs, properties, config)
        except exception.InvalidVTPMConfig as exc:
            raise nova_exception.ImageUnacceptable(
                image_id=getattr(image_meta, "id", None) or instance.image_ref,
                reason=str(exc)) from None

    def _vtpm_retire_ek_certificate(self, context: Any, instance: Any) -> None:
        """A new TPM replaces the server's: the old one's published EK certificate goes
        (key manager copy, fingerprint; saved). Idempotent."""
        if not (instance.system_metadata.get(EK_CERT_KEY)
                or instance.system_metadata.get(EK_FINGERPRINT_KEY)):
            return
        keymgr = self.vtpm_key_manager
        if instance.system_metadata.get(EK_CERT_KEY) and isinstance(keymgr, EKCertificateStore):
            with translate.nova_errors():
                keymgr.delete_ek_certificate(context, instance,
                                             rules.secret_security(instance.flavor))
        instance.system_metadata.pop(EK_CERT_KEY, None)
        instance.system_metadata.pop(EK_FINGERPRINT_KEY, None)
        instance.save()

    def spawn(self, context: Any, instance: Any, image_meta: Any, injected_files: Any,
              admin_password: Any, allocations: Any, network_info: Any = None,
              block_device_info: Any = None, power_on: bool = True,
              accel_info: Any = None) -> None:
        """Secret first (created with an owner-only ACL if new), then Nova's spawn.

        Unshelve and evacuation: the TPM state comes back from its off-host
        copy before Nova defines the domain (:mod:`.offhost`); a failed spawn
        removes it again, the copy stays.
        """
        self._vtpm_check_windows_11(instance, image_meta)
        unshelving = instance.vm_state == vm_states.SHELVED_OFFLOADED
        if unshelving:
            self._vtpm_offhost.check_caller(context, instance, "unshelve")
        with (self._vtpm_passphrase_first(context, instance, image_meta, create=True,
                                          arriving=True,
                                          operation=self._vtpm_operations.get(instance.uuid)
                                          ) as start,
              self._vtpm_offhost.spawning(instance, unshelving)):
            self._vtpm_manufacture(context, instance, image_meta, start)
            super().spawn(context, instance, image_meta, injected_files, admin_password,
                          allocations, network_info=network_info,
                          block_device_info=block_device_info, power_on=power_on,
                          accel_info=accel_info)

    def resume_state_on_host_boot(self, context: Any, instance: Any, network_info: Any,
                                  share_info: Any, block_device_info: Any = None) -> Any:
        """Nova's restart after its host rebooted (``resume_guests_state_on_host_boot``).

        It runs with Nova's own context, no user's token: a ``user``-mode
        server comes back only with its owner's consent to
        ``restart-on-host-boot``; without it the start is refused before the
        guest is touched and the server stays stopped, its TPM untouched.
        """
        self._vtpm_operations[instance.uuid] = consent.RESTART_ON_HOST_BOOT
        try:
            return super().resume_state_on_host_boot(context, instance, network_info,
                                                     share_info, block_device_info)
        except nova_exception.Forbidden as exc:
            # Nova then sets the server to ERROR without saying why: the fault says it.
            # Nova keeps 255 characters of a fault message: the facts first.
            refused = nova_exception.VTPMSecretForbidden(
                message=f"not restarted after its host rebooted: its vTPM passphrase is its "
                f"owner's alone and no consent of theirs to {consent.RESTART_ON_HOST_BOOT} "
                f"is in force (metadata {consent.METADATA_KEY}); TPM untouched; the owner "
                f"can start it")
            LOG.warning("%s (%s)", refused, exc, instance=instance)
            compute_utils.add_instance_fault_from_exc(context, instance, refused)
            raise refused from exc
        finally:
            self._vtpm_operations.pop(instance.uuid, None)

    def _hard_reboot(self, context: Any, instance: Any, *args: Any, **kwargs: Any) -> Any:
        """Nova's hard reboot (also power on) with the passphrase read first.

        A caller who may not read the passphrase uses the owner's consent to
        ``hard-reboot`` (or, from :meth:`resume_state_on_host_boot`, to
        ``restart-on-host-boot``), if the server has one.
        """
        operation = self._vtpm_operations.get(instance.uuid, consent.HARD_REBOOT)
        with self._vtpm_passphrase_first(context, instance, create=False,
                                         operation=operation) as vtpm:
            result = super()._hard_reboot(context, instance, *args, **kwargs)
        if vtpm is not None:
            self._vtpm_offhost.started(instance)
        return result

    def resume(self, context: Any, instance: Any, network_info: Any,
               block_device_info: Any = None, share_info: Any = None) -> None:
        """Nova's resume with the passphrase read before VIFs and guest are touched."""
        with self._vtpm_passphrase_first(context, instance, create=False) as vtpm:
            super().resume(context, instance, network_info,
                           block_device_info=block_device_info, share_info=share_info)
        if vtpm is not None:
            self._vtpm_offhost.started(instance)

    def finish_revert_migration(self, context: Any, instance: Any, network_info: Any,
                                migration: Any, block_device_info: Any = None,
                                power_on: bool = True, share_info: Any = None) -> None:
        """Resize revert on the source: the old vTPM's passphrase is read first.

        Also Nova's recovery of a migration whose source nova-compute died after
        ``migrate_disk_and_power_off`` (``_init_instance``, ``RESIZE_MIGRATING``):
        the TPM state waits in ``<instance>_resize/swtpm`` and must come back.
        The source had not recorded ``old_flavor`` yet then, and Nova's own vTPM
        step reads it: the flavor has not changed at that point, so the current
        one is the old one for this revert (and ``old_flavor`` is unset again).
        """
        stashed = instance.old_flavor is None
        if stashed:
            instance.old_flavor = instance.flavor
        try:
            with self._vtpm_passphrase_first(context, instance, create=False, arriving=True,
                                             operation=consent.COLD_MIGRATION):
                super().finish_revert_migration(context, instance, network_info, migration,
                                                block_device_info=block_device_info,
                                                power_on=power_on, share_info=share_info)
        finally:
            if stashed:
                instance.old_flavor = None
        faults.point("finish_revert_migration.done")

    def finish_migration(self, context: Any, migration: Any, instance: Any, disk_info: Any,
                         network_info: Any, image_meta: Any, resize_instance: bool,
                         allocations: Any, block_device_info: Any = None,
                         power_on: bool = True, share_info: Any = None) -> None:
        """Resize/cold migration target: passphrase (created if the vTPM is new) first.

        An admin's cold migration of a ``user``-mode server reads it with the
        owner's consent to ``cold-migration`` (checked on the source already).
        """
        with self._vtpm_passphrase_first(context, instance, create=True, arriving=True,
                                         operation=consent.COLD_MIGRATION):
            super().finish_migration(context, migration, instance, disk_info, network_info,
                                     image_meta, resize_instance, allocations,
                                     block_device_info=block_device_info,
                                     power_on=power_on, share_info=share_info)
        faults.point("finish_migration.done")

    # -- resize ---------------------------------------------------------------------

    def migrate_disk_and_power_off(self, context: Any, instance: Any, dest: Any, flavor: Any,
                                   network_info: Any, block_device_info: Any = None,
                                   timeout: int = 0, retry_interval: int = 0) -> Any:
        """Nova's, unchanged: the guest stops, its disks and TPM state go to ``dest``.

        Nova saves the TPM state beside the disks (``<instance>_resize/swtpm``) for
        a revert and copies it to the destination; a nova-compute killed after
        this returns leaves the server in ``RESIZE_MIGRATING``, which Nova's
        start-up reverts through :meth:`finish_revert_migration`. The step's end
        is a fault point of the fault table (tests/functional/test_faults.py).

        Custody: a pre-resize generation an earlier move left (one an operator
        ended with a state reset instead of a confirm or revert) is dropped, so a
        revert of this move compares its backup with this move's own (Nova saves
        the instance right after).

        First of all, a caller who could not read the passphrase on the
        destination (``user`` mode, not the owner, no consent of theirs to
        ``cold-migration``) is refused, the guest untouched; Nova puts the
        server back as it was (``InstanceFaultRollback``, as for its own
        refusals here).
        """
        if rules.has_vtpm(instance):
            acting = self._vtpm_acting(context, instance, consent.COLD_MIGRATION)
            try:
                vtpm_migrate.check_source(acting, instance, live=False)
            except nova_exception.MigrationPreCheckError as exc:
                raise nova_exception.InstanceFaultRollback(inner_exception=exc) from exc
        custody.forget_resize(instance)
        result = super().migrate_disk_and_power_off(
            context, instance, dest, flavor, network_info,
            block_device_info=block_device_info, timeout=timeout,
            retry_interval=retry_interval)
        faults.point("migrate_disk_and_power_off.done")
        return result

    def _vtpm_resize_change(self, instance: Any) -> rules.Change:
        """:func:`vtpm_driver.model.rules.resize_change` from the old to the new flavor."""
        return rules.resize_change(
            translate.vtpm_config(instance.old_flavor, instance.image_meta),
            translate.vtpm_config(instance.new_flavor, instance.image_meta))

    def _finish_migration_vtpm(self, context: Any, instance: Any) -> None:
        """Nova's TPM state handling; then custody, when the resized guest has a vTPM.

        Nova's step creates the secret of a vTPM the resize adds through
        ``_get_or_create_secret_for_vtpm``, which finds the one
        ``finish_migration`` read (or created) first. The resized guest has a
        vTPM when ``finish_migration`` read its passphrase first (Nova's rule)
        or a TPM state came here (Nova moved it into place); then, custody:
        the state that arrived must be the current copy (checked once Nova
        moved it into place, before the guest is created: a refused state is
        never started, here or later) and the TPM is handed over to this host
        (the generation advances; the pre-resize one is kept for a revert). A
        resize that removes the vTPM starts no TPM here: nothing to hand over
        (a revert finds the pre-resize generation as the record's own).
        """
        faults.point("finish_migration.before_state_in_place")  # disks ready, TPM in transit
        if (instance.system_metadata.get(EK_FINGERPRINT_KEY)
                and self._vtpm_resize_change(instance).makes_new_tpm):
            self._vtpm_retire_ek_certificate(context, instance)
        super()._finish_migration_vtpm(context, instance)
        if (self._vtpm_starts.get(instance.uuid) is not None
                or self._vtpm_offhost.has_state(instance.uuid)):
            self._vtpm_check_live(instance, doing="take over",
                                  absent_ok=self._vtpm_resize_change(instance).makes_new_tpm)
            self._vtpm_hand_over(instance, resize=True)
            faults.point("finish_migration.after_hand_over")

    def _cleanup_resize_vtpm(self, context: Any, instance: Any) -> None:
        """Confirming a resize: a removed vTPM's secret is deleted; a moved server's goes.

        Nova calls it from ``_cleanup_resize`` (``confirm_migration``) on the
        source. When the server now lives on another host (Nova's own test
        there: ``instance.host != CONF.host``, then it undefines the domain), no
        libvirt vTPM secret of it stays here (Nova keeps a ``host`` mode one);
        a resize on the same host keeps it (the server is still here).
        """
        custody.forget_resize(instance)  # confirmed: no revert will compare with it
        change = self._vtpm_resize_change(instance)
        if change is rules.Change.REMOVED:
            LOG.info("New flavor no longer requests vTPM; deleting its secret.",
                     instance=instance)
            self._vtpm_delete_secret(context, instance, instance.old_flavor)
        if change is not rules.Change.NONE and instance.host != CONF.host:
            faults.point("confirm_migration.before_secret_removed")
            with translate.nova_errors():
                ops_secrets.remove_libvirt_secrets(self.vtpm_secrets, instance)

    def _finish_revert_migration_vtpm(self, context: Any, instance: Any) -> None:
        """Reverting a resize that added a vTPM deletes the new secret; else Nova's.

        Custody: the saved pre-resize state is copied back only if it has
        the generation the instance had before the resize
        (:func:`vtpm_driver.model.custody.pre_resize`); then the generation
        advances, so the resized state on the other host never starts again.
        """
        change = self._vtpm_resize_change(instance)
        if change is rules.Change.ADDED:
            self._vtpm_delete_secret(context, instance, instance.new_flavor)
            return
        super()._finish_revert_migration_vtpm(context, instance)
        if change is not rules.Change.NONE:
            # Checked once Nova copied it back, before the guest is created.
            self._vtpm_check_live(instance, doing="copy back",
                                  record=custody.pre_resize(instance))
            custody.forget_resize(instance)
            self._vtpm_hand_over(instance)
            faults.point("finish_revert_migration.after_hand_over")

    # -- deleting secrets ---------------------------------------------------------------

    def _vtpm_delete_secret(self, context: Any, instance: Any, flavor: Any) -> None:
        """:func:`vtpm_driver.ops.secrets.delete_secret` (idempotent), then save."""
        if recorded_secret(instance) is None:
            return
        km = self.vtpm_key_manager
        with translate.nova_errors():
            ops_secrets.delete_secret(context, instance, flavor, km,
                                      token_required=km.token_required)
        instance.save()

    @_nova_signature
    def destroy(self, *args: Any, **kwargs: Any) -> None:
        """Nova's destroy; on a server delete the key manager's secret goes first.

        ``destroy(context, instance, network_info, block_device_info=None,
        destroy_disks=True, destroy_secrets=True)``, passed on to Nova's as it
        came. Only a destroy that removes the disks (``destroy_disks``, the one
        that also removes the TPM state) does anything first, and only then are
        the server's states read:

        A server delete removes the key manager's secret first: a caller who may
        not delete it leaves the server running as it was. The key is removed
        from ``system_metadata``, so the compute manager's own
        ``nova.vtpm.delete_secret`` call afterwards has nothing to do; the
        server's off-host copy goes too. Shelve offload: the TPM state is copied
        off-host before Nova removes it (a failed copy removes nothing).

        Afterwards, a server that lives on another host now (evacuated) leaves
        no TPM state here, even when Nova keeps its disks (shared storage).
        """
        call = _arguments("destroy", self, args, kwargs)
        context, instance = call["context"], call["instance"]
        if call["destroy_disks"]:
            if (instance.task_state == task_states.SHELVING_OFFLOADING
                    and rules.has_vtpm(instance)):
                self._vtpm_offhost.store(instance, self._vtpm_domain_xml(instance),
                                         reason="shelve", shelved=True)
            if call["destroy_secrets"] and _being_deleted(instance):
                self._vtpm_delete_secret(context, instance, instance.flavor)
                self._vtpm_offhost.forget(instance)
        super().destroy(*args, **kwargs)
        self._vtpm_offhost.left(instance)

    def _vtpm_domain_xml(self, instance: Any) -> str:
        """The guest's libvirt XML (the off-host copy's record: no passphrase in it)."""
        return self._host.get_guest(instance).get_xml_desc()

    def _undefine_domain(self, instance: Any, keep_vtpm: bool = False,
                         keep_nvram: bool = False) -> None:
        """Nova's; a rebuild keeps the TPM state, as reinstalling a machine keeps its TPM.

        Custody: a rebuild keeps the generation too. The state never leaves
        its directory on this host (no copy is made, nothing older appears),
        so there is nothing to outdate; the spawn that follows checks it is
        the current copy like any start.
        """
        keep_vtpm = keep_vtpm or instance.task_state == task_states.REBUILDING
        super()._undefine_domain(instance, keep_vtpm=keep_vtpm, keep_nvram=keep_nvram)

    def _cleanup(self, context: Any, instance: Any, *args: Any, **kwargs: Any) -> Any:
        """Nova's cleanup; when it removes the disks, every libvirt vTPM secret goes first.

        Nova's hook below ``cleanup`` and a failed start; Nova passes
        ``cleanup_instance_disks`` by keyword. The arguments go on to Nova's
        as they came.
        """
        if kwargs.get("cleanup_instance_disks"):
            with translate.nova_errors():
                ops_secrets.remove_libvirt_secrets(self.vtpm_secrets, instance)
        return super()._cleanup(context, instance, *args, **kwargs)

    # -- the TPM outlives its host or its image (.offhost, issue 15) ------------------

    def rebuild(self, context: Any, instance: Any, image_meta: Any, injected_files: Any,
                admin_password: Any, allocations: Any, bdms: Any, detach_block_devices: Any,
                attach_block_devices: Any, network_info: Any = None, evacuate: bool = False,
                block_device_info: Any = None, preserve_ephemeral: bool = False,
                accel_uuids: Any = None, reimage_boot_volume: bool = False) -> None:
        """Checks before Nova's default rebuild (destroy + spawn) touches anything.

        Rebuild: the passphrase must be readable (the TPM is kept). Evacuate:
        owner check (``user`` mode: the owner, or the owner's consent to
        ``evacuation``) and a usable off-host copy.
        """
        if rules.has_vtpm(instance):
            if evacuate:
                acting = self._vtpm_acting(context, instance, consent.EVACUATION)
                self._vtpm_offhost.check_caller(acting, instance, "evacuate")
                LOG.warning("Evacuating with the TPM state %s",
                            self._vtpm_offhost.check_evacuation(instance), instance=instance)
                self._vtpm_operations[instance.uuid] = consent.EVACUATION
            else:
                self._vtpm_prepare(context, instance, rules.vtpm_of(instance), create=False)
        try:
            super().rebuild(context, instance, image_meta, injected_files, admin_password,
                            allocations, bdms, detach_block_devices, attach_block_devices,
                            network_info=network_info, evacuate=evacuate,
                            block_device_info=block_device_info,
                            preserve_ephemeral=preserve_ephemeral, accel_uuids=accel_uuids,
                            reimage_boot_volume=reimage_boot_volume)
        finally:
            self._vtpm_operations.pop(instance.uuid, None)

    def rescue(self, context: Any, instance: Any, network_info: Any, image_meta: Any,
               rescue_password: Any, block_device_info: Any, share_info: Any) -> None:
        """Nova's rescue, passphrase first; the rescue boot gets the same vTPM.

        A rescue image other than the server's own boots foreign boot files
        against its TPM: only its owner or an admin of its project may, in
        every mode (:func:`vtpm_driver.model.rules.check_may_replace_tpm_or_boot`;
        ``nova.exception.VTPMSecretForbidden`` before anything is touched).
        """
        # A host without swtpm runs no vTPM (Nova's own rule): nothing to protect here.
        if (CONF.libvirt.swtpm_enabled and rules.has_vtpm(instance)
                and translate.rescue_boots_foreign_files(instance, image_meta, CONF.libvirt)):
            with translate.nova_errors():
                rules.check_may_replace_tpm_or_boot(context, instance,
                                                    "rescue with another image")
        with self._vtpm_passphrase_first(context, instance, create=False):
            super().rescue(context, instance, network_info, image_meta, rescue_password,
                           block_device_info, share_info)

    def unrescue(self, context: Any, instance: Any) -> None:
        """Back to the normal boot with the TPM state kept, passphrase first."""
        with self._vtpm_passphrase_first(context, instance, create=False):
            super().unrescue(context, instance)

    def power_off(self, instance: Any, timeout: int = 0, retry_interval: int = 0) -> None:
        """Nova's power off; shelving: owner check first; a stop: on-stop copy after."""
        if instance.task_state == task_states.SHELVING:
            self._vtpm_offhost.check_caller(None, instance, "shelve")
        super().power_off(instance, timeout=timeout, retry_interval=retry_interval)
        if instance.task_state == task_states.POWERING_OFF:
            self._vtpm_offhost.stopped(instance, lambda: self._vtpm_domain_xml(instance))

    # -- live migration, every secret mode (nova/virt/vtpm/migrate.py) --------------

    def check_can_live_migrate_source(self, context: Any, instance: Any, dest_check_data: Any,
                                      block_device_info: Any = None) -> Any:
        """A caller who cannot hand the passphrase over is refused here (user mode: owner only).

        Nova's API lets only ``host`` mode through; the driver moves every mode.
        """
        acting = self._vtpm_acting(context, instance, consent.LIVE_MIGRATION)
        vtpm_migrate.check_source(acting, instance)
        return super().check_can_live_migrate_source(context, instance, dest_check_data,
                                                     block_device_info=block_device_info)

    def _add_vtpm_secret_to_live_migrate_data(self, instance: Any, dest_check_data: Any) -> None:
        """Host mode: the source's libvirt secret into the migrate data; else its UUID only."""
        vtpm_migrate.add_to_migrate_data(instance, dest_check_data, self._host,
                                         self.vtpm_key_manager)

    def pre_live_migration(self, context: Any, instance: Any, block_device_info: Any,
                           network_info: Any, disk_info: Any, migrate_data: Any) -> Any:
        """Destination: the vTPM secret is defined before the guest arrives, then Nova's."""
        acting = self._vtpm_acting(context, instance, consent.LIVE_MIGRATION)
        start = vtpm_migrate.give_destination(acting, instance, migrate_data,
                                              self.vtpm_secrets, self.vtpm_key_manager)
        if start is not None:
            self._vtpm_incoming[instance.uuid] = start
        faults.point("pre_live_migration.after_secret")
        return super().pre_live_migration(context, instance, block_device_info,
                                          network_info, disk_info, migrate_data)

    def post_live_migration_at_destination(self, context: Any, instance: Any,
                                           network_info: Any, block_migration: bool = False,
                                           block_device_info: Any = None) -> None:
        """Destination, guest running: an ephemeral secret is undefined; custody hand-over.

        Only for a server that came with a vTPM: the secret given to it at
        ``pre_live_migration`` (from Nova's migrate data), or, after a restart
        of nova-compute in between, the TPM state that arrived here.

        libvirt's migration stream carries swtpm's state, not our generation
        file: the arrived state is stamped with the record's generation first,
        so a nova-compute killed before the hand-over leaves the current copy
        here (a later start accepts it), not an unstamped one that looks older.
        """
        if self._vtpm_offhost.has_state(instance.uuid) and rules.has_vtpm(instance):
            with translate.nova_errors():
                ops_custody.stamp_live(instance, self._vtpm_offhost.state_base, create=False)
        super().post_live_migration_at_destination(context, instance, network_info,
                                                   block_migration=block_migration,
                                                   block_device_info=block_device_info)
        faults.point("post_live_migration_at_destination.before_secret_removed")
        start = self._vtpm_incoming.pop(instance.uuid, None)
        if start is None and not self._vtpm_offhost.has_state(instance.uuid):
            return
        vtpm_migrate.incoming_running(instance, self.vtpm_secrets, start)
        if rules.has_vtpm(instance):
            self._vtpm_hand_over(instance)  # the state running here is the current copy
            faults.point("post_live_migration_at_destination.done")

    def post_live_migration(self, context: Any, instance: Any, block_device_info: Any,
                            migrate_data: Any = None) -> Any:
        """Source, after the move: Nova's, then no vTPM secret of the server stays here.

        A vTPM server is the one Nova's migrate data says moved with one
        (``has_vtpm``: Nova's own test here).
        """
        result = super().post_live_migration(context, instance, block_device_info,
                                             migrate_data=migrate_data)
        faults.point("post_live_migration.before_secret_removed")
        if migrate_data and migrate_data.has_vtpm:
            vtpm_migrate.forget_source(instance, self.vtpm_secrets)
        return result

    def rollback_live_migration_at_destination(self, context: Any, instance: Any,
                                               network_info: Any, block_device_info: Any,
                                               destroy_disks: bool = True,
                                               migrate_data: Any = None) -> None:
        """Destination, failed move: Nova's cleanup, then no vTPM secret stays here.

        A vTPM server is the one Nova's migrate data says moves with one
        (``has_vtpm``, Nova's own test here) or the one given a secret at
        ``pre_live_migration``. Its secrets go even when Nova's destroy failed.
        """
        given = self._vtpm_incoming.pop(instance.uuid, None)
        try:
            super().rollback_live_migration_at_destination(
                context, instance, network_info, block_device_info,
                destroy_disks=destroy_disks, migrate_data=migrate_data)
        finally:
            if given is not None or (migrate_data and migrate_data.has_vtpm):
                vtpm_migrate.forget_destination(instance, self.vtpm_secrets)
