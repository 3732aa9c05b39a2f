"""Token usage read from a response body as it streams by (SSE or one JSON document)."""

from __future__ import annotations

import orjson

_MAX_JSON_BODY = 8 * 1024 * 1024


def _total(doc: object) -> int | None:
    if not isinstance(doc, dict):
        return None
    usage = doc.get("usage")
    if not isinstance(usage, dict):
        resp = doc.get("response")  # the Responses API nests it
        usage = resp.get("usage") if isinstance(resp, dict) else None
    if not isinstance(usage, dict):
        return None
    total = usage.get("total_tokens")
    if isinstance(total, int) and not isinstance(total, bool) and total > 0:
        return total
    parts = [usage.get(k) for k in ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens")]
    n = sum(p for p in parts if isinstance(p, int) and not isinstance(p, bool))
    return n or None


class UsageScanner:
    """Feed response body chunks; `total_tokens` holds the last usage seen.

    SSE lines are scanned as they complete (only lines mentioning "usage" are parsed); a plain JSON
    body is kept (bounded) and parsed at the end.
    """

    __slots__ = ("_buf", "_sse", "total_tokens")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._sse: bool | None = None
        self.total_tokens: int | None = None

    def feed(self, chunk: bytes, end: bool = False) -> None:
        if self._sse is None and chunk:
            self._sse = chunk.lstrip()[:5] in (b"data:", b"event", b":")
        self._buf += chunk
        if self._sse:
            *lines, rest = self._buf.split(b"\n")
            self._buf = bytearray(rest)
            if end and rest:
                lines.append(bytes(rest))
            for line in lines:
                if line.startswith(b"data:") and b'"usage"' in line:
                    try:
                        total = _total(orjson.loads(line[5:]))
                    except orjson.JSONDecodeError:
                        continue
                    if total:
                        self.total_tokens = total
        elif len(self._buf) > _MAX_JSON_BODY:
            self._buf = bytearray()  # too large to be a completion we can account; give up on it
            self._sse = False
        if end and not self._sse and self._buf:
            try:
                total = _total(orjson.loads(self._buf))
            except orjson.JSONDecodeError:
                total = None
            if total:
                self.total_tokens = total
            self._buf = bytearray()
