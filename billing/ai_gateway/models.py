"""Moved to ``ai_gateway.models`` (see billing/ai_gateway/__init__.py)."""

import sys

import ai_gateway.models
from ai_gateway.models import *  # noqa: F403  (the names, for type checkers)

sys.modules[__name__] = ai_gateway.models
