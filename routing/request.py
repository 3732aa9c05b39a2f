"""Parse an OpenAI-style request body into what routing needs, with precise 400s."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from routing.errors import RoutingError

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
ROUTED_PATHS = (CHAT_PATH, COMPLETIONS_PATH)

# Separators of the canonical chat rendering. Control characters keep a message boundary from
# ever colliding with text, and each turn only appends, so turn N+1 extends turn N's prefix.
_ROLE_OPEN = "\x1e"
_ROLE_CLOSE = "\x1f"


@dataclass(slots=True)
class RoutingRequest:
    """What a strategy may look at. Built once per request; strategies read it, never write it, and
    never re-parse the body."""

    path: str
    model: str
    prompt: str  # canonical text: chat messages with role boundaries, or the completion prompt
    stream: bool = False
    max_tokens: int | None = None
    body: dict[str, Any] | None = None


def _bad(message: str, param: str | None = None) -> RoutingError:
    return RoutingError(400, message, param=param, code="invalid_request", cause="request-body-processing")


def parse_body(path: str, raw: bytes | bytearray) -> RoutingRequest:
    """Validate `raw` for `path` and extract the routing inputs. Raises RoutingError (400)."""
    if not raw:
        raise _bad("request body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        body = _strict_fallback(raw, exc)
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    model = body.get("model")
    if model is None:
        raise _bad("missing required field 'model'", "model")
    if not isinstance(model, str) or not model:
        raise _bad("field 'model' must be a non-empty string", "model")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("field 'stream' must be a boolean", "stream")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_completion_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                   or max_tokens < 0):
        raise _bad("field 'max_tokens' must be a non-negative integer", "max_tokens")
    prompt = render_messages(body.get("messages")) if path == CHAT_PATH else render_prompt(body.get("prompt"))
    return RoutingRequest(path=path, model=model, prompt=prompt, stream=stream, max_tokens=max_tokens,
                          body=body)


def _strict_fallback(raw: bytes | bytearray, exc: orjson.JSONDecodeError) -> Any:
    """One rule: what the router cannot parse strictly is a 400, never routed on a laxer parser's
    reading that the pods might then refuse. The one thing orjson rejects that strict JSON allows
    is an integer beyond 64 bits (e.g. in logit_bias); only for that does the standard parser get a
    second look, held to the same rules: UTF-8 only, no NaN/Infinity, no lone surrogates."""
    if "64-bit" not in str(exc):
        raise _bad(f"request body is not valid JSON: {exc}")
    try:
        body = json.loads(bytes(raw).decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:
        raise _bad(f"request body is not valid JSON: {err}") from None
    _check_strings(body)
    return body


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _check_strings(value: Any) -> None:
    """400 if any string (key or value) holds a lone surrogate, which no UTF-8 encoder accepts."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            items: Any = (item,)
        elif isinstance(item, dict):
            stack.extend(item.values())
            items = item.keys()
        elif isinstance(item, list):
            stack.extend(item)
            continue
        else:
            continue
        for text in items:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise _bad("request body is not valid JSON: a string holds a lone UTF-16 surrogate") from None


def canonical_json(value: Any) -> str:
    """Sorted-key JSON text of a parsed value (a stable stand-in for non-text prompt parts). 400 when
    it is nested too deeply to write back."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except orjson.JSONEncodeError:
        pass  # nested deeper than orjson writes (255), or an integer beyond 64 bits
    try:
        return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    except (ValueError, RecursionError):
        raise _bad("request body is nested too deeply") from None


def dump_body(body: dict[str, Any]) -> bytes:
    """A parsed body as JSON bytes again (pd sends the prompt on), whatever `parse_body` accepted."""
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError:
        pass
    try:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    except (ValueError, RecursionError):
        raise _bad("request body is nested too deeply") from None


def render_messages(messages: Any) -> str:
    """Canonical text of a chat: role and content of every message, content-part arrays included."""
    if messages is None:
        raise _bad("missing required field 'messages'", "messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("field 'messages' must be a non-empty array", "messages")
    out: list[str] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _bad(f"messages[{i}] must be an object", "messages")
        role = msg.get("role")
        if not isinstance(role, str):
            raise _bad(f"messages[{i}].role must be a string", "messages")
        out.append(_ROLE_OPEN)
        out.append(role)
        out.append(_ROLE_CLOSE)
        content = msg.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                    out.append(part["text"])
                elif isinstance(part, str):
                    out.append(part)
                else:
                    # Images and audio still identify the prompt; their JSON is a stable stand-in.
                    out.append(canonical_json(part))
        elif content is not None:
            if not isinstance(content, dict | int | float | bool):
                raise _bad(f"messages[{i}].content has an unsupported type", "messages")
            out.append(canonical_json(content))
    return "".join(out)


def render_prompt(prompt: Any) -> str:
    """Text of a completions prompt: a string, an array of strings, or token-id arrays."""
    if prompt is None:
        raise _bad("missing required field 'prompt'", "prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return "\n".join(prompt)
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return " ".join(map(str, prompt))
        if all(isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
               for p in prompt):
            return "\n".join(" ".join(map(str, p)) for p in prompt)
    raise _bad("field 'prompt' must be a string, an array of strings, or token-id arrays", "prompt")
