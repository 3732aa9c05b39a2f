"""Publishing a simulated pod's KV-cache events over ZeroMQ, the way vLLM's ``ZmqEventPublisher`` does.

Sockets and framing (``vllm/distributed/kv_events.py``):

* a PUB socket sends each batch as a three-frame message ``[topic, seq, payload]``: ``topic`` the
  configured topic (UTF-8, default empty), ``seq`` the batch's sequence number as 8 bytes
  big-endian, counting from 0 with no gaps, ``payload`` the msgpack batch of
  `simulator.kv_events.encode_batch`. Subscribers filter on the topic prefix as usual;
* an optional ROUTER socket serves replays from a buffer of the last ``buffer_steps`` batches. A
  client (REQ, or DEALER sending an empty delimiter first) sends one frame, the first sequence
  number it wants as 8 bytes big-endian. It gets one message per buffered batch with ``seq`` >=
  that number, then an end marker whose sequence frame is -1 (8 bytes 0xff) and whose payload is
  empty. With the ``map`` format a reply is ``[topic, seq, payload]`` and the end marker
  ``[b"", END_SEQ, b""]`` (vLLM since vllm-project/vllm#45177); with ``array`` a reply is
  ``[seq, payload]`` and the end marker ``[END_SEQ, b""]`` (earlier releases).

Everything runs on the pod's event loop: a batch is encoded and handed to ZeroMQ (which never
blocks a PUB socket: past the high-water mark it drops) in the engine step that produced it, and
replay requests are answered by one task. The step loop thus pays ~30 µs per 1k stored tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from itertools import count
from typing import Any

import zmq
import zmq.asyncio

from extproc_router.simulator.config import KVEventsConfig
from extproc_router.simulator.kv_events import ALL_BLOCKS_CLEARED, Event, encode_batch

__all__ = ["END_SEQ", "KVEventPublisher"]

log = logging.getLogger("simulator.kv_events")

END_SEQ = (-1).to_bytes(8, "big", signed=True)
"""The sequence frame of the end-of-replay marker."""


def _bindable(endpoint: str) -> str:
    """ZeroMQ binds any free port for ``*``; accept the usual 0 as well."""
    if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
        return endpoint[:-1] + "*"
    return endpoint


class KVEventPublisher:
    """A PUB socket for the batches and, when configured, a ROUTER socket serving replays."""

    def __init__(self, config: KVEventsConfig, data_parallel_rank: int = 0) -> None:
        self.config = config
        self.data_parallel_rank = data_parallel_rank
        self.endpoint = config.endpoint
        """The PUB address once bound (a port of 0 resolved), e.g. ``tcp://127.0.0.1:41234``."""
        self.replay_endpoint = config.replay_endpoint
        """The ROUTER address once bound; None without replay."""
        self.batches = 0
        """Batches published (the next sequence number)."""
        self.events = 0
        """Events published in them."""
        self.replays = 0
        """Replay requests answered."""
        self._topic = config.topic.encode("utf-8")
        self._seq = count()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._ctx: zmq.asyncio.Context | None = None
        self._pub: zmq.Socket | None = None
        self._replay: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind the sockets and start answering replays; OSError when an endpoint cannot be bound."""
        sync_ctx = zmq.Context.instance()
        # One ZeroMQ context (one I/O thread) per process; the asyncio view shares it.
        self._ctx = zmq.asyncio.Context.shadow(sync_ctx.underlying)
        try:
            pub = sync_ctx.socket(zmq.PUB)
            self._pub = pub
            pub.setsockopt(zmq.SNDHWM, self.config.hwm)
            pub.setsockopt(zmq.LINGER, 0)
            self.endpoint = self._bind(pub, self.config.endpoint)
            if self.config.replay_endpoint is not None:
                replay = self._ctx.socket(zmq.ROUTER)
                self._replay = replay
                replay.setsockopt(zmq.LINGER, 0)
                self.replay_endpoint = self._bind(replay, self.config.replay_endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise OSError(f"cannot bind the KV events sockets: {exc}") from exc
        if self._replay is not None:
            self._replay_task = asyncio.get_running_loop().create_task(self._serve_replays(), name="kv-events-replay")

    @staticmethod
    def _bind(socket: Any, endpoint: str) -> str:
        if endpoint.startswith("tcp://[") or "::" in endpoint:
            socket.setsockopt(zmq.IPV6, 1)
        try:
            socket.bind(_bindable(endpoint))
        except zmq.ZMQError as exc:
            raise zmq.ZMQError(exc.errno, f"{endpoint}: {exc.strerror}") from None
        return socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def publish(self, events: Sequence[Event]) -> int:
        """Send one batch of ``events`` now; returns its sequence number."""
        seq = next(self._seq)
        payload = encode_batch(time.time(), events, self.config.format, self.data_parallel_rank)
        self._buffer.append((seq, payload))
        self.batches += 1
        self.events += len(events)
        pub = self._pub
        if pub is not None:
            # A PUB socket never blocks: past the high-water mark ZeroMQ drops the message.
            with contextlib.suppress(zmq.Again):
                pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload), flags=zmq.NOBLOCK)
        return seq

    def publish_cleared(self) -> int:
        """Send a batch holding one AllBlocksCleared (at start, and after a reset)."""
        return self.publish([(ALL_BLOCKS_CLEARED,)])

    def stats(self) -> dict[str, Any]:
        """What ``GET /sim/stats`` shows under ``kv_events``."""
        return {
            "endpoint": self.endpoint,
            "replay_endpoint": self.replay_endpoint,
            "topic": self.config.topic,
            "format": self.config.format,
            "batches": self.batches,
            "events": self.events,
            "replays": self.replays,
        }

    async def _serve_replays(self) -> None:
        replay = self._replay
        assert replay is not None
        while True:
            frames = await replay.recv_multipart()
            try:
                await self._answer(replay, frames)
            except asyncio.CancelledError:
                raise
            except Exception:  # a broken request must not end the replay service
                log.exception("KV events replay request failed")

    async def _answer(self, replay: zmq.asyncio.Socket, frames: list[bytes]) -> None:
        # [identity, b"", start] from a REQ client (vLLM's form), [identity, start] from a bare DEALER.
        if len(frames) == 3 and frames[1] == b"":
            envelope = [frames[0], b""]
        elif len(frames) == 2:
            envelope = [frames[0]]
        else:
            log.warning("KV events replay: ignoring a request of %d frames", len(frames))
            return
        start_bytes = frames[-1]
        if not 1 <= len(start_bytes) <= 8:
            log.warning("KV events replay: the start sequence number must be 8 bytes, got %d", len(start_bytes))
            return
        start = int.from_bytes(start_bytes, "big")
        with_topic = self.config.format == "map"
        self.replays += 1
        # A snapshot: batches published while we send are not part of this replay.
        for seq, payload in [item for item in self._buffer if item[0] >= start]:
            head = [self._topic] if with_topic else []
            await replay.send_multipart([*envelope, *head, seq.to_bytes(8, "big"), payload])
        await replay.send_multipart([*envelope, *([b""] if with_topic else []), END_SEQ, b""])

    def close(self) -> None:
        """Close the sockets (no linger) and stop answering replays."""
        if self._replay_task is not None:
            self._replay_task.cancel()
            self._replay_task = None
        for socket in (self._pub, self._replay):
            if socket is not None:
                socket.close(linger=0)
        self._pub = None
        self._replay = None

    async def aclose(self) -> None:
        """`close`, waiting for the replay task to end."""
        task = self._replay_task
        self.close()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, zmq.ZMQError):
                await task
