"""OpenAI/vLLM wire format for the simulator: request parsing, errors, response bodies, SSE chunks.

Pure functions and small classes, no I/O, so the HTTP layer stays thin and the shapes can be
unit-tested directly. Bodies mirror what vLLM's OpenAI server returns.
"""

from __future__ import annotations

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
