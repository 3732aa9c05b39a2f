"""Configuration of a simulated pod, kept free of heavy imports so the CLI can build it cheaply.

`SimConfig` is every knob of a pod as the command line gives it (milliseconds); `EngineConfig` is
the part the engines (`simulator.engine`, `simulator.batching`) read, in seconds. This module
imports nothing of the simulator, so every other module of it may import this one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

Timing = Literal["fixed", "model"]


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Timing and capacity knobs of the simulated engine (times in seconds).

    The ``model`` timing defaults describe roughly an 8B dense model (Llama-3-8B shape: 32
    layers, 8 KV heads of 128 dims, bf16) on one H100 SXM under vLLM:

    * prefill 12 000 tokens/s: a prompt token costs ~2 x 8e9 = 16 GFLOP; 12k tokens/s is ~20 % of
      the H100's 989 dense bf16 TFLOPS, a conservative allowance for attention, chunking and
      kernel overheads on long prompts (a 6000-token prompt takes 0.5 s to first token);
    * decode step 8 ms + 0.08 ms per running sequence: every step streams the 16 GB of weights
      (4.8 ms at 3.35 TB/s) plus launch, sampling and scheduling overhead (~125 tokens/s for a
      lone stream), and each sequence adds its KV read, 128 KiB per context token, i.e. ~256 MiB
      or ~0.08 ms for a ~2k-token context; 256 sequences then take ~28 ms a step (~9k tokens/s);
    * ``max_num_batched_tokens`` 8192: vLLM's OpenAI-server default on >= 70 GB GPUs such as
      the H100; ``max_num_seqs`` 256: vLLM's long-standing default;
    * KV transfer 3 ms per 1k tokens: 1k tokens of KV are 128 MiB, ~2.7 ms over one 400 Gb/s NIC;
    * ``kv_capacity_tokens`` 65 536: deliberately ~1/7 of what that H100 holds (~450k tokens
      after weights and activations at 0.9 memory utilisation). Routing quality shows once the
      shared prefixes need more KV than one pod holds; at this size a shared-prefix benchmark
      that overflows one pod (e.g. 24 groups x 6000-token prefixes = 144k tokens) but fits in
      four stays small enough to run in seconds per arm on two CPU cores, where an H100-sized
      cache would need > 450k distinct prefix tokens per pod, minutes of simulated prefill per
      arm and millions of tokens to tokenize. Use ``--kv-capacity-tokens 450000`` for H100 scale.
    """

    ttft_s: float = 0.020
    itl_s: float = 0.005
    jitter: float = 0.0
    """Each delay (fixed) or step time (model) is multiplied by a uniform factor in [1 - jitter, 1 + jitter]."""
    seed: int | None = 0
    max_num_seqs: int = 256
    kv_capacity_tokens: int = 65536
    timing: Timing = "fixed"
    """``fixed``: constant TTFT/ITL (`Engine`); ``model``: KV cache + continuous batching (`BatchingEngine`)."""
    block_size: int = 16
    prefix_caching: bool = True
    max_num_batched_tokens: int = 8192
    """Token budget of one step (prefill chunk + decodes); 0 = unlimited, i.e. no chunked prefill."""
    prefill_tokens_per_s: float = 12000.0
    decode_step_s: float = 0.008
    decode_s_per_seq: float = 0.00008
    kv_transfer_s_per_1k_tokens: float = 0.003
    kv_hold_s: float = 30.0
    """How long a prefill pod keeps a finished prompt's KV blocks pinned for the decode pod to
    fetch (vLLM's NIXL producer waits ``VLLM_NIXL_ABORT_REQUEST_TIMEOUT``); 0 = not at all."""

    def transfer_s(self, tokens: int) -> float:
        """Time to receive ``tokens`` tokens of KV computed by another pod."""
        return tokens / 1000.0 * self.kv_transfer_s_per_1k_tokens


KVEventsFormat = Literal["map", "array"]
"""How a KV event is laid out in a batch (see `simulator.kv_events`): ``map``, vLLM's current
encoding (a tagged map per event), or ``array``, the tagged positional arrays of earlier releases."""

KV_EVENTS_FORMATS: tuple[KVEventsFormat, ...] = ("map", "array")


@dataclass(frozen=True)
class KVEventsConfig:
    """Where and how a pod publishes vLLM's KV-cache events over ZeroMQ (`simulator.kv_publisher`).

    The fields are those of vLLM's ``--kv-events-config`` that change what goes on the wire, with
    vLLM's defaults; ``format`` is ours (vLLM has one format per release). Unlike vLLM, which
    *connects* its PUB socket when the endpoint names a host (it binds only ``*``, ``::``, ipc and
    inproc endpoints), the simulator always binds: subscribers connect to the pod. A TCP port of 0
    binds any free port (``SimServer.kv_events.endpoint`` tells which).
    """

    endpoint: str = "tcp://*:5557"
    """PUB socket: every batch goes out as (topic, 8-byte big-endian sequence number, msgpack payload)."""
    replay_endpoint: str | None = None
    """ROUTER socket answering replay requests (a start sequence number); None: no replay."""
    topic: str = ""
    buffer_steps: int = 10_000
    """Batches kept for replay."""
    hwm: int = 100_000
    """ZeroMQ send high-water mark of the PUB socket (a subscriber that falls this far behind loses batches)."""
    format: KVEventsFormat = "map"

    def __post_init__(self) -> None:
        for name in ("endpoint", "replay_endpoint"):
            value = getattr(self, name)
            if value is not None:
                check_zmq_endpoint(value, name)
        if self.replay_endpoint == self.endpoint and not self.endpoint.endswith((":0", ":*")):
            raise ValueError("replay_endpoint must differ from endpoint")
        if self.buffer_steps < 1 or self.hwm < 1:
            raise ValueError("buffer_steps and hwm must be >= 1")
        if self.format not in KV_EVENTS_FORMATS:
            raise ValueError(f"format must be one of {', '.join(KV_EVENTS_FORMATS)}, got {self.format!r}")


_VLLM_KV_EVENTS_KEYS = frozenset(
    {"enable_kv_cache_events", "publisher", "endpoint", "replay_endpoint", "buffer_steps", "hwm", "max_queue_size",
     "topic"}
)  # fmt: skip
"""The fields of vLLM's ``KVEventsConfig`` (vllm/config/kv_events.py)."""


def kv_events_config_from_json(text: str, format: KVEventsFormat = "map") -> KVEventsConfig | None:
    """vLLM's ``--kv-events-config`` JSON as a `KVEventsConfig`; None when it leaves events off.

    As in vLLM, events are on when ``enable_kv_cache_events`` is true and ``publisher`` is ``zmq``
    (its default then); ``publisher: "null"`` turns them off. ``max_queue_size`` is accepted and
    has no effect (the simulator has no publisher queue). Unknown keys and wrong types raise
    ValueError.
    """
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--kv-events-config is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("--kv-events-config must be a JSON object")
    unknown = sorted(set(data) - _VLLM_KV_EVENTS_KEYS)
    if unknown:
        raise ValueError(f"--kv-events-config: unknown keys {', '.join(unknown)}")
    enabled = data.get("enable_kv_cache_events", False)
    if not isinstance(enabled, bool):
        raise ValueError("--kv-events-config: enable_kv_cache_events must be true or false")
    publisher = data.get("publisher", "zmq" if enabled else "null")
    if publisher not in ("zmq", "null"):
        raise ValueError(f"--kv-events-config: publisher must be 'zmq' or 'null', got {publisher!r}")
    for key in ("endpoint", "topic"):
        if key in data and not isinstance(data[key], str):
            raise ValueError(f"--kv-events-config: {key} must be a string")
    if data.get("replay_endpoint") is not None and not isinstance(data["replay_endpoint"], str):
        raise ValueError("--kv-events-config: replay_endpoint must be a string or null")
    for key in ("buffer_steps", "hwm", "max_queue_size"):
        if key in data and (not isinstance(data[key], int) or isinstance(data[key], bool) or data[key] < 1):
            raise ValueError(f"--kv-events-config: {key} must be an integer >= 1")
    if not enabled or publisher == "null":
        return None
    defaults = KVEventsConfig()
    return KVEventsConfig(
        endpoint=data.get("endpoint", defaults.endpoint),
        replay_endpoint=data.get("replay_endpoint"),
        topic=data.get("topic", defaults.topic),
        buffer_steps=data.get("buffer_steps", defaults.buffer_steps),
        hwm=data.get("hwm", defaults.hwm),
        format=format,
    )


def check_zmq_endpoint(endpoint: str, what: str = "endpoint") -> None:
    """ValueError unless ``endpoint`` is ``tcp://HOST:PORT`` (PORT 0-65535 or ``*``) or ``ipc://PATH``."""
    if endpoint.startswith("ipc://") and len(endpoint) > len("ipc://"):
        return
    if not endpoint.startswith("tcp://"):
        raise ValueError(f"{what} {endpoint!r}: expected tcp://HOST:PORT or ipc://PATH")
    host, sep, port = endpoint[len("tcp://") :].rpartition(":")
    if not sep or not host or not (port == "*" or (port.isdigit() and int(port) <= 65535)):
        raise ValueError(f"{what} {endpoint!r}: expected tcp://HOST:PORT with PORT 0-65535 or *")


@dataclass(frozen=True, slots=True)
class LoraModule:
    """A LoRA adapter a pod serves (vLLM's ``--lora-modules`` entry, or a runtime load)."""

    name: str
    path: str
    base_model_name: str | None = None
    """The base model it is listed under (``parent``); None or an unknown name: the pod's first model."""


def parse_lora_modules(values: list[str]) -> list[LoraModule]:
    """vLLM's ``--lora-modules`` values: ``name=path`` or the JSON form ``{"name": ..., "path": ...,
    "base_model_name": ...}``. ValueError for anything else, or a name given twice."""
    modules: dict[str, LoraModule] = {}
    for value in values:
        text = value.strip()
        if text.startswith("{"):
            try:
                data: Any = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--lora-modules: {value!r} is not valid JSON: {exc}") from None
            unknown = sorted(set(data) - {"name", "path", "base_model_name"}) if isinstance(data, dict) else []
            if not isinstance(data, dict) or unknown:
                raise ValueError(f"--lora-modules: {value!r}: expected an object with name, path and optional "
                                 "base_model_name")
            name, path, base = data.get("name"), data.get("path"), data.get("base_model_name")
            if not (isinstance(name, str) and name and isinstance(path, str) and path) or (
                base is not None and not isinstance(base, str)
            ):
                raise ValueError(f"--lora-modules: {value!r}: name and path must be non-empty strings")
            module = LoraModule(name, path, base or None)
        else:
            name, sep, path = text.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ValueError(f"--lora-modules: {value!r} is not name=path or a JSON object")
            module = LoraModule(name.strip(), path.strip())
        if module.name in modules:
            raise ValueError(f"--lora-modules: adapter {module.name!r} is given twice")
        modules[module.name] = module
    return list(modules.values())


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
    kv_events: KVEventsConfig | None = None
    """Publish vLLM's KV-cache events (BlockStored, BlockRemoved, AllBlocksCleared) over ZeroMQ as the
    prefix cache changes; model timing only. None: no events."""
    enable_lora: bool = False
    """Serve LoRA adapters (vLLM's ``--enable-lora``): ``/v1/load_lora_adapter`` and
    ``/v1/unload_lora_adapter`` work, and ``vllm:lora_requests_info`` is exported. Implied by
    ``lora_modules``."""
    lora_modules: list[LoraModule] = field(default_factory=list)
    """Adapters loaded at start (vLLM's ``--lora-modules``)."""
    max_loras: int = 1
    """vLLM's ``--max-loras``: reported as the ``max_lora`` label only (the simulated engine has no
    per-batch adapter slots)."""

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
