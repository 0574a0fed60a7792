"""daphne on uvloop: ``python -m portal.daphne_uvloop <daphne's own arguments>``.

Daphne runs Twisted's asyncio reactor on an event loop it makes when ``daphne.server`` is first
imported. With uvloop's policy set before that, the loop is uvloop's (libuv, in C) instead of
asyncio's pure-Python selector loop; everything above it (Twisted, autobahn, channels, the
consumers) is unchanged. The chat relay is where that shows: every streamed frame is a few
loop callbacks, and on bench/chat_relay.py the relay added less latency per frame with it.
"""

from __future__ import annotations

import asyncio

import uvloop


def main() -> None:
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    from daphne.cli import CommandLineInterface  # imports daphne.server: the loop is made now

    CommandLineInterface.entrypoint()


if __name__ == "__main__":
    main()
