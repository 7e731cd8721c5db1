"""Nova's compute API for gunicorn (``nova_api_wsgi:application``).

Nova's WSGI loader hands ``sys.argv`` to oslo.config; under gunicorn that is
gunicorn's own command line, which Nova rejects. Replace it with Nova's
program name and its log file before Nova builds the application. The
configuration comes from ``OS_NOVA_CONFIG_DIR`` (nova.conf + api-paste.ini),
the log file from ``VTPM_AIO_NOVA_API_LOG`` (both set by tools/openstack-aio.sh).
"""

import os
import sys

sys.argv = ["nova-api"]
if os.environ.get("VTPM_AIO_NOVA_API_LOG"):
    sys.argv += ["--log-file", os.environ["VTPM_AIO_NOVA_API_LOG"]]

from nova.wsgi.osapi_compute import application  # noqa: E402

__all__ = ["application"]
