"""The simulator's KV-cache events, received by real ZeroMQ sockets from in-process sims.

What was checked against vLLM's own definitions (read, not copied):

* ``vllm/distributed/kv_events.py`` of vLLM main after vllm-project/vllm#42892 (event structs lose
  ``array_like``: each event is a msgpack *map* with the tag under ``"type"``) and #45177 (replay
  replies carry the topic frame), both in v0.26.0. ``EventBatch`` keeps ``array_like=True``:
  ``[ts, events, data_parallel_rank]``; ``BlockStored`` fields ``block_hashes``,
  ``parent_block_hash``, ``token_ids``, ``block_size``, ``lora_id``, ``medium``, ``lora_name``
  (no defaults, always sent) then defaulted ones; ``BlockRemoved`` ``block_hashes``, ``medium``;
  ``AllBlocksCleared`` none. A captured vLLM 0.26.0 batch (volcano-sh/kthena#1535) also shows
  ``extra_keys`` [None], ``group_idx`` 0, ``kv_cache_spec_kind`` "full_attention" and rank 0.
* ``ZmqEventPublisher``: PUB message ``(topic, seq.to_bytes(8, "big"), payload)`` with seq from
  ``itertools.count()``; ROUTER replay request ``[identity, b"", start (8 bytes big-endian)]``,
  replies ``[identity, b"", topic, seq, payload]`` for buffered seq >= start, then
  ``[identity, b"", b"", (-1).to_bytes(8, "big", signed=True), b""]``. A REQ client gets only
  the first reply, so clients use DEALER (as vLLM's own test does since #45177).
* The earlier layout (``array``): vllm-project/vllm commit b4e69e0a (events ``array_like=True,
  tag=True``: ``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id]``)
  and the subscriber example at 0ef0f426 (``medium`` after ``lora_id``); ``lora_name`` follows
  since #27577. Replies before #45177 are ``[seq, payload]`` and the end marker ``[END_SEQ, b""]``.
* Block hashes as unsigned 64-bit ints: ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`` defaults to 1.

The payloads are decoded twice: by `decode_batch` below, which walks the raw msgpack with the
tag names and field order stated above, and by msgspec Structs declared the way a vLLM
subscriber declares them (`map_decoder`, `array_decoder`).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import signal
import string
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import xxhash
import zmq
import zmq.asyncio

from extproc_router.simulator import cli as sim_cli
from extproc_router.simulator.config import KVEventsConfig, SimConfig, kv_events_config_from_json
from extproc_router.simulator.server import SimServer
from extproc_router.simulator.tokenizer import block_hashes
from tests.unit.extproc_router.simulator.conftest import BLOCK, COMPLETIONS, StartSim, stats

END_SEQ = b"\xff" * 8
REPO_ROOT = Path(__file__).resolve().parents[4]

# ---------------------------------------------------------------- the independent decoder

STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name")
FIELDS = {"BlockStored": STORED_FIELDS, "BlockRemoved": ("block_hashes", "medium"), "AllBlocksCleared": ()}
MAP_EXTRA = {"BlockStored": {"extra_keys", "group_idx", "kv_cache_spec_kind"}, "BlockRemoved": {"group_idx"}}


def decode_batch(payload: bytes, layout: str = "map") -> tuple[float, list[dict[str, Any]], int]:
    """(ts, events as {"type": tag, field: value}, rank), checking the shape field by field."""
    raw = msgspec.msgpack.decode(payload)
    assert isinstance(raw, list) and len(raw) == 3, raw
    ts, events, rank = raw
    assert isinstance(ts, float) and isinstance(events, list) and rank == 0
    out = []
    for event in events:
        if layout == "map":
            assert isinstance(event, dict), event
            tag = event["type"]
            assert set(event) == {"type", *FIELDS[tag], *MAP_EXTRA.get(tag, ())}, event
            decoded = {"type": tag, **{name: event[name] for name in FIELDS[tag]}}
            if tag == "BlockStored":
                assert event["extra_keys"] == [None] * len(event["block_hashes"])
                assert (event["group_idx"], event["kv_cache_spec_kind"]) == (0, "full_attention")
        else:
            assert isinstance(event, list) and isinstance(event[0], str), event
            tag = event[0]
            assert len(event) == 1 + len(FIELDS[tag]), event
            decoded = {"type": tag, **dict(zip(FIELDS[tag], event[1:], strict=True))}
        if tag in ("BlockStored", "BlockRemoved"):
            assert decoded["medium"] == "GPU"
            assert all(isinstance(h, int) and 0 <= h < 2**64 for h in decoded["block_hashes"])
        if tag == "BlockStored":
            assert decoded["lora_id"] is None and decoded["lora_name"] is None
        out.append(decoded)
    return ts, out, rank


class _MapEvent(msgspec.Struct, tag=True, omit_defaults=True):
    pass


class MapBlockStored(_MapEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None


class MapBlockRemoved(_MapEvent, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None
    group_idx: int | None = None


class MapAllBlocksCleared(_MapEvent, tag="AllBlocksCleared"):
    pass


class MapBatch(msgspec.Struct, array_like=True, omit_defaults=True):
    ts: float
    events: list[MapBlockStored | MapBlockRemoved | MapAllBlocksCleared]
    data_parallel_rank: int | None = None


class _ArrayEvent(msgspec.Struct, array_like=True, tag=True, omit_defaults=True):
    pass


class ArrayBlockStored(_ArrayEvent, tag="BlockStored"):  # the oldest layout: 5 fields
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None


class ArrayBlockRemoved(_ArrayEvent, tag="BlockRemoved"):
    block_hashes: list[int]


class ArrayAllBlocksCleared(_ArrayEvent, tag="AllBlocksCleared"):
    pass


class ArrayBatch(msgspec.Struct, array_like=True, omit_defaults=True):
    ts: float
    events: list[ArrayBlockStored | ArrayBlockRemoved | ArrayAllBlocksCleared]


map_decoder = msgspec.msgpack.Decoder(MapBatch)
array_decoder = msgspec.msgpack.Decoder(ArrayBatch)


def chained_hash(parent: int | None, tokens: list[int]) -> int:
    """The simulator's block hash, recomputed from an event's fields: xxh3_64(parent LE u64 + tokens LE u32)."""
    data = (parent or 0).to_bytes(8, "little") + b"".join(t.to_bytes(4, "little") for t in tokens)
    return xxhash.xxh3_64_intdigest(data)


# ---------------------------------------------------------------- a subscriber


class Subscriber:
    """A SUB socket on a sim's KV events and a DEALER on its replay socket."""

    def __init__(self, sim: SimServer, topic: bytes = b"") -> None:
        assert sim.kv_events is not None
        self.sim = sim
        self.topic = topic
        ctx = zmq.asyncio.Context.instance()
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.connect(sim.kv_events.endpoint)
        self.replay = ctx.socket(zmq.DEALER)
        self.replay.setsockopt(zmq.LINGER, 0)
        if sim.kv_events.replay_endpoint:
            self.replay.connect(sim.kv_events.replay_endpoint)
        self.received: list[tuple[int, bytes]] = []

    async def recv(self, timeout: float = 3.0) -> tuple[int, bytes]:
        """The next live batch: (sequence number, payload)."""
        topic, seq, payload = await asyncio.wait_for(self.sub.recv_multipart(), timeout)
        assert topic.startswith(self.topic) and len(seq) == 8
        self.received.append((int.from_bytes(seq, "big"), payload))
        return self.received[-1]

    async def events(self, timeout: float = 3.0) -> list[dict[str, Any]]:
        """The events of the next live batch (map layout)."""
        _, payload = await self.recv(timeout)
        return decode_batch(payload, self.sim.kv_events.config.format)[1]  # type: ignore[union-attr]

    async def sync(self, http: aiohttp.ClientSession) -> None:
        """Return once the subscription is live: reset the pod until its AllBlocksCleared arrives, then drain."""
        for _ in range(50):
            async with http.post(self.sim.url + "/sim/reset") as resp:
                assert resp.status == 200
            try:
                await self.recv(timeout=0.1)
                break
            except TimeoutError:
                continue
        else:
            pytest.fail("the subscription never went live")
        while True:
            try:
                await self.recv(timeout=0.1)
            except TimeoutError:
                return

    async def request_replay(self, start: int) -> list[list[bytes]]:
        """The frames of every reply to one replay request (DEALER: the empty delimiter comes first)."""
        await self.replay.send_multipart([b"", start.to_bytes(8, "big")])
        replies = []
        while True:
            frames = await asyncio.wait_for(self.replay.recv_multipart(), 3.0)
            assert frames[0] == b""
            replies.append(frames[1:])
            if frames[-2] == END_SEQ:
                return replies

    def close(self) -> None:
        self.sub.close()
        self.replay.close()


def text(seed: int, n: int) -> str:
    return "".join(random.Random(seed).choices(string.ascii_letters, k=n))


async def complete(http: aiohttp.ClientSession, sim: SimServer, prompt: str, max_tokens: int = 1) -> dict[str, Any]:
    async with http.post(sim.url + COMPLETIONS, json={"prompt": prompt, "max_tokens": max_tokens}) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


def events_config(**kw: Any) -> KVEventsConfig:
    return KVEventsConfig(endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", **kw)


@pytest.fixture
async def subscribers() -> AsyncIterator[list[Subscriber]]:
    made: list[Subscriber] = []
    yield made
    for sub in made:
        sub.close()


# ---------------------------------------------------------------- stores, removals, clears


async def test_a_request_stores_its_full_blocks_with_tokens_and_a_parent_chain(
    start: StartSim, http: aiohttp.ClientSession, subscribers: list[Subscriber]
) -> None:
    # 32 tokens per step: the 100-token prompt is prefilled in chunks of two blocks, one batch each.
    sim = await start(kv_events=events_config(topic="kv@pod-a@m"), max_num_batched_tokens=32)
    sub = Subscriber(sim, b"kv@pod-a")  # a prefix of the topic, as ZeroMQ subscriptions go
    subscribers.append(sub)
    await sub.sync(http)

    prompt = text(1, 100)
    ids = list(prompt.encode())
    hashes = block_hashes(ids, BLOCK)
    assert len(hashes) == 6
    await complete(http, sim, prompt)
    stores = [await sub.events() for _ in range(3)]
    for chunk, batch in enumerate(stores):
        (event,) = batch
        first, end = 2 * chunk, 2 * chunk + 2
        assert event == {
            "type": "BlockStored",
            "block_hashes": hashes[first:end],
            "parent_block_hash": hashes[first - 1] if first else None,
            "token_ids": ids[first * BLOCK : end * BLOCK],
            "block_size": BLOCK,
            "lora_id": None,
            "medium": "GPU",
            "lora_name": None,
        }
        # The chain holds on the event's own fields: each hash covers its parent and its tokens.
        parent = event["parent_block_hash"]
        for i, h in enumerate(event["block_hashes"]):
            assert h == chained_hash(parent, event["token_ids"][i * BLOCK : (i + 1) * BLOCK])
            parent = h

    # A prompt sharing the first four blocks stores only its new fifth block, chained to the fourth.
    second = prompt[:64] + text(2, 16)
    ids2 = list(second.encode())
    body = await complete(http, sim, second)
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 64
    (event,) = await sub.events()
    assert event["type"] == "BlockStored"
    assert event["parent_block_hash"] == hashes[3]
    assert event["token_ids"] == ids2[64:80]
    assert event["block_hashes"] == block_hashes(ids2, BLOCK)[4:5]
    assert event["block_hashes"][0] == chained_hash(hashes[3], ids2[64:80])


async def test_a_prefix_computed_twice_at_once_is_stored_once(
    start: StartSim, http: aiohttp.ClientSession, subscribers: list[Subscriber]
) -> None:
    sim = await start(kv_events=events_config())
    sub = Subscriber(sim)
    subscribers.append(sub)
    await sub.sync(http)
    prompt = text(6, 4 * BLOCK)
    await asyncio.gather(*(complete(http, sim, prompt) for _ in range(3)))
    stored: list[int] = []
    while True:
        try:
            events = await sub.events(timeout=0.3)
        except TimeoutError:
            break
        stored += [h for e in events if e["type"] == "BlockStored" for h in e["block_hashes"]]
    # Whether the copies ran in one step (the later ones stay anonymous) or one after the other
    # (they hit), every block enters the cache, and the event stream, once.
    assert sorted(stored) == sorted(block_hashes(list(prompt.encode()), BLOCK))


async def test_eviction_sends_block_removed_for_the_evicted_hashes(
    start: StartSim, http: aiohttp.ClientSession, subscribers: list[Subscriber]
) -> None:
    sim = await start(kv_events=events_config(), kv_capacity_tokens=4 * BLOCK)
    sub = Subscriber(sim)
    subscribers.append(sub)
    await sub.sync(http)

    first = text(3, 3 * BLOCK)
    await complete(http, sim, first)
    (stored,) = await sub.events()
    hashes = block_hashes(list(first.encode()), BLOCK)
    assert stored["block_hashes"] == hashes

    # Three new blocks, four in the cache: one empty block, then the two least recently freed cached
    # ones, which are the first prompt's tail (a finished prompt is freed tail first, as in vLLM).
    second = text(4, 3 * BLOCK)
    await complete(http, sim, second)
    removed, stored2 = await sub.events()
    assert removed == {"type": "BlockRemoved", "block_hashes": [hashes[2], hashes[1]], "medium": "GPU"}
    assert stored2["type"] == "BlockStored" and stored2["block_hashes"] == block_hashes(list(second.encode()), BLOCK)
    assert (await stats(http, sim))["engine"]["evictions"] == 2

    # The surviving first block is still a hit; the evicted second one is not.
    body = await complete(http, sim, first[: 2 * BLOCK] + "!")
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == BLOCK


async def test_reset_and_start_send_all_blocks_cleared(
    start: StartSim, http: aiohttp.ClientSession, subscribers: list[Subscriber]
) -> None:
    sim = await start(kv_events=events_config())
    sub = Subscriber(sim)
    subscribers.append(sub)
    await sub.sync(http)
    await complete(http, sim, text(5, 40))
    assert (await sub.events())[0]["type"] == "BlockStored"
    async with http.post(sim.url + "/sim/reset") as resp:
        assert resp.status == 200
    assert await sub.events() == [{"type": "AllBlocksCleared"}]
    # The very first batch, published at start before anyone could subscribe, says the same.
    (first_reply, *_rest) = await sub.request_replay(0)
    topic, seq, payload = first_reply
    assert (topic, seq) == (b"", (0).to_bytes(8, "big"))
    assert decode_batch(payload)[1] == [{"type": "AllBlocksCleared"}]
    # After the reset the prompt is computed again and stored again.
    await complete(http, sim, text(5, 40))
    assert (await sub.events())[0]["type"] == "BlockStored"


# ---------------------------------------------------------------- sequence numbers and replay


async def test_sequence_numbers_are_consecutive_and_replay_returns_the_missed_batches(
    start: StartSim, http: aiohttp.ClientSession, subscribers: list[Subscriber]
) -> None:
    sim = await start(kv_events=events_config(topic="t", buffer_steps=1000))
    sub = Subscriber(sim, b"t")
    subscribers.append(sub)
    await sub.sync(http)
    for i in range(6):
        await complete(http, sim, text(10 + i, 50))
        await sub.recv()
    seqs = [seq for seq, _ in sub.received]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) and seqs[0] >= 1

    # A late subscriber asks for everything from 0: the batches it missed, byte for byte, in order.
    replies = await sub.request_replay(0)
    *batches, end = replies
    assert end == [b"", END_SEQ, b""]
    assert [int.from_bytes(seq, "big") for _, seq, _ in batches] == list(range(seqs[-1] + 1))
    assert all(topic == b"t" for topic, _, _ in batches)
    replayed = {int.from_bytes(seq, "big"): payload for _, seq, payload in batches}
    assert all(replayed[seq] == payload for seq, payload in sub.received)

    # From the middle: only what follows; past the end: just the end marker.
    middle = seqs[3]
    assert [int.from_bytes(s, "big") for _, s, _ in (await sub.request_replay(middle))[:-1]] == list(
        range(middle, seqs[-1] + 1)
    )
    assert await sub.request_replay(seqs[-1] + 100) == [[b"", END_SEQ, b""]]
    assert (await stats(http, sim))["kv_events"]["replays"] == 3


async def test_replay_keeps_only_the_last_buffer_steps_batches(
    start: StartSim, http: aiohttp.ClientSession, subscribers: list[Subscriber]
) -> None:
    sim = await start(kv_events=events_config(buffer_steps=3))
    sub = Subscriber(sim)
    subscribers.append(sub)
    for _ in range(5):
        async with http.post(sim.url + "/sim/reset") as resp:
            assert resp.status == 200
    replies = await sub.request_replay(0)
    assert [int.from_bytes(seq, "big") for _, seq, _ in replies[:-1]] == [3, 4, 5]


# ---------------------------------------------------------------- formats


async def test_map_payloads_decode_as_vllm_structs(
    start: StartSim, http: aiohttp.ClientSession, subscribers: list[Subscriber]
) -> None:
    sim = await start(kv_events=events_config(), kv_capacity_tokens=4 * BLOCK)
    sub = Subscriber(sim)
    subscribers.append(sub)
    await sub.sync(http)
    await complete(http, sim, text(20, 3 * BLOCK))
    await complete(http, sim, text(21, 3 * BLOCK))
    async with http.post(sim.url + "/sim/reset") as resp:
        assert resp.status == 200
    payloads = [(await sub.recv())[1] for _ in range(3)]
    typed = [map_decoder.decode(p) for p in payloads]
    assert [type(e).__name__ for b in typed for e in b.events] == [
        "MapBlockStored", "MapBlockRemoved", "MapBlockStored", "MapAllBlocksCleared",
    ]  # fmt: skip
    assert all(b.data_parallel_rank == 0 for b in typed)
    stored = typed[0].events[0]
    assert isinstance(stored, MapBlockStored)
    assert (stored.block_size, stored.medium, stored.group_idx, stored.kv_cache_spec_kind) == (
        BLOCK, "GPU", 0, "full_attention",
    )  # fmt: skip
    # The typed and the hand-walked decodings agree.
    for payload, batch in zip(payloads, typed, strict=True):
        walked = decode_batch(payload)[1]
        assert [e["type"] for e in walked] == [type(e).__name__.removeprefix("Map") for e in batch.events]
        assert walked[0].get("block_hashes") == getattr(batch.events[0], "block_hashes", None)


async def test_array_format_is_the_earlier_tagged_array_layout(
    start: StartSim, http: aiohttp.ClientSession, subscribers: list[Subscriber]
) -> None:
    sim = await start(kv_events=events_config(format="array"), kv_capacity_tokens=4 * BLOCK)
    sub = Subscriber(sim)
    subscribers.append(sub)
    await sub.sync(http)
    prompt = text(30, 3 * BLOCK)
    await complete(http, sim, prompt)
    await complete(http, sim, text(31, 3 * BLOCK))
    seq, payload = await sub.recv()
    raw = msgspec.msgpack.decode(payload)
    ids = list(prompt.encode())
    assert raw[1] == [["BlockStored", block_hashes(ids, BLOCK), None, ids, BLOCK, None, "GPU", None]]
    _, second = await sub.recv()
    walked = decode_batch(second, "array")[1]
    assert [e["type"] for e in walked] == ["BlockRemoved", "BlockStored"]
    # An array-era subscriber with the oldest struct (five BlockStored fields) reads both batches.
    old = array_decoder.decode(second)
    assert isinstance(old.events[0], ArrayBlockRemoved) and isinstance(old.events[1], ArrayBlockStored)
    assert old.events[1].token_ids == list(text(31, 3 * BLOCK).encode())
    # Replies before vLLM#45177: [seq, payload], and the end marker [END_SEQ, b""].
    replies = await sub.request_replay(seq)
    assert replies[0] == [seq.to_bytes(8, "big"), payload]
    assert replies[-1] == [END_SEQ, b""]


async def test_the_command_line_sim_publishes_and_replays(http: aiohttp.ClientSession) -> None:
    """``python -m extproc_router.simulator`` with vLLM's --kv-events-config (uvloop, as deployed)."""
    config = (
        '{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://127.0.0.1:0", '
        '"replay_endpoint": "tcp://127.0.0.1:0", "topic": "kv-events"}'
    )
    args = ["--port", "0", "--timing", "model", "--tokenizer", "bytes", "--decode-step-ms", "1",
            "--kv-events-config", config]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "extproc_router.simulator", *args], cwd=REPO_ROOT,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)  # fmt: skip
    assert proc.stderr is not None
    ctx = zmq.asyncio.Context.instance()
    replay = ctx.socket(zmq.DEALER)
    try:
        url = pub = rep = None
        for line in proc.stderr:
            if found := re.search(r"listening on (http://\S+)", line):
                url = found.group(1)
            if found := re.search(
                r"KV events on (tcp://\S+) \(replay: (tcp://\S+), topic 'kv-events', format map", line
            ):
                pub, rep = found.groups()
                break
        assert url and pub and rep, f"no KV events log line (exit code {proc.poll()})"
        async with http.post(url + COMPLETIONS, json={"prompt": "y" * 40, "max_tokens": 1}) as resp:
            assert resp.status == 200
        replay.connect(rep)
        # The replay catches up a subscriber that was not there: the start's clear, then the store.
        batches: list[list[bytes]] = []
        for _ in range(50):
            await replay.send_multipart([b"", (0).to_bytes(8, "big")])
            batches = []
            while (frames := await asyncio.wait_for(replay.recv_multipart(), 3.0))[-2] != END_SEQ:
                batches.append(frames[1:])
            if len(batches) >= 2:
                break
            await asyncio.sleep(0.05)
        assert [b[0] for b in batches] == [b"kv-events", b"kv-events"]
        kinds = [[e["type"] for e in decode_batch(b[2])[1]] for b in batches]
        assert kinds == [["AllBlocksCleared"], ["BlockStored"]]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.get_running_loop().run_in_executor(None, proc.wait, 10) == 0
    finally:
        replay.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()


# ---------------------------------------------------------------- configuration


def test_vllm_kv_events_config_json() -> None:
    config = kv_events_config_from_json(
        '{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:5557", '
        '"replay_endpoint": "tcp://*:5558", "topic": "kv@10.0.0.1@m", "buffer_steps": 50, "hwm": 10, '
        '"max_queue_size": 7}'
    )
    assert config == KVEventsConfig(
        endpoint="tcp://*:5557", replay_endpoint="tcp://*:5558", topic="kv@10.0.0.1@m", buffer_steps=50, hwm=10
    )
    # As in vLLM: publisher defaults to zmq when enabled; disabled or "null" means no events.
    assert kv_events_config_from_json('{"enable_kv_cache_events": true}') == KVEventsConfig()
    assert kv_events_config_from_json('{"enable_kv_cache_events": false, "publisher": "zmq"}') is None
    assert kv_events_config_from_json('{"enable_kv_cache_events": true, "publisher": "null"}') is None
    for bad, match in [
        ("[1]", "JSON object"),
        ("{", "not valid JSON"),
        ('{"enable_kv_cache_events": true, "color": 1}', "unknown keys color"),
        ('{"enable_kv_cache_events": true, "publisher": "kafka"}', "publisher"),
        ('{"enable_kv_cache_events": true, "endpoint": "http://x:1"}', "tcp://HOST:PORT"),
        ('{"enable_kv_cache_events": true, "endpoint": "tcp://x:99999"}', "PORT"),
        ('{"enable_kv_cache_events": true, "buffer_steps": 0}', "buffer_steps"),
        ('{"enable_kv_cache_events": "yes"}', "true or false"),
    ]:
        with pytest.raises(ValueError, match=match):
            kv_events_config_from_json(bad)


def _sim_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sim_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_command_line_options() -> None:
    config = sim_cli.config_from_args(
        _sim_args("--timing", "model", "--kv-events-endpoint", "tcp://127.0.0.1:5557", "--kv-events-topic", "kv")
    )
    assert config.kv_events == KVEventsConfig(endpoint="tcp://127.0.0.1:5557", topic="kv")
    # The options override vLLM's JSON field by field.
    config = sim_cli.config_from_args(
        _sim_args("--timing", "model", "--kv-events-config", '{"enable_kv_cache_events": true, "topic": "a"}',
                  "--kv-events-replay-endpoint", "tcp://127.0.0.1:5558", "--kv-events-format", "array")
    )  # fmt: skip
    assert config.kv_events == KVEventsConfig(replay_endpoint="tcp://127.0.0.1:5558", topic="a", format="array")
    assert sim_cli.config_from_args(_sim_args("--timing", "model")).kv_events is None
    with pytest.raises(ValueError, match="--timing model"):
        sim_cli.config_from_args(_sim_args("--kv-events-endpoint", "tcp://127.0.0.1:5557"))
    with pytest.raises(ValueError, match="need --kv-events-endpoint"):
        sim_cli.config_from_args(_sim_args("--timing", "model", "--kv-events-topic", "x"))


def test_fixed_timing_has_no_kv_events() -> None:
    with pytest.raises(ValueError, match="model timing"):
        SimServer(SimConfig(kv_events=KVEventsConfig()))


async def test_an_endpoint_taken_fails_the_start(start: StartSim) -> None:
    sim = await start(kv_events=events_config())
    assert sim.kv_events is not None
    with pytest.raises(OSError, match="cannot bind"):
        await start(kv_events=KVEventsConfig(endpoint=sim.kv_events.endpoint))


async def test_without_kv_events_no_tokens_are_kept(start: StartSim, http: aiohttp.ClientSession) -> None:
    sim = await start()
    assert sim.kv_events is None and (await stats(http, sim))["kv_events"] is None
    seq = sim._sequence("completion", {"prompt": "x" * 40}, _creq(), "sim-model", 1, None)
    assert seq.token_ids is None  # type: ignore[attr-defined]


def _creq() -> Any:
    from extproc_router.simulator.openai_format import parse_request

    return parse_request("completion", {"prompt": "x" * 40})
