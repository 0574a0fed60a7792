"""Moved to ``ai_gateway.asgi`` (see billing/ai_gateway/__init__.py)."""

import sys

import ai_gateway.asgi
from ai_gateway.asgi import *  # noqa: F403  (the names, for type checkers)

sys.modules[__name__] = ai_gateway.asgi
