"""Configuration of a simulated pod, kept free of heavy imports so the CLI can build it cheaply."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from extproc_router.simulator.engine import EngineConfig, Timing

Role = Literal["combined", "prefill", "decode"]
"""A pod's part in prefill/decode disaggregation (`simulator.disagg`)."""

ROLES: tuple[Role, ...] = ("combined", "prefill", "decode")

DEFAULT_BOOTSTRAP_PORT = 8998
"""SGLang's default ``--disaggregation-bootstrap-port`` (and AIBrix's ``sglang-bootstrap-port``)."""


@dataclass
class SimConfig:
    """Every knob of a simulated pod. Times are in milliseconds as on the command line."""

    models: list[str] = field(default_factory=lambda: ["sim-model"])
    pod_name: str | None = None
    """Name in the ``x-sim-pod`` header; None means ``<hostname>-<port>``."""
    ttft_ms: float = 20.0
    itl_ms: float = 5.0
    output_tokens: int = 16
    """Completion length when the request sets no max_tokens."""
    max_output_tokens: int = 256
    """Cap on completion length when the request sets max_tokens."""
    latency_jitter: float = 0.0
    seed: int | None = 0
    max_num_seqs: int = 256
    kv_capacity_tokens: int = 65536
    timing: Timing = "fixed"
    """``fixed``: constant TTFT/ITL; ``model``: KV cache, prefix caching, continuous batching."""
    tokenizer: str = "cl100k"
    """How prompts are tokenized under ``model`` timing: ``cl100k`` or ``bytes``."""
    block_size: int = 16
    prefix_caching: bool = True
    max_num_batched_tokens: int = 8192
    prefill_tokens_per_s: float = 12000.0
    decode_step_ms: float = 8.0
    decode_ms_per_seq: float = 0.08
    kv_transfer_ms_per_1k_tokens: float = 3.0
    role: Role = "combined"
    """``combined``: serves whole requests and ignores transfer fields (vLLM without a KV connector);
    ``prefill``: runs prefill-only requests and holds their KV; ``decode``: takes transferred KV."""
    kv_hold_seconds: float = 30.0
    """How long a prefill pod pins a finished prefill's KV blocks for the decode pod (0: not at all)."""
    bootstrap_port: int | None = None
    """Second listener answering SGLang bootstrap-room lookups (the HTTP port answers them too).
    None: none; 0: any free port (read back ``SimServer.bootstrap_port``). The CLI maps its
    ``--bootstrap-port 0`` to None and defaults to 8998 for a prefill pod."""
    bootstrap_timeout_s: float = 10.0
    """How long an SGLang-style decode request waits for its prefill's room before answering 503."""
    fail_every: int = 0
    """Every Nth valid completion request answers 500 (0 = never)."""
    stall: bool = False
    """Completion requests are accepted but not answered until cancelled or stall is switched off."""
    die_after: int = 0
    """Stop serving after this many completion responses (0 = never); the CLI then exits 3."""
    unhealthy: bool = False
    """GET /health answers 503."""

    def engine_config(self) -> EngineConfig:
        """The engine part of the configuration, in seconds."""
        return EngineConfig(
            ttft_s=self.ttft_ms / 1000.0,
            itl_s=self.itl_ms / 1000.0,
            jitter=self.latency_jitter,
            seed=self.seed,
            max_num_seqs=self.max_num_seqs,
            kv_capacity_tokens=self.kv_capacity_tokens,
            timing=self.timing,
            block_size=self.block_size,
            prefix_caching=self.prefix_caching,
            max_num_batched_tokens=self.max_num_batched_tokens,
            prefill_tokens_per_s=self.prefill_tokens_per_s,
            decode_step_s=self.decode_step_ms / 1000.0,
            decode_s_per_seq=self.decode_ms_per_seq / 1000.0,
            kv_transfer_s_per_1k_tokens=self.kv_transfer_ms_per_1k_tokens / 1000.0,
            kv_hold_s=self.kv_hold_seconds,
        )
