"""A local fake model provider that speaks OpenAI Chat Completions and Anthropic Messages.

It reproduces the real providers' wire formats, streaming (SSE) and non-streaming, including
token usage and error bodies, so the AI gateway and a real OpenClaw gateway can be tested offline.

Routes:
- ``POST /v1/chat/completions`` (also ``/chat/completions``): OpenAI. Streams
  ``chat.completion.chunk`` events (role chunk, content chunks, finish chunk, a usage chunk when
  ``stream_options.include_usage`` is true) and ``data: [DONE]``.
- ``GET /v1/models`` (also ``/models``): the model list, in Anthropic's format when the request
  carries ``anthropic-version``, else OpenAI's; a bad key gets the provider's 401.
- ``POST /v1/messages``: Anthropic. Streams ``message_start`` (with usage),
  ``content_block_start``, ``ping``, ``content_block_delta`` (``text_delta``) ...,
  ``content_block_stop``, ``message_delta`` (with usage), ``message_stop``.

Scripting (thread-safe): ``server.script(reply=..., chunks=..., delay=..., status=...)``
sets the default behaviour; ``server.enqueue(Script(...))`` queues one-shot behaviours consumed
by the next requests in order. ``server.respond_with(fn)`` lets a test answer from the request
itself: ``fn(body) -> Script | None`` (None: the queue or default answers), say to call a tool
first and then report what the tool returned. A Script with ``tool_calls`` answers (OpenAI only)
with those function calls in OpenAI's own format: streamed as ``delta.tool_calls`` chunks (the
id, type and name first, then the arguments JSON in pieces) ending with ``finish_reason:
"tool_calls"``, or as ``message.tool_calls`` when not streaming. ``server.requests`` records
every request (headers + JSON); ``server.disconnected`` is set (and ``server.disconnects``
counted) when a client goes away mid-stream. ``server.api_keys`` (None: any key) makes it
answer other keys with the provider's own 401 error. ``server.reset()`` restores the defaults.

Use in-process: ``with FakeModelServer() as fake: fake.url`` (a background thread on a random
127.0.0.1 port), or from the shell: ``python -m tests.fakes.model_server --port 18900``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web

DEFAULT_REPLY = "Hello from the fake model."


@dataclass(frozen=True)
class ToolCall:
    """One function call the fake model makes: the tool's ``name`` and its ``arguments``."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{secrets.token_hex(12)}")


@dataclass(frozen=True)
class Script:
    """How the fake answers one request.

    ``reply`` is split into ``chunks`` roughly equal content deltas, sent ``delay`` seconds apart
    (``first_byte_delay`` before the response starts). ``status`` forces an error response in the
    provider's format instead (e.g. 500, 429, 401). Token counts default to deterministic values
    derived from the request and the reply; set them to make exact assertions.
    """

    reply: str = DEFAULT_REPLY
    chunks: int = 3
    delay: float = 0.0
    first_byte_delay: float = 0.0
    status: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int = 0
    model: str | None = None  # the model name reported back; default echoes the request
    split_writes: bool = False  # write each SSE event in two halves, 20 ms apart (two reads)
    tool_calls: tuple[ToolCall, ...] = ()  # OpenAI: call these tools instead of replying


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    json: Any
    received_at: float = field(default_factory=time.time)


OPENAI_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}
ANTHROPIC_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: (
        "permission_error",
        "Your API key does not have permission to use the specified resource.",
    ),
    404: ("not_found_error", "The requested resource could not be found."),
    429: ("rate_limit_error", "Number of requests has exceeded your rate limit."),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}


def split_text(text: str, n: int) -> list[str]:
    """Split ``text`` into ``n`` (at most len(text)) contiguous non-empty pieces, in order."""
    n = max(1, min(n, len(text) or 1))
    size, extra = divmod(len(text), n)
    pieces, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        pieces.append(text[start:end])
        start = end
    return [p for p in pieces if p] or [""]


def count_prompt_tokens(body: Any) -> int:
    """A deterministic stand-in for a tokenizer: about one token per four bytes of input."""
    parts = [body.get("messages"), body.get("system"), body.get("tools")]
    return max(1, len(json.dumps(parts, separators=(",", ":"))) // 4)


class FakeModelServer:
    """The fake provider. Start with ``start()`` (or as a context manager); stop with ``stop()``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, api_keys: set[str] | None = None):
        self.host = host
        self.port = port
        self.api_keys = api_keys  # None accepts any key; else others get a 401
        self._initial_api_keys = api_keys
        self.requests: list[RecordedRequest] = []
        self.disconnected = threading.Event()
        self.disconnects = 0
        self.completed = 0
        self._default = Script()
        self._queue: deque[Script] = deque()
        self._responder: Callable[[Any], Script | None] | None = None
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._startup_error: BaseException | None = None

    # --- scripting -------------------------------------------------------------------------
    def script(self, **kwargs: Any) -> None:
        """Set the default behaviour for every request not served from the queue."""
        with self._lock:
            self._default = replace(Script(), **kwargs)

    def enqueue(self, *scripts: Script) -> None:
        """Queue one-shot behaviours for the next requests, in order."""
        with self._lock:
            self._queue.extend(scripts)

    def respond_with(self, responder: Callable[[Any], Script | None] | None) -> None:
        """Answer each request with ``responder(body)`` when it returns a Script (see above)."""
        with self._lock:
            self._responder = responder

    def reset(self) -> None:
        """Forget requests, queued scripts, the responder and disconnects; restore the default
        script."""
        with self._lock:
            self._default = Script()
            self._responder = None
            self.api_keys = self._initial_api_keys
            self._queue.clear()
            self.requests.clear()
            self.disconnects = 0
            self.completed = 0
            self.disconnected.clear()

    def _next_script(self, body: Any = None) -> Script:
        with self._lock:
            responder = self._responder
        answer = responder(body) if responder is not None else None
        if answer is not None:
            return answer
        with self._lock:
            return self._queue.popleft() if self._queue else self._default

    @property
    def url(self) -> str:
        """The origin, e.g. ``http://127.0.0.1:40123`` (Anthropic base URL)."""
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """The OpenAI-style base URL, ending in ``/v1``."""
        return f"{self.url}/v1"

    # --- lifecycle -------------------------------------------------------------------------
    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.openai_chat)
        app.router.add_post("/chat/completions", self.openai_chat)
        app.router.add_get("/v1/models", self.openai_models)
        app.router.add_get("/models", self.openai_models)
        app.router.add_post("/v1/messages", self.anthropic_messages)
        return app

    def start(self) -> FakeModelServer:
        """Serve in a background thread; return once the port is bound."""
        self._thread = threading.Thread(target=self._run, name="fake-model-server", daemon=True)
        self._thread.start()
        self._started.wait(10)
        if self._startup_error is not None:
            raise RuntimeError(f"fake model server failed to start: {self._startup_error}")
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._startup_error = exc
            self._started.set()
            return
        self._started.set()
        loop.run_forever()
        loop.run_until_complete(self._shutdown())
        loop.close()

    async def _serve(self) -> None:
        self._runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def stop(self) -> None:
        """Stop serving and join the thread."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> FakeModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- helpers ---------------------------------------------------------------------------
    async def _record(self, request: web.Request) -> Any:
        try:
            body = await request.json() if request.can_read_body else None
        except json.JSONDecodeError:
            body = None
        with self._lock:
            self.requests.append(
                RecordedRequest(request.method, request.path, dict(request.headers), body)
            )
        return body

    def _key_ok(self, key: str | None) -> bool:
        return self.api_keys is None or key in self.api_keys

    def _mark_disconnect(self) -> None:
        with self._lock:
            self.disconnects += 1
        self.disconnected.set()

    @staticmethod
    async def _sleep(request: web.Request, seconds: float) -> None:
        """Sleep, but raise ConnectionResetError as soon as the client has gone."""
        deadline = time.monotonic() + seconds
        while True:
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ConnectionResetError("client disconnected")
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 0.02))

    async def _stream(
        self,
        request: web.Request,
        events: AsyncIterator[bytes],
        headers: dict[str, str],
        split: bool = False,
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers=headers)
        try:
            await response.prepare(request)
            async for event in events:
                if split:  # cut inside the data line, so the reader gets it in two reads
                    middle = event.index(b"data:") + (len(event) - event.index(b"data:")) // 2
                    await response.write(event[:middle])
                    await self._sleep(request, 0.02)
                    event = event[middle:]
                await response.write(event)
            await response.write_eof()
        except ConnectionResetError:
            self._mark_disconnect()
            return response
        except asyncio.CancelledError:
            self._mark_disconnect()
            raise
        with self._lock:
            self.completed += 1
        return response

    # --- OpenAI ----------------------------------------------------------------------------
    @staticmethod
    def openai_error(status: int, message: str | None = None) -> web.Response:
        kind, code, default = OPENAI_ERRORS.get(status, ("server_error", None, "Error."))
        body = {"error": {"message": message or default, "type": kind, "param": None, "code": code}}
        return web.json_response(body, status=status, headers={"x-request-id": _req_id()})

    async def openai_models(self, request: web.Request) -> web.Response:
        await self._record(request)
        models = ["gpt-4o", "gpt-4o-mini", "fake-model"]
        if "anthropic-version" in request.headers:
            if not self._key_ok(request.headers.get("x-api-key")):
                return self.anthropic_error(401)
            listed = [
                {"type": "model", "id": m, "display_name": m, "created_at": "2025-09-29T00:00:00Z"}
                for m in ("claude-sonnet-4-5", "claude-haiku-4-5")
            ]
            return web.json_response(
                {
                    "data": listed,
                    "has_more": False,
                    "first_id": listed[0]["id"],
                    "last_id": listed[-1]["id"],
                }
            )
        auth = request.headers.get("Authorization", "")
        if not self._key_ok(auth[7:] if auth.startswith("Bearer ") else None):
            return self.openai_error(401, "Incorrect API key provided.")
        data = [
            {"id": m, "object": "model", "created": 1715367049, "owned_by": "system"}
            for m in models
        ]
        return web.json_response({"object": "list", "data": data})

    async def openai_chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        script = self._next_script(body)
        auth = request.headers.get("Authorization", "")
        key = auth[7:] if auth.startswith("Bearer ") else None
        if not self._key_ok(key):
            return self.openai_error(401, "Incorrect API key provided.")
        if not isinstance(body, dict) or "messages" not in body:
            return self.openai_error(400, "'messages' is a required property")
        try:
            await self._sleep(request, script.first_byte_delay)
        except ConnectionResetError:
            self._mark_disconnect()
            return web.Response(status=499)
        if script.status is not None:
            return self.openai_error(script.status)
        model = script.model or str(body.get("model", "fake-model"))
        pieces = split_text(script.reply, script.chunks)
        usage = _openai_usage(script, body, len(pieces))
        ident, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        if not body.get("stream"):
            message: dict[str, Any] = {
                "role": "assistant",
                "content": script.reply,
                "refusal": None,
                "annotations": [],
            }
            finish = "stop"
            if script.tool_calls:
                message["content"] = None
                message["tool_calls"] = [_openai_tool_call(call) for call in script.tool_calls]
                finish = "tool_calls"
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            return web.json_response(
                {
                    "id": ident,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [choice],
                    "usage": usage,
                    "service_tier": "default",
                    "system_fingerprint": "fp_fake0001",
                },
                headers={"x-request-id": _req_id()},
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            data: dict[str, Any] = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "service_tier": "default",
                "system_fingerprint": "fp_fake0001",
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
            if include_usage:
                data["usage"] = None
            return _sse(data)

        async def events() -> AsyncIterator[bytes]:
            if script.tool_calls:
                for tool_chunk in _openai_tool_call_deltas(script.tool_calls, script.chunks):
                    await self._sleep(request, script.delay)
                    yield chunk(tool_chunk, None)
                yield chunk({}, "tool_calls")
            else:
                yield chunk({"role": "assistant", "content": "", "refusal": None}, None)
                for piece in pieces:
                    await self._sleep(request, script.delay)
                    yield chunk({"content": piece}, None)
                yield chunk({}, "stop")
            if include_usage:
                yield _sse(
                    {
                        "id": ident,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "service_tier": "default",
                        "system_fingerprint": "fp_fake0001",
                        "choices": [],
                        "usage": usage,
                    }
                )
            yield b"data: [DONE]\n\n"

        headers = {"Content-Type": "text/event-stream; charset=utf-8", "x-request-id": _req_id()}
        return await self._stream(request, events(), headers, script.split_writes)

    # --- Anthropic -------------------------------------------------------------------------
    @staticmethod
    def anthropic_error(status: int, message: str | None = None) -> web.Response:
        kind, default = ANTHROPIC_ERRORS.get(status, ("api_error", "Internal server error"))
        body = {"type": "error", "error": {"type": kind, "message": message or default}}
        return web.json_response(body, status=status, headers={"request-id": _req_id()})

    async def anthropic_messages(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        script = self._next_script()
        if not self._key_ok(request.headers.get("x-api-key")):
            return self.anthropic_error(401)
        if not isinstance(body, dict) or "messages" not in body or "max_tokens" not in body:
            return self.anthropic_error(400, "messages and max_tokens: Field required")
        try:
            await self._sleep(request, script.first_byte_delay)
        except ConnectionResetError:
            self._mark_disconnect()
            return web.Response(status=499)
        if script.status is not None:
            return self.anthropic_error(script.status)
        model = script.model or str(body.get("model", "fake-model"))
        pieces = split_text(script.reply, script.chunks)
        inp = (
            script.prompt_tokens if script.prompt_tokens is not None else count_prompt_tokens(body)
        )
        out = script.completion_tokens if script.completion_tokens is not None else len(pieces)
        ident = f"msg_{secrets.token_hex(12)}"
        usage = {
            "input_tokens": inp,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": script.cached_tokens,
            "output_tokens": out,
        }
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": ident,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [{"type": "text", "text": script.reply}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": usage,
                },
                headers={"request-id": _req_id()},
            )

        async def events() -> AsyncIterator[bytes]:
            start_usage = {**usage, "output_tokens": 1}
            yield _sse_event(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": ident,
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": start_usage,
                    },
                },
            )
            yield _sse_event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            )
            yield _sse_event("ping", {"type": "ping"})
            for piece in pieces:
                await self._sleep(request, script.delay)
                yield _sse_event(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": piece},
                    },
                )
            yield _sse_event("content_block_stop", {"type": "content_block_stop", "index": 0})
            yield _sse_event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": out},
                },
            )
            yield _sse_event("message_stop", {"type": "message_stop"})

        headers = {
            "Content-Type": "text/event-stream; charset=utf-8",
            "request-id": _req_id(),
            "Cache-Control": "no-cache",
        }
        return await self._stream(request, events(), headers, script.split_writes)


def _openai_tool_call(call: ToolCall) -> dict[str, Any]:
    arguments = json.dumps(call.arguments)
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": arguments},
    }


def _openai_tool_call_deltas(calls: tuple[ToolCall, ...], pieces: int) -> list[dict[str, Any]]:
    """The streamed deltas of ``calls``, as OpenAI sends them: per call, one delta with its index,
    id, type, name and empty arguments, then the arguments JSON in ``pieces`` parts."""
    deltas: list[dict[str, Any]] = []
    for index, call in enumerate(calls):
        head = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        first: dict[str, Any] = {"tool_calls": [{"index": index, **head}]}
        if index == 0:
            first = {"role": "assistant", "content": None, **first}
        deltas.append(first)
        for part in split_text(json.dumps(call.arguments), pieces):
            deltas.append({"tool_calls": [{"index": index, "function": {"arguments": part}}]})
    return deltas


def _openai_usage(script: Script, body: dict[str, Any], n_pieces: int) -> dict[str, Any]:
    prompt = script.prompt_tokens if script.prompt_tokens is not None else count_prompt_tokens(body)
    completion = script.completion_tokens if script.completion_tokens is not None else n_pieces
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": script.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _sse_event(event: str, data: dict[str, Any]) -> bytes:
    payload = json.dumps(data, separators=(",", ":")).encode()
    return b"event: " + event.encode() + b"\ndata: " + payload + b"\n\n"


def _req_id() -> str:
    return f"req_{secrets.token_hex(12)}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI/Anthropic model server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18900)
    parser.add_argument("--reply", default=DEFAULT_REPLY)
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between chunks")
    parser.add_argument("--status", type=int, default=None, help="force this error status")
    args = parser.parse_args(argv)
    server = FakeModelServer(args.host, args.port)
    server.script(reply=args.reply, chunks=args.chunks, delay=args.delay, status=args.status)
    print(f"fake model server on {server.url} (OpenAI base {server.openai_base_url})", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        web.run_app(server.make_app(), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
