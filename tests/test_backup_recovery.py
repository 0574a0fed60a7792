"""What keeps a restore or backup safe from everyone else while it works, and what lets
reconcile finish one a dead worker left: a restoring agent no one else can start, a start that
waits for a long backup, deep trees removed, a stuck-start check that leaves a restoring start
alone. Real restic where needed, on sandboxes whose data dir is written by hand (no gateway)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sandboxes import actions as sandbox_actions
from sandboxes.models import Sandbox

pytestmark = pytest.mark.django_db(transaction=True)
State = Sandbox.State
MakeSandbox = Callable[..., Sandbox]


def test_a_restoring_agent_is_started_by_no_one_but_its_restore(
    data_sandbox: MakeSandbox,
) -> None:
    sandbox = data_sandbox("held@recovery.test", state="restoring")
    for start in (
        lambda s: sandbox_actions.start_sandbox(s, explicit=True),
        lambda s: sandbox_actions.start_sandbox(s, actor="staff"),
        lambda s: sandbox_actions.restart_sandbox(s),
    ):
        with pytest.raises(sandbox_actions.TransitionRefused, match="being restored"):
            list(start(sandbox))
    stale = Sandbox.objects.get(pk=sandbox.pk)
    stale.state = State.STOPPED  # an object read before the restore held it
    with pytest.raises(sandbox_actions.TransitionRefused, match="being restored"):
        list(sandbox_actions.start_sandbox(stale, explicit=True))
    sandbox.refresh_from_db()
    assert sandbox.state == State.RESTORING
    assert not sandbox.events.filter(state=State.STARTING).exists()
