"""The one way a request gets usage figures: the signed-in user's own.

Views never look usage up by a user id from the request; they pass ``request.user`` here.
Staff see everyone's figures only in the admin's cost table (metering.admin), which needs the
``metering.view_costs`` permission.
"""

from __future__ import annotations

from typing import Any

from django.http import Http404

from metering.reports import Month, UserMonth, user_month


def get_usage_for_user(user: Any, month: Month) -> UserMonth:
    """Return ``user``'s usage in ``month``. Raise Http404 if there is no signed-in user."""
    if user is None or not user.is_authenticated:
        raise Http404("No usage")
    return user_month(user, month)
