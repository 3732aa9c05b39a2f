"""Shared fixtures: the real local stack (Envoy + router + simulated pods) on free ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc_router.stack import LocalStack, StackOptions


def start_stack(tmp: Path, **kw: object) -> LocalStack:
    opts = StackOptions.on_free_ports(run_dir=str(tmp), **kw)
    stack = LocalStack(opts)
    stack.start()
    return stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A stack shared by a module's tests: 3 pods of demo-model, TTFT 20 ms, ITL 10 ms."""
    s = start_stack(tmp_path_factory.mktemp("stack"), ttft_ms=20.0, itl_ms=10.0, health_interval=0.2)
    try:
        yield s
    finally:
        s.stop()
