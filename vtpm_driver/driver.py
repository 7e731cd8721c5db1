"""The pinned public name of the driver: ``vtpm_driver.driver.VTPMDriver(conf)``.

The class lives with the rest of the command line's one host in
:mod:`vtpm_driver.standalone.driver`; operators' scripts and acceptance checks
import it from here, so this module only names it.
"""

from vtpm_driver.standalone.driver import VTPMDriver

__all__ = ["VTPMDriver"]
