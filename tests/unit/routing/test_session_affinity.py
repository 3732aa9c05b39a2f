"""`session-affinity` through the router: the session pod, the rendezvous fallback, mixes, hostile ids."""

from __future__ import annotations

import base64
import random

import orjson
import pytest

from routing.pods import Pod, PodSnapshot
from routing.request import CHAT_PATH, parse_body
from routing.router import Router
from routing.strategies.session_affinity import (
    SESSION_ID_HEADER,
    SESSION_KEY_HEADER,
    decode_session,
    encode_session,
    fnv1a64,
    rendezvous,
)

REQUEST = parse_body(CHAT_PATH, orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))


def router_with(n: int = 4, ready: int | None = None, seed: int = 3) -> tuple[Router, list[Pod]]:
    router = Router(rng=random.Random(seed))
    pods = [Pod(f"p{i}", f"10.0.0.{i + 1}:8000", "m") for i in range(n)]
    up = pods[: ready if ready is not None else n]
    router.update_snapshot(PodSnapshot.build(pods, {p.key for p in up}, {"m": None}))
    return router, pods


def route(router: Router, headers: dict[str, str], strategy: str = "session-affinity") -> tuple[str, str]:
    d = router.decide(REQUEST, strategy, headers=headers)
    router.release(d)
    return d.pod.name, d.echo[SESSION_ID_HEADER]


def test_fnv1a64_known_values() -> None:
    # Published FNV-1a 64-bit test vectors.
    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a64(b"foobar") == 0x85944171F73967E8


def test_the_session_id_brings_the_request_back_and_is_reissued() -> None:
    router, pods = router_with()
    first, sid = route(router, {})
    assert decode_session(sid) == next(p.address for p in pods if p.name == first)
    for _ in range(20):
        router.load.acquire(f"default/{first}")  # the session pod gets busy: affinity still wins
        assert route(router, {SESSION_ID_HEADER: sid}) == (first, sid)


def test_a_gone_pod_rehashes_by_session_key_the_same_way_everywhere() -> None:
    router, pods = router_with()
    sid = encode_session(pods[0])
    key = "conversation-42"
    expected = rendezvous(key, pods[1:]).name
    router.update_snapshot(PodSnapshot.build(pods, {p.key for p in pods[1:]}, {"m": None}))  # p0 went unready
    other, _ = router_with(seed=99)
    other.update_snapshot(PodSnapshot.build(pods, {p.key for p in pods[1:]}, {"m": None}))
    for r in (router, other):  # another replica, another rng: the same pod
        name, new_sid = route(r, {SESSION_ID_HEADER: sid, SESSION_KEY_HEADER: key})
        assert name == expected and decode_session(new_sid) == next(p.address for p in pods if p.name == expected)
    # Only the lost pod's sessions move: keys that hashed elsewhere keep their pod.
    keys = [f"k{i}" for i in range(200)]
    before = {k: rendezvous(k, pods).name for k in keys}
    after = {k: rendezvous(k, pods[1:]).name for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != "p0")


def test_without_a_session_the_least_loaded_pod_starts_one() -> None:
    router, pods = router_with(n=3)
    for p in pods[:2]:
        router.load.acquire(p.key)
    assert route(router, {})[0] == "p2"


@pytest.mark.parametrize("value", ["", "!!!", "a" * 2000, base64.b64encode(b"6.6.6.6:1").decode(),
                                   base64.b64encode(b"\xff\xfe").decode(), "MTAuMC4wLjE6ODAwMA"])
def test_a_session_id_that_is_not_a_ready_pod_is_ignored(value: str) -> None:
    router, _ = router_with(n=2, seed=1)
    name, sid = route(router, {SESSION_ID_HEADER: value})
    assert name in ("p0", "p1") and decode_session(sid) is not None


def test_in_a_weighted_mix_the_session_pod_wins_and_the_header_is_reissued() -> None:
    router, pods = router_with()
    sid = encode_session(pods[2])
    name, new_sid = route(router, {SESSION_ID_HEADER: sid}, "session-affinity:10,least-request:1")
    assert name == "p2" and new_sid == sid
    d = router.decide(REQUEST, "session-affinity:10,prefix-cache:1", headers={SESSION_ID_HEADER: sid})
    assert d.pod.name == "p2" and d.echo[SESSION_ID_HEADER] == sid and "x-prefix-cache-match" in d.echo
    router.release(d)
