"""VTPMDriver: the Nova ``ComputeDriver``-shaped entry point of vtpm-driver.

Method names and arguments follow Nova's ``ComputeDriver`` so the Nova shim can
route to them unchanged. The driver stays thin: decisions live in the pure
helpers (:mod:`vtpm_driver.spec`, :mod:`vtpm_driver.host`), and this class maps
their findings to the errors Nova expects at start-up.

Lifecycle methods (``spawn``, ``reboot``, ``power_off``, ``power_on``,
``suspend``, ``resume``, ``destroy``, resize/migration) are added by later
issues, below the "Lifecycle" marker at the end of the class.
"""

from __future__ import annotations

from oslo_config import cfg
from oslo_log import log as logging

from vtpm_driver import exception
from vtpm_driver.host import HostProbe, LibvirtHostProbe, check_host

LOG = logging.getLogger(__name__)


class VTPMDriver:
    """vTPM support for libvirt guests, with Barbican-held passphrases."""

    def __init__(self, conf: cfg.ConfigOpts, probe: HostProbe | None = None) -> None:
        self.conf = conf
        self._probe = probe

    @property
    def probe(self) -> HostProbe:
        """What the host offers; the real libvirt probe unless one was injected."""
        if self._probe is None:
            self._probe = LibvirtHostProbe.from_conf(self.conf)
        return self._probe

    # -- Start-up and scheduling ------------------------------------------

    def init_host(self, host: str | None = None) -> None:
        """Refuse to start on a host that cannot honour its vTPM configuration.

        SPEC C2: with ``swtpm_enabled`` every problem found is listed in one
        ``InvalidConfiguration``. SPEC C4: without it, vTPM servers already on
        this host would lose their TPM, so start-up is refused as well.

        :raises InvalidConfiguration: see above.
        :raises HypervisorUnavailable: libvirt cannot be reached.
        """
        report = check_host(self.conf, self.probe)
        if self.conf.libvirt.swtpm_enabled:
            if report.problems:
                raise exception.InvalidConfiguration(
                    "[libvirt] swtpm_enabled is True but this host cannot provide emulated "
                    f"TPMs: {'; '.join(report.problems)}. Fix the above, or set "
                    "[libvirt] swtpm_enabled = False"
                )
            LOG.info("Emulated TPM support enabled on %s: %s", host or "this host",
                     ", ".join(sorted(t for t, ok in report.traits.items() if ok)))
            return
        servers = self._vtpm_servers_on_host()
        if servers:
            raise exception.InvalidConfiguration(
                f"this host has {len(servers)} server(s) with a vTPM "
                f"({', '.join(sorted(servers))}) but [libvirt] swtpm_enabled is False: "
                "set swtpm_enabled = True so they keep their TPM"
            )

    def get_traits(self) -> dict[str, bool]:
        """All seven ``COMPUTE_SECURITY_TPM_*`` traits, True only when usable here."""
        return dict(check_host(self.conf, self.probe).traits)

    def _vtpm_servers_on_host(self) -> list[str]:
        """UUIDs of servers defined on this host whose flavor/image ask for a vTPM.

        Hook for SPEC C4; it needs the domain listing that the libvirt layer
        brings in a later issue. Until then no server is known.
        """
        return []

    # -- Lifecycle (later issues) -----------------------------------------
