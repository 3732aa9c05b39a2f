"""Request bodies (routing/request.py): prompts rendered from chat and completion bodies, bad bodies."""

from __future__ import annotations

import orjson
import pytest

from routing.errors import RoutingError
from routing.request import CHAT_PATH, COMPLETIONS_PATH, parse_body


def test_chat_prompt_keeps_role_boundaries_and_content_parts() -> None:
    body = orjson.dumps({"model": "m", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]})
    req = parse_body(CHAT_PATH, body)
    assert "be brief" in req.prompt and "look" in req.prompt and "a.png" in req.prompt
    assert req.prompt.index("system") < req.prompt.index("be brief") < req.prompt.index("user")
    # A longer conversation extends the shorter one's rendering: the basis of prefix affinity.
    longer = orjson.dumps({"model": "m", "messages": [*orjson.loads(body)["messages"],
                                                      {"role": "assistant", "content": "ok"}]})
    assert parse_body(CHAT_PATH, longer).prompt.startswith(req.prompt)


def test_same_text_in_other_roles_renders_differently() -> None:
    a = parse_body(CHAT_PATH, orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]}))
    b = parse_body(CHAT_PATH, orjson.dumps({"model": "m", "messages": [{"role": "system", "content": "x"}]}))
    assert a.prompt != b.prompt


@pytest.mark.parametrize(("prompt", "expected"), [
    ("hello", "hello"), (["a", "b"], "a\nb"), ([1, 2, 3], "1 2 3"), ([[1, 2], [3]], "1 2\n3")])
def test_completion_prompts(prompt: object, expected: str) -> None:
    req = parse_body(COMPLETIONS_PATH, orjson.dumps({"model": "m", "prompt": prompt, "max_tokens": 5,
                                                     "stream": True}))
    assert req.prompt == expected and req.max_tokens == 5 and req.stream is True


@pytest.mark.parametrize(("path", "body", "param"), [
    (CHAT_PATH, b"{not json", None),
    (CHAT_PATH, b"[1,2]", None),
    (CHAT_PATH, b"", None),
    (CHAT_PATH, b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
    (CHAT_PATH, b'{"model": 5, "messages": []}', "model"),
    (CHAT_PATH, b'{"model": "m"}', "messages"),
    (CHAT_PATH, b'{"model": "m", "messages": []}', "messages"),
    (CHAT_PATH, b'{"model": "m", "messages": ["x"]}', "messages"),
    (CHAT_PATH, b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream"),
    (CHAT_PATH, b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}', "max_tokens"),
    (COMPLETIONS_PATH, b'{"model": "m"}', "prompt"),
    (COMPLETIONS_PATH, b'{"model": "m", "prompt": {"a": 1}}', "prompt"),
    (COMPLETIONS_PATH, b'{"model": "m", "prompt": []}', "prompt"),
])
def test_bad_bodies_are_400_naming_the_field(path: str, body: bytes, param: str | None) -> None:
    with pytest.raises(RoutingError) as exc:
        parse_body(path, body)
    assert exc.value.status == 400
    assert exc.value.param == param
    assert exc.value.to_body()["error"]["type"] == "invalid_request_error"


def test_integers_beyond_64_bits_are_valid_json() -> None:
    body = b'{"model": "m", "prompt": "x", "logit_bias": {"1": 123456789012345678901234567890}}'
    assert parse_body(COMPLETIONS_PATH, body).prompt == "x"
