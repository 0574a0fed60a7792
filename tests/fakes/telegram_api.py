"""A local fake of the Telegram Bot API, speaking its wire format (aiohttp, 127.0.0.1).

Every method is ``/bot<token>/<method>`` (GET or POST; parameters as a query string, a JSON
body, a urlencoded or multipart form, as Telegram accepts them). Answers are Telegram's
``{"ok": true, "result": ...}``; errors ``{"ok": false, "error_code", "description"}`` with the
same HTTP status: an unknown token gets ``401 Unauthorized``, an unknown method ``404 Not
Found``, a missing parameter ``400 Bad Request: ...``.

Bots are added with :meth:`FakeTelegram.add_bot` (returns its token). Implemented: ``getMe``,
``setWebhook`` (``url``, ``secret_token``), ``deleteWebhook``, ``getWebhookInfo``,
``sendMessage`` (recorded in ``sent``; returns a Message), ``sendChatAction``,
``setMyCommands``/``deleteMyCommands``/``getMyCommands``, ``getUpdates`` (409 while a webhook is
set, else no updates). Every request is recorded in ``requests`` (method, token).

:meth:`FakeTelegram.post_update` sends an update to the bot's webhook as Telegram does (the
``X-Telegram-Bot-Api-Secret-Token`` header, a JSON Update body) and returns the HTTP status;
:meth:`FakeTelegram.make_update` builds a private-chat text message Update.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from aiohttp import web

Handler = Callable[["Bot", dict[str, Any]], Awaitable[Any]]


@dataclass
class Bot:
    id: int
    username: str
    token: str
    webhook_url: str = ""
    webhook_secret: str = ""
    commands: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class Sent:
    token: str
    chat_id: str
    text: str
    at: float


class ApiError(Exception):
    def __init__(self, code: int, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.description = description


class FakeTelegram:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.bots: dict[str, Bot] = {}
        self.sent: list[Sent] = []
        self.requests: list[tuple[str, str]] = []
        self._ids = itertools.count(7_000_000_001)
        self._message_ids = itertools.count(1)
        self._update_ids = itertools.count(500_000_001)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()

    # --- test controls -----------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def add_bot(self, username: str = "hermit_test_bot") -> str:
        """Register a bot; return its token (``<id>:<35 characters>``)."""
        bot_id = next(self._ids)
        token = f"{bot_id}:AA{secrets.token_urlsafe(25)[:33]}"
        with self._lock:
            self.bots[token] = Bot(bot_id, username, token)
        return token

    def reset(self) -> None:
        with self._lock:
            self.bots.clear()
            self.sent.clear()
            self.requests.clear()

    def messages_to(self, chat_id: int | str) -> list[Sent]:
        with self._lock:
            return [s for s in self.sent if s.chat_id == str(chat_id)]

    def wait_for_message(self, chat_id: int | str, timeout: float, count: int = 1) -> list[Sent]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.messages_to(chat_id)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        return self.messages_to(chat_id)

    def make_update(self, text: str, chat_id: int = 4242, update_id: int | None = None) -> dict:
        uid = update_id if update_id is not None else next(self._update_ids)
        user = {"id": chat_id, "is_bot": False, "first_name": "Alice", "username": "alice"}
        return {
            "update_id": uid,
            "message": {
                "message_id": next(self._message_ids),
                "from": user,
                "chat": {
                    "id": chat_id,
                    "first_name": "Alice",
                    "username": "alice",
                    "type": "private",
                },
                "date": int(time.time()),
                "text": text,
            },
        }

    def post_update(self, token: str, update: dict[str, Any], secret: str | None = None) -> int:
        """POST ``update`` to the bot's webhook as Telegram does; return the HTTP status.
        ``secret`` overrides the secret token sent (None: the one the bot registered)."""
        bot = self.bots[token]
        if not bot.webhook_url:
            raise AssertionError("the bot has no webhook")
        header = bot.webhook_secret if secret is None else secret
        headers = {"Content-Type": "application/json"}
        if header:
            headers["X-Telegram-Bot-Api-Secret-Token"] = header
        response = httpx.post(bot.webhook_url, content=json.dumps(update), headers=headers)
        return response.status_code

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> FakeTelegram:
        self._thread = threading.Thread(target=self._run, name="fake-telegram", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("fake Telegram did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> FakeTelegram:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        loop.run_until_complete(self._serve())
        self._started.set()
        loop.run_forever()
        if self._runner is not None:
            loop.run_until_complete(self._runner.cleanup())
        loop.close()

    async def _serve(self) -> None:
        app = web.Application(client_max_size=50 * 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    # --- the API -------------------------------------------------------------------------------
    async def _params(self, request: web.Request) -> dict[str, Any]:
        params: dict[str, Any] = dict(request.query)
        if request.method != "POST" or not request.can_read_body:
            return params
        if request.content_type == "application/json":
            body = await request.json()
            if isinstance(body, dict):
                params.update(body)
        else:
            form = await request.post()
            params.update({k: v for k, v in form.items() if isinstance(v, str)})
        return params

    async def _handle(self, request: web.Request) -> web.Response:
        token, method = request.match_info["token"], request.match_info["method"]
        with self._lock:
            self.requests.append((method, token))
            bot = self.bots.get(token)
        if bot is None:
            return _error(401, "Unauthorized")
        handler = METHODS.get(method)
        if handler is None:
            return _error(404, "Not Found")
        try:
            params = await self._params(request)
            result = await handler(self, bot, params)
        except ApiError as exc:
            return _error(exc.code, exc.description)
        except ValueError:
            return _error(400, "Bad Request: can't parse JSON object")
        return web.json_response({"ok": True, "result": result})

    async def get_me(self, bot: Bot, params: dict[str, Any]) -> Any:
        return {
            "id": bot.id,
            "is_bot": True,
            "first_name": "Hermit test",
            "username": bot.username,
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
        }

    async def set_webhook(self, bot: Bot, params: dict[str, Any]) -> Any:
        url = str(params.get("url", ""))
        if not url:
            raise ApiError(
                400, "Bad Request: bad webhook: An HTTPS URL must be provided for webhook"
            )
        bot.webhook_url, bot.webhook_secret = url, str(params.get("secret_token", ""))
        return True

    async def delete_webhook(self, bot: Bot, params: dict[str, Any]) -> Any:
        bot.webhook_url = bot.webhook_secret = ""
        return True

    async def get_webhook_info(self, bot: Bot, params: dict[str, Any]) -> Any:
        return {"url": bot.webhook_url, "has_custom_certificate": False, "pending_update_count": 0}

    async def send_message(self, bot: Bot, params: dict[str, Any]) -> Any:
        chat_id, text = params.get("chat_id"), params.get("text")
        if chat_id in (None, ""):
            raise ApiError(400, "Bad Request: chat_id is empty")
        if not text:
            raise ApiError(400, "Bad Request: message text is empty")
        with self._lock:
            self.sent.append(Sent(bot.token, str(chat_id), str(text), time.monotonic()))
        return {
            "message_id": next(self._message_ids),
            "from": {
                "id": bot.id,
                "is_bot": True,
                "first_name": "Hermit test",
                "username": bot.username,
            },
            "chat": {
                "id": int(chat_id) if str(chat_id).lstrip("-").isdigit() else chat_id,
                "type": "private",
            },
            "date": int(time.time()),
            "text": str(text),
        }

    async def send_chat_action(self, bot: Bot, params: dict[str, Any]) -> Any:
        if params.get("chat_id") in (None, ""):
            raise ApiError(400, "Bad Request: chat_id is empty")
        return True

    async def set_my_commands(self, bot: Bot, params: dict[str, Any]) -> Any:
        commands = params.get("commands", [])
        bot.commands = json.loads(commands) if isinstance(commands, str) else list(commands)
        return True

    async def delete_my_commands(self, bot: Bot, params: dict[str, Any]) -> Any:
        bot.commands = []
        return True

    async def get_my_commands(self, bot: Bot, params: dict[str, Any]) -> Any:
        return bot.commands

    async def get_updates(self, bot: Bot, params: dict[str, Any]) -> Any:
        if bot.webhook_url:
            raise ApiError(
                409,
                "Conflict: can't use getUpdates method while webhook is active; "
                "use deleteWebhook to delete the webhook first",
            )
        return []


def _error(code: int, description: str) -> web.Response:
    body = {"ok": False, "error_code": code, "description": description}
    return web.json_response(body, status=code)


METHODS: dict[str, Callable[[FakeTelegram, Bot, dict[str, Any]], Awaitable[Any]]] = {
    "getMe": FakeTelegram.get_me,
    "setWebhook": FakeTelegram.set_webhook,
    "deleteWebhook": FakeTelegram.delete_webhook,
    "getWebhookInfo": FakeTelegram.get_webhook_info,
    "sendMessage": FakeTelegram.send_message,
    "sendChatAction": FakeTelegram.send_chat_action,
    "setMyCommands": FakeTelegram.set_my_commands,
    "deleteMyCommands": FakeTelegram.delete_my_commands,
    "getMyCommands": FakeTelegram.get_my_commands,
    "getUpdates": FakeTelegram.get_updates,
}
