"""Model config profiles: the `model.aibrix.ai/config` JSON of a model's pods.

    {"lockedRoutingStrategy": "...",            # optional: overrides every request's header
     "defaultProfile": "default",
     "profiles": {"default": {"routingStrategy": "random", "requestsPerSecond": 50,
                              "routingConfig": {"promptTokensGte": 0, "promptTokensLt": 2048, ...}}}}

A profile is picked per request by the `config-profile` header: an exact (trimmed) name, `auto`
(the profile whose hints fit the request best), or absent/unknown (the default profile).
An invalid JSON never breaks routing: the model serves with defaults and the error is reported.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

AUTO = "auto"
_HINT_KEYS = ("promptTokensGte", "promptTokensLt", "maxTokensGte", "maxTokensLt")


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    routing_strategy: str | None = None
    requests_per_second: float | None = None
    routing_config: Mapping[str, Any] = field(default_factory=dict)

    def hints(self) -> dict[str, int]:
        return {k: self.routing_config[k] for k in _HINT_KEYS if k in self.routing_config}

    def fits(self, prompt_tokens: int, max_tokens: int | None) -> bool:
        """All hints hold (Gte inclusive, Lt exclusive); a max-tokens hint needs max_tokens."""
        h = self.hints()
        if "promptTokensGte" in h and prompt_tokens < h["promptTokensGte"]:
            return False
        if "promptTokensLt" in h and prompt_tokens >= h["promptTokensLt"]:
            return False
        if "maxTokensGte" in h and (max_tokens is None or max_tokens < h["maxTokensGte"]):
            return False
        return not ("maxTokensLt" in h and (max_tokens is None or max_tokens >= h["maxTokensLt"]))


@dataclass(frozen=True, slots=True)
class ModelProfiles:
    """The parsed annotation. `error` is set when the JSON was unusable (then there are no profiles)."""

    profiles: Mapping[str, Profile] = field(default_factory=dict)
    default_profile: str | None = None
    locked_strategy: str | None = None
    error: str | None = None

    def default(self) -> Profile | None:
        if self.default_profile and self.default_profile in self.profiles:
            return self.profiles[self.default_profile]
        return self.profiles.get("default")

    def select(self, header: str | None, prompt_tokens: Callable[[], int],
               max_tokens: int | None) -> Profile | None:
        """The profile for one request; `prompt_tokens` is only called for `auto`."""
        name = (header or "").strip()
        if name and name != AUTO and name in self.profiles:
            return self.profiles[name]
        if name == AUTO and self.profiles:
            best = self._auto(prompt_tokens(), max_tokens)
            if best is not None:
                return best
        return self.default()

    def _auto(self, prompt_tokens: int, max_tokens: int | None) -> Profile | None:
        # Tie-breaks as the reference: most hints, larger Gte, smaller Lt, then name order.
        def rank(p: Profile) -> tuple:
            h = p.hints()
            gte = h.get("promptTokensGte", 0) + h.get("maxTokensGte", 0)
            lt = h.get("promptTokensLt", 2**31) + h.get("maxTokensLt", 2**31)
            return (-len(h), -gte, lt, p.name)

        fitting = [p for p in self.profiles.values() if p.hints() and p.fits(prompt_tokens, max_tokens)]
        return min(fitting, key=rank) if fitting else None


def _check_int(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where} must be a non-negative integer")
    return value


def parse_profiles(text: str | None) -> ModelProfiles:
    """Parse the annotation; never raises (errors are returned in `.error`)."""
    if not text:
        return ModelProfiles()
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict):
            raise ValueError("top level must be a JSON object")
        locked = doc.get("lockedRoutingStrategy") or None
        if locked is not None and not isinstance(locked, str):
            raise ValueError("lockedRoutingStrategy must be a string")
        default = doc.get("defaultProfile") or None
        if default is not None and not isinstance(default, str):
            raise ValueError("defaultProfile must be a string")
        raw = doc.get("profiles")
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ValueError("profiles must be an object of name -> profile")
        profiles: dict[str, Profile] = {}
        for name, spec in raw.items():
            if not isinstance(spec, dict):
                raise ValueError(f"profiles.{name} must be an object")
            strategy = spec.get("routingStrategy") or None
            if strategy is not None and not isinstance(strategy, str):
                raise ValueError(f"profiles.{name}.routingStrategy must be a string")
            rps = spec.get("requestsPerSecond")
            if rps is not None and (isinstance(rps, bool) or not isinstance(rps, int | float) or rps < 0):
                raise ValueError(f"profiles.{name}.requestsPerSecond must be a non-negative number")
            cfg = spec.get("routingConfig") or {}
            if not isinstance(cfg, dict):
                raise ValueError(f"profiles.{name}.routingConfig must be an object")
            for key in _HINT_KEYS:
                if key in cfg:
                    _check_int(f"profiles.{name}.routingConfig.{key}", cfg[key])
            profiles[name] = Profile(name=name, routing_strategy=strategy,
                                     requests_per_second=float(rps) if rps else None, routing_config=cfg)
        if default is not None and default not in profiles:
            raise ValueError(f"defaultProfile {default!r} is not among the profiles ({', '.join(profiles) or 'none'})")
        return ModelProfiles(profiles=profiles, default_profile=default, locked_strategy=locked)
    except (ValueError, TypeError) as exc:
        return ModelProfiles(error=f"invalid model.aibrix.ai/config: {exc}")


class ProfileCache:
    """Parses each model's annotation once per distinct text (snapshots are rebuilt often)."""

    def __init__(self, on_error: Callable[[str, str], None] | None = None) -> None:
        self._cache: dict[str, tuple[str | None, ModelProfiles]] = {}
        self._on_error = on_error

    def get(self, model: str, text: str | None) -> ModelProfiles:
        hit = self._cache.get(model)
        if hit is not None and hit[0] == text:
            return hit[1]
        parsed = parse_profiles(text)
        self._cache[model] = (text, parsed)
        if parsed.error and self._on_error:
            self._on_error(model, parsed.error)
        return parsed
