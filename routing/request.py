"""Parse a request body into what routing needs, with precise 400s: one table of served paths.

`PATHS` maps every routed path to a `PathSpec`: how its body is read (JSON or multipart form), the
parser that yields the model, the text prefix-cache hashes (what the engine caches for that API;
empty for load-only paths), the stream flag and max tokens, and the shape its errors take. The
ext_proc service and request control have no per-path branches beyond this table.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from routing.errors import ANTHROPIC, OPENAI, RoutingError
from routing.multipart import parse_form

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
MESSAGES_PATH = "/v1/messages"
RESPONSES_PATH = "/v1/responses"
EMBEDDINGS_PATH = "/v1/embeddings"
TRANSCRIPTIONS_PATH = "/v1/audio/transcriptions"
TRANSLATIONS_PATH = "/v1/audio/translations"

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
    # The text prefix-cache hashes: what the engine caches for this API (chat messages with role
    # boundaries, a completion prompt, an embedding input, a rerank query); "" on load-only paths.
    prompt: str
    stream: bool = False
    max_tokens: int | None = None
    body: dict[str, Any] | None = None  # the parsed JSON body (None for a multipart form)
    include_usage: bool = False  # a streamed answer reports its token usage (rate limits count it)


class Fields(NamedTuple):
    """What a path's parser reads from a body besides the model."""

    prompt: str
    stream: bool = False
    max_tokens: int | None = None
    include_usage: bool = False


@dataclass(frozen=True, slots=True)
class PathSpec:
    """How the gateway reads and answers one path."""

    path: str
    parse: Callable[[dict[str, Any]], Fields]  # a JSON body, or a form's text fields (multipart)
    multipart: bool = False  # the body is multipart/form-data (audio uploads), not JSON
    error_style: str = OPENAI  # ANTHROPIC: errors as {"type": "error", "error": {type, message}}
    prefill_split: bool = False  # pd may send it to a prefill pod first (generation paths engines split)
    hashed: str = ""  # README: which text prefix-cache hashes ("" = load-only routing)


def _bad(message: str, param: str | None = None) -> RoutingError:
    return RoutingError(400, message, param=param, code="invalid_request", cause="request-body-processing")


def parse_body(path: str, raw: bytes | bytearray, content_type: str | None = None) -> RoutingRequest:
    """Validate `raw` for `path` and extract the routing inputs. Raises RoutingError (400; 404 for a
    path not in `PATHS`)."""
    spec = PATHS.get(path)
    if spec is None:
        raise RoutingError(404, f"unsupported path {path!r}", code="unknown_url", cause="request-path")
    if not raw:
        raise _bad("request body is empty; expected a multipart form" if spec.multipart
                   else "request body is empty; expected a JSON object")
    if spec.multipart:
        form = parse_form(raw, content_type, _FORM_FIELDS)
        if "file" not in form.files:
            raise _bad("missing required form field 'file' (the audio file)", "file")
        body = form.fields
        fields = spec.parse(body)
        return RoutingRequest(path=path, model=_model(body), prompt=fields.prompt, stream=fields.stream,
                              max_tokens=fields.max_tokens, include_usage=fields.include_usage)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        body = _strict_fallback(raw, exc)
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    model = _model(body)
    fields = spec.parse(body)
    return RoutingRequest(path=path, model=model, prompt=fields.prompt, stream=fields.stream,
                          max_tokens=fields.max_tokens, body=body, include_usage=fields.include_usage)


def error_style(path: str) -> str:
    """The error shape of `path` (OPENAI for a path the gateway does not serve)."""
    spec = PATHS.get(path)
    return spec.error_style if spec is not None else OPENAI


# -- fields every parser shares ------------------------------------------------------------------

def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise _bad("missing required field 'model'", "model")
    if not isinstance(model, str) or not model:
        raise _bad("field 'model' must be a non-empty string", "model")
    return model


def _stream(body: dict[str, Any]) -> bool:
    stream = body.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise _bad("field 'stream' must be a boolean", "stream")
    return stream


def _count(body: dict[str, Any], *keys: str) -> int | None:
    """The first of `keys` present, as a non-negative integer (400 otherwise), or None."""
    for key in keys:
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _bad(f"field '{key}' must be a non-negative integer", key)
        return value
    return None


def _stream_options_usage(body: dict[str, Any]) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


# -- one parser per kind of API --------------------------------------------------------------------

def _chat(body: dict[str, Any]) -> Fields:
    return Fields(render_messages(body.get("messages")), _stream(body),
                  _count(body, "max_tokens", "max_completion_tokens"), _stream_options_usage(body))


def _completions(body: dict[str, Any]) -> Fields:
    return Fields(render_prompt(body.get("prompt")), _stream(body),
                  _count(body, "max_tokens", "max_completion_tokens"), _stream_options_usage(body))


def _messages(body: dict[str, Any]) -> Fields:
    """Anthropic Messages: `system` (a string or text blocks) and `messages` of content blocks,
    rendered as the equivalent chat (the engine applies the same chat template): the same
    conversation hashes the same through /v1/messages and /v1/chat/completions."""
    max_tokens = _count(body, "max_tokens")
    if max_tokens is None:
        raise _bad("missing required field 'max_tokens'", "max_tokens")
    # Anthropic streams always carry usage (message_start and message_delta).
    return Fields(render_anthropic(body.get("system"), body.get("messages")), _stream(body), max_tokens, True)


def _responses(body: dict[str, Any]) -> Fields:
    """OpenAI Responses: `instructions` (a system turn) and `input`, a string (one user turn) or items."""
    return Fields(render_responses(body.get("instructions"), body.get("input")), _stream(body),
                  _count(body, "max_output_tokens"), True)  # response.completed always carries usage


def _pooled_input(body: dict[str, Any]) -> Fields:
    """Embeddings, classification, pooling: `input` as a string, strings or token ids (each one a
    sequence the engine prefills); vLLM also takes chat `messages` instead."""
    if body.get("input") is None and body.get("messages") is not None:
        return Fields(render_messages(body.get("messages")))
    return Fields(render_prompt(body.get("input"), "input"))


def _rerank(body: dict[str, Any]) -> Fields:
    """Rerank: every (query, document) pair starts with the query, the part pairs share."""
    query = body.get("query")
    if query is None:
        raise _bad("missing required field 'query'", "query")
    _required_inputs(body, "documents")
    _count(body, "top_n")
    return Fields(_score_text(query, "query"))


# vLLM's score API names its two sides in several ways; the first side starts every pair.
_SCORE_SIDES = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2"))


def _score(body: dict[str, Any]) -> Fields:
    for first, second in _SCORE_SIDES:
        if first in body:
            value = body.get(first)
            if value is None:
                raise _bad(f"field '{first}' must not be null", first)
            _required_inputs(body, second)
            return Fields(_score_text(value, first))
    raise _bad("missing required fields 'text_1' and 'text_2' (or 'queries' and 'documents')", "text_1")


def _images(body: dict[str, Any]) -> Fields:
    """Image generation: diffusion keeps no prefix cache; routed by load only."""
    prompt = body.get("prompt")
    if prompt is None:
        raise _bad("missing required field 'prompt'", "prompt")
    if not isinstance(prompt, str):
        raise _bad("field 'prompt' must be a string", "prompt")
    _count(body, "n")
    return Fields("")


def _audio(form: dict[str, Any]) -> Fields:
    """Transcription / translation form: the audio is new to every request; routed by load only."""
    stream = _form_bool(form, "stream")
    return Fields("", stream, None, stream and _form_bool(form, "stream_include_usage"))


# The text fields of an audio form routing reads (the file and the rest stay unread bytes).
_FORM_FIELDS = frozenset({"model", "stream", "stream_include_usage"})
# The boolean spellings a form field may take (as the pods' pydantic reads them).
_FORM_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FORM_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


def _form_bool(form: dict[str, Any], name: str) -> bool:
    value = form.get(name)
    if value is None:
        return False
    text = value.strip().lower()
    if text in _FORM_TRUE:
        return True
    if text in _FORM_FALSE:
        return False
    raise _bad(f"form field '{name}' must be true or false", name)


def _required_inputs(body: dict[str, Any], key: str) -> None:
    value = body.get(key)
    if value is None:
        raise _bad(f"missing required field '{key}'", key)
    if not isinstance(value, list | str | dict):
        raise _bad(f"field '{key}' must be a string, an array or a multimodal object", key)


def _score_text(value: Any, param: str) -> str:
    """Text of a score/rerank side: a string, strings (one pair each, joined), or a multimodal part."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    if isinstance(value, dict | list):
        return canonical_json(value)
    raise _bad(f"field '{param}' must be a string, an array of strings or a multimodal object", param)


PATHS: dict[str, PathSpec] = {spec.path: spec for spec in (
    PathSpec(CHAT_PATH, _chat, prefill_split=True,
             hashed="every message's role and content (text parts; other parts as canonical JSON)"),
    PathSpec(COMPLETIONS_PATH, _completions, prefill_split=True,
             hashed="`prompt` (strings joined by newlines; token ids as numbers)"),
    PathSpec(MESSAGES_PATH, _messages, error_style=ANTHROPIC,
             hashed="`system` as a system turn, then `messages` as chat (the same text as the "
                    "equivalent chat request)"),
    PathSpec(RESPONSES_PATH, _responses,
             hashed="`instructions` as a system turn, then `input` (a string: one user turn; "
                    "items: one turn each)"),
    PathSpec(EMBEDDINGS_PATH, _pooled_input, hashed="`input` (as completions' `prompt`), or `messages`"),
    PathSpec("/pooling", _pooled_input, hashed="`input` (as completions' `prompt`), or `messages`"),
    PathSpec("/v1/classify", _pooled_input, hashed="`input` (as completions' `prompt`)"),
    PathSpec("/classify", _pooled_input, hashed="`input` (as completions' `prompt`)"),
    PathSpec("/v1/rerank", _rerank, hashed="`query` (every pair starts with it)"),
    PathSpec("/rerank", _rerank, hashed="`query` (every pair starts with it)"),
    PathSpec("/v2/rerank", _rerank, hashed="`query` (every pair starts with it)"),
    PathSpec("/v1/score", _score, hashed="the first side (`text_1` / `queries` / `data_1`)"),
    PathSpec("/score", _score, hashed="the first side (`text_1` / `queries` / `data_1`)"),
    PathSpec("/v1/images/generations", _images),
    PathSpec(TRANSCRIPTIONS_PATH, _audio, multipart=True),
    PathSpec(TRANSLATIONS_PATH, _audio, multipart=True),
)}
ROUTED_PATHS = tuple(PATHS)


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
        _turn(out, role, msg.get("content"), f"messages[{i}]", "messages")
    return "".join(out)


def _turn(out: list[str], role: str, content: Any, where: str, param: str,
          text_types: frozenset[str] = frozenset({"text"})) -> None:
    """Append one turn: its role, then its content (a string, or parts: text parts' text, any other
    part as canonical JSON, a stable stand-in for an image or a tool call)."""
    out.append(_ROLE_OPEN)
    out.append(role)
    out.append(_ROLE_CLOSE)
    if isinstance(content, str):
        out.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") in text_types and isinstance(part.get("text"), str):
                out.append(part["text"])
            elif isinstance(part, str):
                out.append(part)
            else:
                out.append(canonical_json(part))
    elif content is not None:
        if not isinstance(content, dict | int | float | bool):
            raise _bad(f"{where}.content has an unsupported type", param)
        out.append(canonical_json(content))


def _block_text(blocks: Any, param: str) -> str:
    """The text of a string or of text blocks (`system`); other blocks as canonical JSON."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise _bad(f"field '{param}' must be a string or an array of content blocks", param)
    out = []
    for block in blocks:
        if not isinstance(block, dict):
            raise _bad(f"field '{param}' must be a string or an array of content blocks", param)
        text = block.get("text")
        out.append(text if block.get("type") == "text" and isinstance(text, str) else canonical_json(block))
    return "".join(out)


def render_anthropic(system: Any, messages: Any) -> str:
    """Canonical text of an Anthropic Messages request, as the equivalent chat renders: `system`
    (with any system-role messages, as vLLM merges them) as one system turn, then the other
    messages with their content blocks (text blocks' text, other blocks as canonical JSON)."""
    if messages is None:
        raise _bad("missing required field 'messages'", "messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("field 'messages' must be a non-empty array", "messages")
    system_text = [] if system is None else [_block_text(system, "system")]
    turns: list[tuple[int, str, Any]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _bad(f"messages[{i}] must be an object", "messages")
        role = msg.get("role")
        if not isinstance(role, str):
            raise _bad(f"messages[{i}].role must be a string", "messages")
        content = msg.get("content")
        if not isinstance(content, str | list):
            raise _bad(f"messages[{i}].content must be a string or an array of content blocks", "messages")
        if role == "system":
            system_text.append(_block_text(content, "messages"))
        else:
            turns.append((i, role, content))
    out: list[str] = []
    if any(system_text):
        _turn(out, "system", "".join(system_text), "system", "system")
    for i, role, content in turns:
        _turn(out, role, content, f"messages[{i}]", "messages")
    return "".join(out)


_RESPONSES_TEXT = frozenset({"input_text", "output_text", "text"})


def render_responses(instructions: Any, items: Any) -> str:
    """Canonical text of a Responses request, as the equivalent chat renders: `instructions` as a
    system turn, then `input`: a string is one user turn; each item is a turn (a message item's role
    and content parts, any other item, a tool call or its output, as canonical JSON under its type)."""
    out: list[str] = []
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _bad("field 'instructions' must be a string", "instructions")
        if instructions:
            _turn(out, "system", instructions, "instructions", "instructions")
    if items is None:
        raise _bad("missing required field 'input'", "input")
    if isinstance(items, str):
        _turn(out, "user", items, "input", "input")
        return "".join(out)
    if not isinstance(items, list) or not items:
        raise _bad("field 'input' must be a string or a non-empty array of items", "input")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise _bad(f"input[{i}] must be an object", "input")
        role = item.get("role")
        if isinstance(role, str):
            _turn(out, role, item.get("content"), f"input[{i}]", "input", _RESPONSES_TEXT)
        else:
            kind = item.get("type")
            if not isinstance(kind, str):
                raise _bad(f"input[{i}] has neither a role nor a type", "input")
            _turn(out, kind, item, f"input[{i}]", "input")
    return "".join(out)


def render_prompt(prompt: Any, param: str = "prompt") -> str:
    """Text of a completions prompt (or an embedding input): a string, an array of strings, or
    token-id arrays."""
    if prompt is None:
        raise _bad(f"missing required field '{param}'", param)
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
    raise _bad(f"field '{param}' must be a string, an array of strings, or token-id arrays", param)
