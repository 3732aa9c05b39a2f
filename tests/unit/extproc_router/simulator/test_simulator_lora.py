"""The simulator's LoRA adapters, as vLLM serves them.

What was checked against vLLM (read, not copied): `vllm/entrypoints/openai/serving_models.py` (a
`/v1/models` card per adapter with ``id`` the adapter name, ``root`` its path, ``parent`` the base
model, which is the load's ``base_model_name`` when that is a served model, else the first served
name; base cards have ``parent`` null; ``/v1/load_lora_adapter`` {lora_name, lora_path} answers
"Success: LoRA adapter '<name>' added successfully.", 400 "Both 'lora_name' and 'lora_path' must be
provided." or "The lora adapter '<name>' has already been loaded."; ``/v1/unload_lora_adapter``
{lora_name} answers "... removed successfully." or 404 "The lora adapter '<name>' cannot be found.");
`vllm/v1/metrics/loggers.py` (``vllm:lora_requests_info`` with labels ``max_lora``,
``waiting_lora_adapters``, ``running_lora_adapters`` -- comma-joined names -- set to the current time,
every label set ever seen staying exported); `--lora-modules` takes ``name=path`` or a JSON object
with ``name``, ``path`` and ``base_model_name``.
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc_router.discovery.pod_metrics import parse_metrics
from extproc_router.simulator import cli as sim_cli
from extproc_router.simulator.config import KVEventsConfig, LoraModule, parse_lora_modules
from extproc_router.simulator.server import SimServer
from extproc_router.simulator.tokenizer import block_hashes
from tests.unit.extproc_router.simulator.conftest import BLOCK, CHAT, COMPLETIONS, StartSim, wait_until
from tests.unit.extproc_router.simulator.test_simulator_kv_events import Subscriber, map_decoder

SQL = LoraModule("sql-lora", "/adapters/sql")


def parse_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sim_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_command_line_flags() -> None:
    cfg = sim_cli.config_from_args(parse_args(
        "--model", "base", "--lora-modules", "sql-lora=/adapters/sql",
        '{"name": "chat-lora", "path": "/adapters/chat", "base_model_name": "base"}',
        "--lora-modules", "third=/p", "--max-loras", "4"))
    assert cfg.lora_modules == [SQL, LoraModule("chat-lora", "/adapters/chat", "base"), LoraModule("third", "/p")]
    assert cfg.max_loras == 4 and not cfg.enable_lora  # --lora-modules implies it (the server checks both)
    assert sim_cli.config_from_args(parse_args("--enable-lora")).enable_lora
    assert sim_cli.config_from_args(parse_args()).lora_modules == []
    for bad, fragment in ((["no-path"], "name=path"), (["a=/x", "a=/y"], "given twice"), (["{not json"], "JSON"),
                          (['{"name": "a"}'], "non-empty"), (['{"name": "a", "path": "/p", "rank": 8}'], "object")):
        with pytest.raises(ValueError, match=fragment):
            parse_lora_modules(bad)
    with pytest.raises(ValueError, match="also a --model"):
        sim_cli.config_from_args(parse_args("--model", "base", "--lora-modules", "base=/p"))


async def models(http: aiohttp.ClientSession, sim: SimServer) -> list[dict]:
    async with http.get(sim.url + "/v1/models") as resp:
        assert resp.status == 200
        return (await resp.json())["data"]


async def post(http: aiohttp.ClientSession, sim: SimServer, path: str, body: dict) -> tuple[int, str]:
    async with http.post(sim.url + path, json=body) as resp:
        return resp.status, await resp.text()


async def test_models_list_and_runtime_loading(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start(models=["base", "alias"], lora_modules=[SQL])
    assert await models(http, sim) == [
        {"id": "base", "object": "model", "created": 0, "owned_by": "vllm", "root": "base", "parent": None},
        {"id": "alias", "object": "model", "created": 0, "owned_by": "vllm", "root": "alias", "parent": None},
        {"id": "sql-lora", "object": "model", "created": 0, "owned_by": "vllm", "root": "/adapters/sql",
         "parent": "base"},
    ]
    assert await post(http, sim, "/v1/load_lora_adapter", {"lora_name": "chat", "lora_path": "/adapters/chat",
                                                            "base_model_name": "alias"}) == (
        200, "Success: LoRA adapter 'chat' added successfully.")
    assert await post(http, sim, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/x",
                                                            "base_model_name": "unknown"}) == (
        200, "Success: LoRA adapter 'x' added successfully.")
    cards = {c["id"]: c for c in await models(http, sim)}
    assert (cards["chat"]["parent"], cards["chat"]["root"], cards["x"]["parent"]) == ("alias", "/adapters/chat", "base")

    status, text = await post(http, sim, "/v1/load_lora_adapter", {"lora_name": "chat", "lora_path": "/other"})
    assert status == 400 and "The lora adapter 'chat' has already been loaded." in text
    status, text = await post(http, sim, "/v1/load_lora_adapter", {"lora_name": "y"})
    assert status == 400 and "Both 'lora_name' and 'lora_path' must be provided." in text
    status, text = await post(http, sim, "/v1/load_lora_adapter", {"lora_name": "base", "lora_path": "/p"})
    assert status == 400

    assert await post(http, sim, "/v1/unload_lora_adapter", {"lora_name": "chat"}) == (
        200, "Success: LoRA adapter 'chat' removed successfully.")
    status, text = await post(http, sim, "/v1/unload_lora_adapter", {"lora_name": "chat"})
    assert status == 404 and "The lora adapter 'chat' cannot be found." in text
    assert [c["id"] for c in await models(http, sim)] == ["base", "alias", "sql-lora", "x"]
    async with http.get(sim.url + "/sim/stats") as resp:
        assert (await resp.json())["adapters"] == ["sql-lora", "x"]


async def test_loading_needs_lora_enabled(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start(models=["base"])
    status, text = await post(http, sim, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/a"})
    assert status == 400 and "--enable-lora" in text
    async with http.get(sim.url + "/metrics") as resp:
        assert "vllm:lora_requests_info" not in await resp.text()


async def chat(http: aiohttp.ClientSession, sim: SimServer, model: str, content: str = "hi",
               **extra: object) -> tuple[int, dict]:
    body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
    async with http.post(sim.url + CHAT, json=body) as resp:
        return resp.status, await resp.json()


async def test_an_adapters_request_is_served_under_its_name(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start(models=["base"], lora_modules=[SQL], timing="fixed", ttft_ms=1.0, itl_ms=1.0)
    status, body = await chat(http, sim, "sql-lora", max_tokens=2)
    assert status == 200 and body["model"] == "sql-lora"
    status, body = await chat(http, sim, "other-lora")
    assert status == 404 and body["error"]["message"] == "The model `other-lora` does not exist."
    async with http.get(sim.url + "/metrics") as resp:
        families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
    # Metrics count on the base model, as vLLM's model_name label does.
    done = [s for s in families["vllm:request_success"].samples if s.name.endswith("_total") and s.value]
    assert [(s.labels["model_name"], s.value) for s in done] == [("base", 1.0)]


async def test_lora_requests_info_names_the_adapters_in_use(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start(models=["base"], lora_modules=[SQL], max_loras=3, timing="fixed", ttft_ms=1.0, itl_ms=10.0,
                      max_output_tokens=1000)

    async def scrape() -> list:
        async with http.get(sim.url + "/metrics") as resp:
            text = await resp.text()
        assert parse_metrics(text.encode()) is not None
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        return fams["vllm:lora_requests_info"].samples

    (idle,) = await scrape()
    assert idle.labels == {"max_lora": "3", "waiting_lora_adapters": "", "running_lora_adapters": ""}
    pending = asyncio.ensure_future(chat(http, sim, "sql-lora", max_tokens=150))  # runs for ~1.5 s

    async def running() -> bool:
        return any(s.labels["running_lora_adapters"] == "sql-lora" for s in await scrape())

    await wait_until(running)
    async with http.get(sim.url + "/metrics") as resp:
        assert parse_metrics(await resp.read()).lora_adapters == {"sql-lora"}  # the router's reading of it
    assert (await pending)[0] == 200
    samples = await scrape()
    # Every label set seen stays, each at the time it was last current; the newest is the idle one again.
    assert len(samples) == 2
    newest = max(samples, key=lambda s: s.value)
    assert newest.labels["running_lora_adapters"] == "" and newest.value > idle.value
    async with http.get(sim.url + "/metrics") as resp:
        assert parse_metrics(await resp.read()).lora_adapters == set()


async def test_an_adapters_kv_blocks_are_its_own(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start(models=["base"], lora_modules=[SQL, LoraModule("chat-lora", "/adapters/chat")])
    prompt = "a shared prompt of a few blocks " * 8

    async def cached(model: str) -> int:
        async with http.post(sim.url + COMPLETIONS, json={"model": model, "prompt": prompt, "max_tokens": 1}) as resp:
            assert resp.status == 200
            return (await resp.json())["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert await cached("base") == 0
    assert await cached("base") > 0
    assert await cached("sql-lora") == 0  # the base model's blocks are not the adapter's
    assert await cached("chat-lora") == 0  # nor another adapter's
    assert await cached("sql-lora") > 0
    ids = list(prompt.encode())
    assert block_hashes(ids, BLOCK, "sql-lora") != block_hashes(ids, BLOCK)
    assert block_hashes(ids, BLOCK, "sql-lora") == block_hashes(ids, BLOCK, "sql-lora")


async def test_kv_events_name_the_adapter(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start(models=["base"], enable_lora=True,
                      kv_events=KVEventsConfig(endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0"))
    assert await post(http, sim, "/v1/load_lora_adapter", {"lora_name": "sql-lora", "lora_path": "/a"}) == (
        200, "Success: LoRA adapter 'sql-lora' added successfully.")
    sub = Subscriber(sim)
    try:
        await sub.sync(http)
        prompt = "x" * (2 * BLOCK)
        for model, lora in (("sql-lora", ("sql-lora", 1)), ("base", (None, None))):
            async with http.post(sim.url + COMPLETIONS, json={"model": model, "prompt": prompt, "max_tokens": 1}):
                pass
            _, payload = await sub.recv()
            (event,) = map_decoder.decode(payload).events
            assert (event.lora_name, event.lora_id) == lora
            assert event.block_hashes == block_hashes(list(prompt.encode()), BLOCK, lora[0])
    finally:
        sub.close()
