"""Access policy from the gateway file and env: API keys and per-user rate limits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from extproc_router.config import ConfigError
from extproc_router.ratelimit.limits import UserLimits

ENV_API_KEY = "AIBRIX_AUTH_BEARER_TOKEN"


def _limit(where: str, value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: expected a non-negative integer (0 = unlimited), got {value!r}")
    return value


def parse_users(users: Mapping[str, Any]) -> tuple[dict[str, UserLimits], UserLimits | None]:
    """`users: {alice: {rpm: 60, tpm: 100000}, "*": {rpm: 10}}`; "*" applies to unlisted users."""
    out: dict[str, UserLimits] = {}
    default = None
    for name, spec in users.items():
        where = f"users.{name}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a mapping with rpm and/or tpm")
        unknown = set(spec) - {"rpm", "tpm"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: rpm, tpm")
        limits = UserLimits(rpm=_limit(f"{where}.rpm", spec.get("rpm")), tpm=_limit(f"{where}.tpm", spec.get("tpm")))
        if name == "*":
            default = limits
        else:
            out[str(name)] = limits
    return out, default


def parse_api_keys(auth: Mapping[str, Any], env: Mapping[str, str]) -> frozenset[str]:
    """Keys from `auth: {api_keys: [...]}` plus AIBRIX_AUTH_BEARER_TOKEN (comma-separated allowed)."""
    unknown = set(auth) - {"api_keys"}
    if unknown:
        raise ConfigError(f"auth: unknown key(s) {sorted(unknown)}; allowed: api_keys")
    keys = auth.get("api_keys") or []
    if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
        raise ConfigError("auth.api_keys: expected a list of non-empty strings")
    env_keys = [k.strip() for k in env.get(ENV_API_KEY, "").split(",") if k.strip()]
    return frozenset([*keys, *env_keys])
