"""One streamed OpenAI-style request with aiohttp: timing of every token, usage, serving pod, errors."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

POD_HEADERS: tuple[str, ...] = ("target-pod", "x-sim-pod")
"""Response headers naming the serving pod, in order of preference: our router's echo, then the
simulated pod's own stamp (which peer routers pass through, so their spread is visible too)."""
MATCH_HEADER = "x-prefix-cache-match"
"""prefix-cache's echo of its match (`routing.strategies.prefix_cache.MATCH_HEADER`; named again here
because the harness is a client of the router and does not import the routing core)."""
UNKNOWN_POD = "unknown"

API_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}

_ERROR_TEXT_LIMIT = 300
"""Characters of an error message kept per request (report.json stays small)."""


@dataclass(slots=True)
class RequestResult:
    """What one request measured. Times are in seconds; ``start`` is a ``time.perf_counter()`` value."""

    start: float
    status: int = 0
    """HTTP status; 0 when no response arrived (connection error, timeout)."""
    ok: bool = False
    error: str | None = None
    pod: str = UNKNOWN_POD
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    """Gaps between consecutive content chunks (one token per chunk on vLLM and the simulator)."""
    output_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    """``usage.prompt_tokens_details.cached_tokens``; None when the endpoint does not report it."""
    claimed_tokens: int | None = None
    """The router's ``x-prefix-cache-match`` ``tokens=``: what it believed the chosen pod had cached,
    in its own token estimate (the character tokenizer's is bytes / 4)."""
    claimed_share: float | None = None
    """The header's share: the part of the prompt's hashed blocks it believed the pod had cached."""
    text: str = ""
    """The generated text of choice 0 (multi-turn feeds it back as the assistant's turn)."""


def request_body(body: dict[str, Any], model: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The planned body plus model and streaming settings (usage is asked for in the last chunk)."""
    return {"model": model, **body, "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}


def _pod_of(headers: Any) -> str:
    for name in POD_HEADERS:
        value = headers.get(name)
        if value:
            return value
    return UNKNOWN_POD


def _claim(headers: Any) -> tuple[float | None, int | None]:
    """(share, tokens) of ``x-prefix-cache-match: <share>;tokens=N;src=...``; None for a part that is
    absent or malformed."""
    value = headers.get(MATCH_HEADER)
    if not value or len(value) > 256:
        return None, None
    parts = value.split(";")
    share: float | None = None
    head = parts[0].strip()
    if 0 < len(head) <= 8 and head.replace(".", "", 1).isdigit():
        share = float(head)
        if share > 1.0:
            share = None
    tokens: int | None = None
    for part in parts[1:]:
        name, _, number = part.strip().partition("=")
        if name == "tokens" and number.isdigit() and len(number) <= 12:
            tokens = int(number)
    return share, tokens


def _error_message(raw: bytes) -> str:
    """The ``error.message`` of an OpenAI-shaped error body, else the start of the body."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode(errors="replace").strip()[:_ERROR_TEXT_LIMIT]
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"][:_ERROR_TEXT_LIMIT]
        if isinstance(err, str):
            return err[:_ERROR_TEXT_LIMIT]
    return raw.decode(errors="replace")[:_ERROR_TEXT_LIMIT]


def _take_usage(result: RequestResult, usage: Any) -> None:
    if not isinstance(usage, dict):
        return  # vLLM sends "usage": null in every chunk but the last
    if isinstance(usage.get("prompt_tokens"), int):
        result.prompt_tokens = usage["prompt_tokens"]
    if isinstance(usage.get("completion_tokens"), int):
        result.output_tokens = usage["completion_tokens"]
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        result.cached_tokens = details["cached_tokens"]


def _choice_text(choice: dict[str, Any]) -> str:
    delta = choice.get("delta")
    if isinstance(delta, dict):
        content = delta.get("content")
        return content if isinstance(content, str) else ""
    message = choice.get("message")
    if isinstance(message, dict):
        content = message.get("content")
        return content if isinstance(content, str) else ""
    text = choice.get("text")
    return text if isinstance(text, str) else ""


async def stream_request(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]
) -> RequestResult:
    """POST ``body`` (already carrying ``stream: true``) to ``url`` and read the SSE stream to its end.

    Never raises for a failed request: the failure is in ``ok``/``status``/``error``.
    Cancellation propagates (the runner records it).
    """
    result = RequestResult(start=time.perf_counter())
    chunks = 0
    parts: list[str] = []
    last = 0.0
    try:
        async with session.post(url, data=orjson.dumps(body), headers=headers) as resp:
            result.status = resp.status
            result.pod = _pod_of(resp.headers)
            result.claimed_share, result.claimed_tokens = _claim(resp.headers)
            if resp.status != 200:
                result.error = _error_message(await resp.content.read(4096))
                result.e2e = time.perf_counter() - result.start
                return result
            if resp.content_type == "application/json":
                # An endpoint that ignored "stream": one body, first token = whole answer.
                data = orjson.loads(await resp.read())
                now = time.perf_counter()
                choices = data.get("choices") or [{}]
                result.text = _choice_text(choices[0])
                result.ttft = now - result.start
                _take_usage(result, data.get("usage"))
                result.e2e, result.ok = now - result.start, True
                return result
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, "event:" lines
                data_bytes = line[5:].strip()
                if data_bytes == b"[DONE]":
                    break
                chunk = orjson.loads(data_bytes)
                if "error" in chunk:  # vLLM reports failures mid-stream this way
                    result.error = _error_message(data_bytes)
                    break
                for choice in chunk.get("choices") or ():
                    if choice.get("index", 0) != 0:
                        continue
                    piece = _choice_text(choice)
                    if piece:
                        now = time.perf_counter()
                        if chunks == 0:
                            result.ttft = now - result.start
                        else:
                            result.itl.append(now - last)
                        last = now
                        chunks += 1
                        parts.append(piece)
                _take_usage(result, chunk.get("usage"))
        result.e2e = time.perf_counter() - result.start
        result.text = "".join(parts)
        if not result.output_tokens:
            result.output_tokens = chunks  # no usage chunk: one token per content chunk
        result.ok = result.error is None and chunks > 0
        if result.error is None and chunks == 0:
            result.error = "stream ended without any content"
    except (TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError, ValueError) as exc:
        result.e2e = time.perf_counter() - result.start
        result.error = (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)[:_ERROR_TEXT_LIMIT]
        result.ok = False
    return result


async def probe(
    session: aiohttp.ClientSession, url: str, model: str, path: str, headers: dict[str, str]
) -> str | None:
    """Send one tiny non-streamed request; None if it succeeded, else why not (e.g. an unknown strategy)."""
    if path == "chat":
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    else:
        body = {"model": model, "prompt": "ping", "max_tokens": 1}
    try:
        async with session.post(url, data=orjson.dumps(body), headers=headers) as resp:
            raw = await resp.read()
            if resp.status == 200:
                return None
            return f"HTTP {resp.status}: {_error_message(raw)}"
    except (TimeoutError, aiohttp.ClientError) as exc:
        return f"{type(exc).__name__}: {exc}"


def reset_target(url: str) -> str:
    """Where a reset URL is POSTed: a base URL (no path, or ``/``) is a simulated pod, reset at
    ``/sim/reset``; a URL with a path is taken as given (a router's ``/flush_cache``)."""
    if urlsplit(url).path in ("", "/"):
        return url.rstrip("/") + "/sim/reset"
    return url


async def reset_pods(session: aiohttp.ClientSession, urls: list[str]) -> list[str]:
    """``POST`` every reset URL (`reset_target`): pods flush their KV cache and counters, routers
    their prefix index; the failures, as text."""

    async def one(url: str) -> str | None:
        try:
            async with session.post(reset_target(url)) as resp:
                await resp.read()
                return None if resp.status < 300 else f"{url}: HTTP {resp.status}"
        except (TimeoutError, aiohttp.ClientError) as exc:
            return f"{url}: {type(exc).__name__}: {exc}"

    results = await asyncio.gather(*(one(u) for u in urls))
    return [r for r in results if r]
