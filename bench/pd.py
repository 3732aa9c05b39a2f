"""Prefill/decode disaggregation benchmark: the numbers of issue 5, in one bounded run.

Part 1, quality. Four model-timed simulated pods (``--timing model``, identical KV and timing flags),
two started with ``--role prefill`` and two with ``--role decode``, serve a mixed workload of long
prompts and long outputs (loadtest's ``random`` workload: fresh ~3000-token prompts, 300 output
tokens, Poisson arrivals). The same seed, hence the same requests and arrival times, goes to each arm:

  pd             our router, ``routing-strategy: pd`` over the 2 prefill + 2 decode pods
                 (labels role-name / roleset-name; one roleset of 2P+2D, or two of 1P+1D with
                 ``--rolesets 2``), vLLM-style transfer (the router sends the prefill call)
  least-request  our router on the same 4 pods used as combined pods (no transfer fields: a pod
  prefix-cache   of any role serves a plain request whole, prefill and decode on one engine)
  sglang         sglang-router ``--pd-disaggregation --prefill URL BOOTSTRAP_PORT --decode URL``
  vllm           vllm-router ``--vllm-pd-disaggregation --prefill URL --decode URL``

(the peers from the benchmark-only venv bench/.venv-peers, default policy cache_aware, started
just before their arm and stopped after it). Our router is restarted before each of its arms so
no arm inherits another's prefix index, and every pod is flushed (POST /sim/reset) before every arm.
Reported per arm: TTFT p50/p90, ITL p50/p95 (and p99, TPOT, where a prefill landing on a decoding
pod shows), e2e p50/p90, throughput, errors, and what every pod received.

Part 2, the prefill hop. Instant fixed-timing pods (``--timing fixed --ttft-ms 0 --itl-ms 0
--output-tokens 1``): a prefill pod and a decode pod (model hop-pd), and an identical third pod
alone under model hop-rd. A closed loop (bench/loadgen.py, non-streaming, max_tokens 1) sends
the same body through Envoy either with ``routing-strategy: pd`` to hop-pd (prefill call, body
mutation, then the decode pod) or with ``routing-strategy: random`` to hop-rd (straight to one
pod); the difference in p50/p99 is what the prefill hop adds. The router's own timing of its
prefill call (extproc_prefill_seconds) is reported next to it.

Writes report.json and summary.md to --out (default bench/results/pd/), the loadtest report with
every request (and plots) to --out/quality/, process logs to --out/run/.

    .venv/bin/python bench/pd.py                         # everything, ~4 min on 2 cores
    .venv/bin/python bench/pd.py --skip-peers --skip-hop # our three arms only
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))

from quality import Peers, _sigterm_as_interrupt, ensure_peer_venv, wait_routable  # noqa: E402

from extproc_router.stack import LocalStack, PodSpec, StackOptions, free_port  # noqa: E402

PD_MODEL = "pd-model"
HOP_PD = "hop-pd"
HOP_RD = "hop-rd"
OUR_ARMS = ("pd", "least-request", "prefix-cache")
PEER_ARMS = ("sglang", "vllm")
QUESTION_TOKENS = 100  # the random workload's prompt = (prompt_tokens - this) + this fresh words

# Rough costs on the 2-core dev machine, for the up-front estimate and the budget only.
STARTUP_S = 15.0
ARM_OVERHEAD_S = 8.0  # router restart or peer start, preflight, pod resets
HOP_POINT_OVERHEAD_S = 2.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    q = p.add_argument_group("part 1: quality")
    q.add_argument("--arms", default=",".join(OUR_ARMS + PEER_ARMS),
                   help="comma-separated arms among " + ", ".join(OUR_ARMS + PEER_ARMS))
    q.add_argument("--skip-peers", action="store_true", help="no sglang / vllm arms")
    q.add_argument("--skip-quality", action="store_true", help="no part 1")
    q.add_argument("--rolesets", type=int, choices=(1, 2), default=1,
                   help="pd pods as one roleset of 2P+2D (any prefill pairs with any decode, as the peers do) "
                        "or two rolesets of 1P+1D")
    q.add_argument("--rate", type=float, default=5.0,
                   help="Poisson arrivals per second: the 2 prefill pods run at ~60%% of their prefill capacity "
                        "(3000 tokens at 12k tokens/s each), the 4 combined pods spend ~30%% of their time in "
                        "prefill steps that stall every decoding stream")
    q.add_argument("--requests", type=int, default=150, help="requests per arm")
    q.add_argument("--prompt-tokens", type=int, default=3000)
    q.add_argument("--output-tokens", type=int, default=300)
    q.add_argument("--kv-capacity-tokens", type=int, default=65536, help="per pod (the simulator's default)")
    q.add_argument("--seed", type=int, default=0)
    h = p.add_argument_group("part 2: prefill hop")
    h.add_argument("--skip-hop", action="store_true", help="no part 2")
    h.add_argument("--hop-prompt-tokens", default="200,3000", help="prompt sizes of the hop bodies, in tokens")
    h.add_argument("--hop-concurrency", default="1,8", help="closed-loop concurrency levels")
    h.add_argument("--hop-duration", type=float, default=4.0, help="seconds measured per point and arm")
    h.add_argument("--hop-warmup", type=float, default=1.0, help="seconds discarded before each")
    p.add_argument("--budget-s", type=float, default=360.0, help="bound on the whole run, start-up included")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pd")
    return p.parse_args(argv)


# ---------------------------------------------------------------- the stack


def model_timing_args(args: argparse.Namespace) -> list[str]:
    """Flags of every model-timed pod, whatever its role: the simulator's H100/8B defaults otherwise."""
    return ["--timing", "model", "--kv-capacity-tokens", str(args.kv_capacity_tokens),
            "--max-output-tokens", str(max(1024, args.output_tokens)), "--log-level", "WARNING"]


HOP_ARGS = ["--timing", "fixed", "--ttft-ms", "0", "--itl-ms", "0", "--output-tokens", "1",
            "--kv-transfer-ms-per-1k-tokens", "0", "--log-level", "WARNING"]


def build_stack(args: argparse.Namespace, run_dir: Path) -> tuple[LocalStack, dict[str, int]]:
    """Envoy + router + the quality pods (2P+2D of PD_MODEL) and the hop pods; prefill bootstrap ports by pod."""
    opts = StackOptions.on_free_ports(run_dir=str(run_dir), pods=0, model=PD_MODEL, model_config=None,
                                      health_interval=0.5, router_args=["--log-level", "warning"])
    stack = LocalStack(opts)
    bootstrap: dict[str, int] = {}
    if not args.skip_quality:
        timing = model_timing_args(args)
        for i in range(2):
            for role in ("prefill", "decode"):
                name = f"pd-{role}-{i}"
                roleset = "rs-0" if args.rolesets == 1 else f"rs-{i}"
                extra = [*timing, "--role", role]
                if role == "prefill":
                    # Its own SGLang bootstrap listener, as a real SGLang prefill server has.
                    bootstrap[name] = free_port()
                    extra += ["--bootstrap-port", str(bootstrap[name])]
                stack.pods.append(PodSpec(name=name, model=PD_MODEL, port=free_port(), extra_args=extra,
                                          labels={"role-name": role, "roleset-name": roleset}))
        # Prefill pods first, then decode pods: the peers get them in this order too.
        stack.pods.sort(key=lambda pod: (pod.labels["role-name"] != "prefill", pod.name))
    if not args.skip_hop:
        # The decode-side pods run --role combined: they ignore the transfer fields, so the decode
        # half costs exactly what a plain request costs and the difference is the router's hop.
        stack.pods.append(PodSpec(name="hop-prefill", model=HOP_PD, port=free_port(),
                                  extra_args=[*HOP_ARGS, "--role", "prefill", "--bootstrap-port", "0"],
                                  labels={"role-name": "prefill", "roleset-name": "hop"}))
        stack.pods.append(PodSpec(name="hop-decode", model=HOP_PD, port=free_port(),
                                  extra_args=[*HOP_ARGS, "--role", "combined"],
                                  labels={"role-name": "decode", "roleset-name": "hop"}))
        stack.pods.append(PodSpec(name="hop-direct", model=HOP_RD, port=free_port(),
                                  extra_args=[*HOP_ARGS, "--role", "combined"]))
    return stack, bootstrap


def quality_pods(stack: LocalStack) -> list[PodSpec]:
    return [pod for pod in stack.pods if pod.model == PD_MODEL]


def restart_router(stack: LocalStack) -> None:
    """A fresh router process (empty prefix index and load state); Envoy reconnects by itself."""
    stack.kill("router", signal.SIGTERM)
    stack.start_router()
    proc = stack.procs["router"]
    wait_routable(stack.url, PD_MODEL, proc, "router (restarted)")


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def pod_stats(pods: list[PodSpec]) -> dict[str, dict[str, Any]]:
    """What each pod saw since its last reset: completions, preemptions, KV holds."""
    out = {}
    for pod in pods:
        try:
            s = get_json(f"http://127.0.0.1:{pod.port}/sim/stats")
        except OSError as exc:
            out[pod.name] = {"error": str(exc)}
            continue
        eng = s.get("engine") or {}
        out[pod.name] = {"role": s.get("role"), "completions": s.get("completions_received"),
                         "preemptions": eng.get("preemptions"), "steps": eng.get("steps"),
                         "holds_expired": eng.get("holds_expired")}
    return out


# ---------------------------------------------------------------- part 1


def peer_argv(name: str, python: Path, port: int, metrics_port: int, pods: list[PodSpec],
              bootstrap: dict[str, int]) -> list[str]:
    prefill = [p for p in pods if p.labels.get("role-name") == "prefill"]
    decode = [p for p in pods if p.labels.get("role-name") == "decode"]
    if name == "sglang":
        argv = [str(python), "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
                "--pd-disaggregation"]
        for pod in prefill:
            argv += ["--prefill", f"http://127.0.0.1:{pod.port}", str(bootstrap[pod.name])]
        for pod in decode:
            argv += ["--decode", f"http://127.0.0.1:{pod.port}"]
        return [*argv, "--policy", "cache_aware", "--prometheus-host", "127.0.0.1",
                "--prometheus-port", str(metrics_port), "--log-level", "warn"]
    argv = [str(python.parent / "vllm-router"), "--host", "127.0.0.1", "--port", str(port), "--vllm-pd-disaggregation"]
    for pod in prefill:
        argv += ["--prefill", f"http://127.0.0.1:{pod.port}"]
    for pod in decode:
        argv += ["--decode", f"http://127.0.0.1:{pod.port}"]
    return [*argv, "--policy", "cache_aware", "--prometheus-host", "127.0.0.1",
            "--prometheus-port", str(metrics_port), "--log-level", "warning"]


def arm_extras(records: list[Any]) -> dict[str, Any]:
    """Figures the loadtest summary lacks: ITL p99 and mean, TPOT, the longest stall per request."""
    ok = [r for r in records if r.ok]
    itl = np.array([g for r in ok for g in r.itl_ms]) if ok else np.array([])
    tpot = [(r.e2e_ms - r.ttft_ms) / (r.output_tokens - 1) for r in ok
            if r.e2e_ms is not None and r.ttft_ms is not None and r.output_tokens > 1]
    stall = [max(r.itl_ms) for r in ok if r.itl_ms]

    def pct(values: Any, q: float) -> float | None:
        return round(float(np.percentile(values, q)), 3) if len(values) else None

    return {
        "itl_ms": {"p99": pct(itl, 99), "mean": round(float(itl.mean()), 3) if len(itl) else None,
                   "share_over_50ms": round(float((itl > 50).mean()), 4) if len(itl) else None},
        "tpot_ms": {"p50": pct(tpot, 50), "p90": pct(tpot, 90)},
        "max_itl_per_request_ms": {"p50": pct(stall, 50), "p90": pct(stall, 90)},
    }


def run_quality(args: argparse.Namespace, stack: LocalStack, bootstrap: dict[str, int], arms: list[str],
                per_arm_cap: float, grace: float, deadline: float, notes: list[str]) -> dict[str, Any]:
    """Run the arms one after another; an arm that would end after `deadline` (monotonic) is skipped."""
    from extproc_router.loadtest.report import build_report, write_report
    from extproc_router.loadtest.runner import Arm, ArmResult, Progress, RunSettings, run_arm
    from extproc_router.loadtest.workloads import WorkloadSpec

    pods = quality_pods(stack)
    spec = WorkloadSpec(name="random", path="chat", seed=args.seed,
                        prefix_tokens=max(0, args.prompt_tokens - QUESTION_TOKENS), question_tokens=QUESTION_TOKENS,
                        output_tokens=args.output_tokens, requests=args.requests)
    settings = RunSettings(model=PD_MODEL, workload=spec, rate=args.rate, duration=per_arm_cap, grace=grace,
                           timeout=60.0, reset_urls=[f"http://127.0.0.1:{p.port}" for p in pods], preflight=True)
    peers = Peers(stack.run_dir)
    python = ensure_peer_venv() if any(a in PEER_ARMS for a in arms) else None
    results: list[ArmResult] = []
    extras: dict[str, dict[str, Any]] = {}
    router_used = False
    try:
        for name in arms:
            t_arm = time.monotonic()
            if t_arm + per_arm_cap + ARM_OVERHEAD_S > deadline:
                results.append(ArmResult(arm=Arm(name=name, target="-"), skipped="out of the time budget"))
                notes.append(f"arm {name} not run: out of the time budget (--budget-s)")
                continue
            if name in OUR_ARMS:
                if router_used:
                    restart_router(stack)
                router_used = True
                arm = Arm(name=name, target=stack.url, strategy=name)
            else:
                if python is None:
                    results.append(ArmResult(arm=Arm(name=name, target="-"),
                                             skipped="the peer routers could not be installed"))
                    continue
                port, metrics_port = free_port(), free_port()
                proc = peers.spawn(name, peer_argv(name, python, port, metrics_port, pods, bootstrap))
                url = f"http://127.0.0.1:{port}"
                try:
                    wait_routable(url, PD_MODEL, proc, f"{name} router")
                except RuntimeError as exc:
                    results.append(ArmResult(arm=Arm(name=name, target=url), skipped=str(exc)))
                    notes.append(f"arm {name}: {exc} (log: run/peer-{name}.log)")
                    peers.stop()
                    continue
                arm = Arm(name=name, target=url)
            print(f"-- arm {name}: {args.requests} requests at {args.rate:g}/s (sending for at most "
                  f"{per_arm_cap:.0f} s)", flush=True)
            res = asyncio.run(run_arm(arm, settings, Progress()))
            results.append(res)
            if not res.skipped:
                extras[name] = {**arm_extras(res.records), "pod_stats": pod_stats(pods)}
                ok = sum(r.ok for r in res.records)
                print(f"   {ok}/{len(res.records)} ok, stopped by {res.stopped_by}, "
                      f"{time.monotonic() - t_arm:.0f} s", flush=True)
            else:
                print(f"   skipped: {res.skipped}", flush=True)
            if name in PEER_ARMS:
                peers.stop()
                peers.procs.clear()
    finally:
        peers.stop()

    if any(a in PEER_ARMS for a in arms):
        notes.append("peers: default policy cache_aware for prefill and decode; sglang-router gets each prefill "
                     "pod's bootstrap port (SGLang style: both halves sent at once, paired by bootstrap_room), "
                     "vllm-router none (vLLM style: prefill first, its kv_transfer_params carried to decode)")
    notes.append("open-loop arrivals below saturation: req/s and output tok/s follow the offered load in every arm "
                 "(requests over the sending time plus the tail of the last answers); latency separates the arms")
    report = build_report(settings, results, ["oracle hit rate not computed (the random workload has no reuse)"])
    written = write_report(report, args.out / "quality", plots=_has_matplotlib())
    arms_out = []
    for a in report["arms"]:
        s = a["summary"]
        arms_out.append({**s, "extra": extras.get(s["name"], {})})
    return {"settings": report["settings"], "arms": arms_out, "files": [str(p.relative_to(args.out)) for p in written]}


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------- part 2


def hop_body(model: str, tokens: int, seed: int) -> bytes:
    from extproc_router.loadtest.workloads import word_text

    text = word_text(random.Random(f"hop:{seed}:{tokens}"), tokens)
    return json.dumps({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 1}).encode()


def histogram(stack: LocalStack, name: str, strategy: str | None = None) -> tuple[float, float]:
    """(sum, count) of one of the router's histograms, optionally of one strategy label."""
    total = count = 0.0
    with urllib.request.urlopen(stack.router_http + "/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if strategy is not None and f'strategy="{strategy}"' not in line:
                continue
            if line.startswith(name + "_sum"):
                total += float(line.rsplit(" ", 1)[1])
            elif line.startswith(name + "_count"):
                count += float(line.rsplit(" ", 1)[1])
    return total, count


def _mean_ms(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    n = after[1] - before[1]
    return (after[0] - before[0]) / n * 1e3 if n > 0 else None


def run_load(port: int, body_file: Path, concurrency: int, duration: float, warmup: float, strategy: str) -> dict:
    argv = [sys.executable, str(ROOT / "bench" / "loadgen.py"), "--port", str(port), "--body-file", str(body_file),
            "--concurrency", str(concurrency), "--duration", str(duration), "--warmup", str(warmup),
            "--header", f"routing-strategy: {strategy}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + warmup + 60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_hop(args: argparse.Namespace, stack: LocalStack, sizes: list[int], concs: list[int]) -> dict[str, Any]:
    work = stack.run_dir
    wait_routable(stack.url, HOP_RD, stack.procs["router"], "router (hop-rd)")
    points = []
    for tokens in sizes:
        files = {}
        for arm, model in (("direct", HOP_RD), ("pd", HOP_PD)):
            files[arm] = work / f"hop-{arm}-{tokens}.json"
            files[arm].write_bytes(hop_body(model, tokens, args.seed))
        for conc in concs:
            point: dict[str, Any] = {"prompt_tokens": tokens, "body_bytes": files["pd"].stat().st_size,
                                     "concurrency": conc}
            for arm, strategy in (("direct", "random"), ("pd", "pd")):
                p0 = histogram(stack, "extproc_prefill_seconds")
                d0 = histogram(stack, "extproc_decision_latency_seconds", strategy)
                res = run_load(stack.opts.listen_port, files[arm], conc, args.hop_duration, args.hop_warmup, strategy)
                # The router's own view: its decision (parse + pick) and, for pd, the prefill call.
                res["router_decision_mean_ms"] = _mean_ms(d0, histogram(stack, "extproc_decision_latency_seconds",
                                                                        strategy))
                if arm == "pd":
                    res["router_prefill_call_mean_ms"] = _mean_ms(p0, histogram(stack, "extproc_prefill_seconds"))
                point[arm] = res
            point["added_p50_ms"] = point["pd"]["p50_ms"] - point["direct"]["p50_ms"]
            point["added_p99_ms"] = point["pd"]["p99_ms"] - point["direct"]["p99_ms"]
            points.append(point)
            print(f"   hop {tokens:>5} tokens, conc {conc}: direct p50 {point['direct']['p50_ms']:.2f} ms, "
                  f"pd p50 {point['pd']['p50_ms']:.2f} ms -> added p50 {point['added_p50_ms']:.2f} / "
                  f"p99 {point['added_p99_ms']:.2f} ms", flush=True)
    return {"points": points, "pod_flags": HOP_ARGS}


# ---------------------------------------------------------------- output


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 1000:
        return f"{v / 1000:.2f} s"
    return f"{v:.1f} ms" if v < 100 else f"{v:.0f} ms"


QUALITY_ROWS: list[tuple[str, Any]] = [
    ("ok / sent", lambda s: f"{s['ok']}/{s['requests']}"),
    ("errors", lambda s: str(s["errors"] + s["cancelled"])),
    ("TTFT p50", lambda s: fmt_ms(s["ttft_ms"]["p50"])),
    ("TTFT p90", lambda s: fmt_ms(s["ttft_ms"]["p90"])),
    ("ITL p50", lambda s: fmt_ms(s["itl_ms"]["p50"])),
    ("ITL p95", lambda s: fmt_ms(s["itl_ms"]["p95"])),
    ("ITL p99", lambda s: fmt_ms(s["extra"].get("itl_ms", {}).get("p99"))),
    ("ITL mean", lambda s: fmt_ms(s["extra"].get("itl_ms", {}).get("mean"))),
    ("ITL > 50 ms", lambda s: _share(s["extra"].get("itl_ms", {}).get("share_over_50ms"))),
    ("TPOT p50", lambda s: fmt_ms(s["extra"].get("tpot_ms", {}).get("p50"))),
    ("TPOT p90", lambda s: fmt_ms(s["extra"].get("tpot_ms", {}).get("p90"))),
    ("e2e p50", lambda s: fmt_ms(s["e2e_ms"]["p50"])),
    ("e2e p90", lambda s: fmt_ms(s["e2e_ms"]["p90"])),
    ("req/s", lambda s: _num(s["throughput"]["requests_per_s"], 2)),
    ("out tok/s", lambda s: _num(s["throughput"]["output_tokens_per_s"], 0)),
    ("completions per pod", lambda s: _pods(s)),
]


def _share(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _pods(s: dict[str, Any]) -> str:
    """Completions each pod received (prefill calls included), in pod order P0/P1/D0/D1."""
    stats = s["extra"].get("pod_stats") or {}
    return "/".join(str(v.get("completions", "?")) for _, v in sorted(
        stats.items(), key=lambda kv: (kv[1].get("role") != "prefill", kv[0]))) or "-"


HOP_COLUMNS = ("prompt", "body", "conc", "direct p50", "pd p50", "added p50", "direct p99", "pd p99", "added p99",
               "router decision mean direct / pd", "router prefill call mean", "requests direct / pd", "errors")


def _opt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} ms"


def hop_rows(points: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for p in points:
        d, q = p["direct"], p["pd"]
        rows.append([f"{p['prompt_tokens']} tok", f"{p['body_bytes'] / 1024:.1f} KiB", str(p["concurrency"]),
                     f"{d['p50_ms']:.2f} ms", f"{q['p50_ms']:.2f} ms", f"{p['added_p50_ms']:+.2f} ms",
                     f"{d['p99_ms']:.2f} ms", f"{q['p99_ms']:.2f} ms", f"{p['added_p99_ms']:+.2f} ms",
                     f"{_opt_ms(d.get('router_decision_mean_ms'))} / {_opt_ms(q.get('router_decision_mean_ms'))}",
                     _opt_ms(q.get("router_prefill_call_mean_ms")),
                     f"{d['requests']} / {q['requests']}", f"{d['errors']} / {q['errors']}"])
    return rows


def print_tables(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=180)
    quality = result.get("quality")
    if quality:
        wl = quality["settings"]["workload"]
        prompt = wl["prefix_tokens"] + wl["question_tokens"]
        table = Table(title=f"PD quality: random workload, {prompt}-token prompts, "
                            f"{wl['output_tokens']} output tokens, {quality['settings']['arrival']}, "
                            f"{quality['settings']['requests']} requests per arm, seed {wl['seed']}")
        table.add_column("")
        arms = quality["arms"]
        for s in arms:
            table.add_column(s["name"], justify="right")
        for label, get in QUALITY_ROWS:
            table.add_row(label, *[("skipped" if label == "ok / sent" else "") if s["skipped"] else get(s)
                                   for s in arms])
        console.print(table)
        for s in arms:
            if s["skipped"]:
                console.print(f"[yellow]arm {s['name']} skipped:[/] {s['skipped']}")
            for kind, n in s.get("error_kinds", {}).items():
                console.print(f"[yellow]arm {s['name']}:[/] {kind} x{n}")
    hop = result.get("hop")
    if hop:
        table = Table(title="The prefill hop: pd (prefill call + decode) minus a request routed straight to one pod, "
                            "instant pods, through Envoy")
        for col in HOP_COLUMNS:
            table.add_column(col, justify="right")
        for row in hop_rows(hop["points"]):
            table.add_row(*row)
        console.print(table)
    for note in result.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Prefill/decode disaggregation benchmark (issue 5)", "",
             f"Created {result['created']}; machine: {result['machine']['cpus']} CPUs, load average at start "
             f"{result['machine']['loadavg_start']}, at end {result['machine'].get('loadavg_end')}; "
             f"took {result.get('took_s', 0):.0f} s.", ""]
    quality = result.get("quality")
    if quality:
        st = quality["settings"]
        wl = st["workload"]
        lines += ["## Part 1: quality", "",
                  f"`random` workload, {wl['prefix_tokens'] + wl['question_tokens']}-token fresh prompts, "
                  f"{wl['output_tokens']} output tokens, {st['arrival']}, {st['requests']} requests per arm, seed "
                  f"{wl['seed']}. Four model-timed pods ({' '.join(result['settings']['pod_flags'])}): 2 prefill + "
                  f"2 decode ({result['settings']['rolesets']}), used as combined pods by least-request and "
                  "prefix-cache. Pods flushed before every arm; our router restarted before each of its arms.", "",
                  "| | " + " | ".join(s["name"] for s in quality["arms"]) + " |",
                  "|---|" + "---:|" * len(quality["arms"])]
        for label, get in QUALITY_ROWS:
            cells = [("skipped" if label == "ok / sent" else "") if s["skipped"] else get(s) for s in quality["arms"]]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", "Completions per pod are what each pod received (prefill calls included), in the order "
                      "prefill-0/prefill-1/decode-0/decode-1; TPOT is (e2e - TTFT) / (output tokens - 1) per request.",
                  ""]
        for s in quality["arms"]:
            if s["skipped"]:
                lines.append(f"- arm {s['name']} skipped: {s['skipped']}")
            for kind, n in s.get("error_kinds", {}).items():
                lines.append(f"- arm {s['name']}: {kind} x{n}")
        lines.append("")
    hop = result.get("hop")
    if hop:
        lines += ["## Part 2: the prefill hop", "",
                  "Instant pods (" + " ".join(hop["pod_flags"]) + "), non-streaming, max_tokens 1, closed loop "
                  "through Envoy. direct: `routing-strategy: random` to a model of one pod; pd: `routing-strategy: "
                  "pd` to a prefill pod + a decode pod identical to that one. added = pd - direct.", "",
                  "| " + " | ".join(HOP_COLUMNS) + " |", "|" + "---:|" * len(HOP_COLUMNS)]
        lines += ["| " + " | ".join(r) + " |" for r in hop_rows(hop["points"])]
        lines.append("")
    if result.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in OUR_ARMS + PEER_ARMS]
    if unknown:
        print(f"unknown arms: {', '.join(unknown)}", file=sys.stderr)
        return 2
    if args.skip_peers:
        arms = [a for a in arms if a not in PEER_ARMS]
    if args.skip_quality:
        arms = []
    sizes = [int(x) for x in args.hop_prompt_tokens.split(",") if x]
    concs = [int(x) for x in args.hop_concurrency.split(",") if x]
    hop_s = 0.0 if args.skip_hop else (
        len(sizes) * len(concs) * 2 * (args.hop_duration + args.hop_warmup + HOP_POINT_OVERHEAD_S))
    send_s = args.requests / args.rate
    # A request takes TTFT + output x ITL; under load ~4-8 s here. Grace covers the tail.
    grace = 25.0
    per_arm_cap = send_s + 5.0
    if arms:
        room = (args.budget_s - STARTUP_S - hop_s) / len(arms) - ARM_OVERHEAD_S - 10.0
        if room < per_arm_cap:
            per_arm_cap = max(10.0, room)
            print(f"budget: each arm sends for at most {per_arm_cap:.0f} s (fewer than {args.requests} requests "
                  f"at {args.rate:g}/s)", flush=True)
    estimate = STARTUP_S + hop_s + len(arms) * (min(send_s, per_arm_cap) + ARM_OVERHEAD_S + 8.0)
    hop_plan = "skipped" if args.skip_hop else f"{len(sizes)} prompt sizes x {len(concs)} concurrencies"
    print(f"plan: arms {', '.join(arms) or 'none'}; hop {hop_plan}; estimate ~{estimate / 60:.1f} min, "
          f"bounded by ~{args.budget_s / 60:.1f} min", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    run_dir = args.out / "run"
    stack, bootstrap = build_stack(args, run_dir)
    notes: list[str] = []
    result: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "out": str(args.out.relative_to(ROOT)) if args.out.is_relative_to(ROOT) else str(args.out),
                     "pod_flags": model_timing_args(args),
                     "rolesets": "one roleset of 2P+2D" if args.rolesets == 1 else "two rolesets of 1P+1D",
                     "per_arm_send_cap_s": round(per_arm_cap, 1)},
        "notes": notes,
    }
    started = time.monotonic()
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    status = 0
    try:
        stack.start()
        print(f"stack up: Envoy {stack.url}; pods " + ", ".join(f"{p.name}:{p.port}" for p in stack.pods), flush=True)
        if arms:
            print("\n== part 1: quality", flush=True)
            # Keep the hop part's share of the budget.
            deadline = started + args.budget_s - hop_s
            result["quality"] = run_quality(args, stack, bootstrap, arms, per_arm_cap, grace, deadline, notes)
        if not args.skip_hop:
            remaining = args.budget_s - (time.monotonic() - started)
            if remaining < hop_s * 0.8:
                notes.append(f"part 2 not run: {remaining:.0f} s of the budget left, it needs ~{hop_s:.0f} s")
                status = 1
            else:
                print("\n== part 2: the prefill hop", flush=True)
                result["hop"] = run_hop(args, stack, sizes, concs)
    except KeyboardInterrupt:
        print("interrupted: stopping everything", flush=True)
        status = 130
    finally:
        with contextlib.suppress(Exception):
            stack.stop()
    result["took_s"] = round(time.monotonic() - started, 1)
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    (args.out / "report.json").write_text(json.dumps(result, indent=2))
    (args.out / "summary.md").write_text(markdown(result))
    print()
    print_tables(result)
    print(f"\nwrote {args.out / 'report.json'}, {args.out / 'summary.md'}; per-request records in "
          f"{args.out / 'quality'}/; logs in {run_dir}/; took {result['took_s'] / 60:.1f} min", flush=True)
    return status


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
