"""A user deletes their own account: they confirm with their password, then it goes as a
staff deletion does (sandboxes.accounts.request_deletion: deactivated and signed out now, its
agent stopped, its data, backups and secrets removed after HERMIT_DELETE_GRACE_DAYS).

Wrong passwords are limited as sign-in limits them: after GUESSES wrong ones within GUESS_WINDOW
for one user, the form refuses every password (right or wrong, unchecked) until the window that
began with the first wrong one is over. The count lives in Django's cache, keyed by user.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import logout
from django.contrib.auth.decorators import login_required
from django.core.cache import cache
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from sandboxes import accounts

GUESSES = 5
GUESS_WINDOW = 300  # seconds
LOCKED_OUT = (
    "Too many wrong passwords. Wait 5 minutes, then try again; your account is not deleted."
)


def _guesses_key(user: Any) -> str:
    return f"hermit:delete-account:wrong-passwords:{user.pk}"


def out_of_guesses(user: Any) -> bool:
    """Return True if ``user`` has had GUESSES wrong passwords in the current window."""
    return int(cache.get(_guesses_key(user), 0)) >= GUESSES


def count_wrong_guess(user: Any) -> None:
    """Count one wrong password for ``user``; the window starts at the first one."""
    key = _guesses_key(user)
    cache.add(key, 0, timeout=GUESS_WINDOW)
    try:
        cache.incr(key)
    except ValueError:  # the window ended between add and incr: start a new one
        cache.add(key, 1, timeout=GUESS_WINDOW)


class DeleteAccountForm(forms.Form):
    password = forms.CharField(
        label="Your password",
        widget=forms.PasswordInput(attrs={"autocomplete": "current-password"}),
    )

    def __init__(self, user: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.user = user

    def clean_password(self) -> str:
        password = str(self.cleaned_data.get("password") or "")
        if out_of_guesses(self.user):
            raise forms.ValidationError(LOCKED_OUT, code="locked-out")
        if not self.user.check_password(password):
            count_wrong_guess(self.user)
            raise forms.ValidationError("That is not your password.")
        return password


@login_required
def delete_account(request: HttpRequest) -> HttpResponse:
    """GET: explain and ask for the password. POST: delete the account, sign out; or, after
    too many wrong passwords, answer 429 with the form and why."""
    form = DeleteAccountForm(request.user, request.POST if request.method == "POST" else None)
    if form.is_bound and form.is_valid():
        accounts.request_deletion(request.user, by=request.user)
        logout(request)
        messages.success(
            request,
            "Your account is deleted. Your agent has stopped; its data and backups are removed "
            f"within {settings.HERMIT_DELETE_GRACE_DAYS} days.",
        )
        return redirect("home")
    context = {"form": form, "grace_days": settings.HERMIT_DELETE_GRACE_DAYS}
    status = 429 if form.is_bound and form.has_error("password", "locked-out") else 200
    return render(request, "sandboxes/delete_account.html", context, status=status)
