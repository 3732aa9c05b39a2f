"""Hostile peers against ext_proc.h2grpc: each attack gets the answer grpcio would give (or better),
bounded server memory, and a legitimate grpcio request on another connection answered meanwhile.

Frames are built with the ``h2`` package: hyperframe's frame classes for raw frame sequences, and
``h2.connection.H2Connection`` for attackers that play by flow control. Memory is measured with the
server's own counters (``buffered_inbound_bytes``, ``queued_outbound_bytes``), which count exactly
what a peer can make the server hold; the attackers run in this process, so RSS would count them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ext_proc.h2grpc import GrpcServer, ServerLimits, ServerStream

ECHO = "/test.Echo/Bidi"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

NO_ERROR, PROTOCOL_ERROR, SETTINGS_TIMEOUT, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x0, 0x1, 0x4, 0x9, 0xB
LEGIT_DEADLINE = 1.5  # seconds a legitimate request may take while an attack runs
ATTACK_SECONDS = 1.5  # how long the sustained attacks run

LOOPS = ["asyncio", "uvloop"]


def _run(coro: Coroutine[Any, Any, None], loop: str = "asyncio", timeout: float = 20) -> None:
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(asyncio.wait_for(coro, timeout))
    else:
        with asyncio.Runner() as runner:
            runner.run(asyncio.wait_for(coro, timeout))


# --- server and legitimate client --------------------------------------------------------------------


class Echo:
    """Echoes every message; finishes OK when the client half-closes."""

    def __init__(self, stream: ServerStream) -> None:
        self.stream = stream

    def on_message(self, data: bytes) -> None:
        self.stream.send_message(data)

    def on_half_close(self) -> None:
        self.stream.finish()

    def on_close(self, reset: bool) -> None:
        pass


class ErrorLog(logging.Handler):
    """Collects ERROR records of the server: a bug in frame handling is logged as 'connection failed'."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.asynccontextmanager
async def echo_server(limits: ServerLimits | None = None, **kwargs: Any) -> AsyncIterator[tuple[GrpcServer, int]]:
    errors = ErrorLog()
    logger = logging.getLogger("ext_proc.h2grpc")
    logger.addHandler(errors)
    loop_errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    server = GrpcServer({ECHO: Echo}, limits=limits, **kwargs)
    port = await server.start("127.0.0.1", 0)
    try:
        yield server, port
    finally:
        await server.stop(grace=0.2)
        logger.removeHandler(errors)
        loop.set_exception_handler(None)
    assert not errors.records, [r.getMessage() for r in errors.records]
    assert not loop_errors, loop_errors


async def legit_request(port: int, deadline: float = LEGIT_DEADLINE) -> float:
    """One unary call from grpcio on its own connection; returns its latency."""
    t0 = time.monotonic()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        assert await ch.unary_unary(ECHO)(b"legit", timeout=deadline) == b"legit"
    return time.monotonic() - t0


async def legit_while(port: int, running: Callable[[], bool], deadline: float = LEGIT_DEADLINE) -> list[float]:
    """Legitimate requests, one after another, for as long as the attack runs (at least one)."""
    latencies = [await legit_request(port, deadline)]
    while running():
        latencies.append(await legit_request(port, deadline))
        await asyncio.sleep(0.02)
    return latencies


async def eventually(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --- raw peer ----------------------------------------------------------------------------------------


def raw_frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    """A frame hyperframe would refuse to build (wrong length, unknown type)."""
    n = len(payload)
    return struct.pack(">HBBBL", n >> 8, n & 0xFF, ftype, flags, sid) + payload


def grpc_msg(data: bytes, declared: int | None = None) -> bytes:
    return b"\x00" + struct.pack(">L", len(data) if declared is None else declared) + data


REQUEST_HEADERS = [
    (":method", "POST"), (":scheme", "http"), (":path", ECHO), (":authority", "test"),
    ("content-type", "application/grpc"), ("te", "trailers"),
]  # fmt: skip


class RawPeer:
    """Writes the bytes it is given, reads frames (parsed by hyperframe) when asked to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.encoder = hpack.Encoder()

    @classmethod
    async def connect(cls, port: int, *, preface: bool = True, rcvbuf: int = 0) -> RawPeer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        peer = cls(reader, writer)
        if preface:
            peer.send(PREFACE, SettingsFrame(0).serialize())
        return peer

    def send(self, *chunks: bytes) -> None:
        self.writer.write(b"".join(chunks))

    def block(self) -> bytes:
        return self.encoder.encode(REQUEST_HEADERS)

    async def read_frame(self, timeout: float = 3.0) -> Frame | None:
        """The next frame, or None at EOF (or a reset connection)."""
        try:
            head = await asyncio.wait_for(self.reader.readexactly(9), timeout)
            frame, length = Frame.parse_frame_header(memoryview(head))
            body = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        except (asyncio.IncompleteReadError, ConnectionResetError):
            return None
        frame.parse_body(memoryview(body))
        return frame

    async def read_until_closed(self, timeout: float = 5.0) -> list[Frame]:
        frames = []
        deadline = time.monotonic() + timeout
        while (f := await self.read_frame(max(0.01, deadline - time.monotonic()))) is not None:
            frames.append(f)
        return frames

    def close(self) -> None:
        self.writer.close()


def goaway_codes(frames: list[Frame]) -> list[int]:
    return [f.error_code for f in frames if isinstance(f, GoAwayFrame)]


@dataclass
class Flood:
    """An attack that writes one big burst and then waits; `done` once the server closed on it."""

    peer: RawPeer
    frames: list[Frame] = field(default_factory=list)
    done: bool = False

    async def collect(self, timeout: float = 8.0) -> None:
        self.frames = await self.peer.read_until_closed(timeout)
        self.done = True


async def flood_attack(port: int, burst: Callable[[RawPeer], bytes], expect_code: int) -> None:
    peer = await RawPeer.connect(port)
    peer.send(burst(peer))
    flood = Flood(peer)
    reader = asyncio.create_task(flood.collect())
    latencies = await legit_while(port, lambda: not flood.done)
    await reader
    peer.close()
    assert goaway_codes(flood.frames) == [expect_code]
    assert max(latencies) < LEGIT_DEADLINE


# --- control-frame floods ----------------------------------------------------------------------------

PING = PingFrame(0, opaque_data=b"floodfld").serialize()


def _ping_flood(peer: RawPeer) -> bytes:
    return PING * 20000


def _settings_flood(peer: RawPeer) -> bytes:
    return SettingsFrame(0, settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535}).serialize() * 2000


def _reset_flood(peer: RawPeer) -> bytes:
    # Stream 1 opens and ends at once; HEADERS again on it (a closed stream) provoke RST_STREAM each.
    headers = HeadersFrame(1, peer.block(), flags=["END_HEADERS", "END_STREAM"]).serialize()
    again = HeadersFrame(1, peer.block(), flags=["END_HEADERS", "END_STREAM"]).serialize()
    return headers + again * 5000


def _priority_flood(peer: RawPeer) -> bytes:
    # PRIORITY of the wrong length: each one provokes RST_STREAM(FRAME_SIZE_ERROR).
    return raw_frame(0x2, 0, 3, b"\0\0\0") * 5000


def _empty_data_flood(peer: RawPeer) -> bytes:
    headers = HeadersFrame(1, peer.block(), flags=["END_HEADERS"]).serialize()
    return headers + DataFrame(1, b"").serialize() * 100000


def _empty_continuation_flood(peer: RawPeer) -> bytes:
    headers = HeadersFrame(1, peer.block()[:3]).serialize()  # no END_HEADERS
    return headers + ContinuationFrame(1, b"").serialize() * 100000


def _unknown_frame_flood(peer: RawPeer) -> bytes:
    return raw_frame(0xFA, 0, 0, b"x") * 100000


FLOODS = {
    "ping": _ping_flood,
    "settings": _settings_flood,
    "provoked-rst-stream": _reset_flood,
    "bad-priority": _priority_flood,
    "empty-data": _empty_data_flood,
    "empty-continuation": _empty_continuation_flood,
    "unknown-frames": _unknown_frame_flood,
}


@pytest.mark.parametrize("attack", sorted(FLOODS))
def test_control_frame_flood_gets_enhance_your_calm(attack: str) -> None:
    """grpcio answers floods with GOAWAY(ENHANCE_YOUR_CALM) too ("too_many_pings")."""

    async def scenario() -> None:
        async with echo_server() as (server, port):
            await flood_attack(port, FLOODS[attack], ENHANCE_YOUR_CALM)
            await eventually(lambda: server.connections == 0 and server.open_streams == 0)

    _run(scenario())


def test_envoy_rates_do_not_trip_flood_limits() -> None:
    """Envoy's keepalive PINGs, a few SETTINGS and one RST_STREAM per finished stream are not floods."""

    async def scenario() -> None:
        async with echo_server() as (_server, port):
            peer = await RawPeer.connect(port)
            for i in range(1, 400, 2):  # 200 streams, each ended the way Envoy ends ext_proc streams
                peer.send(
                    HeadersFrame(i, peer.block(), flags=["END_HEADERS"]).serialize(),
                    DataFrame(i, grpc_msg(b"x" * 100)).serialize(),
                    DataFrame(i, b"", flags=["END_STREAM"]).serialize(),
                    RstStreamFrame(i, 0x8).serialize(),
                )
                if i % 10 == 1:
                    peer.send(PingFrame(0, opaque_data=b"keepaliv").serialize())
            peer.send(SettingsFrame(0, settings={4: 1 << 20}).serialize())
            peer.send(PingFrame(0, opaque_data=b"lastping").serialize())
            while True:
                f = await peer.read_frame()
                assert f is not None and not isinstance(f, GoAwayFrame)
                if isinstance(f, PingFrame) and f.opaque_data == b"lastping":
                    break
            peer.close()

    _run(scenario())


@pytest.mark.parametrize("loop", LOOPS)
def test_peer_that_never_reads_is_not_read_either(loop: str) -> None:
    """Write backpressure: with the PING limit out of the way, a peer that floods PINGs and reads
    nothing stops being read once its unread replies pass the high-water mark; the server's unsent
    bytes stay bounded (before: RSS 66 -> 531 MB in 14 s, and legitimate requests got 503s)."""
    high_water = 256 * 1024
    limits = ServerLimits(pings_per_second=10**9, write_high_water=high_water)

    async def scenario() -> None:
        async with echo_server(limits) as (server, port):
            peer = await RawPeer.connect(port, rcvbuf=4096)
            burst = PING * (1 << 19)  # 8.5 MiB of PINGs: more than the kernel buffers in between
            peer.send(burst)
            peak = 0
            paused = False
            t_end = time.monotonic() + ATTACK_SECONDS
            legit = asyncio.create_task(legit_while(port, lambda: time.monotonic() < t_end))
            while time.monotonic() < t_end:
                peak = max(peak, server.queued_outbound_bytes)
                # White-box: the server stopped reading from the peer.
                paused = paused or any(not c._transport.is_reading() for c in server._connections)
                await asyncio.sleep(0.02)
            latencies = await legit
            assert paused
            # The high-water mark plus what one read (256 KiB at most) can provoke.
            assert 0 < peak <= high_water + 300 * 1024, peak
            assert max(latencies) < LEGIT_DEADLINE
            peer.writer.transport.abort()
            await eventually(lambda: server.connections == 0 and server.queued_outbound_bytes == 0)

    _run(scenario(), loop)


def test_closed_connection_whose_peer_does_not_read_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GOAWAY after a flood cannot be delivered to a peer that reads nothing: the socket is
    aborted after a linger instead of being kept open with its unsent bytes forever."""
    from ext_proc import h2grpc

    monkeypatch.setattr(h2grpc, "_CLOSE_LINGER", 0.3)
    limits = ServerLimits(pings_per_second=10**9, write_high_water=64 * 1024)

    async def scenario() -> None:
        async with echo_server(limits) as (server, port):
            peer = await RawPeer.connect(port, rcvbuf=4096)
            peer.send(PING * (1 << 19))
            await eventually(lambda: any(c._write_paused for c in server._connections))
            conns = list(server._connections)
            for conn in conns:
                conn.goaway(ENHANCE_YOUR_CALM, close=True)
            # Without the linger abort, the transport would wait forever for the peer to read.
            await eventually(lambda: all(c._lost for c in conns), 2.0)
            peer.writer.transport.abort()

    _run(scenario())


# --- buffered data -----------------------------------------------------------------------------------


class H2Attacker:
    """A flow-control-abiding client built on h2's state machine."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, window: int | None) -> None:
        self.reader = reader
        self.writer = writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.h2.initiate_connection()
        if window is not None:
            self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.open: set[int] = set()
        self.statuses: dict[int, str] = {}  # grpc-status per stream
        self.resets: dict[int, int] = {}  # RST_STREAM code per stream
        self.goaway: int | None = None
        self.flush()

    @classmethod
    async def connect(cls, port: int, window: int | None = None) -> H2Attacker:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        return cls(reader, writer, window)

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)

    def open_streams(self, count: int) -> None:
        for _ in range(count):
            sid = self.h2.get_next_available_stream_id()
            self.h2.send_headers(sid, REQUEST_HEADERS)
            self.open.add(sid)
        self.flush()

    def send(self, sid: int, data: bytes) -> int:
        """Send as much of data as the windows allow now; return how much was sent."""
        n = min(len(data), self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
        if n > 0:
            self.h2.send_data(sid, data[:n])
        return max(n, 0)

    async def pump(self, timeout: float = 0.01, ack: bool = False) -> bool:
        """Read what the server sent within timeout (acknowledging DATA if asked to); False at EOF."""
        await self.writer.drain()
        try:
            data = await asyncio.wait_for(self.reader.read(1 << 20), timeout)
        except TimeoutError:
            return True
        if not data:
            return False
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                for name, value in event.headers:
                    if name == "grpc-status":
                        self.statuses[event.stream_id] = value
            elif isinstance(event, h2.events.StreamEnded):
                self.open.discard(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.resets[event.stream_id] = event.error_code
                self.open.discard(event.stream_id)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event.error_code
            elif isinstance(event, h2.events.DataReceived) and ack:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        self.flush()
        return True

    def close(self) -> None:
        self.writer.close()


def test_unfinished_messages_are_bounded_per_connection_and_process() -> None:
    """200 streams per connection, each holding an unfinished 5 MiB message (before: RSS 66 -> 1,067 MB).
    Past half a cap, connection credit is withheld; at a cap the stream is ended RESOURCE_EXHAUSTED."""
    mib = 1024 * 1024
    limits = ServerLimits(connection_inbound_bytes=8 * mib, process_inbound_bytes=12 * mib)

    async def scenario() -> None:
        async with echo_server(limits, max_message_bytes=5 * mib) as (server, port):
            attackers = [await H2Attacker.connect(port) for _ in range(2)]
            chunk = b"a" * 65536
            sent: dict[tuple[int, int], int] = {}
            peak = peak_headers = 0
            withheld = 0
            t_end = time.monotonic() + ATTACK_SECONDS

            async def attack() -> None:
                nonlocal peak, peak_headers, withheld
                for a in attackers:
                    a.open_streams(200)
                while time.monotonic() < t_end:
                    for i, a in enumerate(attackers):
                        for sid in sorted(a.open):
                            first = (i, sid) not in sent
                            n = a.send(sid, grpc_msg(chunk, declared=5 * mib) if first else chunk)
                            if n:
                                sent[(i, sid)] = sent.get((i, sid), 0) + n
                        a.flush()
                    for a in attackers:
                        await a.pump()
                    peak = max(peak, server.buffered_inbound_bytes)
                    peak_headers = max(peak_headers, server.header_bytes)
                    for conn in server._connections:
                        assert conn._buffered_in <= limits.connection_inbound_bytes
                        withheld = max(withheld, conn._withheld)  # white-box: credit was held back

            legit = asyncio.create_task(legit_while(port, lambda: time.monotonic() < t_end))
            await attack()
            latencies = await legit
            assert peak <= limits.process_inbound_bytes, peak
            assert 0 < peak_headers <= limits.process_inbound_bytes
            # Streams over the caps were failed and told to stop; the rest wait without credit.
            failed = sum(list(a.statuses.values()).count("8") for a in attackers)
            assert failed > 0
            assert withheld > 0
            assert max(latencies) < LEGIT_DEADLINE
            for a in attackers:
                a.close()
            await eventually(lambda: server.connections == 0 and server.buffered_inbound_bytes == 0)

    _run(scenario())


def test_stalled_connection_drops_its_largest_unfinished_message() -> None:
    """Withheld credit must not deadlock a peer: when its connection window runs dry, the largest
    unfinished message is dropped (RESOURCE_EXHAUSTED) and its credit returned, so the others finish."""
    mib = 1024 * 1024
    limits = ServerLimits(connection_inbound_bytes=16 * mib)  # credit withheld past 8 MiB

    async def scenario() -> None:
        async with echo_server(limits) as (server, port):
            a = await H2Attacker.connect(port, window=16 * mib)
            a.open_streams(5)
            body = b"b" * (6 * mib)
            todo = {sid: grpc_msg(body) for sid in a.open}
            t_end = time.monotonic() + 8
            # Interleave the five 6 MiB messages: 30 MiB outstanding against a 16 MiB connection window.
            while todo and time.monotonic() < t_end:
                for sid in list(todo):
                    if sid not in a.open:
                        del todo[sid]
                        continue
                    n = a.send(sid, todo[sid][:65536])
                    todo[sid] = todo[sid][n:]
                    if not todo[sid]:
                        a.h2.end_stream(sid)
                        del todo[sid]
                a.flush()
                await a.pump(0.005, ack=True)
            while a.open and time.monotonic() < t_end:
                await a.pump(0.05, ack=True)
            assert not todo
            codes = sorted(a.statuses.values())
            assert "8" in codes and "0" in codes, codes
            a.close()
            await eventually(lambda: server.buffered_inbound_bytes == 0)

    _run(scenario())


def test_zero_window_peer_cannot_make_responses_pile_up() -> None:
    """A peer that announces a zero window and sends requests (before: 100 streams, RSS 184 -> 1,028 MB):
    request credit stops once responses queue up, and past the send-queue caps streams are reset."""
    mib = 1024 * 1024
    limits = ServerLimits(stream_outbound_bytes=1 * mib, connection_outbound_bytes=8 * mib,
                          process_outbound_bytes=12 * mib, write_high_water=256 * 1024)  # fmt: skip

    async def scenario() -> None:
        async with echo_server(limits) as (server, port):
            attackers = [await H2Attacker.connect(port, window=0) for _ in range(2)]
            msg = grpc_msg(b"z" * (64 * 1024 - 5))
            peak = 0
            t_end = time.monotonic() + ATTACK_SECONDS
            for a in attackers:
                a.open_streams(100)
            legit = asyncio.create_task(legit_while(port, lambda: time.monotonic() < t_end))
            while time.monotonic() < t_end:
                for a in attackers:
                    for sid in sorted(a.open):
                        if a.h2.local_flow_control_window(sid) >= len(msg):
                            a.h2.send_data(sid, msg)
                    a.flush()
                    await a.pump()
                peak = max(peak, server.queued_outbound_bytes)
            latencies = await legit
            # The process cap, plus one message and the socket buffers above it.
            assert peak <= limits.process_outbound_bytes + 2 * (64 * 1024 + 256 * 1024), peak
            resets = [code for a in attackers for code in a.resets.values()]
            assert ENHANCE_YOUR_CALM in resets
            assert max(latencies) < LEGIT_DEADLINE
            for a in attackers:
                a.close()
            await eventually(lambda: server.connections == 0 and server.queued_outbound_bytes == 0)

    _run(scenario())


def test_slow_reader_is_slowed_not_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    """The soft side of the send-queue limits: a client that reads its echoes slowly through a tiny
    window gets every byte back, because request credit waits for the responses to drain.

    The guarantee needs stream_outbound_bytes above 4/3 of (our stream window + one message): with
    the defaults, 16 MiB against 8 MiB; here 1 MiB against a 256 KiB window."""
    from ext_proc import h2grpc

    monkeypatch.setattr(h2grpc, "_INITIAL_WINDOW_SIZE", 256 * 1024)
    mib = 1024 * 1024
    limits = ServerLimits(stream_outbound_bytes=1 * mib, connection_outbound_bytes=4 * mib)

    async def scenario() -> None:
        async with echo_server(limits) as (server, port):
            a = await H2Attacker.connect(port, window=16384)
            a.open_streams(1)
            (sid,) = a.open
            payload = grpc_msg(b"q" * (16 * 1024 - 5)) * 512  # 8 MiB of 16 KiB messages
            total = len(payload)
            received = 0
            peak = 0
            t_end = time.monotonic() + 10
            while received < total and time.monotonic() < t_end:
                if payload:
                    n = a.send(sid, payload[:65536])
                    payload = payload[n:]
                    if not payload:
                        a.h2.end_stream(sid)
                    a.flush()
                await a.writer.drain()
                with contextlib.suppress(TimeoutError):
                    data = await asyncio.wait_for(a.reader.read(1 << 16), 0.01)
                    for event in a.h2.receive_data(data):
                        if isinstance(event, h2.events.DataReceived):
                            received += event.flow_controlled_length
                            a.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                        elif isinstance(event, h2.events.StreamReset):
                            raise AssertionError(f"stream reset {event.error_code:#x}")
                    a.flush()
                peak = max(peak, server.queued_outbound_bytes)
            assert received == total
            assert peak <= 2 * mib, peak
            a.close()

    _run(scenario())


# --- header blocks -----------------------------------------------------------------------------------


def test_hpack_size_update_padding_is_a_compression_error() -> None:
    """grpcio rejects more than two table-size updates per block; before, 40 blocks of 256 KB of
    size updates stalled the event loop for 7.4 s."""

    async def scenario() -> None:
        async with echo_server() as (server, port):
            # Two updates at the start of a block are valid (RFC 7541 §4.2): the stream is served.
            peer = await RawPeer.connect(port)
            peer.send(
                HeadersFrame(1, b"\x20\x3f\xe1\x1f" + peer.block(), flags=["END_HEADERS"]).serialize(),
                DataFrame(1, grpc_msg(b"ok"), flags=["END_STREAM"]).serialize(),
            )
            while not isinstance(f := await peer.read_frame(), DataFrame):
                assert not isinstance(f, GoAwayFrame)
            assert f.data == grpc_msg(b"ok")
            peer.close()

            # Three is padding.
            peer = await RawPeer.connect(port)
            peer.send(HeadersFrame(1, b"\x20\x20\x20" + peer.block(), flags=["END_HEADERS"]).serialize())
            assert goaway_codes(await peer.read_until_closed()) == [COMPRESSION_ERROR]
            peer.close()

            # The original attack: blocks of 256 KB of size updates, on 40 connections at once.
            padding = b"\x20" * (256 * 1024)
            peers = [await RawPeer.connect(port) for _ in range(40)]
            t0 = time.monotonic()
            for p in peers:
                p.send(HeadersFrame(1, padding[:16000], flags=["END_HEADERS"]).serialize())
            legit = await legit_request(port)
            answers = [goaway_codes(await p.read_until_closed()) for p in peers]
            assert answers == [[COMPRESSION_ERROR]] * 40
            assert time.monotonic() - t0 < 2.0  # before: about 0.3 s of CPU per block, 12 s in all
            assert legit < 1.0
            # ... and spread over CONTINUATION frames past the header-block limit.
            peer = await RawPeer.connect(port)
            peer.send(HeadersFrame(1, padding[:16000]).serialize())
            peer.send(*(ContinuationFrame(1, padding[:16000]).serialize() for _ in range(16)))
            assert goaway_codes(await peer.read_until_closed()) == [ENHANCE_YOUR_CALM]
            peer.close()
            for p in peers:
                p.close()
            await eventually(lambda: server.connections == 0)

    _run(scenario())


def test_headers_of_open_streams_count_against_the_inbound_caps() -> None:
    """Streams opened with large header lists (up to the 16 KiB limit) cannot pile up past the
    connection cap: further streams are refused."""
    limits = ServerLimits(connection_inbound_bytes=1024 * 1024)

    async def scenario() -> None:
        async with echo_server(limits) as (server, port):
            peer = await RawPeer.connect(port)
            big = [*REQUEST_HEADERS, ("x-big", "v" * 15000)]
            for sid in range(1, 401, 2):  # 200 streams of ~15 KB headers: 3 MB wanted
                block = peer.encoder.encode(big, huffman=False)
                peer.send(HeadersFrame(sid, block, flags=["END_HEADERS"]).serialize())
            peer.send(PingFrame(0, opaque_data=b"finished").serialize())
            refused = 0
            while True:
                f = await peer.read_frame()
                assert f is not None
                if isinstance(f, RstStreamFrame) and f.error_code == 0x7:
                    refused += 1
                if isinstance(f, PingFrame) and f.opaque_data == b"finished":
                    break
            assert refused > 0
            assert 0 < server.header_bytes <= limits.connection_inbound_bytes
            await legit_request(port)  # other connections are not refused
            peer.close()
            await eventually(lambda: server.header_bytes == 0 and server.open_streams == 0)

    _run(scenario())


# --- timeouts ----------------------------------------------------------------------------------------


def test_handshake_timeout_closes_silent_connections() -> None:
    """Connections that never send the preface are closed (before: 400 idle connections kept 150 s;
    grpcio closes them after about a minute)."""
    limits = ServerLimits(handshake_timeout=0.3, idle_timeout=0.5)

    async def scenario() -> None:
        async with echo_server(limits) as (server, port):
            silent = [await RawPeer.connect(port, preface=False) for _ in range(50)]
            partial = await RawPeer.connect(port, preface=False)
            partial.send(PREFACE[:10])
            await eventually(lambda: server.connections == 51)
            t0 = time.monotonic()
            await eventually(lambda: server.connections == 0, 3.0)
            assert time.monotonic() - t0 < 2.0
            frames = await silent[0].read_until_closed(1.0)
            assert goaway_codes(frames) == [SETTINGS_TIMEOUT]
            await legit_request(port)
            for p in [*silent, partial]:
                p.close()

    _run(scenario())


def test_idle_timeout_is_graceful_and_spares_open_streams() -> None:
    """A connection without streams is closed after idle_timeout: GOAWAY(2^31-1) first, the final
    GOAWAY a grace period later. A connection with an open stream is never idle."""
    limits = ServerLimits(handshake_timeout=0.3, idle_timeout=0.4)

    async def scenario() -> None:
        async with echo_server(limits) as (_server, port):
            idle = await RawPeer.connect(port)
            busy = await RawPeer.connect(port)
            busy.send(HeadersFrame(1, busy.block(), flags=["END_HEADERS"]).serialize())
            frames = await idle.read_until_closed(4.0)
            goaways = [f for f in frames if isinstance(f, GoAwayFrame)]
            assert [(g.last_stream_id, g.error_code) for g in goaways] == [(2**31 - 1, NO_ERROR), (0, NO_ERROR)]
            # Well past the idle timeout, the stream still works.
            busy.send(DataFrame(1, grpc_msg(b"still here"), flags=["END_STREAM"]).serialize())
            data = None
            while data is None:
                f = await busy.read_frame()
                assert f is not None and not isinstance(f, GoAwayFrame)
                data = f if isinstance(f, DataFrame) else None
            assert data.data == grpc_msg(b"still here")
            # grpcio reconnects after its idle connection was closed.
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                assert await ch.unary_unary(ECHO)(b"1", timeout=2) == b"1"
                await asyncio.sleep(1.8)  # idle close of this channel's connection
                assert await ch.unary_unary(ECHO)(b"2", timeout=2) == b"2"
            idle.close()
            busy.close()

    _run(scenario())


def test_default_limits_are_generous() -> None:
    limits = ServerLimits()
    assert limits.handshake_timeout >= 10 and limits.idle_timeout >= 60
    assert limits.pings_per_second >= 100 and limits.settings_per_second >= 10
    assert limits.connection_inbound_bytes >= 4 * 16 * 1024 * 1024


# --- random frame sequences --------------------------------------------------------------------------

_sids = st.sampled_from([0, 1, 3, 5, 7, 2, 99])
_stream_sids = _sids.filter(bool)
_payload = st.binary(max_size=64)


def _data(sid: int, body: bytes, end: bool, declared: int | None) -> bytes:
    return DataFrame(sid, grpc_msg(body, declared), flags=["END_STREAM"] if end else []).serialize()


def _messages(sid: int, bodies: list[bytes]) -> bytes:
    return DataFrame(sid, b"".join(grpc_msg(b) for b in bodies)[:-3]).serialize()


def _continuation(sid: int, data: bytes, end: bool) -> bytes:
    return ContinuationFrame(sid, data, flags=["END_HEADERS"] if end else []).serialize()


_frames = st.one_of(
    # HEADERS are encoded per connection (HPACK state), so they are described, not built, here.
    st.builds(lambda sid, end: ("headers", sid, end), st.sampled_from([1, 3, 5, 7, 9]), st.booleans()),
    st.builds(_data, _stream_sids, _payload, st.booleans(), st.one_of(st.none(), st.integers(0, 200))),
    st.builds(lambda sid, data: DataFrame(sid, data).serialize(), _stream_sids, st.binary(max_size=3)),
    st.builds(lambda inc, sid: WindowUpdateFrame(sid, inc).serialize(), st.integers(0, 2**31 - 1), _sids),
    st.builds(lambda code, sid: RstStreamFrame(sid, code).serialize(), st.integers(0, 13), _stream_sids),
    st.builds(
        lambda s: SettingsFrame(0, settings=s).serialize(),
        st.dictionaries(st.integers(1, 6), st.integers(0, 2**31 - 1), max_size=3),
    ),
    st.just(PingFrame(0, opaque_data=b"12345678").serialize()),
    # A zero window makes every response queue; small updates release it piecemeal.
    st.just(SettingsFrame(0, settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}).serialize()),
    st.builds(lambda inc, sid: WindowUpdateFrame(sid, inc).serialize(), st.integers(1, 100), _stream_sids),
    # Several messages per frame, the last one possibly unfinished.
    st.builds(_messages, _stream_sids, st.lists(_payload, min_size=1, max_size=4)),
    st.builds(lambda sid: PriorityFrame(sid, depends_on=0, stream_weight=15).serialize(), _stream_sids),
    st.builds(_continuation, _stream_sids, st.binary(max_size=8), st.booleans()),
    st.builds(lambda code: GoAwayFrame(0, 0, code).serialize(), st.integers(0, 13)),
    st.builds(raw_frame, st.integers(0, 12), st.integers(0, 255), _sids, _payload),
    st.binary(min_size=1, max_size=12),
)


class RandomFrames:
    """One server for all examples (a fresh one per example would dominate the run time)."""

    limits = ServerLimits(connection_inbound_bytes=256 * 1024, process_inbound_bytes=512 * 1024,
                          stream_outbound_bytes=64 * 1024, connection_outbound_bytes=128 * 1024,
                          process_outbound_bytes=256 * 1024, write_high_water=64 * 1024)  # fmt: skip

    def __init__(self) -> None:
        self.runner = asyncio.Runner()
        self.server = GrpcServer({ECHO: Echo}, limits=self.limits, max_message_bytes=1000)
        self.port = self.runner.run(self.server.start("127.0.0.1", 0))
        self.errors = ErrorLog()
        self.loop_errors: list[dict[str, Any]] = []
        self.runner.get_loop().set_exception_handler(lambda _loop, context: self.loop_errors.append(context))
        logging.getLogger("ext_proc.h2grpc").addHandler(self.errors)

    def close(self) -> None:
        logging.getLogger("ext_proc.h2grpc").removeHandler(self.errors)
        self.runner.run(self.server.stop(grace=0.1))
        self.runner.close()

    async def example(self, frames: list[Any]) -> None:
        server = self.server
        peer = await RawPeer.connect(self.port)
        wire = []
        for f in frames:
            if isinstance(f, tuple):
                _, sid, end = f
                flags = ["END_HEADERS", "END_STREAM"] if end else ["END_HEADERS"]
                f = HeadersFrame(sid, peer.block(), flags=flags).serialize()
            wire.append(f)
        # Then a PING, then zeros: enough to complete any frame the random bytes left open (the zeros
        # that follow are DATA on stream 0, a connection error), so the server must answer the PING
        # or close the connection, and do it promptly.
        peer.send(*wire, PingFrame(0, opaque_data=b"answered").serialize(), bytes(64 * 1024 + 9))
        try:
            while True:
                f = await peer.read_frame(3.0)
                if f is None or (isinstance(f, PingFrame) and "ACK" in f.flags and f.opaque_data == b"answered"):
                    break
                assert server.buffered_inbound_bytes <= self.limits.connection_inbound_bytes
                assert server.header_bytes <= self.limits.connection_inbound_bytes
                assert server.queued_outbound_bytes <= self.limits.connection_outbound_bytes + 64 * 1024
        finally:
            peer.close()
        # Nothing leaks once the peer is gone.
        await eventually(lambda: server.connections == 0, 2.0)
        assert server.open_streams == 0
        assert server.buffered_inbound_bytes == 0
        assert server.header_bytes == 0
        assert server.queued_outbound_bytes == 0
        assert not self.errors.records, [r.getMessage() for r in self.errors.records]
        assert not self.loop_errors, self.loop_errors


@pytest.fixture(scope="module")
def random_frames() -> Any:
    harness = RandomFrames()
    yield harness
    harness.close()


@settings(max_examples=300, deadline=3000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])  # fmt: skip
@given(frames=st.lists(_frames, max_size=25))
def test_random_frame_sequences_never_break_the_server(random_frames: RandomFrames, frames: list[Any]) -> None:
    random_frames.runner.run(asyncio.wait_for(random_frames.example(frames), 10))
