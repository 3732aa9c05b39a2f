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

import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from routing.errors import RoutingError
from routing.load import LoadTracker
from routing.pods import ANNOTATION_CONFIG, ModelEntry, Pod
from routing.profiles import ProfileCache
from routing.request import RoutingRequest

ROLE_PREFILL = "prefill"
ROLE_DECODE = "decode"
LABEL_ENGINE = "model.aibrix.ai/engine"
LABEL_SGLANG_BOOTSTRAP_PORT = "model.aibrix.ai/sglang-bootstrap-port"
PREFILL_LOAD_PREFIX = "prefill:"  # LoadTracker key namespace for prefill calls in flight


@dataclass(frozen=True, slots=True)
class PodLoad:
    """What the engine reports about a pod (scraped), as the strategy needs it."""

    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0


@dataclass(frozen=True, slots=True)
class PDPlan:
    """Where one request goes: `prefill` is None when a combined pod serves it alone."""

    decode: Pod
    prefill: Pod | None
    engine: str = "vllm"
    roleset: str = ""
    prefill_match: float = 0.0



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
    name = "pd"

    def __init__(self, prompt_tokens: Callable[[str], int],
                 prefill_match: Callable[[RoutingRequest, Sequence[Pod]], Mapping[str, float]] | None = None,
                 observe_prefill: Callable[[RoutingRequest, Pod], None] | None = None,
                 stddev_factor: float = 2.0) -> None:
        self.prompt_tokens = prompt_tokens
        self.prefill_match = prefill_match  # pod key -> matched share of the prompt (0..1)
        self.observe_prefill = observe_prefill  # records the chosen prefill pod in the prefix index
        self.stddev_factor = stddev_factor
        self.pod_loads: Mapping[str, PodLoad] = {}
        self._profiles = ProfileCache()

    def pick(self, request: RoutingRequest, pods: Sequence[Pod], load: LoadTracker, rng: random.Random) -> Pod:
        raise RoutingError(400, "pd needs the router's plan step", code="invalid_routing_strategy", cause="routing")

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

    # -- the plan --------------------------------------------------------------------------------
    def plan(self, request: RoutingRequest, entry: ModelEntry, load: LoadTracker, rng: random.Random,
             profile_name: str | None = None) -> PDPlan:
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
                return self._combined(combined, load, rng)
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
                    return self._combined(marked, load, rng)
                raise _no_pair(request.model, f"no roleset's prompt-length bucket fits {n} prompt tokens and "
                                              "no pod is marked combined")
        all_prefill = [p for pair in complete.values() for p in pair[0]]
        matches = self.prefill_match(request, all_prefill) if self.prefill_match else {}
        prefill_counts = {p.key: load.inflight(PREFILL_LOAD_PREFIX + p.key) for p in all_prefill}
        guard = _guard_limit(list(prefill_counts.values()), self.stddev_factor)
        max_prefill = max(prefill_counts.values()) or 1
        decode_scores = {p.key: self._decode_score(p, load) for pair in complete.values() for p in pair[1]}
        max_decode = max(decode_scores.values()) or 1.0
        best: tuple[float, float, PDPlan] | None = None
        for rs, (prefills, decodes) in complete.items():
            eligible = [p for p in prefills if prefill_counts[p.key] <= guard] or prefills
            def p_cost(p: Pod) -> float:
                return (1.0 - matches.get(p.key, 0.0)) + prefill_counts[p.key] / max_prefill

            prefill = min(eligible, key=lambda p: (p_cost(p), rng.random()))
            decode = min(decodes, key=lambda p: (decode_scores[p.key], rng.random()))
            p_score = p_cost(prefill)
            score = p_score / 2 + decode_scores[decode.key] / max_decode
            plan = PDPlan(decode=decode, prefill=prefill, engine=prefill.labels.get(LABEL_ENGINE, "vllm"),
                          roleset=rs, prefill_match=matches.get(prefill.key, 0.0))
            tie = rng.random()
            if best is None or (score, tie) < (best[0], best[1]):
                best = (score, tie, plan)
        assert best is not None
        chosen = best[2]
        if self.observe_prefill is not None and chosen.prefill is not None:
            self.observe_prefill(request, chosen.prefill)
        return chosen

    @staticmethod
    def _combined(pods: list[Pod], load: LoadTracker, rng: random.Random) -> PDPlan:
        pod = min(pods, key=lambda p: (load.inflight(p.key), rng.random()))
        return PDPlan(decode=pod, prefill=None, engine=pod.labels.get(LABEL_ENGINE, "vllm"))

    def _decode_score(self, pod: Pod, load: LoadTracker) -> float:
        """Lower is better: sequences on the pod (ours in flight, or what the engine reports when that
        is higher), inflated as its KV cache fills (a full cache means preemption and queueing)."""
        mine = load.inflight(pod.key)
        m = self.pod_loads.get(pod.key)
        if m is None:
            return float(mine)
        busy = max(float(mine), m.running + m.waiting)
        return (busy + 1.0) / max(0.05, 1.0 - m.kv_usage)


def _guard_limit(counts: list[int], k: float) -> float:
    if len(counts) < 2:
        return float("inf")
    return statistics.fmean(counts) + k * statistics.pstdev(counts)
