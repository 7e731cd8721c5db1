"""Keystone's public WSGI application for gunicorn (``keystone_wsgi:application``).

oslo.config parses ``sys.argv``; under gunicorn that is gunicorn's own command
line, which Keystone rejects, so the worker exits and is respawned forever.
Reset argv before Keystone builds its application. The configuration comes
from ``OS_KEYSTONE_CONFIG_DIR`` (set by tools/keymgr-stack.sh).
"""

import sys

sys.argv = sys.argv[:1]

from keystone.server import wsgi  # noqa: E402

application = wsgi.initialize_public_application()
