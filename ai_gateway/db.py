"""The gateway's database work: a few worker threads that keep their connections.

Under ASGI, Django runs a request's sync code in a thread of its own and (conn_max_age=0)
connects anew each time. For the gateway that connection costs more than its queries (on
PostgreSQL, a server process is forked per connection), and it sits on every call's path to its
first byte. So the gateway runs its database work (authorising a call, recording it) with
``run``, on at most THREADS worker threads of its own, each of which keeps its connection from
one call to the next. Usage records never wait behind other work of the process's default pool.

A connection is checked (one ``SELECT 1``) before use only if it has seen an error or has been
idle for more than CHECK_IDLE_SECONDS; one that fails the check is closed, and the call
reconnects. ``close_all`` ends the threads and closes their connections (tests, shutdown).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.db import DEFAULT_DB_ALIAS, connection, connections

THREADS = 8  # at most this many connections per gateway process
CHECK_IDLE_SECONDS = 30.0

P = ParamSpec("P")
R = TypeVar("R")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_state = threading.local()  # per worker: when its connection was last used
_workers: list[Any] = []  # every worker's DatabaseWrapper, to close them at the end


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(THREADS, thread_name_prefix="ai-gateway-db")
        return _executor


def _ready() -> None:
    """Drop this thread's connection if it went bad (checked only after errors or idling)."""
    now = time.monotonic()
    last = getattr(_state, "last_used", None)
    if last is None:
        _state.last_used = now
        with _lock:
            _workers.append(connections[DEFAULT_DB_ALIAS])
        return
    _state.last_used = now
    if connection.connection is None:
        return
    if connection.errors_occurred or now - last > CHECK_IDLE_SECONDS:
        if connection.is_usable():
            connection.errors_occurred = False
        else:
            connection.close()


def _in_worker(func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    _ready()
    return func(*args, **kwargs)


def submit(func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> Future[R]:
    """Start ``func(*args, **kwargs)`` on a gateway worker thread; return its future."""
    return _pool().submit(partial(_in_worker, func, *args, **kwargs))


async def run(func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run ``func(*args, **kwargs)`` on a gateway worker thread; return its result."""
    return await sync_to_async(_in_worker, thread_sensitive=False, executor=_pool())(
        func, *args, **kwargs
    )


def close_all() -> None:
    """End the worker threads (waiting for their work) and close their connections."""
    global _executor
    with _lock:
        executor, _executor = _executor, None
    if executor is not None:
        executor.shutdown(wait=True)
    with _lock:
        workers = list(_workers)
        _workers.clear()
    for wrapper in workers:
        if wrapper.connection is not None:
            wrapper.connection.close()  # the raw connection: its thread has ended
            wrapper.connection = None
