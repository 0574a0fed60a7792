"""What a user whose account is not active is told when they sign in.

allauth answers a right password for an inactive user with a redirect to its "account inactive"
page, which knows nothing of the user. :class:`AccountAdapter` (settings.ACCOUNT_ADAPTER) keeps
that user's pk in the session first (only after the password, code or link proved who they are),
and the page asks :func:`inactive_notice` what to say: for a pending deletion, when it was asked
for, when the data goes and that support can undo it until then (the address is
DEFAULT_FROM_EMAIL's); for any other inactive account, a generic note.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from email.utils import parseaddr
from typing import Any

from allauth.account.adapter import DefaultAccountAdapter
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.utils import timezone

from sandboxes.models import AccountDeletion

SESSION_KEY = "hermit_inactive_user"


@dataclass(frozen=True)
class InactiveNotice:
    support_email: str
    deleted_at: datetime | None = None  # None: deactivated for another reason
    purge_after: datetime | None = None
    can_undo: bool = False


class AccountAdapter(DefaultAccountAdapter):
    def respond_user_inactive(self, request: HttpRequest, user: Any) -> HttpResponse:
        """Remember who signed in, then answer as allauth does (its inactive page)."""
        request.session[SESSION_KEY] = user.pk
        return super().respond_user_inactive(request, user)


def support_email() -> str:
    """Return the address users write to for support: DEFAULT_FROM_EMAIL's address."""
    return parseaddr(settings.DEFAULT_FROM_EMAIL)[1] or settings.DEFAULT_FROM_EMAIL


def inactive_notice(request: HttpRequest) -> InactiveNotice:
    """Return what to tell the inactive user who last signed in in this session: their pending
    deletion's dates if there is one, else only the support address."""
    user_pk = request.session.get(SESSION_KEY) if hasattr(request, "session") else None
    deletion = None
    if user_pk is not None:
        deletion = AccountDeletion.objects.filter(user_id=user_pk, purged_at__isnull=True).first()
    if deletion is None:
        return InactiveNotice(support_email=support_email())
    undoable = deletion.purge_started_at is None and deletion.purge_after > timezone.now()
    return InactiveNotice(
        support_email=support_email(),
        deleted_at=deletion.requested_at,
        purge_after=deletion.purge_after,
        can_undo=undoable,
    )
