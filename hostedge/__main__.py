"""Run this host's edge: ``python -m hostedge [--host ADDRESS] [--port PORT]``.

Listens on HERMIT_HOST_ADDRESS:HERMIT_HOST_EDGE_PORT unless told otherwise, with TLS when
HERMIT_HOST_EDGE_TLS_CERT and _KEY are set, and with uvicorn's access log off: a request line
carries its token.
"""

from __future__ import annotations

import argparse
import os

import uvicorn


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    import django
    from django.conf import settings

    django.setup()
    parser = argparse.ArgumentParser(prog="python -m hostedge", description=__doc__)
    parser.add_argument("--host", default=settings.HERMIT_HOST_ADDRESS)
    parser.add_argument("--port", type=int, default=settings.HERMIT_HOST_EDGE_PORT)
    args = parser.parse_args()
    uvicorn.run(
        "hostedge.asgi:application",
        host=args.host,
        port=args.port,
        access_log=False,
        lifespan="on",
        log_config=None,  # Django's LOGGING (secrets redacted), set up by django.setup()
        timeout_graceful_shutdown=10,
        # TLS when both are set (settings refuse one without the other)
        ssl_certfile=settings.HERMIT_HOST_EDGE_TLS_CERT or None,
        ssl_keyfile=settings.HERMIT_HOST_EDGE_TLS_KEY or None,
    )


if __name__ == "__main__":
    main()
