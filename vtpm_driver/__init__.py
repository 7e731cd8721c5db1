"""vtpm-driver: emulated TPMs for libvirt guests with Barbican-held secrets."""

from vtpm_driver.model.request import VTPMConfig, get_vtpm_config, required_traits

__all__ = ["VTPMConfig", "get_vtpm_config", "required_traits"]
