"""Prefill/decode disaggregation for the simulated pod: the wire fields, SGLang bootstrap rooms,
and the decode pod's calls to its prefill pod. `simulator.server` wires this to HTTP; the
engines (`simulator.batching`, `simulator.engine`) do the timing and the KV holds.

A pod's ``--role`` decides what it does with the fields; a ``combined`` pod ignores them all,
as vLLM without a KV connector does.

**vLLM style** (what the router's ``ext_proc.prefill`` sends, as AIBrix's and vllm-router's do):

* a prefill pod given ``kv_transfer_params.do_remote_decode == true`` runs the prefill only (one
  output token), keeps the prompt's KV blocks pinned for the decode pod (``--kv-hold-seconds``),
  and answers a normal non-streaming completion whose body also carries::

      "kv_transfer_params": {"do_remote_prefill": true, "do_remote_decode": false,
                             "remote_engine_id": <pod name>, "remote_block_ids": [<full blocks>],
                             "remote_host": <IP the request came in on>, "remote_port": <HTTP port>,
                             "tp_size": 1}

  ``remote_port`` is the pod's HTTP port (vLLM gives its NIXL side channel) because that is where
  the decode pod's release notification goes. Block ids are the full prompt blocks; a prompt
  shorter than one block offers none and holds nothing (as vLLM's NIXL connector).
* a decode pod given ``kv_transfer_params.do_remote_prefill == true`` (also found inside an
  AIBrix-style ``disagg_prefill_resp``) skips the prefill compute: the prompt's KV, less what its
  own prefix cache holds, arrives at ``--kv-transfer-ms-per-1k-tokens``, then one step computes
  the last prompt token. Once its first token is out (the transfer is done) it tells the prefill
  pod, fire-and-forget: ``POST http://<remote_host>:<remote_port>/sim/kv/release`` with
  ``{"block_ids": [...], "engine_id": <remote_engine_id>}``, which ends the hold. Without the
  fields a decode pod does its own prefill.
* usage: as vLLM's ``num_cached_tokens``, a decode pod reports local prefix hits *plus* the
  transferred tokens as ``cached_tokens`` (prompt length - 1 when the whole prompt came from the
  prefill pod), while ``vllm:prefix_cache_*`` counts local hits only and the transferred tokens
  go to ``vllm:external_prefix_cache_*``.

**SGLang style** (sglang-router, and the router's ``engine: sglang``): both pods get the same
request with ``bootstrap_host``/``bootstrap_port``/``bootstrap_room``. The prefill pod runs the
prefill only, answering as usual (one token, streamed if asked), and files the KV under the room.
The decode pod waits for that room by asking ``GET http://<bootstrap_host>:<bootstrap_port>/sim/
kv/room/<room>?wait_s=S`` (a long poll: the prefill pod answers as soon as the room is ready or
after S seconds), then decodes with the transfer cost, and releases with ``{"room": <room>}``.
No room ready within ``--bootstrap-timeout-s``, or a failed prefill: 503. SGLang's bootstrap
server listens on its own port; a prefill sim opens one (``--bootstrap-port``, 8998 by default)
that answers the room and release endpoints, and its HTTP port answers them as well, so a
deployment can also point ``bootstrap_port`` at the HTTP port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from extproc_router.simulator.config import Role
from extproc_router.simulator.openai_format import RequestError

__all__ = ["BootstrapError", "Disagg", "PeerClient", "Room", "Rooms", "parse_disagg", "transfer_fields"]

log = logging.getLogger("simulator.disagg")

ROOM_PATH = "/sim/kv/room/{room}"
RELEASE_PATH = "/sim/kv/release"

MAX_WAIT_S = 30.0
"""Longest server-side wait of one room long poll."""

_POLL_S = 5.0
"""Server-side wait a decode pod asks for per long poll; it polls again until its deadline."""

_RETRY_S = 0.05
"""Pause before asking again when the prefill pod could not be reached."""

_RELEASE_TIMEOUT_S = 5.0

_BOOTSTRAP_FIELDS = ("bootstrap_host", "bootstrap_port", "bootstrap_room")


@dataclass(slots=True)
class Disagg:
    """What a request asks of this pod's disaggregation role."""

    mode: Literal["prefill", "decode"]
    style: Literal["vllm", "sglang"]
    remote_host: str | None = None
    """vLLM decode: the prefill pod to notify; SGLang decode: its bootstrap host."""
    remote_port: int | None = None
    remote_engine_id: str | None = None
    block_ids: list[int] = field(default_factory=list)
    """vLLM decode: the prefill pod's offered blocks (``remote_block_ids``)."""
    room: int | None = None
    """SGLang: the bootstrap room shared by the two halves."""
    released: bool = False
    """Decode: the prefill pod has been told to drop its hold."""

    @property
    def prefill(self) -> bool:
        """This pod runs the prefill half."""
        return self.mode == "prefill"

    @property
    def decode(self) -> bool:
        """This pod runs the decode half with transferred KV."""
        return self.mode == "decode"


def transfer_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The disaggregation fields present in a request body, as sent (recorded in ``/sim/stats``)."""
    found = {name: body[name] for name in _BOOTSTRAP_FIELDS if name in body}
    for name in ("kv_transfer_params", "disagg_prefill_resp"):
        if name in body:
            found[name] = body[name]
    return found


def parse_disagg(body: dict[str, Any], role: Role) -> Disagg | None:
    """What ``body`` asks of a pod with ``role``; None for a plain request (or fields the role ignores).

    Raises RequestError (400) for malformed fields.
    """
    if role == "combined":
        return None
    params = body.get("kv_transfer_params")
    if params is None:
        # AIBrix with the nixl connector forwards the whole prefill reply instead.
        resp = body.get("disagg_prefill_resp")
        if isinstance(resp, dict):
            params = resp.get("kv_transfer_params")
    if params is not None:
        if not isinstance(params, dict):
            raise RequestError(400, "'kv_transfer_params' must be an object", param="kv_transfer_params")
        if role == "prefill" and params.get("do_remote_decode") is True:
            return Disagg("prefill", "vllm")
        if role == "decode" and params.get("do_remote_prefill") is True:
            return _vllm_decode(params)
    room = _room(body.get("bootstrap_room"))
    if room is None:
        return None
    if role == "prefill":
        return Disagg("prefill", "sglang", room=room)
    host, port = body.get("bootstrap_host"), body.get("bootstrap_port")
    if not isinstance(host, str) or not host or not _is_port(port):
        raise RequestError(
            400, "'bootstrap_room' needs 'bootstrap_host' (a string) and 'bootstrap_port'", param="bootstrap_host"
        )
    return Disagg("decode", "sglang", remote_host=host, remote_port=port, room=room)


def _vllm_decode(params: dict[str, Any]) -> Disagg:
    block_ids = params.get("remote_block_ids")
    if block_ids is None:
        block_ids = []
    if not isinstance(block_ids, list) or not all(_is_int(b) and b >= 0 for b in block_ids):
        raise RequestError(
            400, "'kv_transfer_params.remote_block_ids' must be an array of block ids", param="kv_transfer_params"
        )
    host, port, engine = params.get("remote_host"), params.get("remote_port"), params.get("remote_engine_id")
    if host is not None and not isinstance(host, str):
        raise RequestError(400, "'kv_transfer_params.remote_host' must be a string", param="kv_transfer_params")
    if port is not None and not _is_port(port):
        raise RequestError(400, "'kv_transfer_params.remote_port' must be a port number", param="kv_transfer_params")
    return Disagg(
        "decode",
        "vllm",
        remote_host=host or None,
        remote_port=port,
        remote_engine_id=engine if isinstance(engine, str) else None,
        block_ids=block_ids,
    )


def _room(value: Any) -> int | None:
    """The request's bootstrap room; a batch carries one per prompt and the sim runs a batch as one sequence."""
    if isinstance(value, list) and value:
        value = value[0]
    if value is None:
        return None
    if not _is_int(value):
        raise RequestError(400, "'bootstrap_room' must be an integer", param="bootstrap_room")
    return int(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_port(value: Any) -> bool:
    return _is_int(value) and 0 < value < 65536


def base_url(host: str, port: int) -> str:
    """``http://host:port``, with an IPv6 literal bracketed."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


# ----------------------------------------------------------------------------- rooms (prefill side)


class Room:
    """One SGLang bootstrap room on a prefill pod."""

    __slots__ = ("block_ids", "done", "hold_id", "prompt_tokens", "state", "timer", "waiters")

    def __init__(self, state: str) -> None:
        self.state = state
        """``pending`` (a decode asked before the prefill arrived), ``prefilling``, ``ready`` or ``failed``."""
        self.done = asyncio.Event()
        """Set once the state is ``ready`` or ``failed``."""
        self.hold_id: int | None = None
        self.block_ids: list[int] = []
        self.prompt_tokens = 0
        self.timer: asyncio.TimerHandle | None = None
        self.waiters = 0

    def to_json(self, room: int, engine_id: str) -> dict[str, Any]:
        """The lookup answer."""
        return {
            "room": room,
            "state": self.state,
            "engine_id": engine_id,
            "prompt_tokens": self.prompt_tokens,
            "block_ids": self.block_ids,
        }


class Rooms:
    """The bootstrap rooms of a prefill pod: prefill progress by room id, with waiting lookups.

    A finished room is kept ``ttl_s`` (the KV hold's life) or until the decode pod releases it.
    """

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._rooms: dict[int, Room] = {}

    def __len__(self) -> int:
        return len(self._rooms)

    def open(self, room_id: int) -> None:
        """A prefill for ``room_id`` has arrived."""
        room = self._rooms.get(room_id)
        if room is not None and room.state == "pending":
            room.state = "prefilling"  # a decode is already waiting on this one
            return
        if room is not None:  # a reused room id: the old record is superseded
            self._discard(room)
        self._rooms[room_id] = Room("prefilling")

    def finish(
        self, room_id: int, *, ready: bool, hold_id: int | None, block_ids: list[int], prompt_tokens: int
    ) -> None:
        """The prefill for ``room_id`` has ended: its KV is ``ready`` (held as ``hold_id``) or it ``failed``."""
        room = self._rooms.get(room_id)
        if room is None or room.state != "prefilling":
            return  # released, expired or superseded meanwhile
        room.state = "ready" if ready else "failed"
        room.hold_id = hold_id
        room.block_ids = block_ids
        room.prompt_tokens = prompt_tokens
        room.done.set()
        room.timer = asyncio.get_running_loop().call_later(self.ttl_s, self._expire, room_id, room)

    async def lookup(self, room_id: int, wait_s: float) -> Room | None:
        """The room, after waiting up to ``wait_s`` for it to be ready or failed; None if unknown."""
        room = self._rooms.get(room_id)
        if room is None:
            if wait_s <= 0:
                return None
            # The decode half may ask before the prefill half arrives (sglang-router sends both at once).
            room = self._rooms[room_id] = Room("pending")
        if wait_s > 0 and not room.done.is_set():
            room.waiters += 1
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(room.done.wait(), wait_s)
            finally:
                room.waiters -= 1
                if room.state == "pending" and not room.waiters and self._rooms.get(room_id) is room:
                    del self._rooms[room_id]
        return None if room.state == "pending" else room

    def pop(self, room_id: int) -> Room | None:
        """Remove a room (its decode pod released it); the caller ends its KV hold."""
        room = self._rooms.pop(room_id, None)
        if room is not None:
            self._discard(room)
        return room

    def clear(self) -> None:
        """Forget every room (pod shutdown); lookups still waiting give up."""
        for room in self._rooms.values():
            self._discard(room)
        self._rooms.clear()

    def _discard(self, room: Room) -> None:
        if room.timer is not None:
            room.timer.cancel()
        if not room.done.is_set():
            room.state = "failed"
            room.done.set()

    def _expire(self, room_id: int, room: Room) -> None:
        if self._rooms.get(room_id) is room:
            del self._rooms[room_id]


# ----------------------------------------------------------------------------- decode side


class BootstrapError(Exception):
    """The decode half cannot get its KV: the room never became ready, or its prefill failed."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class PeerClient:
    """A decode pod's HTTP calls to prefill pods: room lookups and release notifications."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No connection limit: every SGLang decode in flight holds one long poll.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self._session

    async def await_room(self, disagg: Disagg, timeout_s: float) -> dict[str, Any]:
        """Wait until the prefill pod reports the SGLang request's room ready; its lookup answer.

        Raises BootstrapError when ``timeout_s`` passes first or the prefill failed.
        """
        host, port, room = disagg.remote_host, disagg.remote_port, disagg.room
        if host is None or port is None or room is None:
            raise BootstrapError("the request names no bootstrap room", "bootstrap_missing")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        url = base_url(host, port) + ROOM_PATH.format(room=room)
        while (remaining := deadline - loop.time()) > 0:
            wait_s = min(remaining, _POLL_S)
            started = loop.time()
            answer: Any = None
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                async with self._client().get(
                    url,
                    params={"wait_s": f"{wait_s:.3f}"},
                    timeout=aiohttp.ClientTimeout(total=wait_s + 1.0),
                ) as resp:
                    if resp.status == 200:
                        answer = await resp.json()
            state = answer.get("state") if isinstance(answer, dict) else None
            if state == "ready":
                return answer
            if state == "failed":
                raise BootstrapError(f"the prefill for bootstrap room {room} at {host}:{port} failed", "prefill_failed")
            if loop.time() - started < wait_s / 2:
                # Unreachable, or answered without waiting (not a long-polling peer): do not spin.
                await asyncio.sleep(min(_RETRY_S, max(0.0, deadline - loop.time())))
        raise BootstrapError(
            f"bootstrap room {room} at {host}:{port} was not ready within {timeout_s:g}s", "bootstrap_timeout"
        )

    def release(self, host: str, port: int, payload: dict[str, Any]) -> None:
        """Tell a prefill pod to drop a KV hold; fire-and-forget (a lost one just expires)."""
        url = base_url(host, port) + RELEASE_PATH
        task = asyncio.get_running_loop().create_task(self._post(url, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, url: str, payload: dict[str, Any]) -> None:
        try:
            async with self._client().post(
                url, json=payload, timeout=aiohttp.ClientTimeout(total=_RELEASE_TIMEOUT_S)
            ) as resp:
                await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.debug("KV release to %s failed (the hold will expire): %s", url, exc)

    async def aclose(self) -> None:
        """Cancel pending notifications and close the connections."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
