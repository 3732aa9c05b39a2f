"""A minimal, fast gRPC server over cleartext HTTP/2 (h2c, prior knowledge) on asyncio.

Why this exists: grpcio costs about 1 ms of CPU per ext_proc stream and grpclib (pure-Python ``h2``)
about 0.66 ms, while the router's budget for a whole request is well under 0.3 ms. Envoy is the only
client, so this module implements just what a gRPC server needs from RFC 9113: the frame layer, flow
control in both directions, and gRPC length-prefixed messages with status trailers. There is no TLS,
no compression, no server push and no priority handling.

Performance choices (each one measured):

* One ``asyncio.Protocol`` per connection; frames are parsed straight out of the ``bytes`` the
  transport hands us (offsets, not slices or memoryviews), and only a frame split across reads is
  buffered.
* Everything written while handling one read (SETTINGS ACK, PING ACK, WINDOW_UPDATE, response
  HEADERS/DATA/trailers of every stream) is collected into one bytearray and written with a single
  ``transport.write``; writes made outside a read are flushed once per loop iteration.
* Response header blocks are precomputed bytes (static-table index or literal without indexing, no
  Huffman), so there is no HPACK encoder and no encoder state.
* Request header blocks are decoded with ``hpack``; because Envoy sends the same block for every
  ext_proc stream once its dynamic table is warm, decoded blocks are cached for as long as the
  decoder's dynamic table is unchanged.

Hostile peers (see :class:`ServerLimits`): memory is bounded per stream, per connection and per
process whatever a peer sends or fails to read. Replies a peer does not read stop us reading from it
(write high-water mark); queued response data is capped per stream, connection and process;
unfinished request messages (and, separately, the headers of open streams) are capped per
connection and process (connection-level flow-control credit for buffered bytes is withheld past
half a cap, streams are failed with RESOURCE_EXHAUSTED at it); PING, SETTINGS, provoked RST_STREAM
and empty-frame floods end the connection with GOAWAY(ENHANCE_YOUR_CALM); header blocks are capped
in size and in HPACK table-size updates; connections that never finish the preface, or carry no
stream for a while, are closed. None of this adds work per frame on the common path beyond a
counter or a flag test.

Public API: :class:`GrpcServer`, :class:`ServerLimits`, :class:`ServerStream`, :class:`StreamHandler`,
:data:`HandlerFactory`. All callbacks run on the event loop thread; none of the methods are thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

import hpack
from hpack.exceptions import HPACKError

__all__ = ["GrpcServer", "HandlerFactory", "ServerLimits", "ServerStream", "StreamHandler"]

logger = logging.getLogger(__name__)

# --- HTTP/2 constants (RFC 9113) --------------------------------------------------------------------

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

_DATA = 0x0
_HEADERS = 0x1
_PRIORITY = 0x2
_RST_STREAM = 0x3
_SETTINGS = 0x4
_PUSH_PROMISE = 0x5
_PING = 0x6
_GOAWAY = 0x7
_WINDOW_UPDATE = 0x8
_CONTINUATION = 0x9

_FLAG_END_STREAM = 0x1
_FLAG_ACK = 0x1
_FLAG_END_HEADERS = 0x4
_FLAG_PADDED = 0x8
_FLAG_PRIORITY = 0x20

_NO_ERROR = 0x0
_PROTOCOL_ERROR = 0x1
_INTERNAL_ERROR = 0x2
_FLOW_CONTROL_ERROR = 0x3
_SETTINGS_TIMEOUT = 0x4
_STREAM_CLOSED = 0x5
_FRAME_SIZE_ERROR = 0x6
_REFUSED_STREAM = 0x7
_COMPRESSION_ERROR = 0x9
_ENHANCE_YOUR_CALM = 0xB

_SETTINGS_HEADER_TABLE_SIZE = 0x1
_SETTINGS_ENABLE_PUSH = 0x2
_SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
_SETTINGS_INITIAL_WINDOW_SIZE = 0x4
_SETTINGS_MAX_FRAME_SIZE = 0x5
_SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

_MAX_WINDOW = 2**31 - 1
_DEFAULT_WINDOW = 65535
_DEFAULT_MAX_FRAME = 16384

# Our receive side. Module-level (not constructor arguments) so tests can shrink them to exercise
# flow control; they are read when a connection is made.
_INITIAL_WINDOW_SIZE = 8 * 1024 * 1024  # per stream, announced in SETTINGS
_CONNECTION_WINDOW_SIZE = 16 * 1024 * 1024  # raised from 65535 with a WINDOW_UPDATE right after SETTINGS
# Bigger than the 16 KiB default so large bodies cost fewer frames (and fewer Python iterations).
_MAX_FRAME_SIZE = 64 * 1024
# grpcio's own limit on request metadata (its hard limit is 16 KiB). A gRPC stream's headers are a
# few hundred bytes; the limit also caps the HPACK decoding work one header block can cause.
_MAX_HEADER_LIST_SIZE = 16 * 1024
_MAX_HEADER_BLOCK = 16 * 1024  # HEADERS + CONTINUATION fragments; an encoder never needs more than the list
# RFC 7541 §4.2 needs at most two table-size updates at the start of a block (the smallest size, then
# the final one). More is padding: hpack applies each one, about 1 µs per byte of block.
_MAX_TABLE_SIZE_UPDATES = 2
_HEADER_CACHE_SIZE = 64
_HEADER_CACHE_MAX_BLOCK = 1024  # only small blocks are cached, so the cache stays small too
# After GOAWAY(2^31-1) announces an idle close, streams the peer opened meanwhile are still served for
# this long before the final GOAWAY (RFC 9113 §6.8's graceful shutdown).
_DRAIN_GRACE = 1.0
# Closing a connection is a lingering close: our side is shut down after the last bytes (GOAWAY), and
# what the peer still sends is read and dropped until it closes too, or for at most this long. Closing
# with unread input would make the kernel answer with a TCP reset, and the peer could lose the GOAWAY.
_CLOSE_LINGER = 2.0
_LINGER_MAX_BYTES = 1024 * 1024  # ... and for at most this much input: a flooder is cut off sooner
_FLOOD_WINDOW = 1.0  # seconds; the flood limits count frames per window

# Flood counters (indexes into _H2Connection._flood_count).
_F_PING, _F_SETTINGS, _F_RESET, _F_EMPTY = range(4)
_FLOOD_NAMES = ("PING", "SETTINGS", "provoked RST_STREAM", "empty or no-op frame")

# gRPC status codes used here.
_GRPC_OK = 0
_GRPC_RESOURCE_EXHAUSTED = 8
_GRPC_UNIMPLEMENTED = 12
_GRPC_INTERNAL = 13

# --- precomputed wire pieces -------------------------------------------------------------------------

# Frame header as (length >> 8, length & 0xff, type, flags, stream id): 24-bit length without a pack step.
_FRAME_HDR = struct.Struct(">HBBBL")
# DATA frame header followed by the 5-byte gRPC message prefix (compressed flag, length).
_DATA_GRPC_HDR = struct.Struct(">HBBBLBL")
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")
_ZERO_HDR = bytes(9)
_ZERO_DATA_GRPC_HDR = bytes(14)


def _frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _FRAME_HDR.pack(n >> 8, n & 0xFF, ftype, flags, sid) + payload


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    """RFC 7541 §5.1 integer with an N-bit prefix; `first` holds the representation's flag bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_literal(name: bytes | int, value: bytes) -> bytes:
    """Literal header field without indexing (RFC 7541 §6.2.2), no Huffman.

    `name` is either a static-table index or a new name. Without indexing, the peer's dynamic table is
    never touched, so we need no encoder state at all.
    """
    if isinstance(name, int):
        return _hpack_int(name, 4, 0x00) + _hpack_int(len(value), 7, 0x00) + value
    head = b"\x00" + _hpack_int(len(name), 7, 0x00) + name
    return head + _hpack_int(len(value), 7, 0x00) + value


_HPACK_TABLE_SIZE_ZERO = b"\x20"  # dynamic table size update (RFC 7541 §6.3) to 0
_STATUS_200 = b"\x88"  # static table index 8 is ":status: 200"
_CONTENT_TYPE_GRPC = _hpack_literal(31, b"application/grpc")  # static index 31 is the content-type name
_RESPONSE_HEADER_BLOCK = _STATUS_200 + _CONTENT_TYPE_GRPC
# The HEADERS frame that opens every response; the stream id is patched in with pack_into.
_RESPONSE_HEADERS_FRAME = _frame(_HEADERS, _FLAG_END_HEADERS, 0, _RESPONSE_HEADER_BLOCK)
_GRPC_STATUS_FIELDS = [_hpack_literal(b"grpc-status", str(code).encode()) for code in range(17)]


def _percent_encode(message: str) -> bytes:
    """grpc-message encoding (gRPC over HTTP/2 spec): UTF-8, then %XX for bytes outside 0x20-0x7E and '%'."""
    raw = message.encode("utf-8", "replace")
    if all(0x20 <= b <= 0x7E and b != 0x25 for b in raw):
        return raw
    return b"".join(bytes([b]) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in raw)


def _trailer_block(status: int, message: str, trailers_only: bool) -> bytes:
    if 0 <= status < len(_GRPC_STATUS_FIELDS):
        block = _GRPC_STATUS_FIELDS[status]
    else:
        block = _hpack_literal(b"grpc-status", str(status).encode())
    if message:
        # Keep the whole trailer block inside one minimum-size frame: no CONTINUATION needed.
        block += _hpack_literal(b"grpc-message", _percent_encode(message)[:8192])
    if trailers_only:
        block = _RESPONSE_HEADER_BLOCK + block
    return block


def _count_table_size_updates(block: bytes) -> int:
    """How many dynamic-table size updates (RFC 7541 §6.3) open the block, stopping past the limit."""
    pos = 0
    count = 0
    n = len(block)
    while pos < n and block[pos] & 0xE0 == 0x20 and count <= _MAX_TABLE_SIZE_UPDATES:
        count += 1
        if block[pos] & 0x1F == 0x1F:  # multi-byte integer: continuation bytes have the top bit set
            pos += 1
            while pos < n and block[pos] & 0x80:
                pos += 1
        pos += 1
    return count


_SETTINGS_ACK_FRAME = _frame(_SETTINGS, _FLAG_ACK, 0)


class _ConnectionError(Exception):
    """A connection error (RFC 9113 §5.4.1): answer with GOAWAY(code) and close."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


# --- public API ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerLimits:
    """What one peer may make the server hold or do. The defaults never bind for Envoy's traffic.

    Attributes:
        handshake_timeout: seconds a new connection has to send the client preface and its SETTINGS
            (grpcio closes a connection that has not completed its handshake after about a minute;
            Envoy sends both with its first write). 0 disables.
        idle_timeout: seconds a connection may carry no stream before it is closed gracefully
            (GOAWAY, a grace second for streams in flight, then GOAWAY again). A connection with an
            open stream is never idle, however long the stream lasts. 0 disables.
        connection_inbound_bytes: unfinished request messages held per connection. Past half of it
            the connection-level flow-control credit for newly buffered bytes is withheld (returned as
            the messages complete); a stream whose data would pass it, or the largest unfinished
            message when a withheld connection window runs dry, is ended with grpc-status
            RESOURCE_EXHAUSTED. The request headers of open streams have a budget of the same size:
            a new stream whose headers would pass it is refused (REFUSED_STREAM).
        process_inbound_bytes: the same two budgets, over every connection of the server.
        stream_outbound_bytes: response bytes a stream may have queued (waiting for the peer's
            flow-control window) before another message is refused: the stream is reset with
            ENHANCE_YOUR_CALM and its handler sees ``on_close(reset=True)``. Past a quarter of it the
            stream's request credit waits for the queue to drain, so a client that reads slowly is
            slowed rather than reset as long as this stays above 4/3 of our stream window (8 MiB)
            plus one message.
        connection_outbound_bytes: the same, over one connection (queued data plus the socket's
            unsent bytes); the connection's request credit waits past half of it.
        process_outbound_bytes: the same, over every connection of the server.
        write_high_water: unsent bytes in a connection's socket buffer past which we stop reading
            from that peer (its replies are not being read) and stop sending queued data.
        pings_per_second: PINGs (not ACKs) a connection may send per second.
        settings_per_second: SETTINGS frames (not ACKs) a connection may send per second.
        resets_per_second: RST_STREAMs a connection's frames may provoke from us per second (frames on
            closed streams, refused streams, stream-level protocol errors).
        empty_frames_per_second: frames that carry nothing per second: DATA without payload or
            END_STREAM, header fragments without payload or END_HEADERS, PRIORITY, unknown types.

    Past a flood limit the connection gets GOAWAY(ENHANCE_YOUR_CALM) and is closed.
    """

    handshake_timeout: float = 10.0
    idle_timeout: float = 60.0
    connection_inbound_bytes: int = 64 * 1024 * 1024
    process_inbound_bytes: int = 256 * 1024 * 1024
    stream_outbound_bytes: int = 16 * 1024 * 1024
    connection_outbound_bytes: int = 64 * 1024 * 1024
    process_outbound_bytes: int = 256 * 1024 * 1024
    write_high_water: int = 1024 * 1024
    pings_per_second: int = 200
    settings_per_second: int = 20
    resets_per_second: int = 1000
    empty_frames_per_second: int = 1000


class StreamHandler(Protocol):
    """Receives the events of one gRPC stream. One instance per stream, made by the route's factory.

    Callbacks run on the event loop and must not block. An exception raised by a callback is logged,
    the stream is finished with grpc-status 13 (INTERNAL) and ``on_close`` still runs exactly once.
    """

    def on_message(self, data: bytes) -> None:
        """One complete, uncompressed gRPC message (it may have spanned several DATA frames)."""

    def on_half_close(self) -> None:
        """The client sent END_STREAM: no more messages will arrive."""

    def on_close(self, reset: bool) -> None:
        """The stream is over; called exactly once per stream.

        ``reset`` is False when we had finished (our trailers were written) and the client then
        half-closed or reset the stream, and True when the stream ended before we finished: RST_STREAM
        from the client, connection lost, GOAWAY with an error, server stop, or a send refused because
        the peer was not reading (:attr:`ServerLimits.stream_outbound_bytes`).

        Envoy ends every ext_proc stream the same way, whether the HTTP response completed or its client
        went away: END_STREAM immediately followed by RST_STREAM. A handler that finishes in
        ``on_half_close`` therefore sees ``reset=False`` in both cases; only what it saw of the response
        tells them apart. ``on_close`` may run synchronously inside :meth:`ServerStream.finish` and
        :meth:`ServerStream.send_message`.
        """


class ServerStream:
    """The server side of one gRPC call.

    Attributes:
        path: the request ``:path``, e.g. ``/envoy.service.ext_proc.v3.ExternalProcessor/Process``.
        headers: the decoded request headers, ``(lower-case name, value)`` pairs, pseudo-headers included.
        closed: True once nothing more can be sent: after :meth:`finish`, or when the stream was reset
            or its connection lost.
    """

    __slots__ = (
        "_conn",
        "_finish_called",
        "_handler",
        "_header_bytes",
        "_headers_sent",
        "_over",
        "_pending",
        "_pending_trailers",
        "_rbuf",
        "_rcount",
        "_recv_unacked",
        "_recv_window",
        "_remote_closed",
        "_rneed",
        "_send_window",
        "_sid",
        "_trailers_sent",
        "closed",
        "headers",
        "path",
    )

    def __init__(self, conn: _H2Connection, sid: int, path: str, headers: list[tuple[str, str]]) -> None:
        self._conn = conn
        self._sid = sid
        self.path = path
        self.headers = headers
        self.closed = False
        self._handler: StreamHandler | None = None
        self._headers_sent = False
        self._finish_called = False
        self._trailers_sent = False
        self._remote_closed = False
        self._over = False  # on_close has run (or is running)
        self._send_window = conn._peer_initial_window
        self._recv_window = conn._local_initial_window
        self._recv_unacked = 0
        self._pending: bytearray | None = None  # framed gRPC bytes waiting for flow-control credit
        self._pending_trailers: bytes | None = None  # trailer block to send once _pending drains
        self._rbuf: bytearray | None = None  # a partial inbound gRPC message
        self._rcount = 0  # bytes of _rbuf counted in the connection's and server's inbound totals
        self._rneed = 0  # bytes _rbuf must hold before the next parse step can run
        self._header_bytes = 0  # this stream's headers, counted in the inbound totals while it is open

    def __repr__(self) -> str:
        return f"<ServerStream {self._sid} {self.path} closed={self.closed}>"

    # -- sending ---------------------------------------------------------------------------------

    def send_message(self, data: bytes) -> None:
        """Send one serialized protobuf message (the 5-byte gRPC prefix is added here).

        The first call also sends the response HEADERS (``:status 200``, ``content-type:
        application/grpc``). Never blocks: when the peer's flow-control window is exhausted, or the peer
        is not reading, the bytes are queued and sent as it catches up. A no-op once the stream is
        closed. When the queue is over its limit (:class:`ServerLimits`), the stream is reset instead.
        """
        if self.closed:
            return
        conn = self._conn
        out = conn._out
        sid = self._sid
        if not self._headers_sent:
            self._headers_sent = True
            if conn._hpack_prefix:
                conn._write_header_block(sid, _FLAG_END_HEADERS, _RESPONSE_HEADER_BLOCK)
            else:
                pos = len(out)
                out += _RESPONSE_HEADERS_FRAME
                _U32.pack_into(out, pos + 5, sid)
        n = len(data) + 5
        if (
            self._pending is None
            and n <= self._send_window
            and n <= conn._send_window
            and n <= conn._peer_max_frame
            and not conn._write_paused
        ):
            # Fast path: the whole message fits in one DATA frame and in both windows.
            self._send_window -= n
            conn._send_window -= n
            pos = len(out)
            out += _ZERO_DATA_GRPC_HDR
            _DATA_GRPC_HDR.pack_into(out, pos, n >> 8, n & 0xFF, _DATA, 0, sid, 0, n - 5)
            out += data
        else:
            self._queue(data, n)
        if not conn._in_read:
            conn._schedule_flush()

    def finish(self, status: int = 0, message: str = "") -> None:
        """End the call: send trailers (``grpc-status``, percent-encoded ``grpc-message``) with END_STREAM.

        Uses the trailers-only form when no message was sent. Queued messages are sent first. Idempotent;
        a no-op once the stream was reset or its connection lost.
        """
        if self._finish_called or self.closed:
            return
        self._finish_called = True
        self.closed = True
        block = _trailer_block(status, message, not self._headers_sent)
        self._headers_sent = True
        conn = self._conn
        if self._pending is not None:
            self._pending_trailers = block
        else:
            self._write_trailers(block)
        if not conn._in_read:
            conn._schedule_flush()

    # -- internals -------------------------------------------------------------------------------

    def _queue(self, data: bytes, n: int) -> None:
        """Queue one message for later sending, or reset the stream when a send queue is over its limit."""
        conn = self._conn
        server = conn._server
        limits = server._limits
        pending = self._pending
        if (
            (pending is not None and len(pending) >= limits.stream_outbound_bytes)
            or conn._queued_out + conn._socket_backlog() >= limits.connection_outbound_bytes
            or server._queued_out >= limits.process_outbound_bytes
        ):
            conn._warn_once("peer is not reading: response queue over its limit, resetting streams")
            conn._rst_stream(self, self._sid, _ENHANCE_YOUR_CALM)
            return
        if pending is None:
            pending = self._pending = bytearray()
        pending += b"\x00" + _U32.pack(n - 5)
        pending += data
        conn._queued_out += n
        server._queued_out += n
        self._drain()

    def _write_trailers(self, block: bytes) -> None:
        conn = self._conn
        start = len(conn._out)
        conn._write_header_block(self._sid, _FLAG_END_HEADERS | _FLAG_END_STREAM, block)
        conn._unsent_trailers = (self._sid, start, len(conn._out))
        self._trailers_sent = True
        if self._remote_closed:
            conn._close_stream(self, False)

    def _drain(self) -> None:
        """Send as much queued data as both windows allow, then the trailers once nothing is queued.

        Stops at the connection's write high-water mark too: the rest goes out after a flush (see
        :meth:`_H2Connection._pump`), so queued data never piles up in the socket buffer.
        """
        pending = self._pending
        if pending is None:
            return
        conn = self._conn
        sid = self._sid
        if not conn._write_paused:
            out = conn._out
            max_frame = conn._peer_max_frame
            high_water = conn._high_water
            sent = 0
            while pending and self._send_window > 0 and conn._send_window > 0 and len(out) < high_water:
                n = min(len(pending), self._send_window, conn._send_window, max_frame)
                out += _FRAME_HDR.pack(n >> 8, n & 0xFF, _DATA, 0, sid)
                out += memoryview(pending)[:n]
                del pending[:n]
                self._send_window -= n
                conn._send_window -= n
                sent += n
            if sent:
                conn._queued_out -= sent
                conn._server._queued_out -= sent
                conn._after_send(self)
        if not pending:
            self._pending = None
            conn._blocked.pop(sid, None)
            block = self._pending_trailers
            if block is not None:
                self._pending_trailers = None
                self._write_trailers(block)
        elif self._send_window > 0:
            conn._blocked[sid] = self  # waits for connection credit or for the socket to drain
        else:
            conn._blocked.pop(sid, None)  # waits for its own WINDOW_UPDATE

    def _on_payload(self, data: bytes, start: int, end: int) -> None:
        """Split DATA payload bytes data[start:end] into gRPC messages and deliver them."""
        if self._finish_called:
            return  # we already answered; what the client still sends is of no use
        buf = self._rbuf
        if buf is not None:
            with memoryview(data) as mv:
                buf += mv[start:end]
            if len(buf) < self._rneed:
                return
            data = bytes(buf)
            self._rbuf = None
            start = 0
            end = len(data)
        max_len = self._conn._server._max_message_bytes
        while end - start >= 5:
            flag = data[start]
            (length,) = _U32.unpack_from(data, start + 1)
            # Both checks run as soon as the prefix is in, so an oversized message is never buffered.
            if flag:
                self._fail(_GRPC_UNIMPLEMENTED, "compressed messages are not supported")
                return
            if length > max_len:
                self._fail(_GRPC_RESOURCE_EXHAUSTED, f"message of {length} bytes exceeds the limit of {max_len}")
                return
            mend = start + 5 + length
            if mend > end:
                self._rneed = mend - start
                break
            msg = data[start + 5 : mend]
            start = mend
            handler = self._handler
            if handler is None:
                return
            try:
                handler.on_message(msg)
            except Exception:
                logger.exception("gRPC handler on_message failed on %s", self.path)
                self._fail(_GRPC_INTERNAL, "internal error")
                return
            if self._finish_called:
                return
        else:
            self._rneed = 5
        if start < end:
            rest = bytearray()
            with memoryview(data) as mv:
                rest += mv[start:end]
            self._rbuf = rest

    def _on_end_stream(self) -> None:
        """The client half-closed the stream (END_STREAM on DATA or HEADERS)."""
        self._remote_closed = True
        if not self._finish_called:
            if self._rbuf:
                self._fail(_GRPC_INTERNAL, "stream ended inside a message")
            elif self._handler is not None:
                try:
                    self._handler.on_half_close()
                except Exception:
                    logger.exception("gRPC handler on_half_close failed on %s", self.path)
                    self._fail(_GRPC_INTERNAL, "internal error")
        if self._trailers_sent:
            self._conn._close_stream(self, False)

    def _fail(self, status: int, message: str) -> None:
        if self._rbuf is not None:
            self._rbuf = None
            self._conn._sync_inbound(self)
        self.finish(status, message)


HandlerFactory = Callable[[ServerStream], StreamHandler]


class GrpcServer:
    """A gRPC server for h2c (prior-knowledge) clients such as Envoy.

    Args:
        routes: ``:path`` -> factory that makes the :class:`StreamHandler` of each new stream.
            Any other path is answered with grpc-status 12 (UNIMPLEMENTED).
        max_message_bytes: larger inbound messages end the stream with grpc-status 8 (RESOURCE_EXHAUSTED).
        max_concurrent_streams: announced in SETTINGS; streams beyond it are refused per connection.
        limits: bounds on what a peer can make the server hold or do (:class:`ServerLimits`).
    """

    def __init__(
        self,
        routes: dict[str, HandlerFactory],
        *,
        max_message_bytes: int = 16 * 1024 * 1024,
        max_concurrent_streams: int = 10000,
        limits: ServerLimits | None = None,
    ) -> None:
        self._routes = dict(routes)
        self._max_message_bytes = max_message_bytes
        self._max_concurrent_streams = max_concurrent_streams
        self._limits = limits if limits is not None else ServerLimits()
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_H2Connection] = set()
        self._lingering: set[_H2Connection] = set()  # closed by us, waiting for the peer's EOF
        self._open_streams = 0
        self._buffered_in = 0  # unfinished inbound messages, all connections
        self._header_bytes = 0  # headers of open streams, all connections
        self._queued_out = 0  # response bytes waiting for flow-control credit, all connections
        self._sweeper: asyncio.Task[None] | None = None
        self._stopping = False
        self._idle: asyncio.Event | None = None  # set when open_streams drops to 0 during stop()

    @property
    def limits(self) -> ServerLimits:
        """The limits this server applies to every connection."""
        return self._limits

    @property
    def open_streams(self) -> int:
        """Streams whose ``on_close`` has not run yet, over all connections."""
        return self._open_streams

    @property
    def connections(self) -> int:
        """Open connections."""
        return len(self._connections)

    @property
    def buffered_inbound_bytes(self) -> int:
        """Bytes of unfinished request messages held, all connections."""
        return self._buffered_in

    @property
    def header_bytes(self) -> int:
        """Size of the request headers of open streams (as HPACK counts it), all connections."""
        return self._header_bytes

    @property
    def queued_outbound_bytes(self) -> int:
        """Response bytes not yet taken by the kernel: flow-control queues plus socket buffers."""
        return self._queued_out + sum(conn._socket_backlog() + len(conn._out) for conn in self._connections)

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (port 0 picks a free one) and return the bound port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _H2Connection(self), host, port, reuse_address=True)
        limits = self._limits
        if limits.handshake_timeout > 0 or limits.idle_timeout > 0:
            self._sweeper = loop.create_task(self._sweep())
        return self._server.sockets[0].getsockname()[1]

    async def stop(self, grace: float = 5.0) -> None:
        """Stop gracefully.

        Stops listening, sends GOAWAY (last processed stream id) on every connection so clients open no
        new streams here, waits up to `grace` seconds for the open streams to close, then closes all
        connections; streams still open get ``on_close(reset=True)``.
        """
        self._stopping = True
        server = self._server
        if server is not None:
            server.close()
        sweeper = self._sweeper
        if sweeper is not None:
            self._sweeper = None
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        self._idle = asyncio.Event()
        for conn in list(self._connections):
            conn.goaway(_NO_ERROR)
        if self._open_streams:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)
        for conn in list(self._connections):
            conn.abort()
        for conn in list(self._lingering):
            conn._abort_transport()
        if server is not None:
            await server.wait_closed()
        self._server = None

    async def _sweep(self) -> None:
        """Close connections past their handshake or idle timeout (one timer for all connections)."""
        limits = self._limits
        timeouts = [t for t in (limits.handshake_timeout, limits.idle_timeout) if t > 0]
        interval = min(max(min(timeouts) / 4, 0.02), 5.0)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for conn in list(self._connections):
                conn._check_timeouts(now)

    def _stream_closed(self) -> None:
        self._open_streams -= 1
        if self._open_streams == 0 and self._idle is not None:
            self._idle.set()


class _H2Connection(asyncio.Protocol):
    """One HTTP/2 connection: frame parsing, flow control and stream bookkeeping."""

    def __init__(self, server: GrpcServer) -> None:
        self._server = server
        self._limits = limits = server._limits
        self._loop = asyncio.get_running_loop()
        self._born = self._loop.time()
        self._transport: asyncio.Transport | None = None
        self._out = bytearray()
        self._unsent_trailers: tuple[int, int, int] | None = None  # (stream id, start, end) in _out
        # An HPACK dynamic table size update owed to the peer at the start of our next header block.
        self._hpack_prefix = b""
        self._peer_table_size = 4096
        self._in_read = False
        self._flush_scheduled = False
        self._pump_scheduled = False
        self._write_paused = False  # the socket buffer is over the high-water mark: we stopped reading
        self._high_water = limits.write_high_water
        self._dead = False
        self._lost = False
        self._discarded = 0  # input dropped after we closed
        self._warned = False
        self._preface_ok = False
        self._got_settings = False
        self._inbuf: bytearray | None = None  # a frame split across reads
        self._need = 0
        self._streams: dict[int, ServerStream] = {}
        # Streams with queued data and stream credit: they wait for connection credit or the socket.
        self._blocked: dict[int, ServerStream] = {}
        self._max_sid = 0  # highest client stream id seen
        self._goaway_sent = False
        self._draining = False  # GOAWAY(2^31-1) sent for an idle close
        self._peer_goaway = False
        self._idle_since: float | None = None
        self._idle_mark = 0  # _max_sid when the connection was last seen idle
        self._decoder = hpack.Decoder(max_header_list_size=_MAX_HEADER_LIST_SIZE)
        self._header_cache: dict[bytes, tuple[tuple[tuple[str, str], ...], str, int]] = {}
        self._table_len = 0
        self._table_first: tuple[bytes, bytes] | None = None
        self._cont_sid = 0  # stream of an unfinished header block (HEADERS without END_HEADERS)
        self._cont_buf = bytearray()
        self._cont_end_stream = False
        # Send side: the peer's windows and limits.
        self._send_window = _DEFAULT_WINDOW
        self._peer_initial_window = _DEFAULT_WINDOW
        self._peer_max_frame = _DEFAULT_MAX_FRAME
        self._queued_out = 0  # bytes in the streams' _pending queues
        # Past these, request credit is held back until responses drain (a peer that sends requests but
        # does not read the answers slows down before it reaches the hard limits).
        self._stream_send_soft = limits.stream_outbound_bytes // 4
        self._conn_send_soft = limits.connection_outbound_bytes // 2
        # Receive side.
        self._local_initial_window = _INITIAL_WINDOW_SIZE
        self._stream_update_at = _INITIAL_WINDOW_SIZE // 2
        self._recv_window = _CONNECTION_WINDOW_SIZE
        self._recv_unacked = 0
        self._conn_update_at = _CONNECTION_WINDOW_SIZE // 2
        self._max_frame_in = _MAX_FRAME_SIZE
        self._buffered_in = 0  # bytes of unfinished inbound messages (the streams' _rbuf)
        self._header_bytes = 0  # headers of open streams
        self._withheld = 0  # connection credit not returned for bytes still buffered; <= _buffered_in
        self._inbound_cap = limits.connection_inbound_bytes
        self._process_inbound_cap = limits.process_inbound_bytes
        # Flood accounting: frames of each kind since the window started.
        self._flood_count = [0, 0, 0, 0]
        self._flood_since = [self._born] * 4
        self._flood_limit = (
            limits.pings_per_second,
            limits.settings_per_second,
            limits.resets_per_second,
            limits.empty_frames_per_second,
        )

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the Transport interface without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Small frames must leave at once (the default loop sets it too; uvloop may not).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server = self._server
        if server._stopping:
            transport.abort()
            return
        self._transport.set_write_buffer_limits(high=self._high_water)
        server._connections.add(self)
        settings = (
            (_SETTINGS_MAX_CONCURRENT_STREAMS, server._max_concurrent_streams),
            (_SETTINGS_INITIAL_WINDOW_SIZE, self._local_initial_window),
            (_SETTINGS_MAX_FRAME_SIZE, self._max_frame_in),
            (_SETTINGS_MAX_HEADER_LIST_SIZE, _MAX_HEADER_LIST_SIZE),
        )
        # The server preface may be sent before the client's arrives (RFC 9113 §3.4).
        self._out += _frame(_SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in settings))
        if self._recv_window > _DEFAULT_WINDOW:
            self._out += _frame(_WINDOW_UPDATE, 0, 0, _U32.pack(self._recv_window - _DEFAULT_WINDOW))
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._dead = True
        self._lost = True
        self._server._connections.discard(self)
        self._server._lingering.discard(self)
        self._reset_all()

    def data_received(self, data: bytes) -> None:
        if self._dead:
            self._discarded += len(data)
            if self._discarded > _LINGER_MAX_BYTES:
                self._abort_transport()
            return
        inbuf = self._inbuf
        if inbuf is not None:
            # Accumulate until the frame we are waiting for is complete: linear, even for big frames.
            inbuf += data
            if len(inbuf) < self._need:
                return
            data = bytes(inbuf)
            self._inbuf = None
        self._in_read = True
        try:
            off = self._process(data)
            if off < len(data) and not self._dead:
                self._inbuf = bytearray(data[off:])
        except _ConnectionError as err:
            if err.code == _ENHANCE_YOUR_CALM:
                logger.warning("HTTP/2 peer %s: %s", self._peer_name(), err)
            else:
                logger.warning("HTTP/2 connection error %#x: %s", err.code, err)
            self.goaway(err.code, close=True)
        except Exception:
            # A bug here must not take the event loop's other connections down with it.
            logger.exception("HTTP/2 connection failed")
            self.goaway(_INTERNAL_ERROR, close=True)
        finally:
            self._in_read = False
        if self._out:
            self._flush()

    def eof_received(self) -> bool | None:
        return False  # close the transport; connection_lost resets what is left

    def pause_writing(self) -> None:
        # The peer is not reading what we send: stop reading what it sends (so it cannot make us queue
        # more replies) and stop moving queued data into the socket buffer.
        self._write_paused = True
        transport = self._transport
        if transport is not None and not transport.is_closing() and not self._dead:
            transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        transport = self._transport
        if self._dead or transport is None or transport.is_closing():
            return
        transport.resume_reading()
        if self._blocked:
            self._pump()

    # -- output ----------------------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._unsent_trailers = None
        out = self._out
        if out:
            # Hand the buffer over instead of copying it: the transport may keep a reference to it.
            self._out = bytearray()
            transport = self._transport
            if transport is not None and not transport.is_closing():
                transport.write(out)
        if self._blocked and self._send_window > 0 and not self._write_paused and not self._pump_scheduled:
            # Queued data stopped at the high-water mark: send more on the next loop iteration.
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_scheduled = False
        if self._dead:
            return
        self._drain_blocked()
        self._flush()

    def _drain_blocked(self) -> None:
        """Let the streams waiting for connection credit send, in turn, up to the high-water mark."""
        blocked = self._blocked
        while blocked and self._send_window > 0 and not self._write_paused and len(self._out) < self._high_water:
            sid = next(iter(blocked))
            stream = blocked[sid]
            stream._drain()
            if blocked.get(sid) is stream:
                # Still waiting: the next turn starts with the next stream.
                del blocked[sid]
                blocked[sid] = stream

    def _socket_backlog(self) -> int:
        transport = self._transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def _write_header_block(self, sid: int, flags: int, block: bytes) -> None:
        """Append a HEADERS frame (blocks are small: never more than one frame)."""
        if self._hpack_prefix:
            block = self._hpack_prefix + block
            self._hpack_prefix = b""
        n = len(block)
        self._out += _FRAME_HDR.pack(n >> 8, n & 0xFF, _HEADERS, flags, sid)
        self._out += block

    def goaway(self, code: int, *, close: bool = False) -> None:
        """Send GOAWAY(last stream id, code); close now if asked to or if no stream is open."""
        if self._dead or self._transport is None:
            return
        if not self._goaway_sent:
            self._goaway_sent = True
            self._out += _frame(_GOAWAY, 0, 0, _U32.pack(self._max_sid) + _U32.pack(code))
        if close or not self._streams:
            self._close()
        elif not self._in_read:
            self._flush()

    def abort(self) -> None:
        """Close now (buffered output is still flushed); open streams get on_close(reset=True)."""
        self._close(linger=False)

    def _close(self, linger: bool = True) -> None:
        if self._dead:
            return
        self._dead = True  # from here on, input is dropped
        self._flush()
        self._server._connections.discard(self)
        transport = self._transport
        if transport is not None:
            if linger and not transport.is_closing() and transport.can_write_eof():
                try:
                    transport.write_eof()  # FIN after what is buffered; the peer's EOF then closes the transport
                except OSError:  # the peer is already gone
                    transport.abort()
                else:
                    transport.resume_reading()
                    self._server._lingering.add(self)
                    self._loop.call_later(_CLOSE_LINGER, self._abort_transport)
            else:
                transport.close()  # sends what is buffered, then closes ...
                if transport.get_write_buffer_size():
                    # ... unless the peer does not read it: then the socket is dropped after a while.
                    self._loop.call_later(_CLOSE_LINGER, self._abort_transport)
        self._reset_all()

    def _abort_transport(self) -> None:
        if not self._lost and self._transport is not None:
            self._transport.abort()

    def _reset_all(self) -> None:
        streams = list(self._streams.values())
        for stream in streams:
            stream.closed = True
            self._close_stream(stream, not stream._trailers_sent)

    def _close_stream(self, stream: ServerStream, reset: bool) -> None:
        """The stream is over: forget it, release what it held and run on_close exactly once."""
        if stream._over:
            return
        stream._over = True
        stream.closed = True
        sid = stream._sid
        self._streams.pop(sid, None)
        self._blocked.pop(sid, None)
        server = self._server
        pending = stream._pending
        if pending is not None:
            stream._pending = None
            self._queued_out -= len(pending)
            server._queued_out -= len(pending)
            if self._recv_unacked >= self._conn_update_at and self._queued_out < self._conn_send_soft:
                self._send_connection_credit()
        hbytes = stream._header_bytes
        if hbytes:
            stream._header_bytes = 0
            self._header_bytes -= hbytes
            server._header_bytes -= hbytes
        if stream._rbuf is not None or stream._rcount:
            stream._rbuf = None
            self._sync_inbound(stream)
        server._stream_closed()
        handler = stream._handler
        if handler is not None:
            stream._handler = None
            try:
                handler.on_close(reset)
            except Exception:
                logger.exception("gRPC handler on_close failed on %s", stream.path)
        if not self._streams and (self._goaway_sent or self._peer_goaway) and not self._dead:
            if self._in_read:
                self._loop.call_soon(self._close)
            else:
                self._close()

    def _rst_stream(self, stream: ServerStream | None, sid: int, code: int) -> None:
        self._out += _frame(_RST_STREAM, 0, sid, _U32.pack(code))
        if stream is not None:
            stream.closed = True
            self._close_stream(stream, not stream._trailers_sent)
        if not self._in_read:
            self._schedule_flush()

    def _provoked_rst(self, stream: ServerStream | None, sid: int, code: int) -> None:
        """RST_STREAM in answer to the peer's frame: counted against the reset flood limit."""
        self._flood(_F_RESET)
        self._rst_stream(stream, sid, code)

    # -- limits ----------------------------------------------------------------------------------

    def _flood(self, kind: int) -> None:
        """Count one frame of a kind that costs us work but carries no request; raise past the limit."""
        counts = self._flood_count
        counts[kind] += 1
        if counts[kind] > self._flood_limit[kind]:
            now = self._loop.time()
            if now - self._flood_since[kind] < _FLOOD_WINDOW:
                raise _ConnectionError(_ENHANCE_YOUR_CALM, f"{_FLOOD_NAMES[kind]} flood")
            counts[kind] = 1
            self._flood_since[kind] = now

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("HTTP/2 peer %s: %s", self._peer_name(), message)

    def _peer_name(self) -> str:
        transport = self._transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"

    def _check_timeouts(self, now: float) -> None:
        """Called by the server's sweeper: close connections past their handshake or idle timeout."""
        if self._dead:
            return
        limits = self._limits
        if not self._got_settings:
            if 0 < limits.handshake_timeout <= now - self._born:
                logger.info("HTTP/2 peer %s: no preface and SETTINGS within %.3g s", self._peer_name(),
                            limits.handshake_timeout)  # fmt: skip
                self.goaway(_SETTINGS_TIMEOUT, close=True)
            return
        if limits.idle_timeout <= 0 or self._draining or self._goaway_sent or self._peer_goaway:
            return
        if self._streams or self._max_sid != self._idle_mark or self._idle_since is None:
            # Busy now, or a stream came and went since the last look: idle from now at the earliest.
            self._idle_mark = self._max_sid
            self._idle_since = None if self._streams else now
            return
        if now - self._idle_since >= limits.idle_timeout:
            # Graceful (RFC 9113 §6.8): GOAWAY(2^31-1) first, so that a stream the peer is opening right
            # now is still served; the final GOAWAY follows after a grace period.
            self._draining = True
            self._out += _frame(_GOAWAY, 0, 0, _U32.pack(_MAX_WINDOW) + _U32.pack(_NO_ERROR))
            self._flush()
            self._loop.call_later(_DRAIN_GRACE, self.goaway, _NO_ERROR)

    def _sync_inbound(self, stream: ServerStream) -> int:
        """Bring the inbound totals in line with the stream's partial message; return the change."""
        rbuf = stream._rbuf
        n = len(rbuf) if rbuf is not None else 0
        delta = n - stream._rcount
        if delta:
            stream._rcount = n
            self._buffered_in += delta
            self._server._buffered_in += delta
            if delta < 0 and self._withheld > self._buffered_in:
                # Withheld credit was for bytes no longer held: return it now (the peer may be stalled).
                self._recv_unacked += self._withheld - self._buffered_in
                self._withheld = self._buffered_in
                self._send_connection_credit()
        return delta

    def _after_send(self, stream: ServerStream) -> None:
        """Queued data left: return the request credit held back while the queues were long."""
        if (
            stream._recv_unacked >= self._stream_update_at
            and not stream._over
            and (stream._pending is None or len(stream._pending) < self._stream_send_soft)
        ):
            self._out += _frame(_WINDOW_UPDATE, 0, stream._sid, _U32.pack(stream._recv_unacked))
            stream._recv_window += stream._recv_unacked
            stream._recv_unacked = 0
            if not self._in_read:
                self._schedule_flush()
        if self._recv_unacked >= self._conn_update_at and self._queued_out < self._conn_send_soft:
            self._send_connection_credit()

    def _send_connection_credit(self) -> None:
        if self._recv_unacked and not self._dead:
            self._out += _frame(_WINDOW_UPDATE, 0, 0, _U32.pack(self._recv_unacked))
            self._recv_window += self._recv_unacked
            self._recv_unacked = 0
            if not self._in_read:
                self._schedule_flush()

    def _hold(self, stream: ServerStream, grew: int) -> int:
        """`grew` more bytes are buffered in stream's partial message; return the credit to give back."""
        conn_total = self._buffered_in
        proc_total = self._server._buffered_in
        if conn_total > self._inbound_cap or proc_total > self._process_inbound_cap:
            self._shed(stream, "request data over the server's buffer limit")
            return grew  # dropped: the credit goes back
        if conn_total <= self._inbound_cap // 2 and proc_total <= self._process_inbound_cap // 2:
            return grew
        # Over half a cap: the credit comes back when the message completes (or is dropped).
        self._withheld += grew
        return 0

    def _relieve(self) -> None:
        """The peer is about to run out of connection window because credit is withheld: send what
        is owed, and if that is not enough, drop the largest unfinished messages."""
        self._send_connection_credit()
        while self._withheld and self._recv_window < self._max_frame_in:
            victim = max(self._streams.values(), key=lambda s: s._rcount, default=None)
            if victim is None or not victim._rcount:
                break
            self._shed(victim, "request data over the server's buffer limit")

    def _shed(self, stream: ServerStream, message: str) -> None:
        """End a stream whose buffered request data is over a limit, and drop that data."""
        self._warn_once(message)
        stream._rbuf = None
        self._sync_inbound(stream)
        if stream._pending is None and not stream._finish_called:
            stream.finish(_GRPC_RESOURCE_EXHAUSTED, message)
        if not stream._over:
            # Tell the client to stop sending the rest of the message (after the trailers, if any).
            self._rst_stream(stream, stream._sid, _NO_ERROR if stream._trailers_sent else _ENHANCE_YOUR_CALM)

    # -- frame parsing ---------------------------------------------------------------------------

    def _process(self, data: bytes) -> int:
        """Handle every complete frame in data; return the offset of the first incomplete byte."""
        off = 0
        n = len(data)
        if not self._preface_ok:
            if n < 24:
                if not _PREFACE.startswith(data):
                    raise _ConnectionError(_PROTOCOL_ERROR, "bad client preface")
                self._need = 24
                return 0
            if data[:24] != _PREFACE:
                raise _ConnectionError(_PROTOCOL_ERROR, "bad client preface")
            self._preface_ok = True
            off = 24
        unpack = _FRAME_HDR.unpack_from
        max_in = self._max_frame_in
        while n - off >= 9:
            hi, lo, ftype, flags, sid = unpack(data, off)
            length = (hi << 8) | lo
            if length > max_in:
                raise _ConnectionError(_FRAME_SIZE_ERROR, f"frame of {length} bytes")
            end = off + 9 + length
            if end > n:
                self._need = 9 + length
                return off
            sid &= 0x7FFFFFFF
            start = off + 9
            off = end
            if self._cont_sid and ftype != _CONTINUATION:
                raise _ConnectionError(_PROTOCOL_ERROR, "header block interrupted")
            if not self._got_settings and ftype != _SETTINGS:
                raise _ConnectionError(_PROTOCOL_ERROR, "first frame is not SETTINGS")
            if ftype == _DATA:
                self._on_data(data, start, end, flags, sid)
            elif ftype == _HEADERS:
                self._on_headers(data, start, end, flags, sid)
            elif ftype == _WINDOW_UPDATE:
                self._on_window_update(data, start, end, sid)
            elif ftype == _RST_STREAM:
                self._on_rst_stream(data, start, end, sid)
            elif ftype == _SETTINGS:
                self._on_settings(data, start, end, flags, sid)
            elif ftype == _PING:
                if sid:
                    raise _ConnectionError(_PROTOCOL_ERROR, "PING on a stream")
                if length != 8:
                    raise _ConnectionError(_FRAME_SIZE_ERROR, "PING length")
                if not flags & _FLAG_ACK:
                    self._flood(_F_PING)
                    self._out += _frame(_PING, _FLAG_ACK, 0, data[start:end])
            elif ftype == _CONTINUATION:
                self._on_continuation(data, start, end, flags, sid)
            elif ftype == _PRIORITY:
                # Priority is deprecated (RFC 9113 §5.3.2); only the framing is checked.
                if not sid:
                    raise _ConnectionError(_PROTOCOL_ERROR, "PRIORITY on stream 0")
                self._flood(_F_EMPTY)
                if length != 5:
                    self._provoked_rst(self._streams.get(sid), sid, _FRAME_SIZE_ERROR)
            elif ftype == _GOAWAY:
                self._on_goaway(data, start, end, sid)
            elif ftype == _PUSH_PROMISE:
                raise _ConnectionError(_PROTOCOL_ERROR, "PUSH_PROMISE from a client")
            else:
                self._flood(_F_EMPTY)  # unknown frame types are ignored (RFC 9113 §4.1), within limits
            if self._dead:
                return n
        self._need = 9
        return off

    def _on_data(self, data: bytes, start: int, end: int, flags: int, sid: int) -> None:
        if not sid:
            raise _ConnectionError(_PROTOCOL_ERROR, "DATA on stream 0")
        length = end - start
        self._recv_window -= length
        if self._recv_window < 0:
            raise _ConnectionError(_FLOW_CONTROL_ERROR, "connection window exceeded")
        # Connection-level credit goes back for every DATA frame, even one we drop, or the window would
        # leak away; only bytes buffered in an unfinished message may wait (see _hold). Batched: one
        # WINDOW_UPDATE per half window.
        credit = length
        stream = self._streams.get(sid)
        if stream is None:
            if sid > self._max_sid:
                raise _ConnectionError(_PROTOCOL_ERROR, "DATA on an idle stream")
            # A stream we closed or refused: frames in flight are ignored.
        elif stream._remote_closed:
            self._provoked_rst(stream, sid, _STREAM_CLOSED)
        else:
            stream._recv_window -= length
            if stream._recv_window < 0:
                self._provoked_rst(stream, sid, _FLOW_CONTROL_ERROR)
            else:
                if flags & _FLAG_PADDED:
                    if not length:
                        raise _ConnectionError(_FRAME_SIZE_ERROR, "padded DATA without pad length")
                    pad = data[start]
                    start += 1
                    if pad > end - start:
                        raise _ConnectionError(_PROTOCOL_ERROR, "DATA padding exceeds the payload")
                    end -= pad
                end_stream = flags & _FLAG_END_STREAM
                if not end_stream:
                    # Stream credit goes back at once (what one stream buffers is bounded by
                    # max_message_bytes, the connection's total by the inbound limits), unless the
                    # stream's responses pile up unread: then it waits until they drain (_after_send).
                    stream._recv_unacked += length
                    if stream._recv_unacked >= self._stream_update_at and (
                        stream._pending is None or len(stream._pending) < self._stream_send_soft
                    ):
                        self._out += _frame(_WINDOW_UPDATE, 0, sid, _U32.pack(stream._recv_unacked))
                        stream._recv_window += stream._recv_unacked
                        stream._recv_unacked = 0
                if end > start:
                    stream._on_payload(data, start, end)
                    if stream._rbuf is not None or stream._rcount:
                        grew = self._sync_inbound(stream)
                        if grew > 0:
                            credit -= grew - self._hold(stream, grew)
                elif not end_stream:
                    self._flood(_F_EMPTY)
                if end_stream and not stream._over:
                    stream._on_end_stream()
        self._recv_unacked += credit
        if self._recv_unacked >= self._conn_update_at and self._queued_out < self._conn_send_soft:
            self._out += _frame(_WINDOW_UPDATE, 0, 0, _U32.pack(self._recv_unacked))
            self._recv_window += self._recv_unacked
            self._recv_unacked = 0
        if self._withheld and self._recv_window < self._max_frame_in:
            self._relieve()

    def _on_headers(self, data: bytes, start: int, end: int, flags: int, sid: int) -> None:
        if not sid:
            raise _ConnectionError(_PROTOCOL_ERROR, "HEADERS on stream 0")
        pad = 0
        if flags & _FLAG_PADDED:
            if start >= end:
                raise _ConnectionError(_FRAME_SIZE_ERROR, "padded HEADERS without pad length")
            pad = data[start]
            start += 1
        if flags & _FLAG_PRIORITY:
            start += 5  # stream dependency + weight: ignored
        if pad + start > end:
            raise _ConnectionError(_PROTOCOL_ERROR, "HEADERS padding exceeds the payload")
        end -= pad
        if end - start > _MAX_HEADER_BLOCK:
            raise _ConnectionError(_ENHANCE_YOUR_CALM, "header block too large")
        if flags & _FLAG_END_HEADERS:
            self._on_header_block(sid, data[start:end], bool(flags & _FLAG_END_STREAM))
        else:
            if start == end:
                self._flood(_F_EMPTY)
            self._cont_sid = sid
            self._cont_end_stream = bool(flags & _FLAG_END_STREAM)
            self._cont_buf = bytearray(data[start:end])

    def _on_continuation(self, data: bytes, start: int, end: int, flags: int, sid: int) -> None:
        if not self._cont_sid or sid != self._cont_sid:
            raise _ConnectionError(_PROTOCOL_ERROR, "unexpected CONTINUATION")
        if start == end and not flags & _FLAG_END_HEADERS:
            self._flood(_F_EMPTY)
        buf = self._cont_buf
        buf += data[start:end]
        if len(buf) > _MAX_HEADER_BLOCK:
            raise _ConnectionError(_ENHANCE_YOUR_CALM, "header block too large")
        if flags & _FLAG_END_HEADERS:
            self._cont_sid = 0
            self._cont_buf = bytearray()
            self._on_header_block(sid, bytes(buf), self._cont_end_stream)

    def _decode_headers(self, block: bytes) -> tuple[tuple[tuple[str, str], ...], str, int]:
        """Decode a header block into (headers, :path, size as counted by HPACK), through a cache
        valid while the HPACK dynamic table is unchanged.

        The decoder's table only changes by appending a new entry at the front (a new tuple object),
        by evicting from the back, or by clearing, so (length, identity of the first entry) tells
        whether any block decoded since caching has changed it.
        """
        entries = self._decoder.header_table.dynamic_entries
        first = entries[0] if entries else None
        cache = self._header_cache
        if len(entries) != self._table_len or first is not self._table_first:
            cache.clear()
            self._table_len = len(entries)
            self._table_first = first
        else:
            hit = cache.get(block)
            if hit is not None:
                return hit
        if block and block[0] & 0xE0 == 0x20 and _count_table_size_updates(block) > _MAX_TABLE_SIZE_UPDATES:
            raise _ConnectionError(_COMPRESSION_ERROR, "too many HPACK table size updates")
        try:
            decoded = self._decoder.decode(block)
        except HPACKError as err:
            raise _ConnectionError(_COMPRESSION_ERROR, f"HPACK: {err}") from err
        headers = tuple((str(k), str(v)) for k, v in decoded)
        path = ""
        size = 0
        for name, value in headers:
            size += len(name) + len(value) + 32  # RFC 7541 §4.1 entry size: what a header costs to hold
            if name == ":path" and not path:
                path = value
        result = (headers, path, size)
        first = entries[0] if entries else None
        if len(entries) == self._table_len and first is self._table_first and len(block) <= _HEADER_CACHE_MAX_BLOCK:
            # This block did not change the table, so its result depends only on its bytes.
            if len(cache) >= _HEADER_CACHE_SIZE:
                cache.clear()
            cache[block] = result
        return result

    def _on_header_block(self, sid: int, block: bytes, end_stream: bool) -> None:
        # Always decode, even for streams we refuse: the HPACK table must stay in step with the peer.
        headers, path, size = self._decode_headers(block)
        stream = self._streams.get(sid)
        if stream is not None:
            # Request trailers: they must end the stream.
            if not end_stream:
                self._provoked_rst(stream, sid, _PROTOCOL_ERROR)
            elif stream._remote_closed:
                self._provoked_rst(stream, sid, _STREAM_CLOSED)
            else:
                stream._on_end_stream()
            return
        if sid <= self._max_sid:
            self._provoked_rst(None, sid, _STREAM_CLOSED)
            return
        if not sid & 1:
            raise _ConnectionError(_PROTOCOL_ERROR, "even stream id from a client")
        # Recorded even when ignored below: frames on streams above this id are "idle" stream errors.
        self._max_sid = sid
        if self._goaway_sent:
            return  # above our GOAWAY's last stream id: ignored, the client may retry elsewhere
        server = self._server
        if (
            len(self._streams) >= server._max_concurrent_streams
            or self._header_bytes + size > self._inbound_cap
            or server._header_bytes + size > self._process_inbound_cap
        ):
            self._provoked_rst(None, sid, _REFUSED_STREAM)
            return
        if not path:
            self._provoked_rst(None, sid, _PROTOCOL_ERROR)
            return
        stream = ServerStream(self, sid, path, list(headers))
        self._streams[sid] = stream
        stream._header_bytes = size
        self._header_bytes += size
        server._header_bytes += size
        server._open_streams += 1
        factory = server._routes.get(path)
        if factory is None:
            stream.finish(_GRPC_UNIMPLEMENTED, f"unknown method {path}")
        else:
            try:
                stream._handler = factory(stream)
            except Exception:
                logger.exception("gRPC handler factory failed for %s", path)
                stream.finish(_GRPC_INTERNAL, "internal error")
        if end_stream and not stream._over:
            stream._on_end_stream()

    def _on_window_update(self, data: bytes, start: int, end: int, sid: int) -> None:
        if end - start != 4:
            raise _ConnectionError(_FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        (inc,) = _U32.unpack_from(data, start)
        inc &= 0x7FFFFFFF
        if not sid:
            if not inc:
                raise _ConnectionError(_PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += inc
            if self._send_window > _MAX_WINDOW:
                raise _ConnectionError(_FLOW_CONTROL_ERROR, "connection window overflow")
            if self._blocked:
                self._drain_blocked()
            return
        stream = self._streams.get(sid)
        if stream is None:
            if sid > self._max_sid:
                raise _ConnectionError(_PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            return
        if not inc:
            self._provoked_rst(stream, sid, _PROTOCOL_ERROR)
            return
        stream._send_window += inc
        if stream._send_window > _MAX_WINDOW:
            self._provoked_rst(stream, sid, _FLOW_CONTROL_ERROR)
            return
        if stream._pending is not None:
            stream._drain()

    def _on_rst_stream(self, data: bytes, start: int, end: int, sid: int) -> None:
        if end - start != 4:
            raise _ConnectionError(_FRAME_SIZE_ERROR, "RST_STREAM length")
        if not sid:
            raise _ConnectionError(_PROTOCOL_ERROR, "RST_STREAM on stream 0")
        mark = self._unsent_trailers
        if mark is not None and mark[0] == sid and mark[2] == len(self._out):
            # Our trailers for this stream are the last bytes not yet written, and the peer has reset
            # the stream: drop them. Envoy sends END_STREAM and RST_STREAM together at the end of
            # every ext_proc stream, so this saves one write syscall per HTTP request.
            del self._out[mark[1] :]
            self._unsent_trailers = None
        stream = self._streams.get(sid)
        if stream is None:
            if sid > self._max_sid:
                raise _ConnectionError(_PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            return
        stream.closed = True
        self._close_stream(stream, not stream._trailers_sent)

    def _on_settings(self, data: bytes, start: int, end: int, flags: int, sid: int) -> None:
        if sid:
            raise _ConnectionError(_PROTOCOL_ERROR, "SETTINGS on a stream")
        length = end - start
        if flags & _FLAG_ACK:
            if length:
                raise _ConnectionError(_FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if length % 6:
            raise _ConnectionError(_FRAME_SIZE_ERROR, "SETTINGS length")
        self._flood(_F_SETTINGS)
        self._got_settings = True
        for pos in range(start, end, 6):
            key, value = _SETTING.unpack_from(data, pos)
            if key == _SETTINGS_INITIAL_WINDOW_SIZE:
                if value > _MAX_WINDOW:
                    raise _ConnectionError(_FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE too large")
                # The change applies to every open stream, and may make windows negative (§6.9.2).
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                if delta:
                    for stream in self._streams.values():
                        stream._send_window += delta
                        if stream._send_window > _MAX_WINDOW:
                            raise _ConnectionError(_FLOW_CONTROL_ERROR, "stream window overflow")
            elif key == _SETTINGS_MAX_FRAME_SIZE:
                if not _DEFAULT_MAX_FRAME <= value <= 2**24 - 1:
                    raise _ConnectionError(_PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
                self._peer_max_frame = value
            elif key == _SETTINGS_ENABLE_PUSH and value > 1:
                raise _ConnectionError(_PROTOCOL_ERROR, "ENABLE_PUSH not 0 or 1")
            elif key == _SETTINGS_HEADER_TABLE_SIZE:
                # We never index, so our table is always empty; but a decoder whose limit shrank may
                # insist on seeing a size update (RFC 7541 §4.2), and a size of 0 is always valid.
                if value < self._peer_table_size:
                    self._hpack_prefix = _HPACK_TABLE_SIZE_ZERO
                self._peer_table_size = value
            # MAX_CONCURRENT_STREAMS / MAX_HEADER_LIST_SIZE: we open no streams; our headers are tiny.
        self._out += _SETTINGS_ACK_FRAME
        if self._queued_out:
            # Window changes may unblock (or block) any stream with queued data.
            for stream in [s for s in self._streams.values() if s._pending is not None]:
                stream._drain()

    def _on_goaway(self, data: bytes, start: int, end: int, sid: int) -> None:
        if sid:
            raise _ConnectionError(_PROTOCOL_ERROR, "GOAWAY on a stream")
        if end - start < 8:
            raise _ConnectionError(_FRAME_SIZE_ERROR, "GOAWAY length")
        (code,) = _U32.unpack_from(data, start + 4)
        self._peer_goaway = True
        if code != _NO_ERROR:
            logger.warning("peer sent GOAWAY %#x: %s", code, data[start + 8 : end].decode("utf-8", "replace"))
            self._close()
        elif not self._streams:
            # The client opens no more streams and none is open: nothing left to do here.
            self._loop.call_soon(self._close)
        # Otherwise the open streams run to completion; the last one to close closes the connection.
