"""The user's own usage page: this month (or ``?month=YYYY-MM``) as charts, by day."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import render
from django.utils import timezone

from metering.access import get_usage_for_user
from metering.charts import Chart, bar_chart
from metering.reports import Day, Month, UserMonth


def month_from(request: HttpRequest) -> Month:
    """Return the month asked for in ``?month=`` (default: this month). Raise ValueError."""
    value = request.GET.get("month", "")
    return Month.parse(value) if value else Month.of(timezone.now())


def bad_request(error: ValueError) -> HttpResponse:
    """Return a 400 saying what was wrong, as plain text (the message quotes the input)."""
    return HttpResponseBadRequest(str(error), content_type="text/plain; charset=utf-8")


@login_required
def usage(request: HttpRequest) -> HttpResponse:
    try:
        month = month_from(request)
    except ValueError as exc:
        return bad_request(exc)
    data = get_usage_for_user(request.user, month)
    return render(
        request,
        "metering/usage.html",
        {"data": data, "charts": _charts(data), "this_month": Month.of(timezone.now())},
    )


def _charts(data: UserMonth) -> list[Chart]:
    def days(value: Callable[[Day], Decimal | int]) -> list[tuple[str, Decimal]]:
        return [(str(d.day.day), Decimal(value(d))) for d in data.days]

    return [
        bar_chart("Model tokens per day", "tokens", days(lambda d: d.usage.tokens)),
        bar_chart("Cost per day", "USD", days(lambda d: d.cost.total), places=4),
        bar_chart("Hours awake per day", "hours", days(lambda d: d.usage.awake_hours), places=1),
    ]
