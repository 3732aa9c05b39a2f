"""Trace replay in the harness: the trace format, hash ids as text, scaling, the generator, and the
finite-cache oracle (checked against a brute-force LRU)."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
from pathlib import Path

import orjson
import pytest

from extproc_router.cli import build_parser
from extproc_router.loadtest import cli as loadtest_cli
from extproc_router.loadtest.oracle import Oracle, hit_rate, load_tokenizer, lru_hits
from extproc_router.loadtest.report import build_report, summarize, table_columns
from extproc_router.loadtest.runner import Arm, RunSettings, run_arm
from extproc_router.loadtest.tracegen import TraceGenSpec, generate_trace, trace_stats
from extproc_router.loadtest.traces import (
    TraceError,
    TraceRequest,
    TraceText,
    TraceWorkload,
    load_trace,
    parse_trace,
    trace_lines,
    write_trace,
)
from extproc_router.loadtest.workloads import WorkloadSpec, build_workload
from extproc_router.simulator.server import SimConfig, start_sim

MODEL = "demo-model"


def cl100k():
    tokenizer = load_tokenizer()
    if tokenizer is None:
        pytest.skip("simulator.tokenizer is not there")
    return tokenizer


def line(ts: float, n_in: int, n_out: int, ids: list[int]) -> str:
    return orjson.dumps({"timestamp": ts, "input_length": n_in, "output_length": n_out, "hash_ids": ids}).decode()


# ---------------------------------------------------------------- parsing


def test_trace_lines_parse_in_timestamp_order() -> None:
    text = [
        line(10, 700, 52, [0, 1]),
        "",
        '{"timestamp": 0, "input_length": 512.0, "output_length": 0, "hash_ids": [0], "session": "x"}',
        line(10, 30, 5, []),
        '{"timestamp": 3.5, "input_length": 9, "output_length": 1}',
    ]
    rows = parse_trace(text, "t.jsonl")
    assert [(r.line, r.timestamp_ms) for r in rows] == [(3, 0.0), (5, 3.5), (1, 10.0), (4, 10.0)]
    assert rows[0] == TraceRequest(line=3, timestamp_ms=0.0, input_length=512, output_length=0, hash_ids=(0,))
    assert rows[1].hash_ids == ()  # hash_ids are optional: an unshared prompt
    # Written back, a trace reads the same (lines renumbered in replay order).
    again = parse_trace(b"".join(trace_lines(rows)).decode().splitlines(), "again")
    assert [(r.timestamp_ms, r.input_length, r.output_length, r.hash_ids) for r in again] == [
        (r.timestamp_ms, r.input_length, r.output_length, r.hash_ids) for r in rows
    ]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"timestamp": 1, "input_length": 5}', "missing output_length"),
        ('{"input_length": 5, "output_length": 1}', "missing timestamp"),
        ('{"timestamp": -1, "input_length": 5, "output_length": 1}', "'timestamp' must be a number"),
        ('{"timestamp": "0", "input_length": 5, "output_length": 1}', "'timestamp' must be a number"),
        ('{"timestamp": 0, "input_length": 0, "output_length": 1}', "'input_length' must be >= 1"),
        ('{"timestamp": 0, "input_length": 5.5, "output_length": 1}', "'input_length' must be an integer"),
        ('{"timestamp": 0, "input_length": true, "output_length": 1}', "'input_length' must be an integer"),
        ('{"timestamp": 0, "input_length": 5, "output_length": -2}', "'output_length' must be >= 0"),
        ('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1, -1]}', "'hash_ids'"),
        ('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": "1,2"}', "'hash_ids'"),
    ],
)
def test_a_bad_line_is_rejected_naming_the_line(bad: str, message: str) -> None:
    with pytest.raises(TraceError, match=f"^trace.jsonl:3: .*{message}"):
        parse_trace([line(0, 5, 1, [0]), "", bad, line(1, 5, 1, [0])], "trace.jsonl")


def test_the_command_line_rejects_a_bad_trace_before_sending(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    trace = tmp_path / "bad.jsonl"
    trace.write_text(line(0, 5, 1, [0]) + "\n" + '{"timestamp": 0}\n')
    parser = argparse.ArgumentParser()
    loadtest_cli.add_arguments(parser)

    def code(*argv: str) -> int:
        return asyncio.run(loadtest_cli.main_async(parser.parse_args(["--target", "http://127.0.0.1:9", *argv])))

    assert code("--workload", "trace", "--trace", str(trace)) == 2
    assert f"{trace}:2: missing input_length, output_length" in capsys.readouterr().err
    assert code("--workload", "trace") == 2
    assert "--workload trace needs --trace FILE" in capsys.readouterr().err
    assert code("--workload", "trace", "--trace", str(tmp_path / "none.jsonl")) == 2
    assert "No such file" in capsys.readouterr().err
    trace.write_text(line(0, 5, 1, [0]) + "\n")
    assert code("--workload", "trace", "--trace", str(trace), "--rate", "3") == 2
    assert "use --time-scale, not --rate" in capsys.readouterr().err
    assert code("--trace", str(trace)) == 2
    assert "--trace goes with --workload trace" in capsys.readouterr().err


# ---------------------------------------------------------------- hash ids as text


@pytest.mark.parametrize("kind", ["cl100k", "bytes"])
def test_equal_hash_ids_are_equal_text_of_exactly_block_tokens(kind: str) -> None:
    tokenize = cl100k().tokenize
    text = TraceText(block_tokens=64, tokenizer_kind=kind, seed=3)
    for hash_id in (0, 1, 46, 10**12):
        assert len(tokenize(text.block_text(hash_id), kind)) == 64
    assert text.block_text(46) == TraceText(64, kind, seed=3).block_text(46)  # deterministic
    assert text.block_text(46) != text.block_text(47)
    assert text.block_text(46) != TraceText(64, kind, seed=4).block_text(46)  # the seed changes the text

    # Two prompts sharing their first two ids share exactly their first 128 tokens, whatever follows.
    a = text.prompt([5, 6, 7], 170, filler_key="a")
    b = text.prompt([5, 6, 9, 10], 250, filler_key="b")
    ta, tb = tokenize(a, kind), tokenize(b, kind)
    assert (len(ta), len(tb)) == (170, 250)
    assert ta[:128] == tb[:128] and ta[128] != tb[128]
    # Fewer ids than the length needs: the rest is filler of the request's own; more: cut to length.
    c, d = text.prompt([5], 100, filler_key="c"), text.prompt([5], 100, filler_key="d")
    assert len(tokenize(c, kind)) == 100 and tokenize(c, kind)[:64] == tokenize(d, kind)[:64] and c != d
    assert text.prompt([5, 6, 7], 10) == text.prompt([5], 10)


async def test_shared_hash_ids_share_the_engine_blocks_exactly(tmp_path: Path) -> None:
    """Rendered as chat and cut into the simulator's 16-token blocks, shared ids give shared engine blocks."""
    tokenizer = cl100k()
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join([line(0, 200, 4, [1, 2, 3, 4]), line(5, 180, 4, [1, 2, 8]), line(9, 64, 4, [9])]))
    workload = build_workload(WorkloadSpec(name="trace", trace=str(trace), block_tokens=64))
    bodies = [(await workload.next()).body for _ in range(3)]
    assert await workload.next() is None
    oracle = Oracle(tokenizer, "chat", block_size=16)
    (n0, h0), (n1, h1), (_, h2) = (oracle.blocks(b) for b in bodies)
    assert (n0 - 200, n1 - 180) == (n0 - 200, n0 - 200) and n0 - 200 < 10  # only the chat template is added
    # The template's few tokens shift the blocks, so the shared 128 tokens cover 8 or 9 engine blocks.
    shared = next(i for i, (x, y) in enumerate(zip(h0, h1, strict=False)) if x != y)
    assert shared == (n0 - 200 + 128) // 16
    assert h2[0] != h0[0]  # a different first id: nothing shared past the template
    assert all(b["max_tokens"] == 4 for b in bodies)


# ---------------------------------------------------------------- scaling


async def test_time_and_token_scaling(tmp_path: Path) -> None:
    tokenize = cl100k().tokenize
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join([line(1000, 1000, 100, [0, 1]), line(3000, 600, 40, [0, 2]), line(4500, 3, 1, [])]))
    spec = WorkloadSpec(name="trace", trace=str(trace), path="completions", time_scale=0.5, token_scale=0.25)
    workload = TraceWorkload(spec)
    reqs = [await workload.next() for _ in range(3)]
    # Times start at the first timestamp and are scaled; the labels name the trace lines.
    assert [r.at_s for r in reqs] == [0.0, 1.0, 1.75]
    assert [r.label for r in reqs] == ["line1", "line2", "line3"]
    # Lengths scale, blocks too (512 -> 128 tokens), so the requests still share exactly one block.
    assert [r.body["max_tokens"] for r in reqs] == [25, 10, 1]
    tokens = [tokenize(r.body["prompt"]) for r in reqs]
    assert [len(t) for t in tokens] == [250, 150, 1]
    assert tokens[0][:128] == tokens[1][:128] and tokens[0][128] != tokens[1][128]

    with pytest.raises(ValueError, match="time_scale and token_scale"):
        TraceWorkload(WorkloadSpec(name="trace", trace=str(trace), time_scale=0))
    assert WorkloadSpec(name="trace", trace=str(trace), requests=2).planned_requests() == 2
    assert WorkloadSpec(name="trace", trace=str(trace), requests=50).planned_requests() == 3


# ---------------------------------------------------------------- the finite-cache oracle


def brute_force_lru(chains: list[list[int]], capacity: int | None) -> list[int]:
    """The finite-cache oracle's model written the slow way: explicit use times, evict the oldest."""
    used_at: dict[int, tuple[int, int]] = {}
    hits = []
    for t, chain in enumerate(chains):
        matched = 0
        while matched < len(chain) and chain[matched] in used_at:
            matched += 1
        hits.append(matched)
        for position, h in enumerate(chain):
            used_at[h] = (t, -position)  # the whole request is recent, its first block most of all
        while capacity is not None and len(used_at) > capacity:
            del used_at[min(used_at, key=used_at.__getitem__)]
    return hits


def random_chains(rng: random.Random, n: int) -> list[list[int]]:
    """Chained hashes with shared prefixes: each chain extends a prefix of an earlier one with new blocks."""
    fresh = iter(range(1, 10**9))
    chains: list[list[int]] = []
    for _ in range(n):
        base = rng.choice(chains)[: rng.randint(0, 6)] if chains and rng.random() < 0.7 else []
        chains.append(base + [next(fresh) for _ in range(rng.randint(0 if base else 1, 5))])
    return chains


def test_finite_oracle_equals_a_brute_force_lru_on_small_cases() -> None:
    for seed in range(60):
        rng = random.Random(seed)
        chains = random_chains(rng, rng.randint(1, 25))
        for capacity in (0, 1, 2, 3, 5, 8, 13, 40, None):
            assert lru_hits(chains, capacity) == brute_force_lru(chains, capacity), (seed, capacity)
    # A cache that holds everything is the infinite oracle.
    chains = random_chains(random.Random(99), 40)
    assert lru_hits(chains, 10**6) == lru_hits(chains, None)


def test_finite_oracle_hand_computed() -> None:
    # Capacity 3 blocks. A=[1,2]; B=[3,4]; A again: 1 was used after 2, so the tail 2 went first.
    assert lru_hits([[1, 2], [3, 4], [1, 2]], 3) == [0, 0, 1]
    # A is re-read before B evicts it; then B pushes out A's tail only.
    assert lru_hits([[1, 2], [1, 2], [3], [1, 2]], 3) == [0, 2, 0, 2]
    assert lru_hits([[1, 2], [1, 2], [3, 4], [1, 2]], 3) == [0, 2, 0, 1]


def test_oracle_run_finite_counts_tokens() -> None:
    from tests.unit.extproc_router.loadtest.test_loadtest import WordTokenizer

    oracle = Oracle(WordTokenizer(), "completions", block_size=2)
    bodies = [{"prompt": "a b c d"}, {"prompt": "e f g h"}, {"prompt": "a b c d x"}]
    assert oracle.run(bodies) == [(4, 0), (5 - 1, 0), (5, 4)]
    # Room for 3 blocks: "e f g h" evicts "c d", so only "a b" is left.
    assert oracle.run_finite(bodies, capacity_tokens=6) == [(4, 0), (4, 0), (5, 2)]
    assert hit_rate(oracle.run_finite(bodies, None)) == pytest.approx(4 / 13)


# ---------------------------------------------------------------- the generator


def test_generated_traces_are_deterministic_and_parse(tmp_path: Path) -> None:
    for kind in ("multi-turn", "shared-prompts", "eviction"):
        spec = TraceGenSpec(kind=kind, block_tokens=64, capacity_tokens=4096, requests=30, users=5, turns=3)  # type: ignore[arg-type]
        trace = generate_trace(spec)
        assert trace == generate_trace(spec)
        assert trace != generate_trace(TraceGenSpec(**{**spec.__dict__, "seed": 1}))
        path = write_trace(tmp_path / f"{kind}.jsonl", trace)
        assert list(load_trace(path)) == trace
        assert [r.timestamp_ms for r in trace] == sorted(r.timestamp_ms for r in trace)
        for r in trace:  # every prompt ends inside its last block
            assert (len(r.hash_ids) - 1) * 64 < r.input_length <= len(r.hash_ids) * 64


def test_multi_turn_turns_extend_each_other_after_long_gaps() -> None:
    spec = TraceGenSpec(kind="multi-turn", users=6, turns=4, system_blocks=2, question_blocks=1, answer_blocks=2,
                        turn_gap_s=30.0, rate=1.0)  # fmt: skip
    trace = generate_trace(spec)
    assert len(trace) == 24
    system = trace[0].hash_ids[:2]
    assert all(r.hash_ids[:2] == system for r in trace)  # one system prompt for everyone
    conversations: dict[int, list[TraceRequest]] = {}
    for r in trace:  # a conversation is identified by its first question block
        conversations.setdefault(r.hash_ids[2], []).append(r)
    assert len(conversations) == 6
    gaps = []
    for turns in conversations.values():
        assert [len(t.hash_ids) for t in turns] == [3, 6, 9, 12]  # + answer (2) + question (1) per turn
        for before, after in itertools.pairwise(turns):
            assert after.hash_ids[: len(before.hash_ids)] == before.hash_ids
            gaps.append(after.timestamp_ms - before.timestamp_ms)
    assert 10_000 < sum(gaps) / len(gaps) < 60_000  # exponential gaps averaging 30 s


def test_shared_prompts_and_eviction_patterns() -> None:
    shared = generate_trace(TraceGenSpec(kind="shared-prompts", groups=3, system_blocks=2, requests=60, zipf=0))
    systems = {r.hash_ids[:2] for r in shared}
    assert len(systems) == 3 and all(len(r.hash_ids) == 3 for r in shared)
    assert len({r.hash_ids[2] for r in shared}) == 60  # every question its own

    spec = TraceGenSpec(kind="eviction", block_tokens=64, capacity_tokens=4096, working_set=4.0, doc_blocks=4,
                        hot_fraction=0.3)  # fmt: skip
    trace = generate_trace(spec)
    stats = trace_stats(trace, 64, 4096)
    docs = {r.hash_ids[:4] for r in trace}
    assert len(docs) * 4 * 64 >= 4 * 4096  # the documents alone are 4x the capacity
    assert stats["working_set_tokens"] >= 4 * 4096
    # Every document comes back (the second sweep), but an LRU of the capacity has evicted it by then:
    # what stays reachable is the hot share's re-reads.
    assert stats["hit_infinite"] > 0.35
    assert 0.02 < stats["hit_lru"] < stats["hit_infinite"] - 0.1
    cold = trace_stats(generate_trace(TraceGenSpec(**{**spec.__dict__, "hot_fraction": 0.0})), 64, 4096)
    assert cold["hit_lru"] == 0.0 < cold["hit_infinite"]

    with pytest.raises(ValueError, match="hot_fraction"):
        generate_trace(TraceGenSpec(kind="eviction", hot_fraction=2))
    with pytest.raises(ValueError, match="unknown trace kind"):
        generate_trace(TraceGenSpec(kind="nope"))  # type: ignore[arg-type]


def test_gen_trace_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sub" / "mt.jsonl"
    parser = build_parser()
    args = parser.parse_args(["loadtest", "gen-trace", "--kind", "multi-turn", "--out", str(out), "--users", "3",
                              "--turns", "2", "--block-tokens", "32", "--capacity-tokens", "1024"])  # fmt: skip
    assert args.func(args) == 0
    printed = orjson.loads(capsys.readouterr().out)
    assert printed["requests"] == 6 == len(load_trace(out))
    assert printed["block_tokens"] == 32 and 0 < printed["hit_lru"] <= printed["hit_infinite"]
    # Without the subcommand, `loadtest` is still the harness itself.
    assert parser.parse_args(["loadtest", "--target", "http://x"]).func is loadtest_cli.run


# ---------------------------------------------------------------- replaying against a simulated pod


async def test_replaying_a_trace_against_a_model_timed_pod(tmp_path: Path) -> None:
    cl100k()
    trace = generate_trace(
        # 12 documents of ~10 engine blocks each against 64 blocks: the second sweep finds them evicted.
        TraceGenSpec(
            kind="eviction",
            block_tokens=32,
            capacity_tokens=1024,
            working_set=2.0,
            doc_blocks=4,
            question_blocks=1,
            hot_fraction=0.3,
            rate=40.0,
            output_tokens=2,
            requests=48,
        )
    )
    path = write_trace(tmp_path / "ev.jsonl", trace)
    config = SimConfig(
        models=[MODEL],
        pod_name="pod-t",
        timing="model",
        tokenizer="bytes",
        kv_capacity_tokens=1024,
        decode_step_ms=1.0,
        prefill_tokens_per_s=200_000.0,
    )
    sim = await start_sim(config)
    try:
        settings = RunSettings(
            model=MODEL,
            workload=WorkloadSpec(name="trace", trace=str(path), block_tokens=32, tokenizer="bytes", time_scale=0.5),
            reset_urls=[sim.url], block_size=16, tokenizer_kind="bytes", oracle_cache_tokens=1024, oracle_pods=1,
        )  # fmt: skip
        oracle = Oracle(cl100k(), "chat", block_size=16, tokenizer_kind="bytes")
        result = await run_arm(Arm("a", sim.url), settings, oracle=oracle)
    finally:
        await sim.stop()
    recs = result.records
    assert result.stopped_by == "requests" and len(recs) == 48 and all(r.ok for r in recs)
    # Sent on the trace's clock (x 0.5), never early.
    origin = trace[0].timestamp_ms
    for rec, row in zip(sorted(recs, key=lambda r: r.seq), trace, strict=True):
        due = (row.timestamp_ms - origin) / 1000.0 * 0.5
        assert due - 0.001 <= rec.start_s <= due + 0.5
        assert rec.label == f"line{row.line}" and rec.output_tokens == 2
    # The pod counts the prompt as the oracle does (bytes tokenizer on both sides).
    s = summarize(result)
    assert s["prompt_tokens"]["reported"] == s["prompt_tokens"]["oracle"]
    hits = s["hit_rate"]
    assert 0 < hits["oracle_finite"] < hits["oracle"]
    # One pod whose cache is the oracle's: what it achieves is what the finite oracle says, give or
    # take requests that overlap (they pin blocks) and the one partial block a prompt also occupies;
    # the infinite oracle promises twice as much.
    assert hits["oracle_finite"] - 0.1 <= hits["achieved"] <= hits["oracle"]
    assert all(r.oracle_finite_cached_tokens is not None for r in recs)
    report = build_report(settings, [result])
    assert report["settings"]["arrival"] == "trace timestamps x 0.5"
    assert report["settings"]["oracle_cache_tokens"] == 1024
    assert "hit oracle LRU" in table_columns([s])
