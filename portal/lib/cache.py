"""The embedded default's cache: Django's file cache, shared by every process of the portal.

Without Redis the cache is a folder, used by the web processes (run as the unprivileged web
user by bin/run) and by the Celery worker (root). Django writes each entry through ``mkstemp``
(mode 0600), so an entry the worker writes would be unreadable to the web processes (a thaw's
or a wake's reply, the dozing hint). As SQLite does with its journal files, an entry written
as root is handed, through its open descriptor, to the owner of the cache folder (the web
user: bin/web-user makes the folder its own). Entries are pickles, as in every Django cache:
whoever may write the folder (or Redis) is trusted by every process that reads it.

:func:`ahas_key` is a hot path's cache check without Django's thread hop (see there);
:func:`aredis` hands out the event loop's own redis.asyncio client.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from typing import Any

from django.conf import settings
from django.core.cache import caches
from django.core.cache.backends.filebased import FileBasedCache
from django.core.cache.backends.redis import RedisCache

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Any]] = (
    weakref.WeakKeyDictionary()
)


REDIS_POOL_SIZE = 32  # connections a process opens to one Redis; more commands wait their turn
REDIS_POOL_WAIT = 10.0  # seconds a command waits for a connection before it fails


def aredis(url: str | None = None) -> Any:
    """Return a redis.asyncio client on ``url`` (default ``settings.REDIS_URL``) for the running
    event loop: a client's connections belong to the loop that opened them.

    Its pool holds REDIS_POOL_SIZE connections and makes further commands wait for one, where
    redis-py's default pool fails them ("Too many connections") once 100 are in use: a thousand
    chat sessions' frames at once would."""
    import redis.asyncio as aioredis

    url = url or settings.REDIS_URL
    per_loop = _clients.setdefault(asyncio.get_running_loop(), {})
    if url not in per_loop:
        pool: Any = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=REDIS_POOL_SIZE, timeout=REDIS_POOL_WAIT
        )
        per_loop[url] = aioredis.Redis(connection_pool=pool)
    return per_loop[url]


async def ahas_key(key: str) -> bool:
    """``cache.ahas_key(key)`` on the default cache, without a thread where it is Redis.

    Django's async cache methods run the sync ones in a worker thread: a thread hop per call,
    which on the chat relay's path (a check per browser frame) cost more CPU than the relaying.
    On Redis this asks ``EXISTS`` from the event loop; other caches keep Django's way."""
    cache = caches["default"]
    if isinstance(cache, RedisCache):
        location = settings.CACHES["default"]["LOCATION"]
        url = location[0] if isinstance(location, list | tuple) else location
        return bool(await aredis(url).exists(cache.make_and_validate_key(key)))
    return await cache.ahas_key(key)


class SharedFileBasedCache(FileBasedCache):
    def _write_content(self, file: Any, timeout: Any, value: Any) -> None:
        if os.geteuid() == 0:
            folder = os.stat(self._dir)  # type: ignore[attr-defined]  # Django's, not stubbed
            if folder.st_uid != 0:
                os.fchown(file.fileno(), folder.st_uid, folder.st_gid)
        super()._write_content(file, timeout, value)  # type: ignore[misc]
