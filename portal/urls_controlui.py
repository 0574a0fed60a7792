"""The Control UI origin's only URLs (``portal.middleware`` routes its host here): the ticket
exchange, and everything else proxied to the granted sandbox's gateway."""

from __future__ import annotations

from django.urls import path, re_path

from sandboxes import views_controlui

urlpatterns = [
    path(views_controlui.ENTER_PATH, views_controlui.enter, name="controlui-enter"),
    # Any path, newlines included. A character class, not an inline (?s) flag: Django must be
    # able to reverse every pattern of this urlconf (allauth's middleware reverses its login URL
    # on every 404, and an inline flag made that a 500).
    re_path(r"^(?P<path>[\s\S]*)$", views_controlui.proxy, name="controlui-proxy"),
]
