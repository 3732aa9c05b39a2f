"""pd through real Envoy, the real router and simulated prefill/decode pods."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from extproc_router.stack import LocalStack, PodSpec, StackOptions, free_port

PD_MODEL = "demo-pd-model"


def pd_stack(tmp: Path, rolesets: dict[str, dict], *, engine: str = "vllm", combined: dict | None = None,
             router_env: dict[str, str] | None = None, model_config: dict | None = None) -> LocalStack:
    """`rolesets`: name -> {"prefill": n, "decode": n}. Pods of PD_MODEL only."""
    opts = StackOptions.on_free_ports(run_dir=str(tmp), pods=0, ttft_ms=20.0, itl_ms=5.0, health_interval=0.2,
                                      model=PD_MODEL, model_config=model_config, router_env=router_env or {})
    stack = LocalStack(opts)
    for rs, counts in rolesets.items():
        for role in ("prefill", "decode"):
            for i in range(counts.get(role, 0)):
                port = free_port()
                labels = {"role-name": role, "roleset-name": rs}
                args = ["--role", role, "--bootstrap-port", "0"]
                if engine == "sglang":
                    labels["model.aibrix.ai/engine"] = "sglang"
                    if role == "prefill":
                        boot = free_port()
                        labels["model.aibrix.ai/sglang-bootstrap-port"] = str(boot)
                        args = ["--role", role, "--bootstrap-port", str(boot)]
                stack.pods.append(PodSpec(name=f"{rs}-{role}-{i}", model=PD_MODEL, port=port, extra_args=args,
                                          labels=labels))
    if combined is not None:
        stack.pods.append(PodSpec(name="combined-0", model=PD_MODEL, port=free_port(), labels=combined))
    stack.start()
    return stack


async def chat(stack: LocalStack, content: str = "Explain quantum entanglement.", **extra) -> tuple[int, dict, bytes]:
    body = {"model": PD_MODEL, "messages": [{"role": "user", "content": content}], **extra}
    async with aiohttp.ClientSession() as s, s.post(stack.url + "/v1/chat/completions", json=body,
                                                     headers={"routing-strategy": "pd"}) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()


async def sim_stats(stack: LocalStack, pod: str) -> dict:
    spec = next(p for p in stack.pods if p.name == pod)
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{spec.port}/sim/stats") as resp:
        return await resp.json()


async def set_faults(stack: LocalStack, pod: str, **faults) -> None:
    spec = next(p for p in stack.pods if p.name == pod)
    async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{spec.port}/sim/faults", json=faults) as r:
        assert r.status == 200


@pytest.fixture
def vllm_pd(tmp_path: Path):
    stack = pd_stack(tmp_path, {"rs0": {"prefill": 1, "decode": 1}},
                     router_env={"AIBRIX_PREFILL_REQUEST_TIMEOUT": "1"})
    try:
        yield stack
    finally:
        stack.stop()


async def test_prefill_then_decode_with_transfer_params(vllm_pd: LocalStack) -> None:
    status, hdrs, body = await chat(vllm_pd)
    assert status == 200, body
    assert hdrs["routing-strategy"] == "pd"
    assert hdrs["prefill-target-pod"] == "rs0-prefill-0" and hdrs["target-pod"] == "rs0-decode-0"
    assert hdrs["x-sim-pod"] == "rs0-decode-0"
    decode = await sim_stats(vllm_pd, "rs0-decode-0")
    fields = decode["last_transfer_fields"]
    params = fields.get("kv_transfer_params", fields)
    assert params["do_remote_prefill"] is True and params["remote_engine_id"] == "rs0-prefill-0"
    prefill = await sim_stats(vllm_pd, "rs0-prefill-0")
    assert prefill["completions_received"] >= 1

    # streaming goes to the decode pod chunk by chunk
    body = {"model": PD_MODEL, "stream": True, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    chunks = 0
    async with aiohttp.ClientSession() as s, s.post(vllm_pd.url + "/v1/chat/completions", json=body,
                                                     headers={"routing-strategy": "pd"}) as resp:
        assert resp.status == 200 and resp.headers["target-pod"] == "rs0-decode-0"
        async for line in resp.content:
            chunks += line.startswith(b"data: ")
    assert chunks >= 8


async def test_prefill_failure_and_timeout_are_clean_503s(vllm_pd: LocalStack) -> None:
    await set_faults(vllm_pd, "rs0-prefill-0", fail_every=1)
    before = (await sim_stats(vllm_pd, "rs0-decode-0"))["completions_received"]
    status, hdrs, body = await chat(vllm_pd)
    assert status == 503 and b"rs0-prefill-0" in body and "x-error-prefill" in hdrs
    await set_faults(vllm_pd, "rs0-prefill-0", fail_every=0, stall=True)
    status, _, body = await chat(vllm_pd)
    assert status == 503 and b"did not answer within" in body and b"rs0-prefill-0" in body
    await set_faults(vllm_pd, "rs0-prefill-0", stall=False)
    assert (await sim_stats(vllm_pd, "rs0-decode-0"))["completions_received"] == before  # nothing half-sent
    assert (await chat(vllm_pd))[0] == 200


async def test_roleset_losing_its_decode_pod_drops_out(tmp_path: Path) -> None:
    stack = pd_stack(tmp_path, {"a": {"prefill": 1, "decode": 1}, "b": {"prefill": 1, "decode": 1}})
    try:
        seen = {(await chat(stack))[1]["target-pod"] for _ in range(12)}
        assert seen == {"a-decode-0", "b-decode-0"}
        stack.kill("b-decode-0")
        await asyncio.sleep(0.8)
        for _ in range(8):
            status, hdrs, _ = await chat(stack)
            assert status == 200 and hdrs["prefill-target-pod"] == "a-prefill-0" and hdrs["target-pod"] == "a-decode-0"
        stack.kill("a-decode-0")
        await asyncio.sleep(0.8)
        status, _, body = await chat(stack)
        assert status == 503 and b"no prefill/decode pair" in body
    finally:
        stack.stop()


async def test_prompt_length_buckets(tmp_path: Path) -> None:
    short = {"profiles": {"default": {"routingStrategy": "pd", "routingConfig": {"promptLenBucketMaxLength": 200}}}}
    long = {"profiles": {"default": {"routingStrategy": "pd",
                                     "routingConfig": {"promptLenBucketMinLength": 201}}}}
    stack = pd_stack(tmp_path, {"short": {"prefill": 1, "decode": 1}, "long": {"prefill": 1, "decode": 1}})
    import json

    import yaml
    doc = yaml.safe_load(stack.pod_file.read_text())
    for pod in doc["models"][PD_MODEL]["pods"]:
        pod["annotations"] = {"model.aibrix.ai/config": json.dumps(short if pod["name"].startswith("short") else long)}
    stack.pod_file.write_text(yaml.safe_dump(doc))
    await asyncio.sleep(1.5)  # reload
    try:
        for _ in range(4):
            assert (await chat(stack, "hi"))[1]["target-pod"] == "short-decode-0"
            assert (await chat(stack, "word " * 400))[1]["target-pod"] == "long-decode-0"
    finally:
        stack.stop()


async def test_sglang_mode_sends_to_both(tmp_path: Path) -> None:
    stack = pd_stack(tmp_path, {"rs0": {"prefill": 1, "decode": 1}}, engine="sglang")
    try:
        status, hdrs, body = await chat(stack)
        assert status == 200, body
        assert hdrs["prefill-target-pod"] == "rs0-prefill-0" and hdrs["target-pod"] == "rs0-decode-0"
        decode = await sim_stats(stack, "rs0-decode-0")
        prefill = await sim_stats(stack, "rs0-prefill-0")
        room = decode["last_transfer_fields"]["bootstrap_room"]
        assert prefill["last_transfer_fields"]["bootstrap_room"] == room
    finally:
        stack.stop()
