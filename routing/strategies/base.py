"""The strategy contract: what a strategy can do, as small protocols, and the values it exchanges
with the router.

A strategy implements one or more capabilities:

* `Picker`   - picks one pod among ready candidates (`random`, `least-request`, `prefix-cache`);
* `Scorer`   - scores every candidate, so it can be mixed with others by weight
               (`least-request:2,prefix-cache:1`);
* `Observer` - learns the pod a weighted combination picked (a scorer that keeps state);
* `Planner`  - plans a whole request over the model's pods, possibly with a prefill pod (`pd`);
               a planner is used alone, never mixed.

Every call gets a `DecisionContext`: the request and its routing headers, this router's load and the
engines' stats, the random source, and a scratch dict that lives exactly as long as the decision (a scorer's work
reused by its `observe`). Strategies return values (`Choice`) and never write into the request.
All of it is synchronous and does no I/O: a decision is a pure function of its inputs.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol, runtime_checkable

from routing.load import LoadTracker
from routing.pods import ModelEntry, Pod, PodSnapshot
from routing.report import MetricFamily
from routing.request import RoutingRequest
from routing.stats import PodStats

_NO_ANNOTATIONS: Mapping[str, str] = MappingProxyType({})
_NO_HEADERS: Mapping[str, str] = _NO_ANNOTATIONS


@dataclass(slots=True)
class DecisionContext:
    """One routing decision's inputs, plus scratch state private to it (keyed by strategy name)."""

    request: RoutingRequest
    stats: PodStats
    rng: random.Random
    profile: str | None = None  # the config profile that applies, if any (pd's prompt buckets)
    # The request's routing headers (lower-case names; session-affinity's x-session-id and key).
    headers: Mapping[str, str] = field(default_factory=lambda: _NO_HEADERS)
    scratch: dict[str, Any] = field(default_factory=dict)

    @property
    def load(self) -> LoadTracker:
        return self.stats.load


class Choice(NamedTuple):
    """What a strategy decided for one request (a tuple: cheap to make on every decision)."""

    pod: Pod
    # Uncached prompt tokens the pod must prefill, when a cache-aware strategy estimated it; the
    # router books them as the pod's in-flight prefill work (None: the whole prompt).
    prefill_tokens: int | None = None
    # What the client should see about the decision (e.g. the prefix match), echoed as response
    # headers when the name is one Envoy's route echoes (envoyconfig RESPONSE_ECHO_HEADERS).
    annotations: Mapping[str, str] = _NO_ANNOTATIONS
    prefill: Pod | None = None  # planners: the pod the router sends the prefill call to first
    engine: str = "vllm"  # planners: how the prefill call is made (a name in ext_proc's prefill styles)


@runtime_checkable
class Picker(Protocol):
    name: str

    def pick(self, ctx: DecisionContext, pods: Sequence[Pod]) -> Choice:
        """One of `pods` (never empty) for `ctx.request`."""
        ...


@runtime_checkable
class Scorer(Protocol):
    name: str
    higher_is_better: bool

    def score(self, ctx: DecisionContext, pods: Sequence[Pod]) -> list[float]:
        """One raw score per pod, in the order of `pods`."""
        ...


@runtime_checkable
class Observer(Protocol):
    def observe(self, ctx: DecisionContext, pod: Pod) -> Choice:
        """`pod` was picked for `ctx.request` by a combination this strategy scored in: learn it,
        and say what the strategy would have reported (prefill tokens, annotations)."""
        ...


@runtime_checkable
class Planner(Protocol):
    name: str

    def plan(self, ctx: DecisionContext, entry: ModelEntry) -> Choice:
        """The whole routing of `ctx.request` among `entry`'s ready pods (never empty)."""
        ...


@runtime_checkable
class Reporter(Protocol):
    def report(self, snapshot: PodSnapshot, stats: PodStats) -> Iterable[MetricFamily]:
        """Metric families, read at scrape time (the request path only bumps plain counters)."""
        ...
