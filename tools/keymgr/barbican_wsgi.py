"""Barbican's API WSGI application for gunicorn (``barbican_wsgi:application``).

Barbican's own WSGI helper hard-codes ``/etc/barbican/barbican-api-paste.ini``;
load the stack's paste file (``VTPM_BARBICAN_PASTE``) instead. Barbican reads
barbican.conf from ``$HOME/.barbican/``, so tools/keymgr-stack.sh gives this
process its own ``HOME``. argv is reset as for Keystone, so gunicorn's options
never reach oslo.config.
"""

import os
import sys

sys.argv = sys.argv[:1]

from paste import deploy  # noqa: E402

application = deploy.loadapp("config:" + os.environ["VTPM_BARBICAN_PASTE"])
