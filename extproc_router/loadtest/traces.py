"""Request traces in the common (Mooncake) format: reading them and turning them into prompts.

A trace is a JSONL file, one request per line::

    {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, 48, ...]}

* ``timestamp``: when the request arrives, in milliseconds (from any origin; the replay starts at
  the smallest one). Lines need not be sorted: requests are replayed in timestamp order (ties in
  file order).
* ``input_length``: prompt tokens (>= 1). ``output_length``: tokens to generate (>= 0; 0 is sent
  as 1, the least an OpenAI endpoint accepts).
* ``hash_ids``: the prompt cut into blocks of ``block_tokens`` tokens (512 in the Mooncake traces
  of FAST'25 and in Dynamo's and AIPerf's replays); equal ids are equal blocks, and since an id
  stands for its block *after the same prefix*, two prompts share exactly the leading blocks
  whose ids they share. Optional (missing: an unshared prompt). Other keys are ignored.

`TraceText` makes the prompts: each hash id maps, deterministically (per seed), to a block of
text of exactly ``block_tokens`` tokens under the simulator's tokenizer, so equal ids become equal
text and prefix sharing in the replay is exactly the trace's. A prompt is its blocks in order,
cut to ``input_length`` tokens (the last block is usually partial); tokens beyond the blocks
(a trace with fewer ids than its length needs) are filler text unique to the request.

``--token-scale`` multiplies ``input_length``, ``output_length`` and the block size alike (so the
sharing structure is kept), ``--time-scale`` the timestamps (0.5 replays twice as fast).
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from extproc_router.loadtest.workloads import WORDS, PlannedRequest, Workload, WorkloadSpec

__all__ = [
    "DEFAULT_BLOCK_TOKENS",
    "TraceError",
    "TraceRequest",
    "TraceText",
    "TraceWorkload",
    "load_trace",
    "parse_trace",
    "scaled",
    "trace_lines",
    "write_trace",
]

DEFAULT_BLOCK_TOKENS = 512
"""Tokens per hash id in the Mooncake traces (and the default of Dynamo's and AIPerf's replays)."""


class TraceError(ValueError):
    """A trace line that is not a request; the message names the file and the line."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One line of a trace."""

    line: int
    """1-based line number in the file (labels the request in reports)."""
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The line as the trace format writes it."""
        ts = int(self.timestamp_ms) if float(self.timestamp_ms).is_integer() else self.timestamp_ms
        return {
            "timestamp": ts,
            "input_length": self.input_length,
            "output_length": self.output_length,
            "hash_ids": list(self.hash_ids),
        }


def _int_field(obj: dict[str, Any], key: str, minimum: int, where: str) -> int:
    value = obj.get(key)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise TraceError(f"{where}: {key!r} must be an integer, got {value!r}")
    if value < minimum:
        raise TraceError(f"{where}: {key!r} must be >= {minimum}, got {value}")
    return value


def parse_trace(lines: Iterable[str | bytes], source: str = "<trace>") -> list[TraceRequest]:
    """The requests of a trace's lines, in replay order (timestamp, then line); blank lines are skipped.

    TraceError names the first bad line (``source:N``) and what is wrong with it.
    """
    requests: list[TraceRequest] = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{source}:{number}"
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise TraceError(f"{where}: not JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise TraceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        missing = [key for key in ("timestamp", "input_length", "output_length") if key not in obj]
        if missing:
            raise TraceError(f"{where}: missing {', '.join(missing)}")
        ts = obj["timestamp"]
        if not isinstance(ts, int | float) or isinstance(ts, bool) or not ts >= 0 or ts == float("inf"):
            raise TraceError(f"{where}: 'timestamp' must be a number of milliseconds >= 0, got {ts!r}")
        hash_ids = obj.get("hash_ids", [])
        if not isinstance(hash_ids, list) or not all(
            isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in hash_ids
        ):
            raise TraceError(f"{where}: 'hash_ids' must be a list of integers >= 0")
        requests.append(
            TraceRequest(
                line=number,
                timestamp_ms=float(ts),
                input_length=_int_field(obj, "input_length", 1, where),
                output_length=_int_field(obj, "output_length", 0, where),
                hash_ids=tuple(hash_ids),
            )
        )
    requests.sort(key=lambda r: (r.timestamp_ms, r.line))
    return requests


@functools.lru_cache(maxsize=4)
def _load(path: str, mtime_ns: int, size: int) -> tuple[TraceRequest, ...]:
    with open(path, "rb") as f:
        return tuple(parse_trace(f, path))


def load_trace(path: str | os.PathLike[str]) -> tuple[TraceRequest, ...]:
    """The requests of a trace file (parsed once per file version); OSError, TraceError."""
    st = os.stat(path)
    return _load(str(path), st.st_mtime_ns, st.st_size)


def trace_lines(requests: Iterable[TraceRequest]) -> Iterable[bytes]:
    """The JSONL lines of ``requests`` (with their newline)."""
    for req in requests:
        yield orjson.dumps(req.to_json()) + b"\n"


def write_trace(path: str | os.PathLike[str], requests: Iterable[TraceRequest]) -> Path:
    """Write ``requests`` as a JSONL trace; returns the path."""
    out = Path(path)
    if out.parent != Path():
        out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        f.writelines(trace_lines(requests))
    return out


def scaled(req: TraceRequest, token_scale: float) -> tuple[int, int]:
    """(prompt tokens, output tokens) of ``req`` under ``token_scale`` (each at least 1)."""
    return max(1, round(req.input_length * token_scale)), max(1, round(req.output_length * token_scale))


_SPACED_WORDS = tuple(" " + w for w in WORDS)
"""One cl100k token each, and a run of them is one token per word (every word starts a pre-token)."""

_BYTE_PIECES = tuple("abcdefghijklmnopqrstuvwxyz      ")
"""One token each under the ``bytes`` tokenizer (letters and spaces, so the text still reads as words)."""


class TraceText:
    """Deterministic text for hash ids: each id is ``block_tokens`` tokens of its own, equal ids equal text.

    A prompt is built from *pieces*, strings of exactly one token under ``tokenizer_kind``
    (``cl100k``: a space and a word from `WORDS`; ``bytes``: one ASCII character), so any run of
    pieces is exactly as many tokens as pieces, wherever it is cut.
    """

    CACHE_BLOCKS = 8192
    """Blocks kept (LRU); a block is regenerated on demand, so this only bounds memory."""

    def __init__(self, block_tokens: int = DEFAULT_BLOCK_TOKENS, tokenizer_kind: str = "cl100k", seed: int = 0) -> None:
        if block_tokens < 1:
            raise ValueError("block_tokens must be >= 1")
        if tokenizer_kind not in ("cl100k", "bytes"):
            raise ValueError(f"unknown tokenizer kind {tokenizer_kind!r} (expected cl100k or bytes)")
        self.block_tokens = block_tokens
        self.tokenizer_kind = tokenizer_kind
        self.seed = seed
        self._pieces = _SPACED_WORDS if tokenizer_kind == "cl100k" else _BYTE_PIECES
        self.block = functools.lru_cache(maxsize=self.CACHE_BLOCKS)(self._block)

    def _block(self, hash_id: int) -> tuple[str, ...]:
        """The pieces of ``hash_id``'s block (cached through `block`)."""
        rng = random.Random(f"trace-block:{self.seed}:{hash_id}")
        return tuple(rng.choices(self._pieces, k=self.block_tokens))

    def block_text(self, hash_id: int) -> str:
        """The text of one block: exactly ``block_tokens`` tokens."""
        return "".join(self.block(hash_id))

    def prompt(self, hash_ids: Iterable[int], tokens: int, filler_key: str = "") -> str:
        """``tokens`` tokens of text: the blocks of ``hash_ids`` in order, cut to length, then unique filler.

        ``filler_key`` seeds the filler (give each request its own).
        """
        parts: list[str] = []
        left = tokens
        for hash_id in hash_ids:
            if left <= 0:
                break
            block = self.block(hash_id)
            parts.extend(block if left >= len(block) else block[:left])
            left -= len(block)
        if left > 0:
            rng = random.Random(f"trace-filler:{self.seed}:{filler_key}")
            parts.extend(rng.choices(self._pieces, k=left))
        return "".join(parts)


class TraceWorkload(Workload):
    """The requests of ``spec.trace``, each with its send time (timestamp - first timestamp) x time_scale.

    Bodies are made when a request is due, so a long trace is never held as text all at once.
    """

    scheduled = True

    def __init__(self, spec: WorkloadSpec) -> None:
        if spec.trace is None:
            raise ValueError("the trace workload needs a trace file (--trace)")
        if not spec.time_scale > 0 or not spec.token_scale > 0:
            raise ValueError("time_scale and token_scale must be > 0")
        super().__init__(spec)
        self.rows = load_trace(spec.trace)[: self.size]
        block = max(1, round(spec.block_tokens * spec.token_scale))
        self.text = TraceText(block, spec.tokenizer, spec.seed)
        self._origin = self.rows[0].timestamp_ms if self.rows else 0.0
        self._pos = 0

    async def next(self) -> PlannedRequest | None:
        if self._pos >= len(self.rows):
            return None
        index = self._pos
        self._pos += 1
        return self.request(index)

    def request(self, index: int) -> PlannedRequest:
        """The planned request of the trace's ``index``-th request (in replay order)."""
        row = self.rows[index]
        prompt_tokens, output_tokens = scaled(row, self.spec.token_scale)
        text = self.text.prompt(row.hash_ids, prompt_tokens, filler_key=str(row.line))
        body = self._body([{"role": "user", "content": text}], text)
        body["max_tokens"] = output_tokens
        at_s = (row.timestamp_ms - self._origin) / 1000.0 * self.spec.time_scale
        return PlannedRequest(index=index, label=f"line{row.line}", body=body, at_s=at_s)
