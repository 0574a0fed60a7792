"""The sandbox state machine: every allowed transition, and refusal of the rest."""

from __future__ import annotations

import itertools

import pytest

from sandboxes import actions
from sandboxes.models import Sandbox, SandboxEvent

pytestmark = pytest.mark.django_db
State = Sandbox.State

# The state machine, written out by hand: a change to actions.ALLOWED must change this too.
EXPECTED: dict[str, set[str]] = {
    "provisioning": {"starting", "failed"},
    "starting": {"running", "failed", "stopping"},
    "running": {"stopping", "starting", "failed", "dozing"},
    # dozing: frozen in place; thawed back to running, or stopped / hibernated
    "dozing": {"running", "stopping", "failed"},
    "stopping": {"stopped", "sleeping", "failed", "restoring"},
    "sleeping": {"starting", "stopping", "failed", "restoring"},
    "stopped": {"starting", "restoring"},
    "failed": {"starting", "stopping", "restoring"},
    # a restore holds a stopped sandbox while it swaps the data dir in
    "restoring": {"starting", "stopped", "failed"},
}
ALLOWED_PAIRS = sorted((a, b) for a, targets in EXPECTED.items() for b in targets)
REFUSED_PAIRS = sorted(
    (a, b) for a, b in itertools.product(State.values, State.values) if b not in EXPECTED[a]
)


def _sandbox_in(owner: object, state: str) -> Sandbox:
    sandbox = Sandbox.objects.get(owner=owner)
    Sandbox.objects.filter(pk=sandbox.pk).update(state=state)
    sandbox.refresh_from_db()
    return sandbox


def test_it_covers_every_state() -> None:
    assert set(EXPECTED) == set(actions.ALLOWED) == set(State.values)
    assert len(ALLOWED_PAIRS) + len(REFUSED_PAIRS) == len(State.values) ** 2


def test_the_table_is_the_one_written_here() -> None:
    assert {a: set(targets) for a, targets in actions.ALLOWED.items()} == EXPECTED


@pytest.mark.parametrize(("source", "target"), ALLOWED_PAIRS)
def test_it_allows(alice: object, source: str, target: str) -> None:
    sandbox = _sandbox_in(alice, source)
    actions.transition(sandbox, target, actor=SandboxEvent.Actor.STAFF, message="why")
    sandbox.refresh_from_db()
    assert sandbox.state == target
    event = sandbox.events.first()
    assert event is not None
    assert (event.kind, event.state, event.actor, event.message) == (
        "state",
        target,
        "staff",
        "why",
    )


@pytest.mark.parametrize(("source", "target"), REFUSED_PAIRS)
def test_it_refuses(alice: object, source: str, target: str) -> None:
    sandbox = _sandbox_in(alice, source)
    before = sandbox.events.count()
    with pytest.raises(actions.TransitionRefused):
        actions.transition(sandbox, target)
    sandbox.refresh_from_db()
    assert sandbox.state == source
    assert sandbox.events.count() == before


def test_it_refuses_a_transition_that_lost_a_race(alice: object) -> None:
    sandbox = _sandbox_in(alice, State.STOPPED)
    stale = Sandbox.objects.get(pk=sandbox.pk)
    actions.transition(sandbox, State.STARTING)
    with pytest.raises(actions.TransitionRefused, match="meanwhile"):
        actions.transition(stale, State.STARTING)
    assert Sandbox.objects.get(pk=sandbox.pk).state == State.STARTING


def test_it_records_the_event_of_a_new_sandbox(alice: object) -> None:
    sandbox = Sandbox.objects.get(owner=alice)
    assert sandbox.state == State.PROVISIONING
    assert sandbox.events.filter(kind="created").exists()
    assert sandbox.gateway_token  # generated, and encrypted at rest:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT gateway_token FROM sandboxes_sandbox WHERE id = %s", [sandbox.pk])
        stored = cursor.fetchone()[0]
    assert stored != sandbox.gateway_token and sandbox.gateway_token not in stored
