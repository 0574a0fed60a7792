"""Moved to ``ai_gateway.usage``; this name stays until its last importers use that one."""

import sys

import ai_gateway.usage
from ai_gateway.usage import *  # noqa: F403  (the names, for type checkers)

sys.modules[__name__] = ai_gateway.usage
