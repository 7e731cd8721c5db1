"""vtpm_driver.driver: the pinned public name of the one-host driver."""

from __future__ import annotations

from vtpm_driver import driver
from vtpm_driver.standalone import driver as standalone_driver


def test_pinned_name_is_the_standalone_driver():
    assert driver.VTPMDriver is standalone_driver.VTPMDriver
    assert driver.__all__ == ["VTPMDriver"]
