"""How fast an agent answers on Telegram: awake, and asleep (hibernated, or stopped where a
checkpoint is not possible), from an update POSTed to the portal's webhook to the agent's
reply reaching the Bot API's ``sendMessage``.

One run on a real gateway in a real bubblewrap sandbox (local backend), through the product's
code paths: the bot is linked with ``doorbell.actions.connect`` (the gateway restarts with its
Telegram channel and ``/hooks/agent``); each update goes through the portal's webhook view
(Django's test client, in this process), which stores it and queues the delivery; the delivery
task then runs here as a worker would run it (``deliver_updates.apply``: the broker's pick-up
time is not counted); the gateway runs the turn against a fake model (OpenAI streaming format,
through the AI gateway) and sends its answer through the portal's egress relay to a local fake
of the Bot API (tests/fakes/telegram_api.py). The agent is put to sleep with
``sandboxes.sleep.hibernate``, as the idle policy does.

Figures per case (``--runs`` each, default 3): ack (the webhook's 200), reply (sendMessage
received), median and max. Runs in a throwaway data dir (SQLite, no Redis, no portal server;
bench/_wake_env.py), needs root (bubblewrap, pasta, cgroups), stops everything it started.
Ends with one ``RESULT key=value ...`` line.

    .venv/bin/python bench/telegram.py [--runs 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import _wake_env as env  # noqa: E402

REPLY = "Hello from your agent on Telegram."
CHAT_ID = 777


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def one_message(client: Any, link: Any, telegram: Any, text: str) -> tuple[float, float]:
    """POST one update to the webhook, run the delivery, wait for the reply; return (ack, reply)
    seconds since the POST."""
    from doorbell import tasks
    from doorbell.views import SECRET_HEADER

    before = len(telegram.messages_to(CHAT_ID))
    update = telegram.make_update(text, chat_id=CHAT_ID)
    started = time.monotonic()
    response = client.post(
        f"/channels/telegram/{link.webhook_id}/",
        update,
        content_type="application/json",
        headers={SECRET_HEADER: link.secret},
    )
    ack = time.monotonic() - started
    if response.status_code != 200:
        raise RuntimeError(f"the webhook answered {response.status_code}")
    tasks.deliver_updates.apply(args=[link.sandbox_id])
    sent = telegram.wait_for_message(CHAT_ID, timeout=180, count=before + 1)
    if len(sent) <= before:
        raise RuntimeError("no reply reached sendMessage within 180 s")
    return ack, sent[-1].at - started


def measure(runs: int, telegram: Any) -> dict[str, list[tuple[float, float]]]:
    from django.test import Client

    from doorbell import actions
    from portal.celery import app
    from sandboxes import actions as sandbox_actions
    from sandboxes import sleep
    from sandboxes.models import Sandbox
    from tests.factories import make_user

    sandbox = Sandbox.objects.get(owner=make_user("agent@telegram.bench"))
    t = time.monotonic()
    sandbox_actions.provision_sandbox(sandbox)
    sandbox.refresh_from_db()
    if sandbox.state != Sandbox.State.RUNNING:
        raise RuntimeError(f"the bench's agent did not start: {sandbox.error_message}")
    print(f"first boot: {time.monotonic() - t:.1f} s", flush=True)
    app.conf.task_always_eager = True  # the link's restart, here and now
    t = time.monotonic()
    link = actions.connect(sandbox, telegram.add_bot("bench_bot"))
    app.conf.task_always_eager = False  # deliveries are run by hand (one_message)
    start = telegram.make_update(f"/start {link.pairing_code}", chat_id=CHAT_ID)
    if actions.accept_update(link, start) != "paired":
        raise RuntimeError("the bench's Telegram account could not pair")
    print(f"bot linked, gateway restarted with its channel: {time.monotonic() - t:.1f} s")
    client = Client()
    results: dict[str, list[tuple[float, float]]] = {"awake": [], "asleep": []}
    one_message(client, link, telegram, "warm-up")  # the first turn loads the agent's code
    for n in range(runs):
        ack, reply = one_message(client, link, telegram, f"awake {n}")
        results["awake"].append((ack, reply))
        print(f"  awake  #{n + 1}: ack {ack * 1000:.0f} ms, reply {reply:.2f} s", flush=True)
    for n in range(runs):
        sandbox.refresh_from_db()
        how = sleep.hibernate(sandbox)
        sandbox.refresh_from_db()
        ack, reply = one_message(client, link, telegram, f"asleep {n}")
        results["asleep"].append((ack, reply))
        print(
            f"  asleep #{n + 1} ({how}): ack {ack * 1000:.0f} ms, reply {reply:.2f} s",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="messages per case")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("the local backend needs root (bubblewrap, pasta and cgroups)")
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    started = time.monotonic()
    tmp = env.configure(f"tg{os.getpid()}")
    for name in ("billing", "kombu", "celery"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from django.conf import settings

    from tests.fakes.telegram_api import FakeTelegram

    telegram = FakeTelegram().start()
    settings.HERMIT_TELEGRAM_API_ROOT = telegram.url
    settings.SITE_URL = "https://hermit.bench"
    settings.ALLOWED_HOSTS = ["testserver", "127.0.0.1"]
    results: dict[str, list[tuple[float, float]]] = {}
    try:
        with env.model_and_gateway() as model:
            model.script(reply=REPLY, chunks=6, delay=0.01)
            results = measure(args.runs, telegram)
    finally:
        problems = env.stop_everything()
        env.remove_data_dir(tmp)
        telegram.stop()
        for problem in problems:
            print(f"cleanup: {problem}", file=sys.stderr)
    print(f"\ntotal {time.monotonic() - started:.0f} s\n")
    print(f"{'case':8} {'ack median':>11} {'reply median':>13} {'reply max':>10}")
    summary: dict[str, float] = {}
    for case, rows in results.items():
        acks, replies = [a for a, _ in rows], [r for _, r in rows]
        summary[case] = statistics.median(replies)
        print(
            f"{case:8} {statistics.median(acks) * 1000:9.0f} ms {summary[case]:11.2f} s "
            f"{max(replies):8.2f} s"
        )
    print(
        f"\nRESULT awake_reply_s={summary['awake']:.2f} asleep_reply_s={summary['asleep']:.2f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
