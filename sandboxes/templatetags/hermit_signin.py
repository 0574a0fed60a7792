"""``{% inactive_notice as notice %}``: sandboxes.signin.inactive_notice for the page's request."""

from __future__ import annotations

from typing import Any

from django import template

from sandboxes import signin

register = template.Library()


@register.simple_tag(takes_context=True)
def inactive_notice(context: dict[str, Any]) -> signin.InactiveNotice:
    return signin.inactive_notice(context["request"])
