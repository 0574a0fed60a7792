"""Usage records written in batches, none lost and none written twice.

``write(build)`` returns once the record that ``build()`` makes (an unsaved UsageRecord and the
call's database ticket, if any) is saved and its ticket settled. Records that arrive while a
batch is being written go together into the next one: one INSERT and one commit for all, on one
of the gateway's database threads (``db``), so 50 streams that end at once cost a few commits
instead of 50 (the stream waits for its record before it ends). A batch is one transaction; if
it fails, its records are written one by one, so a bad record costs no other, and a record that
cannot be written raises in its own call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from django.db import transaction

from ai_gateway import db, limits
from ai_gateway.limits import Amount, Ticket, to_micros
from ai_gateway.models import UsageRecord

log = logging.getLogger(__name__)

MAX_BATCH = 200
Built = tuple[UsageRecord, Ticket | None]


@dataclass
class _Item:
    build: Callable[[], Built]
    future: asyncio.Future[UsageRecord]
    loop: asyncio.AbstractEventLoop


_lock = threading.Lock()
_pending: list[_Item] = []
_writing = False  # a worker is draining _pending


def spent(row: UsageRecord) -> Amount:
    """Return what a recorded call used of its owner's quota (nothing when BYOK)."""
    return Amount() if row.byok else Amount(to_micros(row.cost), row.total_tokens)


async def write(build: Callable[[], Built]) -> UsageRecord:
    """Save the record ``build`` makes (called on a database thread); return it once saved."""
    global _writing
    loop = asyncio.get_running_loop()
    item = _Item(build, loop.create_future(), loop)
    with _lock:
        _pending.append(item)
        start, _writing = not _writing, True
    if start:
        db.submit(_drain)
    return await item.future


def _drain() -> None:
    global _writing
    while True:
        with _lock:
            batch = _pending[:MAX_BATCH]
            del _pending[:MAX_BATCH]
            if not batch:
                _writing = False
                return
        try:
            _write(batch)
        except BaseException as exc:  # a bug here must not leave calls waiting for ever
            for item in batch:
                _resolve(item, exc)
            raise


def _write(batch: list[_Item]) -> None:
    built: list[tuple[_Item, Built]] = []
    for item in batch:
        try:
            built.append((item, item.build()))
        except Exception as exc:
            _resolve(item, exc)
    try:
        with transaction.atomic():
            UsageRecord.objects.bulk_create([row for _, (row, _) in built])
            for _, (row, ticket) in built:
                _settle(row, ticket)
    except Exception:
        log.exception("A batch of %d usage records failed; writing them one by one", len(built))
        for item, (row, ticket) in built:
            _write_one(item, row, ticket)
        return
    for item, (row, _) in built:
        _resolve(item, row)


def _write_one(item: _Item, row: UsageRecord, ticket: Ticket | None) -> None:
    row.pk = None  # the failed batch may have numbered it
    try:
        with transaction.atomic():
            UsageRecord.objects.bulk_create([row])
            _settle(row, ticket)
    except Exception as exc:
        _resolve(item, exc)
    else:
        _resolve(item, row)


def _settle(row: UsageRecord, ticket: Ticket | None) -> None:
    if ticket is not None:
        limits.settle_db(ticket, spent(row))


def _resolve(item: _Item, outcome: UsageRecord | BaseException) -> None:
    def done() -> None:
        if item.future.done():
            return
        if isinstance(outcome, BaseException):
            item.future.set_exception(outcome)
        else:
            item.future.set_result(outcome)

    with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits for it any more
        item.loop.call_soon_threadsafe(done)
