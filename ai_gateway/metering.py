"""Reading token usage out of provider responses as the bytes pass through.

``UsageMeter.feed`` takes raw response bytes in whatever pieces they arrive and never holds more
than one partial line (streaming) or a capped copy of the body (non-streaming). Only lines that
mention usage or an error are parsed as JSON, so pass-through stays cheap. A non-streaming body
longer than the copy keeps only its last ``TAIL`` bytes, where both providers put ``usage`` (the
last top-level key), and usage is read from there. It also counts the SSE events that passed
(``events``), for an estimate when a stream is cut before its usage.

Normalised counts (see models.py): ``input_tokens`` includes cached prompt tokens.
- OpenAI: the final chunk's ``usage`` (sent when ``stream_options.include_usage`` is true):
  ``prompt_tokens`` (includes ``prompt_tokens_details.cached_tokens``), ``completion_tokens``.
- Anthropic: ``message_start.message.usage`` (``input_tokens`` excludes cache reads and cache
  writes, so they are added), then ``message_delta.usage`` (cumulative ``output_tokens``; newer
  API versions repeat the input counts there too).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ai_gateway.models import Api

_INTERESTING = re.compile(rb'"usage"\s*:\s*\{|"error"')
_USAGE_KEY = re.compile(rb'[,{]\s*"usage"\s*:\s*(?=\{)')
MAX_BODY_COPY = 4 * 1024 * 1024
TAIL = 64 * 1024


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    seen: bool = False


class UsageMeter:
    """Incrementally extracts usage (and in-stream errors) from one response."""

    def __init__(self, api: str, streaming: bool) -> None:
        self.api = api
        self.streaming = streaming
        self.usage = Usage()
        self.stream_error: str = ""
        self._partial = b""
        self._body: list[bytes] = []
        self._body_size = 0
        self._tail = b""
        self.events = 0

    def feed(self, data: bytes) -> None:
        if not self.streaming:
            self._body_size += len(data)
            if self._body_size <= MAX_BODY_COPY:
                self._body.append(data)
            else:
                self._tail = (b"".join(self._body) + self._tail + data)[-TAIL:]
                self._body = []
            return
        self.events += data.count(b"data:")
        if not _INTERESTING.search(data) and b"\n" in data and not self._partial:
            # Fast path: nothing to read in these complete-or-partial lines; keep the tail.
            self._partial = data[data.rfind(b"\n") + 1 :]
            return
        buffer = self._partial + data
        lines = buffer.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._line(line)

    @property
    def body_size(self) -> int:
        """Bytes of a non-streaming body seen so far."""
        return self._body_size

    def finish(self) -> Usage:
        """Return the usage seen; call once the response has ended (or was cut off)."""
        if self.streaming:
            if self._partial:
                self._line(self._partial)
                self._partial = b""
        elif self._tail:
            self._take(_usage_in_tail(self._tail))
        else:
            try:
                body = json.loads(b"".join(self._body))
            except ValueError:
                body = None
            if isinstance(body, dict):
                self._take(body.get("usage"))
                if body.get("type") == "error" or "error" in body:
                    self.stream_error = _error_message(body)
        return self.usage

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:") or not _INTERESTING.search(line):
            return
        try:
            event = json.loads(line[5:])
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        if event.get("type") == "error" or "error" in event:
            self.stream_error = _error_message(event)
        if self.api == Api.ANTHROPIC and event.get("type") == "message_start":
            self._take((event.get("message") or {}).get("usage"))
        else:
            self._take(event.get("usage"))

    def _take(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        u = self.usage
        u.seen = True
        if self.api == Api.OPENAI:
            u.input_tokens = _int(usage.get("prompt_tokens"), u.input_tokens)
            u.output_tokens = _int(usage.get("completion_tokens"), u.output_tokens)
            details = usage.get("prompt_tokens_details") or {}
            u.cached_tokens = _int(details.get("cached_tokens"), u.cached_tokens)
            return
        if "input_tokens" in usage:
            read = _int(usage.get("cache_read_input_tokens"), 0)
            written = _int(usage.get("cache_creation_input_tokens"), 0)
            u.input_tokens = _int(usage.get("input_tokens"), 0) + read + written
            u.cached_tokens = read
        u.output_tokens = _int(usage.get("output_tokens"), u.output_tokens)


def _usage_in_tail(tail: bytes) -> Any:
    """Return the last top-level-looking ``"usage": {...}`` object in ``tail``, or None.

    Inside JSON strings every quote is escaped, so ``"usage":`` preceded by ``,`` or ``{`` is a
    key; the last one is the response's own (both providers put it after the content).
    """
    matches = list(_USAGE_KEY.finditer(tail))
    if not matches:
        return None
    text = tail.decode("utf-8", "replace")
    start = len(tail[: matches[-1].end()].decode("utf-8", "replace"))
    try:
        value, _ = json.JSONDecoder().raw_decode(text, start)
    except ValueError:
        return None
    return value


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and value >= 0 else default


def _error_message(body: dict[str, Any]) -> str:
    error = body.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or "error")[:300]
    return str(error or "error")[:300]
