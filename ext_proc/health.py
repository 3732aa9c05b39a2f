"""gRPC health checking (grpc.health.v1.Health/Check), hand-encoded: two tiny messages do not
justify another dependency."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ext_proc.h2grpc import ServerStream


HEALTH_CHECK_PATH = "/grpc.health.v1.Health/Check"
# The Inference Extension's endpoint-picker protocol names `liveness` (the process answers) and
# `readiness` (ready to pick) besides the ext_proc service itself.
LIVENESS = "liveness"
SERVICE_NAMES = frozenset({"", "gateway-plugin", "extproc-router", "envoy.service.ext_proc.v3.ExternalProcessor",
                           "readiness", LIVENESS})
_SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}
_NOT_SERVING = b"\x08\x02"
_GRPC_NOT_FOUND = 5


def _service_name(data: bytes) -> str:
    """Field 1 (string `service`) of HealthCheckRequest; empty when absent or malformed."""
    i = 0
    while i < len(data):
        tag = data[i]
        i += 1
        if tag == 0x0A:
            length, shift = 0, 0
            while i < len(data):
                b = data[i]
                i += 1
                length |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
            return data[i:i + length].decode("utf-8", "replace")
        return ""
    return ""


class HealthHandler:
    """Answers Check with SERVING while the router is ready (pods discovered, not shutting down)."""

    def __init__(self, stream: ServerStream, is_serving: Callable[[], bool]) -> None:
        self._stream = stream
        self._is_serving = is_serving
        self._service = ""

    def on_message(self, data: bytes) -> None:
        self._service = _service_name(data)

    def on_half_close(self) -> None:
        if self._service not in SERVICE_NAMES:
            self._stream.finish(_GRPC_NOT_FOUND, f"unknown service {self._service!r}")
            return
        serving = self._service == LIVENESS or self._is_serving()
        self._stream.send_message(_SERVING if serving else _NOT_SERVING)
        self._stream.finish()

    def on_close(self, reset: bool) -> None:
        pass
