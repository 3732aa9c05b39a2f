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
same requests in the same order); with --oracle-cache-tokens also the finite-cache oracle: the
same ideal router in front of one LRU cache as large as the fleet (--oracle-pods x
--oracle-cache-tokens), i.e. what is reachable once blocks get evicted.

workloads (text from a word list where every word is one cl100k token, so counts are exact):
  shared-prefix  --groups system prompts of --prefix-tokens, each shared by --prompts-per-group
                 questions of --question-tokens, shuffled. The defaults scale the peers'
                 b2b-saas benchmark (150 groups x 5, 6000 + 1200 tokens, 1000 output) down to
                 30 x 5, 1500 + 300 tokens, 100 output, so a run fits on 2 cores in minutes.
  multi-turn     --users conversations of --rounds turns behind one shared system prompt of
                 --prefix-tokens; every turn resends the history with the real answers.
  random         fresh text of --prefix-tokens + --question-tokens per request (no reuse).
  trace          replay --trace FILE.jsonl in the common (Mooncake) format, one request a line:
                 {"timestamp": ms, "input_length": N, "output_length": N, "hash_ids": [...]}, sent
                 at its timestamps (x --time-scale; --rate/--concurrency do not apply). Each hash
                 id becomes a block of exactly --block-tokens tokens of text (equal ids, equal
                 text), so the trace's prefix sharing is reproduced exactly; --token-scale
                 shrinks or grows every length. `loadtest gen-trace` writes such traces.

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


GEN_TRACE_DESCRIPTION = """\
Write a synthetic trace in the common (Mooncake) JSONL format for `loadtest --workload trace`,
and print what it asks of a cache (requests, tokens, distinct blocks, hit rates of an infinite
cache and of an LRU cache of --capacity-tokens, counted in trace blocks).

kinds:
  multi-turn      --users conversations of --turns turns behind one shared system prompt; each
                  turn resends the conversation and adds a question (--question-blocks) after
                  the previous answer (--answer-blocks); turns --turn-gap-s apart on average, so
                  a conversation's next turn often finds its prefix evicted from a small cache.
  shared-prompts  --requests requests, each one of --groups system prompts (--system-blocks,
                  Zipf --zipf popularity) plus its own question.
  eviction        documents (--doc-blocks each) totalling --working-set x --capacity-tokens,
                  read in a cyclic sweep (each follow-up comes after the whole working set: an
                  LRU cache has evicted it) with --hot-fraction of requests re-reading one of the
                  few documents read last.
Use the same --block-tokens when replaying (the format does not record it).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``loadtest`` subcommand (and its ``gen-trace`` subcommand) to a parent command's subparsers."""
    parser = add_subcommand(
        subparsers,
        "loadtest",
        help="measure routing quality: latency, throughput, load spread and prefix-cache hit rate",
        description=DESCRIPTION,
        add_arguments=add_arguments,
        run=run,
    )
    sub = parser.add_subparsers(dest="loadtest_command", metavar="{gen-trace}")
    add_subcommand(
        sub,
        "gen-trace",
        help="write a synthetic trace (multi-turn, shared-prompts, eviction) for --workload trace",
        description=GEN_TRACE_DESCRIPTION,
        add_arguments=add_gen_trace_arguments,
        run=run_gen_trace,
    )


def add_gen_trace_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``loadtest gen-trace``."""
    from extproc_router.loadtest.tracegen import TRACE_KINDS

    parser.add_argument("--kind", choices=TRACE_KINDS, required=True, help="the cache pattern (see above)")
    parser.add_argument("--out", required=True, metavar="FILE", help="the JSONL trace to write")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same trace")
    parser.add_argument("--block-tokens", type=positive_int, default=512, help="tokens per hash id")
    parser.add_argument("--output-tokens", type=positive_int, default=64, help="output_length of every request")
    parser.add_argument("--rate", type=positive_float, default=2.0,
                        help="Poisson arrivals per second (multi-turn: conversation starts)")
    parser.add_argument("--requests", type=positive_int, metavar="N",
                        help="requests (shared-prompts: default 200; eviction: default two sweeps)")
    parser.add_argument("--users", type=positive_int, default=20, help="multi-turn: conversations")
    parser.add_argument("--turns", type=positive_int, default=5, help="multi-turn: turns per conversation")
    parser.add_argument("--turn-gap-s", type=non_negative_float, default=60.0,
                        help="multi-turn: mean seconds between a user's turns (exponential)")
    parser.add_argument("--answer-blocks", type=non_negative_int, default=1,
                        help="multi-turn: blocks an answer adds to the conversation")
    parser.add_argument("--system-blocks", type=non_negative_int, default=4,
                        help="multi-turn, shared-prompts: blocks of a system prompt")
    parser.add_argument("--question-blocks", type=positive_int, default=1, help="blocks of a request's own question")
    parser.add_argument("--groups", type=positive_int, default=8, help="shared-prompts: system prompts")
    parser.add_argument("--zipf", type=non_negative_float, default=1.0,
                        help="shared-prompts: popularity skew of the system prompts (0: uniform)")
    parser.add_argument("--capacity-tokens", type=positive_int, default=4 * 65536,
                        help="the fleet's KV capacity (pods x per-pod tokens): eviction sizes its working set by "
                             "it, and the printed LRU hit rate uses it")
    parser.add_argument("--working-set", type=positive_float, default=4.0,
                        help="eviction: documents total this many times --capacity-tokens")
    parser.add_argument("--doc-blocks", type=positive_int, default=8, help="eviction: blocks of a document")
    parser.add_argument("--hot-fraction", type=non_negative_float, default=0.25,
                        help="eviction: share of requests re-reading a recently read document")


def run_gen_trace(args: argparse.Namespace) -> int:
    """Write the trace ``args`` describe and print its statistics; 2 on bad options."""
    import orjson

    from extproc_router.loadtest.tracegen import TraceGenSpec, generate_trace, trace_stats
    from extproc_router.loadtest.traces import write_trace

    spec = TraceGenSpec(
        kind=args.kind, seed=args.seed, block_tokens=args.block_tokens, output_tokens=args.output_tokens,
        rate=args.rate, requests=args.requests, users=args.users, turns=args.turns, turn_gap_s=args.turn_gap_s,
        answer_blocks=args.answer_blocks, system_blocks=args.system_blocks, question_blocks=args.question_blocks,
        groups=args.groups, zipf=args.zipf, capacity_tokens=args.capacity_tokens, working_set=args.working_set,
        doc_blocks=args.doc_blocks, hot_fraction=args.hot_fraction,
    )  # fmt: skip
    try:
        trace = generate_trace(spec)
    except ValueError as exc:
        print(f"extproc-router loadtest gen-trace: error: {exc}", file=sys.stderr)
        return 2
    path = write_trace(args.out, trace)
    stats = trace_stats(trace, spec.block_tokens, spec.capacity_tokens)
    print(orjson.dumps({"trace": str(path), "kind": spec.kind, "block_tokens": spec.block_tokens, **stats}).decode())
    return 0


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
    wl.add_argument("--trace", metavar="FILE", help="trace: the JSONL trace to replay")
    wl.add_argument("--block-tokens", type=positive_int, default=512,
                    help="trace: tokens per hash id (512 in the Mooncake traces)")
    wl.add_argument("--time-scale", type=positive_float, default=1.0,
                    help="trace: multiply the timestamps (0.5: twice as fast)")
    wl.add_argument("--token-scale", type=positive_float, default=1.0,
                    help="trace: multiply input, output and block lengths (0.25: prompts a quarter as long)")

    load = parser.add_argument_group("arrival and bounds")
    mode = load.add_mutually_exclusive_group()
    mode.add_argument("--rate", type=positive_float, metavar="RPS", help="open loop: Poisson arrivals per second")
    mode.add_argument("--concurrency", type=positive_int, default=8,
                      help="closed loop: requests in flight (used unless --rate is given)")
    load.add_argument("--requests", type=positive_int, metavar="N",
                      help="requests per arm (default: the workload's size: groups x prompts, users x rounds, "
                           "random 100); shared-prefix repeats reshuffled passes beyond its size")
    load.add_argument("--duration", type=positive_float, metavar="S",
                      help="stop sending after this many seconds per arm (default: 600; a trace's own length x "
                           "--time-scale + 60 when that is longer)")
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
    oracle.add_argument("--oracle-cache-tokens", type=positive_int, metavar="N",
                        help="KV capacity of one pod, in tokens: also report the finite-cache oracle, one LRU "
                             "cache of --oracle-pods x N tokens (the simulator's default is 65536)")
    oracle.add_argument("--oracle-pods", type=positive_int, metavar="P",
                        help="pods the finite-cache oracle pools (default: the --reset-url pod URLs, else 1)")

    out = parser.add_argument_group("output")
    out.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help="where report.json, summary.md, plots go")
    out.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    out.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    """The RunSettings that parsed ``args`` describe; ValueError for a bad combination."""
    from extproc_router.loadtest.client import reset_target
    from extproc_router.loadtest.runner import RunSettings

    if args.workload == "trace":
        if not args.trace:
            raise ValueError("--workload trace needs --trace FILE")
        if args.rate:
            raise ValueError("--workload trace sends at the trace's timestamps: use --time-scale, not --rate")
        from extproc_router.loadtest.traces import load_trace

        try:
            load_trace(args.trace)  # a bad line is reported now, not in the middle of an arm
        except OSError as exc:
            raise ValueError(f"--trace {args.trace}: {exc.strerror or exc}") from None
    elif args.trace:
        raise ValueError("--trace goes with --workload trace")
    spec = WorkloadSpec(
        name=args.workload, path=args.path, seed=args.seed, groups=args.groups,
        prompts_per_group=args.prompts_per_group, prefix_tokens=args.prefix_tokens,
        question_tokens=args.question_tokens, output_tokens=args.output_tokens, users=args.users,
        rounds=args.rounds, history_tokens=args.history_tokens, requests=args.requests, trace=args.trace,
        block_tokens=args.block_tokens, time_scale=args.time_scale, token_scale=args.token_scale,
        tokenizer=args.tokenizer,
    )  # fmt: skip
    oracle_pods = args.oracle_pods
    if oracle_pods is None:
        # A pod base URL is reset at /sim/reset; a URL with a path (a router's flush) is no pod.
        oracle_pods = sum(1 for url in args.reset_url if reset_target(url).endswith("/sim/reset")) or 1
    headers: dict[str, str] = {}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"--header {item!r}: expected NAME:VALUE")
        headers[name.strip()] = value.strip()
    return RunSettings(
        model=args.model, workload=spec, rate=args.rate, concurrency=args.concurrency,
        duration=args.duration if args.duration is not None else _default_duration(spec),
        grace=args.grace, timeout=args.timeout, headers=headers,
        extra_body={"ignore_eos": True} if args.ignore_eos else {}, reset_urls=list(args.reset_url),
        preflight=not args.no_preflight, block_size=args.block_size, tokenizer_kind=args.tokenizer,
        oracle_cache_tokens=args.oracle_cache_tokens, oracle_pods=oracle_pods,
    )  # fmt: skip


def _default_duration(spec: WorkloadSpec) -> float:
    if spec.name != "trace" or spec.trace is None:
        return 600.0
    from extproc_router.loadtest.traces import load_trace

    rows = load_trace(spec.trace)[: spec.planned_requests()]
    span_s = (rows[-1].timestamp_ms - rows[0].timestamp_ms) / 1000.0 if rows else 0.0
    return max(600.0, span_s * spec.time_scale + 60.0)


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
        if settings.oracle_capacity_tokens is not None:
            notes.append(
                f"hit oracle LRU: an ideal router in front of one LRU cache of {settings.oracle_pods} "
                f"pod{'s' if settings.oracle_pods != 1 else ''} x {settings.oracle_cache_tokens} tokens "
                f"({settings.block_size}-token blocks; a served request's "
                "blocks become the most recent, its first block most of all, as vLLM frees a prompt tail first); "
                "requests one at a time in sending order: what is reachable once blocks get evicted"
            )

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
