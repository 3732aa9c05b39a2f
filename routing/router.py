"""The routing decision: model lookup, strategy precedence, pick, accounting.

The router owns the per-pod state every strategy reads (`stats`: in-flight load and the engines'
reported figures; `prefix_index`: what was sent where), sorts the registered strategies by
capability once, and books the chosen pod's load in the same synchronous step as the pick.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from routing.errors import RoutingError
from routing.load import LoadTracker
from routing.multi import combine, is_multi, normalise, parse_spec
from routing.pods import ModelEntry, Pod, PodSnapshot
from routing.request import RoutingRequest
from routing.stats import PodStats
from routing.strategies import (
    Choice,
    DecisionContext,
    Observer,
    Picker,
    Planner,
    Reporter,
    Scorer,
    Strategy,
    builtin_strategies,
)
from routing.strategies.prefix_cache import PrefixCacheSettings, new_kv_index, new_prefix_index
from routing.tokenizers import BYTES_PER_TOKEN

DEFAULT_STRATEGY = "random"
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class RoutingSettings:
    """Routing knobs, filled from the one configuration object (file, then env)."""

    default_strategy: str | None = None  # env ROUTING_ALGORITHM
    prefix_cache: PrefixCacheSettings = field(default_factory=PrefixCacheSettings)  # AIBRIX_PREFIX_CACHE_*


@dataclass(frozen=True, slots=True)
class ProfileChoice:
    """What a model config profile contributes to strategy precedence."""

    name: str | None = None
    routing_strategy: str | None = None
    locked_strategy: str | None = None


@dataclass(slots=True)
class Decision:
    """A routed request: which pod, chosen how. Released exactly once by `Router.release`."""

    pod: Pod
    model: str
    strategy: str
    profile: str | None = None
    echo: Mapping[str, str] = field(default_factory=dict)  # the strategy's annotations, for the response
    prefill: Pod | None = None  # a planner's prefill pod: the router sends the prefill call there first
    engine: str = "vllm"  # how that prefill call is made
    prefill_tokens: int = 0  # booked as the pod's in-flight prefill work until release
    released: bool = False


class Router:
    """Owns the pod snapshot, the strategies and the per-pod state of one router process."""

    def __init__(self, settings: RoutingSettings | None = None, *, rng: random.Random | None = None,
                 load: LoadTracker | None = None, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings or RoutingSettings()
        pc = self.settings.prefix_cache
        pc.validate()
        self.rng = rng or random.Random()
        self.load = load or LoadTracker(prefill_rate=pc.prefill_tokens_per_s)
        self.stats = PodStats(self.load, default_kv_tokens=pc.pod_kv_tokens, kv_blocks=new_kv_index(pc))
        self.prefix_index = new_prefix_index(pc)
        self.strategies: dict[str, Strategy] = builtin_strategies(prefix_cache=pc, index=self.prefix_index,
                                                                     clock=clock)
        self._pickers = {n: s for n, s in self.strategies.items() if isinstance(s, Picker)}
        self._planners = {n: s for n, s in self.strategies.items() if isinstance(s, Planner)}
        self._scorers = {n: s for n, s in self.strategies.items() if isinstance(s, Scorer)}
        self._observers = {n: s for n, s in self.strategies.items() if isinstance(s, Observer)}
        self.snapshot = PodSnapshot({})
        if self.settings.default_strategy and self.settings.default_strategy not in self.strategies:
            raise ValueError(f"ROUTING_ALGORITHM={self.settings.default_strategy!r} is not a known strategy; "
                             f"valid: {', '.join(self.strategy_names())}")

    def strategy_names(self) -> list[str]:
        return sorted(self.strategies)

    def reporters(self) -> list[Reporter]:
        """Strategies that report metrics of their own."""
        return [s for s in self.strategies.values() if isinstance(s, Reporter)]

    def update_snapshot(self, snapshot: PodSnapshot) -> None:
        self.snapshot = snapshot
        keep = {p.key for m in snapshot.models.values() for p in m.pods}
        ready = {p.key for m in snapshot.models.values() for p in m.ready}
        self.stats.retain(keep)
        # A pod failing its health checks is dying or restarting, and a restarted engine comes back
        # with an empty KV cache: routing there by its old prefixes would be routing to misses.
        self.prefix_index.retain_pods(ready)
        self.stats.kv_blocks.retain_pods(ready)  # the same for the engines' own block reports

    def flush_prefix_index(self) -> int:
        """Forget every prefix (the pods' caches were flushed); returns the entries dropped."""
        return self.prefix_index.clear()

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
            # Set only by InferencePool discovery (`serve --inference-pool`): the pool serves any name.
            entry = self.snapshot.default
        if entry is None:
            raise RoutingError(404, f"The model `{model}` does not exist.", code="model_not_found",
                               param="model", cause="no-model-backends", cause_value=model)
        return entry

    def decide(self, request: RoutingRequest, strategy_header: str | None = None,
               profile: ProfileChoice | None = None, headers: Mapping[str, str] | None = None, *,
               allowed: Collection[str] | None = None) -> Decision:
        """Pick a pod for `request` and count it in flight. `headers`: the request's routing headers
        (session affinity); `allowed`: addresses the data plane lets this request go to (the
        Inference Extension's subset hint), None for any. Raises RoutingError (404/400/503)."""
        entry = self.model_entry(request.model)
        if allowed is not None:
            entry = _restricted(entry, allowed)
        name, _ = self.resolve_strategy(strategy_header, profile)
        profile_name = profile.name if profile else None
        if name not in self.strategies:
            if is_multi(name):
                return self._decide_weighted(request, entry, name, profile_name, headers)
            raise RoutingError(400, f"incorrect routing strategy {name!r}; valid strategies: "
                               f"{', '.join(self.strategy_names())}", code="invalid_routing_strategy",
                               param="routing-strategy", cause="routing")
        ready = _ready(entry, request)
        ctx = DecisionContext(request, self.stats, self.rng, profile_name, headers or _NO_HEADERS)
        planner = self._planners.get(name)
        choice = planner.plan(ctx, entry) if planner is not None else self._pickers[name].pick(ctx, ready)
        return self._book(request, name, profile_name, choice)

    def _decide_weighted(self, request: RoutingRequest, entry: ModelEntry, spec: str,
                         profile_name: str | None, headers: Mapping[str, str] | None) -> Decision:
        """`name:weight,...`: every strategy scores every ready pod; the best weighted sum wins."""
        parts = parse_spec(spec, self.strategy_names(), solo=self._planners.keys())
        scorers: list[tuple[int, Scorer]] = []
        for part in parts:
            scorer = self._scorers.get(part.name)
            if scorer is None:
                raise RoutingError(400, f"routing strategy {part.name!r} cannot be combined with others",
                                   code="invalid_routing_strategy", param="routing-strategy", cause="routing")
            scorers.append((part.weight, scorer))
        ready = _ready(entry, request)
        ctx = DecisionContext(request, self.stats, self.rng, profile_name, headers or _NO_HEADERS)
        per_strategy = [(w, normalise(s.score(ctx, ready), s.higher_is_better)) for w, s in scorers]
        pod = ready[combine(per_strategy, self.rng)]
        prefill: int | None = None
        annotations: dict[str, str] = {}
        for part in parts:
            # Strategies with state (the prefix index) learn the combination's pick.
            observer = self._observers.get(part.name)
            if observer is not None:
                seen = observer.observe(ctx, pod)
                prefill = seen.prefill_tokens if prefill is None else prefill
                annotations.update(seen.annotations)
        canonical = ",".join(f"{p.name}:{p.weight}" for p in parts)
        return self._book(request, canonical, profile_name, Choice(pod, prefill, annotations))

    def _book(self, request: RoutingRequest, strategy: str, profile_name: str | None, choice: Choice) -> Decision:
        """Count the chosen pod in flight with the prefill work it was given, and say so."""
        prefill = choice.prefill_tokens
        if prefill is None:
            prefill = int(len(request.prompt) / BYTES_PER_TOKEN)
        self.load.acquire(choice.pod.key, prefill)
        return Decision(pod=choice.pod, model=request.model, strategy=strategy, profile=profile_name,
                        echo=choice.annotations, prefill=choice.prefill, engine=choice.engine,
                        prefill_tokens=prefill)

    def release(self, decision: Decision) -> None:
        """End a decision's accounting; safe to call more than once."""
        if not decision.released:
            decision.released = True
            self.load.release(decision.pod.key, decision.prefill_tokens)


def _restricted(entry: ModelEntry, allowed: Collection[str]) -> ModelEntry:
    """`entry` with only the ready pods whose address is in `allowed`; 503 when none is left."""
    ready = tuple(p for p in entry.ready if p.address in allowed)
    if not ready:
        raise RoutingError(503, f"none of the {len(allowed)} endpoints the gateway allows for this request is a "
                           f"ready pod of model `{entry.name}`", code="service_unavailable",
                           cause="no-eligible-endpoint")
    return replace(entry, ready=ready)


def _ready(entry: ModelEntry, request: RoutingRequest) -> tuple[Pod, ...]:
    if not entry.ready:
        raise RoutingError(503, f"no ready pod for model `{request.model}` "
                           f"({len(entry.pods)} known, 0 passing health checks)",
                           code="service_unavailable", cause="no-model-backends")
    return entry.ready
