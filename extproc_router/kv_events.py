"""Subscribing to the engines' KV-cache events: one ZeroMQ subscriber per ready pod that declares an
events endpoint, feeding the router's precise index (`routing/kv_index.py`).

The wire contract is vLLM's own (`vllm/distributed/kv_events.py`, `ZmqEventPublisher`):

* a PUB socket sends each batch as ``[topic, seq, payload]``: ``seq`` 8 bytes big-endian, counting
  from 0 without gaps; ``payload`` a msgpack ``KVEventBatch(ts, events[, data_parallel_rank])``;
* events are tagged msgspec structs: ``BlockStored(block_hashes, parent_block_hash, token_ids,
  block_size, lora_id, medium, lora_name, extra_keys, group_idx, ...)``, ``BlockRemoved(block_hashes,
  medium, group_idx)``, ``AllBlocksCleared()``; as arrays with the tag first (releases before
  vllm-project/vllm#42892) or as maps with a ``type`` key (since). Both are read, trailing fields
  unknown to us are ignored, block hashes may be integers or bytes;
* an optional ROUTER socket replays buffered batches from a start sequence number (one 8-byte frame
  after the empty delimiter); the replies are ``[seq, payload]`` (or ``[topic, seq, payload]``) and an
  end marker whose ``seq`` is -1.

Per pod: the SUB socket connects first, then a replay from 0 fetches what the publisher still
buffers (its answer, even empty, proves the publisher alive: the pod becomes precise). A sequence
gap is repaired through the replay socket; when the replay cannot fill it (no replay socket, no
answer in `replay_timeout`, buffer too short) the pod's state is dropped, because a missed removal
would leave the router claiming blocks the engine no longer holds. A sequence number going back
means the publisher restarted: its engine's cache is new, so is the pod's state. A batch or event
that does not decode is counted and dropped; nothing an engine sends ends the subscriber. A pod
that leaves the ready set is unsubscribed and its state dropped.

Everything runs on the router's event loop, reading a plain ZeroMQ socket woken by the loop's
reader on its FD; a burst is drained without awaiting, in slices of `_DRAIN_BATCHES` batches, so
requests keep being served while a backlog is applied, and after a wake that found batches the next
read comes `_COALESCE_S` later, so a steady stream costs one wake-up per few batches.

pyzmq and msgspec are imported when the first subscriber starts, not with this module.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extproc_router.discovery.static_file import ANNOTATION_KV_EVENTS_PORT, ANNOTATION_KV_EVENTS_REPLAY_PORT
from routing.kv_index import KvBlockIndex, MalformedEvent
from routing.pods import Pod
from routing.tokenizers import CHAT_FORMATS, CHAT_SIMULATOR, EngineTokenizer, make_engine_tokenizer

log = logging.getLogger("extproc_router.kv_events")

END_SEQ = (-1).to_bytes(8, "big", signed=True)
_DRAIN_BATCHES = 256  # batches applied per event-loop slice when a backlog is drained
# After a wake that found batches, the next read waits this long (a timer, not the socket): under a
# steady stream one wake-up then applies several batches. A wake costs about as much as applying a
# 64-block batch (measured), so this halves the CPU of a 50k block events/s stream for <= 5 ms of lag.
_COALESCE_S = 0.005
_MAX_MESSAGE_BYTES = 64 << 20  # a larger message is a broken publisher: ZeroMQ drops the connection
_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class KvEventSettings:
    """The subscribers' settings; RouterConfig's `kv_events_*` take their defaults from here."""

    enabled: bool = True  # EXTPROC_ROUTER_KV_EVENTS: subscribe to pods that declare an events port
    # EXTPROC_ROUTER_KV_EVENTS_TOKENIZERS: `MODEL=TOKENIZER[@FORMAT],...` (see parse_tokenizer_map).
    # Unset: no model has an engine tokenizer, every pod stays on the approximate index.
    tokenizers: str | None = None
    replay_timeout_ms: int = 1000  # EXTPROC_ROUTER_KV_EVENTS_REPLAY_TIMEOUT_MS; per replayed batch
    reconnect_backoff: tuple[float, float] = (0.5, 30.0)


# -- configuration --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TokenizerSpec:
    tokenizer: str  # cl100k, bytes, or a path to a tokenizer.json (or its directory)
    chat_format: str = CHAT_SIMULATOR


def parse_tokenizer_map(text: str | None) -> dict[str, TokenizerSpec]:
    """`MODEL=TOKENIZER[@FORMAT]` entries separated by commas; MODEL `*` stands for every other model.
    TOKENIZER: `cl100k`, `bytes` (UTF-8 bytes as ids), or a path to a model's tokenizer.json (or the
    directory holding it). FORMAT: how chats are rendered, one of CHAT_FORMATS (default simulator).
    ValueError names the bad entry."""
    out: dict[str, TokenizerSpec] = {}
    for raw in (text or "").split(","):
        entry = raw.strip()
        if not entry:
            continue
        model, sep, spec = entry.partition("=")
        model, spec = model.strip(), spec.strip()
        if not sep or not model or not spec:
            raise ValueError(f"kv_events_tokenizers: {entry!r} is not MODEL=TOKENIZER[@FORMAT]")
        tokenizer, _, fmt = spec.rpartition("@") if "@" in spec else (spec, "", CHAT_SIMULATOR)
        if fmt not in CHAT_FORMATS:
            raise ValueError(f"kv_events_tokenizers: {entry!r}: chat format {fmt!r} is not one of "
                             f"{', '.join(CHAT_FORMATS)}")
        if model in out:
            raise ValueError(f"kv_events_tokenizers: model {model!r} is listed twice")
        out[model] = TokenizerSpec(tokenizer.strip(), fmt)
    return out


def load_engine_tokenizers(specs: Mapping[str, TokenizerSpec]) -> tuple[dict[str, EngineTokenizer],
                                                                        EngineTokenizer | None]:
    """Build the tokenizers `specs` name, reading tokenizer.json files (never downloading anything):
    per model, and the `*` default. ValueError when a file is missing or unusable."""
    built: dict[TokenizerSpec, EngineTokenizer] = {}
    per_model: dict[str, EngineTokenizer] = {}
    for model, spec in specs.items():
        tok = built.get(spec)
        if tok is None:
            if spec.tokenizer in ("cl100k", "bytes"):
                tok = make_engine_tokenizer(spec.tokenizer, spec.chat_format)
            else:
                path = Path(spec.tokenizer)
                if path.is_dir():
                    path = path / "tokenizer.json"
                try:
                    text = path.read_text(encoding="utf-8")
                except OSError as exc:
                    raise ValueError(f"kv_events_tokenizers: {model}: cannot read {path}: {exc.strerror}") from None
                try:
                    tok = make_engine_tokenizer("", spec.chat_format, json_text=text)
                except ValueError as exc:
                    raise ValueError(f"kv_events_tokenizers: {model}: {path}: {exc}") from None
            built[spec] = tok
        per_model[model] = tok
    default = per_model.pop("*", None)
    return per_model, default


def events_endpoints(pod: Pod) -> tuple[str, str | None] | None:
    """The pod's PUB endpoint and replay endpoint, from the annotation (else label)
    `model.aibrix.ai/kv-events-port` (and `model.aibrix.ai/kv-events-replay-port`) on the pod's IP;
    None when the pod declares none (or a bad one: logged)."""
    port = _port(pod, ANNOTATION_KV_EVENTS_PORT)
    if port is None:
        return None
    host = pod.address.rpartition(":")[0]
    replay = _port(pod, ANNOTATION_KV_EVENTS_REPLAY_PORT)
    return f"tcp://{host}:{port}", (f"tcp://{host}:{replay}" if replay is not None else None)


def _port(pod: Pod, name: str) -> int | None:
    text = pod.annotations.get(name) or pod.labels.get(name)
    if not text:
        return None
    try:
        port = int(text)
        if not 0 < port < 65536:
            raise ValueError
    except ValueError:
        log.warning("pod %s: %s=%r is not a port; its KV events are not followed", pod.key, name, text)
        return None
    return port


# -- wire format ----------------------------------------------------------------------------------

class _Codec:
    """msgspec decoders for the batch layouts vLLM has used; the last one that worked is tried first."""

    def __init__(self) -> None:
        import msgspec

        self.msgspec = msgspec
        any_hash = int | bytes

        def events(array_like: bool) -> tuple[type, type, type]:
            opts: dict[str, Any] = {"array_like": True} if array_like else {"tag_field": "type"}
            stored = msgspec.defstruct("BlockStored", [
                ("block_hashes", list[any_hash]), ("parent_block_hash", any_hash | None), ("token_ids", list[int]),
                ("block_size", int), ("lora_id", int | None, None), ("medium", str | None, None),
                ("lora_name", str | None, None), ("extra_keys", list[Any] | None, None),
                ("group_idx", int | None, None)], tag="BlockStored", gc=False, **opts)
            removed = msgspec.defstruct("BlockRemoved", [
                ("block_hashes", list[any_hash]), ("medium", str | None, None), ("group_idx", int | None, None)],
                tag="BlockRemoved", gc=False, **opts)
            cleared = msgspec.defstruct("AllBlocksCleared", [], tag="AllBlocksCleared", gc=False, **opts)
            return stored, removed, cleared

        self.array_events = events(True)
        self.map_events = events(False)
        self.stored_types = (self.array_events[0], self.map_events[0])
        self.removed_types = (self.array_events[1], self.map_events[1])
        decoders = []
        for batch_array in (True, False):
            for evs in (self.array_events, self.map_events):
                batch = msgspec.defstruct("KVEventBatch", [
                    ("ts", float), ("events", list[evs[0] | evs[1] | evs[2]]),  # type: ignore[valid-type]
                    ("data_parallel_rank", int | None, None)], gc=False, array_like=batch_array)
                decoders.append(msgspec.msgpack.Decoder(batch))
        self._decoders = decoders
        self._generic = msgspec.msgpack.Decoder()

    def decode(self, payload: bytes) -> tuple[float, list[Any], int]:
        """(ts, decodable events, events dropped as malformed). ValueError when the batch itself
        does not decode."""
        decoders = self._decoders
        for i, decoder in enumerate(decoders):
            try:
                batch = decoder.decode(payload)
            except (self.msgspec.ValidationError, self.msgspec.DecodeError):
                continue
            if i:
                decoders.insert(0, decoders.pop(i))
            return batch.ts, batch.events, 0
        return self._decode_leniently(payload)

    def _decode_leniently(self, payload: bytes) -> tuple[float, list[Any], int]:
        """Event by event: a batch with one bad event keeps its good ones."""
        try:
            raw = self._generic.decode(payload)
        except self.msgspec.DecodeError as exc:
            raise ValueError(f"not msgpack: {exc}") from None
        if isinstance(raw, dict):
            ts, events = raw.get("ts"), raw.get("events")
        elif isinstance(raw, list) and len(raw) >= 2:
            ts, events = raw[0], raw[1]
        else:
            raise ValueError("not a KVEventBatch")
        if not isinstance(ts, int | float) or isinstance(ts, bool) or not isinstance(events, list):
            raise ValueError("not a KVEventBatch")
        good: list[Any] = []
        bad = 0
        for event in events:
            family = self.map_events if isinstance(event, dict) else self.array_events
            try:
                good.append(self.msgspec.convert(event, family[0] | family[1] | family[2]))
            except self.msgspec.ValidationError:
                bad += 1
        return float(ts), good, bad


# -- one pod ----------------------------------------------------------------------------------------

@dataclass(slots=True)
class SubscriberStats:
    """One pod's subscriber counters (exported per pod by `KvEventCollector`)."""

    model: str
    pod: str  # the pod's name
    batches: int = 0
    events: int = 0  # events applied
    malformed_batches: int = 0
    malformed_events: int = 0
    duplicates: int = 0  # batches seen twice (live after a replay that had them)
    gaps: int = 0
    replays: int = 0  # replays that filled what was asked
    replay_failures: int = 0  # no answer in time
    replay_truncated: int = 0  # the publisher's buffer no longer held what was missed
    state_drops: dict[str, int] = field(default_factory=dict)  # reason -> times the pod's state was dropped
    restarts: int = 0  # sequence numbers went back: the publisher restarted
    connected: bool = False
    lag_buckets: list[int] = field(default_factory=lambda: [0] * (len(_LAG_BUCKETS) + 1))
    lag_sum: float = 0.0
    lag_count: int = 0

    def observe_lag(self, lag: float) -> None:
        i = 0
        while i < len(_LAG_BUCKETS) and lag > _LAG_BUCKETS[i]:
            i += 1
        self.lag_buckets[i] += 1
        self.lag_sum += lag
        self.lag_count += 1


class PodSubscriber:
    """Follows one pod's events into the index until cancelled; see the module docstring."""

    def __init__(self, pod: Pod, endpoint: str, replay_endpoint: str | None, index: KvBlockIndex, ctx: Any,
                 codec: _Codec, settings: KvEventSettings, clock: Callable[[], float] = time.time) -> None:
        self.pod = pod
        self.key = pod.key
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.index = index
        self.stats = SubscriberStats(pod.model, pod.name)
        self._ctx = ctx
        self._codec = codec
        self._settings = settings
        self._clock = clock
        self._last: int | None = None  # last applied sequence number
        self._after_replay = False  # batches at or below _last are duplicates until the stream is in order
        self._dealer: Any = None
        self._warned = False

    async def run(self) -> None:
        """Subscribe, sync, follow; reconnect with backoff after a failure. Only cancellation ends it."""
        lo, hi = self._settings.reconnect_backoff
        delay = lo
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the subscriber must outlive anything: drop state, retry
                log.warning("KV events of pod %s (%s): %s; reconnecting in %.1fs", self.key, self.endpoint,
                            str(exc) or type(exc).__name__, delay)
                self._drop_state("error")
            finally:
                self.stats.connected = False
                self.index.set_precise(self.key, False)
                self._close_dealer()
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, hi)

    async def _session(self) -> None:
        import zmq

        # A plain socket woken by the event loop's reader on its FD: zmq.asyncio's future per receive
        # cost more than applying a typical batch (measured: ~40% of the loop's ingest CPU at 50k
        # block events/s).
        sub = zmq.Context.shadow(self._ctx.underlying).socket(zmq.SUB)
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        fd: int | None = None
        try:
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.RCVHWM, 100_000)
            sub.setsockopt(zmq.MAXMSGSIZE, _MAX_MESSAGE_BYTES)
            if self.endpoint.startswith("tcp://["):
                sub.setsockopt(zmq.IPV6, 1)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(self.endpoint)
            fd = sub.getsockopt(zmq.FD)
            loop.add_reader(fd, readable.set)
            self.stats.connected = True
            # Whatever the publisher still buffers; an answer, even empty, proves it alive.
            if self.replay_endpoint is not None and await self._replay(0, initial=True):
                self.index.set_precise(self.key, True)
            noblock, pollin, events = int(zmq.NOBLOCK), int(zmq.POLLIN), zmq.EVENTS
            again = zmq.Again
            recv = sub.recv_multipart
            budget = _DRAIN_BATCHES
            got = False  # batches read since the last wait
            while True:
                try:
                    frames = recv(noblock)
                except again:
                    if got:
                        got = False
                        # Not watched meanwhile: ZeroMQ's signal FD stays readable until the socket
                        # is read, and a watched one would spin the loop for the whole pause.
                        loop.remove_reader(fd)
                        try:
                            await asyncio.sleep(_COALESCE_S)
                        finally:
                            loop.add_reader(fd, readable.set)
                        continue
                    # The FD is edge-triggered: wait only once ZeroMQ says nothing is left to read.
                    readable.clear()
                    if sub.getsockopt(events) & pollin:
                        continue
                    await readable.wait()
                    budget = _DRAIN_BATCHES
                    continue
                got = True
                await self._on_message(frames)
                budget -= 1
                if budget == 0:
                    await asyncio.sleep(0)  # let requests through a backlog
                    budget = _DRAIN_BATCHES
        finally:
            if fd is not None:
                loop.remove_reader(fd)
            sub.close(linger=0)

    async def _on_message(self, frames: list[bytes]) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self.stats.malformed_batches += 1
            return
        seq = int.from_bytes(frames[1], "big")
        if self._last is not None and seq <= self._last:
            if self._after_replay:  # still reading what the replay already applied
                self.stats.duplicates += 1
                return
            # The publisher counts from 0 again: a new engine, an empty cache.
            self.stats.restarts += 1
            log.info("KV events of pod %s: sequence went back from %d to %d (publisher restarted); its blocks "
                     "are dropped", self.key, self._last, seq)
            self._drop_state("restart")
            self._last = None
        if self._last is None:
            if seq > 0 and self.replay_endpoint is not None:
                # The stream's start was missed (published before the SUB socket joined).
                self.stats.gaps += 1
                await self._repair(0, seq, had_state=False)
        elif seq > self._last + 1:
            self.stats.gaps += 1
            await self._repair(self._last + 1, seq, had_state=True)
        if self._last is not None and seq <= self._last:
            self.stats.duplicates += 1  # the replay had it
            return
        self._apply(seq, frames[2])
        self._after_replay = False
        self.index.set_precise(self.key, True)

    async def _repair(self, expected: int, seq: int, *, had_state: bool) -> None:
        """Fill the batches from `expected` up to `seq` through the replay socket; when that fails the
        pod's state is dropped (a missed BlockRemoved would leave blocks claimed that the engine no
        longer holds) and the stream restarts at `seq`."""
        if await self._replay(expected, initial=not had_state) and self._last is not None and self._last >= seq - 1:
            return
        if had_state or self._last is not None:
            self._drop_state("gap")
        self._last = None

    def _apply(self, seq: int, payload: bytes) -> None:
        self._last = seq
        stats = self.stats
        try:
            ts, events, bad = self._codec.decode(payload)
        except ValueError as exc:
            stats.malformed_batches += 1
            self._warn(f"batch {seq} does not decode ({exc}); dropped")
            return
        stats.malformed_events += bad
        index, key = self.index, self.key
        stored_types, removed_types = self._codec.stored_types, self._codec.removed_types
        applied = 0
        for ev in events:
            try:
                if isinstance(ev, stored_types):
                    index.store(key, ev.block_hashes, ev.parent_block_hash, ev.token_ids, ev.block_size,
                                lora_name=ev.lora_name, lora_id=ev.lora_id, medium=ev.medium, group=ev.group_idx,
                                extra_keys=ev.extra_keys)
                elif isinstance(ev, removed_types):
                    index.remove(key, ev.block_hashes, medium=ev.medium, group=ev.group_idx)
                else:
                    index.clear_pod(key, self._clock())
                applied += 1
            except (MalformedEvent, TypeError, ValueError) as exc:
                stats.malformed_events += 1
                self._warn(f"event dropped: {exc}")
        stats.batches += 1
        stats.events += applied
        lag = self._clock() - ts
        if -3600.0 < lag < 3600.0:  # a clock that far off says nothing about lag
            stats.observe_lag(max(0.0, lag))

    async def _replay(self, start: int, *, initial: bool = False) -> bool:
        """Ask the replay socket for every batch from `start` and apply them in order. True when the
        stream is now contiguous from `start` (or from the buffer's start on the initial sync)."""
        if self.replay_endpoint is None:
            return False
        import zmq

        if self._dealer is None:
            dealer = self._ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.setsockopt(zmq.MAXMSGSIZE, _MAX_MESSAGE_BYTES)
            if self.replay_endpoint.startswith("tcp://["):
                dealer.setsockopt(zmq.IPV6, 1)
            dealer.connect(self.replay_endpoint)
            self._dealer = dealer
        dealer = self._dealer
        timeout = self._settings.replay_timeout_ms / 1000
        await dealer.send_multipart([b"", start.to_bytes(8, "big")])
        first = True
        contiguous = True
        try:
            while True:
                frames = await asyncio.wait_for(dealer.recv_multipart(), timeout)
                body = frames[1:] if frames and frames[0] == b"" else frames
                if len(body) == 3:
                    body = body[1:]  # [topic, seq, payload]
                if len(body) != 2 or len(body[0]) != 8:
                    self.stats.malformed_batches += 1
                    continue
                seq_bytes, payload = body
                if seq_bytes == END_SEQ:
                    break
                seq = int.from_bytes(seq_bytes, "big")
                if first:
                    first = False
                    if seq > start and not initial:
                        # The buffer no longer holds what was missed: rebuild from what it has.
                        self.stats.replay_truncated += 1
                        self._drop_state("gap")
                        contiguous = False
                if self._last is not None and seq <= self._last:
                    continue
                self._apply(seq, payload)
        except TimeoutError:
            self.stats.replay_failures += 1
            log.warning("KV events of pod %s: no replay answer from %s in %.1fs", self.key, self.replay_endpoint,
                        timeout)
            self._close_dealer()  # a late answer must not be read as the next replay's
            return False
        if contiguous:
            self.stats.replays += 1
        self._after_replay = True
        return True

    def _drop_state(self, reason: str) -> None:
        self.stats.state_drops[reason] = self.stats.state_drops.get(reason, 0) + 1
        self.index.clear_pod(self.key, self._clock())

    def _close_dealer(self) -> None:
        if self._dealer is not None:
            self._dealer.close(linger=0)
            self._dealer = None

    def _warn(self, message: str) -> None:
        if not self._warned:  # once per subscriber: a broken publisher must not flood the log
            self._warned = True
            log.warning("KV events of pod %s: %s (further problems are only counted)", self.key, message)


# -- all pods ----------------------------------------------------------------------------------------

class KvEventSubscribers:
    """A subscriber for every ready pod that declares an events endpoint; `set_pods` on each snapshot."""

    def __init__(self, index: KvBlockIndex, settings: KvEventSettings | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.index = index
        self.settings = settings or KvEventSettings()
        self._clock = clock
        self._subs: dict[str, tuple[PodSubscriber, asyncio.Task[None]]] = {}
        self._stopping: set[asyncio.Task[None]] = set()  # cancelled, not yet finished
        self._ctx: Any = None
        self._codec: _Codec | None = None
        self._pending: list[Pod] | None = None
        self._started = False
        self.unavailable: str | None = None  # why subscribing is impossible (a missing package)

    async def start(self) -> None:
        self._started = True
        if self._pending is not None:
            self.set_pods(self._pending)

    async def stop(self) -> None:
        self._started = False
        tasks = [t for _, t in self._subs.values()] + list(self._stopping)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for key in list(self._subs):
            self.index.forget_pod(key)
        self._subs.clear()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    def set_pods(self, pods: Iterable[Pod]) -> None:
        """The ready pods: follow those with an endpoint, drop the others (and their blocks)."""
        pods = list(pods)
        if not self._started:
            self._pending = pods
            return
        wanted: dict[str, tuple[Pod, str, str | None]] = {}
        if self.settings.enabled:
            for pod in pods:
                ends = events_endpoints(pod)
                if ends is not None:
                    wanted[pod.key] = (pod, *ends)
        for key in list(self._subs):
            sub, task = self._subs[key]
            target = wanted.get(key)
            if target is None or (target[1], target[2], target[0].model) != (sub.endpoint, sub.replay_endpoint,
                                                                              sub.pod.model):
                task.cancel()
                self._stopping.add(task)
                task.add_done_callback(self._stopping.discard)
                del self._subs[key]
                dropped = self.index.forget_pod(key)
                log.info("KV events of pod %s: unsubscribed (%d blocks dropped)", key, dropped)
        if wanted and not self._ensure_zmq():
            return
        for key, (pod, endpoint, replay) in wanted.items():
            if key in self._subs:
                continue
            self.index.track_pod(key, pod.model)
            if self.index.tokenizer_for(pod.model) is None:
                log.warning("pod %s publishes KV events but model %s has no engine tokenizer "
                            "(EXTPROC_ROUTER_KV_EVENTS_TOKENIZERS): it is routed by the approximate index",
                            key, pod.model)
            assert self._codec is not None
            sub = PodSubscriber(pod, endpoint, replay, self.index, self._ctx, self._codec, self.settings,
                                clock=self._clock)
            self._subs[key] = (sub, asyncio.get_running_loop().create_task(sub.run(), name=f"kv-events-{key}"))
            log.info("KV events of pod %s: subscribing to %s (replay %s)", key, endpoint, replay or "none")

    def _ensure_zmq(self) -> bool:
        if self._ctx is not None:
            return True
        if self.unavailable is not None:
            return False
        try:
            import zmq.asyncio

            self._codec = _Codec()
        except ImportError as exc:
            self.unavailable = f"{exc.name} is not installed"
            log.warning("pods declare KV-events endpoints but %s: they are routed by the approximate index",
                        self.unavailable)
            return False
        self._ctx = zmq.asyncio.Context()
        return True

    def subscriber(self, pod_key: str) -> PodSubscriber | None:
        entry = self._subs.get(pod_key)
        return entry[0] if entry is not None else None

    def all_stats(self) -> list[SubscriberStats]:
        """The followed pods' counters (a pod no longer followed leaves the metrics, as it leaves the index)."""
        return [s.stats for s, _ in self._subs.values()]

    def collector(self) -> KvEventCollector:
        return KvEventCollector(self)


class KvEventCollector:
    """Prometheus collector of the subscribers' counters (register it on the router's registry)."""

    def __init__(self, subscribers: KvEventSubscribers) -> None:
        self._subs = subscribers

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        labels = ["model", "pod"]
        batches = CounterMetricFamily("extproc_kv_events_batches", "KV-event batches received per pod, by outcome: "
                                      "applied, malformed (dropped), duplicate.", labels=[*labels, "outcome"])
        events = CounterMetricFamily("extproc_kv_events_events", "KV events per pod, by outcome: applied, malformed "
                                     "(counted and dropped).", labels=[*labels, "outcome"])
        gaps = CounterMetricFamily("extproc_kv_events_gaps", "Sequence gaps detected per pod.", labels=labels)
        replays = CounterMetricFamily("extproc_kv_events_replays", "Replays per pod, by result: ok, truncated (the "
                                      "publisher's buffer was too short), failed (no answer).",
                                      labels=[*labels, "result"])
        drops = CounterMetricFamily("extproc_kv_events_state_drops", "Times a pod's precise state was dropped, by "
                                    "reason: gap (not repairable), restart (sequence went back), error.",
                                    labels=[*labels, "reason"])
        connected = GaugeMetricFamily("extproc_kv_events_subscribed", "1 while the router is subscribed to the "
                                      "pod's KV events.", labels=labels)
        lag = HistogramMetricFamily("extproc_kv_events_lag_seconds", "Time from a batch's timestamp (publisher "
                                    "clock) to its application in the index.", labels=labels)
        for st in self._subs.all_stats():
            lv = [st.model, st.pod]
            batches.add_metric([*lv, "applied"], st.batches)
            batches.add_metric([*lv, "malformed"], st.malformed_batches)
            batches.add_metric([*lv, "duplicate"], st.duplicates)
            events.add_metric([*lv, "applied"], st.events)
            events.add_metric([*lv, "malformed"], st.malformed_events)
            gaps.add_metric(lv, st.gaps)
            replays.add_metric([*lv, "ok"], st.replays)
            replays.add_metric([*lv, "truncated"], st.replay_truncated)
            replays.add_metric([*lv, "failed"], st.replay_failures)
            for reason in ("gap", "restart", "error"):
                drops.add_metric([*lv, reason], st.state_drops.get(reason, 0))
            connected.add_metric(lv, 1.0 if st.connected else 0.0)
            cumulative, buckets = 0, []
            for bound, n in zip((*_LAG_BUCKETS, float("inf")), st.lag_buckets, strict=True):
                cumulative += n
                buckets.append((str(bound) if bound != float("inf") else "+Inf", cumulative))
            lag.add_metric(lv, buckets, st.lag_sum)
        yield from (batches, events, gaps, replays, drops, connected, lag)


def cpu_seconds() -> float:
    """This process's CPU time (user + system), for benchmarks."""
    t = os.times()
    return t.user + t.system
