"""LoRA adapters end to end: real Envoy, the real router process, simulated vLLM pods serving adapters.

Pods 0 and 1 of demo-model load `sql-lora` at start (`--lora-modules`), pod 2 none; every pod has
LoRA enabled. The router learns the adapters from the pods' /v1/models (polled every 0.3 s here)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator

import aiohttp
import orjson
import pytest

from extproc_router.stack import LocalStack
from tests.conftest import running_stack

MODEL = "demo-model"
POLL_S = 0.3


@pytest.fixture(scope="module")
def lora_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    sql = ["--lora-modules", "sql-lora=/adapters/sql"]
    with running_stack(tmp_path_factory.mktemp("lora"), pods=3, ttft_ms=2.0, itl_ms=1.0, health_interval=0.2,
                       sim_args=["--enable-lora"], pod_args={0: sql, 1: sql},
                       router_env={"EXTPROC_ROUTER_ADAPTERS_INTERVAL": str(POLL_S)}) as s:
        yield s


async def ask(s: aiohttp.ClientSession, stack: LocalStack, model: str, text: str = "Hello!",
              strategy: str | None = None) -> tuple[int, str, dict]:
    headers = {"routing-strategy": strategy} if strategy else {}
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 2}
    async with s.post(stack.url + "/v1/chat/completions", json=body, headers=headers) as resp:
        return resp.status, resp.headers.get("x-sim-pod", ""), orjson.loads(await resp.read())


async def pods_serving(s: aiohttp.ClientSession, stack: LocalStack, model: str, n: int = 30,
                       strategy: str | None = None) -> Counter[str]:
    results = await asyncio.gather(*(ask(s, stack, model, f"question {i}", strategy) for i in range(n)))
    assert all(status == 200 for status, _, _ in results), results
    assert all(body["model"] == model for _, _, body in results)
    return Counter(pod for _, pod, _ in results)


async def test_adapter_requests_reach_only_the_pods_serving_it(lora_stack: LocalStack) -> None:
    async with aiohttp.ClientSession() as s:
        for strategy in (None, "least-request", "prefix-cache"):
            assert set(await pods_serving(s, lora_stack, "sql-lora", strategy=strategy)) == {
                f"{MODEL}-0", f"{MODEL}-1"}, strategy
        # The base model still spreads over every pod.
        assert set(await pods_serving(s, lora_stack, MODEL)) == {f"{MODEL}-0", f"{MODEL}-1", f"{MODEL}-2"}


async def test_an_unserved_adapter_is_a_404_naming_it(lora_stack: LocalStack) -> None:
    async with aiohttp.ClientSession() as s:
        status, pod, body = await ask(s, lora_stack, "nobody-lora")
    assert status == 404 and not pod
    assert "`nobody-lora`" in body["error"]["message"] and body["error"]["code"] == "model_not_found"


async def test_models_list_names_the_adapters(lora_stack: LocalStack) -> None:
    async with aiohttp.ClientSession() as s, s.get(lora_stack.url + "/v1/models") as resp:
        assert resp.status == 200
        data = (await resp.json())["data"]
    assert {"id": "sql-lora", "object": "model", "created": 0, "owned_by": "extproc-router",
            "parent": MODEL} in data
    assert MODEL in [m["id"] for m in data]


async def test_an_adapter_loaded_at_run_time_is_picked_up(lora_stack: LocalStack) -> None:
    pod2 = next(p for p in lora_stack.pods if p.name == f"{MODEL}-2")
    pod1 = next(p for p in lora_stack.pods if p.name == f"{MODEL}-1")
    async with aiohttp.ClientSession() as s:
        assert (await ask(s, lora_stack, "chat-lora"))[0] == 404
        async with s.post(f"http://127.0.0.1:{pod2.port}/v1/load_lora_adapter",
                          json={"lora_name": "chat-lora", "lora_path": "/adapters/chat"}) as resp:
            assert resp.status == 200, await resp.text()
        loaded = time.monotonic()
        while (await ask(s, lora_stack, "chat-lora"))[0] != 200:
            assert time.monotonic() - loaded < POLL_S + 1.5, "chat-lora not routable within the poll interval"
            await asyncio.sleep(0.05)
        assert set(await pods_serving(s, lora_stack, "chat-lora")) == {f"{MODEL}-2"}
        # Unloaded from pod 1: sql-lora requests stop going there at the next listing.
        async with s.post(f"http://127.0.0.1:{pod1.port}/v1/unload_lora_adapter",
                          json={"lora_name": "sql-lora"}) as resp:
            assert resp.status == 200, await resp.text()
        await asyncio.sleep(POLL_S * 2 + 0.3)
        assert set(await pods_serving(s, lora_stack, "sql-lora")) == {f"{MODEL}-0"}
        async with s.post(f"http://127.0.0.1:{pod1.port}/v1/load_lora_adapter",
                          json={"lora_name": "sql-lora", "lora_path": "/adapters/sql"}) as resp:
            assert resp.status == 200  # as it was, for the other tests of the module
