"""Hostile HTTP/2 peers against the router's gRPC server (ext_proc/h2grpc.py), one attack at a time.

Each attack runs for a few seconds against a fresh GrpcServer (echo handler, uvloop, the router's
message limit) in a subprocess, while a legitimate grpcio client on its own connection sends one
small request every 20 ms with a 1 s deadline. Reports, per attack: the server's baseline and peak
RSS (sampled every 50 ms from /proc), its CPU seconds, legitimate requests answered / failed and
the slowest answer, and how the server answered the attacker. Prints a table and writes JSON
(default bench/results/attack.json).

  ping-flood          PINGs as fast as the socket takes them; the attacker never reads
  settings-flood      SETTINGS frames, same
  rst-flood           HEADERS on a closed stream, each provoking RST_STREAM; never reads
  empty-continuation  HEADERS without END_HEADERS, then zero-length CONTINUATION frames (3M)
  empty-data          an open stream, then zero-length DATA frames (3M)
  unfinished-messages 2 connections x 200 streams, each sending an unfinished 5 MiB message within
                      flow control (the attacker reads and uses every WINDOW_UPDATE)
  zero-window         2 connections x 100 streams announcing a zero window, sending 64 KiB echo
                      requests within flow control
  hpack-padding       40 header blocks of 256 KB of HPACK table-size updates on one connection
  idle-connections    400 connections that send nothing; held past the handshake timeout

`--baseline PATH` runs every attack against another copy of h2grpc.py too (e.g. the committed one:
`git show HEAD:ext_proc/h2grpc.py > /tmp/h2grpc_head.py`) and prints both tables.

    .venv/bin/python bench/attack.py [--seconds 4] [--only NAME,...] [--baseline PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ECHO = "/bench.Echo/Bidi"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_MESSAGE = 5 * 1024 * 1024  # the router's default: max_body_bytes (4 MiB) + 1 MiB
ERROR_NAMES = {0x0: "NO_ERROR", 0x1: "PROTOCOL_ERROR", 0x2: "INTERNAL_ERROR", 0x3: "FLOW_CONTROL_ERROR",
               0x4: "SETTINGS_TIMEOUT", 0x5: "STREAM_CLOSED", 0x6: "FRAME_SIZE_ERROR", 0x7: "REFUSED_STREAM",
               0x8: "CANCEL", 0x9: "COMPRESSION_ERROR", 0xB: "ENHANCE_YOUR_CALM"}  # fmt: skip
REQUEST_HEADERS = [
    (":method", "POST"), (":scheme", "http"), (":path", ECHO), (":authority", "bench"),
    ("content-type", "application/grpc"), ("te", "trailers"),
]  # fmt: skip


# --- the server subprocess -----------------------------------------------------------------------------


def serve(module_path: str | None) -> None:
    """Run an echo GrpcServer on a free loopback port; print the port; serve until killed."""
    if module_path:
        spec = importlib.util.spec_from_file_location("h2grpc_under_test", module_path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    else:
        from ext_proc import h2grpc as mod

    class Echo:
        def __init__(self, stream: Any) -> None:
            self.stream = stream

        def on_message(self, data: bytes) -> None:
            self.stream.send_message(data)

        def on_half_close(self) -> None:
            self.stream.finish()

        def on_close(self, reset: bool) -> None:
            pass

    async def main() -> None:
        server = mod.GrpcServer({ECHO: Echo}, max_message_bytes=MAX_MESSAGE)
        port = await server.start("127.0.0.1", 0)
        print(port, flush=True)
        await asyncio.Event().wait()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- attack plumbing ----------------------------------------------------------------------------------


@dataclass
class Answer:
    """What the attacker saw of the server."""

    goaways: list[int] = field(default_factory=list)
    resets: dict[int, int] = field(default_factory=dict)  # RST_STREAM code -> count
    statuses: dict[str, int] = field(default_factory=dict)  # grpc-status -> count
    closed: int = 0  # connections the server closed
    stalled: bool = False  # the server stopped reading from the attacker
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = []
        if self.goaways:
            codes = sorted(set(self.goaways))
            parts.append("GOAWAY " + "/".join(ERROR_NAMES.get(c, hex(c)) for c in codes))
        if self.stalled:
            parts.append("stopped reading")
        for code, n in sorted(self.resets.items()):
            parts.append(f"{n} RST {ERROR_NAMES.get(code, hex(code))}")
        for status, n in sorted(self.statuses.items()):
            parts.append(f"{n} grpc-status {status}")
        if self.closed:
            parts.append(f"{self.closed} closed")
        parts.extend(self.notes)
        return ", ".join(parts) or "nothing (accepted)"


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">HBBBL", n >> 8, n & 0xFF, ftype, flags, sid) + payload


def grpc_msg(data: bytes, declared: int | None = None) -> bytes:
    return b"\x00" + struct.pack(">L", len(data) if declared is None else declared) + data


def parse_frames(buf: bytes, answer: Answer) -> None:
    """Record the GOAWAYs and RST_STREAMs in a byte stream from the server (incomplete tail ignored)."""
    off = 0
    while len(buf) - off >= 9:
        hi, lo, ftype, _flags, _sid = struct.unpack_from(">HBBBL", buf, off)
        length = (hi << 8) | lo
        if len(buf) - off - 9 < length:
            break
        payload = buf[off + 9 : off + 9 + length]
        if ftype == 0x7 and length >= 8:
            answer.goaways.append(struct.unpack_from(">L", payload, 4)[0])
        elif ftype == 0x3 and length == 4:
            code = struct.unpack(">L", payload)[0]
            answer.resets[code] = answer.resets.get(code, 0) + 1
        off += 9 + length


async def raw_connect(port: int, rcvbuf: int = 0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock, limit=1 << 22)


async def read_answer(reader: asyncio.StreamReader, answer: Answer, seconds: float, cap: int = 64 << 20) -> None:
    """Read what the server sent (up to `cap` bytes, for `seconds`) and record it."""
    buf = bytearray()
    deadline = time.monotonic() + seconds
    with contextlib.suppress(TimeoutError, ConnectionError):
        while len(buf) < cap:
            chunk = await asyncio.wait_for(reader.read(1 << 20), max(0.01, deadline - time.monotonic()))
            if not chunk:
                answer.closed += 1
                break
            buf += chunk
    parse_frames(bytes(buf), answer)


async def blast(port: int, seconds: float, opening: bytes, unit: bytes, *, limit_bytes: int = 0) -> Answer:
    """Write `unit` over and over (never reading) until time is up; then see how the server answered."""
    answer = Answer()
    reader, writer = await raw_connect(port, rcvbuf=4096)
    writer.write(PREFACE + frame(0x4, 0, 0) + opening)
    chunk = unit * max(1, 65536 // len(unit))
    sent = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and (not limit_bytes or sent < limit_bytes):
            writer.write(chunk)
            sent += len(chunk)
            t0 = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(writer.drain(), max(0.01, deadline - time.monotonic()))
            if time.monotonic() - t0 > 0.5:
                answer.stalled = True
    except ConnectionError:
        answer.notes.append("reset by server")
    else:
        if limit_bytes and sent >= limit_bytes:
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
    answer.notes.append(f"{sent / 1e6:.0f} MB sent")
    await read_answer(reader, answer, 2.0)
    writer.transport.abort()
    return answer


def _hpack_block() -> bytes:
    import hpack

    return hpack.Encoder().encode(REQUEST_HEADERS)


async def ping_flood(port: int, seconds: float) -> Answer:
    return await blast(port, seconds, b"", frame(0x6, 0, 0, b"12345678"))


async def settings_flood(port: int, seconds: float) -> Answer:
    return await blast(port, seconds, b"", frame(0x4, 0, 0, struct.pack(">HL", 4, 65535)))


async def rst_flood(port: int, seconds: float) -> Answer:
    import hpack

    enc = hpack.Encoder()
    first = frame(0x1, 0x5, 1, enc.encode(REQUEST_HEADERS))  # END_STREAM | END_HEADERS: served, closed
    again = frame(0x1, 0x5, 1, enc.encode(REQUEST_HEADERS))  # all indexed now: the same bytes each time
    return await blast(port, seconds, first, again)


async def empty_continuation(port: int, seconds: float) -> Answer:
    opening = frame(0x1, 0, 1, _hpack_block()[:3])  # HEADERS without END_HEADERS
    return await blast(port, seconds, opening, frame(0x9, 0, 1), limit_bytes=27_000_000)


async def empty_data(port: int, seconds: float) -> Answer:
    opening = frame(0x1, 0x4, 1, _hpack_block())
    return await blast(port, seconds, opening, frame(0x0, 0, 1), limit_bytes=27_000_000)


class H2Peer:
    """A flow-control-abiding attacker on h2's client state machine."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, window: int | None) -> None:
        import h2.config
        import h2.connection

        self.reader, self.writer = reader, writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.h2.initiate_connection()
        if window is not None:
            self.h2.update_settings({0x4: window})
        self.open: set[int] = set()
        self.dead = False
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def open_streams(self, n: int) -> None:
        for _ in range(n):
            sid = self.h2.get_next_available_stream_id()
            self.h2.send_headers(sid, REQUEST_HEADERS)
            self.open.add(sid)
        self.flush()

    async def pump(self, answer: Answer, timeout: float = 0.005) -> None:
        import h2.events
        import h2.exceptions

        if self.dead:
            return
        try:
            await asyncio.wait_for(self.writer.drain(), 1.0)
            data = await asyncio.wait_for(self.reader.read(1 << 20), timeout)
        except TimeoutError:
            return
        except ConnectionError:
            data = b""
        if not data:
            self.dead = True
            answer.closed += 1
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as err:
            answer.notes.append(f"h2: {err}")
            self.dead = True
            return
        for ev in events:
            if isinstance(ev, h2.events.ResponseReceived | h2.events.TrailersReceived):
                for name, value in ev.headers:
                    if name == "grpc-status":
                        answer.statuses[value] = answer.statuses.get(value, 0) + 1
            elif isinstance(ev, h2.events.StreamEnded):
                self.open.discard(ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                answer.resets[ev.error_code] = answer.resets.get(ev.error_code, 0) + 1
                self.open.discard(ev.stream_id)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                answer.goaways.append(ev.error_code)
                self.dead = True
        self.flush()


async def h2_attack(port: int, seconds: float, conns: int, streams: int, window: int | None,
                    send: Callable[[H2Peer, int, bool], bool]) -> Answer:  # fmt: skip
    answer = Answer()
    peers = []
    for _ in range(conns):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
        peer = H2Peer(reader, writer, window)
        peer.open_streams(streams)
        peers.append(peer)
    started: set[tuple[int, int]] = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not all(p.dead for p in peers):
        for i, peer in enumerate(peers):
            if peer.dead:
                continue
            for sid in sorted(peer.open):
                if send(peer, sid, (i, sid) not in started):
                    started.add((i, sid))
            peer.flush()
            await peer.pump(answer)
    stalled = sum(1 for p in peers if not p.dead for sid in p.open if p.h2.local_flow_control_window(sid) <= 0)
    if stalled:
        answer.notes.append(f"{stalled} streams left without credit")
    for peer in peers:
        peer.writer.transport.abort()
    return answer


async def unfinished_messages(port: int, seconds: float) -> Answer:
    chunk = b"u" * 16000

    def send(peer: H2Peer, sid: int, first: bool) -> bool:
        data = grpc_msg(chunk, declared=MAX_MESSAGE) if first else chunk
        if peer.h2.local_flow_control_window(sid) < len(data):
            return False
        peer.h2.send_data(sid, data)
        return True

    return await h2_attack(port, seconds, 2, 200, None, send)


async def zero_window(port: int, seconds: float) -> Answer:
    msg = grpc_msg(b"z" * (64 * 1024 - 5))

    def send(peer: H2Peer, sid: int, first: bool) -> bool:
        if peer.h2.local_flow_control_window(sid) < len(msg):
            return False
        for off in range(0, len(msg), 16384):
            peer.h2.send_data(sid, msg[off : off + 16384])
        return True

    return await h2_attack(port, seconds, 2, 100, 0, send)


async def hpack_padding(port: int, seconds: float) -> Answer:
    answer = Answer()
    reader, writer = await raw_connect(port)
    writer.write(PREFACE + frame(0x4, 0, 0))
    padding = b"\x20" * 16384
    for i in range(40):  # 40 blocks of 256 KB, each on its own stream
        sid = 2 * i + 1
        writer.write(frame(0x1, 0, sid, padding))
        for j in range(15):
            # The last update differs per block, so a decoded-block cache cannot help.
            last = padding[:-1] + bytes([0x20 + i % 31]) if j == 14 else padding
            writer.write(frame(0x9, 0x4 if j == 14 else 0, sid, last))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
    await read_answer(reader, answer, seconds)
    writer.transport.abort()
    return answer


async def idle_connections(port: int, seconds: float) -> Answer:
    answer = Answer()
    t0 = time.monotonic()
    conns = [await raw_connect(port) for _ in range(400)]
    closed_at: list[float] = []

    async def watch(reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(TimeoutError, ConnectionError):
            while await asyncio.wait_for(reader.read(65536), max(0.01, t0 + seconds - time.monotonic())):
                pass
            closed_at.append(time.monotonic() - t0)

    await asyncio.gather(*(watch(r) for r, _ in conns))
    answer.closed = len(closed_at)
    if closed_at:
        answer.notes.append(f"closed after {min(closed_at):.1f}-{max(closed_at):.1f} s")
    else:
        answer.notes.append(f"all 400 still open after {seconds:.0f} s")
    for _, w in conns:
        w.transport.abort()
    return answer


ATTACKS: dict[str, tuple[Callable[[int, float], Awaitable[Answer]], float]] = {
    # name -> (attack, seconds as a multiple of --seconds; idle-connections outlasts the 10 s handshake timeout)
    "ping-flood": (ping_flood, 1),
    "settings-flood": (settings_flood, 1),
    "rst-flood": (rst_flood, 1),
    "empty-continuation": (empty_continuation, 1),
    "empty-data": (empty_data, 1),
    "unfinished-messages": (unfinished_messages, 1),
    "zero-window": (zero_window, 1),
    "hpack-padding": (hpack_padding, 2),
    "idle-connections": (idle_connections, 0),
}
IDLE_SECONDS = 13.0


# --- the bench ----------------------------------------------------------------------------------------


@dataclass
class Result:
    attack: str
    base_rss_mb: float
    peak_rss_mb: float
    server_cpu_s: float
    legit_ok: int
    legit_failed: int
    legit_max_ms: float
    answer: str
    server_died: bool


async def legit_loop(port: int, stop: asyncio.Event) -> tuple[int, int, float]:
    import grpc

    ok = failed = 0
    worst = 0.0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary(ECHO)
        await call(b"warm-up", timeout=5)
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                assert await call(b"legit" * 20, timeout=1.0) == b"legit" * 20
                ok += 1
            except Exception:
                failed += 1
            worst = max(worst, time.monotonic() - t0)
            await asyncio.sleep(0.02)
    return ok, failed, worst


async def run_attack(name: str, seconds: float, module: str | None) -> Result:
    attack, factor = ATTACKS[name]
    duration = seconds * factor if factor else IDLE_SECONDS
    argv = [sys.executable, __file__, "--serve"] + (["--server-module", module] if module else [])
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log: list[str] = []

    async def collect_log() -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            log.append(line.decode(errors="replace").rstrip())

    logger = asyncio.create_task(collect_log())
    try:
        assert proc.stdout is not None
        port = int(await asyncio.wait_for(proc.stdout.readline(), 20))
        stop = asyncio.Event()
        legit = asyncio.create_task(legit_loop(port, stop))
        await asyncio.sleep(0.5)
        base = proc_rss_mb(proc.pid)
        cpu0 = proc_cpu_s(proc.pid)
        peak = base
        done = False

        async def sample() -> None:
            nonlocal peak
            while not done:
                with contextlib.suppress(OSError, ValueError):
                    peak = max(peak, proc_rss_mb(proc.pid))
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        answer = await asyncio.wait_for(attack(port, duration), duration + 60)
        await asyncio.sleep(0.5)
        stop.set()
        ok, failed, worst = await legit
        done = True
        await sampler
        died = proc.returncode is not None
        cpu = proc_cpu_s(proc.pid) - cpu0 if not died else float("nan")
        answer.notes.extend(server_says(log))
        return Result(name, round(base, 1), round(peak, 1), round(cpu, 2), ok, failed, round(worst * 1000, 1),
                      answer.describe(), died)  # fmt: skip
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        logger.cancel()


def server_says(log: list[str]) -> list[str]:
    """The server's distinct complaints, without peer addresses (a flooder's GOAWAY may never reach it)."""
    seen: dict[str, int] = {}
    for line in log:
        text = re.sub(r"127\.0\.0\.1:\d+", "peer", line)
        if "Traceback" in text or text.startswith(" "):
            continue
        seen[text] = seen.get(text, 0) + 1
    return [f"log: {text}" + (f" (x{n})" if n > 1 else "") for text, n in list(seen.items())[:3]]


def print_table(title: str, results: list[Result]) -> None:
    print(f"\n{title}")
    head = f"{'attack':20} {'RSS base -> peak MB':>20} {'CPU s':>6} {'legit ok/failed':>16} {'slowest ms':>10}  answer"
    print(head)
    print("-" * len(head))
    for r in results:
        rss = f"{r.base_rss_mb:.0f} -> {r.peak_rss_mb:.0f}"
        legit = f"{r.legit_ok}/{r.legit_failed}"
        print(f"{r.attack:20} {rss:>20} {r.server_cpu_s:>6.1f} {legit:>16} {r.legit_max_ms:>10.0f}  "
              f"{r.answer}{' (server died)' if r.server_died else ''}")  # fmt: skip


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    names = [n for n in (args.only.split(",") if args.only else ATTACKS) if n]
    runs: list[tuple[str, str | None]] = [("current", None)]
    if args.baseline:
        runs.append(("baseline", args.baseline))
    out: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "seconds": args.seconds,
        "legit": "one grpcio unary echo every 20 ms on its own connection, 1 s deadline",
    }
    for label, module in runs:
        results = []
        for name in names:
            result = await run_attack(name, args.seconds, module)
            print(f"  {label:8} {name:20} peak RSS {result.peak_rss_mb:7.1f} MB, legit "
                  f"{result.legit_ok}/{result.legit_failed}, {result.answer}", flush=True)  # fmt: skip
            results.append(result)
        out[label] = {"module": module or "ext_proc/h2grpc.py", "results": [asdict(r) for r in results]}
        print_table(f"{label}: {module or 'ext_proc/h2grpc.py'}", results)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0, help="duration of each sustained attack")
    ap.add_argument("--only", default="", help="comma-separated attack names")
    ap.add_argument("--baseline", default="", help="another h2grpc.py to run the same attacks against")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "attack.json"))
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--server-module", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.server_module or None)
        return
    unknown = set(filter(None, args.only.split(","))) - set(ATTACKS)
    if unknown:
        ap.error(f"unknown attacks: {', '.join(sorted(unknown))}")
    results = asyncio.run(bench(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
