"""A stand-in for an OpenClaw gateway's ``POST /hooks/agent`` (for portal tests on the in-memory
backend; the real gateway is used end to end in tests/test_telegram_e2e.py).

It checks ``Authorization: Bearer <token>`` as OpenClaw does (401 otherwise), records every
request's JSON body (``received``), and answers ``200 {"ok": true, "runId"}``, or ``status``
when set (e.g. 503, as OpenClaw answers when it cannot admit a run). With ``hold`` set, a
request is held open (not answered) until ``release`` is set: a worker can be killed while it
waits for the gateway. ``accepted`` lists the bodies it answered 200 to.

Use in-process: ``with HooksDouble(token) as gw: backend.serve(name, gw.port)``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class HooksDouble:
    def __init__(self, token: str = "") -> None:
        self.token = token
        self.status = 200
        self.hold = False
        self.release = threading.Event()
        self.received: list[dict[str, Any]] = []
        self.accepted: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if self.path != "/hooks/agent":
                    return self._answer(404, {"ok": False, "error": "not found"})
                if self.headers.get("Authorization") != f"Bearer {double.token}":
                    return self._answer(401, {"ok": False, "error": "unauthorized"})
                body = json.loads(raw)
                with double._lock:
                    double.received.append(body)
                    hold = double.hold
                if hold:
                    double.release.wait(60)
                if double.status != 200:
                    return self._answer(double.status, {"ok": False, "error": "unavailable"})
                with double._lock:
                    double.accepted.append(body)
                self._answer(200, {"ok": True, "runId": str(uuid.uuid4())})

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the caller went away (a killed worker)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def wait_received(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.received) >= count:
                    return list(self.received)
            time.sleep(0.05)
        with self._lock:
            return list(self.received)

    def __enter__(self) -> HooksDouble:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
