"""Per-sandbox passes (reconcile, the sleep policy): claimed one sandbox at a time.

Beat fans each pass out as one task per sandbox, routed to the sandbox's host queue
(sandboxes.tasks). Each task first claims its sandbox with a conditional UPDATE on
``Sandbox.claimed_until`` (:func:`claimed`): of two tasks for one sandbox (two beats that
overlap, a redelivered message, a reconcile and a sleep pass at once) one acts, the other
returns ``claimed``. The claim is released when the task ends, and runs out after
CLAIM_SECONDS should its worker die.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta

from django.db.models import Q
from django.utils import timezone

from sandboxes.models import Sandbox

CLAIM_SECONDS = 600  # longer than any one sandbox's repair (a cold boot with its retries)
BUSY = "claimed"


@contextlib.contextmanager
def claimed(sandbox_id: int) -> Iterator[bool]:
    """Claim the sandbox for one pass; yield whether this caller got it (False: another pass
    holds it, or the sandbox is gone). Released on exit."""
    now = timezone.now()
    until = now + timedelta(seconds=CLAIM_SECONDS)
    free = Q(claimed_until__isnull=True) | Q(claimed_until__lte=now)
    got = Sandbox.objects.filter(free, pk=sandbox_id).update(claimed_until=until)
    try:
        yield bool(got)
    finally:
        if got:
            Sandbox.objects.filter(pk=sandbox_id, claimed_until=until).update(claimed_until=None)


def tally(counts: dict[str, int], outcome: str) -> None:
    counts[outcome] = counts.get(outcome, 0) + 1
