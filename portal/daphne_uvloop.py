"""The portal's daphne: ``python -m portal.daphne_uvloop <daphne's own arguments>``.

Two changes to how ``daphne`` runs, both for the chat relay (bench/chat_relay.py), where every
streamed frame is a few event-loop callbacks and a few short-lived objects:

- **uvloop.** Daphne runs Twisted's asyncio reactor on an event loop it makes when
  ``daphne.server`` is first imported. With uvloop's policy set before that, the loop is
  uvloop's (libuv, in C) instead of asyncio's pure-Python selector loop; everything above it
  (Twisted, autobahn, channels, the consumers) is unchanged.
- **The garbage collector.** The portal is loaded first and everything it made is frozen out
  of the collector's scans (``gc.freeze``), and young collections run every GC_YOUNG
  allocations instead of every 700: with a thousand sessions open, full collections that walk
  every object were the relay's latency spikes.
- **autobahn's debug-log arguments.** For every frame it sends, autobahn builds its debug
  message's arguments whether debug logging is on or not, and with click installed (Celery
  needs it) each is coloured by ``click.style``: four calls per frame. Its own fallback for a
  machine without click (plain text) is switched on instead (``autobahn.util._HAS_CLICK``).
"""

from __future__ import annotations

import asyncio
import gc
import importlib

import uvloop

APP_MODULE = "portal.asgi"
GC_YOUNG = 50_000  # allocations between young collections (CPython's default: 700)


def plain_debug_arguments() -> None:
    """Make autobahn build its per-frame debug-log arguments as plain text (see above)."""
    import autobahn.util

    autobahn.util._HAS_CLICK = False


def main() -> None:
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    importlib.import_module(APP_MODULE)  # Django set up and the app built, before the freeze
    plain_debug_arguments()
    gc.set_threshold(GC_YOUNG, 20, 100)
    gc.freeze()
    from daphne.cli import CommandLineInterface  # daphne.server: its loop is uvloop's

    CommandLineInterface.entrypoint()


if __name__ == "__main__":
    main()
