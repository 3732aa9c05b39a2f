"""Command line of the harness: ``extproc-router loadtest``."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from extproc_router.argtypes import (
    add_subcommand,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from extproc_router.loadtest.workloads import WORKLOADS, WorkloadSpec

if TYPE_CHECKING:  # the runner pulls in aiohttp; `extproc-router --help` should not pay for it
    from extproc_router.loadtest.runner import Arm, RunSettings

DEFAULT_OUT = ".run/loadtest"

DESCRIPTION = """\
Measure routing quality: send a seeded, reproducible workload to any OpenAI-compatible endpoint
(our Envoy, a peer router, one pod), stream every answer, and report TTFT, ITL, end-to-end
latency, throughput, errors, requests per pod (response header target-pod, else x-sim-pod, else
"unknown") and the prefix-cache hit rate: achieved (usage.prompt_tokens_details.cached_tokens
over prompt tokens) and oracle (what an ideal router with an infinite cache would reach on the
same requests in the same order).

workloads (text from a word list where every word is one cl100k token, so counts are exact):
  shared-prefix  --groups system prompts of --prefix-tokens, each shared by --prompts-per-group
                 questions of --question-tokens, shuffled. The defaults scale the peers'
                 b2b-saas benchmark (150 groups x 5, 6000 + 1200 tokens, 1000 output) down to
                 30 x 5, 1500 + 300 tokens, 100 output, so a run fits on 2 cores in minutes.
  multi-turn     --users conversations of --rounds turns behind one shared system prompt of
                 --prefix-tokens; every turn resends the history with the real answers.
  random         fresh text of --prefix-tokens + --question-tokens per request (no reuse).

arms: --compare random,least-request,prefix-cache runs each strategy of --target (header
routing-strategy) on the same requests; NAME=URL adds another endpoint, e.g. a peer router:
  --compare least-request,sglang=http://127.0.0.1:30001
Before each arm one tiny request checks the arm (an arm the router rejects, e.g. an unknown
strategy, is skipped and reported), then every --reset-url gets POST /sim/reset so the arm
starts with cold caches.

output: a table, and in --out: report.json (settings, per-arm summaries, every request),
summary.md, and with matplotlib ttft_cdf.png, pod_requests.png, pod_hit_rate.png.
Ctrl-C stops sending and writes what was measured; a second Ctrl-C aborts.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``loadtest`` subcommand to a parent command's subparsers."""
    add_subcommand(
        subparsers,
        "loadtest",
        help="measure routing quality: latency, throughput, load spread and prefix-cache hit rate",
        description=DESCRIPTION,
        add_arguments=add_arguments,
        run=run,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of the harness."""
    target = parser.add_argument_group("target")
    target.add_argument("--target", metavar="URL", help="base URL of the endpoint, e.g. http://127.0.0.1:8888")
    target.add_argument("--model", default="demo-model", help="model name sent in every request")
    target.add_argument("--path", choices=["chat", "completions"], default="chat",
                        help="/v1/chat/completions or /v1/completions")
    target.add_argument("--header", action="append", default=[], metavar="NAME:VALUE",
                        help="extra request header (repeatable)")
    target.add_argument("--ignore-eos", action="store_true",
                        help='send "ignore_eos": true (vLLM/SGLang) so real engines produce exactly --output-tokens')

    wl = parser.add_argument_group("workload")
    wl.add_argument("--workload", choices=WORKLOADS, default="shared-prefix")
    wl.add_argument("--seed", type=int, default=0, help="same seed, same requests (and Poisson schedule)")
    wl.add_argument("--groups", type=positive_int, default=30, help="shared-prefix: prompt groups")
    wl.add_argument("--prompts-per-group", type=positive_int, default=5, help="shared-prefix: questions per group")
    wl.add_argument("--prefix-tokens", type=non_negative_int, default=1500,
                    help="shared prefix / system prompt length (random: part of the prompt length)")
    wl.add_argument("--question-tokens", type=positive_int, default=300, help="question length per request/turn")
    wl.add_argument("--output-tokens", type=positive_int, default=100, help="max_tokens of every request")
    wl.add_argument("--users", type=positive_int, default=10, help="multi-turn: conversations")
    wl.add_argument("--rounds", type=positive_int, default=5, help="multi-turn: turns per conversation")
    wl.add_argument("--history-tokens", type=non_negative_int, default=0,
                    help="multi-turn: user-specific context opening each conversation (production-stack's "
                         "--user-history-prompt)")

    load = parser.add_argument_group("arrival and bounds")
    mode = load.add_mutually_exclusive_group()
    mode.add_argument("--rate", type=positive_float, metavar="RPS", help="open loop: Poisson arrivals per second")
    mode.add_argument("--concurrency", type=positive_int, default=8,
                      help="closed loop: requests in flight (used unless --rate is given)")
    load.add_argument("--requests", type=positive_int, metavar="N",
                      help="requests per arm (default: the workload's size: groups x prompts, users x rounds, "
                           "random 100); shared-prefix repeats reshuffled passes beyond its size")
    load.add_argument("--duration", type=positive_float, default=600.0, metavar="S",
                      help="stop sending after this many seconds per arm")
    load.add_argument("--grace", type=non_negative_float, default=60.0, metavar="S",
                      help="time requests still in flight at --duration get before they are cancelled")
    load.add_argument("--timeout", type=positive_float, default=300.0, metavar="S",
                      help="longest wait for the next bytes of a response")

    arms = parser.add_argument_group("arms")
    arms.add_argument("--strategy", metavar="NAME", help="routing-strategy header of a single-arm run")
    arms.add_argument("--compare", metavar="ARMS",
                      help="comma-separated arms: a strategy of --target, or NAME=URL for another endpoint")
    arms.add_argument("--reset-url", action="append", default=[], metavar="URL",
                      help="POSTed before each arm (repeatable): a pod base URL gets POST /sim/reset; a URL "
                           "with a path is POSTed as given, e.g. a router's http://HOST:PORT/flush_cache")
    arms.add_argument("--no-preflight", action="store_true", help="skip the one-request check before each arm")

    oracle = parser.add_argument_group("hit rate")
    oracle.add_argument("--block-size", type=positive_int, default=16, help="KV block size of the pods, in tokens")
    oracle.add_argument("--tokenizer", default="cl100k", help="tokenizer kind of simulator.tokenizer")

    out = parser.add_argument_group("output")
    out.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help="where report.json, summary.md, plots go")
    out.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    out.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    """The RunSettings that parsed ``args`` describe; ValueError for a bad combination."""
    from extproc_router.loadtest.runner import RunSettings

    spec = WorkloadSpec(
        name=args.workload, path=args.path, seed=args.seed, groups=args.groups,
        prompts_per_group=args.prompts_per_group, prefix_tokens=args.prefix_tokens,
        question_tokens=args.question_tokens, output_tokens=args.output_tokens, users=args.users,
        rounds=args.rounds, history_tokens=args.history_tokens, requests=args.requests,
    )  # fmt: skip
    headers: dict[str, str] = {}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"--header {item!r}: expected NAME:VALUE")
        headers[name.strip()] = value.strip()
    return RunSettings(
        model=args.model, workload=spec, rate=args.rate, concurrency=args.concurrency, duration=args.duration,
        grace=args.grace, timeout=args.timeout, headers=headers,
        extra_body={"ignore_eos": True} if args.ignore_eos else {}, reset_urls=list(args.reset_url),
        preflight=not args.no_preflight, block_size=args.block_size, tokenizer_kind=args.tokenizer,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Run the load test; 0 when some arm served requests, 1 when none did, 2 on bad flags, 130 on Ctrl-C."""
    return asyncio.run(main_async(args))


async def main_async(args: argparse.Namespace) -> int:
    """`run` inside a running event loop (tests await it)."""
    from extproc_router.loadtest.runner import Arm, parse_arms

    try:
        settings = settings_from_args(args)
        if args.compare:
            if args.strategy:
                raise ValueError("--strategy and --compare exclude each other (name strategies in --compare)")
            arms = parse_arms(args.compare, args.target)
        else:
            if not args.target:
                raise ValueError("--target is required (or --compare with NAME=URL arms)")
            arms = [Arm(name=args.strategy or "default", target=args.target.rstrip("/"), strategy=args.strategy)]
    except ValueError as exc:
        print(f"extproc-router loadtest: error: {exc}", file=sys.stderr)
        return 2
    return await _run_arms_and_report(args, settings, arms)


async def _run_arms_and_report(args: argparse.Namespace, settings: RunSettings, arms: list[Arm]) -> int:
    from rich.console import Console

    from extproc_router.loadtest.oracle import Oracle, load_tokenizer
    from extproc_router.loadtest.report import (
        build_report,
        headline,
        matplotlib_available,
        rich_table,
        tokenizer_mismatch,
        write_report,
    )
    from extproc_router.loadtest.runner import Progress, RichProgress, run_arms

    console = Console()
    if not console.is_terminal:
        # Piped into a log: rich would assume 80 columns and squash five arms' columns.
        console = Console(width=140)
    notes: list[str] = []
    tokenizer = load_tokenizer()
    oracle = None
    if tokenizer is None:
        notes.append("oracle hit rate not computed: simulator.tokenizer is not available")
    else:
        oracle = Oracle(tokenizer, settings.path, settings.block_size, settings.tokenizer_kind)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_sigint() -> None:
        # First Ctrl-C: stop sending and write what we have; the restored default makes a second one abort.
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)
        console.print("[yellow]interrupted: finishing up and writing the report (Ctrl-C again to abort)")

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        if args.quiet:
            results = await run_arms(arms, settings, Progress(), stop, oracle)
        else:
            with RichProgress() as progress:
                results = await run_arms(arms, settings, progress, stop, oracle)
    finally:
        loop.remove_signal_handler(signal.SIGINT)

    report = build_report(settings, results, notes)
    for arm in report["arms"]:
        warning = tokenizer_mismatch(arm["summary"])
        if warning:
            report["notes"].append(warning)
    want_plots = not args.no_plots
    if want_plots and not matplotlib_available():
        report["notes"].append("no plots: matplotlib is not installed (pip install matplotlib)")
        want_plots = False
    written = write_report(report, Path(args.out), plots=want_plots)

    console.print(f"\n[bold]{headline(report)}")
    console.print(rich_table(report))
    for note in report["notes"]:
        console.print(f"[yellow]note:[/] {note}")
    console.print("wrote " + ", ".join(str(p) for p in written))
    if stop.is_set():
        return 130
    return 0 if any(a["summary"]["ok"] for a in report["arms"]) else 1
