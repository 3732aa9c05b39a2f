"""`session-affinity`: keep a conversation on the pod that served it (reference §10).

The pod travels with the client, not in the router: every response carries `x-session-id`, the
base64 of the serving pod's `ip:port`, and a request that sends it back goes to that pod while it is
ready. Stateless, so it holds across router replicas and restarts (the reference's later in-memory
UUID map did not: its issue #1751 discussion). When that pod is gone, `x-aibrix-session-key` (at most
256 characters) is rendezvous-hashed over the ready pods (FNV-1a 64 of key, 0x00, address; highest
wins), so every replica sends the session to the same new pod and only sessions of the lost pod move.
With neither header: least-request, not the reference's random (a new session should land where
there is room; the header then keeps it there).

The reference's own issue #2122: its header whitelist dropped `x-session-id`, so every request was a
new session; here the ext_proc service reads both headers (tests assert stickiness through Envoy).
A client can only name a pod the router would route this model to anyway: an address that is not a
ready pod of the requested model is ignored.

As a scorer (`session-affinity:10,prefix-cache:1`) the session's pod scores 1 and every other pod 0;
without a session every pod scores the same, leaving the decision to the rest of the mix.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

from routing.pods import Pod
from routing.strategies.base import Choice, DecisionContext
from routing.strategies.least_request import LeastRequestStrategy

SESSION_ID_HEADER = "x-session-id"
SESSION_KEY_HEADER = "x-aibrix-session-key"
MAX_SESSION_KEY = 256
MAX_SESSION_ID = 512  # base64 of the longest ip:port is far shorter; longer is not ours

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK = 0xFFFFFFFFFFFFFFFF


def encode_session(pod: Pod) -> str:
    """The `x-session-id` value that leads back to `pod`."""
    return base64.b64encode(pod.address.encode()).decode()


def decode_session(value: str) -> str | None:
    """The `ip:port` an `x-session-id` names, or None if it is not one of ours."""
    if not value or len(value) > MAX_SESSION_ID:
        return None
    try:
        return base64.b64decode(value.strip(), validate=True).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def fnv1a64(data: bytes) -> int:
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & _MASK
    return h


def rendezvous(key: str, pods: Sequence[Pod]) -> Pod:
    """The pod with the highest FNV-1a 64 of key, 0x00, address (ties: the first)."""
    prefix = key.encode() + b"\x00"
    return max(pods, key=lambda p: fnv1a64(prefix + p.address.encode()))


class SessionAffinityStrategy:
    name = "session-affinity"
    higher_is_better = True

    def __init__(self) -> None:
        self._fallback = LeastRequestStrategy()

    def _session_pod(self, ctx: DecisionContext, pods: Sequence[Pod]) -> Pod | None:
        address = decode_session(ctx.headers.get(SESSION_ID_HEADER, ""))
        if address is not None:
            for pod in pods:
                if pod.address == address:
                    return pod
        key = ctx.headers.get(SESSION_KEY_HEADER, "")[:MAX_SESSION_KEY]
        if key:
            return rendezvous(key, pods)
        return None

    def pick(self, ctx: DecisionContext, pods: Sequence[Pod]) -> Choice:
        pod = self._session_pod(ctx, pods) or self._fallback.pick(ctx, pods).pod
        return Choice(pod, annotations={SESSION_ID_HEADER: encode_session(pod)})

    def score(self, ctx: DecisionContext, pods: Sequence[Pod]) -> list[float]:
        pod = self._session_pod(ctx, pods)
        return [1.0 if p is pod else 0.0 for p in pods]

    def observe(self, ctx: DecisionContext, pod: Pod) -> Choice:
        """A mix picked `pod`: the response still re-issues the session for it."""
        return Choice(pod, annotations={SESSION_ID_HEADER: encode_session(pod)})
