"""Development settings: portal.settings with DEBUG=True unless the environment says otherwise.

For the tools a developer runs by hand on a checkout, which cannot set the environment before
Django loads (pytest, through pyproject's DJANGO_SETTINGS_MODULE, and mypy's Django plugin).
DEBUG=True is also left in os.environ, so servers that tests start get it too. `make run` and
`make test` export DEBUG=True themselves; production uses portal.settings, whose default is False.
"""

import os

os.environ.setdefault("DEBUG", "True")

from portal.settings import *  # noqa: F403
