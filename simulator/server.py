"""HTTP layer of the simulated model pod: an OpenAI/vLLM-compatible aiohttp application.

Timing and admission live in `simulator.engine` (fixed timing) and `simulator.batching` (model
timing: KV cache and continuous batching), prompt tokenization in `simulator.tokenizer`, wire
formats in `simulator.openai_format`, metrics in `simulator.metrics`; this module wires them to
routes, fault injection and the test-facing ``/sim/*`` endpoints.

Programmatic use (tests, local stack)::

    sim = await start_sim(SimConfig(models=["m"], ttft_ms=10), port=0)
    ...  # talk to sim.url
    await sim.stop()
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import orjson
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_writer import StreamWriter

from simulator.batching import KVSequence
from simulator.config import SimConfig
from simulator.engine import Sequence, SimEngine, make_engine
from simulator.metrics import CONTENT_TYPE, SimMetrics
from simulator.openai_format import (
    SSE_DONE,
    CompletionRequest,
    Kind,
    RequestError,
    ResponseWriter,
    parse_request,
    usage,
)
from simulator.tokenizer import block_hashes, render_prompt, tokenize

__all__ = ["POD_HEADER", "Faults", "SimConfig", "SimServer", "SimStats", "start_sim"]

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


class SimServer:
    """One simulated model pod bound to a TCP port. Create it with `start_sim`."""

    def __init__(self, config: SimConfig) -> None:
        if not config.models:
            raise ValueError("SimConfig.models must name at least one model")
        self.config = config
        self.models = tuple(dict.fromkeys(config.models))
        self.engine: SimEngine = make_engine(config.engine_config())
        self.metrics = SimMetrics(self.engine, self.models)
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
        self._models_body = orjson.dumps(
            {
                "object": "list",
                "data": [{"id": m, "object": "model", "created": 0, "owned_by": "vllm"} for m in self.models],
            }
        )
        self._id_base = uuid.uuid4().hex[:24]
        self._request_counter = 0
        self._answers = 0
        """Completion responses sent over the pod's life (``die_after`` ignores resets)."""
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
        app = self._build_app()
        # handler_cancellation: a client that hangs up cancels its handler, so a stalled or
        # streaming request does not keep counting as in flight.
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=_NO_WAIT_S)
        await runner.setup()
        # A large backlog: load tests open hundreds of connections at once, and a full accept
        # queue turns into 1 s SYN retransmits that look like server latency.
        site = web.TCPSite(runner, host, port, backlog=4096)
        await site.start()
        self._runner = runner
        self.host = host
        self.port = runner.addresses[0][1]
        if not self.pod_name:
            self.pod_name = f"{socket.gethostname()}-{self.port}"

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
        await self.engine.aclose()

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
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/sim/stats", self._get_stats)
        app.router.add_get("/sim/faults", self._get_faults)
        app.router.add_post("/sim/faults", self._set_faults)
        app.router.add_post("/sim/reset", self._reset)
        return app

    async def _stamp_pod(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers[POD_HEADER] = self.pod_name

    async def _list_models(self, request: web.Request) -> web.Response:
        return web.Response(body=self._models_body, headers=_JSON_HEADERS)

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if self.faults.unhealthy else 200)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _get_stats(self, request: web.Request) -> web.Response:
        body = asdict(self.stats)
        body.update(
            pod=self.pod_name, models=list(self.models), engine=self.engine.snapshot(), faults=asdict(self.faults)
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

    async def _get_faults(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(asdict(self.faults)), headers=_JSON_HEADERS)

    async def _set_faults(self, request: web.Request) -> web.Response:
        try:
            update = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error_response(RequestError(400, "Request body is not valid JSON"))
        if not isinstance(update, dict):
            return _error_response(RequestError(400, "Request body must be a JSON object"))
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

    async def _handle_completion(self, request: web.Request, kind: Kind) -> web.StreamResponse:
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
                creq, model, body = self._parse(kind, await request.read())
            except RequestError as err:
                return await self._answer(request, _error_response(err))

            stats.completions_received += 1
            fail_every = self.faults.fail_every
            if fail_every and stats.completions_received % fail_every == 0:
                stats.injected_failures += 1
                err = RequestError(
                    500, "Simulated engine failure (fail_every)", type_="server_error", code="simulated_failure"
                )
                return await self._answer(request, _error_response(err))
            if self.faults.stall:
                await self._unstalled.wait()

            output_tokens = self._output_tokens(creq)
            finish_reason = "length" if output_tokens == creq.max_tokens else "stop"
            seq = self._sequence(kind, body, creq, model, output_tokens)
            too_long = self.engine.admission_error(seq)
            if too_long is not None:
                err = RequestError(400, too_long, param="max_tokens", code="context_length_exceeded")
                return await self._answer(request, _error_response(err))
            prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
            # vLLM derives its response id from X-Request-Id when the client sends one.
            request_id = prefix + (request.headers.get("x-request-id") or self._next_request_id())
            writer = ResponseWriter(kind, request_id, int(time.time()), model, creq.num_choices)
            if creq.stream:
                return await self._stream(request, creq, seq, writer, finish_reason, arrival)
            return await self._respond(request, seq, writer, finish_reason, arrival)
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

    def _parse(self, kind: Kind, raw: bytes) -> tuple[CompletionRequest, str, dict[str, Any]]:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise RequestError(400, f"Request body is not valid JSON: {exc}") from None
        creq = parse_request(kind, body)
        # Like vLLM, a request without "model" goes to the (first) served model.
        model = creq.model or self.models[0]
        if model not in self.models:
            raise RequestError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return creq, model, body

    def _sequence(
        self, kind: Kind, body: dict[str, Any], creq: CompletionRequest, model: str, output_tokens: int
    ) -> Sequence:
        """The engine's view of a request; under model timing, with the prompt's block hashes."""
        if self.config.timing != "model":
            return Sequence(model, creq.prompt_tokens, output_tokens, creq.num_choices)
        ids = _prompt_ids(kind, body, self.config.tokenizer)
        return KVSequence(model, len(ids), block_hashes(ids, self.config.block_size), output_tokens, creq.num_choices)

    def _output_tokens(self, creq: CompletionRequest) -> int:
        if creq.max_tokens is None:
            return self.config.output_tokens
        return min(creq.max_tokens, self.config.max_output_tokens)

    async def _generate(self, seq: Sequence, arrival: float) -> None:
        """Advance ``seq`` by one token, with the metrics that go with it."""
        await self.engine.next_token(seq)
        counters = self.metrics.counters[seq.model]
        counters.generation_tokens += seq.num_choices
        if seq.generated == 1:
            counters.prompt_tokens += seq.prompt_tokens
            self.metrics.observe_ttft(seq.model, asyncio.get_running_loop().time() - arrival)

    def _finished(self, seq: Sequence, finish_reason: str) -> None:
        success = self.metrics.counters[seq.model].success
        success[finish_reason] = success.get(finish_reason, 0) + 1

    async def _respond(
        self, request: web.Request, seq: Sequence, writer: ResponseWriter, finish_reason: str, arrival: float
    ) -> web.StreamResponse:
        async with self.engine.admit(seq):
            while not seq.finished:
                await self._generate(seq, arrival)
        self._finished(seq, finish_reason)
        completion_tokens = seq.generated * seq.num_choices
        body = writer.body(seq.generated, finish_reason, usage(seq.prompt_tokens, completion_tokens, seq.cached_tokens))
        return await self._answer(request, web.Response(body=body, headers=_JSON_HEADERS))

    async def _stream(
        self,
        request: web.Request,
        creq: CompletionRequest,
        seq: Sequence,
        writer: ResponseWriter,
        finish_reason: str,
        arrival: float,
    ) -> web.StreamResponse:
        # Headers go out at once, as with vLLM; the first data chunk follows after TTFT.
        response = web.StreamResponse(headers=_SSE_HEADERS)
        sink = _ChunkSink(await response.prepare(request))
        choices = range(seq.num_choices)
        chunks = writer.stream()
        async with self.engine.admit(seq):
            while not seq.finished:
                await self._generate(seq, arrival)
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
            await sink.send(
                chunks.usage_chunk(usage(seq.prompt_tokens, seq.generated * seq.num_choices, seq.cached_tokens))
            )
        await sink.send(SSE_DONE)
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


def _error_response(err: RequestError) -> web.Response:
    return web.Response(status=err.status, body=err.body(), headers=_JSON_HEADERS)


async def start_sim(config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> SimServer:
    """Start a simulated pod in the running event loop and return it once it accepts connections.

    ``port=0`` binds a free port; read it back from ``SimServer.port`` / ``SimServer.url``.
    Stop it with ``await server.stop()`` (or use it as ``async with``).
    """
    server = SimServer(config or SimConfig())
    await server.start(host, port)
    return server
