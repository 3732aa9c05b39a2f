"""An instant-answer OpenAI-ish backend for overhead benchmarks: a raw asyncio HTTP/1.1 server that
answers every request with a fixed small chat completion, so the backend adds as little as possible
to what is measured. `GET /health` answers 200 for the router's health checks."""

from __future__ import annotations

import argparse
import asyncio

_BODY = (b'{"id":"bench","object":"chat.completion","created":0,"model":"bench-model","choices":[{"index":0,'
         b'"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
         b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}')
_RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(_BODY)) + _BODY


class _Conn(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        out = []
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end].lower()
            i = head.find(b"content-length:")
            n = int(head[i + 15:head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0 else None]) if i >= 0 else 0
            if len(buf) < end + 4 + n:
                break
            buf = buf[end + 4 + n:]
            out.append(_RESPONSE)
        self.buf = buf
        if out:
            self.t.write(b"".join(out))  # type: ignore[attr-defined]


async def main(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Conn, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(a.host, a.port))
