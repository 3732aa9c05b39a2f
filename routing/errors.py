"""Errors a routing decision can end in, each mapped to one HTTP status and OpenAI error shape."""

from __future__ import annotations

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "overloaded_error"}


class RoutingError(Exception):
    """A request the gateway answers itself instead of routing.

    `cause` names the `x-error-<cause>` response header so a client (or a log) can tell the
    reasons apart without parsing the message.
    """

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 cause: str = "routing", cause_value: str = "true") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.cause = cause
        self.cause_value = cause_value

    @property
    def error_type(self) -> str:
        return _TYPES.get(self.status, "api_error")

    def to_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.code}}
