"""Every routed path through real Envoy, the real router and simulated pods: routed with the
strategy asked for and echoed, prefix-cache affinity on the paths it hashes, errors in the shape the
path's clients parse (Anthropic's on /v1/messages), API keys as `Authorization` or `x-api-key`,
token-limit rules on streams, and multipart uploads read by the router and refused over the limit."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict

from extproc_router.stack import LocalStack
from routing.strategies.prefix_cache import MATCH_HEADER
from tests.conftest import running_stack

KEY = "k-paths"
AUTH = {"authorization": f"Bearer {KEY}"}
MODEL = "demo-model"
LONG = "Shared reference text that every request of this test starts with. " * 40
TURNS = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """Three pods; an API key; user `bob` has a tokens-per-minute limit (his streams must report usage)."""
    extra = {"auth": {"api_keys": [KEY]}, "users": {"bob": {"tpm": 10_000_000}}}
    with running_stack(tmp_path_factory.mktemp("paths"), ttft_ms=2.0, itl_ms=1.0, health_interval=0.2,
                       file_extra=extra) as stack:
        yield stack


async def call(s: aiohttp.ClientSession, stack: LocalStack, path: str, body: Any, headers: dict[str, str] | None = None,
               method: str = "POST") -> tuple[int, CIMultiDict, bytes]:
    hdrs = {**AUTH, **(headers or {})}
    kw: dict[str, Any] = {"data": body} if isinstance(body, aiohttp.FormData | bytes) else {"json": body}
    async with s.request(method, stack.url + path, headers=hdrs, **kw) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


def audio_form(size: int = 64_000, model: str = MODEL, **fields: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("model", model)
    for name, value in fields.items():
        form.add_field(name, value)
    form.add_field("file", (bytes(range(256)) * (size // 256 + 1))[:size], filename="speech.wav",
                   content_type="audio/wav")
    return form


def assert_routed(status: int, hdrs: CIMultiDict, body: bytes, strategy: str) -> None:
    assert status == 200, body[:300]
    assert hdrs["routing-strategy"] == strategy
    assert hdrs["target-pod"] == hdrs["x-sim-pod"]  # the echo names the pod that really served
    assert hdrs["target-pod-ip"].startswith("127.0.0.1:") and hdrs["request-id"]


# path -> (body, a check of the answer's shape)
JSON_PATHS: dict[str, tuple[dict, Any]] = {
    "/v1/chat/completions": ({"messages": TURNS}, lambda b: b["object"] == "chat.completion"),
    "/v1/completions": ({"prompt": "once upon"}, lambda b: b["object"] == "text_completion"),
    "/v1/messages": ({"max_tokens": 4, "system": "be brief", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hello"}]}]},
        lambda b: b["type"] == "message" and b["content"][0]["type"] == "text"),
    "/v1/responses": ({"input": "hello", "instructions": "be brief"},
                      lambda b: b["object"] == "response" and b["output"][0]["content"][0]["type"] == "output_text"),
    "/v1/embeddings": ({"input": ["alpha", "beta"]}, lambda b: len(b["data"]) == 2 and b["data"][1]["embedding"]),
    "/pooling": ({"input": "alpha"}, lambda b: b["data"][0]["object"] == "pooling"),
    "/v1/classify": ({"input": "great"}, lambda b: b["data"][0]["num_classes"] == 2),
    "/classify": ({"input": "great"}, lambda b: b["data"][0]["num_classes"] == 2),
    "/v1/rerank": ({"query": "q", "documents": ["a", "b"]}, lambda b: len(b["results"]) == 2),
    "/rerank": ({"query": "q", "documents": ["a"]}, lambda b: b["results"][0]["relevance_score"] >= 0),
    "/v2/rerank": ({"query": "q", "documents": ["a"]}, lambda b: b["results"][0]["index"] == 0),
    "/v1/score": ({"text_1": "q", "text_2": ["a", "b"]}, lambda b: [d["index"] for d in b["data"]] == [0, 1]),
    "/score": ({"text_1": "q", "text_2": "a"}, lambda b: b["data"][0]["object"] == "score"),
    "/v1/images/generations": ({"prompt": "a cat", "response_format": "b64_json"},
                               lambda b: b["data"][0]["b64_json"]),
}


@pytest.mark.parametrize("path", sorted(JSON_PATHS))
async def test_every_json_path_is_routed_echoed_and_answered_in_its_shape(gateway: LocalStack, path: str) -> None:
    body, shape = JSON_PATHS[path]
    async with aiohttp.ClientSession() as s:
        for strategy in ("least-request", "prefix-cache"):
            status, hdrs, raw = await call(s, gateway, path, {"model": MODEL, **body},
                                           {"routing-strategy": strategy})
            assert_routed(status, hdrs, raw, strategy)
            assert shape(orjson.loads(raw)), raw[:300]


@pytest.mark.parametrize("path", ["/v1/audio/transcriptions", "/v1/audio/translations"])
async def test_audio_forms_are_routed_by_the_form_model(gateway: LocalStack, path: str) -> None:
    async with aiohttp.ClientSession() as s:
        status, hdrs, raw = await call(s, gateway, path, audio_form(), {"routing-strategy": "least-request"})
        assert_routed(status, hdrs, raw, "least-request")
        assert orjson.loads(raw)["text"]
        # Load-only: prefix-cache hashes nothing of an audio upload, so nothing can match.
        status, hdrs, raw = await call(s, gateway, path, audio_form(), {"routing-strategy": "prefix-cache"})
        assert_routed(status, hdrs, raw, "prefix-cache")
        assert hdrs[MATCH_HEADER].startswith("0.00;")
        status, _, raw = await call(s, gateway, path, audio_form(model="whisper-nope"))
        assert status == 404 and orjson.loads(raw)["error"]["code"] == "model_not_found"


async def test_streams_of_messages_and_responses_pass_through(gateway: LocalStack) -> None:
    async with aiohttp.ClientSession() as s:
        status, hdrs, raw = await call(s, gateway, "/v1/messages", {
            "model": MODEL, "max_tokens": 5, "stream": True, "messages": TURNS}, {"routing-strategy": "random"})
        assert_routed(status, hdrs, raw, "random")
        assert raw.startswith(b"event: message_start\n") and raw.rstrip().endswith(b'{"type":"message_stop"}')
        assert raw.count(b"event: content_block_delta") == 5
        status, hdrs, raw = await call(s, gateway, "/v1/responses", {
            "model": MODEL, "input": "hello", "stream": True, "max_output_tokens": 3})
        assert_routed(status, hdrs, raw, "random")
        assert raw.count(b"event: response.output_text.delta") == 3 and b"event: response.incomplete" in raw


async def test_prefix_cache_affinity_on_hashed_paths_and_across_apis(gateway: LocalStack) -> None:
    """The paths that hash keep a shared prefix on one pod; a conversation that moves from chat to
    Anthropic messages or the Responses API (one chat template in the engine) stays on its pod."""
    pc = {"routing-strategy": "prefix-cache"}
    async with aiohttp.ClientSession() as s:
        for path, make in (("/v1/embeddings", lambda q: {"input": LONG + q}),
                           ("/v1/rerank", lambda q: {"query": LONG, "documents": [q]})):
            seen = []
            for q in ("first", "second", "third"):
                status, hdrs, raw = await call(s, gateway, path, {"model": MODEL, **make(q)}, pc)
                assert status == 200, raw[:300]
                seen.append((hdrs["target-pod"], float(hdrs[MATCH_HEADER].split(";")[0])))
            assert len({pod for pod, _ in seen}) == 1 and all(m > 0.9 for _, m in seen[1:]), (path, seen)

        system = "Cross-API conversation. " + LONG
        status, hdrs, _ = await call(s, gateway, "/v1/chat/completions", {
            "model": MODEL, "messages": [{"role": "system", "content": system}, *TURNS]}, pc)
        pod = hdrs["target-pod"]
        status, hdrs, raw = await call(s, gateway, "/v1/messages", {
            "model": MODEL, "max_tokens": 2, "system": system, "messages": TURNS}, pc)
        assert status == 200 and hdrs["target-pod"] == pod and hdrs[MATCH_HEADER].startswith("1.00;"), raw[:200]
        status, hdrs, raw = await call(s, gateway, "/v1/responses", {
            "model": MODEL, "instructions": system, "input": "hello"}, pc)
        assert status == 200 and hdrs["target-pod"] == pod and hdrs[MATCH_HEADER].startswith("1.00;"), raw[:200]


def anthropic_error(raw: bytes) -> dict:
    body = orjson.loads(raw)
    assert set(body) == {"type", "error"} and body["type"] == "error" and set(body["error"]) == {"type", "message"}
    return body["error"]


def openai_error(raw: bytes) -> dict:
    err = orjson.loads(raw)["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


async def test_messages_errors_are_anthropic_shaped(gateway: LocalStack) -> None:
    ok = {"model": MODEL, "max_tokens": 2, "messages": TURNS}
    async with aiohttp.ClientSession() as s:
        # Anthropic's SDK sends the key as x-api-key; a missing or wrong key is Anthropic's 401.
        async with s.post(gateway.url + "/v1/messages", json=ok, headers={"x-api-key": KEY}) as resp:
            assert resp.status == 200, await resp.read()
        async with s.post(gateway.url + "/v1/messages", json=ok, headers={"x-api-key": "wrong"}) as resp:
            assert resp.status == 401
            assert anthropic_error(await resp.read())["type"] == "authentication_error"
        cases = [
            ({"model": MODEL, "messages": TURNS}, 400, "invalid_request_error", "max_tokens"),
            ({"model": "nope", "max_tokens": 2, "messages": TURNS}, 404, "not_found_error", "nope"),
            (b"{not json", 400, "invalid_request_error", "JSON"),
        ]
        for body, status, kind, needle in cases:
            got, hdrs, raw = await call(s, gateway, "/v1/messages", body)
            err = anthropic_error(raw)
            assert (got, err["type"]) == (status, kind) and needle in err["message"], raw
            assert hdrs["request-id"]
        got, _, raw = await call(s, gateway, "/v1/messages", ok, {"routing-strategy": "fastest"})
        assert got == 400 and "least-request" in anthropic_error(raw)["message"]
        got, _, raw = await call(s, gateway, "/v1/messages", None, method="GET")
        assert got == 405 and anthropic_error(raw)["type"] == "invalid_request_error"
        # Envoy's own replies on this path take the same shape: a body far over the buffer limit.
        huge = {**ok, "messages": [{"role": "user", "content": "x" * (2 * gateway.max_body_bytes())}]}
        got, hdrs, raw = await call(s, gateway, "/v1/messages", huge)
        assert got == 413 and anthropic_error(raw)["type"] == "request_too_large"
        assert "x-error-request-body-too-large" not in hdrs  # Envoy answered, not the router
        got, _, raw = await call(s, gateway, "/v1/chat/completions", {"model": MODEL, **huge})
        assert got == 413 and openai_error(raw)["code"] == "request_too_large"


@pytest.mark.parametrize(("path", "body", "status", "header"), [
    ("/v1/embeddings", {"model": MODEL}, 400, "x-error-request-body-processing"),
    ("/v1/embeddings", {"model": "nope", "input": "x"}, 404, "x-error-no-model-backends"),
    ("/v1/rerank", {"model": MODEL, "query": "q"}, 400, "x-error-request-body-processing"),
    ("/v1/responses", {"model": MODEL, "input": []}, 400, "x-error-request-body-processing"),
    ("/v1/moderations", {"model": MODEL, "input": "x"}, 404, "x-error-request-path"),
])
async def test_other_paths_errors_are_openai_shaped(gateway: LocalStack, path: str, body: dict, status: int,
                                                    header: str) -> None:
    async with aiohttp.ClientSession() as s:
        got, hdrs, raw = await call(s, gateway, path, body)
        assert got == status and header in hdrs, raw
        openai_error(raw)
        got, _, raw = await call(s, gateway, "/v1/embeddings", None, method="GET")
        assert got == 405 and openai_error(raw)["code"] == "method_not_allowed"
        async with s.post(gateway.url + "/v1/embeddings", json={"model": MODEL, "input": "x"}) as resp:
            assert resp.status == 401 and openai_error(await resp.read())["code"] == "invalid_api_key"


async def test_malformed_and_oversize_forms_are_refused(gateway: LocalStack) -> None:
    limit = gateway.max_body_bytes()
    path = "/v1/audio/transcriptions"
    async with aiohttp.ClientSession() as s:
        form = aiohttp.FormData(default_to_multipart=True)
        form.add_field("model", MODEL)
        status, hdrs, raw = await call(s, gateway, path, form)  # no file part
        assert status == 400 and openai_error(raw)["param"] == "file" and "x-error-request-body-processing" in hdrs
        unclosed = b'--x\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n'
        status, _, raw = await call(s, gateway, path, unclosed, {"content-type": "multipart/form-data; boundary=x"})
        assert status == 400 and "closing boundary" in openai_error(raw)["message"]
        status, _, raw = await call(s, gateway, path, {"model": MODEL, "file": "x"})  # JSON where a form belongs
        assert status == 400 and "multipart/form-data" in openai_error(raw)["message"]
        # Just over the limit (the router counts it) and far over it (Envoy's buffer stops it): 413 both.
        for size in (limit + 1, limit * 2):
            status, _, raw = await call(s, gateway, path, audio_form(size=size))
            assert status == 413 and openai_error(raw)["code"] == "request_too_large", raw[:200]
        # Just under the limit, the upload is routed and served.
        status, hdrs, raw = await call(s, gateway, path, audio_form(size=limit - 1024),
                                       {"routing-strategy": "least-request"})
        assert_routed(status, hdrs, raw, "least-request")


async def test_token_limited_users_streams_must_report_usage_per_api(gateway: LocalStack) -> None:
    """Anthropic and Responses streams always report usage; chat and audio must ask for it."""
    bob = {"user": "bob"}
    async with aiohttp.ClientSession() as s:
        status, _, raw = await call(s, gateway, "/v1/messages", {
            "model": MODEL, "max_tokens": 2, "stream": True, "messages": TURNS}, bob)
        assert status == 200, raw[:200]
        status, _, raw = await call(s, gateway, "/v1/responses", {"model": MODEL, "input": "x", "stream": True}, bob)
        assert status == 200, raw[:200]
        status, hdrs, raw = await call(s, gateway, "/v1/audio/transcriptions", audio_form(stream="true"), bob)
        assert status == 400 and "x-error-no-stream-options-include-usage" in hdrs, raw
        status, _, raw = await call(s, gateway, "/v1/audio/transcriptions",
                                    audio_form(stream="true", stream_include_usage="true"), bob)
        assert status == 200 and raw.rstrip().endswith(b"data: [DONE]"), raw[-200:]
