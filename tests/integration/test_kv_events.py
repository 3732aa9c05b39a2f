"""Precise prefix-cache routing over real ZeroMQ sockets: a publisher speaking vLLM's wire format (PUB
batches `[topic, seq, msgpack KVEventBatch]`, a ROUTER replay socket) feeds the router's subscribers,
and `prefix-cache` decisions follow what the engine reports holding."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
import xxhash
import yaml
import zmq
import zmq.asyncio

from extproc_router.config import build_config
from extproc_router.discovery.static_file import ANNOTATION_KV_EVENTS_PORT, ANNOTATION_KV_EVENTS_REPLAY_PORT
from extproc_router.kv_events import KvEventSettings, KvEventSubscribers
from extproc_router.serve import RouterProcess
from routing.kv_index import KvBlockIndex
from routing.pods import Pod, PodSnapshot
from routing.request import CHAT_PATH, RoutingRequest, parse_body
from routing.router import Router, RoutingSettings
from routing.strategies.prefix_cache import MATCH_HEADER, PrefixCacheSettings
from routing.tokenizers import make_engine_tokenizer, render_chat
from tests.conftest import running_sims

pytestmark = pytest.mark.timeout(60)

MODEL = "m"
BLOCK = 16
END_SEQ = (-1).to_bytes(8, "big", signed=True)
SYSTEM = "You answer questions about the shipping manifest with care and precision. " * 12


class Publisher:
    """A vLLM `ZmqEventPublisher` stand-in: PUB for batches, ROUTER for replays, both on loopback."""

    def __init__(self, ctx: zmq.asyncio.Context, *, layout: str = "array", replay: bool = True) -> None:
        self.layout = layout
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind("tcp://127.0.0.1:*")
        self.port = int(self.pub.getsockopt_string(zmq.LAST_ENDPOINT).rpartition(":")[2])
        self.router: zmq.asyncio.Socket | None = None
        self.replay_port: int | None = None
        if replay:
            self.router = ctx.socket(zmq.ROUTER)
            self.router.setsockopt(zmq.LINGER, 0)
            self.router.bind("tcp://127.0.0.1:*")
            self.replay_port = int(self.router.getsockopt_string(zmq.LAST_ENDPOINT).rpartition(":")[2])
        self.seq = 0
        self.buffer: list[tuple[int, bytes]] = []
        self.replays: list[int] = []
        self.answer_replays = True
        self._task = asyncio.get_running_loop().create_task(self._serve()) if replay else None
        self._enc = msgspec.msgpack.Encoder()

    def annotations(self) -> dict[str, str]:
        out = {ANNOTATION_KV_EVENTS_PORT: str(self.port)}
        if self.replay_port is not None:
            out[ANNOTATION_KV_EVENTS_REPLAY_PORT] = str(self.replay_port)
        return out

    def payload(self, events: list[Any]) -> bytes:
        return self._enc.encode([time.time(), events, 0])

    async def send(self, events: list[Any], *, drop: bool = False, raw: bytes | None = None) -> int:
        """Publish one batch; `drop`: buffered for replay but never sent (a lost message)."""
        seq = self.seq
        self.seq += 1
        payload = raw if raw is not None else self.payload(events)
        self.buffer.append((seq, payload))
        if not drop:
            await self.pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])
        return seq

    def restart(self) -> None:
        """As a new engine process: sequence numbers and the replay buffer start over."""
        self.seq = 0
        self.buffer = []

    # -- events, in the publisher's layout
    def stored(self, hashes: list[int], parent: int | None, tokens: list[int]) -> Any:
        if self.layout == "map":
            return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens,
                    "block_size": BLOCK, "lora_id": None, "medium": "GPU", "lora_name": None,
                    "extra_keys": [None] * len(hashes), "group_idx": 0, "kv_cache_spec_kind": "full_attention"}
        return ["BlockStored", hashes, parent, tokens, BLOCK, None, "GPU"]

    def removed(self, hashes: list[int]) -> Any:
        if self.layout == "map":
            return {"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU", "group_idx": 0}
        return ["BlockRemoved", hashes, "GPU"]

    def cleared(self) -> Any:
        return {"type": "AllBlocksCleared"} if self.layout == "map" else ["AllBlocksCleared"]

    async def _serve(self) -> None:
        assert self.router is not None
        while True:
            frames = await self.router.recv_multipart()
            ident, start = frames[0], int.from_bytes(frames[-1], "big")
            self.replays.append(start)
            if not self.answer_replays:
                continue
            for seq, payload in [b for b in self.buffer if b[0] >= start]:
                await self.router.send_multipart([ident, b"", seq.to_bytes(8, "big"), payload])
            await self.router.send_multipart([ident, b"", END_SEQ, b""])

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.pub.close(linger=0)
        if self.router is not None:
            self.router.close(linger=0)


def engine_hashes(tokens: list[int], salt: int = 99) -> list[int]:
    """The engine's own chained block hashes: any function will do, the router never uses them."""
    out, parent = [], salt
    for i in range(0, len(tokens) // BLOCK * BLOCK, BLOCK):
        parent = xxhash.xxh3_64_intdigest(parent.to_bytes(8, "little") + bytes(str(tokens[i:i + BLOCK]), "ascii"))
        out.append(parent)
    return out


def body_of(*contents: str) -> dict[str, Any]:
    msgs = [{"role": "system" if i == 0 else "user", "content": c} for i, c in enumerate(contents)]
    return {"model": MODEL, "messages": msgs}


def ids_of(body: dict[str, Any]) -> list[int]:
    """The engine's token ids (the simulator's `bytes` tokenizer: UTF-8 bytes)."""
    return list(render_chat(body["messages"], "simulator").encode())


def request_of(body: dict[str, Any]) -> RoutingRequest:
    return parse_body(CHAT_PATH, orjson.dumps(body))


async def wait_for(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class Fleet:
    """A router over pods a..d; `a` and `b` publish events unless told otherwise."""

    def __init__(self, router: Router, subs: KvEventSubscribers, pubs: dict[str, Publisher], pods: list[Pod]) -> None:
        self.router, self.subs, self.pubs, self.pods = router, subs, pubs, pods

    @property
    def kv(self) -> KvBlockIndex:
        return self.router.stats.kv_blocks

    def snapshot(self, pods: list[Pod]) -> None:
        self.router.update_snapshot(PodSnapshot.build(pods, {p.key for p in pods}, {MODEL: None}))
        self.subs.set_pods(pods)

    def route(self, body: dict[str, Any]) -> tuple[str, str]:
        d = self.router.decide(request_of(body), "prefix-cache")
        self.router.release(d)
        return d.pod.name, d.echo[MATCH_HEADER]

    async def live(self, name: str) -> None:
        """Until the subscriber of `name` has applied a batch (the first may be lost: a slow joiner)."""
        stats = self.subs.subscriber(f"default/{name}").stats
        start = stats.batches
        pub = self.pubs[name]
        for _ in range(100):
            await pub.send([])
            try:
                await wait_for(lambda: stats.batches > start, f"{name}'s subscriber", 0.2)
                return
            except AssertionError:
                continue
        raise AssertionError(f"{name}'s subscriber never applied a batch")

    async def applied(self, name: str, seq: int) -> None:
        sub = self.subs.subscriber(f"default/{name}")
        await wait_for(lambda: sub._last is not None and sub._last >= seq, f"{name} to apply batch {seq}")

    async def store(self, name: str, body: dict[str, Any], salt: int = 99) -> list[int]:
        pub = self.pubs[name]
        ids = ids_of(body)
        n = len(ids) // BLOCK * BLOCK
        hashes = engine_hashes(ids, salt)
        await self.applied(name, await pub.send([pub.stored(hashes, None, ids[:n])]))
        return hashes


@asynccontextmanager
async def fleet(*, layout: str = "array", replay: bool = True, publishing: tuple[str, ...] = ("a", "b"),
                speculative_s: float = 0.0, replay_timeout_ms: int = 300) -> AsyncIterator[Fleet]:
    ctx = zmq.asyncio.Context()
    pubs = {name: Publisher(ctx, layout=layout, replay=replay) for name in publishing}
    router = Router(RoutingSettings(prefix_cache=_settings(speculative_s)), rng=random.Random(3))
    router.stats.kv_blocks.set_tokenizers({}, make_engine_tokenizer("bytes"))
    subs = KvEventSubscribers(router.stats.kv_blocks, KvEventSettings(replay_timeout_ms=replay_timeout_ms,
                                                                      reconnect_backoff=(0.05, 0.2)))
    await subs.start()
    # The events endpoint is on the pod's IP: every pod is on loopback, on its own port.
    pods = [Pod(n, f"127.0.0.1:{8000 + i}", MODEL, annotations=pubs[n].annotations() if n in pubs else {})
            for i, n in enumerate("abcd")]
    f = Fleet(router, subs, pubs, pods)
    f.snapshot(pods)
    try:
        for name in publishing:
            await f.live(name)
        yield f
    finally:
        await subs.stop()
        for pub in pubs.values():
            await pub.close()
        ctx.term()


def _settings(speculative_s: float) -> PrefixCacheSettings:
    return PrefixCacheSettings(kv_events_speculative_s=speculative_s)


def share_and_source(header: str) -> tuple[float, str]:
    parts = dict(p.split("=", 1) for p in header.split(";")[1:])
    return float(header.split(";")[0]), parts["src"]


@pytest.mark.parametrize("layout", ["array", "map"])
async def test_a_prefix_cached_on_a_pod_routes_there(layout: str) -> None:
    async with fleet(layout=layout) as f:
        body = body_of(SYSTEM, "Which crates are fragile?")
        await f.store("b", body)
        for _ in range(5):  # every time, whatever the load it books
            pod, header = f.route(body)
            assert pod == "b"
            share, src = share_and_source(header)
            assert share > 0.9 and src == "precise" and header.endswith("sel=prefix_match")
        # A follow-up that extends the conversation matches the cached part.
        pod, header = f.route(body_of(SYSTEM, "Which crates are fragile?", "And the heavy ones?"))
        assert pod == "b" and share_and_source(header)[0] > 0.5


async def test_all_blocks_cleared_ends_the_match() -> None:
    async with fleet() as f:
        body = body_of(SYSTEM, "List the ports of call.")
        await f.store("a", body)
        assert f.route(body)[0] == "a"
        pub = f.pubs["a"]
        await f.applied("a", await pub.send([pub.cleared()]))
        assert f.kv.pod_blocks()["default/a"] == 0
        pod, header = f.route(body)
        assert not (pod == "a" and share_and_source(header)[0] > 0)
        assert share_and_source(header) == (0.0, "precise") or pod in ("c", "d")


async def test_removed_blocks_stop_attracting_traffic() -> None:
    async with fleet() as f:
        body = body_of(SYSTEM, "Where is container 7?")
        hashes = await f.store("a", body)
        assert f.route(body)[0] == "a"
        pub = f.pubs["a"]
        # The engine evicts the chain from its second block on: only the first block is held.
        await f.applied("a", await pub.send([pub.removed(hashes[1:])]))
        _, header = f.route(body)
        assert share_and_source(header)[0] < 0.1
        await f.applied("a", await pub.send([pub.removed(hashes[:1])]))
        assert f.kv.pod_blocks()["default/a"] == 0


async def test_a_sequence_gap_is_repaired_by_replay() -> None:
    async with fleet() as f:
        pub = f.pubs["a"]
        body = body_of(SYSTEM, "What is the total tonnage?")
        ids = ids_of(body)
        n = len(ids) // BLOCK * BLOCK
        # The batch that stores the prefix is lost on the PUB socket; the next one reveals the gap.
        await pub.send([pub.stored(engine_hashes(ids), None, ids[:n])], drop=True)
        await f.applied("a", await pub.send([]))
        sub = f.subs.subscriber("default/a")
        assert sub.stats.gaps == 1 and sub.stats.replays >= 2  # the initial sync, then this gap
        assert pub.replays[-1] == pub.seq - 2
        assert f.route(body)[0] == "a"
        assert sub.stats.state_drops == {}


async def test_a_gap_without_replay_drops_the_pods_state() -> None:
    async with fleet(replay=False) as f:
        body = body_of(SYSTEM, "Any hazardous goods?")
        await f.store("a", body)
        assert f.route(body)[0] == "a"
        pub = f.pubs["a"]
        await pub.send([pub.removed([1, 2, 3])], drop=True)  # lost: the router cannot know what it removed
        await f.applied("a", await pub.send([]))
        sub = f.subs.subscriber("default/a")
        assert sub.stats.gaps == 1 and sub.stats.state_drops == {"gap": 1}
        assert f.kv.pod_blocks()["default/a"] == 0
        assert f.kv.is_precise("default/a")  # still followed: new events rebuild the state


async def test_a_replay_that_does_not_answer_drops_the_state() -> None:
    async with fleet(replay_timeout_ms=200) as f:
        body = body_of(SYSTEM, "Who signs the bill of lading?")
        await f.store("a", body)
        pub = f.pubs["a"]
        pub.answer_replays = False
        await pub.send([], drop=True)
        await f.applied("a", await pub.send([]))
        sub = f.subs.subscriber("default/a")
        assert sub.stats.replay_failures == 1 and sub.stats.state_drops == {"gap": 1}
        assert f.kv.pod_blocks()["default/a"] == 0


async def test_a_publisher_restart_drops_the_pods_state() -> None:
    async with fleet() as f:
        body = body_of(SYSTEM, "What does the customs form say?")
        await f.store("a", body)
        pub = f.pubs["a"]
        for _ in range(3):
            await pub.send([])
        pub.restart()
        await f.applied("a", await pub.send([]))
        sub = f.subs.subscriber("default/a")
        await wait_for(lambda: sub.stats.restarts == 1, "the restart")
        assert f.kv.pod_blocks()["default/a"] == 0
        assert sub.stats.state_drops.get("restart") == 1


async def test_a_malformed_event_is_counted_and_dropped() -> None:
    async with fleet() as f:
        pub = f.pubs["a"]
        body = body_of(SYSTEM, "Is the reefer unit on?")
        ids = ids_of(body)
        n = len(ids) // BLOCK * BLOCK
        good = pub.stored(engine_hashes(ids), None, ids[:n])
        bad_count = ["BlockStored", [1, 2], None, [1, 2, 3], BLOCK, None, "GPU"]  # 3 tokens for 2 blocks
        bad_type = ["BlockStored", "not a list", None, [], BLOCK]
        unknown = ["BlockTeleported", [1]]
        await f.applied("a", await pub.send([bad_count, bad_type, unknown, good]))
        await f.applied("a", await pub.send([], raw=b"\xc1 not msgpack"))
        await f.applied("a", await pub.send([], raw=orjson.dumps({"not": "a batch"})))
        sub = f.subs.subscriber("default/a")
        assert sub.stats.malformed_events == 3 and sub.stats.malformed_batches == 2
        # The good event of the first batch was applied, and the subscriber goes on.
        assert f.route(body)[0] == "a"
        await f.applied("a", await pub.send([pub.cleared()]))
        assert f.kv.pod_blocks()["default/a"] == 0


async def test_a_pod_without_events_uses_the_approximate_index() -> None:
    async with fleet(publishing=("a",)) as f:
        body = body_of(SYSTEM, "What is on deck 3?")
        load = f.router.stats.load
        load.acquire("default/a", 10**6)  # a is busy: the cold prompt goes to a pod without events
        first, header = f.route(body)
        assert first in ("b", "c", "d") and share_and_source(header) == (0.0, "approx")
        # The approximate index remembers where it went: the same prompt goes there again.
        pod, header = f.route(body)
        assert pod == first and share_and_source(header) == (1.0, "approx")
        load.release("default/a", 10**6)
        # The precise pod is matched by its events alone: routing history never speaks for it.
        assert f.kv.precise_pods(MODEL, ["default/a", f"default/{first}"]) == ["default/a"]


async def test_a_pod_that_goes_away_loses_its_entries() -> None:
    async with fleet() as f:
        body = body_of(SYSTEM, "When do we dock?")
        await f.store("a", body)
        assert f.kv.pod_blocks()["default/a"] > 0
        f.snapshot([p for p in f.pods if p.name != "a"])
        assert "default/a" not in f.kv.pod_blocks() and f.subs.subscriber("default/a") is None
        assert f.route(body)[0] != "a"
        # Back again: subscribed anew, and the replay rebuilds what the publisher still buffers.
        f.snapshot(f.pods)
        await wait_for(lambda: f.kv.pod_blocks().get("default/a", 0) > 0, "a's blocks from the replay")
        assert f.route(body)[0] == "a"


async def test_speculative_blocks_hold_a_burst_together() -> None:
    async with fleet(speculative_s=5.0) as f:
        body = body_of(SYSTEM, "Count the pallets.")
        first, _ = f.route(body)
        # No event yet: the routed blocks still attract the same prompt.
        for _ in range(3):
            assert f.route(body)[0] == first


async def test_router_process_follows_pods_declared_in_the_pod_file(tmp_path: Path) -> None:
    """Through `serve`: the pod file's `kv_events_port` starts a subscriber, the engine tokenizer comes
    from EXTPROC_ROUTER_KV_EVENTS_TOKENIZERS, and /metrics shows the subscriber's and index's series."""
    ctx = zmq.asyncio.Context()
    pub = Publisher(ctx)
    pod_file = tmp_path / "gateway.yaml"
    try:
        async with running_sims({}) as start:
            sims = {"pod-a": await start(), "pod-b": await start()}
            pods = [{"name": n, "address": f"127.0.0.1:{s.port}"} for n, s in sims.items()]
            pods[0].update(kv_events_port=pub.port, kv_events_replay_port=pub.replay_port)
            pod_file.write_text(yaml.safe_dump({"models": {MODEL: {"pods": pods}}}))
            cfg = build_config(env={"EXTPROC_ROUTER_KV_EVENTS_TOKENIZERS": f"{MODEL}=bytes"},
                               flags={"pods_file": str(pod_file), "grpc_listen": "127.0.0.1:0",
                                      "http_listen": "127.0.0.1:0", "health_interval": 0.1})
            proc = RouterProcess(cfg)
            await proc.start()
            try:
                kv = proc.router.stats.kv_blocks
                await wait_for(lambda: kv.is_precise("default/pod-a"), "pod-a to be followed")
                body = body_of(SYSTEM, "Which berth?")
                ids = ids_of(body)
                n = len(ids) // BLOCK * BLOCK
                await pub.send([pub.stored(engine_hashes(ids), None, ids[:n])])
                await wait_for(lambda: kv.pod_blocks().get("default/pod-a", 0) > 0, "pod-a's blocks")
                d = proc.router.decide(request_of(body), "prefix-cache")
                proc.router.release(d)
                assert d.pod.name == "pod-a" and ";src=precise;" in d.echo[MATCH_HEADER]
                assert not kv.is_precise("default/pod-b")
                metrics = b"".join(s for s in _scrape(proc)).decode()
                assert 'extproc_kv_events_batches_total{model="m",outcome="applied",pod="pod-a"}' in metrics
                assert 'extproc_prefix_cache_precise_blocks{model="m",pod="pod-a"}' in metrics
                assert 'extproc_prefix_cache_routing_source_total{model="m",source="precise"} 1.0' in metrics
            finally:
                await proc.stop()
            assert kv.pod_keys == []
    finally:
        await pub.close()
        ctx.term()


def _scrape(proc: RouterProcess) -> list[bytes]:
    from prometheus_client import generate_latest

    return [generate_latest(proc.registry)]


# -- configuration: engine tokenizers, endpoints ------------------------------------------------------

def test_tokenizer_map_and_files(tmp_path: Path) -> None:
    from extproc_router.kv_events import TokenizerSpec, load_engine_tokenizers, parse_tokenizer_map

    assert parse_tokenizer_map(None) == {}
    assert parse_tokenizer_map(" *=bytes , qwen=/models/qwen@chatml") == {
        "*": TokenizerSpec("bytes"), "qwen": TokenizerSpec("/models/qwen", "chatml")}
    for bad in ("qwen", "=bytes", "a=bytes@jinja", "a=bytes,a=cl100k"):
        with pytest.raises(ValueError, match="kv_events_tokenizers"):
            parse_tokenizer_map(bad)
    pytest.importorskip("tokenizers")
    from tests.unit.routing.test_kv_index import tiny_tokenizer_json

    (tmp_path / "tokenizer.json").write_text(tiny_tokenizer_json())
    per_model, default = load_engine_tokenizers(parse_tokenizer_map(f"tiny={tmp_path}@chatml,*=bytes"))
    assert default is not None and default.tokenizer.name == "bytes"
    assert per_model["tiny"].chat_format == "chatml" and per_model["tiny"].tokenizer.name == "tokenizer.json"
    with pytest.raises(ValueError, match="cannot read"):
        load_engine_tokenizers(parse_tokenizer_map(f"x={tmp_path / 'missing.json'}"))
    with pytest.raises(Exception, match="kv_events_tokenizers"):
        build_config(env={"EXTPROC_ROUTER_KV_EVENTS_TOKENIZERS": "nonsense"})


def test_events_endpoints_from_annotations_labels_and_the_pod_file() -> None:
    from extproc_router.discovery.static_file import DiscoveryError, parse_pod_file
    from extproc_router.kv_events import events_endpoints

    pod = Pod("p", "10.1.2.3:8000", MODEL, annotations={ANNOTATION_KV_EVENTS_PORT: "5557"})
    assert events_endpoints(pod) == ("tcp://10.1.2.3:5557", None)
    pod = Pod("p", "[fd00::1]:8000", MODEL, labels={ANNOTATION_KV_EVENTS_PORT: "5557",
                                                    ANNOTATION_KV_EVENTS_REPLAY_PORT: "5558"})
    assert events_endpoints(pod) == ("tcp://[fd00::1]:5557", "tcp://[fd00::1]:5558")
    assert events_endpoints(Pod("p", "10.1.2.3:8000", MODEL, annotations={ANNOTATION_KV_EVENTS_PORT: "x"})) is None
    assert events_endpoints(Pod("p", "10.1.2.3:8000", MODEL)) is None
    parsed = parse_pod_file({"models": {MODEL: {"pods": [
        {"name": "a", "address": "10.0.0.1:8000", "kv_events_port": 5557, "kv_events_replay_port": 5558}]}}})
    assert parsed.pods[0].annotations == {ANNOTATION_KV_EVENTS_PORT: "5557", ANNOTATION_KV_EVENTS_REPLAY_PORT: "5558"}
    with pytest.raises(DiscoveryError, match="must be a port"):
        parse_pod_file({"models": {MODEL: {"pods": [{"address": "10.0.0.1:8000", "kv_events_port": 70000}]}}})


def test_the_codec_reads_every_layout() -> None:
    from extproc_router.kv_events import _Codec

    codec = _Codec()
    enc = msgspec.msgpack.Encoder()
    stored_array = ["BlockStored", [1, b"\x01" * 32], None, list(range(8)), 4, None, "GPU", None, [None, None], 0,
                    "full_attention", None, "a field from the future"]
    removed_map = {"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU", "group_idx": 0, "new": 1}
    for payload in (enc.encode([1.5, [stored_array, ["AllBlocksCleared"]]]),
                    enc.encode([1.5, [removed_map], 0]),
                    enc.encode({"ts": 1.5, "events": [removed_map], "data_parallel_rank": 0}),
                    enc.encode([1.5, [["BlockStored", [1], None, [1, 2, 3, 4], 4]]])):  # the oldest layout
        ts, events, bad = codec.decode(payload)
        assert ts == 1.5 and bad == 0 and events
    ts, events, bad = codec.decode(enc.encode([2.0, [["BlockRemoved", [1]], ["Nope"], {"type": "AllBlocksCleared"}]]))
    assert (ts, len(events), bad) == (2.0, 2, 1)
    with pytest.raises(ValueError):
        codec.decode(b"\xc1")


@pytest.mark.parametrize("layout", ["map", "array"])
async def test_the_simulators_own_events_route_a_cached_prompt_home(tmp_path: Path, layout: str) -> None:
    """The whole contract against the simulated engine: it tokenizes (cl100k) and publishes vLLM's
    events; the router, tokenizing the same request itself, finds the engine's blocks."""
    config = pytest.importorskip("extproc_router.simulator.config")
    if not hasattr(config, "KVEventsConfig"):
        pytest.skip("the simulator publishes no KV events")
    import aiohttp

    events = config.KVEventsConfig(endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", format=layout)
    pod_file = tmp_path / "gateway.yaml"
    async with running_sims({"models": [MODEL], "timing": "model"}) as start:
        sims = {name: await start(kv_events=events) for name in ("pod-a", "pod-b", "pod-c")}
        pods = [{"name": n, "address": f"127.0.0.1:{s.port}",
                 "kv_events_port": int(s.kv_events.endpoint.rpartition(":")[2]),
                 "kv_events_replay_port": int(s.kv_events.replay_endpoint.rpartition(":")[2])} for n, s in sims.items()]
        pod_file.write_text(yaml.safe_dump({"models": {MODEL: {"pods": pods}}}))
        cfg = build_config(env={"EXTPROC_ROUTER_KV_EVENTS_TOKENIZERS": f"{MODEL}=cl100k"},
                           flags={"pods_file": str(pod_file), "grpc_listen": "127.0.0.1:0",
                                  "http_listen": "127.0.0.1:0", "health_interval": 0.1})
        proc = RouterProcess(cfg)
        await proc.start()
        try:
            kv = proc.router.stats.kv_blocks
            await wait_for(lambda: all(kv.is_precise(f"default/{n}") for n in sims), "every pod followed")
            body = {**body_of(SYSTEM, "Who has the right of way?"), "max_tokens": 2}
            # Served by pod-b without the router: only its engine's events can tell.
            async with aiohttp.ClientSession() as session, session.post(
                    f"http://127.0.0.1:{sims['pod-b'].port}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
            await wait_for(lambda: kv.pod_blocks().get("default/pod-b", 0) > 0, "pod-b's stored blocks")
            d = proc.router.decide(request_of(body), "prefix-cache")
            proc.router.release(d)
            assert d.pod.name == "pod-b"
            assert d.echo[MATCH_HEADER].startswith("1.00;") and ";src=precise;" in d.echo[MATCH_HEADER]
        finally:
            await proc.stop()
