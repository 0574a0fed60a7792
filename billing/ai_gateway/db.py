"""Moved to ``ai_gateway.db`` (see billing/ai_gateway/__init__.py)."""

import sys

import ai_gateway.db
from ai_gateway.db import *  # noqa: F403  (the names, for type checkers)

sys.modules[__name__] = ai_gateway.db
