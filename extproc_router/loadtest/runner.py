"""Runs arms: arrival (Poisson, closed loop or a trace's timestamps), bounds (requests, duration), progress, resets.

An *arm* is one routing configuration measured on the whole workload: a strategy of the target
(sent as the ``routing-strategy`` header) or another target altogether (a peer router). Arms run
one after another on freshly built, identical workloads, after an optional reset of the pods'
caches, so they differ only in routing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from extproc_router.loadtest.client import API_PATHS, UNKNOWN_POD, probe, request_body, reset_pods, stream_request
from extproc_router.loadtest.oracle import Oracle
from extproc_router.loadtest.workloads import PlannedRequest, WorkloadSpec, build_workload

STRATEGY_HEADER = "routing-strategy"


@dataclass(frozen=True)
class Arm:
    """One routing configuration: a name, the URL requests go to, and the strategy header (if any)."""

    name: str
    target: str
    strategy: str | None = None


def parse_arms(text: str, default_target: str | None) -> list[Arm]:
    """``random,least-request,sglang=http://127.0.0.1:30001`` → arms.

    A bare name is a strategy of ``default_target`` (sent as the ``routing-strategy`` header);
    ``name=URL`` is another endpoint, sent no strategy header.
    """
    arms: list[Arm] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, url = item.partition("=")
        name = name.strip()
        if sep:
            if not name or not url.strip():
                raise ValueError(f"arm {item!r}: expected NAME=URL")
            arms.append(Arm(name=name, target=url.strip().rstrip("/")))
        else:
            if default_target is None:
                raise ValueError(f"arm {name!r} is a strategy of --target, but no --target was given")
            arms.append(Arm(name=name, target=default_target.rstrip("/"), strategy=name))
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must be unique: {', '.join(names)}")
    if not arms:
        raise ValueError("no arms given")
    return arms


@dataclass
class RunSettings:
    """How to send the workload; shared by every arm of a run."""

    model: str
    workload: WorkloadSpec
    rate: float | None = None
    """Poisson arrivals per second; None = closed loop at ``concurrency``."""
    concurrency: int = 8
    duration: float = 600.0
    """Seconds after which no new request is sent."""
    grace: float = 60.0
    """Seconds that requests still in flight at the end get to finish before they are cancelled."""
    timeout: float = 300.0
    """Longest wait for the next bytes of a response."""
    headers: dict[str, str] = field(default_factory=dict)
    extra_body: dict[str, Any] = field(default_factory=dict)
    reset_urls: list[str] = field(default_factory=list)
    preflight: bool = True
    block_size: int = 16
    tokenizer_kind: str = "cl100k"
    oracle_cache_tokens: int | None = None
    """KV capacity per pod of the finite-cache oracle; None: no finite-cache oracle."""
    oracle_pods: int = 1
    """Pods whose capacity the finite-cache oracle pools."""

    @property
    def path(self) -> str:
        return self.workload.path

    @property
    def oracle_capacity_tokens(self) -> int | None:
        """The finite-cache oracle's capacity: pods x tokens per pod (None: not computed)."""
        if self.oracle_cache_tokens is None:
            return None
        return self.oracle_cache_tokens * self.oracle_pods

    def arrival(self) -> str:
        """How requests are sent, in words."""
        if self.workload.name == "trace":
            return f"trace timestamps x {self.workload.time_scale:g}"
        return f"poisson {self.rate}/s" if self.rate else f"closed loop, concurrency {self.concurrency}"

    def describe(self) -> dict[str, Any]:
        """The settings as plain data, for report.json."""
        scheduled = self.workload.name == "trace"
        return {
            "model": self.model,
            "path": self.path,
            "workload": dataclasses.asdict(self.workload),
            "arrival": self.arrival(),
            "rate": None if scheduled else self.rate,
            "concurrency": None if self.rate or scheduled else self.concurrency,
            "requests": self.workload.planned_requests(),
            "duration_s": self.duration,
            "grace_s": self.grace,
            "timeout_s": self.timeout,
            "reset_urls": list(self.reset_urls),
            "block_size": self.block_size,
            "tokenizer": self.tokenizer_kind,
            "oracle_cache_tokens": self.oracle_cache_tokens,
            "oracle_pods": self.oracle_pods if self.oracle_cache_tokens is not None else None,
            "extra_headers": sorted(self.headers),
            "extra_body": self.extra_body,
        }


@dataclass(slots=True)
class Record:
    """One sent request as the report sees it. Times in ms; ``start_s`` from the arm's start."""

    index: int
    seq: int
    label: str
    start_s: float
    body: dict[str, Any]
    ok: bool = False
    status: int = 0
    error: str | None = None
    cancelled: bool = False
    pod: str = UNKNOWN_POD
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    claimed_tokens: int | None = None
    """What the router said the chosen pod had cached (x-prefix-cache-match tokens=), when it said."""
    claimed_share: float | None = None
    """The same claim as a share of the prompt's hashed blocks (unit-free)."""
    oracle_prompt_tokens: int | None = None
    oracle_cached_tokens: int | None = None
    oracle_finite_cached_tokens: int | None = None
    """What the finite-cache oracle (one LRU of the fleet's capacity) would have served from cache."""

    def to_json(self) -> dict[str, Any]:
        """Everything but the body (the workload settings regenerate it)."""
        tokens_per_s = None
        if self.ok and self.e2e_ms:
            tokens_per_s = round(self.output_tokens / (self.e2e_ms / 1000.0), 2)
        return {
            "index": self.index,
            "seq": self.seq,
            "label": self.label,
            "start_s": round(self.start_s, 4),
            "ok": self.ok,
            "status": self.status,
            "error": self.error,
            "cancelled": self.cancelled,
            "pod": self.pod,
            "ttft_ms": _ms(self.ttft_ms),
            "e2e_ms": _ms(self.e2e_ms),
            "itl_ms": [round(x, 3) for x in self.itl_ms],
            "output_tokens": self.output_tokens,
            "tokens_per_s": tokens_per_s,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "claimed_tokens": self.claimed_tokens,
            "claimed_share": self.claimed_share,
            "oracle_prompt_tokens": self.oracle_prompt_tokens,
            "oracle_cached_tokens": self.oracle_cached_tokens,
            "oracle_finite_cached_tokens": self.oracle_finite_cached_tokens,
        }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@dataclass
class ArmResult:
    """What one arm produced."""

    arm: Arm
    records: list[Record] = field(default_factory=list)
    duration_s: float = 0.0
    """From the first request sent to the last answer finished (the throughput denominator)."""
    skipped: str | None = None
    """Why the arm did not run (its preflight request failed, or the run was interrupted)."""
    reset_errors: list[str] = field(default_factory=list)
    interrupted: bool = False
    stopped_by: str = ""
    """What ended sending: "requests", "workload", "duration" or "interrupt"."""


class Progress:
    """Progress display of a run; the base class shows nothing (tests, --quiet)."""

    def start_arm(self, name: str, total: int) -> None:
        """A new arm begins with ``total`` planned requests."""

    def request_done(self, ok: bool) -> None:
        """One request finished (or failed)."""

    def end_arm(self) -> None:
        """The current arm is over."""

    def note(self, text: str) -> None:
        """A line of information (skipped arm, failed reset)."""


class RichProgress(Progress):
    """One rich progress bar per arm, with the arm's error count."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.progress import Progress as _RichProgress

        self._progress = _RichProgress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description:<16}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("errors {task.fields[errors]}"),
            TimeElapsedColumn(),
        )
        self._task: Any = None
        self._errors = 0

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def start_arm(self, name: str, total: int) -> None:
        self._errors = 0
        self._task = self._progress.add_task(name, total=total, errors=0)

    def request_done(self, ok: bool) -> None:
        if not ok:
            self._errors += 1
        self._progress.update(self._task, advance=1, errors=self._errors)

    def end_arm(self) -> None:
        if self._task is not None:
            self._progress.stop_task(self._task)

    def note(self, text: str) -> None:
        self._progress.console.print(text)


async def run_arm(
    arm: Arm,
    settings: RunSettings,
    progress: Progress | None = None,
    stop: asyncio.Event | None = None,
    oracle: Oracle | None = None,
) -> ArmResult:
    """Send the workload to ``arm`` and collect one record per request sent.

    Sending stops at the planned number of requests, when the workload runs out, after
    ``settings.duration`` or when ``stop`` is set; requests in flight then get ``settings.grace``
    seconds (none after ``stop``) and are cancelled after that.
    """
    progress = progress or Progress()
    stop = stop or asyncio.Event()
    result = ArmResult(arm=arm)
    headers = {"Content-Type": "application/json", **settings.headers}
    if arm.strategy:
        headers[STRATEGY_HEADER] = arm.strategy
    url = arm.target.rstrip("/") + API_PATHS[settings.path]
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=settings.timeout)
    # limit=0: the harness must never be the queue; concurrency is the arrival process's business.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        if settings.preflight:
            reason = await probe(session, url, settings.model, settings.path, headers)
            if reason:
                result.skipped = f"preflight request failed: {reason}"
                progress.note(f"[yellow]arm {arm.name}: skipped ({result.skipped})")
                return result
        if settings.reset_urls:
            # After the preflight, so the arm starts with empty caches.
            result.reset_errors = await reset_pods(session, settings.reset_urls)
            for err in result.reset_errors:
                progress.note(f"[yellow]arm {arm.name}: pod reset failed, the arm does not start cold: {err}")
        workload = build_workload(settings.workload)
        progress.start_arm(arm.name, workload.size)
        try:
            await _send_all(session, url, headers, workload, settings, result, progress, stop)
        finally:
            progress.end_arm()
    if oracle is not None:
        apply_oracle(oracle, result.records, settings.oracle_capacity_tokens)
    return result


async def _send_all(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    workload: Any,
    settings: RunSettings,
    result: ArmResult,
    progress: Progress,
    stop: asyncio.Event,
) -> None:
    loop = asyncio.get_running_loop()
    in_flight: set[asyncio.Task[None]] = set()
    scheduled = workload.scheduled
    closed_loop = settings.rate is None and not scheduled
    slots = asyncio.Semaphore(settings.concurrency) if closed_loop else None
    arrivals = random.Random(f"arrivals:{settings.workload.seed}")
    t0 = time.perf_counter()
    last_end = t0

    async def send(req: PlannedRequest, seq: int) -> None:
        nonlocal last_end
        body = request_body(req.body, settings.model, settings.extra_body)
        rec = Record(index=req.index, seq=seq, label=req.label, start_s=time.perf_counter() - t0, body=body)
        result.records.append(rec)
        try:
            res = await stream_request(session, url, body, headers)
        except asyncio.CancelledError:
            rec.cancelled = True
            rec.error = "cancelled: still running when the run ended"
            raise
        finally:
            if slots is not None:
                slots.release()
        rec.ok, rec.status, rec.error, rec.pod = res.ok, res.status, res.error, res.pod
        rec.ttft_ms = None if res.ttft is None else res.ttft * 1000.0
        rec.e2e_ms = None if res.e2e is None else res.e2e * 1000.0
        rec.itl_ms = [gap * 1000.0 for gap in res.itl]
        rec.output_tokens = res.output_tokens
        rec.prompt_tokens, rec.cached_tokens = res.prompt_tokens, res.cached_tokens
        rec.claimed_tokens, rec.claimed_share = res.claimed_tokens, res.claimed_share
        last_end = max(last_end, res.start + (res.e2e or 0.0))
        workload.finished(req, res.text if res.ok else None)
        progress.request_done(res.ok)

    async def dispatch() -> str:
        next_at = t0
        seq = 0
        while seq < workload.size:
            if scheduled:
                # The workload's own clock (a trace's timestamps), open loop like Poisson arrivals.
                req = await workload.next()
                if req is None:
                    return "workload"
                delay = t0 + req.at_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            else:
                if slots is not None:
                    await slots.acquire()
                else:
                    # Open loop: the schedule does not wait for answers, so queueing shows in latency.
                    next_at += arrivals.expovariate(settings.rate)
                    delay = next_at - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                req = await workload.next()
                if req is None:
                    if slots is not None:
                        slots.release()
                    return "workload"
            task = loop.create_task(send(req, seq))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            seq += 1
        return "requests"

    dispatcher = loop.create_task(dispatch())
    stopped = loop.create_task(stop.wait())
    try:
        await asyncio.wait({dispatcher, stopped}, timeout=settings.duration, return_when=asyncio.FIRST_COMPLETED)
        if dispatcher.done():
            result.stopped_by = dispatcher.result()
        else:
            result.stopped_by = "interrupt" if stop.is_set() else "duration"
            dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dispatcher
        # Requests still running get until duration + grace, or nothing once interrupted.
        deadline = t0 + settings.duration + settings.grace
        while in_flight and not stop.is_set():
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            await asyncio.wait({*in_flight, stopped}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
    finally:
        result.interrupted = stop.is_set()
        for task in list(in_flight):
            task.cancel()
        if in_flight:
            await asyncio.gather(*in_flight, return_exceptions=True)
        if not dispatcher.done():
            dispatcher.cancel()
        stopped.cancel()
        result.duration_s = last_end - t0
        result.records.sort(key=lambda r: r.seq)


def apply_oracle(oracle: Oracle, records: list[Record], capacity_tokens: int | None = None) -> None:
    """Fill the oracle counts of the successful records, replayed in the order they were sent.

    Failed requests are left out: no pod computed their prompt, so they warm no cache and the
    achieved hit rate (from successful requests' usage) covers the same set. With
    ``capacity_tokens`` the finite-cache oracle (one LRU of that many tokens) is filled in too.
    """
    served = [r for r in sorted(records, key=lambda r: r.seq) if r.ok]
    for rec, (prompt, cached) in zip(served, oracle.run(r.body for r in served), strict=True):
        rec.oracle_prompt_tokens, rec.oracle_cached_tokens = prompt, cached
    if capacity_tokens is not None:
        finite = oracle.run_finite((r.body for r in served), capacity_tokens)
        for rec, (_, cached) in zip(served, finite, strict=True):
            rec.oracle_finite_cached_tokens = cached


async def run_arms(
    arms: list[Arm],
    settings: RunSettings,
    progress: Progress | None = None,
    stop: asyncio.Event | None = None,
    oracle: Oracle | None = None,
) -> list[ArmResult]:
    """Run ``arms`` back to back on the same workload; after an interrupt the rest are skipped."""
    stop = stop or asyncio.Event()
    results: list[ArmResult] = []
    for arm in arms:
        if stop.is_set():
            results.append(ArmResult(arm=arm, skipped="interrupted before this arm", interrupted=True))
            continue
        results.append(await run_arm(arm, settings, progress, stop, oracle))
    return results
