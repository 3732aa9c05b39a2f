"""Model config profiles (routing/profiles.py): parsing, selection by header / auto, invalid JSON."""

from __future__ import annotations

import json

import pytest

from routing.profiles import ProfileCache, parse_profiles

PROFILES = {
    "defaultProfile": "default",
    "profiles": {
        "default": {"routingStrategy": "random"},
        "low-latency": {"routingStrategy": "least-request", "requestsPerSecond": 5},
        "short": {"routingStrategy": "least-request", "routingConfig": {"promptTokensLt": 100}},
        "long": {"routingStrategy": "random", "routingConfig": {"promptTokensGte": 100}},
        "long-gen": {"routingStrategy": "random",
                     "routingConfig": {"promptTokensGte": 100, "maxTokensGte": 500}},
    },
}


def test_profile_selection_header_default_unknown_auto() -> None:
    mp = parse_profiles(json.dumps(PROFILES))
    assert mp.error is None
    assert mp.select("low-latency", lambda: 0, None).name == "low-latency"
    assert mp.select("  low-latency ", lambda: 0, None).name == "low-latency"  # trimmed
    assert mp.select(None, lambda: 0, None).name == "default"
    assert mp.select("nope", lambda: 0, None).name == "default"
    assert mp.select("auto", lambda: 10, None).name == "short"
    assert mp.select("auto", lambda: 1000, 100).name == "long"
    # Both "long" and "long-gen" fit; the one with more hints wins.
    assert mp.select("auto", lambda: 1000, 600).name == "long-gen"
    calls = []
    mp.select("low-latency", lambda: calls.append(1) or 0, None)
    assert calls == []  # prompt tokens are only counted for auto


def test_auto_without_fit_falls_back_to_default() -> None:
    mp = parse_profiles(json.dumps({"profiles": {"default": {"routingStrategy": "random"},
                                                 "x": {"routingConfig": {"maxTokensLt": 5}}}}))
    assert mp.select("auto", lambda: 10, 50).name == "default"


@pytest.mark.parametrize("text", ["{not json", "[]", '{"profiles": []}', '{"profiles": {"a": {"routingStrategy": 3}}}',
                                  '{"defaultProfile": "missing", "profiles": {"a": {}}}',
                                  '{"profiles": {"a": {"routingConfig": {"promptTokensLt": -1}}}}'])
def test_invalid_profile_json_is_reported_not_raised(text: str) -> None:
    errors: list[tuple[str, str]] = []
    cache = ProfileCache(lambda m, e: errors.append((m, e)))
    mp = cache.get("m", text)
    assert mp.error and not mp.profiles and mp.select("x", lambda: 0, None) is None
    cache.get("m", text)
    assert len(errors) == 1  # reported once per distinct text, not per request
