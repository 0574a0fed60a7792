"""Moved to ``ai_gateway.views_keys``; this name stays until its last importers use that one."""

import sys

import ai_gateway.views_keys
from ai_gateway.views_keys import *  # noqa: F403  (the names, for type checkers)

sys.modules[__name__] = ai_gateway.views_keys
