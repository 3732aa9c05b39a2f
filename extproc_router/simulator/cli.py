"""Command line of the simulated model pod: ``extproc-router sim`` (or ``python -m extproc_router.simulator``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine
from typing import Any

from extproc_router.argtypes import (
    HelpFormatter,
    add_subcommand,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from extproc_router.simulator.config import (
    DEFAULT_BOOTSTRAP_PORT,
    KV_EVENTS_FORMATS,
    ROLES,
    KVEventsConfig,
    SimConfig,
    kv_events_config_from_json,
    parse_lora_modules,
)

log = logging.getLogger("simulator")

EXIT_DIED = 3
"""Exit code after ``--die-after`` requests, distinct from a crash (1) and a usage error (2)."""

DESCRIPTION = """\
Run a simulated vLLM model pod: an OpenAI-compatible HTTP server (/v1/chat/completions,
/v1/completions, /v1/models, /health, /metrics with vLLM metric names) that answers with
deterministic filler text at a configurable pace, without a GPU. Fault switches make it fail,
hang, report unhealthy or exit, for testing a gateway. At runtime, POST /sim/faults with
{"fail_every": N, "stall": bool, "unhealthy": bool} flips faults, GET /sim/stats returns
request and engine counters, and POST /sim/reset flushes the prefix cache and zeroes the
counters (a cold start without a restart). Every response carries the header x-sim-pod: <pod name>.

Two timing modes. --timing fixed (the default): every request gets --ttft-ms to its first token
and --itl-ms between the others, whatever the load. --timing model: prompts are tokenized
(--tokenizer) and cut into --block-size blocks held in a prefix-caching KV cache of
--kv-capacity-tokens (LRU eviction; running requests pin their blocks; requests wait when no
blocks are free), and a continuous-batching step loop of up to --max-num-seqs sequences sets the
pace: prefill costs uncached prompt tokens / --prefill-tokens-per-s, a decode step costs
--decode-step-ms + --decode-ms-per-seq x running sequences, and a step carrying prefill work slows
every sequence in it. usage.prompt_tokens_details.cached_tokens and vllm:prefix_cache_* report the
cache hits. The model defaults approximate an 8B model on one H100 under vLLM, except the KV
capacity, kept ~1/7 of an H100's (~450k tokens) so that benchmarks overflowing one pod stay small.

Prefill/decode disaggregation (--role). A prefill pod given kv_transfer_params.do_remote_decode
(vLLM style) runs the prefill only, pins the prompt's KV blocks for --kv-hold-seconds and answers
with kv_transfer_params {do_remote_prefill, remote_engine_id, remote_block_ids, remote_host,
remote_port, tp_size} for the decode pod. A decode pod given them skips the prefill (the KV arrives
at --kv-transfer-ms-per-1k-tokens) and then tells the prefill pod (POST /sim/kv/release) to unpin.
SGLang style: both pods get bootstrap_host/bootstrap_port/bootstrap_room; the prefill pod files
its KV under the room, the decode pod waits for it (GET <bootstrap_host>:<bootstrap_port>
/sim/kv/room/<room>, answered on the prefill pod's --bootstrap-port and on its HTTP port) for at
most --bootstrap-timeout-s, then 503. Without transfer fields any role serves a request whole.

KV-cache events (--timing model). --kv-events-endpoint tcp://HOST:PORT (or vLLM's
--kv-events-config JSON) publishes vLLM's KV events on a ZeroMQ PUB socket as the prefix cache
changes: each engine step's BlockStored (full blocks filled, with their token ids and the parent
block's hash), BlockRemoved (evicted blocks) and AllBlocksCleared (at start and on POST
/sim/reset) go out as one msgpack batch [ts, events, data_parallel_rank] in the three-frame
message [topic, 8-byte big-endian sequence number, payload]. --kv-events-replay-endpoint adds
vLLM's ROUTER replay socket: send a start sequence number (8 bytes big-endian), get the buffered
batches from it, then an end marker (sequence -1, empty payload). The simulator binds both
endpoints (port 0: any free port, logged); vLLM would connect a PUB endpoint that names a host.

LoRA adapters, as vLLM serves them: --lora-modules name=path ... loads adapters at start (implies
--enable-lora); with --enable-lora, POST /v1/load_lora_adapter {"lora_name", "lora_path"} and POST
/v1/unload_lora_adapter {"lora_name"} change them at run time. A request whose model is an adapter
runs on the base model (metrics count there), is answered under the adapter's name, and its KV
blocks are the adapter's own (block hashes salted by its name; KV events carry lora_id and
lora_name). /v1/models lists each adapter with its base model as parent and its path as root, and
vllm:lora_requests_info names the adapters of running and waiting requests.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``sim`` subcommand to a parent command's subparsers."""
    add_subcommand(
        subparsers,
        "sim",
        help="run a simulated vLLM model pod (OpenAI-compatible, no GPU)",
        description=DESCRIPTION,
        add_arguments=add_arguments,
        run=run,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every simulator option to ``parser``."""
    net = parser.add_argument_group("serving")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on")
    net.add_argument("--port", type=non_negative_int, default=8000, help="port to listen on (0: any free port)")
    net.add_argument(
        "--model",
        action="append",
        metavar="NAME",
        default=None,
        help="served model name; repeat or comma-separate for several (default: sim-model)",
    )
    net.add_argument("--pod-name", help="name sent in the x-sim-pod header (default: <hostname>-<port>)")

    lora = parser.add_argument_group("LoRA adapters")
    lora.add_argument(
        "--enable-lora",
        action="store_true",
        help="serve LoRA adapters: runtime loading (POST /v1/load_lora_adapter, /v1/unload_lora_adapter) and "
        "vllm:lora_requests_info",
    )
    lora.add_argument(
        "--lora-modules",
        nargs="+",
        action="extend",
        metavar="NAME=PATH",
        default=None,
        help='adapters served from the start (implies --enable-lora): name=path or vLLM\'s JSON form {"name": ..., '
        '"path": ..., "base_model_name": ...}; the simulator reads nothing at PATH',
    )
    lora.add_argument("--max-loras", type=positive_int, default=1, help="vLLM's max_loras, reported as max_lora")
    net.add_argument(
        "--shutdown-grace-s",
        type=non_negative_float,
        default=5.0,
        help="on SIGINT/SIGTERM, seconds in-flight requests get to finish",
    )
    net.add_argument("--log-level", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"], default="INFO")

    timing = parser.add_argument_group("timing")
    timing.add_argument(
        "--timing",
        choices=["fixed", "model"],
        default="fixed",
        help="fixed: constant --ttft-ms/--itl-ms; model: KV cache + continuous batching (options below)",
    )
    timing.add_argument("--ttft-ms", type=non_negative_float, default=20.0, help="time to first token (fixed)")
    timing.add_argument("--itl-ms", type=non_negative_float, default=5.0, help="time between later tokens (fixed)")
    timing.add_argument(
        "--output-tokens",
        type=positive_int,
        default=16,
        help="completion length when the request sets no max_tokens",
    )
    timing.add_argument(
        "--max-output-tokens",
        type=positive_int,
        default=256,
        help="completion length cap: with max_tokens, min(max_tokens, this) tokens are produced",
    )
    timing.add_argument(
        "--latency-jitter",
        type=non_negative_float,
        default=0.0,
        help="scale each delay (fixed) or step time (model) by a random factor in [1-J, 1+J]",
    )
    timing.add_argument("--seed", type=int, default=0, help="seed of the jitter random generator")
    timing.add_argument(
        "--max-num-seqs",
        type=positive_int,
        default=256,
        help="sequences generating at once; later requests wait (vllm:num_requests_waiting)",
    )
    timing.add_argument(
        "--kv-capacity-tokens",
        type=positive_int,
        default=65536,
        help="KV-cache size in tokens. model: the prefix cache's capacity, also the longest prompt + output "
        "accepted (an H100 holds ~450k tokens of an 8B model; the default is smaller so that benchmarks "
        "overflowing one pod stay quick); fixed: running tokens / this = vllm:gpu_cache_usage_perc",
    )

    model = parser.add_argument_group("model timing (--timing model)")
    model.add_argument(
        "--tokenizer",
        choices=["cl100k", "bytes"],
        default="cl100k",
        help="cl100k: exact OpenAI cl100k ids (usage.prompt_tokens as OpenAI counts); bytes: one token per "
        "UTF-8 byte, cheaper",
    )
    model.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV-cache block")
    model.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="never reuse cached prompt blocks (vLLM without --enable-prefix-caching)",
    )
    model.add_argument(
        "--max-num-batched-tokens",
        type=non_negative_int,
        default=8192,
        help="tokens one step may compute (decodes + prefill chunks); longer prompts are prefilled in chunks "
        "over several steps; 0: unlimited, no chunked prefill (8192 is vLLM's OpenAI-server default on H100)",
    )
    model.add_argument(
        "--prefill-tokens-per-s",
        type=positive_float,
        default=12000.0,
        help="prefill speed for uncached prompt tokens (8B on H100: 16 GFLOP/token at ~20%% of 989 TFLOPS)",
    )
    model.add_argument(
        "--decode-step-ms",
        type=non_negative_float,
        default=8.0,
        help="fixed cost of every step (8B on H100: 16 GB of weights read at 3.35 TB/s plus overheads)",
    )
    model.add_argument(
        "--decode-ms-per-seq",
        type=non_negative_float,
        default=0.08,
        help="added step time per decoding sequence (its KV read: ~2k tokens x 128 KiB at 3.35 TB/s)",
    )
    model.add_argument(
        "--kv-transfer-ms-per-1k-tokens",
        type=non_negative_float,
        default=3.0,
        help="time to receive 1k prompt tokens of KV computed by another pod (128 MiB over a 400 Gb/s NIC); "
        "for prefill/decode disaggregation",
    )

    pd = parser.add_argument_group("prefill/decode disaggregation")
    pd.add_argument(
        "--role",
        choices=ROLES,
        default="combined",
        help="combined: ignore transfer fields; prefill: run prefill-only requests and hold their KV for the "
        "decode pod; decode: take KV from a prefill pod instead of computing it",
    )
    pd.add_argument(
        "--kv-hold-seconds",
        type=non_negative_float,
        default=30.0,
        help="how long a prefill pod pins a finished prefill's KV blocks unless the decode pod releases them "
        "sooner (model timing; 0: not at all)",
    )
    pd.add_argument(
        "--bootstrap-port",
        type=non_negative_int,
        default=None,
        help=f"port of the SGLang bootstrap listener answering room lookups (default: {DEFAULT_BOOTSTRAP_PORT} "
        "with --role prefill, otherwise none; 0: none; the HTTP port answers them as well)",
    )
    pd.add_argument(
        "--bootstrap-timeout-s",
        type=non_negative_float,
        default=10.0,
        help="how long an SGLang-style decode request waits for its prefill's bootstrap room before a 503",
    )

    kv = parser.add_argument_group("KV-cache events (--timing model)")
    kv.add_argument(
        "--kv-events-config",
        metavar="JSON",
        help='vLLM\'s --kv-events-config: {"enable_kv_cache_events": true, "publisher": "zmq", '
        '"endpoint": "tcp://*:5557", "replay_endpoint": ..., "topic": ..., "buffer_steps": ..., '
        '"hwm": ...}; the --kv-events-* options below override its fields',
    )
    kv.add_argument(
        "--kv-events-endpoint",
        metavar="ENDPOINT",
        help="publish KV events on a ZeroMQ PUB socket bound here, e.g. tcp://127.0.0.1:5557 (port 0: any free port)",
    )
    kv.add_argument(
        "--kv-events-replay-endpoint",
        metavar="ENDPOINT",
        help="ROUTER socket answering replay requests from the last --kv-events-buffer-steps batches",
    )
    kv.add_argument("--kv-events-topic", metavar="TOPIC", help="topic frame of every message (vLLM's default: empty)")
    kv.add_argument("--kv-events-buffer-steps", type=positive_int, metavar="N", help="batches kept for replay (10000)")
    kv.add_argument(
        "--kv-events-format",
        choices=KV_EVENTS_FORMATS,
        default="map",
        help="map: vLLM's current events (each a msgpack map tagged by its 'type' key, vllm-project/vllm#42892; replay "
        "replies carry the topic frame, #45177; both in v0.26); array: earlier releases' tagged positional arrays, "
        "replay replies without the topic",
    )

    faults = parser.add_argument_group("faults")
    faults.add_argument(
        "--fail-every",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="answer every Nth completion request with a 500 error (0: never)",
    )
    faults.add_argument(
        "--stall",
        action="store_true",
        help="accept completion requests but never answer them until the client gives up "
        '(or POST /sim/faults {"stall": false} releases them)',
    )
    faults.add_argument(
        "--die-after",
        type=non_negative_int,
        default=0,
        metavar="N",
        help=f"exit with code {EXIT_DIED} after N completion responses (0: never)",
    )
    faults.add_argument("--unhealthy", action="store_true", help="GET /health answers 503")


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """Build the SimConfig that parsed ``args`` describe."""
    models: list[str] = []
    for value in args.model or ["sim-model"]:
        models.extend(name.strip() for name in value.split(",") if name.strip())
    lora_modules = parse_lora_modules(args.lora_modules or [])
    clash = sorted(m.name for m in lora_modules if m.name in models)
    if clash:
        raise ValueError(f"--lora-modules: {', '.join(clash)} is also a --model name")
    bootstrap_port = args.bootstrap_port
    if bootstrap_port is None:
        bootstrap_port = DEFAULT_BOOTSTRAP_PORT if args.role == "prefill" else 0
    return SimConfig(
        enable_lora=args.enable_lora,
        lora_modules=lora_modules,
        max_loras=args.max_loras,
        kv_events=kv_events_from_args(args),
        models=list(dict.fromkeys(models)),
        pod_name=args.pod_name,
        ttft_ms=args.ttft_ms,
        itl_ms=args.itl_ms,
        output_tokens=args.output_tokens,
        max_output_tokens=args.max_output_tokens,
        latency_jitter=args.latency_jitter,
        seed=args.seed,
        max_num_seqs=args.max_num_seqs,
        kv_capacity_tokens=args.kv_capacity_tokens,
        timing=args.timing,
        tokenizer=args.tokenizer,
        block_size=args.block_size,
        prefix_caching=args.prefix_caching,
        max_num_batched_tokens=args.max_num_batched_tokens,
        prefill_tokens_per_s=args.prefill_tokens_per_s,
        decode_step_ms=args.decode_step_ms,
        decode_ms_per_seq=args.decode_ms_per_seq,
        kv_transfer_ms_per_1k_tokens=args.kv_transfer_ms_per_1k_tokens,
        role=args.role,
        kv_hold_seconds=args.kv_hold_seconds,
        bootstrap_port=bootstrap_port or None,  # SimConfig: None is "no listener", 0 "any free port"
        bootstrap_timeout_s=args.bootstrap_timeout_s,
        fail_every=args.fail_every,
        stall=args.stall,
        die_after=args.die_after,
        unhealthy=args.unhealthy,
    )


def kv_events_from_args(args: argparse.Namespace) -> KVEventsConfig | None:
    """The KV events settings of ``--kv-events-config`` and the ``--kv-events-*`` options; None: no events.

    ValueError for a bad JSON, a bad endpoint, or events without ``--timing model``.
    """
    config = None
    if args.kv_events_config is not None:
        config = kv_events_config_from_json(args.kv_events_config, args.kv_events_format)
    if args.kv_events_endpoint is not None:
        config = KVEventsConfig(**{**_fields(config), "endpoint": args.kv_events_endpoint})
    elif config is None and (args.kv_events_replay_endpoint or args.kv_events_topic is not None):
        raise ValueError("--kv-events-replay-endpoint and --kv-events-topic need --kv-events-endpoint")
    if config is None:
        return None
    overrides: dict[str, object] = {"format": args.kv_events_format}
    if args.kv_events_replay_endpoint is not None:
        overrides["replay_endpoint"] = args.kv_events_replay_endpoint
    if args.kv_events_topic is not None:
        overrides["topic"] = args.kv_events_topic
    if args.kv_events_buffer_steps is not None:
        overrides["buffer_steps"] = args.kv_events_buffer_steps
    if args.timing != "model":
        raise ValueError("KV events follow the KV cache, which only --timing model has")
    return KVEventsConfig(**{**_fields(config), **overrides})


def _fields(config: KVEventsConfig | None) -> dict[str, object]:
    if config is None:
        return {}
    return {name: getattr(config, name) for name in KVEventsConfig.__dataclass_fields__}


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM (exit code 0) or until ``--die-after`` is reached (exit code 3)."""
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    if not config.models:
        log.error("--model names no model")
        return 2
    return _run_in_loop(_serve(config, args.host, args.port, args.shutdown_grace_s))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m extproc_router.simulator``: the ``sim`` options without a subcommand."""
    parser = argparse.ArgumentParser(
        prog="python -m extproc_router.simulator",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


async def _serve(config: SimConfig, host: str, port: int, grace_s: float) -> int:
    # Imported here so that building the CLI (e.g. `extproc-router --help`) does not load aiohttp.
    from extproc_router.simulator.server import start_sim

    try:
        server = await start_sim(config, host, port)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", host, port, exc)
        return 1
    log.info(
        "sim pod=%s listening on %s models=%s role=%s%s",
        server.pod_name,
        server.url,
        ",".join(server.models),
        config.role,
        f" bootstrap_port={server.bootstrap_port}" if server.bootstrap_port is not None else "",
    )
    if server.kv_events is not None:
        log.info(
            "sim pod=%s: KV events on %s (replay: %s, topic %r, format %s)",
            server.pod_name,
            server.kv_events.endpoint,
            server.kv_events.replay_endpoint or "none",
            config.kv_events.topic if config.kv_events else "",
            config.kv_events.format if config.kv_events else "",
        )

    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_requested.set)
    waiters = {
        loop.create_task(stop_requested.wait()),
        loop.create_task(server.died.wait()),
    }
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waiters:
            task.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

    if server.died.is_set():
        log.warning(
            "sim pod=%s: die-after %d reached, exiting with code %d", server.pod_name, config.die_after, EXIT_DIED
        )
        return EXIT_DIED
    log.info("sim pod=%s: stopping (grace %.1f s)", server.pod_name, grace_s)
    await server.stop(grace_s)
    return 0


def _run_in_loop(coro: Coroutine[Any, Any, int]) -> int:
    loop_factory = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coro)
