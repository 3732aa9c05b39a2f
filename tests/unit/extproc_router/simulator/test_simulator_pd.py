"""The simulator's prefill/decode roles: vLLM-style kv_transfer_params, KV holds and releases,
SGLang bootstrap rooms, in-process pods talking to each other over HTTP.

Fast model settings (one token per byte, 20k prefill tokens/s, 2 ms steps) keep every test well
under a second; timing assertions compare figures several times apart (shared, noisy machine).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ext_proc.prefill import PrefillClient, vllm_prefill_body
from extproc_router.simulator.cli import add_arguments, config_from_args
from extproc_router.simulator.server import SimServer
from routing.pods import Pod
from tests.unit.extproc_router.simulator.conftest import BLOCK, CHAT, COMPLETIONS, StartSim, stats, wait_until


def prompt(n: int, seed: int = 0) -> str:
    """``n`` bytes (= tokens with the bytes tokenizer); distinct seeds share no first block."""
    head = f"<{seed:04d}>"
    return (head + "lorem ipsum dolor sit amet " * (n // 27 + 1))[:n]


def pod(sim: SimServer) -> Pod:
    """The router's view of a sim."""
    return Pod(name=sim.pod_name, address=f"127.0.0.1:{sim.port}", model="sim-model")


async def post(
    http: aiohttp.ClientSession, sim: SimServer, body: dict[str, Any], path: str = COMPLETIONS
) -> tuple[int, dict[str, Any], float]:
    """POST a JSON body; (status, JSON answer, seconds taken)."""
    t0 = time.perf_counter()
    async with http.post(sim.url + path, json=body) as resp:
        answer = await resp.json()
        return resp.status, answer, time.perf_counter() - t0


async def metric(http: aiohttp.ClientSession, sim: SimServer, name: str) -> float:
    """The sum of a metric's samples (a counter's ``_total`` sample, a gauge's value)."""
    async with http.get(sim.url + "/metrics") as resp:
        text = await resp.text()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (name, name + "_total"):
                total += sample.value
    return total


async def held_blocks(http: aiohttp.ClientSession, sim: SimServer) -> int:
    return (await stats(http, sim))["engine"]["held_blocks"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- vLLM style


async def test_prefill_pod_answers_with_transfer_params_and_holds_the_blocks(
    start: StartSim, http: aiohttp.ClientSession
) -> None:
    prefill = await start(role="prefill", pod_name="p0")
    body = vllm_prefill_body({"model": "sim-model", "prompt": prompt(1000), "max_tokens": 50, "stream": True})
    status, answer, _ = await post(http, prefill, body)
    assert status == 200, answer
    params = answer["kv_transfer_params"]
    assert params == {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_engine_id": "p0",
        "remote_block_ids": params["remote_block_ids"],
        "remote_host": "127.0.0.1",
        "remote_port": prefill.port,
        "tp_size": 1,
    }
    assert len(params["remote_block_ids"]) == 1000 // BLOCK  # full blocks only, as vLLM's NIXL connector
    assert answer["usage"]["completion_tokens"] == 1
    assert answer["choices"][0]["finish_reason"] == "length"
    # Every block of the prompt stays pinned, the partial last one included.
    engine = (await stats(http, prefill))["engine"]
    assert (engine["holds"], engine["held_blocks"]) == (1, -(-1000 // BLOCK))
    assert engine["blocks_used"] == engine["held_blocks"]
    assert await metric(http, prefill, "sim:kv_held_blocks") == -(-1000 // BLOCK)
    assert await metric(http, prefill, "sim:prefill_only_requests") == 1

    # The decode pod's notification ends the hold, once.
    release = {"block_ids": params["remote_block_ids"], "engine_id": "p0"}
    async with http.post(prefill.url + "/sim/kv/release", json=release) as resp:
        assert resp.status == 200 and (await resp.json())["released"] is True
    assert (await stats(http, prefill))["engine"]["blocks_used"] == 0
    async with http.post(prefill.url + "/sim/kv/release", json=release) as resp:
        assert resp.status == 404 and (await resp.json())["released"] is False
    assert await metric(http, prefill, "sim:kv_transfers_out") == 1

    # A prompt shorter than a block has nothing to transfer: no block ids, nothing held.
    status, answer, _ = await post(http, prefill, vllm_prefill_body({"prompt": "tiny", "max_tokens": 5}))
    assert status == 200 and answer["kv_transfer_params"]["remote_block_ids"] == []
    assert await held_blocks(http, prefill) == 0


async def test_unfetched_hold_expires(start: StartSim, http: aiohttp.ClientSession) -> None:
    prefill = await start(role="prefill", kv_hold_seconds=0.2)
    status, _, _ = await post(http, prefill, vllm_prefill_body({"prompt": prompt(500), "max_tokens": 1}))
    assert status == 200 and await held_blocks(http, prefill) > 0

    async def expired() -> bool:
        return await held_blocks(http, prefill) == 0

    await wait_until(expired)
    assert await metric(http, prefill, "sim:kv_holds_expired") == 1
    assert await metric(http, prefill, "sim:kv_transfers_out") == 0


async def test_decode_with_transfer_params_skips_the_prefill(start: StartSim, http: aiohttp.ClientSession) -> None:
    prefill = await start(role="prefill", pod_name="p0")
    decode = await start(role="decode", pod_name="d0")
    cold = await start(role="decode", pod_name="d1")
    n = 6000  # 300 ms of prefill, 18 ms of transfer
    client_body = {"model": "sim-model", "prompt": prompt(n), "max_tokens": 4}
    router = PrefillClient(timeout=5.0)
    try:
        # The router's own prefill call and decode body (ext_proc.prefill).
        decode_body = await router.vllm(pod(prefill), COMPLETIONS, client_body, {})
    finally:
        await router.close()
    assert decode_body["kv_transfer_params"]["remote_engine_id"] == "p0"
    assert await held_blocks(http, prefill) > 0

    status, answer, transferred_s = await post(http, decode, decode_body)
    assert status == 200, answer
    assert answer["usage"]["completion_tokens"] == 4
    # As vLLM counts num_cached_tokens: everything but the recomputed last prompt token.
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == n - 1
    assert "kv_transfer_params" not in answer

    # The same request without the params: a decode pod does its own prefill.
    status, answer, own_prefill_s = await post(http, cold, client_body)
    assert status == 200 and answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert own_prefill_s > 0.25
    assert transferred_s < own_prefill_s / 3, (transferred_s, own_prefill_s)

    # The decode pod released the prefill pod's hold once its KV had arrived.
    async def released() -> bool:
        return await held_blocks(http, prefill) == 0

    await wait_until(released)
    assert await metric(http, prefill, "sim:kv_transfers_out") == 1
    assert await metric(http, decode, "sim:kv_transfers_in") == 1
    assert await metric(http, decode, "sim:kv_transfer_tokens_in") == n - 1
    assert await metric(http, decode, "vllm:external_prefix_cache_hits") == n - 1
    assert await metric(http, decode, "vllm:prefix_cache_hits") == 0  # local hits only
    assert await metric(http, cold, "sim:kv_transfers_in") == 0
    assert (await stats(http, decode))["last_transfer_fields"]["kv_transfer_params"]["remote_engine_id"] == "p0"


async def test_streaming_decode_with_transfer_params(start: StartSim, http: aiohttp.ClientSession) -> None:
    prefill = await start(role="prefill")
    decode = await start(role="decode")
    body = {"messages": [{"role": "user", "content": prompt(4000)}], "max_tokens": 5}
    _, answer, _ = await post(http, prefill, vllm_prefill_body(body), CHAT)
    stream_body = {
        **body,
        "kv_transfer_params": answer["kv_transfer_params"],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first_token_s = None
    contents: list[str] = []
    usage: dict[str, Any] = {}
    async with http.post(decode.url + CHAT, json=stream_body) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = orjson.loads(line[6:])
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    first_token_s = first_token_s or time.perf_counter() - t0
                    contents.append(choice["delta"]["content"])
            usage = chunk.get("usage") or usage
    assert len(contents) == 5
    assert first_token_s is not None and first_token_s < 0.1  # the 200 ms prefill is skipped
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1

    async def released() -> bool:
        return await held_blocks(http, prefill) == 0

    await wait_until(released)


async def test_prefill_pod_batches_prefills_and_queues(start: StartSim, http: aiohttp.ClientSession) -> None:
    """A prefill pod's TTFT still grows with the uncached tokens queued ahead (one 8192-token budget per step)."""
    prefill = await start(role="prefill")
    bodies = [vllm_prefill_body({"prompt": prompt(6000, seed=i), "max_tokens": 1}) for i in range(3)]
    results = await asyncio.gather(*(post(http, prefill, b) for b in bodies))
    times = sorted(elapsed for _, _, elapsed in results)
    assert all(status == 200 for status, _, _ in results)
    # 18k tokens at 20k/s: the last answers ~0.9 s in, the first (6000 tokens in step one) at ~0.4 s.
    assert times[-1] > 0.7 and times[-1] > times[0] + 0.3


# ----------------------------------------------------------------------------- SGLang style


async def test_sglang_decode_waits_for_the_prefill_of_its_room(start: StartSim, http: aiohttp.ClientSession) -> None:
    prefill = await start(role="prefill", bootstrap_port=0)
    decode = await start(role="decode")
    assert prefill.bootstrap_port is not None and prefill.bootstrap_port != prefill.port
    n = 2000  # 100 ms of prefill
    fields = {"bootstrap_host": "127.0.0.1", "bootstrap_port": prefill.bootstrap_port, "bootstrap_room": 4242}
    body = {"prompt": prompt(n), "max_tokens": 3, **fields}

    decoding = asyncio.ensure_future(post(http, decode, body))
    await asyncio.sleep(0.15)  # the decode half arrives first and waits
    assert not decoding.done()
    status, answer, _ = await post(http, prefill, body)
    assert status == 200 and answer["usage"]["completion_tokens"] == 1  # the prefill half stops at one token
    assert "kv_transfer_params" not in answer
    status, answer, decode_s = await decoding
    assert status == 200, answer
    assert answer["usage"]["completion_tokens"] == 3
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == n - 1
    assert decode_s > 0.15 + 0.09  # waited for the prefill (100 ms of compute) after it arrived

    # The decode released the room and its KV on the prefill pod.
    async def released() -> bool:
        state = await stats(http, prefill)
        return state["rooms"] == 0 and state["engine"]["held_blocks"] == 0

    await wait_until(released)
    assert await metric(http, prefill, "sim:kv_transfers_out") == 1
    assert await metric(http, prefill, "sim:prefill_only_requests") == 1
    assert (await stats(http, decode))["last_transfer_fields"] == fields


async def test_sglang_through_the_router_prefill_client(start: StartSim, http: aiohttp.ClientSession) -> None:
    """The router's SGLang mode: bootstrap fields in both bodies, prefill fired concurrently, streaming decode."""
    prefill = await start(role="prefill", bootstrap_port=0)
    decode = await start(role="decode")
    router = PrefillClient(timeout=5.0)
    try:
        body = {"prompt": prompt(3000), "max_tokens": 4, "stream": True}
        decode_body = router.sglang(pod(prefill), prefill.bootstrap_port or 0, COMPLETIONS, body, {})
        tokens = 0
        async with http.post(decode.url + COMPLETIONS, json=decode_body) as resp:
            assert resp.status == 200
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    tokens += sum(1 for c in orjson.loads(line[6:])["choices"] if c["text"])
        assert tokens == 4
    finally:
        await router.close()
    assert await metric(http, decode, "sim:kv_transfers_in") == 1


async def test_sglang_room_on_the_http_port(start: StartSim, http: aiohttp.ClientSession) -> None:
    """Without a bootstrap listener, bootstrap_port may name the prefill pod's HTTP port."""
    prefill = await start(role="prefill")
    decode = await start(role="decode")
    assert prefill.bootstrap_port is None
    body = {"prompt": prompt(800), "max_tokens": 2, "bootstrap_host": "127.0.0.1", "bootstrap_port": prefill.port}
    body["bootstrap_room"] = 7
    results = await asyncio.gather(post(http, decode, body), post(http, prefill, body))
    assert [status for status, _, _ in results] == [200, 200]
    assert results[0][1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 799


async def test_sglang_missing_room_answers_503_after_the_timeout(start: StartSim, http: aiohttp.ClientSession) -> None:
    prefill = await start(role="prefill")
    decode = await start(role="decode", bootstrap_timeout_s=0.3)
    body = {"prompt": prompt(100), "max_tokens": 2, "bootstrap_host": "127.0.0.1", "bootstrap_room": 99}
    status, answer, elapsed = await post(http, decode, {**body, "bootstrap_port": prefill.port})
    assert status == 503 and answer["error"]["code"] == "bootstrap_timeout", answer
    assert 0.29 < elapsed < 1.5
    assert "room 99" in answer["error"]["message"]
    # Nobody listening there at all: the same, after the same bounded wait.
    status, answer, elapsed = await post(http, decode, {**body, "bootstrap_port": free_port()})
    assert status == 503 and 0.29 < elapsed < 1.5
    assert await metric(http, decode, "sim:bootstrap_timeouts") == 2
    assert (await stats(http, prefill))["rooms"] == 0  # the waiting lookups left nothing behind


# ----------------------------------------------------------------------------- roles, fixed timing, CLI


async def test_fixed_timing_roles(start: StartSim, http: aiohttp.ClientSession) -> None:
    """Fixed timing: a prefill pod answers after TTFT; a decode pod given params skips TTFT for the transfer."""
    fixed = {"timing": "fixed", "ttft_ms": 300.0, "itl_ms": 5.0}
    prefill = await start(role="prefill", **fixed)
    decode = await start(role="decode", **fixed)
    client_body = {"prompt": prompt(4000), "max_tokens": 3}
    status, answer, prefill_s = await post(http, prefill, vllm_prefill_body(client_body))
    assert status == 200 and prefill_s > 0.28
    params = answer["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and params["remote_block_ids"] == []  # no KV blocks in fixed timing
    status, answer, transferred_s = await post(http, decode, {**client_body, "kv_transfer_params": params})
    assert status == 200 and answer["usage"]["completion_tokens"] == 3
    assert transferred_s < 0.15  # ~1000 estimated tokens x 3 ms/1k + 3 x 5 ms
    status, _, own_s = await post(http, decode, client_body)
    assert status == 200 and own_s > 0.28


async def test_combined_pod_ignores_transfer_fields(start: StartSim, http: aiohttp.ClientSession) -> None:
    combined = await start()
    body = {**vllm_prefill_body({"prompt": prompt(300)}), "max_tokens": 4}
    status, answer, _ = await post(http, combined, body)
    assert status == 200 and answer["usage"]["completion_tokens"] == 4
    assert "kv_transfer_params" not in answer
    state = await stats(http, combined)
    assert state["role"] == "combined" and state["engine"]["holds"] == 0
    assert state["last_transfer_fields"]["kv_transfer_params"]["do_remote_decode"] is True


async def test_malformed_transfer_fields_are_rejected(start: StartSim, http: aiohttp.ClientSession) -> None:
    decode = await start(role="decode")
    status, answer, _ = await post(http, decode, {"prompt": "x", "kv_transfer_params": "yes"})
    assert status == 400 and answer["error"]["param"] == "kv_transfer_params"
    bad_ids = {"do_remote_prefill": True, "remote_block_ids": ["a"]}
    status, _, _ = await post(http, decode, {"prompt": "x", "kv_transfer_params": bad_ids})
    assert status == 400
    status, answer, _ = await post(http, decode, {"prompt": "x", "bootstrap_room": 1})
    assert status == 400 and "bootstrap_host" in answer["error"]["message"]


def test_cli_flags() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--role", "prefill"]))
    assert (config.role, config.bootstrap_port, config.kv_hold_seconds) == ("prefill", 8998, 30.0)
    assert config.engine_config().kv_hold_s == 30.0
    config = config_from_args(parser.parse_args(["--role", "prefill", "--bootstrap-port", "0"]))
    assert config.bootstrap_port is None
    config = config_from_args(
        parser.parse_args(["--role", "decode", "--bootstrap-timeout-s", "2.5", "--kv-hold-seconds", "5"])
    )
    assert (config.role, config.bootstrap_port, config.bootstrap_timeout_s) == ("decode", None, 2.5)
    assert config_from_args(parser.parse_args([])).role == "combined"
    with pytest.raises(SystemExit):
        parser.parse_args(["--role", "both"])
