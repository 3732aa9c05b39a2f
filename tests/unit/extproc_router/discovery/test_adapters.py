"""LoRA adapter discovery (extproc_router/discovery/adapters.py, pod_metrics.py, static_file.py): vLLM's
`/v1/models` and `vllm:lora_requests_info` parsed, the two merged per pod, a poller following
simulated pods that load and unload adapters at run time, and the pod file's `adapters:`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml

from extproc_router.discovery.adapters import AdapterListError, AdapterPoller, AdapterTracker, parse_model_list
from extproc_router.discovery.manager import FileDiscovery
from extproc_router.discovery.pod_metrics import parse_metrics
from extproc_router.discovery.static_file import DiscoveryError, parse_pod_file
from extproc_router.simulator.config import LoraModule
from extproc_router.simulator.server import SimServer
from routing.pods import Pod, PodSnapshot
from tests.conftest import running_sims

# What vLLM answers with a base model and two adapters (ModelCard fields; created is a timestamp).
VLLM_MODELS = {"object": "list", "data": [
    {"id": "meta-llama/Llama-3.1-8B", "object": "model", "created": 1754000000, "owned_by": "vllm",
     "root": "/models/llama", "parent": None, "max_model_len": 8192, "permission": [{"id": "modelperm-1"}]},
    {"id": "sql-lora", "object": "model", "created": 1754000000, "owned_by": "vllm", "root": "/adapters/sql",
     "parent": "meta-llama/Llama-3.1-8B", "max_model_len": None, "permission": [{"id": "modelperm-2"}]},
    {"id": "chat-lora", "object": "model", "created": 1754000000, "owned_by": "vllm", "root": "/adapters/chat",
     "parent": "meta-llama/Llama-3.1-8B", "max_model_len": None, "permission": []},
]}


def test_model_list_adapters_are_the_entries_with_a_parent() -> None:
    assert parse_model_list(orjson.dumps(VLLM_MODELS)) == {"sql-lora", "chat-lora"}
    assert parse_model_list(b'{"object": "list", "data": [{"id": "m", "object": "model"}]}') == frozenset()
    odd = {"data": [1, {"id": 5, "parent": "m"}, {"id": "x", "parent": ""}, {"id": "y", "parent": 3},
                    {"id": "ok", "parent": "m"}]}
    assert parse_model_list(orjson.dumps(odd)) == {"ok"}
    for body in (b"not json", b"[]", b'{"data": {}}', b'{"object": "list"}'):
        with pytest.raises(AdapterListError):
            parse_model_list(body)


def lora_line(running: str, waiting: str, when: float, max_lora: int = 2) -> str:
    # vLLM's label order: max_lora, waiting_lora_adapters, running_lora_adapters
    return (f'vllm:lora_requests_info{{max_lora="{max_lora}",waiting_lora_adapters="{waiting}",'
            f'running_lora_adapters="{running}"}} {when}')


def test_lora_requests_info_the_newest_series_counts() -> None:
    text = "\n".join([
        "# HELP vllm:lora_requests_info Running stats on lora requests.",
        "# TYPE vllm:lora_requests_info gauge",
        lora_line("sql-lora", "", 1.754000001e09),
        lora_line("sql-lora,chat-lora", "old", 1.754000003e09),
        lora_line("", "chat-lora", 1.754000002e09),
        'vllm:num_requests_running{model_name="m"} 2.0',
    ])
    m = parse_metrics(text.encode())
    assert m.lora_adapters == {"sql-lora", "chat-lora", "old"} and m.running == 2.0
    # Running and waiting both count; the idle state (empty labels) is no adapter at all.
    assert parse_metrics(lora_line("", "a,b", 5.0).encode()).lora_adapters == {"a", "b"}
    assert parse_metrics((lora_line("a", "", 5.0) + "\n" + lora_line("", "", 6.0)).encode()).lora_adapters == set()
    assert parse_metrics(b'vllm:num_requests_running{model_name="m"} 1').lora_adapters == set()
    escaped = 'vllm:lora_requests_info{max_lora="1",running_lora_adapters="a\\"b, c",waiting_lora_adapters=""} 1'
    assert parse_metrics(escaped.encode()).lora_adapters == {'a"b', "c"}


def test_tracker_merges_listings_and_adapters_in_use() -> None:
    t = AdapterTracker()
    t.listed("ns/a", frozenset({"sql"}))
    t.in_use({"ns/a": frozenset({"sql", "hot"}), "ns/b": frozenset({"hot"}), "ns/c": frozenset()})
    assert t.view() == {"ns/a": {"sql", "hot"}, "ns/b": {"hot"}}
    t.listed("ns/a", frozenset({"sql"}))  # a listing replaces what the metrics showed before it
    assert t.view() == {"ns/a": {"sql"}, "ns/b": {"hot"}}
    t.retain({"ns/a"})  # b left the ready set
    t.in_use({"ns/b": frozenset({"x"})})
    t.listed("ns/b", frozenset({"y"}))
    assert t.view() == {"ns/a": {"sql"}}


# ---------------------------------------------------------------- the poller against simulated pods


def pod_of(sim: SimServer) -> Pod:
    return Pod(sim.pod_name, f"127.0.0.1:{sim.port}", "base")


class Views:
    def __init__(self) -> None:
        self.views: list[dict[str, frozenset[str]]] = []

    def __call__(self, view: dict[str, frozenset[str]]) -> None:
        self.views.append(view)

    @property
    def last(self) -> dict[str, frozenset[str]]:
        return self.views[-1] if self.views else {}

    async def until(self, check: Callable[[dict[str, frozenset[str]]], bool], timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while not check(self.last):
            assert time.monotonic() < deadline, f"not reached; last view {self.last}"
            await asyncio.sleep(0.01)


async def test_poller_follows_adapters_loaded_and_unloaded_at_run_time(http: aiohttp.ClientSession) -> None:
    async with running_sims({"models": ["base"], "enable_lora": True}) as start:
        a = await start(pod_name="a", lora_modules=[LoraModule("sql", "/adapters/sql")])
        b = await start(pod_name="b")
        views = Views()
        poller = AdapterPoller(views, interval=0.05, timeout=1.0)
        poller.set_pods([pod_of(a), pod_of(b)])
        await poller.start(first_round=True)
        try:
            assert views.last == {"default/a": {"sql"}}
            async with http.post(b.url + "/v1/load_lora_adapter",
                                 json={"lora_name": "chat", "lora_path": "/adapters/chat"}) as resp:
                assert resp.status == 200
            await views.until(lambda v: v.get("default/b") == {"chat"})
            async with http.post(a.url + "/v1/unload_lora_adapter", json={"lora_name": "sql"}) as resp:
                assert resp.status == 200
            await views.until(lambda v: "default/a" not in v)
            # A pod that stops answering keeps what it served (its health checks decide about it) ...
            await b.stop()
            await asyncio.sleep(0.2)
            assert views.last == {"default/b": {"chat"}}
            # ... until it leaves the polled set.
            poller.set_pods([pod_of(a)])
            assert views.last == {}
        finally:
            await poller.stop()


async def test_poller_adds_adapters_the_metrics_show_in_use() -> None:
    views = Views()
    poller = AdapterPoller(views, interval=60.0)
    pod = Pod("a", "127.0.0.1:9", "base")
    poller.set_pods([pod])
    poller.observe_in_use({"default/a": frozenset({"hot"}), "default/elsewhere": frozenset({"x"})})
    assert views.last == {"default/a": {"hot"}}
    n = len(views.views)
    poller.observe_in_use({"default/a": frozenset({"hot"})})  # nothing new: nothing published
    assert len(views.views) == n


# ---------------------------------------------------------------- the pod file


def test_pod_file_adapters() -> None:
    f = parse_pod_file({"models": {"base": {"pods": [
        {"name": "a", "address": "10.0.0.1:8000", "adapters": ["sql", " chat ", "sql"]},
        {"name": "b", "address": "10.0.0.2:8000", "namespace": "ns"},
    ]}}})
    assert f.adapters == {"default/a": ("sql", "chat")}
    snap = PodSnapshot.build(f.pods, {p.key for p in f.pods}, f.model_configs, adapters=f.adapters)
    assert [p.name for p in snap.model("chat").ready] == ["a"]


@pytest.mark.parametrize(("adapters", "fragment"), [
    ("sql", "list of LoRA adapter names"),
    ([""], "list of LoRA adapter names"),
    ([3], "list of LoRA adapter names"),
    (["other"], "other is a model of this file"),
])
def test_pod_file_adapter_errors(adapters: object, fragment: str) -> None:
    doc = {"models": {"base": {"pods": [{"address": "10.0.0.1:8000", "adapters": adapters}]}, "other": {}}}
    with pytest.raises(DiscoveryError, match=fragment) as exc:
        parse_pod_file(doc)
    assert "models.base.pods[0].adapters" in str(exc.value)


async def test_file_discovery_publishes_the_files_adapters(tmp_path: Path) -> None:
    async with running_sims({"models": ["base"]}) as start:
        sim = await start(pod_name="a")
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump({"models": {"base": {"pods": [
            {"name": "a", "address": f"127.0.0.1:{sim.port}", "adapters": ["sql"]}]}}}))
        published: list[PodSnapshot] = []
        disc = FileDiscovery(path, published.append, poll_interval=0.05, health_interval=0.05)
        disc.load_initial()
        await disc.start()
        try:
            entry = published[-1].model("sql")
            assert entry is not None and entry.parent == "base" and [p.name for p in entry.ready] == ["a"]
        finally:
            await disc.stop()
