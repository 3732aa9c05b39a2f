"""A lean HTTP/1.1 load generator for overhead benchmarks (keep-alive, raw sockets, uvloop).

Closed loop: `concurrency` connections each send the next request as soon as the previous answer
is complete. Open loop: requests start on a fixed schedule at `rate` per second over a pool of
connections, and latency counts from the scheduled start, so queueing shows up (no coordinated
omission). Prints one JSON line with the latency samples' summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time


def build_request(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: bench", "Content-Type: application/json", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer

    async def call(self, req: bytes) -> int:
        self.w.write(req)
        head = await self.r.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        low = head.lower()
        i = low.find(b"content-length:")
        if i < 0:
            raise RuntimeError("response without content-length")
        n = int(low[i + 15:low.find(b"\r\n", i)])
        if n:
            await self.r.readexactly(n)
        return status


async def connect(host: str, port: int) -> Conn:
    r, w = await asyncio.open_connection(host, port)
    return Conn(r, w)


def summarize(lat: list[float], errors: int, elapsed: float) -> dict:
    lat.sort()
    def q(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3 if lat else float("nan")
    return {"requests": len(lat), "errors": errors, "seconds": elapsed, "rps": len(lat) / elapsed if elapsed else 0,
            "p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99), "max_ms": lat[-1] * 1e3 if lat else float("nan")}


async def closed_loop(host: str, port: int, req: bytes, concurrency: int, duration: float, warmup: float) -> dict:
    conns = [await connect(host, port) for _ in range(concurrency)]
    lat: list[float] = []
    errors = 0
    t_start = time.perf_counter()
    t_measure = t_start + warmup
    t_end = t_measure + duration

    async def worker(c: Conn) -> None:
        nonlocal errors
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                return
            status = await c.call(req)
            t1 = time.perf_counter()
            if t0 >= t_measure:
                if status == 200:
                    lat.append(t1 - t0)
                else:
                    errors += 1

    await asyncio.gather(*(worker(c) for c in conns))
    for c in conns:
        c.w.close()
    return summarize(lat, errors, duration)


async def open_loop(host: str, port: int, req: bytes, rate: float, duration: float, warmup: float,
                    max_conns: int = 256) -> dict:
    idle: list[Conn] = [await connect(host, port) for _ in range(16)]
    lat: list[float] = []
    errors = 0
    dropped = 0
    nconns = len(idle)
    interval = 1.0 / rate
    t_start = time.perf_counter()
    t_measure = t_start + warmup
    t_end = t_measure + duration
    tasks: set[asyncio.Task] = set()

    async def one(scheduled: float) -> None:
        nonlocal errors, nconns
        c = idle.pop() if idle else None
        if c is None:
            nconns += 1
            c = await connect(host, port)
        status = await c.call(req)
        t1 = time.perf_counter()
        idle.append(c)
        if scheduled >= t_measure:
            if status == 200:
                lat.append(t1 - scheduled)
            else:
                errors += 1

    k = 0
    while True:
        scheduled = t_start + k * interval
        if scheduled >= t_end:
            break
        now = time.perf_counter()
        if scheduled > now:
            await asyncio.sleep(scheduled - now)
        if len(tasks) >= max_conns:
            dropped += 1  # the system is saturated; do not pile up unbounded work
        else:
            t = asyncio.create_task(one(scheduled))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        k += 1
    if tasks:
        await asyncio.wait(tasks, timeout=10)
    for c in idle:
        c.w.close()
    out = summarize(lat, errors + dropped, duration)
    out["offered_rps"] = rate
    out["dropped"] = dropped
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--path", default="/v1/chat/completions")
    ap.add_argument("--body-file", required=True)
    ap.add_argument("--header", action="append", default=[], help="NAME:VALUE")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--rate", type=float, default=0, help="open loop at this req/s (0 = closed loop)")
    ap.add_argument("--duration", type=float, default=5)
    ap.add_argument("--warmup", type=float, default=1)
    a = ap.parse_args()
    with open(a.body_file, "rb") as f:
        body = f.read()
    headers = dict(h.split(":", 1) for h in a.header)
    req = build_request(a.path, body, {k.strip(): v.strip() for k, v in headers.items()})
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    if a.rate > 0:
        res = asyncio.run(open_loop(a.host, a.port, req, a.rate, a.duration, a.warmup))
    else:
        res = asyncio.run(closed_loop(a.host, a.port, req, a.concurrency, a.duration, a.warmup))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
