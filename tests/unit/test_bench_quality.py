"""bench/quality.py's planning: the eviction workloads it writes, and how it scores the precise arm.

The script is not importable code (bench/ holds scripts), so it is loaded from its file. Planning
runs `loadtest gen-trace` in a subprocess, as the benchmark does.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from extproc_router.loadtest.traces import load_trace

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quality() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _plan(quality: ModuleType, tmp_path: Path, *flags: str) -> Any:  # the script's WorkloadPlan
    args = quality.parse_args(["--workload", "eviction", "--out", str(tmp_path), *flags])
    (plan,) = quality.workload_plans(args)
    return plan


def test_conversations_follow_ups_extend_their_turn_and_outgrow_the_fleet(quality: ModuleType,
                                                                           tmp_path: Path) -> None:
    plan = _plan(quality, tmp_path)
    trace = load_trace(tmp_path / "eviction" / "trace.jsonl")
    assert plan.name == "eviction" and plan.requests == len(trace) == 4 * 20 * 6
    assert plan.flags[plan.flags.index("--trace") + 1] == str(tmp_path / "eviction" / "trace.jsonl")
    # Every conversation opens with the 2 shared system blocks; a turn resends the previous one.
    assert all(r.hash_ids[:2] == trace[0].hash_ids[:2] for r in trace)
    # (turn k = turn k-1 + its answer + a new question).
    sent = {r.hash_ids for r in trace}
    follow_ups = [r for r in trace if len(r.hash_ids) > 3]
    assert len(follow_ups) == 4 * 20 * 5 and all(r.hash_ids[:-2] in sent for r in follow_ups)
    # The distinct blocks total several times the fleet's KV (4 pods x 16,384 tokens).
    unique_tokens = 512 * len({h for r in trace for h in r.hash_ids})
    assert unique_tokens > 6 * 4 * 16384
    # The cap on sending comes from the trace's own length.
    span_s = (trace[-1].timestamp_ms - trace[0].timestamp_ms) / 1000.0
    assert plan.send_time_s() == pytest.approx(span_s, rel=1e-6)


def test_same_seed_same_trace_other_seed_other_trace(quality: ModuleType, tmp_path: Path) -> None:
    _plan(quality, tmp_path / "a")
    _plan(quality, tmp_path / "b")
    _plan(quality, tmp_path / "c", "--seed", "1")
    a, b, c = ((tmp_path / d / "eviction" / "trace.jsonl").read_bytes() for d in "abc")
    assert a == b != c


def test_sweep_kind_and_a_given_trace(quality: ModuleType, tmp_path: Path) -> None:
    sweep = _plan(quality, tmp_path / "sweep", "--eviction-kind", "sweep", "--eviction-requests", "50")
    trace = load_trace(tmp_path / "sweep" / "eviction" / "trace.jsonl")
    assert sweep.requests == len(trace) == 50
    assert all(len(r.hash_ids) == 8 + 1 for r in trace)  # a document of 8 blocks and a question

    own = tmp_path / "own.jsonl"
    own.write_text("".join(json.dumps({"timestamp": t, "input_length": 600, "output_length": 8,
                                       "hash_ids": [0, t]}) + "\n" for t in range(0, 10_000, 1000)))
    plan = _plan(quality, tmp_path / "given", "--eviction-trace", str(own), "--requests", "4", "--time-scale", "0.5")
    assert (tmp_path / "given" / "eviction" / "trace.jsonl").read_bytes() == own.read_bytes()
    assert plan.requests == 4 and plan.send_time_s() == pytest.approx(1.5)  # 3 s of trace at x0.5
    assert plan.flags[plan.flags.index("--time-scale") + 1] == "0.5"


def test_precise_targets(quality: ModuleType) -> None:
    def arm(p90: float, hit: float | None = None, finite: float | None = None) -> dict:
        return {"ok": 100, "ttft_ms": {"p90": p90}, "hit_rate": {"achieved": hit, "oracle_finite": finite}}

    arms = {"precise": arm(700.0, 0.45, 0.47), "prefix-cache": arm(1000.0), "sglang": arm(900.0), "vllm": arm(650.0)}
    out = quality.precise_targets("eviction", arms)
    assert out["p90_below_prefix_cache"] == 0.3 and out["p90_vs_prefix_cache_target_met"] is True
    assert out["hit_target_met"] is True and out["p90_below_sglang"] is True and out["p90_below_vllm"] is False
    # 20% below is the eviction workload's target; elsewhere "no worse" is.
    assert quality.precise_targets("eviction", {**arms, "prefix-cache": arm(800.0)})[
        "p90_vs_prefix_cache_target_met"] is False
    assert quality.precise_targets("shared-prefix", {**arms, "prefix-cache": arm(800.0)})[
        "p90_vs_prefix_cache_target_met"] is True
