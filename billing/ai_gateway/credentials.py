"""Moved to ``ai_gateway.credentials`` (see billing/ai_gateway/__init__.py)."""

import sys

import ai_gateway.credentials
from ai_gateway.credentials import *  # noqa: F403  (the names, for type checkers)

sys.modules[__name__] = ai_gateway.credentials
