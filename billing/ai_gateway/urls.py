"""Moved to ``ai_gateway.urls`` (see billing/ai_gateway/__init__.py)."""

import sys

import ai_gateway.urls
from ai_gateway.urls import *  # noqa: F403  (the names, for type checkers)

sys.modules[__name__] = ai_gateway.urls
