"""The routing decision: model lookup, strategy precedence, pick, accounting."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from routing.errors import RoutingError
from routing.load import LoadTracker
from routing.multi import combine, is_multi, normalise, parse_spec
from routing.pods import ModelEntry, Pod, PodSnapshot
from routing.request import RoutingRequest
from routing.strategies import Strategy, builtin_strategies
from routing.strategies.prefix_cache import PrefixCacheSettings
from routing.tokenizers import BYTES_PER_TOKEN

DEFAULT_STRATEGY = "random"


@dataclass(frozen=True, slots=True)
class RoutingSettings:
    """Routing knobs, filled from the one configuration object (file, then env)."""

    default_strategy: str | None = None  # env ROUTING_ALGORITHM
    prefix_cache: PrefixCacheSettings = field(default_factory=PrefixCacheSettings)  # AIBRIX_PREFIX_CACHE_*


@runtime_checkable
class PodStateOwner(Protocol):
    """A strategy that keeps per-pod state (the prefix index) and must drop pods that are gone."""

    def retain_pods(self, keep: set[str], ready: set[str] | None = None) -> None: ...


@dataclass(frozen=True, slots=True)
class ProfileChoice:
    """What a model config profile contributes to strategy precedence (filled by the profiles issue)."""

    name: str | None = None
    routing_strategy: str | None = None
    locked_strategy: str | None = None


@dataclass(slots=True)
class Decision:
    """A routed request: which pod, chosen how. Released exactly once by `Router.release`."""

    pod: Pod
    model: str
    strategy: str
    strategy_source: str
    profile: str | None = None
    echo: dict[str, str] = field(default_factory=dict)  # strategy annotations for the response
    prefill: Pod | None = None  # pd: the pod the router sends the prefill call to
    engine: str = "vllm"  # pd: how the prefill call is made (vllm: sync with kv_transfer_params; sglang)
    prefill_tokens: int = 0  # booked as the pod's in-flight prefill work until release
    released: bool = False


class Router:
    """Owns the pod snapshot, the strategies and the in-flight counts of one router process."""

    def __init__(self, settings: RoutingSettings | None = None, *,
                 strategies: dict[str, Strategy] | None = None, rng: random.Random | None = None,
                 load: LoadTracker | None = None) -> None:
        self.settings = settings or RoutingSettings()
        self.strategies = (strategies if strategies is not None
                           else builtin_strategies(prefix_cache=self.settings.prefix_cache))
        self.rng = rng or random.Random()
        self.load = load or LoadTracker(prefill_rate=self.settings.prefix_cache.prefill_tokens_per_s)
        self.snapshot = PodSnapshot({})
        if self.settings.default_strategy and self.settings.default_strategy not in self.strategies:
            raise ValueError(f"ROUTING_ALGORITHM={self.settings.default_strategy!r} is not a known strategy; "
                             f"valid: {', '.join(self.strategy_names())}")

    def strategy_names(self) -> list[str]:
        return sorted(self.strategies)

    def update_snapshot(self, snapshot: PodSnapshot) -> None:
        self.snapshot = snapshot
        keep = {p.key for m in snapshot.models.values() for p in m.pods}
        ready = {p.key for m in snapshot.models.values() for p in m.ready}
        self.load.forget(keep)
        for strategy in self.strategies.values():
            if isinstance(strategy, PodStateOwner):
                strategy.retain_pods(keep, ready)

    def resolve_strategy(self, header: str | None, profile: ProfileChoice | None = None) -> tuple[str, str]:
        """Strategy name and where it came from, by the reference's precedence:
        profile lock > `routing-strategy` header > profile strategy > ROUTING_ALGORITHM > random."""
        if profile is not None and profile.locked_strategy:
            return profile.locked_strategy, "profile-lock"
        if header:
            return header, "header"
        if profile is not None and profile.routing_strategy:
            return profile.routing_strategy, "profile"
        if self.settings.default_strategy:
            return self.settings.default_strategy, "env"
        return DEFAULT_STRATEGY, "default"

    def model_entry(self, model: str) -> ModelEntry:
        entry = self.snapshot.model(model)
        if entry is None:
            raise RoutingError(404, f"The model `{model}` does not exist.", code="model_not_found",
                               param="model", cause="no-model-backends", cause_value=model)
        return entry

    def decide(self, request: RoutingRequest, strategy_header: str | None = None,
               profile: ProfileChoice | None = None) -> Decision:
        """Pick a pod for `request` and count it in flight. Raises RoutingError (404/400/503)."""
        entry = self.model_entry(request.model)
        name, source = self.resolve_strategy(strategy_header, profile)
        strategy = self.strategies.get(name)
        if strategy is None and is_multi(name):
            return self._decide_weighted(request, entry, name, source, profile)
        if strategy is None:
            raise RoutingError(400, f"incorrect routing strategy {name!r}; valid strategies: "
                               f"{', '.join(self.strategy_names())}", code="invalid_routing_strategy",
                               param="routing-strategy", cause="routing")
        ready = entry.ready
        if not ready:
            raise RoutingError(503, f"no ready pod for model `{request.model}` "
                               f"({len(entry.pods)} known, 0 passing health checks)",
                               code="service_unavailable", cause="no-model-backends")
        plan_step = getattr(strategy, "plan", None)
        if plan_step is not None:
            plan = plan_step(request, entry, self.load, self.rng, profile.name if profile else None)
            self.load.acquire(plan.decode.key)
            return Decision(pod=plan.decode, model=request.model, strategy=name, strategy_source=source,
                            profile=profile.name if profile else None, echo=request.annotations,
                            prefill=plan.prefill, engine=plan.engine)
        pod = strategy.pick(request, ready, self.load, self.rng)
        prefill = _prefill_tokens(request)
        self.load.acquire(pod.key, prefill)
        return Decision(pod=pod, model=request.model, strategy=name, strategy_source=source,
                        profile=profile.name if profile else None, echo=request.annotations,
                        prefill_tokens=prefill)

    def _decide_weighted(self, request: RoutingRequest, entry: ModelEntry, spec: str, source: str,
                         profile: ProfileChoice | None) -> Decision:
        """`name:weight,...`: every strategy scores every ready pod; the best weighted sum wins."""
        parts = parse_spec(spec, self.strategy_names())
        scorers = []
        for part in parts:
            strategy = self.strategies[part.name]
            if not hasattr(strategy, "score"):
                raise RoutingError(400, f"routing strategy {part.name!r} cannot be combined with others",
                                   code="invalid_routing_strategy", param="routing-strategy", cause="routing")
            scorers.append((part.weight, strategy))
        ready = entry.ready
        if not ready:
            raise RoutingError(503, f"no ready pod for model `{request.model}` "
                               f"({len(entry.pods)} known, 0 passing health checks)",
                               code="service_unavailable", cause="no-model-backends")
        per_strategy = [(w, normalise(s.score(request, ready, self.load, self.rng), s.higher_is_better))
                        for w, s in scorers]
        pod = ready[combine(per_strategy, self.rng)]
        for _, s in scorers:
            # Strategies with state (the prefix index) learn the combination's pick.
            observe = getattr(s, "observe", None)
            if observe is not None:
                observe(request, pod)
        prefill = _prefill_tokens(request)
        self.load.acquire(pod.key, prefill)
        canonical = ",".join(f"{p.name}:{p.weight}" for p in parts)
        return Decision(pod=pod, model=request.model, strategy=canonical, strategy_source=source,
                        profile=profile.name if profile else None, echo=request.annotations,
                        prefill_tokens=prefill)

    def release(self, decision: Decision) -> None:
        """End a decision's accounting; safe to call more than once."""
        if not decision.released:
            decision.released = True
            self.load.release(decision.pod.key, decision.prefill_tokens)


def _prefill_tokens(request: RoutingRequest) -> int:
    """Prefill work to book for `request`: a cache-aware strategy's estimate, else the whole prompt."""
    if request.prefill_tokens is not None:
        return request.prefill_tokens
    return int(len(request.prompt) / BYTES_PER_TOKEN)
