"""Lifecycle of a server with (or without) a vTPM: spawn, start, stop, reboot, delete.

The :class:`~vtpm_driver.driver.VTPMDriver` stays thin and delegates here, as
compute-hyperv's driver delegates to its ``VMOps``. Rules this module keeps
(SPEC E, F, G):

* Everything that can be checked is checked before anything is created: the
  vTPM request (``spec``), the host's traits, the boot files and sizes (pure
  XML building), name/UUID clashes, stale TPM state (A6).
* Every start needs the passphrase in libvirt for the moment swtpm reads it.
  ``user``/``deployment``: it is read from Barbican FIRST (before the guest is
  touched, so a caller who may not read it leaves the server as it was, F5),
  defined as an ephemeral private libvirt secret around the start and
  undefined right after, whether the start worked or not (E3). ``host``: the
  persistent libvirt secret is used as is, with no Barbican call; only when it
  is missing is it read from Barbican and defined again.
* A failed spawn undoes everything it created (domain and TPM state, libvirt
  secret, Barbican secret, console log) and raises one error of the original
  type saying what failed and that nothing was left behind (G3).
* The server record in the domain's ``<metadata>`` is rewritten whenever the
  domain is (re)defined, so it always carries the current flavor and
  ``system_metadata`` (hence ``vtpm_secret_uuid``).

Passphrases only ever live in local variables and :class:`StartSecret`, whose
repr hides them; they are never logged, put in XML or in an exception.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import libvirt
from lxml import etree
from oslo_config import cfg
from oslo_log import log as logging

from vtpm_driver import exception, keymgr, servers, spec
from vtpm_driver.host import HostReport
from vtpm_driver.keymgr import KeyManagerAPI
from vtpm_driver.virt import connection, domain, guest, secret, state

LOG = logging.getLogger(__name__)

SYSMETA_KEY = keymgr.SYSMETA_KEY

# Nova's power_state.STATE_MAP names (what get_info returns).
POWER_PENDING = "pending"
POWER_RUNNING = "running"
POWER_PAUSED = "paused"
POWER_SHUTDOWN = "shutdown"
POWER_CRASHED = "crashed"
POWER_SUSPENDED = "suspended"

# Nova's libvirt driver maps "shutting down" to RUNNING: the guest still runs.
_POWER_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: POWER_PENDING,
    libvirt.VIR_DOMAIN_RUNNING: POWER_RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: POWER_RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: POWER_PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: POWER_RUNNING,
    libvirt.VIR_DOMAIN_SHUTOFF: POWER_SHUTDOWN,
    libvirt.VIR_DOMAIN_CRASHED: POWER_CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: POWER_SUSPENDED,
}
_RUNNING = frozenset({libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED})
# Nova's [DEFAULT] shutdown_retry_interval: press the power button again this often.
DEFAULT_RETRY_INTERVAL = 10.0
REBOOT_TYPES = ("SOFT", "HARD")

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


@dataclasses.dataclass(frozen=True, repr=False)
class StartSecret:
    """What a start needs to unlock the TPM state.

    ``passphrase`` None means libvirt already holds it (a ``host`` mode
    persistent secret) and nothing has to be defined.
    """

    secret_uuid: str
    passphrase: str | None
    persistent: bool

    def __repr__(self) -> str:  # never show the passphrase
        shown = "***" if self.passphrase else None
        return (f"StartSecret(secret_uuid={self.secret_uuid!r}, persistent={self.persistent}, "
                f"passphrase={shown})")


@dataclasses.dataclass
class _SpawnProgress:
    """What a spawn has created so far, for the undo."""

    created_barbican: bool = False
    secret_uuid: str | None = None
    dom: Any = None
    launched: bool = False


def server_label(instance: Any) -> str:
    """``'name' (uuid)`` for messages."""
    return f"{getattr(instance, 'name', '?')!r} ({getattr(instance, 'uuid', '?')})"


def vtpm_config_of(instance: Any, flavor: Any = None,
                   image_meta: Any = None) -> spec.VTPMConfig | None:
    """The vTPM a server's flavor (or ``flavor``) and image ask for, or None.

    :raises InvalidVTPMConfig: the request is invalid (see :mod:`vtpm_driver.spec`).
    """
    flavor = flavor if flavor is not None else getattr(instance, "flavor", None)
    image_meta = image_meta if image_meta is not None else getattr(instance, "image_meta", None)
    return spec.get_vtpm_config(getattr(flavor, "extra_specs", None),
                                getattr(image_meta, "properties", None))


def same_tpm(a: spec.VTPMConfig | None, b: spec.VTPMConfig | None) -> bool:
    """Whether two configs give the same TPM device (Nova compares version and model)."""
    if a is None or b is None:
        return a is b
    return (a.version, a.model) == (b.version, b.model)


def _wrap(exc: BaseException, what: str, problems: list[str]) -> exception.VTPMError:
    """``exc`` re-raised as the same VTPMError type with what failed and the cleanup outcome."""
    if problems:
        outcome = "cleanup incomplete, remove by hand: " + "; ".join(problems)
    else:
        outcome = "everything it had created was removed"
    if isinstance(exc, exception.VTPMError):
        return type(exc)(f"{what}: {exc} ({outcome})")
    return exception.VTPMError(f"{what}: unexpected {type(exc).__name__}: {exc} ({outcome})")


def tpm_emulator_domains(conn: libvirt.virConnect) -> list[str]:
    """UUIDs of every domain (ours or not) with an emulator ``<tpm>`` (SPEC C4)."""
    try:
        domains = conn.listAllDomains(0)
    except libvirt.libvirtError as exc:
        raise connection.to_vtpm_error(exc, "list domains") from exc
    found = []
    for dom in domains:
        try:
            xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            uuid = dom.UUIDString()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                continue  # undefined while we listed
            raise connection.to_vtpm_error(exc, "read domain XML") from exc
        try:
            root = etree.fromstring(xml.encode(), _PARSER)
        except etree.XMLSyntaxError:
            continue
        if root.find("devices/tpm/backend[@type='emulator']") is not None:
            found.append(uuid)
    return sorted(found)


class VTPMOps:
    """The lifecycle operations, over one libvirt connection and one key manager.

    ``hypervisor`` has a ``conn`` attribute (:class:`~vtpm_driver.virt.connection.Hypervisor`);
    ``host_report`` returns what this host offers (cached by the driver).
    """

    def __init__(self, conf: cfg.ConfigOpts, hypervisor: Any, key_manager: KeyManagerAPI,
                 host_report: Callable[[], HostReport]) -> None:
        self.conf = conf
        self.hypervisor = hypervisor
        self.keymgr = key_manager
        self._host_report = host_report

    def __repr__(self) -> str:
        return f"VTPMOps(hypervisor={self.hypervisor!r})"

    @property
    def conn(self) -> libvirt.virConnect:
        return self.hypervisor.conn

    @property
    def state_base(self) -> str:
        return self.conf.vtpm.swtpm_state_dir

    # -- checks -------------------------------------------------------------

    def check_host_offers(self, cfg: spec.VTPMConfig, instance: Any) -> None:
        """Refuse a vTPM whose traits this host lacks (scheduler's job in Nova).

        :raises InvalidConfiguration: names the missing traits and the host's problems.
        """
        report = self._host_report()
        offered = {trait for trait, ok in report.traits.items() if ok}
        missing = sorted(cfg.traits - offered)
        if not missing:
            return
        why = f" ({'; '.join(report.problems)})" if report.problems else ""
        raise exception.InvalidConfiguration(
            f"server {server_label(instance)} asks for a vTPM (version {cfg.version}, model "
            f"{cfg.model}, secret security {cfg.secret_security}) that this host does not "
            f"offer: missing trait(s) {', '.join(missing)}{why}"
        )

    def lookup(self, instance: Any) -> libvirt.virDomain:
        """The server's domain (by UUID). :raises InstanceNotFound:"""
        return guest.lookup(self.conn, instance.uuid)

    def find(self, instance: Any) -> libvirt.virDomain | None:
        """The server's domain, or None when it is gone."""
        try:
            return self.lookup(instance)
        except exception.InstanceNotFound:
            return None

    def _refuse_clashes(self, instance: Any, cfg: spec.VTPMConfig | None) -> None:
        """A define with an existing name+UUID would silently replace that domain."""
        conn = self.conn
        for key in (instance.uuid, instance.name):
            try:
                dom = guest.lookup(conn, key)
            except exception.InstanceNotFound:
                continue
            raise exception.InstanceExists(
                f"cannot spawn server {server_label(instance)}: domain {dom.name()!r} "
                f"({dom.UUIDString()}) already exists on this host"
            )
        if cfg is not None and state.state_dir(self.state_base, instance.uuid).exists():
            raise exception.VTPMError(
                f"cannot spawn server {server_label(instance)}: swtpm state "
                f"{state.state_dir(self.state_base, instance.uuid)} already exists with no "
                "server; it belongs to a deleted server (see vtpm-driver audit): remove it first"
            )

    # -- XML and record -----------------------------------------------------

    def ensure_console_log(self, instance: Any) -> None:
        """Default ``console_log`` to ``[vtpm] console_log_dir/<uuid>.log``."""
        if getattr(instance, "console_log", None):
            return
        directory = self.conf.vtpm.console_log_dir
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise exception.InvalidConfiguration(
                f"cannot create [vtpm] console_log_dir {directory!r}: {exc.strerror}"
            ) from None
        instance.console_log = os.path.join(directory, f"{instance.uuid}.log")

    def base_xml(self, instance: Any) -> str:
        """The guest without ``<tpm>`` or record; checks name, sizes and boot files.

        :raises VirtError: bad name, sizes or boot files.
        """
        image = instance.image_meta
        virt_type = self.conf.libvirt.virt_type
        return domain.guest_xml(
            instance.name, instance.uuid, instance.flavor.vcpus, instance.flavor.memory_mb,
            console_log=instance.console_log, kernel=getattr(image, "kernel", None),
            initrd=getattr(image, "initrd", None), cmdline=getattr(image, "cmdline", None),
            disk=getattr(image, "disk", None),
            virt_type=virt_type if virt_type in domain.VIRT_TYPES else "kvm",
        )

    def domain_xml(self, instance: Any, cfg: spec.VTPMConfig | None,
                   base: str | None = None) -> str:
        """The full domain XML: guest, ``<tpm>`` (when asked for), server record.

        :raises VirtError: bad name, sizes or boot files.
        :raises InvalidVTPMConfig: a vTPM without a recorded secret UUID.
        """
        xml = base if base is not None else self.base_xml(instance)
        if cfg is not None:
            xml = domain.add_tpm(xml, cfg.version, cfg.model,
                                 instance.system_metadata.get(SYSMETA_KEY))
        return domain.set_server_record(xml, servers.to_record(instance))

    def update_record(self, dom: libvirt.virDomain, instance: Any) -> None:
        """Store the instance's current flavor and system metadata in its domain."""
        domain.update_domain_record(dom, servers.to_record(instance))

    def _reset_console(self, instance: Any) -> None:
        """libvirt appends to the console file: start each boot with an empty one."""
        path = getattr(instance, "console_log", None)
        if not path:
            return
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise exception.VirtError(
                f"cannot remove old console log {path!r} of server {server_label(instance)}: "
                f"{exc.strerror}"
            ) from None

    def remove_own_console_log(self, instance: Any) -> None:
        """Delete the console log if it is in ``[vtpm] console_log_dir`` (ours)."""
        path = getattr(instance, "console_log", None)
        if not path:
            return
        directory = os.path.realpath(self.conf.vtpm.console_log_dir)
        if os.path.dirname(os.path.realpath(path)) != directory:
            return  # a file the user chose: theirs to keep
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            LOG.warning("Could not remove console log %s: %s", path, exc.strerror,
                        instance_uuid=instance.uuid)

    # -- secrets and starting ---------------------------------------------

    def prepare_start(self, context: Any, instance: Any,
                      cfg: spec.VTPMConfig | None) -> StartSecret | None:
        """Get what a start needs to unlock the TPM, BEFORE the guest is touched (F2, F5).

        ``host`` mode: the persistent libvirt secret when it exists (no
        Barbican call); otherwise, and in the other modes, one Barbican read.

        :raises VTPMSecretForbidden: the caller may not read the passphrase.
        :raises VTPMSecretNotFound: no secret recorded, or Barbican lost it.
        :raises KeyManagerUnavailable: Barbican is down.
        """
        if cfg is None:
            return None
        secret_uuid = instance.system_metadata.get(SYSMETA_KEY)
        persistent = cfg.secret_security == spec.SECRET_HOST
        if persistent and secret_uuid:
            if secret.lookup_vtpm_secret(self.conn, secret_uuid) is not None:
                LOG.debug("Using the host's libvirt secret %s", secret_uuid,
                          instance_uuid=instance.uuid)
                return StartSecret(secret_uuid, None, persistent=True)
        passphrase = self.keymgr.get_vtpm_secret(context, instance, cfg.secret_security)
        return StartSecret(instance.system_metadata[SYSMETA_KEY], passphrase, persistent)

    def _drop_same_uuid_secret(self, secret_uuid: str, instance: Any) -> None:
        """Undefine a leftover libvirt secret with OUR UUID (e.g. a ``host`` mode one
        after a resize to ``user``), so the ephemeral one can be defined."""
        if secret.undefine_vtpm_secret(self.conn, secret_uuid):
            LOG.info("Removed leftover libvirt vTPM secret %s before start", secret_uuid,
                     instance_uuid=instance.uuid)

    def launch(self, dom: libvirt.virDomain, instance: Any, start: StartSecret | None,
               *, fresh_boot: bool = True) -> None:
        """Start a defined domain, with the libvirt secret around the start (E3).

        ``fresh_boot`` empties the console log first (not for a resume, which
        continues the same boot).
        """
        if fresh_boot:
            self._reset_console(instance)
        if start is None or start.passphrase is None:
            guest.start(dom)
        else:
            if not start.persistent:
                self._drop_same_uuid_secret(start.secret_uuid, instance)
            with secret.vtpm_secret_for_start(self.conn, start.secret_uuid, instance.uuid,
                                              start.passphrase, persistent=start.persistent):
                guest.start(dom)
        guest.wait_for_state(dom, _RUNNING, float(self.conf.vtpm.guest_start_timeout))

    def discard_managed_save(self, dom: libvirt.virDomain) -> None:
        try:
            if dom.hasManagedSaveImage(0):
                dom.managedSaveRemove(0)
        except libvirt.libvirtError as exc:
            raise connection.to_vtpm_error(exc, f"discard saved state of domain {dom.name()!r}"
                                           ) from exc

    def has_managed_save(self, dom: libvirt.virDomain) -> bool:
        try:
            return bool(dom.hasManagedSaveImage(0))
        except libvirt.libvirtError as exc:
            raise connection.to_vtpm_error(exc, f"check saved state of domain {dom.name()!r}"
                                           ) from exc

    # -- spawn --------------------------------------------------------------

    def spawn(self, context: Any, instance: Any, image_meta: Any = None,
              power_on: bool = True) -> None:
        """Create the server: Barbican secret, domain with ``<tpm>`` + record, start (F1).

        :raises InvalidVTPMConfig, InvalidConfiguration, InstanceExists, VirtError:
            refused before anything was created.
        :raises VTPMError: (same type as the cause) a later step failed;
            everything this spawn created was removed again (G3).
        """
        if image_meta is not None:
            instance.image_meta = image_meta
        cfg = vtpm_config_of(instance)
        if cfg is not None:
            self.check_host_offers(cfg, instance)
        self.ensure_console_log(instance)
        base = self.base_xml(instance)
        self._refuse_clashes(instance, cfg)

        progress = _SpawnProgress()
        start: StartSecret | None = None
        try:
            if cfg is not None:
                had_secret = bool(instance.system_metadata.get(SYSMETA_KEY))
                secret_uuid, passphrase = self.keymgr.ensure_vtpm_secret(
                    context, instance, cfg.secret_security)
                progress.created_barbican = not had_secret
                progress.secret_uuid = secret_uuid
                start = StartSecret(secret_uuid, passphrase,
                                    persistent=cfg.secret_security == spec.SECRET_HOST)
            xml = self.domain_xml(instance, cfg, base)
            progress.dom = guest.define(self.conn, xml)
            if power_on:
                progress.launched = True
                self.launch(progress.dom, instance, start)
        except BaseException as exc:
            problems = self._undo_spawn(context, instance, cfg, progress)
            if not isinstance(exc, Exception):
                raise
            LOG.debug("Spawn failed: %s", exc, instance_uuid=instance.uuid)
            raise _wrap(exc, f"cannot spawn server {server_label(instance)}", problems
                        ) from exc
        LOG.info("Spawned server %s%s", instance.name,
                 f" with vTPM {cfg.version}/{cfg.model} ({cfg.secret_security} secret)"
                 if cfg else "", instance_uuid=instance.uuid)

    def _undo_spawn(self, context: Any, instance: Any, cfg: spec.VTPMConfig | None,
                    progress: _SpawnProgress) -> list[str]:
        """Remove what a failed spawn created; returns what could not be removed."""
        problems: list[str] = []
        if progress.dom is not None:
            try:
                guest.destroy(progress.dom)
                guest.undefine(progress.dom, keep_tpm=False)
            except exception.VTPMError as exc:
                problems.append(f"domain {instance.uuid}: {exc}")
        if cfg is not None:
            try:
                state.remove_state(self.state_base, instance.uuid)
            except exception.VTPMError as exc:
                problems.append(str(exc))
        if progress.launched and progress.secret_uuid:
            try:
                secret.undefine_vtpm_secret(self.conn, progress.secret_uuid)
            except exception.VTPMError as exc:
                problems.append(f"libvirt secret {progress.secret_uuid}: {exc}")
        if progress.created_barbican and cfg is not None:
            try:
                self.keymgr.delete_vtpm_secret(context, instance, cfg.secret_security)
            except exception.VTPMError as exc:
                problems.append(f"Barbican secret {progress.secret_uuid}: {exc}")
        if progress.launched:
            self.remove_own_console_log(instance)
        return problems

    # -- delete -------------------------------------------------------------

    def destroy(self, context: Any, instance: Any, destroy_disks: bool = True,
                destroy_secrets: bool = True) -> None:
        """Delete the server (F3); a second call is a no-op.

        The Barbican secret is deleted FIRST, right after the (read-only)
        domain lookup: if the caller may not delete it, nothing is touched
        and the server keeps running. Everything after that needs only this
        host and can be retried. ``destroy_disks=False`` (Nova's hard reboot
        and revert) only powers off and undefines, keeping TPM state and
        secrets; ``destroy_secrets=False`` keeps the Barbican secret.
        """
        secret_uuid = instance.system_metadata.get(SYSMETA_KEY)
        dom = self.find(instance)
        if destroy_disks and destroy_secrets and secret_uuid:
            self.keymgr.delete_vtpm_secret(context, instance, self._mode_or_user(instance))
        if dom is not None:
            guest.destroy(dom)
            guest.undefine(dom, keep_tpm=not destroy_disks)
        if not destroy_disks:
            return
        state.remove_state(self.state_base, instance.uuid)
        if secret_uuid:
            secret.undefine_vtpm_secret(self.conn, secret_uuid)
        leftover = secret.lookup_vtpm_secret_by_instance(self.conn, instance.uuid)
        if leftover is not None:
            secret.undefine_vtpm_secret(self.conn, leftover.UUIDString())
        self.remove_own_console_log(instance)
        if dom is not None:
            LOG.info("Deleted server %s", instance.name, instance_uuid=instance.uuid)

    @staticmethod
    def _mode_or_user(instance: Any) -> str:
        """The flavor's secret mode; an unreadable one must not block a delete."""
        try:
            return keymgr.secret_security_of(instance)
        except exception.InvalidVTPMConfig:
            return spec.SECRET_USER

    # -- power --------------------------------------------------------------

    def reboot(self, context: Any, instance: Any, reboot_type: str) -> None:
        """SOFT: ACPI reboot, swtpm keeps running (no secret); HARD: full restart (F2)."""
        if reboot_type not in REBOOT_TYPES:
            raise exception.VTPMError(
                f"invalid reboot_type={spec.show(reboot_type)}: allowed values are "
                f"{', '.join(REBOOT_TYPES)}"
            )
        dom = self.lookup(instance)
        if reboot_type == "SOFT" and self._soft_reboot(dom, instance):
            return
        self.hard_reboot(context, instance, dom)

    def _soft_reboot(self, dom: libvirt.virDomain, instance: Any) -> bool:
        """libvirt's ACPI reboot; False when it cannot be done (then reboot hard)."""
        if guest.get_state(dom) not in _RUNNING:
            return False
        try:
            dom.reboot(0)
        except libvirt.libvirtError as exc:
            LOG.warning("Soft reboot failed (%s); rebooting hard", connection.describe(exc),
                        instance_uuid=instance.uuid)
            return False
        LOG.info("Soft reboot requested", instance_uuid=instance.uuid)
        return True

    def hard_reboot(self, context: Any, instance: Any,
                    dom: libvirt.virDomain | None = None) -> None:
        """Power off, redefine (TPM state kept), start with a fresh secret (F2).

        The passphrase is fetched before the guest is touched. The domain is
        redefined in place (``defineXML`` on its UUID) rather than undefined
        with ``KEEP_TPM`` and defined again: same result, but the server never
        disappears from libvirt, which is its only record.
        """
        cfg = vtpm_config_of(instance)
        dom = dom if dom is not None else self.lookup(instance)
        start = self.prepare_start(context, instance, cfg)
        xml = self.domain_xml(instance, cfg)
        guest.destroy(dom)
        self.discard_managed_save(dom)
        dom = guest.define(self.conn, xml)
        self.launch(dom, instance, start)
        LOG.info("Hard rebooted", instance_uuid=instance.uuid)

    def power_off(self, instance: Any, timeout: float = 0, retry_interval: float = 0) -> None:
        """Stop the guest: ACPI first when ``timeout`` > 0, then pull the plug."""
        dom = self.lookup(instance)
        guest.power_off(dom, graceful=timeout > 0, timeout=float(timeout),
                        retry_interval=float(retry_interval or DEFAULT_RETRY_INTERVAL))
        LOG.info("Powered off", instance_uuid=instance.uuid)

    def power_on(self, context: Any, instance: Any) -> None:
        """Start a stopped server; a suspended one is resumed, a running one left alone."""
        dom = self.lookup(instance)
        if guest.is_active(dom):
            LOG.info("Already running", instance_uuid=instance.uuid)
            return
        if self.has_managed_save(dom):
            self.resume(context, instance)
            return
        self.hard_reboot(context, instance, dom)

    def suspend(self, instance: Any) -> None:
        """libvirt managed save: memory and TPM state go to disk, the guest stops."""
        dom = self.lookup(instance)
        current = guest.get_state(dom)
        if current not in _RUNNING and current != libvirt.VIR_DOMAIN_PAUSED:
            raise exception.VirtError(
                f"cannot suspend server {server_label(instance)}: it is "
                f"{guest.state_name(current)}"
            )
        try:
            dom.managedSave(0)
        except libvirt.libvirtError as exc:
            raise connection.to_vtpm_error(exc, f"suspend server {server_label(instance)}"
                                           ) from exc
        LOG.info("Suspended", instance_uuid=instance.uuid)

    def resume(self, context: Any, instance: Any) -> None:
        """Restore a suspended server; needs the passphrase like any start (F2)."""
        cfg = vtpm_config_of(instance)
        dom = self.lookup(instance)
        if guest.is_active(dom):
            LOG.info("Already running", instance_uuid=instance.uuid)
            return
        start = self.prepare_start(context, instance, cfg)
        self.launch(dom, instance, start, fresh_boot=not self.has_managed_save(dom))
        LOG.info("Resumed", instance_uuid=instance.uuid)

    # -- queries ------------------------------------------------------------

    def get_info(self, instance: Any) -> str:
        """Nova's power state name: running, paused, shutdown, suspended, crashed, pending."""
        dom = self.lookup(instance)
        current = guest.get_state(dom)
        if current == libvirt.VIR_DOMAIN_SHUTOFF and self.has_managed_save(dom):
            return POWER_SUSPENDED
        return _POWER_STATES.get(current, POWER_PENDING)

    def list_instances(self) -> list[str]:
        """Names of this host's servers (domains carrying our server record)."""
        return [record.name for _dom, record in guest.list_domains_with_record(self.conn)]
