"""`pd`: prefill/decode disaggregation (reference §9).

Pods carry `role-name` (`prefill`, `decode`, anything else = a combined pod) and `roleset-name`.
Only rolesets with at least one ready prefill and one ready decode pod take part. Within each
roleset the prefill pod is chosen by prefix-cache match and in-flight prefills, the decode pod by
load (this router's in-flight count plus the engine's own running/waiting/KV-cache figures); the
roleset whose pair scores best wins. Prompt-length buckets from each pod's profile
(`promptLenBucketMinLength`/`MaxLength`) keep short and long prompts on their own rolesets;
outside every bucket a `combined: true` pod serves without disaggregation.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence

from routing.errors import RoutingError
from routing.load import LoadTracker
from routing.pods import ANNOTATION_CONFIG, ModelEntry, Pod
from routing.profiles import ProfileCache
from routing.stats import EngineStats
from routing.strategies.base import Choice, DecisionContext

ROLE_PREFILL = "prefill"
ROLE_DECODE = "decode"
LABEL_ENGINE = "model.aibrix.ai/engine"
LABEL_SGLANG_BOOTSTRAP_PORT = "model.aibrix.ai/sglang-bootstrap-port"
PREFILL_LOAD_PREFIX = "prefill:"  # LoadTracker key namespace for prefill calls in flight


def sglang_bootstrap_port(pod: Pod) -> int:
    """The prefill pod's SGLang bootstrap port (label, default 8998)."""
    try:
        return int(pod.labels.get(LABEL_SGLANG_BOOTSTRAP_PORT, "8998"))
    except ValueError:
        return 8998


def _no_pair(model: str, why: str) -> RoutingError:
    return RoutingError(503, f"pd: no prefill/decode pair for model `{model}`: {why}", code="service_unavailable",
                        cause="routing")


class PDStrategy:
    """A planner: the chosen pod of its `Choice` is the decode pod, `prefill` the prefill pod (None
    when a combined pod serves the request alone)."""

    name = "pd"

    def __init__(self, prompt_tokens: Callable[[str], int],
                 prefill_match: Callable[[DecisionContext, Sequence[Pod]], Mapping[str, float]] | None = None,
                 observe_prefill: Callable[[DecisionContext, Pod], Choice] | None = None,
                 stddev_factor: float = 2.0) -> None:
        self.prompt_tokens = prompt_tokens
        self.prefill_match = prefill_match  # pod key -> matched share of the prompt (0..1)
        self.observe_prefill = observe_prefill  # records the chosen prefill pod in the prefix index
        self.stddev_factor = stddev_factor
        self._profiles = ProfileCache()

    # -- buckets ---------------------------------------------------------------------------------
    def _routing_config(self, pod: Pod, entry: ModelEntry, profile_name: str | None) -> Mapping:
        text = pod.annotations.get(ANNOTATION_CONFIG) or entry.config_json
        profiles = self._profiles.get(pod.key, text)
        profile = (profiles.profiles.get(profile_name) if profile_name else None) or profiles.default()
        return profile.routing_config if profile is not None else {}

    @staticmethod
    def _fits(cfg: Mapping, n_tokens: int) -> bool:
        lo = cfg.get("promptLenBucketMinLength") or 0
        hi = cfg.get("promptLenBucketMaxLength") or 0
        return n_tokens >= lo and (hi <= 0 or n_tokens <= hi)

    # -- Planner ---------------------------------------------------------------------------------
    def plan(self, ctx: DecisionContext, entry: ModelEntry) -> Choice:
        request, load, rng, profile_name = ctx.request, ctx.load, ctx.rng, ctx.profile
        ready = entry.ready
        engines = {p.labels.get(LABEL_ENGINE, "vllm") for p in ready if p.role in (ROLE_PREFILL, ROLE_DECODE)}
        if len(engines) > 1:
            raise _no_pair(request.model, f"prefill/decode pods run different engines ({', '.join(sorted(engines))})")
        rolesets: dict[str, tuple[list[Pod], list[Pod]]] = {}
        combined: list[Pod] = []
        for pod in ready:
            if pod.role == ROLE_PREFILL:
                rolesets.setdefault(pod.roleset, ([], []))[0].append(pod)
            elif pod.role == ROLE_DECODE:
                rolesets.setdefault(pod.roleset, ([], []))[1].append(pod)
            else:
                combined.append(pod)
        complete = {rs: pair for rs, pair in rolesets.items() if pair[0] and pair[1]}
        if not complete:
            # No disaggregated pair at all: a combined pod (any other role) may serve alone.
            if combined:
                return self._combined(combined, load, ctx)
            raise _no_pair(request.model, "no roleset has a ready prefill and a ready decode pod, "
                                          "and there is no combined pod")
        configs = {p.key: self._routing_config(p, entry, profile_name)
                   for pair in complete.values() for p in (*pair[0], *pair[1])}
        if any("promptLenBucketMinLength" in c or "promptLenBucketMaxLength" in c for c in configs.values()):
            n = self.prompt_tokens(request.prompt)
            complete = {rs: pair for rs, pair in complete.items()
                        if all(self._fits(configs[p.key], n) for p in (*pair[0], *pair[1]))}
            if not complete:
                # Buckets are never crossed; outside every bucket only pods marked combined serve.
                marked = [p for p in combined if self._routing_config(p, entry, profile_name).get("combined")]
                if marked:
                    return self._combined(marked, load, ctx)
                raise _no_pair(request.model, f"no roleset's prompt-length bucket fits {n} prompt tokens and "
                                              "no pod is marked combined")
        all_prefill = [p for pair in complete.values() for p in pair[0]]
        matches = self.prefill_match(ctx, all_prefill) if self.prefill_match else {}
        prefill_counts = {p.key: load.inflight(PREFILL_LOAD_PREFIX + p.key) for p in all_prefill}
        guard = _guard_limit(list(prefill_counts.values()), self.stddev_factor)
        max_prefill = max(prefill_counts.values()) or 1
        engine_stats = ctx.stats.engine
        decode_scores = {p.key: _decode_score(p, load, engine_stats) for pair in complete.values() for p in pair[1]}
        max_decode = max(decode_scores.values()) or 1.0
        best: tuple[float, float, Pod, Pod] | None = None
        for prefills, decodes in complete.values():
            eligible = [p for p in prefills if prefill_counts[p.key] <= guard] or prefills

            def p_cost(p: Pod) -> float:
                return (1.0 - matches.get(p.key, 0.0)) + prefill_counts[p.key] / max_prefill

            prefill = min(eligible, key=lambda p: (p_cost(p), rng.random()))
            decode = min(decodes, key=lambda p: (decode_scores[p.key], rng.random()))
            score = p_cost(prefill) / 2 + decode_scores[decode.key] / max_decode
            tie = rng.random()
            if best is None or (score, tie) < (best[0], best[1]):
                best = (score, tie, decode, prefill)
        assert best is not None
        _, _, decode, prefill = best
        annotations = self.observe_prefill(ctx, prefill).annotations if self.observe_prefill is not None else {}
        # The decode pod receives the prefilled KV: nothing of the prompt is booked as its prefill work.
        return Choice(decode, prefill_tokens=0, annotations=annotations, prefill=prefill,
                      engine=prefill.labels.get(LABEL_ENGINE, "vllm"))

    @staticmethod
    def _combined(pods: list[Pod], load: LoadTracker, ctx: DecisionContext) -> Choice:
        rng = ctx.rng
        pod = min(pods, key=lambda p: (load.inflight(p.key), rng.random()))
        return Choice(pod, prefill_tokens=0, engine=pod.labels.get(LABEL_ENGINE, "vllm"))


def _decode_score(pod: Pod, load: LoadTracker, engine: Mapping[str, EngineStats]) -> float:
    """Lower is better: sequences on the pod (ours in flight, or what the engine reports when that
    is higher), inflated as its KV cache fills (a full cache means preemption and queueing)."""
    mine = load.inflight(pod.key)
    m = engine.get(pod.key)
    if m is None:
        return float(mine)
    busy = max(float(mine), m.running + m.waiting)
    return (busy + 1.0) / max(0.05, 1.0 - m.kv_usage)


def _guard_limit(counts: list[int], k: float) -> float:
    if len(counts) < 2:
        return float("inf")
    return statistics.fmean(counts) + k * statistics.pstdev(counts)
