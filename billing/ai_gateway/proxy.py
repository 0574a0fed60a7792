"""Moved to ``ai_gateway.proxy`` (see billing/ai_gateway/__init__.py)."""

import sys

import ai_gateway.proxy
from ai_gateway.proxy import *  # noqa: F403  (the names, for type checkers)

sys.modules[__name__] = ai_gateway.proxy
