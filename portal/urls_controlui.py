"""The Control UI origin's only URLs (``portal.middleware`` routes its host here): the ticket
exchange, and everything else proxied to the granted sandbox's gateway."""

from __future__ import annotations

from django.urls import path, re_path

from sandboxes import views_controlui

urlpatterns = [
    path(views_controlui.ENTER_PATH, views_controlui.enter, name="controlui-enter"),
    re_path(r"^(?s:(?P<path>.*))$", views_controlui.proxy, name="controlui-proxy"),
]
