"""HTTP layer of the simulated model pod: an OpenAI/vLLM-compatible aiohttp application.

Timing and admission live in `simulator.engine` (fixed timing) and `simulator.batching` (model
timing: KV cache and continuous batching), prompt tokenization in `simulator.tokenizer`, wire
formats in `simulator.openai_format`, metrics in `simulator.metrics`, prefill/decode
disaggregation fields and SGLang bootstrap rooms in `simulator.disagg`; this module wires them
to routes, fault injection and the test-facing ``/sim/*`` endpoints (``/sim/kv/*`` being the
prefill pod's side of disaggregation: room lookups and hold releases, also served on the
bootstrap listener of ``SimConfig.bootstrap_port``). With ``SimConfig.kv_events`` the pod also
publishes vLLM's KV-cache events (`simulator.kv_publisher`). LoRA adapters (``SimConfig.lora_modules``,
``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``) are served as vLLM serves them: listed in
``/v1/models`` with their ``parent``, named in ``vllm:lora_requests_info`` while in use, their
requests run on the base model with KV blocks of their own.

Programmatic use (tests, local stack)::

    sim = await start_sim(SimConfig(models=["m"], ttft_ms=10), port=0)
    ...  # talk to sim.url
    await sim.stop()
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_writer import StreamWriter

from extproc_router.simulator.batching import KVSequence
from extproc_router.simulator.config import LoraModule, SimConfig
from extproc_router.simulator.disagg import (
    MAX_WAIT_S,
    RELEASE_PATH,
    ROOM_PATH,
    BootstrapError,
    Disagg,
    PeerClient,
    Rooms,
    parse_disagg,
    transfer_fields,
)
from extproc_router.simulator.engine import Sequence, SimEngine, make_engine
from extproc_router.simulator.metrics import CONTENT_TYPE, SimMetrics
from extproc_router.simulator.openai_format import (
    SSE_DONE,
    Api,
    ApiWriter,
    AudioApi,
    ClassifyApi,
    CompletionRequest,
    EmbeddingsApi,
    ImagesApi,
    Kind,
    MessagesApi,
    PoolApi,
    RequestError,
    RerankApi,
    ResponsesApi,
    ResponseWriter,
    ScoreApi,
    parse_request,
    usage,
)
from extproc_router.simulator.tokenizer import block_hashes, render_prompt, tokenize

if TYPE_CHECKING:
    from extproc_router.simulator.kv_publisher import KVEventPublisher

__all__ = ["POD_HEADER", "Faults", "SimConfig", "SimServer", "SimStats", "start_sim"]

log = logging.getLogger("simulator.server")

POD_HEADER = "x-sim-pod"
"""Response header naming the pod that answered, so tests can tell pods apart behind a proxy."""

UNRECORDED_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
"""Request headers never copied into ``/sim/stats`` (credentials)."""

_JSON_HEADERS = {"Content-Type": "application/json"}
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}

# stop() does its own grace wait; aiohttp's shutdown timeout then only bounds the cancellation of
# what is left. It must be positive: aiohttp reads 0 as "wait forever".
_NO_WAIT_S = 0.01

_FAULT_NAMES = frozenset({"fail_every", "stall", "unhealthy"})


@dataclass
class Faults:
    """Fault switches that can be flipped at runtime through ``POST /sim/faults``."""

    fail_every: int = 0
    stall: bool = False
    unhealthy: bool = False


@dataclass
class SimStats:
    """Counters served by ``GET /sim/stats`` (``/sim/*`` requests themselves are not counted)."""

    total_requests: int = 0
    requests_by_path: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    """Completion requests being handled now (stalled, waiting, generating or writing)."""
    max_in_flight: int = 0
    completions_received: int = 0
    """Valid completion requests; the counter ``fail_every`` works on."""
    completions_answered: int = 0
    """Completion responses fully sent, any status; the counter ``die_after`` works on."""
    injected_failures: int = 0
    last_headers: dict[str, str] = field(default_factory=dict)
    """Headers of the last completion request (lower-case names, credentials left out)."""
    last_transfer_fields: dict[str, Any] = field(default_factory=dict)
    """Disaggregation fields (``kv_transfer_params``, ``bootstrap_*``) of the last completion
    request that had any, as sent; lets a gateway test see what reached the pod."""


class SimServer:
    """One simulated model pod bound to a TCP port. Create it with `start_sim`."""

    def __init__(self, config: SimConfig) -> None:
        if not config.models:
            raise ValueError("SimConfig.models must name at least one model")
        if config.kv_events is not None and config.timing != "model":
            raise ValueError("KV events need model timing (timing='model'): fixed timing has no KV cache")
        self.config = config
        self.models = tuple(dict.fromkeys(config.models))
        self.engine: SimEngine = make_engine(config.engine_config())
        self.kv_events: KVEventPublisher | None = None
        """The KV events publisher once started (``SimConfig.kv_events``); its ``endpoint`` and
        ``replay_endpoint`` are the bound addresses."""
        self.lora_enabled = config.enable_lora or bool(config.lora_modules)
        """vLLM's ``--enable-lora``: adapters can be loaded, and ``vllm:lora_requests_info`` is exported."""
        self.adapters: dict[str, LoraModule] = {}
        """The LoRA adapters served now, in load order (``--lora-modules`` first, then runtime loads)."""
        self._lora_ids: dict[str, int] = {}
        self._next_lora_id = 0
        for module in config.lora_modules:
            error = self.load_adapter(module)
            if error is not None:
                raise ValueError(error.message)
        self.metrics = SimMetrics(self.engine, self.models, config.max_loras if self.lora_enabled else None)
        self.faults = Faults(fail_every=config.fail_every, stall=config.stall, unhealthy=config.unhealthy)
        self.stats = SimStats()
        self.died = asyncio.Event()
        """Set once ``die_after`` responses have been sent and the server has stopped."""
        self.host = ""
        self.port = 0
        self.pod_name = config.pod_name or ""
        self._unstalled = asyncio.Event()
        if not self.faults.stall:
            self._unstalled.set()
        self._id_base = uuid.uuid4().hex[:24]
        self._request_counter = 0
        self._answers = 0
        """Completion responses sent over the pod's life (``die_after`` ignores resets)."""
        self.rooms = Rooms(config.kv_hold_seconds)
        """SGLang bootstrap rooms (a prefill pod's)."""
        self.peers = PeerClient()
        """A decode pod's calls to prefill pods."""
        self.bootstrap_port: int | None = None
        """Port of the bootstrap listener once started; None when there is none."""
        self._bootstrap_runner: web.AppRunner | None = None
        self._runner: web.AppRunner | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._die_task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8000``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # ----------------------------------------------------------------- lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Bind and start serving; ``port=0`` picks a free port (read it back from ``.port``)."""
        if self.config.timing == "model":
            # Load the vocabulary now (cl100k: ~0.7 s) rather than inside the first request's TTFT.
            await asyncio.get_running_loop().run_in_executor(None, tokenize, "", self.config.tokenizer)
        if self.config.kv_events is not None:
            await self._start_kv_events()
        app = self._build_app()
        # handler_cancellation: a client that hangs up cancels its handler, so a stalled or
        # streaming request does not keep counting as in flight.
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=_NO_WAIT_S)
        await runner.setup()
        # A large backlog: load tests open hundreds of connections at once, and a full accept
        # queue turns into 1 s SYN retransmits that look like server latency.
        site = web.TCPSite(runner, host, port, backlog=4096)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            if self.kv_events is not None:
                await self.kv_events.aclose()
            raise
        self._runner = runner
        self.host = host
        self.port = runner.addresses[0][1]
        if not self.pod_name:
            self.pod_name = f"{socket.gethostname()}-{self.port}"
        if self.config.bootstrap_port is not None:
            await self._start_bootstrap(host, self.config.bootstrap_port)

    async def _start_kv_events(self) -> None:
        """Bind the KV events sockets and announce an empty cache (AllBlocksCleared, sequence number 0)."""
        from extproc_router.simulator.batching import BatchingEngine
        from extproc_router.simulator.kv_publisher import KVEventPublisher

        assert self.config.kv_events is not None and isinstance(self.engine, BatchingEngine)
        publisher = KVEventPublisher(self.config.kv_events)
        await publisher.start()
        self.kv_events = publisher
        publisher.publish_cleared()
        self.engine.attach_kv_events(publisher.publish)

    async def _start_bootstrap(self, host: str, port: int) -> None:
        """Open the SGLang bootstrap listener: room lookups and releases on a port of their own.

        A port already taken only costs a warning: several prefill pods on one host (a local
        stack) cannot all have 8998, and the HTTP port answers the same lookups.
        """
        app = web.Application()
        app.on_response_prepare.append(self._stamp_pod)
        app.router.add_get(ROOM_PATH.format(room="{room}"), self._kv_room)
        app.router.add_post(RELEASE_PATH, self._kv_release)
        app.router.add_get("/health", self._health)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=_NO_WAIT_S)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            log.warning(
                "sim pod=%s: no bootstrap listener on %s:%s (%s); rooms are served on the HTTP port %s only",
                self.pod_name,
                host,
                port,
                exc,
                self.port,
            )
            await runner.cleanup()
            return
        self._bootstrap_runner = runner
        self.bootstrap_port = runner.addresses[0][1]

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop accepting connections, give in-flight requests ``grace_s`` to finish, close the rest.

        Safe to call more than once and from several tasks.
        """
        if self._stop_task is None:
            self._stop_task = asyncio.get_running_loop().create_task(self._shutdown(grace_s))
        await asyncio.shield(self._stop_task)

    async def _shutdown(self, grace_s: float) -> None:
        runner = self._runner
        if runner is None:
            return
        for site in list(runner.sites):
            await site.stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.stats.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.01)
        await runner.cleanup()
        if self._bootstrap_runner is not None:
            await self._bootstrap_runner.cleanup()
        self.rooms.clear()
        await self.peers.aclose()
        await self.engine.aclose()
        if self.kv_events is not None:
            await self.kv_events.aclose()

    async def __aenter__(self) -> SimServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _die(self) -> None:
        # Like a crashed pod: no grace, in-flight requests are cut off.
        await self.stop(grace_s=0.0)
        self.died.set()

    # ----------------------------------------------------------------- application

    def _build_app(self) -> web.Application:
        @web.middleware
        async def count_requests(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            path = request.path
            if not path.startswith("/sim/"):
                stats = self.stats
                stats.total_requests += 1
                # Unknown paths share one key so a scanner cannot grow the dict without bound.
                key = path if request.match_info.http_exception is None else "<unmatched>"
                stats.requests_by_path[key] = stats.requests_by_path.get(key, 0) + 1
            return await handler(request)

        app = web.Application(middlewares=[count_requests], client_max_size=64 * 1024 * 1024)
        app.on_response_prepare.append(self._stamp_pod)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        self._add_api_routes(app)
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_post("/v1/load_lora_adapter", self._load_lora)
        app.router.add_post("/v1/unload_lora_adapter", self._unload_lora)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/sim/stats", self._get_stats)
        app.router.add_get("/sim/faults", self._get_faults)
        app.router.add_post("/sim/faults", self._set_faults)
        app.router.add_post("/sim/reset", self._reset)
        app.router.add_get(ROOM_PATH.format(room="{room}"), self._kv_room)
        app.router.add_post(RELEASE_PATH, self._kv_release)
        return app

    async def _stamp_pod(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers[POD_HEADER] = self.pod_name

    async def _list_models(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.models_list()), headers=_JSON_HEADERS)

    def models_list(self) -> dict[str, Any]:
        """vLLM's ``/v1/models``: the served model names (``parent`` null), then every loaded LoRA
        adapter with its base model as ``parent`` and its path as ``root``."""
        cards = [
            {"id": m, "object": "model", "created": 0, "owned_by": "vllm", "root": m, "parent": None}
            for m in self.models
        ]
        cards += [
            {"id": a.name, "object": "model", "created": 0, "owned_by": "vllm", "root": a.path,
             "parent": self._adapter_parent(a)}
            for a in self.adapters.values()
        ]  # fmt: skip
        return {"object": "list", "data": cards}

    def _adapter_parent(self, adapter: LoraModule) -> str:
        # As vLLM: the base model named at load time when it is one of ours, else the first served name.
        base = adapter.base_model_name
        return base if base in self.models else self.models[0]

    def load_adapter(self, module: LoraModule) -> RequestError | None:
        """Serve ``module`` from now on (vLLM's ``/v1/load_lora_adapter``); the error vLLM would answer."""
        if not self.lora_enabled:
            return RequestError(400, "LoRA is not enabled. Use --enable-lora to enable LoRA.", type_="BadRequestError")
        if not module.name or not module.path:
            return RequestError(400, "Both 'lora_name' and 'lora_path' must be provided.", type_="InvalidUserInput")
        if module.name in self.adapters:
            return RequestError(
                400, f"The lora adapter '{module.name}' has already been loaded.", type_="InvalidUserInput"
            )
        if module.name in self.models:
            return RequestError(
                400, f"The lora adapter name '{module.name}' is a served model name.", type_="InvalidUserInput"
            )
        self._next_lora_id += 1
        self.adapters[module.name] = module
        self._lora_ids[module.name] = self._next_lora_id
        return None

    def unload_adapter(self, name: str) -> RequestError | None:
        """Stop serving adapter ``name`` (vLLM's ``/v1/unload_lora_adapter``); the error vLLM would answer."""
        if not name:
            return RequestError(
                400, "either 'lora_name' and 'lora_int_id' needs to be provided.", type_="InvalidUserInput"
            )
        if self.adapters.pop(name, None) is None:
            return RequestError(404, f"The lora adapter '{name}' cannot be found.", type_="NotFoundError")
        self._lora_ids.pop(name, None)
        return None

    async def _load_lora(self, request: web.Request) -> web.Response:
        try:
            body = await _json_object(request)
        except RequestError as err:
            return _error_response(err)
        name, path, base = body.get("lora_name"), body.get("lora_path"), body.get("base_model_name")
        if not isinstance(name, str) or not isinstance(path, str) or (base is not None and not isinstance(base, str)):
            return _error_response(
                RequestError(400, "Both 'lora_name' and 'lora_path' must be provided.", type_="InvalidUserInput")
            )
        error = self.load_adapter(LoraModule(name, path, base or None))
        if error is not None:
            return _error_response(error)
        log.info("sim pod=%s: loaded LoRA adapter %s (%s)", self.pod_name, name, path)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload_lora(self, request: web.Request) -> web.Response:
        try:
            body = await _json_object(request)
        except RequestError as err:
            return _error_response(err)
        name = body.get("lora_name")
        error = self.unload_adapter(name if isinstance(name, str) else "")
        if error is not None:
            return _error_response(error)
        log.info("sim pod=%s: unloaded LoRA adapter %s", self.pod_name, name)
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if self.faults.unhealthy else 200)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _get_stats(self, request: web.Request) -> web.Response:
        body = asdict(self.stats)
        body.update(
            pod=self.pod_name,
            models=list(self.models),
            adapters=list(self.adapters),
            role=self.config.role,
            bootstrap_port=self.bootstrap_port,
            rooms=len(self.rooms),
            engine=self.engine.snapshot(),
            faults=asdict(self.faults),
            kv_events=self.kv_events.stats() if self.kv_events is not None else None,
        )
        return web.Response(body=orjson.dumps(body), headers=_JSON_HEADERS)

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset()
        return await self._get_stats(request)

    def reset(self) -> None:
        """Start cold without a restart: flush the prefix cache, zero the metrics and ``/sim/stats`` counters.

        Requests in flight carry on (their blocks are no longer findable by later requests), and
        the fault switches and the ``die_after`` count are kept. Prometheus sees the counters
        drop to zero as it would see a pod restart.
        """
        self.engine.reset()
        self.metrics.reset()
        # In place: handlers in flight hold a reference to this object.
        stats = self.stats
        fresh = SimStats(in_flight=stats.in_flight, max_in_flight=stats.in_flight)
        for f in fields(SimStats):
            setattr(stats, f.name, getattr(fresh, f.name))

    # ----------------------------------------------------------------- disaggregation: the prefill side

    async def _kv_room(self, request: web.Request) -> web.Response:
        """``GET /sim/kv/room/<room>[?wait_s=S]``: an SGLang room's prefill state, waiting up to S s for it.

        200 with the room (``state`` ``ready``, ``failed`` or still ``prefilling``), 404 while unknown.
        """
        try:
            room_id = int(request.match_info["room"])
            wait_s = float(request.query.get("wait_s", "0"))
        except ValueError:
            return _error_response(RequestError(400, "room must be an integer and wait_s a number of seconds"))
        if not math.isfinite(wait_s) or wait_s < 0:
            return _error_response(RequestError(400, "wait_s must be >= 0"))
        room = await self.rooms.lookup(room_id, min(wait_s, MAX_WAIT_S))
        if room is None:
            return web.json_response({"room": room_id, "state": "unknown"}, status=404, dumps=_dumps)
        return web.json_response(room.to_json(room_id, self.pod_name), dumps=_dumps)

    async def _kv_release(self, request: web.Request) -> web.Response:
        """``POST /sim/kv/release``: a decode pod has fetched a prefill's KV; drop the hold.

        Body ``{"block_ids": [...]}`` (vLLM style: the ``remote_block_ids`` it was given; also
        accepted under that name) or ``{"room": N}`` (SGLang style). 200 when something was
        released, 404 when there was nothing (already released, expired, or never held).
        """
        try:
            body = await _json_object(request)
        except RequestError as err:
            return _error_response(err)
        room_id = body.get("room")
        block_ids = body.get("block_ids", body.get("remote_block_ids"))
        found = False
        if isinstance(room_id, int) and not isinstance(room_id, bool):
            room = self.rooms.pop(room_id)
            found = room is not None
            hold_id = room.hold_id if room is not None else None
        elif isinstance(block_ids, list) and all(isinstance(b, int) and not isinstance(b, bool) for b in block_ids):
            hold_id = self.engine.hold_for_blocks(block_ids)
        else:
            return _error_response(RequestError(400, "give 'room' (an integer) or 'block_ids' (an array of ids)"))
        if hold_id is not None and self.engine.release_hold(hold_id) is not None:
            found = True
        answer = {"released": found, **self.engine.hold_stats()}
        return web.json_response(answer, status=200 if found else 404, dumps=_dumps)

    def _transfer_params(self, request: web.Request, seq: Sequence) -> dict[str, Any]:
        """The ``kv_transfer_params`` a vLLM-style prefill answers with (see `simulator.disagg`)."""
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self.pod_name,
            "remote_block_ids": seq.held_block_ids,
            "remote_host": self._local_address(request),
            # The HTTP port, not a NIXL side channel: the decode pod's release goes here.
            "remote_port": self.port,
            "tp_size": 1,
        }

    def _local_address(self, request: web.Request) -> str:
        """The IP this request came in on: the pod's address as its peers reach it (even when bound to 0.0.0.0)."""
        transport = request.transport
        sockname = transport.get_extra_info("sockname") if transport is not None else None
        if isinstance(sockname, tuple) and sockname and isinstance(sockname[0], str):
            return sockname[0].removeprefix("::ffff:")  # an IPv4 client on a dual-stack socket
        return self.host

    # ----------------------------------------------------------------- disaggregation: the decode side

    def _release_remote(self, disagg: Disagg) -> None:
        """Tell the prefill pod its held KV has been fetched (or is no longer wanted); at most once."""
        if disagg.released:
            return
        disagg.released = True
        host, port = disagg.remote_host, disagg.remote_port
        if host is None or port is None:
            return  # the router gave no address: the hold simply expires
        if disagg.style == "sglang":
            self.peers.release(host, port, {"room": disagg.room})
        elif disagg.block_ids:  # no blocks offered (a prompt shorter than a block): nothing is held
            self.peers.release(host, port, {"block_ids": disagg.block_ids, "engine_id": disagg.remote_engine_id})

    def _end_disagg(self, disagg: Disagg, seq: Sequence) -> None:
        """After a disaggregated request, however it ended: settle the room, or release the prefill pod's hold."""
        if disagg.prefill:
            if disagg.room is not None:
                ready = seq.finished or seq.hold_id is not None
                self.rooms.finish(
                    disagg.room,
                    ready=ready,
                    hold_id=seq.hold_id,
                    block_ids=seq.held_block_ids,
                    prompt_tokens=seq.prompt_tokens,
                )
        else:
            self._release_remote(disagg)  # the client left before the first token

    async def _get_faults(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(asdict(self.faults)), headers=_JSON_HEADERS)

    async def _set_faults(self, request: web.Request) -> web.Response:
        try:
            update = await _json_object(request)
        except RequestError as err:
            return _error_response(err)
        unknown = sorted(set(update) - _FAULT_NAMES)
        if unknown:
            return _error_response(RequestError(400, f"Unknown fault switches: {', '.join(unknown)}"))
        try:
            self.set_faults(**update)
        except ValueError as exc:
            return _error_response(RequestError(400, str(exc)))
        return await self._get_faults(request)

    def set_faults(
        self, *, fail_every: int | None = None, stall: bool | None = None, unhealthy: bool | None = None
    ) -> None:
        """Flip fault switches at runtime; None leaves a switch unchanged.

        Switching ``stall`` off releases the requests it held; they are then served normally.
        Raises ValueError (and changes nothing) when a value has the wrong type.
        """
        if fail_every is not None and (
            not isinstance(fail_every, int) or isinstance(fail_every, bool) or fail_every < 0
        ):
            raise ValueError("fail_every must be an integer >= 0")
        for name, value in (("stall", stall), ("unhealthy", unhealthy)):
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name} must be a boolean")
        if fail_every is not None:
            self.faults.fail_every = fail_every
        if unhealthy is not None:
            self.faults.unhealthy = unhealthy
        if stall is not None:
            self.faults.stall = stall
            if stall:
                self._unstalled.clear()
            else:
                self._unstalled.set()

    # ----------------------------------------------------------------- completions

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_completion(request, "chat")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_completion(request, "completion")

    def _add_api_routes(self, app: web.Application) -> None:
        """The rest of vLLM's serving surface, each API over the same engine (`openai_format.Api`):
        Anthropic messages and OpenAI responses as chat; embeddings, pooling, classification,
        rerank, score and image generation as one prefill step; audio forms as a completion."""
        apis: dict[str, Callable[[], Api]] = {
            "/v1/messages": MessagesApi,
            "/v1/responses": ResponsesApi,
            "/v1/embeddings": EmbeddingsApi,
            "/pooling": PoolApi,
            "/v1/classify": ClassifyApi,
            "/classify": ClassifyApi,
            "/v1/rerank": RerankApi,
            "/rerank": RerankApi,
            "/v2/rerank": RerankApi,
            "/v1/score": ScoreApi,
            "/score": ScoreApi,
            "/v1/images/generations": ImagesApi,
            "/v1/audio/transcriptions": lambda: AudioApi("transcribe"),
            "/v1/audio/translations": lambda: AudioApi("translate"),
        }
        for path, make in apis.items():

            async def handler(request: web.Request, make: Callable[[], Api] = make) -> web.StreamResponse:
                api = make()
                return await self._handle_completion(request, api.kind, api)

            app.router.add_post(path, handler)

    async def _handle_completion(self, request: web.Request, kind: Kind, api: Api | None = None) -> web.StreamResponse:
        stats = self.stats
        stats.in_flight += 1
        if stats.in_flight > stats.max_in_flight:
            stats.max_in_flight = stats.in_flight
        # try/finally: a client disconnect cancels this task at any await below.
        try:
            stats.last_headers = {
                k.lower(): v for k, v in request.headers.items() if k.lower() not in UNRECORDED_HEADERS
            }
            arrival = asyncio.get_running_loop().time()
            try:
                content_type = request.headers.get("Content-Type", "")
                creq, model, body = self._parse(kind, await request.read(), api, content_type)
                disagg = parse_disagg(body, self.config.role)
            except RequestError as err:
                return await self._answer(request, _error_response(err, api))
            # An adapter's request runs on the base model: its metrics count there (as vLLM's model_name
            # label does) while the answer names the adapter and its KV blocks are its own.
            lora = model if model in self.adapters else None
            served = self._adapter_parent(self.adapters[model]) if lora is not None else model
            sent_fields = transfer_fields(body)
            if sent_fields:
                stats.last_transfer_fields = sent_fields

            stats.completions_received += 1
            fail_every = self.faults.fail_every
            if fail_every and stats.completions_received % fail_every == 0:
                stats.injected_failures += 1
                err = RequestError(
                    500, "Simulated engine failure (fail_every)", type_="server_error", code="simulated_failure"
                )
                return await self._answer(request, _error_response(err, api))
            if self.faults.stall:
                await self._unstalled.wait()

            prefill = disagg is not None and disagg.prefill
            # A prefill half stops after its first token whatever max_tokens says (as SGLang's does).
            output_tokens = 1 if prefill else self._output_tokens(creq)
            finish_reason = "length" if prefill or output_tokens == creq.max_tokens else "stop"
            seq = self._sequence(kind, body, creq, served, output_tokens, disagg, lora)
            too_long = self.engine.admission_error(seq)
            if too_long is not None:
                err = RequestError(400, too_long, param="max_tokens", code="context_length_exceeded")
                return await self._answer(request, _error_response(err, api))
            if disagg is not None and disagg.decode and disagg.room is not None:
                # SGLang: the prefill half was sent at the same time; wait for its KV to be ready.
                try:
                    await self.peers.await_room(disagg, self.config.bootstrap_timeout_s)
                except BootstrapError as exc:
                    self.metrics.counters[served].bootstrap_timeouts += 1
                    err = RequestError(503, str(exc), type_="service_unavailable", code=exc.code)
                    return await self._answer(request, _error_response(err, api))
            prefix = api.id_prefix if api is not None else "chatcmpl-" if kind == "chat" else "cmpl-"
            # vLLM derives its response id from X-Request-Id when the client sends one.
            request_id = prefix + (request.headers.get("x-request-id") or self._next_request_id())
            writer: ResponseWriter | ApiWriter = (
                api.writer(request_id, int(time.time()), model) if api is not None
                else ResponseWriter(kind, request_id, int(time.time()), model, creq.num_choices))
            if prefill and disagg is not None and disagg.room is not None:
                self.rooms.open(disagg.room)
            try:
                if creq.stream and isinstance(writer, ApiWriter):
                    return await self._stream_api(request, seq, writer, finish_reason, arrival, disagg)
                if creq.stream and isinstance(writer, ResponseWriter):
                    return await self._stream(request, creq, seq, writer, finish_reason, arrival, disagg)
                return await self._respond(request, seq, writer, finish_reason, arrival, disagg)
            finally:
                if disagg is not None:
                    self._end_disagg(disagg, seq)
        except ConnectionResetError:
            # The client hung up while we were writing. Returning (rather than raising) lets
            # aiohttp notice the closed transport quietly instead of logging a handler error.
            return web.Response(status=499)
        finally:
            stats.in_flight -= 1

    def _next_request_id(self) -> str:
        # A per-server random base plus a counter: unique like a uuid4, a fraction of the cost.
        self._request_counter += 1
        return f"{self._id_base}{self._request_counter:08x}"

    def _parse(
        self, kind: Kind, raw: bytes, api: Api | None = None, content_type: str = ""
    ) -> tuple[CompletionRequest, str, dict[str, Any]]:
        if api is not None:
            body = api.engine_body(raw, content_type)  # the engine's view: a chat or completion body
        else:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise RequestError(400, f"Request body is not valid JSON: {exc}") from None
        creq = parse_request(kind, body)
        # Like vLLM, a request without "model" goes to the (first) served model.
        model = creq.model or self.models[0]
        if model not in self.models and model not in self.adapters:
            raise RequestError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return creq, model, body

    def _sequence(
        self,
        kind: Kind,
        body: dict[str, Any],
        creq: CompletionRequest,
        model: str,
        output_tokens: int,
        disagg: Disagg | None,
        lora: str | None = None,
    ) -> Sequence:
        """The engine's view of a request; under model timing, with the prompt's block hashes (an
        adapter's salted by its name)."""
        transferred = disagg is not None and disagg.decode
        if self.config.timing != "model":
            return Sequence(
                model, creq.prompt_tokens, output_tokens, creq.num_choices, kv_transferred=transferred, lora=lora
            )
        ids = _prompt_ids(kind, body, self.config.tokenizer)
        prefill = disagg is not None and disagg.prefill
        return KVSequence(
            model,
            len(ids),
            block_hashes(ids, self.config.block_size, lora),
            output_tokens,
            creq.num_choices,
            prefill_only=prefill,
            kv_transferred=transferred,
            hold_kv=prefill,
            token_ids=ids if self.kv_events is not None else None,
            lora=lora,
            lora_id=self._lora_ids.get(lora) if lora is not None else None,
        )

    def _output_tokens(self, creq: CompletionRequest) -> int:
        if creq.max_tokens is None:
            return self.config.output_tokens
        return min(creq.max_tokens, self.config.max_output_tokens)

    async def _generate(self, seq: Sequence, arrival: float, disagg: Disagg | None) -> None:
        """Advance ``seq`` by one token, with the metrics (and, on a decode pod, the KV release) that go with it."""
        await self.engine.next_token(seq)
        counters = self.metrics.counters[seq.model]
        counters.generation_tokens += seq.num_choices
        if seq.generated == 1:
            counters.prompt_tokens += seq.prompt_tokens
            self.metrics.observe_ttft(seq.model, asyncio.get_running_loop().time() - arrival)
            if seq.kv_transferred:
                counters.kv_transfers_in += 1
                counters.kv_transfer_tokens_in += seq.remote_tokens
                counters.external_queries += seq.prompt_tokens - seq.cached_tokens
            if disagg is not None:
                if disagg.prefill:
                    counters.prefill_only += 1
                else:
                    # The first token means the transfer is done: the prefill pod may free its copy.
                    self._release_remote(disagg)

    def _finished(self, seq: Sequence, finish_reason: str) -> None:
        success = self.metrics.counters[seq.model].success
        success[finish_reason] = success.get(finish_reason, 0) + 1

    async def _respond(
        self,
        request: web.Request,
        seq: Sequence,
        writer: ResponseWriter | ApiWriter,
        finish_reason: str,
        arrival: float,
        disagg: Disagg | None,
    ) -> web.StreamResponse:
        async with self.engine.admit(seq):
            while not seq.finished:
                await self._generate(seq, arrival, disagg)
        self._finished(seq, finish_reason)
        completion_tokens = seq.generated * seq.num_choices
        extra = None
        if disagg is not None and disagg.prefill and disagg.room is None:
            extra = {"kv_transfer_params": self._transfer_params(request, seq)}
        body = writer.body(seq.generated, finish_reason, _usage(seq, completion_tokens), extra)
        headers = _JSON_HEADERS if isinstance(writer, ResponseWriter) else {"Content-Type": writer.content_type}
        return await self._answer(request, web.Response(body=body, headers=headers))

    async def _stream(
        self,
        request: web.Request,
        creq: CompletionRequest,
        seq: Sequence,
        writer: ResponseWriter,
        finish_reason: str,
        arrival: float,
        disagg: Disagg | None,
    ) -> web.StreamResponse:
        # Headers go out at once, as with vLLM; the first data chunk follows after TTFT.
        response = web.StreamResponse(headers=_SSE_HEADERS)
        sink = _ChunkSink(await response.prepare(request))
        choices = range(seq.num_choices)
        chunks = writer.stream()
        async with self.engine.admit(seq):
            while not seq.finished:
                await self._generate(seq, arrival, disagg)
                token_index = seq.generated - 1
                if token_index == 0 and chunks.kind == "chat":
                    for c in choices:
                        await sink.send(chunks.role_chunk(c))
                for c in choices:
                    await sink.send(chunks.token_chunk(c, token_index))
        self._finished(seq, finish_reason)
        for c in choices:
            await sink.send(chunks.final_chunk(c, finish_reason))
        if creq.include_usage:
            await sink.send(chunks.usage_chunk(_usage(seq, seq.generated * seq.num_choices)))
        await sink.send(SSE_DONE)
        await response.write_eof()
        self._count_answer()
        return response

    async def _stream_api(
        self,
        request: web.Request,
        seq: Sequence,
        writer: ApiWriter,
        finish_reason: str,
        arrival: float,
        disagg: Disagg | None,
    ) -> web.StreamResponse:
        """A streamed answer in an `Api`'s own events (Anthropic's, the Responses API's, audio chunks)."""
        response = web.StreamResponse(headers=_SSE_HEADERS)
        sink = _ChunkSink(await response.prepare(request))
        async with self.engine.admit(seq):
            while not seq.finished:
                await self._generate(seq, arrival, disagg)
                if seq.generated == 1:
                    for event in writer.start_events(seq.prompt_tokens):
                        await sink.send(event)
                await sink.send(writer.token_event(seq.generated - 1))
        self._finished(seq, finish_reason)
        for event in writer.end_events(finish_reason, _usage(seq, seq.generated)):
            await sink.send(event)
        await response.write_eof()
        self._count_answer()
        return response

    async def _answer(self, request: web.Request, response: web.Response) -> web.Response:
        """Send ``response`` completely now, so that ``die_after`` never cuts off the Nth answer."""
        await response.prepare(request)
        await response.write_eof()
        self._count_answer()
        return response

    def _count_answer(self) -> None:
        self.stats.completions_answered += 1
        self._answers += 1
        die_after = self.config.die_after
        if die_after and self._answers >= die_after and self._die_task is None:
            # A separate task: stopping the server from inside a handler would wait on itself.
            self._die_task = asyncio.get_running_loop().create_task(self._die())


class _ChunkSink:
    """Sends the body chunks of a prepared streaming response, one socket write per chunk.

    It does what ``StreamResponse.write`` does, minus about 15 µs of Python per call: with a few
    hundred streams at hundreds of tokens/s that overhead was a third of the sim's CPU. This is
    sound because ``StreamResponse.prepare`` has already sent the headers and put the writer in
    chunked mode (HTTP/1.1) or close-delimited mode (HTTP/1.0); the stream still ends with
    ``response.write_eof()``. TCP_NODELAY (aiohttp's default) makes every chunk its own segment,
    so a client sees chunks arrive one by one at the simulated pace.
    """

    _HIGH_WATER = 64 * 1024
    """Buffered bytes above which we wait for the client to read (as StreamResponse.write does)."""

    def __init__(self, writer: AbstractStreamWriter | None) -> None:
        if not isinstance(writer, StreamWriter):
            raise TypeError("a prepared aiohttp StreamResponse is required")
        self._writer = writer
        self._chunked = writer.chunked

    async def send(self, chunk: bytes) -> None:
        """Write one chunk; raise ConnectionResetError when the client has gone."""
        transport = self._writer.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client disconnected")
        transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if self._chunked else chunk)
        if transport.get_write_buffer_size() > self._HIGH_WATER:
            await self._writer.drain()


def _prompt_ids(kind: Kind, body: dict[str, Any], tokenizer: str) -> list[int]:
    """Token ids of a validated request's prompt: given ids as they are, text tokenized."""
    if kind == "completion":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], str):
            if isinstance(prompt[0], list):  # a batch of token-id prompts, one sequence here
                return [t for p in prompt for t in p]
            return list(prompt)
    return tokenize(render_prompt(kind, body), tokenizer)


def _usage(seq: Sequence, completion_tokens: int) -> dict[str, Any]:
    """The ``usage`` of a finished sequence.

    ``cached_tokens`` counts transferred prompt tokens too, as vLLM does: a decode pod's request
    whose KV came from the prefill pod is scheduled with its computed tokens (local hits plus
    external ones) as ``num_cached_tokens``, i.e. prompt length - 1 for a fully transferred prompt.
    """
    return usage(seq.prompt_tokens, completion_tokens, seq.cached_tokens + seq.remote_tokens)


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def _error_response(err: RequestError, api: Api | None = None) -> web.Response:
    body = api.error_body(err) if api is not None else err.body()
    return web.Response(status=err.status, body=body, headers=_JSON_HEADERS)


async def _json_object(request: web.Request) -> dict[str, Any]:
    """The JSON object a ``/sim/*`` request carries; RequestError (400) for anything else."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise RequestError(400, "Request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RequestError(400, "Request body must be a JSON object")
    return body


async def start_sim(config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> SimServer:
    """Start a simulated pod in the running event loop and return it once it accepts connections.

    ``port=0`` binds a free port; read it back from ``SimServer.port`` / ``SimServer.url``.
    Stop it with ``await server.stop()`` (or use it as ``async with``).
    """
    server = SimServer(config or SimConfig())
    await server.start(host, port)
    return server
