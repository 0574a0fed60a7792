"""The chat page. The conversation itself flows over the ChatConsumer WebSocket."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from sandboxes.access import get_sandbox_for_user


@login_required
def chat(request: HttpRequest) -> HttpResponse:
    """Render the chat page for the user's own sandbox (404 if they have none)."""
    sandbox = get_sandbox_for_user(request.user)
    return render(request, "sandboxes/chat.html", {"sandbox": sandbox})
