"""What a seeded month of metering (tests/fixtures/metering.py) costs, to the cent and beyond:
the staff cost table, its CSV, the fleet's cost per user, and each user's own usage page; who
may see which."""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
import time_machine
from django.contrib.auth.models import Permission
from django.core.exceptions import ImproperlyConfigured
from django.core.validators import validate_email
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from ai_gateway.models import UsageRecord
from billing.models import Account, Plan, PlanChange
from metering import pricing
from metering.admin import figures
from metering.charts import bar_chart
from metering.models import DailyUsage
from metering.reports import CostRow, Fleet, Month, cost_rows, fleet
from tests.factories import make_user
from tests.fixtures.metering import (
    EXPECTED_ROWS,
    MONTH,
    MONTH_END,
    PER_ALWAYS_ON_USER,
    PER_FREE_USER,
    SeededMonth,
)
from tests.mfa import enroll_totp

pytestmark = pytest.mark.django_db
GIB = 2**30
TABLE = "admin:metering_dailyusage_changelist"
CSV = "admin:metering_dailyusage_csv"


@pytest.fixture
def month_end() -> Any:
    with time_machine.travel(MONTH_END, tick=False):
        yield


def table(client: Client, **query: str) -> list[list[str]]:
    response = client.get(reverse(TABLE), {"month": MONTH, **query})
    assert response.status_code == 200
    return [cells[:13] for _, cells in response.context["rows"]]


def test_it_gives_the_seeded_months_exact_figures_in_the_staff_table(
    seeded_month: SeededMonth, client: Client, staff: Any, month_end: None
) -> None:
    client.force_login(staff)
    assert table(client) == EXPECTED_ROWS
    page = client.get(reverse(TABLE)).content.decode()  # this month is November
    for row in EXPECTED_ROWS:
        for cell in (row[0], *row[2:6], *row[7:]):
            assert f">{cell}<" in page or f">{cell} BYOK<" in page or f">{cell}<br>" in page, cell
    assert f'id="fleet-always-on">${PER_ALWAYS_ON_USER}<' in page
    total = client.get(reverse(TABLE), {"month": MONTH}).context["total"]
    assert total == [
        "Total, 4 users", "", "12060", "1320.00", "90.00", "270000", "50000",
        "0.7960", "0.0450", "0.5500", "1.3910", "16.0000", "14.6090",
    ]  # fmt: skip
    assert f'id="fleet-sleeping">${PER_FREE_USER}<' in page


def test_it_gives_the_fleets_cost_per_always_on_and_per_free_user(
    seeded_month: SeededMonth, month_end: None
) -> None:
    month = Month.parse(MONTH)
    totals = fleet(month, cost_rows(month, MONTH_END))
    assert (totals.always_on_users, totals.per_always_on_user) == (2, PER_ALWAYS_ON_USER)
    assert (totals.sleeping_users, totals.per_sleeping_user) == (2, PER_FREE_USER)
    assert totals.pool_cost == Decimal("0.0000")


def test_it_exports_the_same_rows_as_csv(
    seeded_month: SeededMonth, client: Client, staff: Any, month_end: None
) -> None:
    client.force_login(staff)
    response = client.get(reverse(CSV), {"month": MONTH, "o": "-margin", "plan": "free"})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert 'filename="hermit-costs-2026-11.csv"' in response["Content-Disposition"]
    lines = list(csv.reader(io.StringIO(response.content.decode())))
    assert lines[0][:3] == ["user", "plan", "cpu_seconds"]
    assert lines[1:] == [EXPECTED_ROWS[3], EXPECTED_ROWS[1]]  # dave loses less than bob
    assert lines[1:] == table(client, o="-margin", plan="free")


def test_it_sorts_by_any_column_and_filters_by_plan(
    seeded_month: SeededMonth, client: Client, staff: Any, month_end: None
) -> None:
    client.force_login(staff)
    users = lambda **q: [row[0].split("@")[0] for row in table(client, **q)]  # noqa: E731
    assert users(o="-margin") == ["alice", "carol", "dave", "bob"]
    assert users(o="tokens") == ["carol", "dave", "bob", "alice"]
    assert users(o="-gb_hours") == ["alice", "carol", "bob", "dave"]
    assert users(o="cpu") == ["dave", "carol", "bob", "alice"]
    assert users(o="-revenue") == ["alice", "carol", "bob", "dave"]
    assert users(o="-user") == ["dave", "carol", "bob", "alice"]
    assert users(plan="pro") == ["alice", "carol"]
    assert users(plan="pro", o="total") == ["carol", "alice"]
    page = client.get(reverse(TABLE), {"month": MONTH, "o": "margin"}).content.decode()
    assert "o=-margin" in page  # sorted ascending: the header's link sorts descending
    # October: nothing metered; alice paid for pro from the 15th: 17 days of 31 of USD 12.
    october = table(client, month="2026-10")
    assert [(row[0], row[9], row[11]) for row in october] == [
        ("alice@example.com", "0.0000", "6.5806")
    ]


def test_it_refuses_a_month_it_cannot_read(client: Client, staff: Any, alice: Any) -> None:
    client.force_login(staff)
    response = client.get(reverse(TABLE), {"month": "November"})
    assert response.status_code == 400
    assert "2026-11" in response.content.decode()
    client.force_login(alice)
    assert client.get(reverse("usage"), {"month": "13-2026"}).status_code == 400


def test_it_refuses_the_cost_table_to_non_staff_and_staff_without_the_permission(
    client: Client, alice: Any
) -> None:
    client.force_login(alice)
    for name in (TABLE, CSV):
        response = client.get(reverse(name))
        assert response.status_code == 302 and "/admin/login/" in response["Location"]
    helpdesk = make_user("helpdesk@example.com", is_staff=True)
    enroll_totp(helpdesk)
    client.force_login(helpdesk)
    assert client.get(reverse(TABLE)).status_code == 403
    assert client.get(reverse(CSV)).status_code == 403
    assert reverse(TABLE) not in client.get(reverse("admin:index")).content.decode()
    helpdesk.user_permissions.add(Permission.objects.get(codename="view_costs"))
    client.force_login(helpdesk)
    assert client.get(reverse(TABLE)).status_code == 200
    index = client.get(reverse("admin:index")).content.decode()
    assert reverse(TABLE) in index and "Usage and cost" in index


def test_it_shows_the_user_their_own_month(
    seeded_month: SeededMonth, client: Client, month_end: None
) -> None:
    client.force_login(seeded_month.bob)
    response = client.get(reverse("usage"))
    assert response.status_code == 200
    page = response.content.decode()
    assert "Usage in November 2026" in page
    assert 'id="usage-tokens">80,000<' in page
    assert 'id="usage-byok-tokens">50,000 on your own keys<' in page
    assert 'id="usage-cost">$0.2592<' in page
    assert 'id="usage-awake">240.0<' in page
    assert 'id="cost-compute">$0.1442<' in page
    assert 'id="cost-storage">$0.0150<' in page
    assert 'id="cost-model">$0.1000<' in page
    charts = response.context["charts"]
    assert [c.title for c in charts] == [
        "Model tokens per day",
        "Cost per day",
        "Hours awake per day",
    ]
    assert all(len(c.bars) == 30 for c in charts)
    tokens, cost, awake = ([bar.title for bar in c.bars] for c in charts)
    assert tokens[1] == "2: 30,000 tokens" and tokens[3] == "4: 50,000 tokens"
    # Day 1: 72 CPU-s and 12 GB-hours (0.0072), 1 GB-day of backups (0.0005).
    assert cost[0] == "1: 0.0077 USD" and cost[1] == "2: 0.1077 USD"
    assert cost[15] == "16: 0.0077 USD"  # dozing: memory, no CPU (0.00720 + 0.0005)
    assert cost[25] == "26: 0.0005 USD"  # asleep: its backups only
    assert awake[0] == "1: 24.0 hours" and awake[10] == "11: 0.0 hours"
    assert page.count("<rect ") == 90


def test_it_never_shows_a_user_anothers_usage(
    seeded_month: SeededMonth, client: Client, month_end: None
) -> None:
    client.force_login(seeded_month.dave)
    page = client.get(reverse("usage"), {"user": seeded_month.alice.pk}).content.decode()
    assert 'id="usage-tokens">10,000<' in page and 'id="usage-cost">$0.0500<' in page
    assert "180,000" not in page and "0.8656" not in page
    client.logout()
    response = client.get(reverse("usage"))
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


def test_it_reads_the_cost_rates_from_settings_and_refuses_a_bad_one(settings: Any) -> None:
    assert pricing.rates() == pricing.Rates(Decimal("0.0012"), Decimal("0.0006"), Decimal("0.015"))
    usage = pricing.Usage(cpu_ms=3_600_000, memory_byte_seconds=2**30 * 3600 * 10)
    assert pricing.cost(usage, 30, pricing.rates()).compute == Decimal("0.0072")
    settings.HERMIT_COST_RAM_GB_HOUR = "six tenths of a cent"
    with pytest.raises(ImproperlyConfigured, match="HERMIT_COST_RAM_GB_HOUR"):
        pricing.rates()
    settings.HERMIT_COST_RAM_GB_HOUR = "-1"
    with pytest.raises(ImproperlyConfigured, match=">= 0"):
        pricing.rates()


def test_it_prorates_revenue_by_the_days_on_each_plan() -> None:
    assert pricing.revenue({Decimal("12.00"): 31}, 31) == Decimal("12.0000")
    assert pricing.revenue({Decimal("12.00"): 10, Decimal(0): 21}, 31) == Decimal("3.8710")


def test_it_links_the_usage_page_from_the_dashboard(client: Client, alice: Any) -> None:
    client.force_login(alice)
    page = client.get(reverse("dashboard")).content.decode()
    assert f'id="usage-link" href="{reverse("usage")}"' in page


def test_it_defuses_formulas_in_the_csvs_text_cells(client: Client, staff: Any) -> None:
    evil = "=cmd|'/Ccalc'!A0@example.com"
    validate_email(evil)  # a sign-up form would take it
    with time_machine.travel(datetime(2026, 10, 15, 12, 0, tzinfo=UTC), tick=False):
        mallory = make_user(evil)
        eve = make_user("eve@example.com")
    team = Plan.objects.create(slug="team", name="@SUM(1+1)*cmd", price_monthly=Decimal("30"))
    Account.objects.filter(user=mallory).update(plan=team)
    eve.username, eve.email = "\tcmd", ""
    eve.save()
    UsageRecord.objects.create(
        user=eve, api="openai", model="gpt-test", input_tokens=10, output_tokens=0,
        cost=Decimal("0.05"), outcome=UsageRecord.Outcome.OK,
        created_at=datetime(2026, 11, 2, 9, 0, tzinfo=UTC),
    )  # fmt: skip
    client.force_login(staff)
    with time_machine.travel(MONTH_END, tick=False):
        response = client.get(reverse(CSV), {"month": MONTH, "o": "user"})
    lines = list(csv.reader(io.StringIO(response.content.decode())))
    cells = {line[0]: line for line in lines[1:]}
    assert set(cells) == {"'\tcmd", "'=cmd|'/Ccalc'!A0@example.com"}
    assert cells["'=cmd|'/Ccalc'!A0@example.com"][1] == "'@SUM(1+1)*cmd"
    assert cells["'=cmd|'/Ccalc'!A0@example.com"][11] == "30.0000"
    assert cells["'\tcmd"][1:2] == ["Free"]
    assert cells["'\tcmd"][12] == "-0.0500"  # a number stays a number, negative or not


def _change(user: Any, to: str, at: datetime, source: str = PlanChange.Source.STRIPE) -> None:
    """Move ``user`` to plan ``to`` at ``at``, recorded as billing records it."""
    account = Account.objects.select_related("plan").get(user=user)
    plan = Plan.objects.get(slug=to)
    PlanChange.objects.create(
        account=account, from_plan=account.plan, to_plan=plan, source=source, created_at=at
    )
    Account.objects.filter(pk=account.pk).update(plan=plan)


def test_it_counts_revenue_by_the_plan_in_force_each_day(client: Client, staff: Any) -> None:
    with time_machine.travel(datetime(2026, 10, 15, 12, 0, tzinfo=UTC), tick=False):
        sleeper, leaver, keeper = (make_user(f"{n}@example.com") for n in ("sl", "le", "ke"))
    # Asleep (no usage) until the upgrade on the 20th, then metered: 11 days of pro out of 30.
    _change(sleeper, "pro", datetime(2026, 11, 20, 15, 0, tzinfo=UTC))
    for day in range(20, 31):
        DailyUsage.objects.create(
            user=sleeper, day=date(2026, 11, day), plan=Plan.objects.get(slug="pro"), cpu_ms=1000
        )
    # Pro since October, cancelled on the 10th, never used anything: 9 days of pro.
    _change(leaver, "pro", datetime(2026, 10, 20, 8, 0, tzinfo=UTC))
    _change(leaver, "free", datetime(2026, 11, 10, 0, 0, tzinfo=UTC))
    # Given pro by staff on the 1st and downgraded by a failed payment the same day, then pro
    # again on the 25th: 6 days, each at the plan it ended on.
    _change(keeper, "pro", datetime(2026, 11, 1, 9, 0, tzinfo=UTC), PlanChange.Source.STAFF)
    _change(keeper, "free", datetime(2026, 11, 1, 10, 0, tzinfo=UTC), PlanChange.Source.GRACE)
    _change(keeper, "pro", datetime(2026, 11, 25, 10, 0, tzinfo=UTC), PlanChange.Source.STAFF)
    client.force_login(staff)
    with time_machine.travel(MONTH_END, tick=False):
        november = {row[0]: row[11] for row in table(client)}
        october = {row[0]: row[11] for row in table(client, month="2026-10")}
        early = {row[0]: row[11] for row in table(client, month="2026-09")}
    assert november == {
        "sl@example.com": "4.4000",  # 12 * 11 / 30
        "le@example.com": "3.6000",  # 12 * 9 / 30
        "ke@example.com": "2.4000",  # 12 * 6 / 30
    }
    # October: the leaver's 12 days of pro (20th-31st); the sleeper was on free then.
    assert october == {"le@example.com": "4.6452"}  # 12 * 12 / 31
    assert early == {}  # nobody had joined


def test_it_reads_the_cost_table_in_as_many_queries_for_any_number_of_users(
    client: Client, staff: Any
) -> None:
    def add_users(names: range) -> None:
        for n in names:
            with time_machine.travel(datetime(2026, 10, 1, tzinfo=UTC), tick=False):
                user = make_user(f"user{n}@example.com")
            _change(user, "pro", datetime(2026, 11, 1 + n, 12, 0, tzinfo=UTC))
            DailyUsage.objects.create(user=user, day=date(2026, 11, 2 + n), cpu_ms=n)
            UsageRecord.objects.create(
                user=user, api="openai", model="gpt-test", input_tokens=n, output_tokens=0,
                cost=Decimal("0.01"), outcome=UsageRecord.Outcome.OK,
                created_at=datetime(2026, 11, 3 + n, 9, 0, tzinfo=UTC),
            )  # fmt: skip

    def queries(name: str) -> int:
        with time_machine.travel(MONTH_END, tick=False), CaptureQueriesContext(connection) as run:
            response = client.get(reverse(name), {"month": MONTH})
        assert response.status_code == 200
        return len(run.captured_queries)

    client.force_login(staff)
    add_users(range(2))
    few = (queries(TABLE), queries(CSV))
    assert len(table(client)) == 2
    add_users(range(2, 12))
    assert (queries(TABLE), queries(CSV)) == few
    assert len(table(client)) == 12


def test_it_counts_every_account_of_the_month_in_the_fleets_cost_per_user() -> None:
    with time_machine.travel(datetime(2026, 10, 15, 12, 0, tzinfo=UTC), tick=False):
        busy, idle = make_user("busy@example.com"), make_user("idle@example.com")
        paying, asleep = make_user("paying@example.com"), make_user("asleep@example.com")
    with time_machine.travel(datetime(2026, 12, 1, 0, 0, tzinfo=UTC), tick=False):
        make_user("later@example.com")  # joined after the month: not one of its users
    UsageRecord.objects.create(
        user=busy, api="openai", model="gpt-test", input_tokens=10, output_tokens=0,
        cost=Decimal("0.05"), outcome=UsageRecord.Outcome.OK,
        created_at=datetime(2026, 11, 2, 9, 0, tzinfo=UTC),
    )  # fmt: skip
    DailyUsage.objects.create(user=paying, day=date(2026, 11, 3), cpu_ms=3_600_000)
    for user in (paying, asleep):
        _change(user, "pro", datetime(2026, 10, 20, tzinfo=UTC))
    month = Month.parse(MONTH)
    totals = fleet(month, cost_rows(month, MONTH_END))
    # busy and idle sleep: USD 0.05 between two; paying and asleep never do: USD 0.0012.
    assert (totals.sleeping_users, totals.per_sleeping_user) == (2, Decimal("0.0250"))
    assert (totals.always_on_users, totals.per_always_on_user) == (2, Decimal("0.0006"))
    assert idle.pk not in {row.user_id for row in cost_rows(month, MONTH_END)}


def test_it_refuses_a_month_out_of_its_range(client: Client, staff: Any, alice: Any) -> None:
    for month in ("9999-12", "0001-01", "1999-12", "9999-01"):
        for user, name in ((staff, TABLE), (staff, CSV), (alice, "usage")):
            client.force_login(user)
            response = client.get(reverse(name), {"month": month})
            assert response.status_code == 400, (month, name)
            assert "between 2000 and 9998" in response.content.decode()
    for edge in ("2000-01", "9998-12"):
        assert str(Month.parse(edge)) == edge
        assert client.get(reverse("usage"), {"month": edge}).status_code == 200


def test_it_answers_a_bad_month_in_plain_text(client: Client, staff: Any, alice: Any) -> None:
    script = "<script>alert(1)</script>"
    for user, name in ((staff, TABLE), (staff, CSV), (alice, "usage")):
        client.force_login(user)
        response = client.get(reverse(name), {"month": script})
        assert response.status_code == 400
        assert response["Content-Type"] == "text/plain; charset=utf-8"
        assert script in response.content.decode()  # shown as text, never run


def test_it_rounds_half_up_everywhere() -> None:
    half = pricing.Usage(
        cpu_ms=2500, memory_byte_seconds=GIB * 450, storage_byte_days=GIB // 8, awake_seconds=900
    )  # 2.5 CPU-s, 0.125 GB-hours, 0.125 GB-days, 0.25 hours awake
    spent = pricing.Cost(Decimal("0.0001"), Decimal(0), Decimal(0))
    row = CostRow(1, "u", "Free", "free", False, half, spent, Decimal("0.0000"))
    assert figures(row)[2:5] == ["3", "0.13", "0.13"]
    fleet_ = Fleet(2, Decimal("0.0001"), 2, Decimal("0.0003"), Decimal(0))
    assert (fleet_.per_always_on_user, fleet_.per_sleeping_user) == (
        Decimal("0.0001"),  # 0.00005
        Decimal("0.0002"),  # 0.00015
    )
    hours = bar_chart("Hours", "hours", [("1", half.awake_hours)], places=1)
    assert hours.bars[0].title == "1: 0.3 hours" and hours.top_label == "0.3"


def test_it_keeps_the_plan_filter_whole_in_the_month_links(client: Client, staff: Any) -> None:
    client.force_login(staff)
    with time_machine.travel(MONTH_END, tick=False):
        page = client.get(reverse(TABLE), {"month": "2026-10", "plan": "x&o=-margin"})
    links = page.content.decode()
    assert "?month=2026-09&amp;plan=x%26o%3D-margin" in links
    assert "?month=2026-11&amp;plan=x%26o%3D-margin" in links
    assert "plan=x&amp;o=" not in links


def test_it_tells_the_user_when_the_days_add_up_to_other_than_the_month(
    seeded_month: SeededMonth, client: Client, month_end: None
) -> None:
    client.force_login(seeded_month.bob)
    page = client.get(reverse("usage")).content.decode()
    # 20 days of 0.0072 (compute), 30 of 0.0005 (storage), 0.10 of model calls: 0.2590;
    # the month's 720 CPU-s and 240 GB-hours priced at once: 0.2592.
    assert 'id="usage-days-total">$0.2590<' in page and 'id="usage-cost">$0.2592<' in page
    client.force_login(seeded_month.dave)  # his only cost is one call: the days add up
    assert "usage-days-total" not in client.get(reverse("usage")).content.decode()


def test_it_says_a_plan_filter_names_no_plan_and_shows_all_plans(
    seeded_month: SeededMonth, client: Client, staff: Any, month_end: None
) -> None:
    client.force_login(staff)
    response = client.get(reverse(TABLE), {"month": MONTH, "plan": "nope"})
    page = response.content.decode()
    assert response.status_code == 200
    assert "There is no plan “nope”, so the table shows all plans." in page
    assert [cells[0] for _, cells in response.context["rows"]] == [r[0] for r in EXPECTED_ROWS]
    assert "plan=nope" not in response.context["query"]  # nor in the CSV link
    assert '<option value="" selected' not in page and "selected>" not in page  # "All plans"
    csv_response = client.get(reverse(CSV), {"month": MONTH, "plan": "nope"})
    assert csv_response.status_code == 400
    assert csv_response.content.decode() == "There is no plan 'nope'."


def test_it_names_the_plan_when_a_filtered_month_has_no_usage(
    seeded_month: SeededMonth, client: Client, staff: Any, month_end: None
) -> None:
    client.force_login(staff)
    page = client.get(reverse(TABLE), {"month": "2026-09", "plan": "pro"}).content.decode()
    assert "No usage on the Pro plan in September 2026." in page
    assert "cost-plan-unknown" not in page
