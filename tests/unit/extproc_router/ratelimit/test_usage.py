"""Token usage read from responses (extproc_router/ratelimit/usage.py)."""

from __future__ import annotations

from extproc_router.ratelimit.usage import UsageScanner


def test_usage_scanner_sse_and_json() -> None:
    s = UsageScanner()
    s.feed(b'data: {"choices":[{"delta":{"content":"usage"}}]}\n\ndata: {"usage": {"prompt_tokens": 3, "comp')
    s.feed(b'letion_tokens": 4, "total_tokens": 7}}\n\ndata: [DONE]\n\n', end=True)
    assert s.total_tokens == 7
    j = UsageScanner()
    j.feed(b'{"id": "x", "usage": {"prompt_tokens": 5, "completion_tokens": 6}}', end=True)
    assert j.total_tokens == 11
