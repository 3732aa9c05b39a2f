"""The load-test harness (`extproc-router loadtest`): workloads, oracle, bounds, arms, reports."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from extproc_router.loadtest import cli as loadtest_cli
from extproc_router.loadtest.oracle import Oracle, hit_rate, load_tokenizer
from extproc_router.loadtest.report import build_report, markdown_summary, matplotlib_available, summarize
from extproc_router.loadtest.runner import Arm, Record, RunSettings, apply_oracle, parse_arms, run_arm, run_arms
from extproc_router.loadtest.workloads import WORDS, MultiTurnWorkload, WorkloadSpec, build_workload
from extproc_router.simulator.server import SimConfig, SimServer, start_sim

MODEL = "demo-model"


class WordTokenizer:
    """A stand-in for ``simulator.tokenizer``: one token per whitespace-separated word.

    Small enough to compute oracle hit rates by hand, and the same interface as the real one.
    """

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def render_prompt(self, kind: str, body: dict) -> str:
        if kind == "chat":
            return " ".join(f"{m['role']}: {m['content']}" for m in body["messages"])
        return body["prompt"]

    def tokenize(self, text: str, kind: str = "cl100k") -> list[int]:
        return [self.vocab.setdefault(word, len(self.vocab)) for word in text.split()]

    def block_hashes(self, tokens: Sequence[int], block_size: int) -> list[int]:
        hashes, parent = [], 0
        for start in range(0, len(tokens) - block_size + 1, block_size):
            parent = hash((parent, tuple(tokens[start : start + block_size])))
            hashes.append(parent)
        return hashes


def cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    loadtest_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def settings(**workload: Any) -> RunSettings:
    """Small, fast settings: a few short prompts, closed loop of 4."""
    spec = {"groups": 3, "prompts_per_group": 3, "prefix_tokens": 64, "question_tokens": 8, "output_tokens": 6}
    spec.update(workload)
    run_keys = {"rate", "concurrency", "duration", "grace", "reset_urls", "preflight"}
    run_kw = {k: spec.pop(k) for k in list(spec) if k in run_keys}
    return RunSettings(model=MODEL, workload=WorkloadSpec(**spec), **run_kw)


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    server = await start_sim(SimConfig(models=[MODEL], pod_name="pod-a", ttft_ms=5.0, itl_ms=1.0))
    yield server
    await server.stop()


# ---------------------------------------------------------------- workloads


def test_workloads_are_deterministic_per_seed() -> None:
    for name in ("shared-prefix", "multi-turn", "random"):
        a = build_workload(WorkloadSpec(name=name, seed=7, prefix_tokens=50, question_tokens=10))
        b = build_workload(WorkloadSpec(name=name, seed=7, prefix_tokens=50, question_tokens=10))
        c = build_workload(WorkloadSpec(name=name, seed=8, prefix_tokens=50, question_tokens=10))
        first = asyncio.run(_first_bodies(a, 5))
        assert first == asyncio.run(_first_bodies(b, 5)), name
        assert first != asyncio.run(_first_bodies(c, 5)), name


async def _first_bodies(workload: Any, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        req = await workload.next()
        out.append(req.body)
        workload.finished(req, "an answer")
    return out


async def test_shared_prefix_shape_and_token_counts() -> None:
    spec = WorkloadSpec(name="shared-prefix", groups=4, prompts_per_group=3, prefix_tokens=40, question_tokens=7)
    workload = build_workload(spec)
    bodies = await _first_bodies(workload, 12)
    assert await workload.next() is None
    systems = [b["messages"][0]["content"] for b in bodies]
    assert len(set(systems)) == 4 and all(systems.count(s) == 3 for s in systems)
    # One word = one token: the lengths on the command line are the token counts.
    assert all(len(s.split()) == 40 and set(s.split()) <= set(WORDS) for s in systems)
    assert all(len(b["messages"][1]["content"].split()) == 7 for b in bodies)
    assert all(b["max_tokens"] == spec.output_tokens for b in bodies)
    # Shuffled: a group's prompts are not all back to back.
    assert systems != sorted(systems, key=systems.index)

    completions = build_workload(WorkloadSpec(name="shared-prefix", path="completions", groups=2, prefix_tokens=5))
    body = (await completions.next()).body
    assert "messages" not in body and len(body["prompt"].split()) == 5 + completions.spec.question_tokens


async def test_multi_turn_history_grows_with_the_real_answers() -> None:
    workload = MultiTurnWorkload(WorkloadSpec(name="multi-turn", users=2, rounds=3, prefix_tokens=10))
    seen: dict[int, list[dict]] = {0: [], 1: []}
    while (req := await workload.next()) is not None:
        messages = req.body["messages"]
        seen[req.user].append(req.body)
        # Round 1 fails for user 0: its question must not stay in the history.
        answer = None if (req.user == 0 and len(seen[0]) == 2) else f"answer {req.label}"
        workload.finished(req, answer)
        assert messages[0]["role"] == "system" and messages[-1]["role"] == "user"
    assert [len(b["messages"]) for b in seen[1]] == [2, 4, 6]
    assert [len(b["messages"]) for b in seen[0]] == [2, 4, 4]
    assert seen[1][2]["messages"][2] == {"role": "assistant", "content": "answer u1/r0"}
    assert seen[1][2]["messages"][4] == {"role": "assistant", "content": "answer u1/r1"}
    # Each round extends the previous one; every user shares the system prompt.
    assert seen[1][1]["messages"][:2] == seen[1][0]["messages"]
    assert seen[0][0]["messages"][0] == seen[1][0]["messages"][0]


async def test_multi_turn_waits_for_the_answer_before_the_next_round() -> None:
    workload = MultiTurnWorkload(WorkloadSpec(name="multi-turn", users=1, rounds=2, prefix_tokens=4))
    first = await workload.next()
    waiter = asyncio.ensure_future(workload.next())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    workload.finished(first, " lorem ipsum")
    second = await asyncio.wait_for(waiter, 1)
    assert second.body["messages"][2]["content"] == " lorem ipsum"


# ---------------------------------------------------------------- oracle


def test_oracle_hit_rate_of_a_tiny_workload_equals_the_hand_computed_value() -> None:
    oracle = Oracle(WordTokenizer(), "completions", block_size=4)
    prompts = [
        "a b c d e f g h",  # blocks abcd efgh: nothing seen yet -> 0
        "a b c d e f g x y",  # abcd seen, efgx not -> 4
        "a b c d e f g h i j",  # abcd efgh both seen (first prompt) -> 8
        "z a b c",  # zabc: a different first block -> 0
        "a b c",  # no full block -> 0
    ]
    pairs = oracle.run({"prompt": p} for p in prompts)
    assert pairs == [(8, 0), (9, 4), (10, 8), (4, 0), (3, 0)]
    assert hit_rate(pairs) == pytest.approx(12 / 34)


def test_oracle_replays_successful_requests_in_sending_order() -> None:
    oracle = Oracle(WordTokenizer(), "completions", block_size=2)
    records = [
        Record(index=0, seq=1, label="", start_s=0, body={"prompt": "a b c d"}, ok=True),
        Record(index=1, seq=0, label="", start_s=0, body={"prompt": "a b x y"}, ok=True),
        Record(index=2, seq=2, label="", start_s=0, body={"prompt": "a b c d"}, ok=False),
    ]
    apply_oracle(oracle, records)
    assert (records[1].oracle_cached_tokens, records[0].oracle_cached_tokens) == (0, 2)
    assert records[2].oracle_cached_tokens is None  # failed: no pod computed it


def test_oracle_with_the_simulator_tokenizer_counts_the_shared_prefix() -> None:
    tokenizer = load_tokenizer()
    if tokenizer is None:
        pytest.skip("simulator.tokenizer is not there yet")
    spec = WorkloadSpec(name="shared-prefix", path="completions", groups=2, prompts_per_group=2,
                        prefix_tokens=64, question_tokens=8)  # fmt: skip
    workload = build_workload(spec)
    bodies = asyncio.run(_first_bodies(workload, 4))
    pairs = Oracle(tokenizer, "completions", block_size=16).run(bodies)
    # 64 prefix words + "\n\n" + 8 words = 73 tokens; the second prompt of a group reuses the
    # prefix's 4 full blocks (block 5 already holds question words).
    assert [p for p, _ in pairs] == [73] * 4
    assert sorted(c for _, c in pairs) == [0, 0, 64, 64]


# ---------------------------------------------------------------- runs against a simulated pod


async def test_short_run_against_one_simulated_pod_writes_sane_figures(sim: SimServer, tmp_path: Path) -> None:
    args = cli_args("--target", sim.url, "--model", MODEL, "--groups", "3", "--prompts-per-group", "3",
                    "--prefix-tokens", "64", "--question-tokens", "8", "--output-tokens", "6",
                    "--concurrency", "3", "--out", str(tmp_path), "--quiet")  # fmt: skip
    assert await loadtest_cli.main_async(args) == 0

    report = orjson.loads((tmp_path / "report.json").read_bytes())
    (arm,) = report["arms"]
    s = arm["summary"]
    assert (s["requests"], s["ok"], s["errors"], s["cancelled"]) == (9, 9, 0, 0)
    assert s["stopped_by"] == "requests"
    assert 5 <= s["ttft_ms"]["p50"] <= s["ttft_ms"]["p90"] <= s["ttft_ms"]["p99"]
    assert 0 < s["itl_ms"]["p50"] <= s["itl_ms"]["p95"]
    assert s["e2e_ms"]["p50"] > s["ttft_ms"]["p50"]
    assert s["throughput"]["requests_per_s"] > 0 and s["throughput"]["output_tokens_per_s"] > 0
    assert s["output_tokens"] == 9 * 6
    assert list(s["pods"]) == ["pod-a"] and (s["pods"]["pod-a"]["requests"], s["pods"]["pod-a"]["errors"]) == (9, 0)
    assert s["hit_rate"]["achieved"] is not None
    if load_tokenizer() is not None:
        assert 0 < s["hit_rate"]["oracle"] < 1  # 3 groups x 3 prompts share their prefixes
    rec = arm["records"][0]
    assert rec["pod"] == "pod-a" and rec["ok"] and len(rec["itl_ms"]) == 5 and rec["tokens_per_s"] > 0

    summary_md = (tmp_path / "summary.md").read_text()
    assert "| default | 9 | 0 |" in summary_md and "pod-a" in summary_md
    plots = {"ttft_cdf.png", "pod_requests.png", "pod_hit_rate.png"}
    if matplotlib_available():
        assert plots <= {p.name for p in tmp_path.iterdir()}
    else:
        assert "no plots: matplotlib is not installed" in " ".join(report["notes"])


async def test_closed_loop_stops_at_the_request_bound(sim: SimServer) -> None:
    result = await run_arm(Arm("a", sim.url), settings(requests=5, concurrency=2))
    assert len(result.records) == 5 and all(r.ok for r in result.records)
    assert result.stopped_by == "requests"
    assert sim.stats.max_in_flight <= 2


async def test_poisson_arrivals_stop_at_the_duration_bound(sim: SimServer) -> None:
    started = time.monotonic()
    result = await run_arm(Arm("a", sim.url), settings(rate=40.0, requests=1000, duration=0.5, grace=2.0))
    assert result.stopped_by == "duration"
    assert 5 <= len(result.records) <= 60  # ~20 expected; the bound is what matters
    assert all(r.ok for r in result.records)  # in-flight requests finished within the grace
    assert time.monotonic() - started < 5


async def test_requests_still_running_after_the_grace_are_cancelled(sim: SimServer) -> None:
    sim.set_faults(stall=True)
    started = time.monotonic()
    result = await run_arm(Arm("a", sim.url), settings(requests=3, duration=0.2, grace=0.2, preflight=False))
    assert time.monotonic() - started < 3
    assert len(result.records) == 3 and all(r.cancelled and not r.ok for r in result.records)
    assert summarize(result)["cancelled"] == 3


async def test_interrupt_stops_the_arm_and_skips_the_rest(sim: SimServer) -> None:
    sim.set_faults(stall=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.2, stop.set)
    results = await run_arms([Arm("a", sim.url), Arm("b", sim.url)], settings(preflight=False), stop=stop)
    assert results[0].interrupted and results[0].stopped_by == "interrupt"
    assert results[1].skipped == "interrupted before this arm"
    report = build_report(settings(), results)
    assert report["arms"][0]["summary"]["cancelled"] == len(results[0].records) > 0


async def test_oracle_equals_what_one_model_timed_pod_caches() -> None:
    """Sent one at a time to one pod with room for everything, the pod caches exactly what the oracle says."""
    tokenizer = load_tokenizer()
    if tokenizer is None:
        pytest.skip("simulator.tokenizer is not there yet")
    try:
        config = SimConfig(models=[MODEL], pod_name="pod-m", timing="model", decode_step_ms=1.0)
    except TypeError:
        pytest.skip("this simulator has no model timing yet")
    server = await start_sim(config)
    try:
        run = settings(concurrency=1, output_tokens=3, reset_urls=[server.url])
        oracle = Oracle(tokenizer, "chat", block_size=16)
        for _ in range(2):  # the second arm starts cold again thanks to the reset
            result = await run_arm(Arm("a", server.url), run, oracle=oracle)
            s = summarize(result)
            assert s["ok"] == 9 and not result.reset_errors
            assert s["prompt_tokens"]["reported"] == s["prompt_tokens"]["oracle"]
            assert 0 < s["hit_rate"]["achieved"] == s["hit_rate"]["oracle"] < 1
    finally:
        await server.stop()


# ---------------------------------------------------------------- arms, resets, rejected strategies


def test_parse_arms() -> None:
    arms = parse_arms("random, least-request,sglang=http://127.0.0.1:30001/", "http://127.0.0.1:8888")
    assert arms == [
        Arm("random", "http://127.0.0.1:8888", "random"),
        Arm("least-request", "http://127.0.0.1:8888", "least-request"),
        Arm("sglang", "http://127.0.0.1:30001", None),
    ]
    with pytest.raises(ValueError, match="no --target"):
        parse_arms("random", None)
    with pytest.raises(ValueError, match="unique"):
        parse_arms("random,random", "http://x")


class Recorder:
    """A tiny OpenAI-ish endpoint that logs every call: resets and requests with their strategy."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/sim/reset", self.reset)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def reset(self, request: web.Request) -> web.Response:
        self.events.append(("reset", request.host))
        return web.json_response({"ok": True})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        strategy = request.headers.get("routing-strategy", "")
        body = await request.json()
        if strategy == "bogus":
            return web.json_response({"error": {"message": "unknown routing strategy bogus", "type": "x"}}, status=400)
        self.events.append(("stream" if body.get("stream") else "probe", strategy))
        if not body.get("stream"):
            return web.json_response({"choices": [{"message": {"content": "x"}}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "target-pod": f"pod-{strategy}"})
        await resp.prepare(request)
        for word in ("hello", " world"):
            chunk = {"choices": [{"index": 0, "delta": {"content": word}}]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        usage = {"prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 4}}
        await resp.write(b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\ndata: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def test_compare_resets_pods_between_arms_and_skips_a_rejected_strategy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("extproc_router.loadtest.report.matplotlib_available", lambda: False)
    recorder = Recorder()
    runner = web.AppRunner(recorder.app())
    await runner.setup()
    sites = [web.TCPSite(runner, "127.0.0.1", 0), web.TCPSite(runner, "127.0.0.1", 0)]
    for site in sites:
        await site.start()
    try:
        urls = [f"http://127.0.0.1:{addr[1]}" for addr in runner.addresses]
        args = cli_args("--target", urls[0], "--compare", "a,bogus,b", "--reset-url", urls[0], "--reset-url", urls[1],
                        "--groups", "2", "--prompts-per-group", "2", "--prefix-tokens", "8", "--concurrency", "1",
                        "--out", str(tmp_path), "--quiet")  # fmt: skip
        assert await loadtest_cli.main_async(args) == 0
    finally:
        await runner.cleanup()

    kinds = [(kind, who if kind != "reset" else "") for kind, who in recorder.events]
    arm_events = [("probe", "a"), ("reset", ""), ("reset", ""), *[("stream", "a")] * 4,
                  ("probe", "b"), ("reset", ""), ("reset", ""), *[("stream", "b")] * 4]  # fmt: skip
    assert kinds == arm_events  # the rejected arm sent nothing after its probe and reset nothing
    resets = [who for kind, who in recorder.events if kind == "reset"]
    assert sorted(resets[:2]) == sorted(u.removeprefix("http://") for u in urls)

    report = orjson.loads((tmp_path / "report.json").read_bytes())
    a, bogus, b = (arm["summary"] for arm in report["arms"])
    assert bogus["skipped"] == "preflight request failed: HTTP 400: unknown routing strategy bogus"
    assert a["pods"] == {"pod-a": {"requests": 4, "errors": 0, "prompt_tokens": 40, "cached_tokens": 16,
                                   "hit_rate": 0.4}}  # fmt: skip
    assert b["hit_rate"]["achieved"] == 0.4 and b["output_tokens"] == 8
    assert "arm bogus skipped" in (tmp_path / "summary.md").read_text()
    assert "no plots: matplotlib is not installed (pip install matplotlib)" in report["notes"]
    assert not list(tmp_path.glob("*.png"))


def test_bad_flags_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert asyncio.run(loadtest_cli.main_async(cli_args("--compare", "random"))) == 2
    assert "no --target" in capsys.readouterr().err
    assert asyncio.run(loadtest_cli.main_async(cli_args())) == 2


# ---------------------------------------------------------------- the router's match claims


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.50;tokens=1024;src=approx;sel=prefix_match", (0.5, 1024)),
        ("1.00;tokens=0;src=precise;sel=prefix_match", (1.0, 0)),
        (None, (None, None)),
        ("", (None, None)),
        ("0.50;src=approx", (0.5, None)),  # no tokens=
        ("0.50;tokens=-3;src=approx", (0.5, None)),
        ("0.50;tokens=12abc", (0.5, None)),
        ("0.50;tokens=" + "9" * 40, (0.5, None)),  # absurdly long number
        ("7.5;tokens=3", (None, 3)),  # a share above 1
        ("nan;tokens=3", (None, 3)),
        ("-0.5;tokens=3", (None, 3)),
        ("x" * 10_000 + ";tokens=5", (None, None)),  # oversized header
    ],
)
def test_claim_parses_the_match_header_and_ignores_junk(value: str | None, expected: tuple) -> None:
    from extproc_router.loadtest.client import _claim

    headers = {} if value is None else {"x-prefix-cache-match": value}
    assert _claim(headers) == expected


def test_summary_compares_claims_with_what_the_pods_served() -> None:
    """A claim the pod kept, one it half kept, one it did not keep at all (an evicted prefix the
    approximate index still believes in), and a request without a claim."""
    from extproc_router.loadtest.runner import ArmResult

    def rec(i: int, share: float | None, cached: int) -> Record:
        r = Record(index=i, seq=i, label="", start_s=0.0, body={})
        r.ok, r.ttft_ms, r.e2e_ms, r.prompt_tokens, r.cached_tokens, r.claimed_share = (
            True, 10.0, 20.0, 2000, cached, share)  # fmt: skip
        r.claimed_tokens = 99_999  # the router's own estimate: not what claims are measured in
        return r

    result = ArmResult(arm=Arm(name="a", target="t"), duration_s=1.0,
                       records=[rec(0, 0.5, 1000), rec(1, 0.5, 500), rec(2, 0.5, 0), rec(3, None, 300)])
    claims = summarize(result)["claims"]
    assert claims == {"requests": 3, "claimed_tokens": 3000, "kept": 0.5, "overclaimed_requests": 1}
    report = build_report(RunSettings(model=MODEL, workload=WorkloadSpec()), [result])
    md = markdown_summary(report)
    assert "claim kept" in md and "50.0%" in md
