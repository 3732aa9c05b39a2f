"""The in-process rate limiter (extproc_router/ratelimit/limits.py)."""

from __future__ import annotations

from extproc_router.ratelimit.limits import LocalLimiter, UserLimits


async def test_local_limiter_rpm_tpm_rps_and_reset() -> None:
    now = [1000.0]
    lim = LocalLimiter(clock=lambda: now[0])
    u = UserLimits(rpm=3, tpm=100)
    for _ in range(3):
        assert (await lim.check_request("alice", u, "m", None)).allowed
    v = await lim.check_request("alice", u, "m", None)
    assert not v.allowed and v.limit == "rpm" and 1 <= v.retry_after <= 60
    now[0] += 60  # next window
    assert (await lim.check_request("alice", u, "m", None)).allowed
    await lim.add_tokens("alice", 150)
    v = await lim.check_request("alice", u, "m", None)
    assert not v.allowed and v.limit == "tpm"
    assert (await lim.check_request("bob", u, "m", 2)).allowed
    assert (await lim.check_request("bob", u, "m", 2)).allowed
    assert (await lim.check_request(None, None, "m", 2)).limit == "model-rps"
    now[0] += 1
    assert (await lim.check_request(None, None, "m", 2)).allowed
