"""The ``vtpm-driver`` command (cliff); entry point :func:`vtpm_driver.cli.main.main`."""
