"""`prefix-cache`: send a prompt to the pod that was last sent its longest prefix, unless that
pod is busy enough that recomputing the prefix elsewhere is faster (reference §8).

A decision: tokenize the prompt (`routing/tokenizers.py`), hash its full blocks into a chain
(`routing/block_hash.py`), ask the index (`routing/prefix_index.py`) how many leading blocks each
ready pod holds, drop matches below `min_match_pct` of the hashed blocks (a 1% match must not pull
traffic: the reference's hot-spot issues #2680-#2689), then let a load guard pick:

* `cost` (default): estimated time to first token on each pod, in prefill tokens: the pod's
  queued uncached prompt tokens (booked per request until it ends, drained at
  `prefill_tokens_per_s` since they arrived: `LoadTracker.queued_prefill`) + this request's
  uncached tokens there x (1 + `kv_pressure_weight` x the pod's KV pressure) + `cost_request_tokens` per open request
  (running sequences slow every engine step and hold KV cache). The lowest wins, so a cached
  prefix is worth exactly what it saves, and a hot prefix spills over once its pod's queue costs
  more than recomputing the prefix elsewhere (the shape of Dynamo's cost and llm-d's token-load
  scorer). The queued part is the larger of that booked estimate and the engine's own waiting
  queue x `cost_waiting_tokens` (scraped `/metrics`; a memory-bound pod admits nothing however
  fast it would prefill). KV pressure = the share of the pod's KV capacity (engine-reported) taken by blocks it
  was sent within `kv_window_s`: each token newly cached on a full pod evicts one that other
  requests still use and will have to recompute, so new prompts go where the cache has room
  instead of piling onto the pod that happens to hold a shared system prompt (measured: without
  it, 10 conversations with their own 2000-token histories all went to 2 of 4 pods and thrashed).
* `stddev` (the reference's rules): if the in-flight spread over ready pods exceeds
  `imbalance_abs_count`, only the least-loaded pods stay candidates; matched candidates are tried
  by match desc, load asc, and the first with load <= mean + `stddev_factor` * stddev wins; otherwise
  least-request.

Whatever was picked, the index learns that the chosen pod now holds the prompt's blocks: also
with one ready pod, and also when the guard overrode the match (the pod will have computed them).

Two sources of matches, per pod. Pods whose engines publish KV-cache events (and whose subscriber is
live, `routing/kv_index.py`) are matched exactly against the blocks their engine reports holding:
the prompt is tokenized with the model's engine tokenizer and hashed per the engine's block size.
The other pods are matched against the approximate index above (routing history). A mixed fleet
works: each pod's match is in tokens, whatever its source, and the load guard, KV-pressure and
waiting-queue terms apply alike. The approximate index keeps learning every pick (its recent blocks
are the KV-pressure term, and a pod whose events stop falls back on it).

The match goes to the client as `x-prefix-cache-match: <share>;tokens=<n>;src=<source>;sel=<selection>`,
source `precise` (the chosen pod's engine events) or `approx`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from routing.block_hash import DEFAULT_HASH_SEED, chain_hashes
from routing.kv_index import KvBlockIndex, PreciseMatch
from routing.load import LoadTracker
from routing.pods import Pod, PodSnapshot
from routing.prefix_index import PrefixIndex
from routing.report import MetricFamily
from routing.request import RoutingRequest
from routing.stats import PodStats
from routing.strategies.base import Choice, DecisionContext
from routing.tokenizers import BYTES_PER_TOKEN, CHARACTER, TIKTOKEN, TOKENIZER_TYPES, Tokenizer, make_tokenizer

MATCH_HEADER = "x-prefix-cache-match"
GUARD_COST = "cost"
GUARD_STDDEV = "stddev"
LOAD_GUARDS = (GUARD_COST, GUARD_STDDEV)

# Per tokenizer, in its units. Characters: 128 bytes (the reference chart's value; its code default
# of 4 bytes would hash every prompt into thousands of blocks) is ~32 tokens, two 16-token vLLM KV
# blocks: finer blocks cost hashing and index room without routing better. Tokens: 16, vLLM's KV
# block, the unit the engine itself reuses.
DEFAULT_BLOCK_SIZE = {CHARACTER: 128, TIKTOKEN: 16}

# Selection outcomes, as the reference's `prefix_cache_routing_selection_total{selection}`.
SEL_MATCH = "prefix_match"  # the chosen pod holds a (large enough) prefix of the prompt
SEL_SKIPPED = "prefix_match_skipped"  # some pod did, but the load guard chose one that does not
SEL_LEAST_REQUEST = "least_request_fallback"  # no usable match (stddev guard): least in-flight
SEL_LEAST_COST = "least_cost_fallback"  # no usable match (cost guard): cheapest pod
SEL_WEIGHTED = "weighted"  # part of a weighted combination (`least-request:2,prefix-cache:1`)
SEL_PD_PREFILL = "pd_prefill"  # `pd` chose this prefill pod (by match and prefill load)

# Where the chosen pod's match came from (`src=` of the header).
SRC_PRECISE = "precise"  # the engine's KV-cache events
SRC_APPROX = "approx"  # the router's own routing history

_BUCKETS = ((0, "0"), (25, "1-25"), (50, "26-50"), (75, "51-75"), (100, "76-100"))


@dataclass(frozen=True, slots=True)
class PrefixCacheSettings:
    """`AIBRIX_PREFIX_CACHE_*`; see the module docstring and the README for the rationale."""

    tokenizer_type: str = CHARACTER  # AIBRIX_PREFIX_CACHE_TOKENIZER_TYPE
    block_size: int | None = None  # AIBRIX_PREFIX_CACHE_BLOCK_SIZE; None: DEFAULT_BLOCK_SIZE
    hash_seed: int = DEFAULT_HASH_SEED  # AIBRIX_PREFIX_CACHE_HASH_SEED; same on every replica
    max_prefix_blocks: int = 1024  # AIBRIX_PREFIX_CACHE_MAX_PREFIX_BLOCKS; blocks hashed per request
    block_number: int = 200_000  # AIBRIX_PREFIX_CACHE_BLOCK_NUMBER; index entries (block, pod)
    eviction_duration_mins: float = 20.0  # AIBRIX_PREFIX_CACHE_EVICTION_DURATION_MINS
    min_match_pct: float = 10.0  # AIBRIX_PREFIX_CACHE_MIN_MATCH_PCT
    load_guard: str = GUARD_COST  # AIBRIX_PREFIX_CACHE_LOAD_GUARD
    imbalance_abs_count: int = 16  # AIBRIX_PREFIX_CACHE_POD_RUNNING_REQUEST_IMBALANCE_ABS_COUNT
    stddev_factor: float = 1.0  # AIBRIX_PREFIX_CACHE_STANDARD_DEVIATION_FACTOR
    # Decode load of one open request, in prefill-token equivalents. 64 measured best on bench/quality.py
    # (shared-prefix hit rate 63-64% of an oracle 66.4% vs 59-61% at 256; multi-turn 77-79% vs 75%):
    # a decoding request slows a pod far less than a prefill of its prompt would.
    cost_request_tokens: float = 64.0  # AIBRIX_PREFIX_CACHE_COST_REQUEST_TOKENS
    prefill_tokens_per_s: float = 16000.0  # AIBRIX_PREFIX_CACHE_PREFILL_TOKENS_PER_SEC; 0: no draining
    # KV-cache pressure (cost guard): blocks sent to a pod within this window count as what it
    # holds; 0 turns the pressure term off. 300 s: prompt caches are reused within minutes (the
    # lifetime hosted APIs give theirs), and a window longer than a pod's real turnover only
    # saturates the term, it does not mislead it.
    kv_window_s: float = 300.0  # AIBRIX_PREFIX_CACHE_KV_WINDOW_SECONDS
    pod_kv_tokens: int = 0  # AIBRIX_PREFIX_CACHE_POD_KV_TOKENS; capacity of a pod that reports none; 0: unknown
    # Uncached tokens cost x (1 + weight x pressure). Conversations grow after they are placed (each
    # turn adds its question and answer), so the pressure a new one sees understates what it will
    # cause: at 1, ten conversations behind one 1000-token system prompt still went 6-7 to a pod
    # (it spreads from ~65% full, they then tripled and thrashed it); at 2 a pod ~1/3 full stops
    # taking new conversations for a system-prompt match, while a continuation (few uncached
    # tokens) still goes home whatever the pressure.
    kv_pressure_weight: float = 2.0  # AIBRIX_PREFIX_CACHE_KV_PRESSURE_WEIGHT
    # Each request the engine reports waiting (vllm:num_requests_waiting, scraped every
    # AIBRIX_POD_METRIC_REFRESH_INTERVAL_MS) is admitted before a new one. When a pod's KV is full
    # of running sequences it admits one per sequence that finishes (~e2e / running, 0.05-0.1 s for
    # an 8B model with 100-token answers), however fast it would prefill; the router's own drained
    # estimate then says the pod is idle while its queue grows, and the cached prefix keeps pulling
    # (measured at 30 req/s on bench/quality.py: one pod's TTFT climbed to 2.5 s, p90 2.01 s). 800
    # tokens (0.05 s of prefill) measured best between 200 and 1600: p90 280 ms at 30 req/s, and at
    # 40 req/s (overload) 1.09 s with the hit rate kept, where 1600 spilled cached requests (hit 45%).
    cost_waiting_tokens: float = 800.0  # AIBRIX_PREFIX_CACHE_COST_WAITING_TOKENS
    # Precise matching (pods that publish KV-cache events). A routed prompt's blocks count as held by
    # the pod for this long before its events confirm them (read from the approximate index's newest
    # entries): the engine publishes a block once it has computed it, and without this a burst sharing
    # a new prefix would spread over every pod (llm-d's speculative entries, 2 s). 0: only the events.
    kv_events_speculative_s: float = 2.0  # EXTPROC_ROUTER_KV_EVENTS_SPECULATIVE_SECONDS
    # Engine blocks indexed per pod (~200 bytes each); beyond it new blocks are not indexed (counted
    # as overflow) until the engine removes some. 2**20 blocks of 16 tokens = 16M tokens of KV cache.
    kv_events_max_blocks_per_pod: int = 1 << 20  # EXTPROC_ROUTER_KV_EVENTS_MAX_BLOCKS_PER_POD

    def validate(self) -> None:
        """ValueError naming the environment variable of the first bad value."""
        checks = [
            (self.tokenizer_type in TOKENIZER_TYPES, "AIBRIX_PREFIX_CACHE_TOKENIZER_TYPE",
             f"one of {', '.join(TOKENIZER_TYPES)}", self.tokenizer_type),
            (self.block_size is None or self.block_size >= 1, "AIBRIX_PREFIX_CACHE_BLOCK_SIZE", "at least 1",
             self.block_size),
            (0 <= self.hash_seed < 2**64, "AIBRIX_PREFIX_CACHE_HASH_SEED", "an unsigned 64-bit integer",
             self.hash_seed),
            (self.max_prefix_blocks >= 1, "AIBRIX_PREFIX_CACHE_MAX_PREFIX_BLOCKS", "at least 1",
             self.max_prefix_blocks),
            (self.block_number >= 1, "AIBRIX_PREFIX_CACHE_BLOCK_NUMBER", "at least 1", self.block_number),
            (self.eviction_duration_mins > 0, "AIBRIX_PREFIX_CACHE_EVICTION_DURATION_MINS", "positive",
             self.eviction_duration_mins),
            (0 <= self.min_match_pct <= 100, "AIBRIX_PREFIX_CACHE_MIN_MATCH_PCT", "from 0 to 100",
             self.min_match_pct),
            (self.load_guard in LOAD_GUARDS, "AIBRIX_PREFIX_CACHE_LOAD_GUARD", f"one of {', '.join(LOAD_GUARDS)}",
             self.load_guard),
            (self.imbalance_abs_count >= 0, "AIBRIX_PREFIX_CACHE_POD_RUNNING_REQUEST_IMBALANCE_ABS_COUNT",
             "0 or more", self.imbalance_abs_count),
            (self.stddev_factor >= 0, "AIBRIX_PREFIX_CACHE_STANDARD_DEVIATION_FACTOR", "0 or more",
             self.stddev_factor),
            (self.cost_request_tokens >= 0, "AIBRIX_PREFIX_CACHE_COST_REQUEST_TOKENS", "0 or more",
             self.cost_request_tokens),
            (self.prefill_tokens_per_s >= 0, "AIBRIX_PREFIX_CACHE_PREFILL_TOKENS_PER_SEC", "0 or more",
             self.prefill_tokens_per_s),
            (self.kv_window_s >= 0, "AIBRIX_PREFIX_CACHE_KV_WINDOW_SECONDS", "0 or more", self.kv_window_s),
            (self.pod_kv_tokens >= 0, "AIBRIX_PREFIX_CACHE_POD_KV_TOKENS", "0 or more", self.pod_kv_tokens),
            (self.kv_pressure_weight >= 0, "AIBRIX_PREFIX_CACHE_KV_PRESSURE_WEIGHT", "0 or more",
             self.kv_pressure_weight),
            (self.cost_waiting_tokens >= 0, "AIBRIX_PREFIX_CACHE_COST_WAITING_TOKENS", "0 or more",
             self.cost_waiting_tokens),
            (self.kv_events_speculative_s >= 0, "EXTPROC_ROUTER_KV_EVENTS_SPECULATIVE_SECONDS", "0 or more",
             self.kv_events_speculative_s),
            (self.kv_events_max_blocks_per_pod >= 1, "EXTPROC_ROUTER_KV_EVENTS_MAX_BLOCKS_PER_POD", "at least 1",
             self.kv_events_max_blocks_per_pod),
        ]
        for ok, var, wanted, value in checks:
            if not ok:
                raise ValueError(f"{var} must be {wanted}, got {value!r}")


@dataclass(slots=True)
class _Prompt:
    """One request's hashed prompt, kept in the decision's scratch between `score` and `observe`."""

    hashes: np.ndarray  # the approximate index's chain
    tokens: float  # model tokens of the whole prompt (exact when an engine tokenizer counted them)
    # pod key -> (leading blocks held, blocks hashed, tokens per block), from the pod's source; pods
    # holding nothing are left out
    matches: dict[str, tuple[int, int, float]]
    precise: PreciseMatch | None = None  # the precise candidates' match, when any candidate is precise

    def share(self, key: str) -> float:
        """Held share (0..1) of the prompt's hashed blocks on pod `key`."""
        m = self.matches.get(key)
        return m[0] / m[1] if m is not None and m[1] else 0.0

    def source(self, key: str) -> str:
        return SRC_PRECISE if self.precise is not None and key in self.precise.runs else SRC_APPROX


class PrefixCacheStrategy:
    """The `prefix-cache` strategy: a picker, a scorer and observer for weighted combinations, and
    the prefix matcher `pd` uses for its prefill pick (`match_shares`, `observe`)."""

    name = "prefix-cache"
    higher_is_better = True

    def __init__(self, settings: PrefixCacheSettings | None = None, *, index: PrefixIndex | None = None,
                 tokenizer: Tokenizer | None = None, clock: Callable[[], float] = time.time) -> None:
        s = settings or PrefixCacheSettings()
        s.validate()
        self.settings = s
        self.tokenizer = tokenizer or make_tokenizer(s.tokenizer_type)
        self.block_size = s.block_size or DEFAULT_BLOCK_SIZE[self.tokenizer.name]
        self.index = index if index is not None else new_prefix_index(s)
        self._clock = clock
        self._block_bytes = self.block_size * self.tokenizer.unit_bytes
        self._block_tokens = self.block_size / self.tokenizer.units_per_token
        self._max_units = s.max_prefix_blocks * self.block_size
        self._pods_seen: Sequence[Pod] = ()
        self._pod_keys: tuple[str, ...] = ()
        # Plain ints on the request path; `report` reads them at scrape time.
        self.decisions: dict[tuple[str, str], int] = {}  # (model, match percent bucket)
        self.selections: dict[tuple[str, str], int] = {}  # (model, selection)
        self.imbalance: dict[str, int] = {}  # model -> abs-imbalance rule fired
        self.ignored_matches: dict[str, int] = {}  # model -> best match below min_match_pct
        self.errors: dict[tuple[str, str], int] = {}  # (model, reason)
        self.sources: dict[tuple[str, str], int] = {}  # (model, source of the chosen pod's match)

    # -- Picker ----------------------------------------------------------------------------------
    def pick(self, ctx: DecisionContext, pods: Sequence[Pod]) -> Choice:
        now = self._clock()
        request = ctx.request
        prompt = self._hash(request, pods, now, ctx.stats.kv_blocks)
        valid = self._usable(request.model, prompt)
        if self.settings.load_guard == GUARD_COST:
            pod, selection = self._by_cost(pods, valid, prompt.tokens, ctx.stats, ctx.rng, now)
        else:
            pod, selection = self._by_stddev(request.model, pods, valid, ctx.load, ctx.rng)
        return self._record(request, prompt, pod, selection, now)

    # -- Scorer / Observer (weighted combinations) ------------------------------------------------
    def score(self, ctx: DecisionContext, pods: Sequence[Pod]) -> list[float]:
        """Matched share of the prompt per pod (0 below `min_match_pct`); `observe` then records
        the combination's pick."""
        prompt = self._hash(ctx.request, pods, self._clock(), ctx.stats.kv_blocks)
        ctx.scratch[self.name] = prompt
        valid = self._usable(ctx.request.model, prompt)
        return [prompt.share(p.key) if p.key in valid else 0.0 for p in pods]

    def observe(self, ctx: DecisionContext, pod: Pod, selection: str = SEL_WEIGHTED) -> Choice:
        """`ctx.request` was routed to `pod` by something else (a weighted combination, `pd`'s
        prefill pick): the index learns it; the choice carries the uncached-token estimate and header."""
        now = self._clock()
        prompt = ctx.scratch.pop(self.name, None) or self._hash(ctx.request, (pod,), now, ctx.stats.kv_blocks)
        return self._record(ctx.request, prompt, pod, selection, now)

    def match_shares(self, ctx: DecisionContext, pods: Sequence[Pod]) -> Mapping[str, float]:
        """Matched share (0..1) of the prompt per pod holding a usable prefix; the hashes stay in the
        decision's scratch for `observe`."""
        prompt = self._hash(ctx.request, pods, self._clock(), ctx.stats.kv_blocks)
        ctx.scratch[self.name] = prompt
        return {k: prompt.share(k) for k in self._usable(ctx.request.model, prompt, count=False)}

    # -- steps -----------------------------------------------------------------------------------
    def _hash(self, request: RoutingRequest, pods: Sequence[Pod], now: float,
              kv: KvBlockIndex | None = None) -> _Prompt:
        keys = self._keys(pods)
        try:
            data, tokens = self.tokenizer.encode(request.prompt, self._max_units)
        except (ValueError, UnicodeError):  # a tokenizer must never fail a request: route unmatched
            _count(self.errors, (request.model, "tokenize_failed"))
            hashes, tokens, matches = np.empty(0, dtype=np.uint64), len(request.prompt) / BYTES_PER_TOKEN, {}
        else:
            hashes = chain_hashes(data, self._block_bytes, request.model, self.settings.hash_seed,
                                  self.settings.max_prefix_blocks)
            n, per_block = len(hashes), self._block_tokens
            matches = {k: (m, n, per_block) for k, m in self.index.match(hashes, keys, now).items()} if n else {}
        precise = None
        if kv is not None and kv.precise_count:  # 0 while no pod publishes events: no cost at all
            try:
                # Salted by the request's model (an adapter's own name), tokenized as the pods' engine.
                precise = kv.match(request.model, request.body, keys, engine_model=pods[0].model if pods else None)
            except (ValueError, UnicodeError):
                _count(self.errors, (request.model, "engine_tokenize_failed"))
            if precise is not None:
                # From here on every count is in the engine's tokens: the approximate index's blocks
                # (a fixed number of bytes, `BYTES_PER_TOKEN` a token by estimate) are rescaled by what
                # the engine tokenizer counted for the same prompt. Left in estimated tokens, a
                # speculative or approximate match weighed ~1.2x its real size against the real prompt
                # on the simulator's text and pulled new conversations onto the pod that had just
                # taken another (measured: 10 conversations placed 4/3/3/0 where they fit 3/3/2/2).
                scale = precise.tokens / tokens if tokens > 0 else 1.0
                if scale != 1.0:
                    for key, (m, n, per_block) in matches.items():
                        matches[key] = (m, n, per_block * scale)
                self._merge_precise(matches, precise, hashes, kv, now, self._block_tokens * scale)
                tokens = precise.tokens
        return _Prompt(hashes, tokens, matches, precise)

    def _merge_precise(self, matches: dict[str, tuple[int, int, float]], precise: PreciseMatch, hashes: np.ndarray,
                       kv: KvBlockIndex, now: float, per_block: float) -> None:
        """A precise pod's match is what its engine reports holding, or, when longer, what it was routed
        within `kv_events_speculative_s` (the approximate index's newest entries: the engine publishes
        a block only once it has computed it) and after its cache was last emptied. Its older routing
        history never counts. `per_block`: engine tokens per approximate-index block."""
        window = self.settings.kv_events_speculative_s
        recent: dict[str, int] = {}
        if window > 0 and len(hashes):
            # match() keeps entries newer than its `now` minus the TTL: ask for the last `window` seconds.
            recent = self.index.match(hashes, precise.pods, now - window + self.index.ttl_seconds)
        for key in precise.pods:
            matches.pop(key, None)
            held, hashed, size = precise.runs[key]
            routed = recent.get(key, 0)
            if routed and kv.cleared_since(key, now - window):
                # The cache was emptied inside the window: only what was routed after that counts
                # (all of the window used to be ignored: measured, a reset right before a burst sent
                # 4 re-reads of fresh prefixes elsewhere).
                after = kv.cleared_at(key) + 1e-6  # strictly after the clear
                routed = self.index.match(hashes, (key,), after + self.index.ttl_seconds).get(key, 0)
            if routed * per_block > held * size:
                matches[key] = (routed, len(hashes), per_block)
            elif held:
                matches[key] = (held, hashed, float(size))

    def _keys(self, pods: Sequence[Pod]) -> tuple[str, ...]:
        # A model's ready tuple is the same object until the snapshot changes.
        if pods is not self._pods_seen:
            self._pods_seen = pods
            self._pod_keys = tuple(p.key for p in pods)
        return self._pod_keys

    def _usable(self, model: str, prompt: _Prompt, *, count: bool = True) -> dict[str, float]:
        """Matched tokens per pod whose match is at least `min_match_pct` of the blocks hashed for it
        (and at least one block)."""
        if not prompt.matches:
            return {}
        pct = self.settings.min_match_pct / 100.0
        valid = {k: m * per_block for k, (m, n, per_block) in prompt.matches.items()
                 if m >= max(1, math.ceil(n * pct))}
        if not valid and count:
            _count(self.ignored_matches, model)
        return valid

    def kv_pressure(self, pod_keys: Sequence[str], stats: PodStats, now: float) -> dict[str, float]:
        """Per pod of known KV capacity: the share (0..1) of its cache taken by what it was sent
        within `kv_window_s` (the index's live blocks), i.e. the chance that a newly cached token
        there evicts one that is still in use. Pods of unknown capacity are left out."""
        if self.settings.kv_window_s <= 0 or not stats.has_capacity():
            return {}
        live = self.index.live_blocks(now)
        out: dict[str, float] = {}
        for key in pod_keys:
            cap = stats.capacity(key)
            if cap:
                out[key] = min(1.0, live.get(key, 0) * self._block_tokens / cap)
        return out

    def _by_cost(self, pods: Sequence[Pod], valid: dict[str, float], tokens: float, stats: PodStats,
                 rng: random.Random, now: float) -> tuple[Pod, str]:
        per_request = self.settings.cost_request_tokens
        keys = self._keys(pods)
        pressure = self.kv_pressure(keys, stats, now)
        weight = self.settings.kv_pressure_weight
        load = stats.load
        engine = stats.engine
        per_waiting = self.settings.cost_waiting_tokens
        best: list[Pod] = []
        best_key: tuple[float, float] | None = None
        for pod, key in zip(pods, keys, strict=True):
            m = valid.get(key, 0.0)  # matched tokens
            uncached = max(0.0, tokens - m)
            # Computing the uncached tokens, plus (on a full cache) evicting as many tokens that
            # other requests still use: new conversations go where there is room, a pod does not
            # take on more live prefixes than it can hold and thrash them all.
            # Two estimates of the wait before this prefill starts: the router's booked prefill still
            # queued (right while the pod is compute-bound), the engine's waiting queue (right when
            # it is memory-bound and admits nothing). The larger one, not their sum: both count
            # the same queue when it is the prefill that is behind.
            queued = load.queued_prefill(key)
            if engine:
                reported = engine.get(key)
                if reported is not None:
                    queued = max(queued, per_waiting * reported.waiting)
            cost = queued + uncached * (1.0 + weight * pressure.get(key, 0.0)) + per_request * load.inflight(key)
            rank = (cost, -m)  # equal cost: the longer match keeps the cache warm
            if best_key is None or rank < best_key:
                best, best_key = [pod], rank
            elif rank == best_key:
                best.append(pod)
        pod = best[rng.randrange(len(best))] if len(best) > 1 else best[0]
        if pod.key in valid:
            return pod, SEL_MATCH
        return pod, SEL_SKIPPED if valid else SEL_LEAST_COST

    def _by_stddev(self, model: str, pods: Sequence[Pod], valid: dict[str, float], load: LoadTracker,
                   rng: random.Random) -> tuple[Pod, str]:
        counts = [load.inflight(p.key) for p in pods]
        candidates: Sequence[Pod] = pods
        cand_counts = counts
        lo = min(counts)
        if max(counts) - lo > self.settings.imbalance_abs_count:
            _count(self.imbalance, model)
            pairs = [(p, c) for p, c in zip(pods, counts, strict=True) if c == lo]
            candidates = [p for p, _ in pairs]
            cand_counts = [c for _, c in pairs]
        matched = [(valid[p.key], c, p) for p, c in zip(candidates, cand_counts, strict=True) if p.key in valid]
        selection = SEL_LEAST_REQUEST
        if matched:
            n = len(counts)
            mean = sum(counts) / n
            # Sample standard deviation over all ready pods, as the reference.
            sd = math.sqrt(sum((c - mean) ** 2 for c in counts) / (n - 1)) if n > 1 else 0.0
            limit = mean + self.settings.stddev_factor * sd
            rng.shuffle(matched)
            matched.sort(key=lambda t: (-t[0], t[1]))
            for _, c, pod in matched:
                if c <= limit:
                    return pod, SEL_MATCH
            selection = SEL_SKIPPED
        least = min(cand_counts)
        tied = [p for p, c in zip(candidates, cand_counts, strict=True) if c == least]
        return (tied[rng.randrange(len(tied))] if len(tied) > 1 else tied[0]), selection

    def _record(self, request: RoutingRequest, prompt: _Prompt, pod: Pod, selection: str, now: float) -> Choice:
        if len(prompt.hashes):
            self.index.add(prompt.hashes, pod.key, now)
        held, n, per_block = prompt.matches.get(pod.key, (0, 0, 0.0))
        matched_tokens = held * per_block
        share = held / n if n else 0.0
        pct = held * 100 // n if n else 0
        source = prompt.source(pod.key)
        bucket = next(label for top, label in _BUCKETS if pct <= top)
        _count(self.decisions, (request.model, bucket))
        _count(self.selections, (request.model, selection))
        _count(self.sources, (request.model, source))
        return Choice(pod, prefill_tokens=max(0, round(prompt.tokens - matched_tokens)),
                      annotations={MATCH_HEADER: f"{share:.2f};tokens={round(matched_tokens)};src={source};"
                                                 f"sel={selection}"})

    # -- Reporter --------------------------------------------------------------------------------
    def report(self, snapshot: PodSnapshot, stats: PodStats) -> Iterator[MetricFamily]:
        """Decision counters, the index's size and evictions, and each pod's KV pressure. Names follow
        the reference's `aibrix_prefix_cache_*` with our prefix."""
        yield _counter_family("extproc_prefix_cache_routing_decisions", "prefix-cache decisions by the chosen "
                              "pod's matched share of the prompt, in percent.", ("model", "match_percent_bucket"),
                              self.decisions)
        yield _counter_family(
            "extproc_prefix_cache_routing_selection", "prefix-cache decisions by how the pod was selected: "
            "prefix_match, prefix_match_skipped (the load guard chose a pod without the prefix), "
            "least_request_fallback / least_cost_fallback (no usable match), weighted.", ("model", "selection"),
            self.selections)
        yield _counter_family("extproc_prefix_cache_load_imbalance", "stddev guard: decisions where the in-flight "
                              "spread exceeded the absolute imbalance count.", ("model",), self.imbalance)
        yield _counter_family("extproc_prefix_cache_ignored_matches", "Decisions whose best match was below "
                              "AIBRIX_PREFIX_CACHE_MIN_MATCH_PCT and so ignored.", ("model",), self.ignored_matches)
        yield _counter_family("extproc_prefix_cache_routing_errors", "Prompts that could not be tokenized (routed "
                              "as unmatched).", ("model", "reason"), self.errors)
        yield _counter_family("extproc_prefix_cache_routing_source", "prefix-cache decisions by the source of the "
                              "chosen pod's match: precise (its engine's KV-cache events) or approx (routing "
                              "history).", ("model", "source"), self.sources)
        yield from _precise_families(snapshot, stats.kv_blocks)
        index = self.index
        entries = MetricFamily("extproc_prefix_cache_index_entries", "gauge", "(block, pod) entries in the prefix "
                               "index.")
        entries.add((), len(index))
        yield entries
        capacity = MetricFamily("extproc_prefix_cache_index_capacity", "gauge", "AIBRIX_PREFIX_CACHE_BLOCK_NUMBER.")
        capacity.add((), index.capacity)
        yield capacity
        evictions = MetricFamily("extproc_prefix_cache_index_evictions", "counter", "Entries removed from the "
                                 "prefix index, by reason.", ("reason",))
        st = index.stats
        for reason, n in (("capacity", st.evicted_capacity), ("ttl", st.evicted_ttl),
                          ("overflow", st.evicted_overflow), ("pod_removed", st.removed_pod)):
            evictions.add((reason,), n)
        yield evictions
        pressure = MetricFamily("extproc_prefix_cache_kv_pressure", "gauge", "Share of the pod's KV capacity taken "
                                "by blocks routed to it within AIBRIX_PREFIX_CACHE_KV_WINDOW_SECONDS (0..1).",
                                ("model", "pod"))
        shares = self.kv_pressure([p.key for m in snapshot.models.values() for p in m.pods], stats, self._clock())
        for entry in snapshot.models.values():
            for pod in entry.pods:
                if pod.key in shares:
                    pressure.add((entry.name, pod.name), shares[pod.key])
        yield pressure


def new_kv_index(settings: PrefixCacheSettings) -> KvBlockIndex:
    """The precise index `settings` describe (the router's PodStats owns it; the subscribers feed it)."""
    return KvBlockIndex(seed=settings.hash_seed, max_blocks_per_pod=settings.kv_events_max_blocks_per_pod,
                        max_prefix_blocks=settings.max_prefix_blocks)


def new_prefix_index(settings: PrefixCacheSettings) -> PrefixIndex:
    """The index `settings` describe (the router owns it; prefix-cache and pd share it)."""
    return PrefixIndex(settings.block_number, settings.eviction_duration_mins * 60.0,
                       live_horizon=settings.kv_window_s)


def _precise_families(snapshot: PodSnapshot, kv: KvBlockIndex) -> Iterator[MetricFamily]:
    """The precise index per pod: blocks held, and what was done with the pod's block events."""
    blocks = MetricFamily("extproc_prefix_cache_precise_blocks", "gauge", "KV-cache blocks the pod's engine "
                          "reports holding (router blocks in the precise index).", ("model", "pod"))
    precise = MetricFamily("extproc_prefix_cache_precise_pod", "gauge", "1 when prefix-cache matches the pod by its "
                           "KV-cache events, 0 while it falls back on the approximate index.", ("model", "pod"))
    events = MetricFamily("extproc_prefix_cache_precise_block_events", "counter", "Block events applied to the "
                          "precise index, by outcome: stored, removed, cleared (whole pod), orphaned (parent "
                          "unknown), unknown_removed, overflow, skipped (other KV-cache groups).",
                          ("model", "pod", "outcome"))
    held = kv.pod_blocks()
    for entry in snapshot.models.values():
        for pod in entry.pods:
            counts = kv.counts(pod.key)
            if counts is None:
                continue
            labels = (entry.name, pod.name)
            blocks.add(labels, held.get(pod.key, 0))
            precise.add(labels, 1.0 if kv.is_precise(pod.key) else 0.0)
            for outcome in ("stored", "removed", "cleared", "orphaned", "unknown_removed", "overflow", "skipped"):
                events.add((*labels, outcome), getattr(counts, outcome))
    yield blocks
    yield precise
    yield events


def _counter_family(name: str, help_text: str, labels: tuple[str, ...], counts: dict) -> MetricFamily:
    family = MetricFamily(name, "counter", help_text, labels)
    for key, n in list(counts.items()):
        family.add(key if isinstance(key, tuple) else (key,), n)
    return family


def _count(counter: dict, key: object) -> None:
    counter[key] = counter.get(key, 0) + 1
