"""The simulator's ``model`` timing: tokenizer API, KV cache with prefix caching, continuous batching.

Small caches and fast rates keep every test well under a second; timing assertions compare
figures that differ by several times, because the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import time
from typing import Any

import aiohttp
import bpe_openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc_router.argtypes import HelpFormatter
from extproc_router.simulator.batching import BatchingEngine, KVSequence
from extproc_router.simulator.cli import add_arguments, config_from_args
from extproc_router.simulator.config import EngineConfig
from extproc_router.simulator.kv_cache import KVCache
from extproc_router.simulator.server import SimServer
from extproc_router.simulator.tokenizer import block_hashes, render_prompt, tokenize
from tests.unit.extproc_router.simulator.conftest import BLOCK, CHAT, COMPLETIONS, StartSim, stats, wait_until

WAIT_S = 3.0
"""Seconds `wait_until` allows in this module's tests."""


def words(n: int, seed: int) -> str:
    """``n`` pseudo-random words: distinct seeds give prompts that share no prefix."""
    rng = random.Random(seed)
    vocab = ["alpha", "beta", "gamma", "delta", "router", "cache", "prefix", "block", "token", "pod", "the", "of"]
    return " ".join(rng.choice(vocab) for _ in range(n))


async def complete(http: aiohttp.ClientSession, sim: SimServer, prompt: str, max_tokens: int = 1) -> dict[str, Any]:
    """A /v1/completions request; returns the body plus ``elapsed`` seconds."""
    t0 = time.perf_counter()
    async with http.post(sim.url + COMPLETIONS, json={"prompt": prompt, "max_tokens": max_tokens}) as resp:
        body = await resp.json()
        assert resp.status == 200, body
    body["elapsed"] = time.perf_counter() - t0
    return body


async def chat(http: aiohttp.ClientSession, sim: SimServer, body: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    async with http.post(sim.url + CHAT, json=body) as resp:
        result = await resp.json()
        assert resp.status == 200, result
    result["elapsed"] = time.perf_counter() - t0
    return result


def cached(body: dict[str, Any]) -> int:
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


async def stream_times(http: aiohttp.ClientSession, sim: SimServer, prompt: str, max_tokens: int) -> list[float]:
    """Arrival times (perf_counter) of the token chunks of a streamed completion."""
    times = []
    request = {"prompt": prompt, "max_tokens": max_tokens, "stream": True}
    async with http.post(sim.url + COMPLETIONS, json=request) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if line.startswith(b"data: {"):
                chunk = orjson.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["finish_reason"] is None:
                    times.append(time.perf_counter())
    return times


async def engine_stats(http: aiohttp.ClientSession, sim: SimServer) -> dict[str, Any]:
    return (await stats(http, sim))["engine"]


async def scrape(http: aiohttp.ClientSession, sim: SimServer) -> dict[str, float]:
    """/metrics as {sample name: value} for the single model ``sim-model``."""
    async with http.get(sim.url + "/metrics") as resp:
        text = await resp.text()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels.get("le")
    }


# ----------------------------------------------------------------------------- tokenizer API


def test_render_prompt_chat_and_completions() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": None},
        ]
    }
    assert render_prompt("chat", body) == "<|system|>\nBe brief.\n<|user|>\na\nb\n<|assistant|>\n\n"
    assert render_prompt("completions", {"prompt": "x y"}) == "x y"
    assert render_prompt("completions", {"prompt": ["x", "y"]}) == "x\ny"
    with pytest.raises(ValueError):
        render_prompt("completions", {"prompt": [1, 2, 3]})
    with pytest.raises(ValueError):
        render_prompt("embeddings", body)


def test_tokenize_kinds() -> None:
    assert tokenize("hello world") == [15339, 1917]  # cl100k, as tiktoken gives
    assert tokenize("<|endoftext|>") == tokenize("<|endoftext|>")  # special-token text is plain text
    assert tokenize("hé", "bytes") == [104, 195, 169]
    with pytest.raises(ValueError):
        tokenize("x", "gpt2")


def test_cl100k_pieces_match_whole_text_encoding() -> None:
    """Long texts are encoded in cached pieces; the ids must equal encoding the text at once."""
    encoding = bpe_openai.get_encoding("cl100k_base")
    rng = random.Random(3)
    atoms = ["the", "naïve", "日本語", "123", "4567", " ", "  ", "\n", "\n\n", " \n", "\t", "?", "!\n", "'s", "don't",
             "x²", "e\u0301", "\r\n", "🙂", "http://a.b/c?d=e", ".\n", "<|endoftext|>"]  # fmt: skip
    for _ in range(20):
        text = "".join(
            rng.choice(atoms) + (" " if rng.random() < 0.6 else "") for _ in range(rng.randrange(2000, 9000))
        )
        assert tokenize(text) == encoding.encode_ordinary(text)
    # A shared prefix is served from the piece cache and still yields exact ids.
    prefix = words(3000, seed=1) + "\n"
    for seed in (2, 3):
        text = prefix + words(500, seed)
        assert tokenize(text) == encoding.encode_ordinary(text)


def test_block_hashes_are_chained_and_deterministic() -> None:
    tokens = list(range(100, 170))  # 4 full blocks of 16 and 6 tokens left over
    hashes = block_hashes(tokens, BLOCK)
    assert len(hashes) == 4  # the partial block is not hashed
    assert hashes == block_hashes(list(tokens), BLOCK)
    assert len(set(hashes)) == 4

    changed_first = block_hashes([0, *tokens[1:]], BLOCK)
    assert all(a != b for a, b in zip(hashes, changed_first, strict=True))  # block 0 changes every hash
    changed_third = list(tokens)
    changed_third[2 * BLOCK] += 1
    assert block_hashes(changed_third, BLOCK)[:2] == hashes[:2]
    assert all(a != b for a, b in zip(hashes[2:], block_hashes(changed_third, BLOCK)[2:], strict=True))
    # The same block content at another position (different parent) hashes differently.
    repeated = block_hashes(tokens[:BLOCK] * 2, BLOCK)
    assert repeated[0] == hashes[0] and repeated[1] != repeated[0]

    assert block_hashes(tokens[:15], BLOCK) == []
    with pytest.raises(ValueError):
        block_hashes([-1] * BLOCK, BLOCK)


def test_follow_up_turn_extends_previous_turn_tokens() -> None:
    turn1 = {"messages": [{"role": "system", "content": "You help."}, {"role": "user", "content": words(50, 1)}]}
    turn2 = {
        "messages": [
            *turn1["messages"],
            {"role": "assistant", "content": "Sure."},
            {"role": "user", "content": "More?"},
        ]
    }
    t1, t2 = tokenize(render_prompt("chat", turn1)), tokenize(render_prompt("chat", turn2))
    assert t2[: len(t1)] == t1
    h1 = block_hashes(t1, BLOCK)
    assert block_hashes(t2, BLOCK)[: len(h1)] == h1


# ----------------------------------------------------------------------------- KV cache bookkeeping


def test_kv_cache_lru_and_pinned_blocks() -> None:
    cache = KVCache(num_blocks=6, block_size=BLOCK)
    pinned = cache.allocate(2)
    cache.register(pinned[0], 11)
    cache.register(pinned[1], 12)
    done = cache.allocate(3)
    for block, h in zip(done, (21, 22, 23), strict=True):
        cache.register(block, h)
    cache.release(done)  # freed tail first: 23 is evicted before 22 before 21
    assert cache.num_used == 2 and cache.num_free == 4 and cache.usage == pytest.approx(2 / 6)

    cache.allocate(2)  # the empty block, then the least recently freed cached one (23)
    assert not cache.is_cached(23) and cache.is_cached(22) and cache.is_cached(21)
    assert cache.lookup([21, 22, 23], max_blocks=3) == done[:2]
    assert not cache.can_allocate(3)  # only 21 and 22 are free; pinned blocks are never taken
    assert cache.can_allocate(1, reused=cache.lookup([21], 1)) and not cache.can_allocate(2, reused=[done[0]])
    cache.allocate(2)
    assert cache.num_free == 0
    assert cache.lookup([11, 12], max_blocks=2) == pinned  # still cached after the cache filled up
    with pytest.raises(RuntimeError):
        cache.allocate(1)

    cache.reset()
    assert cache.num_cached == 0 and cache.lookup([11], 1) == [] and cache.num_used == 6


# ----------------------------------------------------------------------------- HTTP behaviour


async def test_repeated_prompt_is_faster_to_first_token(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start(tokenizer="cl100k", prefill_tokens_per_s=15000.0, kv_capacity_tokens=16384)
    first = {"messages": [{"role": "user", "content": words(3000, seed=1)}], "max_tokens": 1}
    other = {"messages": [{"role": "user", "content": words(3000, seed=2)}], "max_tokens": 1}
    n_tokens = len(tokenize(render_prompt("chat", first)))

    fresh = await chat(http, sim, first)
    repeated = await chat(http, sim, first)
    fresh_other = await chat(http, sim, other)

    assert fresh["usage"]["prompt_tokens"] == n_tokens
    assert cached(fresh) == 0 and cached(fresh_other) == 0
    assert cached(repeated) == (n_tokens - 1) // BLOCK * BLOCK  # block-aligned, last token recomputed
    assert fresh["elapsed"] > n_tokens / 15000.0 * 0.9  # the whole prompt was prefilled
    assert repeated["elapsed"] < fresh["elapsed"] / 3 and repeated["elapsed"] < fresh_other["elapsed"] / 3


async def test_multi_turn_follow_up_reuses_previous_turn(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start(tokenizer="cl100k")
    turn1 = {
        "messages": [{"role": "system", "content": words(300, 7)}, {"role": "user", "content": words(80, 8)}],
        "max_tokens": 4,
    }
    reply = (await chat(http, sim, turn1))["choices"][0]["message"]["content"]
    turn2 = {
        **turn1,
        "messages": [*turn1["messages"], {"role": "assistant", "content": reply}, {"role": "user", "content": "Why?"}],
    }
    second = await chat(http, sim, turn2)
    turn1_tokens = len(tokenize(render_prompt("chat", turn1)))
    assert cached(second) == turn1_tokens // BLOCK * BLOCK
    assert second["usage"]["prompt_tokens"] == len(tokenize(render_prompt("chat", turn2)))


async def test_capacity_eviction_drops_the_oldest_prefix(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start(kv_capacity_tokens=512)  # 32 blocks; each prompt below caches 12
    prompts = [words(40, seed)[:200] for seed in range(6)]
    for prompt in prompts:
        assert cached(await complete(http, sim, prompt)) == 0
    assert (await engine_stats(http, sim))["evictions"] > 0
    assert cached(await complete(http, sim, prompts[-1])) == 192  # the newest is still cached
    assert cached(await complete(http, sim, prompts[0])) == 0  # the oldest is gone


async def test_running_sequences_pin_their_blocks(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start(kv_capacity_tokens=512, decode_step_ms=5.0)  # 32 blocks
    long_prompt = words(40, 100)[:200]
    running = asyncio.ensure_future(complete(http, sim, long_prompt, max_tokens=100))  # ~0.5 s, 19 blocks

    async def is_running() -> bool:
        return (await engine_stats(http, sim))["running"] == 1

    await wait_until(is_running, WAIT_S)
    # Churn the 13 blocks left: every one of them is overwritten, more than once.
    for seed in range(6):
        await complete(http, sim, words(30, seed)[:100])
    assert (await engine_stats(http, sim))["evictions"] >= 13
    assert not running.done()
    assert cached(await complete(http, sim, long_prompt)) == 192  # the running prompt's blocks survived
    assert cached(await running) == 0


async def test_admission_waits_for_free_blocks(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start(kv_capacity_tokens=512, decode_step_ms=5.0)  # 32 blocks
    first = asyncio.ensure_future(complete(http, sim, words(80, 1)[:400], max_tokens=40))  # 25 -> 28 blocks, ~0.2 s

    async def first_running() -> bool:
        return (await engine_stats(http, sim))["running"] == 1

    await wait_until(first_running, WAIT_S)
    t0 = time.perf_counter()
    second = asyncio.ensure_future(complete(http, sim, words(60, 2)[:300]))  # needs 19 blocks: waits

    async def second_waiting() -> bool:
        metrics = await scrape(http, sim)
        return metrics["vllm:num_requests_waiting"] == 1 and metrics["vllm:num_requests_running"] == 1

    await wait_until(second_waiting, WAIT_S)
    assert not first.done()
    await first
    done_first = time.perf_counter()
    await second
    assert time.perf_counter() > done_first  # it ran only once the first had freed its blocks
    assert time.perf_counter() - t0 > 0.05
    metrics = await scrape(http, sim)
    assert metrics["vllm:num_requests_waiting"] == 0 and metrics["vllm:gpu_cache_usage_perc"] == 0


async def test_long_prefill_slows_concurrent_decodes(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start(decode_step_ms=10.0, max_num_batched_tokens=0)  # no chunking: one long step

    alone = await stream_times(http, sim, "a short prompt", max_tokens=30)
    gaps_alone = [b - a for a, b in itertools.pairwise(alone)]

    streaming = asyncio.ensure_future(stream_times(http, sim, "another short prompt", max_tokens=30))
    await asyncio.sleep(0.08)  # a few tokens in
    long_prefill = await complete(http, sim, words(1500, 5)[:6000])  # 6000 tokens = 0.3 s of prefill
    gaps_with = [b - a for a, b in itertools.pairwise(await streaming)]

    assert long_prefill["elapsed"] > 0.28
    assert max(gaps_alone) < 0.15  # ~10 ms steps
    assert max(gaps_with) > 0.28  # the step carrying the prefill held every running stream's next token


async def test_metrics_move(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start(kv_capacity_tokens=1024, decode_step_ms=5.0)  # 64 blocks
    before = await scrape(http, sim)
    assert before["vllm:prefix_cache_queries_total"] == 0 and before["vllm:prefix_cache_hits_total"] == 0
    assert before["vllm:gpu_cache_usage_perc"] == 0

    prompt = words(40, 1)[:160]  # 160 tokens = 10 blocks
    running = asyncio.ensure_future(complete(http, sim, prompt, max_tokens=60))  # grows to 14 blocks

    async def using_cache() -> bool:
        return (await scrape(http, sim))["vllm:gpu_cache_usage_perc"] > 0

    await wait_until(using_cache, WAIT_S)
    during = await scrape(http, sim)
    assert 10 / 64 <= during["vllm:gpu_cache_usage_perc"] <= 14 / 64
    assert during["vllm:num_requests_running"] == 1
    await running

    await complete(http, sim, prompt)
    after = await scrape(http, sim)
    assert after["vllm:prefix_cache_queries_total"] == 2 * 160
    assert after["vllm:prefix_cache_hits_total"] == 144  # (160 - 1) // 16 blocks of the repeat
    assert after["vllm:gpu_cache_usage_perc"] == 0  # cached blocks are free (evictable), not used
    assert after["vllm:time_to_first_token_seconds_count"] == 2
    assert after["vllm:prompt_tokens_total"] == 320


async def test_reset_empties_the_cache_and_counters(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start()
    prompt = words(30, 1)[:100]
    await complete(http, sim, prompt)
    assert cached(await complete(http, sim, prompt)) == 96

    async with http.post(sim.url + "/sim/reset") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["engine"]["blocks_cached"] == 0 and body["engine"]["prefix_cache_queries"] == 0
    assert body["completions_answered"] == 0
    metrics = await scrape(http, sim)
    assert metrics["vllm:prefix_cache_queries_total"] == 0 and metrics["vllm:prompt_tokens_total"] == 0
    assert metrics["vllm:time_to_first_token_seconds_count"] == 0

    assert cached(await complete(http, sim, prompt)) == 0  # cold again
    assert (await scrape(http, sim))["vllm:prefix_cache_queries_total"] == 100


async def test_too_long_for_the_cache_is_rejected(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start(kv_capacity_tokens=256)
    async with http.post(sim.url + COMPLETIONS, json={"prompt": "x" * 250, "max_tokens": 10}) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["code"] == "context_length_exceeded" and "256" in error["message"]
    # Token-id prompts are used as they are.
    async with http.post(sim.url + COMPLETIONS, json={"prompt": list(range(40)), "max_tokens": 1}) as resp:
        assert (await resp.json())["usage"]["prompt_tokens"] == 40
    async with http.post(sim.url + COMPLETIONS, json={"prompt": [-1, 2], "max_tokens": 1}) as resp:
        assert resp.status == 400


# ----------------------------------------------------------------------------- engine hooks and scheduling


def model_config(**overrides: Any) -> EngineConfig:
    base = {
        "timing": "model",
        "block_size": BLOCK,
        "decode_step_s": 0.002,
        "decode_s_per_seq": 0.0,
        "prefill_tokens_per_s": 20000.0,
        "kv_capacity_tokens": 4096,
    }
    return EngineConfig(**{**base, **overrides})


def sequence(tokens: list[int], output_tokens: int, **kw: Any) -> KVSequence:
    return KVSequence("m", len(tokens), block_hashes(tokens, BLOCK), output_tokens, **kw)


async def run(engine: BatchingEngine, seq: KVSequence) -> list[float]:
    """Serve ``seq`` to the end; the loop time of each token."""
    loop = asyncio.get_running_loop()
    times = []
    async with engine.admit(seq):
        while not seq.finished:
            await engine.next_token(seq)
            times.append(loop.time())
    return times


async def test_chunked_prefill_spreads_a_long_prompt_over_steps() -> None:
    for budget, steps in ((1000, 4), (0, 1)):
        engine = BatchingEngine(model_config(max_num_batched_tokens=budget))
        try:
            await run(engine, sequence(list(range(4000)), output_tokens=1))
            assert engine.steps == steps
            assert engine.step_time_model_s == pytest.approx(steps * 0.002 + 4000 / 20000.0)
        finally:
            await engine.aclose()


async def test_kv_transfer_admission_skips_the_prefill() -> None:
    engine = BatchingEngine(model_config(decode_step_s=0.005, kv_transfer_s_per_1k_tokens=0.010))
    loop = asyncio.get_running_loop()
    try:
        t0 = loop.time()
        decoding = asyncio.ensure_future(run(engine, sequence([1] * 10, output_tokens=20)))
        await asyncio.sleep(0.03)
        transferred = sequence(list(range(3000)), output_tokens=3, kv_transferred=True)
        t1 = loop.time()
        times = await run(engine, transferred)
        # 3000 tokens arrive in ~30 ms, then one 1-token step: far below the 150 ms prefill.
        assert 0.025 < times[0] - t1 < 0.1
        assert transferred.cached_tokens == 0 and len(times) == 3
        gaps = [b - a for a, b in itertools.pairwise(await decoding)]
        assert max(gaps) < 0.06  # no 150 ms prefill step slowed the other stream
        assert loop.time() - t0 < 1.0
        # The transferred prompt's blocks are now cached locally like any computed prompt.
        local = sequence(list(range(3000)), output_tokens=1)
        await run(engine, local)
        assert local.cached_tokens == (3000 - 1) // BLOCK * BLOCK
    finally:
        await engine.aclose()


async def test_prefill_only_sequence_ends_after_first_token() -> None:
    engine = BatchingEngine(model_config())
    try:
        seq = sequence(list(range(100)), output_tokens=50, prefill_only=True)
        assert len(await run(engine, seq)) == 1
        assert engine.cache.num_used == 0 and engine.cache.num_cached == 100 // BLOCK
    finally:
        await engine.aclose()


async def test_preemption_when_decodes_outgrow_the_cache() -> None:
    engine = BatchingEngine(model_config(kv_capacity_tokens=32, block_size=4))  # 8 blocks of 4
    try:
        a = KVSequence("m", 8, block_hashes(list(range(8)), 4), 16)
        b = KVSequence("m", 8, block_hashes(list(range(50, 58)), 4), 16)
        results = await asyncio.gather(run(engine, a), run(engine, b))
        assert [len(r) for r in results] == [16, 16]  # both complete despite needing 48 tokens of 32
        assert engine.preemptions >= 1
        assert engine.cache.num_used == 0
    finally:
        await engine.aclose()


async def test_client_gone_while_waiting_frees_everything() -> None:
    engine = BatchingEngine(model_config(kv_capacity_tokens=64, decode_step_s=0.005))
    try:
        hog = asyncio.ensure_future(run(engine, sequence(list(range(48)), output_tokens=10)))
        await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(run(engine, sequence(list(range(100, 140)), output_tokens=5)))
        await asyncio.sleep(0.01)
        assert engine.num_waiting == 1
        queued.cancel()
        await asyncio.sleep(0)
        assert engine.num_waiting == 0
        await hog
        assert engine.num_running == 0 and engine.cache.num_used == 0
    finally:
        await engine.aclose()


# ----------------------------------------------------------------------------- CLI


def test_cli_model_timing_flags() -> None:
    # One line per option in --help.
    parser = argparse.ArgumentParser(
        prog="sim", formatter_class=lambda prog: HelpFormatter(prog, max_help_position=200, width=1000)
    )
    add_arguments(parser)
    help_lines = parser.format_help().splitlines()
    for option, default in [
        ("--timing", "fixed"),
        ("--tokenizer", "cl100k"),
        ("--block-size", "16"),
        ("--kv-capacity-tokens", "65536"),
        ("--max-num-batched-tokens", "8192"),
        ("--prefill-tokens-per-s", "12000.0"),
        ("--decode-step-ms", "8.0"),
        ("--decode-ms-per-seq", "0.08"),
        ("--kv-transfer-ms-per-1k-tokens", "3.0"),
    ]:
        [line] = [line for line in help_lines if line.startswith(f"  {option} ")]
        assert line.endswith(f"(default: {default})"), line
    assert any(line.startswith("  --no-prefix-caching ") for line in help_lines)

    args = parser.parse_args(["--timing", "model", "--tokenizer", "bytes", "--block-size", "32", "--no-prefix-caching"])
    engine_config = config_from_args(args).engine_config()
    assert engine_config.timing == "model" and engine_config.block_size == 32 and not engine_config.prefix_caching
    assert engine_config.decode_step_s == pytest.approx(0.008) and engine_config.decode_s_per_seq == pytest.approx(8e-5)
    assert config_from_args(parser.parse_args([])).timing == "fixed"
    with pytest.raises(SystemExit):
        parser.parse_args(["--prefill-tokens-per-s", "0"])
