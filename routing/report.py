"""Metric families as plain values, so the routing core reports without a metrics library: the
process (ext_proc/metrics.py) turns them into Prometheus families at scrape time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(slots=True)
class MetricFamily:
    name: str  # without the `_total` suffix of counters (the exporter adds it)
    kind: Literal["counter", "gauge"]
    help: str
    labels: tuple[str, ...] = ()
    samples: list[tuple[tuple[str, ...], float]] = field(default_factory=list)

    def add(self, labels: tuple[str, ...], value: float) -> None:
        self.samples.append((labels, value))
