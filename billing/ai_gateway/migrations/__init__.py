"""Moved to ``ai_gateway.migrations``: ``billing.ai_gateway.migrations.<name>`` finds the
migration files there (this name is not an app's migrations package)."""

import sys

import ai_gateway.migrations

sys.modules[__name__] = ai_gateway.migrations
