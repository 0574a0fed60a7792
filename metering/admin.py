"""Staff's cost table: every user's month of usage, cost, revenue and margin.

The "Usage and cost" entry of the admin index opens it (it is DailyUsage's changelist, replaced
by this table). Query string: ``month=YYYY-MM`` (default: this month), ``plan=<slug>``, and
``o=<column>`` or ``o=-<column>`` to sort (columns: metering.reports.SORT_KEYS). A plan that
does not exist is not applied: the table says so and shows all plans. ``csv/`` with the same
query string downloads the same rows (or answers 400 for a plan that does not exist). Beside
the table: the month's cost per always-on user and per user of a plan that sleeps, and the warm
pool's own cost.

Only staff with ``metering.view_costs`` (superusers have it) see it; the rows are read-only.

The CSV is opened in spreadsheets, which run a cell starting with ``=``, ``+``, ``-`` or ``@``
(or a tab or carriage return before one) as a formula, and a user picks their own email. So
each text cell (user, plan) that starts with one of those is written with a ``'`` in front;
number cells are written as they are (a negative margin stays a number).
"""

from __future__ import annotations

import csv
from typing import Any

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, QueryDict
from django.template.response import TemplateResponse
from django.urls import URLPattern, path
from django.utils import timezone

from billing.models import Plan
from metering.models import DailyUsage
from metering.pricing import rounded, usd
from metering.reports import SORT_KEYS, CostRow, Month, cost_rows, fleet, sort_rows, total_row
from metering.views import bad_request, month_from

COLUMNS = [
    ("user", "User"),
    ("plan", "Plan"),
    ("cpu", "CPU-s"),
    ("gb_hours", "GB-hours"),
    ("gb_days", "Storage GB-days"),
    ("tokens", "Tokens"),
    ("compute", "Compute $"),
    ("storage", "Storage $"),
    ("model", "Model $"),
    ("total", "Total cost $"),
    ("revenue", "Revenue $"),
    ("margin", "Margin $"),
]
TEXT_COLUMNS = 2  # CSV_HEADER's first columns are text (user, plan); the rest are numbers
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
CSV_HEADER = [
    "user",
    "plan",
    "cpu_seconds",
    "gb_hours",
    "storage_gb_days",
    "tokens",
    "byok_tokens",
    "compute_usd",
    "storage_usd",
    "model_usd",
    "total_cost_usd",
    "revenue_usd",
    "margin_usd",
]


def figures(row: CostRow) -> list[str]:
    """Return ``row`` as the table and the CSV print it (CSV_HEADER's order)."""
    u, c = row.usage, row.cost
    return [
        row.user,
        row.plan,
        str(rounded(u.cpu_seconds, 0)),
        str(rounded(u.gb_hours, 2)),
        str(rounded(u.gb_days, 2)),
        str(u.tokens),
        str(u.byok_tokens),
        *(str(usd(amount)) for amount in (c.compute, c.storage, c.model, c.total)),
        str(usd(row.revenue)),
        str(usd(row.margin)),
    ]


def csv_cells(row: CostRow) -> list[str]:
    """Return ``row`` as the CSV writes it: :func:`figures`, text cells defused."""
    cells = figures(row)
    return [_defused(c) for c in cells[:TEXT_COLUMNS]] + cells[TEXT_COLUMNS:]


def _defused(text: str) -> str:
    """Return ``text`` with a ``'`` in front if a spreadsheet would read it as a formula."""
    return f"'{text}" if text.startswith(FORMULA_STARTS) else text


def may_view_costs(request: HttpRequest) -> bool:
    user = request.user
    return bool(user.is_active and user.is_staff and user.has_perm("metering.view_costs"))


@admin.register(DailyUsage)
class CostTableAdmin(admin.ModelAdmin[DailyUsage]):
    def has_module_permission(self, request: HttpRequest) -> bool:
        return may_view_costs(request)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return may_view_costs(request)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_urls(self) -> list[URLPattern]:
        csv_view = self.admin_site.admin_view(self.csv_view)
        return [path("csv/", csv_view, name="metering_dailyusage_csv"), *super().get_urls()]

    def _rows(
        self, request: HttpRequest, plan: str
    ) -> tuple[Month, list[CostRow], list[CostRow], str]:
        """Return the month, every row of it, the rows shown (of ``plan``'s slug if given, in
        order) and the order. Raise ValueError on a bad month."""
        if not may_view_costs(request):
            raise PermissionDenied
        month = month_from(request)
        order = request.GET.get("o", "user")
        everyone = cost_rows(month, timezone.now())
        shown = [r for r in everyone if not plan or r.plan_slug == plan]
        return month, everyone, sort_rows(shown, order), order

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        plan, unknown_plan = _plan_filter(request)
        try:
            month, everyone, rows, order = self._rows(request, plan)
        except ValueError as exc:
            return bad_request(exc)
        query = request.GET.copy()
        if unknown_plan:
            del query["plan"]
        plans = Plan.objects.order_by("price_monthly", "name")
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": f"Usage and cost, {month.label}",
            "month": month,
            "this_month": Month.of(timezone.now()),
            "plans": plans,
            "plan": plan or unknown_plan,  # as asked: the month links keep it
            "plan_name": next((p.name for p in plans if p.slug == plan), ""),
            "unknown_plan": unknown_plan,
            "columns": _headers(request, order),
            "rows": [(row, figures(row)) for row in rows],
            "total": figures(
                total_row(rows, f"Total, {len(rows)} user{'s' if len(rows) != 1 else ''}")
            ),
            "fleet": fleet(month, everyone),
            "query": query.urlencode(),
            **(extra_context or {}),
        }
        return TemplateResponse(request, "admin/metering/costs.html", context)

    def csv_view(self, request: HttpRequest) -> HttpResponse:
        plan, unknown_plan = _plan_filter(request)
        try:
            if unknown_plan:
                raise ValueError(f"There is no plan {unknown_plan!r}.")
            month, _, rows, _ = self._rows(request, plan)
        except ValueError as exc:
            return bad_request(exc)
        response = HttpResponse(content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="hermit-costs-{month}.csv"'
        writer = csv.writer(response)
        writer.writerow(CSV_HEADER)
        writer.writerows(csv_cells(row) for row in rows)
        return response


def _plan_filter(request: HttpRequest) -> tuple[str, str]:
    """Return the plan filter to apply (an existing plan's slug, or "" for all plans) and the
    slug asked for if no plan has it (else "")."""
    asked = request.GET.get("plan", "")
    if not asked or Plan.objects.filter(slug=asked).exists():
        return asked, ""
    return "", asked


def _headers(request: HttpRequest, order: str) -> list[dict[str, str]]:
    """Return each column's label, the link that sorts by it (descending if it is already
    sorted ascending), and how it is sorted now ("asc", "desc" or "")."""
    current = order.lstrip("-") if order.lstrip("-") in SORT_KEYS else "user"
    descending = order.startswith("-")
    headers = []
    for key, label in COLUMNS:
        query: QueryDict = request.GET.copy()
        query["o"] = f"-{key}" if key == current and not descending else key
        state = ("desc" if descending else "asc") if key == current else ""
        headers.append({"key": key, "label": label, "url": f"?{query.urlencode()}", "state": state})
    return headers
