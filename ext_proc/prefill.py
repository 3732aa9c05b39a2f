"""The prefill call of `pd`: the router itself sends the prompt to the prefill pod, then routes the
client's request to the decode pod with what the prefill returned (vLLM) or with a shared
bootstrap room (SGLang). Pooled keep-alive connections; one timeout for the whole call.

How the call is made depends on the engine (the pods' `model.aibrix.ai/engine` label): one
function per style in `PREFILL_STYLES`; an engine without its own style speaks vLLM's."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson

from routing.pods import Pod
from routing.request import dump_body
from routing.strategies.pd import sglang_bootstrap_port

log = logging.getLogger("extproc_router.prefill")

# Client headers the prefill call carries on (the reference forwards the same set).
FORWARDED_HEADERS = ("authorization", "user", "content-type", "x-session-id", "traceparent")


class PrefillError(Exception):
    """The prefill pod did not give a usable answer; the message names the pod."""


def _host(pod: Pod) -> str:
    return pod.address.rpartition(":")[0].strip("[]")


def vllm_prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The request as the prefill pod must see it: one token, no streaming, remote decode asked for."""
    out = dict(body)
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out["stream"] = False
    out.pop("stream_options", None)
    out.pop("min_tokens", None)
    out["kv_transfer_params"] = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                                 "remote_block_ids": None, "remote_host": None, "remote_port": None}
    return out


class PrefillClient:
    def __init__(self, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task] = set()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
                                                  timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def close(self) -> None:
        for t in list(self._background):
            t.cancel()
        if self._session is not None:
            await self._session.close()

    async def _post(self, pod: Pod, path: str, body: dict[str, Any], headers: dict[str, str]) -> bytes:
        try:
            async with self._client().post(f"http://{pod.address}{path}", data=dump_body(body),
                                           headers={"content-type": "application/json", **headers}) as resp:
                data = await resp.read()
                if resp.status != 200:
                    snippet = data[:200].decode("utf-8", "replace")
                    raise PrefillError(f"prefill pod {pod.name} ({pod.address}) answered {resp.status}: {snippet}")
                return data
        except TimeoutError:
            raise PrefillError(f"prefill pod {pod.name} ({pod.address}) did not answer within "
                               f"{self.timeout:g}s") from None
        except aiohttp.ClientError as exc:
            raise PrefillError(f"prefill pod {pod.name} ({pod.address}) is unreachable: {exc}") from None

    async def vllm(self, pod: Pod, path: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
        """Run the prefill; return the decode body (the client's, with the returned kv_transfer_params)."""
        data = await self._post(pod, path, vllm_prefill_body(body), headers)
        try:
            reply = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise PrefillError(f"prefill pod {pod.name} ({pod.address}) answered invalid JSON") from None
        params = reply.get("kv_transfer_params") if isinstance(reply, dict) else None
        if not isinstance(params, dict):
            raise PrefillError(f"prefill pod {pod.name} ({pod.address}) returned no kv_transfer_params")
        params = dict(params)
        if not params.get("remote_host"):
            params["remote_host"] = _host(pod)
        decode = dict(body)
        decode["kv_transfer_params"] = params
        return decode

    def sglang(self, prefill: Pod, bootstrap_port: int, path: str, body: dict[str, Any],
               headers: dict[str, str]) -> dict[str, Any]:
        """Start the prefill (not awaited: SGLang pairs the two sides through the bootstrap room) and
        return the decode body carrying the same bootstrap fields."""
        fields = {"bootstrap_host": _host(prefill), "bootstrap_port": bootstrap_port,
                  "bootstrap_room": random.getrandbits(63)}
        prefill_body = {**body, **fields}

        async def send() -> None:
            try:
                await self._post(prefill, path, prefill_body, headers)
            except PrefillError as exc:
                log.warning("sglang prefill failed (the decode side times out on its own): %s", exc)

        task = asyncio.get_running_loop().create_task(send())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return {**body, **fields}


PrefillStyle = Callable[[PrefillClient, Pod, str, dict[str, Any], dict[str, str]], Awaitable[dict[str, Any]]]


async def _vllm_style(client: PrefillClient, pod: Pod, path: str, body: dict[str, Any],
                      headers: dict[str, str]) -> dict[str, Any]:
    return await client.vllm(pod, path, body, headers)


async def _sglang_style(client: PrefillClient, pod: Pod, path: str, body: dict[str, Any],
                        headers: dict[str, str]) -> dict[str, Any]:
    return client.sglang(pod, sglang_bootstrap_port(pod), path, body, headers)


PREFILL_STYLES: dict[str, PrefillStyle] = {"vllm": _vllm_style, "sglang": _sglang_style}


async def run_prefill(engine: str, client: PrefillClient, pod: Pod, path: str, body: dict[str, Any],
                      headers: dict[str, str]) -> dict[str, Any]:
    """The prefill call in `engine`'s style; the body the decode pod must get. Raises PrefillError."""
    style = PREFILL_STYLES.get(engine, _vllm_style)
    return await style(client, pod, path, body, headers)
