"""ASGI entry point of a sandbox host's edge (see hostedge.app for what it serves).

    python -m hostedge            # HERMIT_HOST_ADDRESS:HERMIT_HOST_EDGE_PORT, no access log

or any ASGI server with its access log off (request lines carry tokens), e.g.
``uvicorn --host 10.0.0.2 --port 8003 --no-access-log --lifespan on hostedge.asgi:application``.
It needs the deployment's DATABASE_URL (to find its sandboxes' gateways), REDIS_URL (its record
of used tokens, shared by its processes), HERMIT_HOST_NAME and HERMIT_HOST_LINK_SECRET; it does
not need root.
"""

from __future__ import annotations

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
django.setup()

from hostedge.app import EdgeApp  # noqa: E402  (after Django is set up)

application = EdgeApp()
