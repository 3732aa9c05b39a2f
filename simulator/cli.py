"""Command line of the simulated model pod: ``extproc-router sim`` (or ``python -m simulator``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine
from typing import Any

from simulator.config import SimConfig

log = logging.getLogger("simulator")

EXIT_DIED = 3
"""Exit code after ``--die-after`` requests, distinct from a crash (1) and a usage error (2)."""

DESCRIPTION = """\
Run a simulated vLLM model pod: an OpenAI-compatible HTTP server (/v1/chat/completions,
/v1/completions, /v1/models, /health, /metrics with vLLM metric names) that answers with
deterministic filler text at a configurable pace, without a GPU. Fault switches make it fail,
hang, report unhealthy or exit, for testing a gateway. At runtime, POST /sim/faults with
{"fail_every": N, "stall": bool, "unhealthy": bool} flips faults and GET /sim/stats returns
request counters. Every response carries the header x-sim-pod: <pod name>.
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults (except empty ones) and keeps the description's line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action) or ""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``sim`` subcommand to a parent command's subparsers."""
    parser = subparsers.add_parser(
        "sim",
        help="run a simulated vLLM model pod (OpenAI-compatible, no GPU)",
        description=DESCRIPTION,
        formatter_class=_HelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every simulator option to ``parser``."""
    net = parser.add_argument_group("serving")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on")
    net.add_argument("--port", type=_non_negative_int, default=8000, help="port to listen on (0: any free port)")
    net.add_argument(
        "--model",
        action="append",
        metavar="NAME",
        default=None,
        help="served model name; repeat or comma-separate for several (default: sim-model)",
    )
    net.add_argument("--pod-name", help="name sent in the x-sim-pod header (default: <hostname>-<port>)")
    net.add_argument(
        "--shutdown-grace-s",
        type=_non_negative_float,
        default=5.0,
        help="on SIGINT/SIGTERM, seconds in-flight requests get to finish",
    )
    net.add_argument("--log-level", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"], default="INFO")

    timing = parser.add_argument_group("timing")
    timing.add_argument("--ttft-ms", type=_non_negative_float, default=20.0, help="time to first token")
    timing.add_argument("--itl-ms", type=_non_negative_float, default=5.0, help="time between later tokens")
    timing.add_argument(
        "--output-tokens",
        type=_positive_int,
        default=16,
        help="completion length when the request sets no max_tokens",
    )
    timing.add_argument(
        "--max-output-tokens",
        type=_positive_int,
        default=256,
        help="completion length cap: with max_tokens, min(max_tokens, this) tokens are produced",
    )
    timing.add_argument(
        "--latency-jitter",
        type=_non_negative_float,
        default=0.0,
        help="scale each delay by a random factor in [1-J, 1+J]",
    )
    timing.add_argument("--seed", type=int, default=0, help="seed of the jitter random generator")
    timing.add_argument(
        "--max-num-seqs",
        type=_positive_int,
        default=256,
        help="sequences generating at once; later requests wait (vllm:num_requests_waiting)",
    )
    timing.add_argument(
        "--kv-capacity-tokens",
        type=_positive_int,
        default=65536,
        help="KV-cache size in tokens; running tokens / this = vllm:gpu_cache_usage_perc",
    )

    faults = parser.add_argument_group("faults")
    faults.add_argument(
        "--fail-every",
        type=_non_negative_int,
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
        type=_non_negative_int,
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
    return SimConfig(
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
        fail_every=args.fail_every,
        stall=args.stall,
        die_after=args.die_after,
        unhealthy=args.unhealthy,
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM (exit code 0) or until ``--die-after`` is reached (exit code 3)."""
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    if not config.models:
        log.error("--model names no model")
        return 2
    return _run_in_loop(_serve(config, args.host, args.port, args.shutdown_grace_s))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m simulator``: the ``sim`` options without a subcommand."""
    parser = argparse.ArgumentParser(
        prog="python -m simulator",
        description=DESCRIPTION,
        formatter_class=_HelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


async def _serve(config: SimConfig, host: str, port: int, grace_s: float) -> int:
    # Imported here so that building the CLI (e.g. `extproc-router --help`) does not load aiohttp.
    from simulator.server import start_sim

    try:
        server = await start_sim(config, host, port)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", host, port, exc)
        return 1
    log.info("sim pod=%s listening on %s models=%s", server.pod_name, server.url, ",".join(server.models))

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


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0.0:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value
