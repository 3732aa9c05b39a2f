"""Statistics of a run and its outputs: the rich table, report.json, summary.md and PNG plots."""

from __future__ import annotations

import datetime
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from extproc_router.loadtest.oracle import hit_rate
from extproc_router.loadtest.runner import ArmResult, RunSettings

REPORT_VERSION = 1


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 3) if values else None


def _ratio(num: float, den: float) -> float | None:
    return round(num / den, 4) if den else None


def _turn(label: str) -> int | None:
    """The round of a multi-turn label ``u3/r2`` (2); None for any other label."""
    user, sep, rnd = label.partition("/r")
    return int(rnd) if sep and user.startswith("u") and rnd.isdigit() else None


def summarize(result: ArmResult) -> dict[str, Any]:
    """The per-arm summary of report.json: latency percentiles, throughput, errors, hit rates, pods."""
    recs = result.records
    ok = [r for r in recs if r.ok]
    failed = [r for r in recs if not r.ok and not r.cancelled]
    cancelled = [r for r in recs if r.cancelled]
    ttft = [r.ttft_ms for r in ok if r.ttft_ms is not None]
    itl = [gap for r in ok for gap in r.itl_ms]
    e2e = [r.e2e_ms for r in ok if r.e2e_ms is not None]
    output_tokens = sum(r.output_tokens for r in ok)
    duration = result.duration_s

    # Achieved: what the pods said they served from cache, over the requests that report it.
    reported = [r for r in ok if r.prompt_tokens is not None and r.cached_tokens is not None]
    achieved = hit_rate((r.prompt_tokens or 0, r.cached_tokens or 0) for r in reported) if reported else None
    with_oracle = [r for r in ok if r.oracle_prompt_tokens is not None]
    oracle = (
        hit_rate((r.oracle_prompt_tokens or 0, r.oracle_cached_tokens or 0) for r in with_oracle)
        if with_oracle
        else None
    )
    with_finite = [r for r in with_oracle if r.oracle_finite_cached_tokens is not None]
    oracle_finite = (
        hit_rate((r.oracle_prompt_tokens or 0, r.oracle_finite_cached_tokens or 0) for r in with_finite)
        if with_finite
        else None
    )

    # The router's claims (x-prefix-cache-match) against what the chosen pod served from cache: the
    # approximate index claims blocks the engine has evicted, the precise one should not. A claim is
    # the header's share of the prompt's hashed blocks times the prompt's real token count, so the
    # router's token estimate (bytes / 4 for the character tokenizer) does not count as an error.
    claimed = [r for r in reported if r.claimed_share is not None]
    claims = None
    if claimed:
        said = [(round((r.claimed_share or 0.0) * (r.prompt_tokens or 0)), r.cached_tokens or 0) for r in claimed]
        total = sum(c for c, _ in said)
        claims = {
            "requests": len(claimed),
            "claimed_tokens": total,
            "kept": _ratio(sum(min(c, got) for c, got in said), total) if total else None,
            "overclaimed_requests": sum(1 for c, got in said if c >= 16 and got < 0.5 * c),
        }

    pods: dict[str, dict[str, Any]] = {}
    for r in recs:
        if r.cancelled:
            continue
        pod = pods.setdefault(r.pod, {"requests": 0, "errors": 0, "prompt_tokens": 0, "cached_tokens": 0})
        if not r.ok:
            pod["errors"] += 1
            continue
        pod["requests"] += 1
        if r.prompt_tokens is not None and r.cached_tokens is not None:
            pod["prompt_tokens"] += r.prompt_tokens
            pod["cached_tokens"] += r.cached_tokens
    for pod in pods.values():
        pod["hit_rate"] = _ratio(pod["cached_tokens"], pod["prompt_tokens"]) if reported else None
    error_kinds = Counter(f"{r.status or 'no response'}: {r.error}" for r in failed)

    # Multi-turn (labels "u<user>/r<round>"): a conversation's first turn is cold for every router
    # (nobody has seen that user's history), its later turns are where routing shows.
    turns = None
    rounds = [(_turn(r.label), r.ttft_ms) for r in ok if r.ttft_ms is not None]
    if rounds and all(t is not None for t, _ in rounds):
        first = [v for t, v in rounds if t == 0]
        later = [v for t, v in rounds if t]
        turns = {
            "first": {"n": len(first), "p50": _pct(first, 50), "p90": _pct(first, 90)},
            "later": {"n": len(later), "p50": _pct(later, 50), "p90": _pct(later, 90)},
        }

    return {
        "name": result.arm.name,
        "target": result.arm.target,
        "strategy": result.arm.strategy,
        "skipped": result.skipped,
        "stopped_by": result.stopped_by,
        "interrupted": result.interrupted,
        "reset_errors": result.reset_errors,
        "requests": len(recs),
        "ok": len(ok),
        "errors": len(failed),
        "cancelled": len(cancelled),
        "error_kinds": dict(error_kinds.most_common(10)),
        "duration_s": round(duration, 3),
        "ttft_ms": {"p50": _pct(ttft, 50), "p90": _pct(ttft, 90), "p99": _pct(ttft, 99), "mean": _mean(ttft)},
        "ttft_by_turn_ms": turns,
        "itl_ms": {"p50": _pct(itl, 50), "p95": _pct(itl, 95)},
        "e2e_ms": {"p50": _pct(e2e, 50), "p90": _pct(e2e, 90)},
        "throughput": {
            "requests_per_s": _ratio(len(ok), duration),
            "output_tokens_per_s": round(output_tokens / duration, 2) if duration else None,
        },
        "output_tokens": output_tokens,
        "hit_rate": {
            "oracle": None if oracle is None else round(oracle, 4),
            "oracle_finite": None if oracle_finite is None else round(oracle_finite, 4),
            "achieved": None if achieved is None else round(achieved, 4),
        },
        "prompt_tokens": {
            "reported": sum(r.prompt_tokens or 0 for r in reported) if reported else None,
            "oracle": sum(r.oracle_prompt_tokens or 0 for r in with_oracle) if with_oracle else None,
        },
        "claims": claims,
        "pods": dict(sorted(pods.items())),
    }


def build_report(settings: RunSettings, results: list[ArmResult], notes: list[str] | None = None) -> dict[str, Any]:
    """Settings, per-arm summaries and raw per-request records: the content of report.json."""
    return {
        "version": REPORT_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": settings.describe(),
        "notes": [*(notes or []), *(f"arm {r.arm.name} skipped: {r.skipped}" for r in results if r.skipped)],
        "arms": [{"summary": summarize(r), "records": [rec.to_json() for rec in r.records]} for r in results],
    }


def tokenizer_mismatch(summary: dict[str, Any], tolerance: float = 0.01) -> str | None:
    """A warning when the pods count prompt tokens differently from the oracle's tokenizer."""
    reported, oracle = summary["prompt_tokens"]["reported"], summary["prompt_tokens"]["oracle"]
    if not reported or not oracle or abs(reported - oracle) <= tolerance * oracle:
        return None
    return (
        f"arm {summary['name']}: the pods counted {reported} prompt tokens, the oracle {oracle}; "
        "they tokenize differently, so achieved and oracle hit rates are not comparable"
    )


# ---------------------------------------------------------------- formatting


def fmt_ms(value: float | None) -> str:
    """A latency for people: ``850 ms``, ``12.3 s``; ``-`` when unknown."""
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value / 1000:.2f} s" if value < 10_000 else f"{value / 1000:.1f} s"
    return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


def fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def fmt_num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def pod_spread(summary: dict[str, Any]) -> str:
    """Successful requests per pod, e.g. ``38/37/40/35`` in pod-name order."""
    pods = summary["pods"]
    return "/".join(str(p["requests"]) for p in pods.values()) if pods else "-"


TABLE_COLUMNS = (
    "arm", "ok", "err", "TTFT p50", "TTFT p90", "TTFT p99", "ITL p50", "ITL p95", "e2e p50", "e2e p90",
    "req/s", "out tok/s", "hit oracle", "hit achieved", "req per pod",
)  # fmt: skip


TURN_COLUMNS = ("TTFT p90 1st turn", "TTFT p90 later turns")

FINITE_ORACLE_COLUMN = "hit oracle LRU"
"""The finite-cache oracle's hit rate, after "hit oracle" when it was computed."""
CLAIM_COLUMN = "claim kept"
"""Share of the tokens the router said the chosen pod had cached that it did serve from cache."""


def _by_turn(summaries: list[dict[str, Any]]) -> bool:
    return any(s.get("ttft_by_turn_ms") for s in summaries if not s["skipped"])


def _finite_oracle(summaries: list[dict[str, Any]]) -> bool:
    return any((s["hit_rate"].get("oracle_finite") is not None) for s in summaries if not s["skipped"])


def table_columns(summaries: list[dict[str, Any]]) -> tuple[str, ...]:
    """TABLE_COLUMNS, with the per-turn TTFT columns after TTFT p99 for a multi-turn run and the
    finite-cache oracle after the infinite one when it was computed."""
    columns = TABLE_COLUMNS
    if _finite_oracle(summaries):
        at = columns.index("hit oracle") + 1
        columns = (*columns[:at], FINITE_ORACLE_COLUMN, *columns[at:])
    if any(s.get("claims") for s in summaries if not s["skipped"]):
        at = columns.index("hit achieved") + 1
        columns = (*columns[:at], CLAIM_COLUMN, *columns[at:])
    if _by_turn(summaries):
        at = columns.index("TTFT p99") + 1
        columns = columns[:at] + TURN_COLUMNS + columns[at:]
    return columns


def table_rows(summaries: list[dict[str, Any]]) -> list[list[str]]:
    """One row of `table_columns` per arm; a skipped arm says why."""
    columns = table_columns(summaries)
    turn_cells = TURN_COLUMNS[0] in columns
    finite_cell = FINITE_ORACLE_COLUMN in columns
    claim_cell = CLAIM_COLUMN in columns
    rows = []
    for s in summaries:
        if s["skipped"]:
            rows.append([s["name"], "-", "-", f"skipped: {s['skipped']}", *["" for _ in columns[4:]]])
            continue
        turns = s.get("ttft_by_turn_ms") or {}
        extra = [fmt_ms((turns.get(k) or {}).get("p90")) for k in ("first", "later")] if turn_cells else []
        rows.append(
            [
                s["name"],
                str(s["ok"]),
                str(s["errors"] + s["cancelled"]),
                fmt_ms(s["ttft_ms"]["p50"]),
                fmt_ms(s["ttft_ms"]["p90"]),
                fmt_ms(s["ttft_ms"]["p99"]),
                *extra,
                fmt_ms(s["itl_ms"]["p50"]),
                fmt_ms(s["itl_ms"]["p95"]),
                fmt_ms(s["e2e_ms"]["p50"]),
                fmt_ms(s["e2e_ms"]["p90"]),
                fmt_num(s["throughput"]["requests_per_s"]),
                fmt_num(s["throughput"]["output_tokens_per_s"], 0),
                fmt_pct(s["hit_rate"]["oracle"]),
                *([fmt_pct(s["hit_rate"].get("oracle_finite"))] if finite_cell else []),
                fmt_pct(s["hit_rate"]["achieved"]),
                *([fmt_pct((s.get("claims") or {}).get("kept"))] if claim_cell else []),
                pod_spread(s),
            ]
        )
    return rows


def headline(report: dict[str, Any]) -> str:
    """One line saying what was run: workload, size, arrival."""
    settings = report["settings"]
    return f"{settings['workload']['name']} workload, {settings['requests']} requests per arm, {settings['arrival']}"


def rich_table(report: dict[str, Any]) -> Any:
    """The summary as a rich Table with one column per arm, so five arms fit an 80-column terminal."""
    from rich.table import Table

    summaries = [a["summary"] for a in report["arms"]]
    table = Table()
    table.add_column("")
    for s in summaries:
        table.add_column(s["name"], justify="right")
    rows = table_rows(summaries)
    for i, label in enumerate(table_columns(summaries)[1:], start=1):
        # A skipped arm's row holds its reason; the notes under the table say it in full.
        pairs = zip(rows, summaries, strict=True)
        cells = [("skipped" if i == 1 else "") if s["skipped"] else row[i] for row, s in pairs]
        table.add_row(label, *cells)
    return table


def markdown_summary(report: dict[str, Any]) -> str:
    """summary.md: the settings in one line, the arms table, and per-pod requests and hit rate."""
    settings = report["settings"]
    wl = settings["workload"]
    summaries = [a["summary"] for a in report["arms"]]
    lines = [
        f"# Load test: {wl['name']}",
        "",
        f"{settings['requests']} requests ({settings['path']} API, model `{settings['model']}`), "
        f"{settings['arrival']}, seed {wl['seed']}; created {report['created']}.",
        "",
        "| " + " | ".join(table_columns(summaries)) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(table_columns(summaries)))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(summaries)]
    ran = [s for s in summaries if not s["skipped"]]
    pods = sorted({p for s in ran for p in s["pods"]})
    if pods:
        lines += ["", "Successful requests per pod (achieved hit rate):", ""]
        lines.append("| pod | " + " | ".join(s["name"] for s in ran) + " |")
        lines.append("|---|" + "---:|" * len(ran))
        for pod in pods:
            cells = []
            for s in ran:
                p = s["pods"].get(pod)
                cells.append("-" if p is None else f"{p['requests']} ({fmt_pct(p['hit_rate'])})")
            lines.append(f"| {pod} | " + " | ".join(cells) + " |")
    notes = list(report.get("notes") or [])
    notes += [f"arm {s['name']}: {k} x{n}" for s in ran for k, n in s["error_kinds"].items()]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- files


def write_report(report: dict[str, Any], out_dir: Path, plots: bool = True) -> list[Path]:
    """Write report.json, summary.md and (with matplotlib) the PNG plots; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "report.json", out_dir / "summary.md"]
    written[0].write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    written[1].write_text(markdown_summary(report))
    if plots:
        written += write_plots(report, out_dir)
    return written


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """TTFT CDF per arm, requests per pod per arm, hit rate per pod per arm. Nothing without matplotlib."""
    if not matplotlib_available():
        return []
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    arms = [a for a in report["arms"] if not a["summary"]["skipped"]]
    if not arms:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    workload = report["settings"]["workload"]["name"]
    written: list[Path] = []

    curves: dict[str, list[float]] = {}
    for arm in arms:
        ttft = sorted(r["ttft_ms"] / 1000.0 for r in arm["records"] if r["ok"] and r["ttft_ms"] is not None)
        if ttft:
            curves[arm["summary"]["name"]] = ttft
    if curves:
        fig, ax = plt.subplots(figsize=(8, 5))
        for name, ttft in curves.items():
            ax.step(ttft, np.arange(1, len(ttft) + 1) / len(ttft), where="post", label=name)
        low = min(t[0] for t in curves.values())
        high = max(t[-1] for t in curves.values())
        # TTFTs of cache-aware and cache-blind arms can differ by orders of magnitude.
        if low > 0 and high / low > 50:
            ax.set_xscale("log")
        ax.set_xlabel("time to first token (s)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"TTFT CDF per arm ({workload})")
        ax.grid(True, alpha=0.3)
        ax.legend()
        written.append(_save(fig, out_dir / "ttft_cdf.png"))

    summaries = [a["summary"] for a in arms]
    pods = sorted({p for s in summaries for p in s["pods"]})
    if pods:
        written.append(
            _grouped_bars(
                summaries, pods, lambda p: p["requests"], "successful requests", f"Requests per pod ({workload})",
                out_dir / "pod_requests.png",
            )
        )
        oracles = [s["hit_rate"]["oracle"] for s in summaries if s["hit_rate"]["oracle"] is not None]
        written.append(
            _grouped_bars(
                summaries, pods, lambda p: 100 * (p["hit_rate"] or 0.0), "achieved prefix-cache hit rate (%)",
                f"Hit rate per pod ({workload})", out_dir / "pod_hit_rate.png",
                # The same requests in the same order give every arm the same oracle (multi-turn aside).
                reference=(100 * max(oracles), "oracle (ideal router)") if oracles else None,
            )
        )
    return written


def _grouped_bars(
    summaries: list[dict[str, Any]],
    pods: list[str],
    value: Any,
    ylabel: str,
    title: str,
    path: Path,
    reference: tuple[float, str] | None = None,
) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(pods) * math.sqrt(len(summaries))), 5))
    width = 0.8 / len(summaries)
    x = np.arange(len(pods))
    for i, s in enumerate(summaries):
        heights = [value(s["pods"][p]) if p in s["pods"] else 0 for p in pods]
        ax.bar(x + (i - (len(summaries) - 1) / 2) * width, heights, width, label=s["name"])
    if reference is not None:
        ax.axhline(reference[0], color="black", linestyle="--", linewidth=1, label=reference[1])
    ax.set_xticks(x, pods, rotation=20 if len(pods) > 4 else 0)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a bar
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
