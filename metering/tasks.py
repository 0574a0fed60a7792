"""Metering's beat task: thin; the work and its contract are in metering.sampling."""

from __future__ import annotations

from celery import shared_task

from metering import sampling


@shared_task(acks_late=True)
def meter_usage() -> dict[str, int]:
    """Meter the current interval, and backup storage once a day. Idempotent: a second run in
    the same interval (or day) writes nothing. Return the samples written."""
    return {"samples": sampling.meter_interval(), "storage": sampling.meter_storage()}
