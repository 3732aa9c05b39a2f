"""The simulated pod serves vLLM's whole surface in vLLM's shapes: Anthropic messages, OpenAI
responses (both with their SSE events), embeddings, pooling, classification, rerank, score, image
generation, and multipart audio transcription and translation."""

from __future__ import annotations

import base64
import struct
from typing import Any

import aiohttp
import orjson
import pytest

from extproc_router.simulator.server import SimServer
from tests.unit.extproc_router.simulator.conftest import CHAT, StartSim, stats

MODEL = "sim-model"
SYSTEM = "You are a careful assistant. " * 20


async def post(http: aiohttp.ClientSession, sim: SimServer, path: str, body: Any) -> tuple[int, dict[str, str], bytes]:
    kw: dict[str, Any] = {"data": body} if isinstance(body, aiohttp.FormData) else {"json": body}
    async with http.post(sim.url + path, **kw) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def sse_events(raw: bytes) -> list[tuple[str | None, Any]]:
    """(event name, decoded data) of every SSE event; `[DONE]` stays a string."""
    out: list[tuple[str | None, Any]] = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        name, data = None, None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:] if line[6:] == "[DONE]" else orjson.loads(line[6:])
        out.append((name, data))
    return out


def audio_form(size: int = 96_000, **fields: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("model", MODEL)
    for name, value in fields.items():
        form.add_field(name, value)
    form.add_field("file", bytes(range(256)) * (size // 256), filename="speech.wav", content_type="audio/wav")
    return form


async def test_messages_answer_as_anthropic(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start()
    status, headers, raw = await post(http, sim, "/v1/messages", {
        "model": MODEL, "max_tokens": 4, "system": [{"type": "text", "text": "be brief"}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]})
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    body = orjson.loads(raw)
    assert body["type"] == "message" and body["role"] == "assistant" and body["id"].startswith("msg_")
    assert body["content"][0]["type"] == "text" and len(body["content"][0]["text"].split()) == 4
    assert body["stop_reason"] == "max_tokens" and body["usage"]["output_tokens"] == 4
    assert body["usage"]["input_tokens"] > 0


async def test_messages_stream_is_anthropics_event_sequence(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start()
    status, headers, raw = await post(http, sim, "/v1/messages", {
        "model": MODEL, "max_tokens": 3, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(raw)
    names = [n for n, _ in events]
    assert names == ["message_start", "content_block_start", "ping", "content_block_delta", "content_block_delta",
                     "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert all(data["type"] == name for name, data in events)
    assert events[0][1]["message"]["usage"]["input_tokens"] > 0
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"]["output_tokens"] == 3


@pytest.mark.parametrize(("body", "status", "kind"), [
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, 400, "invalid_request_error"),
    ({"model": "other", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}, 404, "not_found_error"),
])
async def test_messages_errors_are_anthropic_shaped(start: StartSim, http: aiohttp.ClientSession, body: dict,
                                                    status: int, kind: str) -> None:
    sim = await start()
    got, _, raw = await post(http, sim, "/v1/messages", body)
    err = orjson.loads(raw)
    assert got == status and err["type"] == "error" and err["error"]["type"] == kind and err["error"]["message"]


async def test_responses_object_and_stream(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start()
    status, _, raw = await post(http, sim, "/v1/responses", {"model": MODEL, "input": "hello", "instructions": "x"})
    body = orjson.loads(raw)
    assert status == 200 and body["object"] == "response" and body["id"].startswith("resp_")
    assert body["status"] == "completed" and body["instructions"] == "x"
    message = body["output"][0]
    assert message["type"] == "message" and message["content"][0]["type"] == "output_text"
    assert body["usage"]["total_tokens"] == body["usage"]["input_tokens"] + body["usage"]["output_tokens"]

    status, _, raw = await post(http, sim, "/v1/responses", {
        "model": MODEL, "stream": True, "max_output_tokens": 2,
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "hello"}]}]})
    events = sse_events(raw)
    names = [n for n, _ in events]
    assert names == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.incomplete"]
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    final = events[-1][1]["response"]
    assert final["incomplete_details"] == {"reason": "max_output_tokens"} and final["usage"]["output_tokens"] == 2
    deltas = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    assert final["output"][0]["content"][0]["text"] == deltas == events[6][1]["text"]


async def test_embeddings_float_and_base64(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start()
    status, _, raw = await post(http, sim, "/v1/embeddings", {"model": MODEL, "input": ["alpha", "beta", "alpha"]})
    body = orjson.loads(raw)
    assert status == 200 and body["object"] == "list" and body["model"] == MODEL
    vectors = [d["embedding"] for d in body["data"]]
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and {d["object"] for d in body["data"]} == {"embedding"}
    assert vectors[0] == vectors[2] != vectors[1]  # deterministic per input
    assert abs(sum(v * v for v in vectors[0]) - 1.0) < 1e-9
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    # What the OpenAI SDK asks for by default: base64 of little-endian float32.
    status, _, raw = await post(http, sim, "/v1/embeddings", {"model": MODEL, "input": "alpha",
                                                              "encoding_format": "base64", "dimensions": 8})
    packed = base64.b64decode(orjson.loads(raw)["data"][0]["embedding"])
    assert len(struct.unpack("<8f", packed)) == 8
    status, _, raw = await post(http, sim, "/v1/embeddings", {"model": MODEL, "input": [1, "x"]})
    assert status == 400 and orjson.loads(raw)["error"]["param"] == "input"


async def test_pooling_classify_rerank_score(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start()
    _, _, raw = await post(http, sim, "/pooling", {"model": MODEL, "input": "alpha"})
    assert orjson.loads(raw)["data"][0]["object"] == "pooling"
    for path in ("/v1/classify", "/classify"):
        _, _, raw = await post(http, sim, path, {"model": MODEL, "input": ["good", "bad"]})
        data = orjson.loads(raw)["data"]
        assert len(data) == 2 and all(abs(sum(d["probs"]) - 1) < 1e-9 and d["num_classes"] == 2 for d in data)
        assert all(d["label"] in ("negative", "positive") for d in data)
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        _, _, raw = await post(http, sim, path, {"model": MODEL, "query": "q", "documents": ["a", "b", "c"],
                                                 "top_n": 2})
        body = orjson.loads(raw)
        scores = [r["relevance_score"] for r in body["results"]]
        assert len(scores) == 2 and scores == sorted(scores, reverse=True)
        assert all(body["results"][i]["document"]["text"] in "abc" for i in range(2))
        assert body["usage"]["total_tokens"] > 0
    for path, body in (("/v1/score", {"text_1": "q", "text_2": ["a", "b"]}),
                       ("/score", {"queries": ["q", "r"], "documents": ["a", "b"]})):
        _, _, raw = await post(http, sim, path, {"model": MODEL, **body})
        data = orjson.loads(raw)["data"]
        assert [d["index"] for d in data] == [0, 1] and all(d["object"] == "score" for d in data)
    status, _, raw = await post(http, sim, "/v1/score", {"model": MODEL, "text_1": ["a", "b"], "text_2": ["c"] * 3})
    assert status == 400


async def test_image_generation_url_and_b64(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start()
    _, _, raw = await post(http, sim, "/v1/images/generations", {"model": MODEL, "prompt": "a cat", "n": 2})
    data = orjson.loads(raw)["data"]
    assert len(data) == 2 and data[0]["url"].startswith("data:image/png;base64,")
    _, _, raw = await post(http, sim, "/v1/images/generations", {"model": MODEL, "prompt": "a cat",
                                                                 "response_format": "b64_json"})
    assert base64.b64decode(orjson.loads(raw)["data"][0]["b64_json"]).startswith(b"\x89PNG\r\n\x1a\n")


async def test_audio_forms(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start()
    status, _, raw = await post(http, sim, "/v1/audio/transcriptions", audio_form())
    body = orjson.loads(raw)
    assert status == 200 and body["text"] and body["usage"]["total_tokens"] > 0
    status, headers, raw = await post(http, sim, "/v1/audio/translations", audio_form(response_format="text"))
    assert status == 200 and headers["Content-Type"].startswith("text/plain") and raw.strip()
    _, _, raw = await post(http, sim, "/v1/audio/transcriptions", audio_form(response_format="verbose_json",
                                                                             language="de"))
    verbose = orjson.loads(raw)
    assert verbose["task"] == "transcribe" and verbose["language"] == "de" and verbose["duration"] == 3.0
    _, _, raw = await post(http, sim, "/v1/audio/transcriptions", audio_form(stream="true",
                                                                             stream_include_usage="true"))
    events = sse_events(raw)
    assert events[-1][1] == "[DONE]" and events[-2][1]["usage"]["completion_tokens"] > 0
    assert all(d["object"] == "transcription.chunk" for _, d in events[:-1])
    form = aiohttp.FormData()
    form.add_field("model", MODEL)
    form.add_field("note", "no file")
    form.add_field("other", b"x", filename="x.bin")
    status, _, raw = await post(http, sim, "/v1/audio/transcriptions", form)
    assert status == 400 and orjson.loads(raw)["error"]["param"] == "file"


async def test_apis_share_the_engines_prefix_cache(start: StartSim, http: aiohttp.ClientSession) -> None:
    """A chat, then the same conversation through /v1/responses: the engine's cache serves the second
    (vLLM renders both through the chat template)."""
    sim = await start()
    turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}]
    status, _, _ = await post(http, sim, CHAT, {"model": MODEL, "messages": turns, "max_tokens": 1})
    assert status == 200
    _, _, raw = await post(http, sim, "/v1/responses", {"model": MODEL, "instructions": SYSTEM, "input": "hello",
                                                        "max_output_tokens": 1})
    usage = orjson.loads(raw)["usage"]
    assert usage["input_tokens_details"]["cached_tokens"] >= usage["input_tokens"] - 16  # all but the last block
    counted = (await stats(http, sim))["requests_by_path"]
    assert counted[CHAT] == 1 and counted["/v1/responses"] == 1
