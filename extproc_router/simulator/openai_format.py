"""OpenAI/vLLM wire format for the simulator: request parsing, errors, response bodies, SSE chunks.

Pure functions and small classes, no I/O, so the HTTP layer stays thin and the shapes can be
unit-tested directly. Bodies mirror what vLLM's OpenAI server returns.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Literal

import orjson

Kind = Literal["chat", "completion"]

MAX_CHOICES = 128
"""Upper bound on choices per request (prompts x n); protects the sim from absurd fan-out."""

# Deterministic filler; every word is one "token". Leading spaces make the joined text readable.
_LOREM = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore "
    "et dolore magna aliqua ut enim ad minim veniam quis nostrud exercitation ullamco laboris nisi ut "
    "aliquip ex ea commodo consequat"
)
FILLER_WORDS: tuple[str, ...] = tuple(" " + w for w in _LOREM.split(" "))
# Pre-encoded JSON strings (quotes included) so a streamed token costs no JSON serialisation.
_FILLER_JSON: tuple[bytes, ...] = tuple(orjson.dumps(w) for w in FILLER_WORDS)

SSE_DONE = b"data: [DONE]\n\n"


class RequestError(Exception):
    """A request the simulator refuses, rendered as an OpenAI-shaped error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> bytes:
        """The JSON error body ``{"error": {"message", "type", "param", "code"}}``."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> bytes:
    """Serialise an OpenAI-shaped error object."""
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


@dataclass(slots=True)
class CompletionRequest:
    """What the simulator needs from a chat or text completion request."""

    kind: Kind
    model: str | None
    prompt_tokens: int
    num_choices: int
    max_tokens: int | None
    stream: bool
    include_usage: bool


def estimate_tokens(num_bytes: int) -> int:
    """Cheap deterministic token estimate: one token per 4 UTF-8 bytes, at least 1."""
    return max(1, num_bytes // 4)


def parse_request(kind: Kind, body: Any) -> CompletionRequest:
    """Validate a decoded JSON body of ``/v1/chat/completions`` or ``/v1/completions``.

    Raises RequestError (400) for anything vLLM would reject as malformed.
    """
    if not isinstance(body, dict):
        raise RequestError(400, "Request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(400, "'model' must be a string", param="model")

    n = _optional_int(body, "n", minimum=1)
    if kind == "chat":
        prompt_tokens = estimate_tokens(_chat_prompt_bytes(body.get("messages")))
        num_prompts = 1
        max_tokens = _optional_int(body, "max_completion_tokens", minimum=1)
        if max_tokens is None:
            max_tokens = _optional_int(body, "max_tokens", minimum=1)
    else:
        prompt_sizes = _completion_prompt_tokens(body.get("prompt"))
        prompt_tokens = sum(prompt_sizes)
        num_prompts = len(prompt_sizes)
        max_tokens = _optional_int(body, "max_tokens", minimum=1)
    num_choices = num_prompts * (n or 1)
    if num_choices > MAX_CHOICES:
        raise RequestError(400, f"At most {MAX_CHOICES} choices (prompts x n) per request", param="n")

    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be a boolean", param="stream")
    include_usage = False
    options = body.get("stream_options")
    if stream and isinstance(options, dict):
        include_usage = options.get("include_usage") is True
    return CompletionRequest(
        kind=kind,
        model=model,
        prompt_tokens=prompt_tokens,
        num_choices=num_choices,
        max_tokens=max_tokens,
        stream=bool(stream),
        include_usage=include_usage,
    )


def _optional_int(body: dict[str, Any], key: str, *, minimum: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    # bool is an int subclass; JSON true is not a token count.
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise RequestError(400, f"'{key}' must be an integer >= {minimum}", param=key)
    return value


def _chat_prompt_bytes(messages: Any) -> int:
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty array", param="messages")
    total = 0
    for message in messages:
        if not isinstance(message, dict):
            raise RequestError(400, "Each message must be an object", param="messages")
        content = message.get("content")
        if isinstance(content, str):
            total += len(content.encode())
        elif isinstance(content, list):
            for part in content:
                # Non-text parts (images, audio) carry no text for the estimate.
                if isinstance(part, dict) and part.get("type") == "text":
                    text = part.get("text")
                    if isinstance(text, str):
                        total += len(text.encode())
        elif content is not None:
            raise RequestError(400, "Message 'content' must be a string or an array", param="messages")
    return total


def _completion_prompt_tokens(prompt: Any) -> list[int]:
    """Token estimate per prompt; a list of prompts is a batch and yields one choice each."""
    if isinstance(prompt, str):
        return [estimate_tokens(len(prompt.encode()))]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [estimate_tokens(len(p.encode())) for p in prompt]
        if all(_is_token_id(t) for t in prompt):
            return [len(prompt)]  # one prompt given as token ids
        if all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in prompt):
            return [len(p) for p in prompt]  # a batch of token-id prompts
    raise RequestError(
        400,
        "'prompt' must be a string, an array of strings, or (arrays of) token ids",
        param="prompt",
    )


def _is_token_id(value: Any) -> bool:
    # bool is an int subclass; ids beyond 32 bits exist in no vocabulary (and block hashing packs uint32).
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32


def generated_text(num_tokens: int) -> str:
    """The deterministic text of ``num_tokens`` generated tokens."""
    words = FILLER_WORDS
    return "".join(words[i % len(words)] for i in range(num_tokens))


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """The ``usage`` object of a response."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class ResponseWriter:
    """Builds the bodies of one response: the full JSON body, or its SSE chunks via `stream`."""

    def __init__(self, kind: Kind, request_id: str, created: int, model: str, num_choices: int) -> None:
        self.kind = kind
        self.request_id = request_id
        self.created = created
        self.model = model
        self.num_choices = num_choices

    def stream(self) -> StreamChunks:
        """The SSE chunk builder of this response (built on demand: plain answers skip it)."""
        return StreamChunks(self)

    def body(
        self,
        completion_tokens: int,
        finish_reason: str,
        usage_obj: dict[str, Any],
        extra: dict[str, Any] | None = None,
    ) -> bytes:
        """The non-streaming JSON body; ``extra`` adds top-level fields (a prefill's ``kv_transfer_params``)."""
        text = generated_text(completion_tokens)
        choices: list[dict[str, Any]] = []
        for i in range(self.num_choices):
            if self.kind == "chat":
                choice: dict[str, Any] = {
                    "index": i,
                    "message": {"role": "assistant", "content": text, "tool_calls": []},
                }
            else:
                choice = {"index": i, "text": text}
            choice.update(logprobs=None, finish_reason=finish_reason, stop_reason=None)
            choices.append(choice)
        body: dict[str, Any] = {
            "id": self.request_id,
            "object": "chat.completion" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage_obj,
        }
        if extra:
            body.update(extra)
        return orjson.dumps(body)


class StreamChunks:
    """SSE chunks of one streamed response.

    Chunks are assembled from byte templates prepared once per response, so emitting a token is
    two concatenations rather than a JSON serialisation.
    """

    def __init__(self, response: ResponseWriter) -> None:
        self.kind = response.kind
        chat = response.kind == "chat"
        chunk_object = b"chat.completion.chunk" if chat else b"text_completion"
        self._head = (
            b'data: {"id":'
            + orjson.dumps(response.request_id)
            + b',"object":"'
            + chunk_object
            + b'","created":'
            + str(response.created).encode()
            + b',"model":'
            + orjson.dumps(response.model)
            + b',"choices":'
        )
        token_field = b'"delta":{"content":' if chat else b'"text":'
        self._token_prefix = [
            self._head + b'[{"index":' + str(i).encode() + b"," + token_field for i in range(response.num_choices)
        ]
        delta_close = b"}" if chat else b""
        self._token_suffix = delta_close + b',"logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n'

    def role_chunk(self, choice: int) -> bytes:
        """The first chat chunk of a choice: ``delta`` with the assistant role (chat only)."""
        return (
            self._head
            + b'[{"index":'
            + str(choice).encode()
            + b',"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'
        )

    def token_chunk(self, choice: int, token_index: int) -> bytes:
        """The chunk carrying token number ``token_index`` (0-based) of ``choice``."""
        return self._token_prefix[choice] + _FILLER_JSON[token_index % len(_FILLER_JSON)] + self._token_suffix

    def final_chunk(self, choice: int, finish_reason: str) -> bytes:
        """The chunk closing ``choice`` with its ``finish_reason``."""
        field = b'"delta":{}' if self.kind == "chat" else b'"text":""'
        return (
            self._head
            + b'[{"index":'
            + str(choice).encode()
            + b","
            + field
            + b',"logprobs":null,"finish_reason":'
            + orjson.dumps(finish_reason)
            + b',"stop_reason":null}]}\n\n'
        )

    def usage_chunk(self, usage_obj: dict[str, Any]) -> bytes:
        """The ``stream_options.include_usage`` chunk: empty ``choices`` plus ``usage``."""
        return self._head + b'[],"usage":' + orjson.dumps(usage_obj) + b"}\n\n"


# ----------------------------------------------------------------------------- the rest of the surface
#
# Every other API vLLM serves runs on the same engine: an `Api` turns its request into the engine's
# view (a chat or a completion body; pooling APIs prefill their input and stop after one step) and
# an `ApiWriter` turns the engine's result into that API's own response: a body, or SSE events.


class ApiWriter:
    """The response of one request of an `Api`: a whole body, or (streamed) its events."""

    content_type = "application/json"

    def __init__(self, api: Api, request_id: str, created: int, model: str) -> None:
        self.api = api
        self.request_id = request_id
        self.created = created
        self.model = model

    def body(
        self, completion_tokens: int, finish_reason: str, usage_obj: dict[str, Any], extra: dict[str, Any] | None = None
    ) -> bytes:
        """The whole answer; ``usage_obj`` is the engine's OpenAI-shaped usage."""
        raise NotImplementedError

    def start_events(self, prompt_tokens: int) -> list[bytes]:
        """Events sent with the first token."""
        return []

    def token_event(self, token_index: int) -> bytes:
        """The event carrying token number ``token_index``."""
        raise NotImplementedError

    def end_events(self, finish_reason: str, usage_obj: dict[str, Any]) -> list[bytes]:
        """Events closing the stream."""
        raise NotImplementedError


class Api:
    """One API over the engine, one instance per request (it keeps the request it parsed)."""

    name = ""
    kind: Kind = "completion"
    id_prefix = ""
    writer_class: type[ApiWriter] = ApiWriter

    def __init__(self) -> None:
        self.body: dict[str, Any] = {}

    def engine_body(self, raw: bytes, content_type: str) -> dict[str, Any]:
        """Validate the request; return the engine's view of it (a chat or completion body). Raises RequestError."""
        body = json_object(raw)
        self.body = body
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise RequestError(400, "'model' must be a string", param="model")
        out = self.to_engine(body)
        out["model"] = model
        for key in ("kv_transfer_params", "bootstrap_host", "bootstrap_port", "bootstrap_room"):
            if key in body:
                out[key] = body[key]
        return out

    def to_engine(self, body: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def error_body(self, err: RequestError) -> bytes:
        return err.body()

    def writer(self, request_id: str, created: int, model: str) -> ApiWriter:
        return self.writer_class(self, request_id, created, model)


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object; RequestError (400) otherwise."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestError(400, f"Request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "Request body must be a JSON object")
    return body


def _sse_event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _text_parts(content: Any, types: tuple[str, ...] = ("text",)) -> Any:
    """Content blocks as chat content: text blocks kept as text parts, a string as it is."""
    if isinstance(content, list):
        return [
            {"type": "text", "text": p["text"]}
            if isinstance(p, dict) and p.get("type") in types and isinstance(p.get("text"), str)
            else p
            for p in content
        ]
    return content


# -- Anthropic Messages (/v1/messages): vLLM turns it into a chat request ---------------------------

_ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                     404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                     503: "overloaded_error"}
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


class MessagesWriter(ApiWriter):
    def _usage(self, usage_obj: dict[str, Any]) -> dict[str, int]:
        return {"input_tokens": usage_obj["prompt_tokens"], "output_tokens": usage_obj["completion_tokens"]}

    def body(
        self, completion_tokens: int, finish_reason: str, usage_obj: dict[str, Any], extra: dict[str, Any] | None = None
    ) -> bytes:
        out: dict[str, Any] = {
            "id": self.request_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [{"type": "text", "text": generated_text(completion_tokens)}],
            "stop_reason": _STOP_REASONS.get(finish_reason, "end_turn"),
            "stop_sequence": None,
            "usage": self._usage(usage_obj),
        }
        if extra:
            out.update(extra)
        return orjson.dumps(out)

    def start_events(self, prompt_tokens: int) -> list[bytes]:
        message = {"id": self.request_id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                   "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}
        return [
            _sse_event("message_start", {"type": "message_start", "message": message}),
            _sse_event("content_block_start",
                       {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            _sse_event("ping", {"type": "ping"}),
        ]

    def token_event(self, token_index: int) -> bytes:
        word = FILLER_WORDS[token_index % len(FILLER_WORDS)]
        return _sse_event("content_block_delta",
                          {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}})

    def end_events(self, finish_reason: str, usage_obj: dict[str, Any]) -> list[bytes]:
        return [
            _sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _sse_event("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": _STOP_REASONS.get(finish_reason, "end_turn"),
                                                   "stop_sequence": None},
                                         "usage": self._usage(usage_obj)}),
            _sse_event("message_stop", {"type": "message_stop"}),
        ]


class MessagesApi(Api):
    name = "messages"
    kind: Kind = "chat"
    id_prefix = "msg_"
    writer_class = MessagesWriter

    def to_engine(self, body: dict[str, Any]) -> dict[str, Any]:
        max_tokens = body.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise RequestError(400, "max_tokens: Field required (an integer >= 1)", param="max_tokens")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "messages: a non-empty array is required", param="messages")
        system = body.get("system")
        chat: list[dict[str, Any]] = []
        if isinstance(system, str) and system:
            chat.append({"role": "system", "content": system})
        elif isinstance(system, list):
            chat.append({"role": "system", "content": _text_parts(system)})
        elif system is not None and not isinstance(system, str):
            raise RequestError(400, "system: a string or an array of content blocks", param="system")
        for message in messages:
            if not isinstance(message, dict) or message.get("role") not in ("user", "assistant", "system"):
                raise RequestError(400, "messages: each message needs a role of user or assistant", param="messages")
            chat.append({"role": message["role"], "content": _text_parts(message.get("content"))})
        return {"messages": chat, "max_tokens": max_tokens, "stream": body.get("stream")}

    def error_body(self, err: RequestError) -> bytes:
        kind = _ANTHROPIC_ERRORS.get(err.status, "api_error")
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": err.message}})


# -- OpenAI Responses (/v1/responses) ---------------------------------------------------------------

_RESPONSE_TEXT_TYPES = ("input_text", "output_text", "text")


class ResponsesWriter(ApiWriter):
    def __init__(self, api: Api, request_id: str, created: int, model: str) -> None:
        super().__init__(api, request_id, created, model)
        self.item_id = "msg_" + request_id.removeprefix("resp_")
        self._seq = 0

    def _usage(self, usage_obj: dict[str, Any]) -> dict[str, Any]:
        cached = (usage_obj.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        return {"input_tokens": usage_obj["prompt_tokens"], "input_tokens_details": {"cached_tokens": cached},
                "output_tokens": usage_obj["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage_obj["total_tokens"]}

    def _item(self, text: str, status: str) -> dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant", "content": content}

    def _response(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None,
                  finish_reason: str | None = None) -> dict[str, Any]:
        body = self.api.body
        incomplete = status == "completed" and finish_reason == "length"
        return {
            "id": self.request_id, "object": "response", "created_at": self.created,
            "status": "incomplete" if incomplete else status,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "error": None, "model": self.model, "output": output,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "previous_response_id": body.get("previous_response_id"), "parallel_tool_calls": True,
            "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
            "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools", []),
            "text": {"format": {"type": "text"}}, "truncation": "disabled", "metadata": body.get("metadata") or {},
            "reasoning": None, "store": False, "usage": usage,
        }

    def body(
        self, completion_tokens: int, finish_reason: str, usage_obj: dict[str, Any], extra: dict[str, Any] | None = None
    ) -> bytes:
        item = self._item(generated_text(completion_tokens), "completed")
        out = self._response("completed", [item], self._usage(usage_obj), finish_reason)
        if extra:
            out.update(extra)
        return orjson.dumps(out)

    def _event(self, name: str, **fields: Any) -> bytes:
        data = {"type": name, "sequence_number": self._seq, **fields}
        self._seq += 1
        return _sse_event(name, data)

    def start_events(self, prompt_tokens: int) -> list[bytes]:
        started = self._response("in_progress", [], None)
        return [
            self._event("response.created", response=started),
            self._event("response.in_progress", response=started),
            self._event("response.output_item.added", output_index=0, item=self._item("", "in_progress")),
            self._event("response.content_part.added", item_id=self.item_id, output_index=0, content_index=0,
                        part={"type": "output_text", "text": "", "annotations": []}),
        ]

    def token_event(self, token_index: int) -> bytes:
        return self._event("response.output_text.delta", item_id=self.item_id, output_index=0, content_index=0,
                           delta=FILLER_WORDS[token_index % len(FILLER_WORDS)], logprobs=[])

    def end_events(self, finish_reason: str, usage_obj: dict[str, Any]) -> list[bytes]:
        text = generated_text(usage_obj["completion_tokens"])
        item = self._item(text, "completed")
        part = item["content"][0]
        done = self._response("completed", [item], self._usage(usage_obj), finish_reason)
        return [
            self._event("response.output_text.done", item_id=self.item_id, output_index=0, content_index=0,
                        text=text, logprobs=[]),
            self._event("response.content_part.done", item_id=self.item_id, output_index=0, content_index=0,
                        part=part),
            self._event("response.output_item.done", output_index=0, item=item),
            self._event("response.incomplete" if done["status"] == "incomplete" else "response.completed",
                        response=done),
        ]


class ResponsesApi(Api):
    name = "responses"
    kind: Kind = "chat"
    id_prefix = "resp_"
    writer_class = ResponsesWriter

    def to_engine(self, body: dict[str, Any]) -> dict[str, Any]:
        chat: list[dict[str, Any]] = []
        instructions = body.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise RequestError(400, "'instructions' must be a string", param="instructions")
        if instructions:
            chat.append({"role": "system", "content": instructions})
        items = body.get("input")
        if isinstance(items, str):
            chat.append({"role": "user", "content": items})
        elif isinstance(items, list) and items:
            for item in items:
                if not isinstance(item, dict):
                    raise RequestError(400, "'input' items must be objects", param="input")
                if isinstance(item.get("role"), str):
                    chat.append({"role": item["role"], "content": _text_parts(item.get("content"),
                                                                              _RESPONSE_TEXT_TYPES)})
                else:  # a tool call or its output: its JSON is what the model reads
                    chat.append({"role": "tool", "content": orjson.dumps(item).decode()})
        else:
            raise RequestError(400, "'input' must be a string or a non-empty array of items", param="input")
        out: dict[str, Any] = {"messages": chat, "stream": body.get("stream")}
        max_output = body.get("max_output_tokens")
        if max_output is not None:
            out["max_tokens"] = max_output
        return out

    def error_body(self, err: RequestError) -> bytes:
        if err.param == "max_tokens":
            err.param = "max_output_tokens"
        return err.body()


# -- pooling APIs: one engine step over the input -------------------------------------------------------

EMBEDDING_DIM = 32
"""Length of a simulated embedding (or pooled vector) unless the request asks for ``dimensions``."""


def _inputs(body: dict[str, Any], key: str) -> list[str | list[int]]:
    """An ``input`` (a string, strings, token ids, or arrays of ids) as a list of sequences."""
    value = body.get(key)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(_is_token_id(t) for t in value):
            return [list(value)]
        if all(isinstance(v, list) and v and all(_is_token_id(t) for t in v) for v in value):
            return list(value)
    raise RequestError(400, f"'{key}' must be a string, an array of strings, or (arrays of) token ids", param=key)


def _engine_prompt(sequences: list[str | list[int]]) -> str | list[int]:
    """All sequences as one engine prompt: texts joined by newlines, token ids concatenated."""
    if all(isinstance(s, str) for s in sequences):
        return "\n".join(s for s in sequences if isinstance(s, str))
    return [t for s in sequences if isinstance(s, list) for t in s] or [0]


def _unit_floats(key: str, n: int) -> list[float]:
    """A deterministic unit vector of ``n`` floats for ``key`` (the same input, the same vector)."""
    rng = random.Random(hashlib.blake2b(key.encode(), digest_size=8).digest())
    vec = [rng.uniform(-1.0, 1.0) for _ in range(n)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def _score01(*parts: str) -> float:
    digest = hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest) / 2**64


def _key(seq: str | list[int]) -> str:
    return seq if isinstance(seq, str) else " ".join(map(str, seq))


def _pooling_usage(usage_obj: dict[str, Any]) -> dict[str, Any]:
    prompt = usage_obj["prompt_tokens"]
    return {"prompt_tokens": prompt, "total_tokens": prompt, "completion_tokens": 0, "prompt_tokens_details": None}


class PoolingApi(Api):
    """An API answered after the prompt's prefill (one engine step), whatever it returns."""

    kind: Kind = "completion"

    def to_engine(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"prompt": _engine_prompt(self.sequences(body)), "max_tokens": 1}

    def sequences(self, body: dict[str, Any]) -> list[str | list[int]]:
        raise NotImplementedError


class EmbeddingsWriter(ApiWriter):
    object_name = "embedding"
    field = "embedding"

    def body(
        self, completion_tokens: int, finish_reason: str, usage_obj: dict[str, Any], extra: dict[str, Any] | None = None
    ) -> bytes:
        api = self.api
        assert isinstance(api, EmbeddingsApi)
        data = []
        for i, seq in enumerate(api.seqs):
            vec = _unit_floats(_key(seq), api.dimensions)
            value: Any = vec
            if api.encoding_format == "base64":  # little-endian float32, as OpenAI's clients decode it
                value = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            data.append({"index": i, "object": self.object_name, self.field: value})
        return orjson.dumps({"id": self.request_id, "object": "list", "created": self.created, "model": self.model,
                             "data": data, "usage": _pooling_usage(usage_obj)})


class EmbeddingsApi(PoolingApi):
    name = "embeddings"
    id_prefix = "embd-"
    writer_class = EmbeddingsWriter

    def __init__(self) -> None:
        super().__init__()
        self.seqs: list[str | list[int]] = []
        self.dimensions = EMBEDDING_DIM
        self.encoding_format = "float"

    def sequences(self, body: dict[str, Any]) -> list[str | list[int]]:
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise RequestError(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format")
        dims = body.get("dimensions")
        if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= 8192):
            raise RequestError(400, "'dimensions' must be an integer from 1 to 8192", param="dimensions")
        self.encoding_format = fmt
        self.dimensions = dims or EMBEDDING_DIM
        if body.get("input") is None and isinstance(body.get("messages"), list):
            self.seqs = [orjson.dumps(body["messages"]).decode()]  # vLLM's chat-style embedding request
        else:
            self.seqs = _inputs(body, "input")
        return self.seqs


class PoolWriter(EmbeddingsWriter):
    object_name = "pooling"
    field = "data"


class PoolApi(EmbeddingsApi):
    """vLLM's ``/pooling``: the pooled hidden states (as ``data`` arrays)."""

    name = "pooling"
    id_prefix = "pool-"
    writer_class = PoolWriter


class ClassifyWriter(ApiWriter):
    LABELS = ("negative", "positive")

    def body(
        self, completion_tokens: int, finish_reason: str, usage_obj: dict[str, Any], extra: dict[str, Any] | None = None
    ) -> bytes:
        api = self.api
        assert isinstance(api, ClassifyApi)
        data = []
        for i, seq in enumerate(api.seqs):
            p = _score01("classify", _key(seq))
            data.append({"index": i, "label": self.LABELS[p >= 0.5], "probs": [1.0 - p, p],
                         "num_classes": len(self.LABELS)})
        return orjson.dumps({"id": self.request_id, "object": "list", "created": self.created, "model": self.model,
                             "data": data, "usage": _pooling_usage(usage_obj)})


class ClassifyApi(PoolingApi):
    name = "classify"
    id_prefix = "classify-"
    writer_class = ClassifyWriter

    def __init__(self) -> None:
        super().__init__()
        self.seqs: list[str | list[int]] = []

    def sequences(self, body: dict[str, Any]) -> list[str | list[int]]:
        self.seqs = _inputs(body, "input")
        return self.seqs


def _side(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, dict | list):  # a multimodal input: its JSON stands in for it
        return [orjson.dumps(value).decode()]
    raise RequestError(400, f"'{key}' must be a string or an array of strings", param=key)


class RerankWriter(ApiWriter):
    def body(
        self, completion_tokens: int, finish_reason: str, usage_obj: dict[str, Any], extra: dict[str, Any] | None = None
    ) -> bytes:
        api = self.api
        assert isinstance(api, RerankApi)
        results = [{"index": i, "document": {"text": doc}, "relevance_score": _score01(api.query, doc)}
                   for i, doc in enumerate(api.documents)]
        results.sort(key=lambda r: -r["relevance_score"])
        if api.top_n:
            results = results[: api.top_n]
        prompt = usage_obj["prompt_tokens"]
        return orjson.dumps({"id": self.request_id, "model": self.model,
                             "usage": {"prompt_tokens": prompt, "total_tokens": prompt}, "results": results})


class RerankApi(PoolingApi):
    name = "rerank"
    id_prefix = "rerank-"
    writer_class = RerankWriter

    def __init__(self) -> None:
        super().__init__()
        self.query = ""
        self.documents: list[str] = []
        self.top_n = 0

    def sequences(self, body: dict[str, Any]) -> list[str | list[int]]:
        query = body.get("query")
        if not isinstance(query, str):
            raise RequestError(400, "'query' must be a string", param="query")
        top_n = body.get("top_n", 0)
        if not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 0:
            raise RequestError(400, "'top_n' must be an integer >= 0", param="top_n")
        self.query, self.documents, self.top_n = query, _side(body, "documents"), top_n
        # Every pair starts with the query: one prompt, the query first, is the engine's shared prefix.
        return [query, *self.documents]


_SCORE_SIDES = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2"))


class ScoreWriter(ApiWriter):
    def body(
        self, completion_tokens: int, finish_reason: str, usage_obj: dict[str, Any], extra: dict[str, Any] | None = None
    ) -> bytes:
        api = self.api
        assert isinstance(api, ScoreApi)
        data = [{"index": i, "object": "score", "score": _score01(a, b)} for i, (a, b) in enumerate(api.pairs)]
        return orjson.dumps({"id": self.request_id, "object": "list", "created": self.created, "model": self.model,
                             "data": data, "usage": _pooling_usage(usage_obj)})


class ScoreApi(PoolingApi):
    name = "score"
    id_prefix = "score-"
    writer_class = ScoreWriter

    def __init__(self) -> None:
        super().__init__()
        self.pairs: list[tuple[str, str]] = []

    def sequences(self, body: dict[str, Any]) -> list[str | list[int]]:
        for first, second in _SCORE_SIDES:
            if first in body:
                left, right = _side(body, first), _side(body, second)
                break
        else:
            raise RequestError(400, "'text_1' and 'text_2' (or 'queries' and 'documents') are required",
                               param="text_1")
        if len(left) == 1:
            left = left * len(right)
        if len(left) != len(right):
            raise RequestError(400, "the two sides must be 1:N or N:N", param=first)
        self.pairs = list(zip(left, right, strict=True))
        return [f"{a}\n{b}" for a, b in self.pairs]


def _png_1x1() -> bytes:
    """A valid 1x1 grey PNG (the simulated image)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(
        b"IEND", b"")


class ImagesWriter(ApiWriter):
    def body(
        self, completion_tokens: int, finish_reason: str, usage_obj: dict[str, Any], extra: dict[str, Any] | None = None
    ) -> bytes:
        api = self.api
        assert isinstance(api, ImagesApi)
        image = base64.b64encode(_png_1x1()).decode()
        item = {"b64_json": image} if api.response_format == "b64_json" else {"url": "data:image/png;base64," + image}
        prompt = usage_obj["prompt_tokens"]
        return orjson.dumps({"created": self.created, "data": [dict(item) for _ in range(api.n)],
                             "usage": {"input_tokens": prompt, "output_tokens": 0, "total_tokens": prompt,
                                       "input_tokens_details": {"text_tokens": prompt, "image_tokens": 0}}})


class ImagesApi(PoolingApi):
    name = "images"
    id_prefix = "img-"
    writer_class = ImagesWriter

    def __init__(self) -> None:
        super().__init__()
        self.n = 1
        self.response_format = "url"

    def sequences(self, body: dict[str, Any]) -> list[str | list[int]]:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(400, "'prompt' must be a non-empty string", param="prompt")
        n = body.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 10:
            raise RequestError(400, "'n' must be an integer from 1 to 10", param="n")
        fmt = body.get("response_format") or "url"
        if fmt not in ("url", "b64_json"):
            raise RequestError(400, "'response_format' must be 'url' or 'b64_json'", param="response_format")
        self.n, self.response_format = n, fmt
        return [prompt]


# -- audio (multipart forms): Whisper-style transcription and translation ------------------------------

AUDIO_BYTES_PER_S = 32_000
"""16 kHz, 16-bit mono PCM: how the simulated duration is read from a file's size."""
AUDIO_TOKENS_PER_S = 50
"""Encoder frames per second (Whisper: 1500 per 30 s window)."""
_FORM_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})


def parse_multipart(raw: bytes, content_type: str) -> tuple[dict[str, str], dict[str, bytes]]:
    """(text fields, file fields) of a multipart/form-data body; RequestError (400) when malformed."""
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        raise RequestError(400, "Content-Type must be multipart/form-data")
    boundary = ""
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        raise RequestError(400, "multipart/form-data without a boundary")
    delim = b"\r\n--" + boundary.encode()
    chunks = (b"\r\n" + raw).split(delim)
    if len(chunks) < 2 or not chunks[-1].startswith(b"--"):
        raise RequestError(400, "malformed multipart body")
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for chunk in chunks[1:-1]:
        head, sep, value = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise RequestError(400, "malformed multipart part")
        name, filename = None, False
        for line in head.decode("utf-8", "replace").split("\r\n"):
            key, _, rest = line.partition(":")
            if key.strip().lower() == "content-disposition":
                for param in rest.split(";")[1:]:
                    k, _, v = param.strip().partition("=")
                    if k.lower() == "name":
                        name = v.strip('"')
                    elif k.lower().startswith("filename"):
                        filename = True
        if name is None:
            raise RequestError(400, "a multipart part without a name")
        if filename:
            files[name] = value
        else:
            fields[name] = value.decode("utf-8", "replace")
    return fields, files


class AudioWriter(ApiWriter):
    def __init__(self, api: Api, request_id: str, created: int, model: str) -> None:
        super().__init__(api, request_id, created, model)
        assert isinstance(api, AudioApi)
        fmt = api.response_format
        self.content_type = "text/plain; charset=utf-8" if fmt in ("text", "srt", "vtt") else "application/json"
        self._head = (b'data: {"id":' + orjson.dumps(request_id) + b',"object":"transcription.chunk","created":'
                      + str(created).encode() + b',"model":' + orjson.dumps(model) + b',"choices":')

    def _usage(self, usage_obj: dict[str, Any]) -> dict[str, Any]:
        return {"type": "tokens", "input_tokens": usage_obj["prompt_tokens"],
                "output_tokens": usage_obj["completion_tokens"], "total_tokens": usage_obj["total_tokens"]}

    def body(
        self, completion_tokens: int, finish_reason: str, usage_obj: dict[str, Any], extra: dict[str, Any] | None = None
    ) -> bytes:
        api = self.api
        assert isinstance(api, AudioApi)
        text = generated_text(completion_tokens).strip()
        fmt = api.response_format
        if fmt == "text":
            return text.encode() + b"\n"
        stamp = f"00:00:00{',' if fmt == 'srt' else '.'}000 --> {_clock(api.duration, fmt)}"
        if fmt == "srt":
            return f"1\n{stamp}\n{text}\n\n".encode()
        if fmt == "vtt":
            return f"WEBVTT\n\n{stamp}\n{text}\n\n".encode()
        out: dict[str, Any] = {"text": text, "usage": self._usage(usage_obj)}
        if fmt == "verbose_json":
            out.update(task=api.name, language=api.language, duration=api.duration,
                       segments=[{"id": 0, "seek": 0, "start": 0.0, "end": api.duration, "text": text, "tokens": [],
                                  "temperature": 0.0, "avg_logprob": 0.0, "compression_ratio": 1.0,
                                  "no_speech_prob": 0.0}])
        return orjson.dumps(out)

    def token_event(self, token_index: int) -> bytes:
        word = _FILLER_JSON[token_index % len(_FILLER_JSON)]
        return (self._head + b'[{"index":0,"delta":{"content":' + word
                + b'},"finish_reason":null,"stop_reason":null}]}\n\n')

    def end_events(self, finish_reason: str, usage_obj: dict[str, Any]) -> list[bytes]:
        api = self.api
        assert isinstance(api, AudioApi)
        events = [self._head + b'[{"index":0,"delta":{},"finish_reason":' + orjson.dumps(finish_reason)
                  + b',"stop_reason":null}]}\n\n']
        if api.include_usage:
            events.append(self._head + b'[],"usage":' + orjson.dumps(usage(usage_obj["prompt_tokens"],
                                                                          usage_obj["completion_tokens"])) + b"}\n\n")
        events.append(SSE_DONE)
        return events


def _clock(seconds: float, fmt: str) -> str:
    whole = int(seconds)
    millis = int((seconds - whole) * 1000)
    sep = "," if fmt == "srt" else "."
    return f"{whole // 3600:02d}:{whole // 60 % 60:02d}:{whole % 60:02d}{sep}{millis:03d}"


class AudioApi(Api):
    """``/v1/audio/transcriptions`` (name ``transcribe``) and ``/v1/audio/translations`` (``translate``)."""

    kind: Kind = "completion"
    id_prefix = "trsc-"
    writer_class = AudioWriter

    def __init__(self, name: str = "transcribe") -> None:
        super().__init__()
        self.name = name
        self.id_prefix = "trsc-" if name == "transcribe" else "trnsl-"
        self.response_format = "json"
        self.language = "english"
        self.duration = 0.0
        self.include_usage = False

    def engine_body(self, raw: bytes, content_type: str) -> dict[str, Any]:
        fields, files = parse_multipart(raw, content_type)
        audio = files.get("file")
        if audio is None:
            raise RequestError(400, "'file' (the audio file) is required", param="file")
        fmt = fields.get("response_format") or "json"
        if fmt not in ("json", "text", "verbose_json", "srt", "vtt"):
            raise RequestError(400, "'response_format' must be json, text, verbose_json, srt or vtt",
                               param="response_format")
        stream = fields.get("stream", "false").strip().lower() in _FORM_TRUE
        self.response_format = fmt
        self.language = fields.get("language") or "english"
        self.duration = round(len(audio) / AUDIO_BYTES_PER_S, 3)
        self.include_usage = fields.get("stream_include_usage", "false").strip().lower() in _FORM_TRUE
        self.body = dict(fields)
        # The encoder's input: frames derived from the audio itself, so the same file is the same prompt.
        n = max(1, min(1500, int(self.duration * AUDIO_TOKENS_PER_S)))
        rng = random.Random(hashlib.blake2b(audio, digest_size=8).digest())
        return {"model": fields.get("model"), "prompt": [rng.randrange(50_000) for _ in range(n)], "stream": stream}
