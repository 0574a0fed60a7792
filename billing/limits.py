"""A user's plan as the sandboxes layer receives it: a :class:`~sandboxes.limits.SandboxLimits`.

Registered with sandboxes at app-ready (``BillingConfig.ready``), so that sandboxes never import
billing: they ask :func:`sandboxes.limits.limits_for`, which lands here.
"""

from __future__ import annotations

from typing import Any

from billing.models import Plan, default_plan, plan_for
from sandboxes.limits import SandboxLimits
from sandboxes.pool import POOL_USERNAME


def limits_of(plan: Plan) -> SandboxLimits:
    """Return what ``plan`` allows a sandbox."""
    return SandboxLimits(
        plan_name=plan.name,
        memory_mb=plan.sandbox_memory_mb,
        cpu_millis=plan.cpu_millis,
        pids_max=plan.pids_max,
        internet=plan.internet,
        sleep_after=plan.sleeps_after(),
        backup_interval=plan.backup_interval,
        backup_keep_last=plan.backup_keep_last,
        backup_keep_daily=plan.backup_keep_daily,
        backup_keep_weekly=plan.backup_keep_weekly,
        browser=plan.browser,
        browser_memory_mb=plan.browser_memory_mb if plan.browser else 0,
    )


def sandbox_limits(user: Any) -> SandboxLimits:
    """Return the limits of ``user``'s plan (creating their account on the default plan if
    they have none yet). The warm pool's gateways (``sandboxes.pool``) run with the default
    plan's, what a new account gets, whatever the pool's own account says."""
    if user.username == POOL_USERNAME:
        return limits_of(default_plan())
    return limits_of(plan_for(user))
