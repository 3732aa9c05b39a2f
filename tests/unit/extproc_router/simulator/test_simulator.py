"""Behaviour of the simulated vLLM pod (`simulator`), seen from an HTTP client."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc_router.simulator.config import EngineConfig
from extproc_router.simulator.engine import Engine
from extproc_router.simulator.openai_format import FILLER_WORDS, generated_text
from extproc_router.simulator.sequence import Sequence
from extproc_router.simulator.server import SimServer
from tests.unit.extproc_router.simulator.conftest import CHAT, COMPLETIONS, StartSim, stats, wait_until

REPO_ROOT = Path(__file__).resolve().parents[4]
"""Working directory of subprocesses, so that `python -m simulator` finds the package."""


@pytest.fixture
def sim_defaults() -> dict[str, Any]:
    """Fixed timing: the sims of this module start from the SimConfig defaults."""
    return {}


def chat_body(content: Any = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "sim-model", "messages": [{"role": "user", "content": content}], **extra}


async def metrics(http: aiohttp.ClientSession, sim: SimServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Scrape /metrics into {(sample name, sorted labels): value}."""
    async with http.get(sim.url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(scrape: dict, name: str, **labels: str) -> float:
    return scrape[(name, tuple(sorted({"model_name": "sim-model", **labels}.items())))]


async def read_sse(resp: aiohttp.ClientResponse, t0: float) -> list[tuple[float, bytes]]:
    """(arrival time since t0, payload) of every SSE data line."""
    events = []
    async for line in resp.content:
        if line.startswith(b"data: "):
            events.append((time.perf_counter() - t0, line[len(b"data: ") :].rstrip(b"\n")))
    return events


# ----------------------------------------------------------------------------- completions


async def test_chat_non_streaming_body_and_usage(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start(ttft_ms=40, itl_ms=10, pod_name="pod-a")
    prompt = "x" * 41  # 41 bytes -> 10 tokens
    t0 = time.perf_counter()
    async with http.post(sim.url + CHAT, json=chat_body(prompt, max_tokens=5)) as resp:
        body = await resp.json()
        elapsed = time.perf_counter() - t0
        assert resp.status == 200
        assert resp.headers["x-sim-pod"] == "pod-a"
    assert elapsed >= 0.040 + 4 * 0.010 - 0.005  # TTFT, then 4 more inter-token gaps
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "sim-model"
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "".join(FILLER_WORDS[:5])
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_completion_length_defaults_and_cap(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start(ttft_ms=0, itl_ms=0, output_tokens=7, max_output_tokens=9)
    parts = [{"type": "text", "text": "a" * 8}, {"type": "image_url", "image_url": {"url": "x"}}]
    cases = [({}, 7, "stop"), ({"max_tokens": 3}, 3, "length"), ({"max_completion_tokens": 50}, 9, "stop")]
    for extra, tokens, reason in cases:
        async with http.post(sim.url + CHAT, json=chat_body(parts, **extra)) as resp:
            body = await resp.json()
        assert body["usage"]["completion_tokens"] == tokens, extra
        assert body["usage"]["prompt_tokens"] == 2  # only the text part counts: 8 bytes / 4
        assert body["choices"][0]["finish_reason"] == reason, extra


async def test_chat_stream_is_paced_and_well_formed(start: StartSim, http: aiohttp.ClientSession) -> None:
    ttft, itl = 0.080, 0.040
    sim = await start(ttft_ms=ttft * 1000, itl_ms=itl * 1000)
    request = chat_body("y" * 20, max_tokens=4, stream=True, stream_options={"include_usage": True})
    t0 = time.perf_counter()
    async with http.post(sim.url + CHAT, json=request) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["x-sim-pod"] == sim.pod_name
        events = await read_sse(resp, t0)

    times = [t for t, _ in events]
    payloads = [p for _, p in events]
    assert payloads[-1] == b"[DONE]"
    chunks = [orjson.loads(p) for p in payloads[:-1]]
    role, tokens, final, usage_chunk = chunks[0], chunks[1:5], chunks[5], chunks[6]
    assert len(chunks) == 7
    assert {c["id"] for c in chunks} == {role["id"]} and role["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "sim-model" for c in chunks)
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"]["content"] for c in tokens) == generated_text(4)
    assert all(c["choices"][0]["finish_reason"] is None for c in tokens)
    assert final["choices"][0]["delta"] == {} and final["choices"][0]["finish_reason"] == "length"
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens"] == 5
    assert usage_chunk["usage"]["completion_tokens"] == 4
    assert usage_chunk["usage"]["total_tokens"] == 9

    # The first chunks arrive after TTFT, then one token about every ITL (generous upper bounds:
    # CI machines are noisy; the lower bounds are what proves the chunks were not buffered).
    assert ttft - 0.005 <= times[1] < ttft + 0.25
    gaps = [b - a for a, b in itertools.pairwise(times[1:5])]
    assert len(gaps) == 3
    assert all(itl - 0.010 <= g < itl + 0.25 for g in gaps), gaps


async def test_stream_without_include_usage_ends_with_done(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start(ttft_ms=0, itl_ms=0)
    async with http.post(sim.url + CHAT, json=chat_body(max_tokens=2, stream=True)) as resp:
        events = await read_sse(resp, time.perf_counter())
    payloads = [p for _, p in events]
    assert payloads[-1] == b"[DONE]"
    assert all("usage" not in orjson.loads(p) for p in payloads[:-1])
    assert len(payloads) == 1 + 2 + 1 + 1  # role, 2 tokens, final, [DONE]


async def test_completions_with_list_prompt(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start(ttft_ms=0, itl_ms=0)
    request = {"model": "sim-model", "prompt": ["a" * 40, "b" * 80], "max_tokens": 3}
    async with http.post(sim.url + COMPLETIONS, json=request) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["text"] == generated_text(3) and c["finish_reason"] == "length" for c in body["choices"])
    assert body["usage"]["prompt_tokens"] == 10 + 20
    assert body["usage"]["completion_tokens"] == 6

    # Streamed, each choice gets its own chunks, tagged with its index.
    request.update(stream=True, stream_options={"include_usage": True})
    async with http.post(sim.url + COMPLETIONS, json=request) as resp:
        events = await read_sse(resp, time.perf_counter())
    chunks = [orjson.loads(p) for _, p in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == generated_text(3)
        assert mine[-1]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 6

    # A single prompt given as token ids counts one token per id.
    request = {"model": "sim-model", "prompt": [11, 12, 13, 14], "max_tokens": 1}
    async with http.post(sim.url + COMPLETIONS, json=request) as resp:
        assert (await resp.json())["usage"]["prompt_tokens"] == 4


async def test_request_id_header_and_recorded_headers(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start(ttft_ms=0, itl_ms=0)
    headers = {"x-request-id": "abc123", "routing-strategy": "random", "Authorization": "Bearer secret"}
    async with http.post(sim.url + CHAT, json=chat_body(max_tokens=1), headers=headers) as resp:
        assert (await resp.json())["id"] == "chatcmpl-abc123"
    recorded = (await stats(http, sim))["last_headers"]
    assert recorded["x-request-id"] == "abc123"
    assert recorded["routing-strategy"] == "random"
    assert "authorization" not in recorded


# ----------------------------------------------------------------------------- errors


async def test_bad_json_and_unknown_model(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start(ttft_ms=0, itl_ms=0)
    for path in (CHAT, COMPLETIONS):
        async with http.post(sim.url + path, data=b'{"model": ') as resp:
            assert resp.status == 400
            assert resp.headers["x-sim-pod"] == sim.pod_name
            error = (await resp.json())["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
        assert error["param"] is None and error["code"] is None

    async with http.post(sim.url + CHAT, json={**chat_body(), "model": "nope"}) as resp:
        assert resp.status == 404
        error = (await resp.json())["error"]
    assert error["code"] == "model_not_found" and "nope" in error["message"]

    bad_requests = [
        (CHAT, {"model": "sim-model"}, "messages"),
        (CHAT, chat_body(max_tokens=0), "max_tokens"),
        (CHAT, chat_body(stream="yes"), "stream"),
        (COMPLETIONS, {"model": "sim-model", "prompt": []}, "prompt"),
        (COMPLETIONS, {"model": "sim-model"}, "prompt"),
    ]
    for path, body, param in bad_requests:
        async with http.post(sim.url + path, json=body) as resp:
            assert resp.status == 400, body
            assert (await resp.json())["error"]["param"] == param


async def test_fail_every(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start(ttft_ms=0, itl_ms=0, fail_every=3)

    async def statuses(n: int) -> list[int]:
        result = []
        for _ in range(n):
            async with http.post(sim.url + CHAT, json=chat_body(max_tokens=1)) as resp:
                result.append(resp.status)
                if resp.status == 500:
                    error = (await resp.json())["error"]
                    assert set(error) == {"message", "type", "param", "code"}
        return result

    assert await statuses(6) == [200, 200, 500, 200, 200, 500]
    async with http.post(sim.url + "/sim/faults", json={"fail_every": 0}) as resp:
        assert (await resp.json())["fail_every"] == 0
    assert await statuses(3) == [200, 200, 200]
    async with http.post(sim.url + "/sim/faults", json={"fail_every": 1}) as resp:
        assert resp.status == 200
    assert await statuses(2) == [500, 500]
    assert (await stats(http, sim))["injected_failures"] == 4


async def test_stall_holds_requests_until_cancelled_or_released(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start(ttft_ms=0, itl_ms=0, stall=True)

    def in_flight(n: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return (await stats(http, sim))["in_flight"] == n

        return check

    # A client that gives up leaves nothing behind.
    short = aiohttp.ClientTimeout(total=0.3)
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(sim.url + CHAT, json=chat_body(max_tokens=1), timeout=short) as resp:
            await resp.read()
    await wait_until(in_flight(0))
    assert (await stats(http, sim))["max_in_flight"] == 1

    # Held requests are answered once the stall is switched off.
    pending = asyncio.ensure_future(http.post(sim.url + CHAT, json=chat_body(max_tokens=1)))
    await wait_until(in_flight(1))
    assert not pending.done()
    async with http.post(sim.url + "/sim/faults", json={"stall": False}) as resp:
        assert (await resp.json())["stall"] is False
    resp = await asyncio.wait_for(pending, 2)
    assert resp.status == 200
    resp.release()


async def test_client_disconnect_mid_stream_restores_counters(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start(ttft_ms=0, itl_ms=50)
    resp = await http.post(sim.url + CHAT, json=chat_body(max_tokens=200, stream=True))
    await resp.content.readline()  # the first chunk is out: the request is generating
    assert sim.engine.num_running == 1
    resp.close()

    async def idle() -> bool:
        s = await stats(http, sim)
        return s["in_flight"] == 0 and s["engine"]["running"] == 0 and s["engine"]["kv_usage"] == 0

    await wait_until(idle)


# ----------------------------------------------------------------------------- other endpoints


async def test_models_endpoint(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start(models=["m1", "m2"])
    async with http.get(sim.url + "/v1/models") as resp:
        assert resp.status == 200
        assert resp.headers["x-sim-pod"] == sim.pod_name
        body = await resp.json()
    assert body == {
        "object": "list",
        "data": [
            {"id": "m1", "object": "model", "created": 0, "owned_by": "vllm", "root": "m1", "parent": None},
            {"id": "m2", "object": "model", "created": 0, "owned_by": "vllm", "root": "m2", "parent": None},
        ],
    }
    # A request without "model" goes to the first served model, as in vLLM.
    async with http.post(sim.url + CHAT, json={"messages": [{"role": "user", "content": "hi"}]}) as resp:
        assert (await resp.json())["model"] == "m1"


async def test_health_and_unhealthy_switch(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start()
    sick = await start(unhealthy=True)

    async def health(server: SimServer) -> int:
        async with http.get(server.url + "/health") as resp:
            assert resp.headers["x-sim-pod"] == server.pod_name
            assert await resp.read() == b""
            return resp.status

    assert await health(sim) == 200
    assert await health(sick) == 503
    async with http.post(sim.url + "/sim/faults", json={"unhealthy": True}) as resp:
        assert resp.status == 200
    assert await health(sim) == 503
    async with http.post(sim.url + "/sim/faults", json={"unhealthy": False}) as resp:
        assert resp.status == 200
    assert await health(sim) == 200

    for bad in ({"unhealthy": "yes"}, {"explode": True}, [1]):
        async with http.post(sim.url + "/sim/faults", json=bad) as resp:
            assert resp.status == 400, bad


async def test_metrics_move_while_requests_run(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start(ttft_ms=20, itl_ms=30, kv_capacity_tokens=1000)
    before = await metrics(http, sim)
    assert sample(before, "vllm:num_requests_running") == 0
    assert sample(before, "vllm:gpu_cache_usage_perc") == 0

    prompt = "z" * 400  # 100 tokens each
    requests = [
        asyncio.ensure_future(http.post(sim.url + CHAT, json=chat_body(prompt, max_tokens=10))) for _ in range(3)
    ]

    async def running() -> bool:
        return sample(await metrics(http, sim), "vllm:num_requests_running") == 3

    await wait_until(running)
    await asyncio.sleep(0.1)  # a few tokens in
    during = await metrics(http, sim)
    assert sample(during, "vllm:num_requests_waiting") == 0
    assert 0.3 < sample(during, "vllm:gpu_cache_usage_perc") < 0.34  # 3 x (100 prompt + some output)
    assert sample(during, "vllm:kv_cache_usage_perc") == sample(during, "vllm:gpu_cache_usage_perc")
    assert sample(during, "vllm:prompt_tokens_total") == 300
    assert 0 < sample(during, "vllm:generation_tokens_total") < 30

    for resp in await asyncio.gather(*requests):
        assert resp.status == 200
        resp.release()
    after = await metrics(http, sim)
    assert sample(after, "vllm:num_requests_running") == 0
    assert sample(after, "vllm:gpu_cache_usage_perc") == 0
    assert sample(after, "vllm:generation_tokens_total") == 30
    assert sample(after, "vllm:request_success_total", finished_reason="length") == 3
    assert sample(after, "vllm:time_to_first_token_seconds_count") == 3
    assert sample(after, "vllm:time_to_first_token_seconds_sum") >= 3 * 0.019


async def test_max_num_seqs_makes_requests_wait(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start(ttft_ms=10, itl_ms=20, max_num_seqs=1)
    requests = [asyncio.ensure_future(http.post(sim.url + CHAT, json=chat_body(max_tokens=5))) for _ in range(2)]

    async def one_waiting() -> bool:
        scrape = await metrics(http, sim)
        return sample(scrape, "vllm:num_requests_running") == 1 and sample(scrape, "vllm:num_requests_waiting") == 1

    await wait_until(one_waiting)
    for resp in await asyncio.gather(*requests):
        assert resp.status == 200
        resp.release()
    after = await metrics(http, sim)
    assert sample(after, "vllm:num_requests_waiting") == 0
    # The second request queued behind the first, so its TTFT includes the first's whole run.
    assert sample(after, "vllm:time_to_first_token_seconds_sum") >= 0.010 + (0.010 + 0.010 + 4 * 0.020)


async def test_stats_count_requests_by_path(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start(ttft_ms=0, itl_ms=0)
    for path in ("/health", "/health", "/v1/models", "/no/such/path"):
        async with http.get(sim.url + path) as resp:
            assert resp.headers["x-sim-pod"] == sim.pod_name
    async with http.post(sim.url + CHAT, json=chat_body(max_tokens=1)) as resp:
        assert resp.status == 200
    body = await stats(http, sim)
    assert body["requests_by_path"] == {"/health": 2, "/v1/models": 1, "<unmatched>": 1, CHAT: 1}
    assert body["total_requests"] == 5
    assert body["completions_answered"] == 1


async def test_die_after_in_process_stops_serving(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start(ttft_ms=0, itl_ms=0, die_after=1)
    async with http.post(sim.url + CHAT, json=chat_body(max_tokens=1)) as resp:
        assert resp.status == 200
        assert (await resp.json())["usage"]["completion_tokens"] == 1
    await asyncio.wait_for(sim.died.wait(), 2)
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(sim.url + "/health") as resp:
            await resp.read()


def test_latency_jitter_is_seeded_and_bounded() -> None:
    config = EngineConfig(ttft_s=0.1, itl_s=0.01, jitter=0.5, seed=7)
    seq = Sequence("m", prompt_tokens=1, output_tokens=1)

    def draws(engine: Engine) -> list[float]:
        return [engine.ttft_s(seq), engine.itl_s(seq), engine.itl_s(seq)]

    assert draws(Engine(config)) == draws(Engine(config))  # same seed, same delays
    engine = Engine(config)
    delays = [engine.ttft_s(seq) for _ in range(200)]
    assert all(0.05 <= d <= 0.15 for d in delays)
    assert len(set(delays)) > 100  # really jittered
    assert Engine(EngineConfig(ttft_s=0.1)).ttft_s(seq) == 0.1  # no jitter by default


# ----------------------------------------------------------------------------- process and CLI


@contextlib.contextmanager
def sim_process(*args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Run `python -m simulator` on a free port; yield it and its URL once it listens."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc_router.simulator", "--port", "0", *args],
        cwd=REPO_ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            match = re.search(r"listening on (http://\S+)", line)
            if match:
                yield proc, match.group(1)
                break
        else:
            raise AssertionError(f"simulator did not start (exit code {proc.wait()})")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()


async def wait_exit(proc: subprocess.Popen[str]) -> int:
    return await asyncio.get_running_loop().run_in_executor(None, proc.wait, 10)


async def test_die_after_exits_process_with_code_3(http: aiohttp.ClientSession) -> None:
    with sim_process("--die-after", "2", "--ttft-ms", "0", "--itl-ms", "0") as (proc, url):
        for _ in range(2):
            async with http.post(url + CHAT, json=chat_body(max_tokens=2)) as resp:
                assert resp.status == 200
                assert (await resp.json())["usage"]["completion_tokens"] == 2
        assert await wait_exit(proc) == 3
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.post(url + CHAT, json=chat_body(max_tokens=1)) as resp:
                await resp.read()


async def test_sigterm_exits_cleanly(http: aiohttp.ClientSession) -> None:
    with sim_process("--model", "a,b", "--model", "c", "--pod-name", "p1") as (proc, url):
        async with http.get(url + "/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["a", "b", "c"]
            assert resp.headers["x-sim-pod"] == "p1"
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0


def test_cli_help_through_register() -> None:
    code = (
        "import argparse\n"
        "from extproc_router.simulator.cli import register, run\n"
        "parser = argparse.ArgumentParser(prog='extproc-router')\n"
        "register(parser.add_subparsers(dest='command'))\n"
        "args = parser.parse_args(['sim', '--port', '0', '--model', 'a,b'])\n"
        "assert args.func is run, args\n"
        "parser.parse_args(['sim', '--help'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    for option in ("--ttft-ms", "--itl-ms", "--output-tokens", "--fail-every", "--stall", "--die-after"):
        assert option in done.stdout
    assert "usage: extproc-router sim" in done.stdout
