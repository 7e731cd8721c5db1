"""The guided demo behind ``vtpm-driver demo``: a scenario of checks and its report.

:mod:`.scenario` runs the steps (create a TPM 2.0 server as its owner, look at
the guest, Barbican, libvirt and the state on disk, let another member of the
project try to unlock it, reboot, delete); :mod:`.inspect` looks at libvirt,
the swtpm state and Barbican from the outside; :mod:`.report` prints one line
per step. The command line only parses options and calls
:func:`.runner.run_demo`.
"""
