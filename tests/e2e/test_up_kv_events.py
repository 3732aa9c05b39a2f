"""`extproc-router up --kv-events`: the local stack with precise prefix-cache routing. The model-timed
pods publish their KV-cache events, the pod file declares the ports and the router subscribes with
the pods' tokenizer, so a prompt one pod served behind the router's back is routed home by its
engine's own events, through Envoy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from extproc_router.cli import build_parser, main, up_options
from extproc_router.stack import LocalStack
from routing.strategies.prefix_cache import MATCH_HEADER
from tests.conftest import start_stack
from tests.unit.routing.prefix_cache_helpers import SYSTEM

pytestmark = pytest.mark.timeout(60)


def test_up_flags_choose_the_timing_and_the_kv_events() -> None:
    parse = build_parser().parse_args
    default = up_options(parse(["up"]))
    assert (default.timing, default.kv_events) == ("model", False)
    precise = up_options(parse(["up", "--kv-events"]))
    assert (precise.timing, precise.kv_events) == ("model", True)
    fixed = up_options(parse(["up", "--timing", "fixed", "--ttft-ms", "3"]))
    assert (fixed.timing, fixed.ttft_ms, fixed.kv_events) == ("fixed", 3.0, False)
    assert main(["up", "--timing", "fixed", "--kv-events"]) == 2  # fixed timing has no KV cache to report


async def _metrics(session: aiohttp.ClientSession, stack: LocalStack) -> dict[tuple[str, str], float]:
    """The router's samples that carry a pod label, by (sample name with its outcome, pod)."""
    async with session.get(stack.router_http + "/metrics") as resp:
        text = await resp.text()
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if "pod" in s.labels:
                name = s.name + (f"/{s.labels['outcome']}" if "outcome" in s.labels else "")
                out[(name, s.labels["pod"])] = s.value
    return out


async def _wait(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_a_prompt_served_by_one_pod_is_routed_to_it_by_its_kv_events(tmp_path: Path) -> None:
    stack: LocalStack = await asyncio.to_thread(start_stack, tmp_path, timing="model", kv_events=True,
                                                health_interval=0.2)
    try:
        declared = yaml.safe_load(stack.pod_file.read_text())["models"]["demo-model"]["pods"]
        assert all(p["kv_events_port"] and p["kv_events_replay_port"] for p in declared), declared
        names = [pod.name for pod in stack.pods]
        async with aiohttp.ClientSession() as s:
            async def all_precise() -> bool:
                m = await _metrics(s, stack)
                return all(m.get(("extproc_prefix_cache_precise_pod", n)) == 1 for n in names)

            await _wait(all_precise, "the router following every pod's KV events")

            bodies = {pod.name: {"model": "demo-model", "max_tokens": 2,
                                 "messages": [{"role": "system", "content": f"Case {i}. {SYSTEM}"},
                                              {"role": "user", "content": "Who has the right of way?"}]}
                      for i, pod in enumerate(stack.pods)}
            # Each pod serves its own prompt directly: the router never saw these requests, only
            # the engines' events can tell it where the prompts are cached.
            for pod in stack.pods:
                async with s.post(f"http://127.0.0.1:{pod.port}/v1/chat/completions", json=bodies[pod.name]) as resp:
                    assert resp.status == 200, await resp.text()
                    await resp.read()

            async def stored_everywhere() -> bool:
                m = await _metrics(s, stack)
                return all(m.get(("extproc_prefix_cache_precise_blocks", n), 0) > 0 for n in names)

            await _wait(stored_everywhere, "every pod's stored blocks in the router's index")
            applied = await _metrics(s, stack)
            for n in names:  # the start-up AllBlocksCleared batch, then at least the stored blocks
                assert applied[("extproc_kv_events_batches_total/applied", n)] >= 2, (n, applied)
                assert applied[("extproc_kv_events_events_total/applied", n)] >= 2, (n, applied)

            for pod in stack.pods:
                async with s.post(stack.url + "/v1/chat/completions", json=bodies[pod.name],
                                  headers={"routing-strategy": "prefix-cache"}) as resp:
                    assert resp.status == 200, await resp.text()
                    await resp.read()
                    assert resp.headers["target-pod"] == pod.name
                    match = resp.headers[MATCH_HEADER]
                    assert match.startswith("1.00;") and ";src=precise;" in match, match
    finally:
        await asyncio.to_thread(stack.stop)
