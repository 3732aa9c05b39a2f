"""Errors a routing decision can end in, each mapped to one HTTP status and OpenAI error shape."""

from __future__ import annotations

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "overloaded_error"}

# Error body shapes: a path's spec (routing/request.py) names the one its clients parse.
OPENAI = "openai"  # {"error": {"message", "type", "param", "code"}}
ANTHROPIC = "anthropic"  # {"type": "error", "error": {"type", "message"}} (Anthropic's Messages API)
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                    429: "rate_limit_error", 500: "api_error", 503: "overloaded_error"}


# What a client sent comes back in error messages, headers and logs: capped, so a 3 MB model name
# is not reflected as a 3 MB header nor written whole to the log for every request.
MAX_MESSAGE_CHARS = 1024
MAX_CAUSE_VALUE_CHARS = 256


def shorten(text: str, limit: int) -> str:
    """`text`, or its head and a note of how long it was when it is longer than `limit` characters."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def header_safe(text: str) -> str:
    """`text` as a header value: printable ASCII, anything else escaped (a client's bytes must not
    break or inject into the header block)."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(c if " " <= c <= "~" else f"\\u{ord(c):04x}" for c in text)


class RoutingError(Exception):
    """A request the gateway answers itself instead of routing.

    `cause` names the `x-error-<cause>` response header so a client (or a log) can tell the
    reasons apart without parsing the message. The message and the header's value are capped
    (`shorten`): they may quote what the client sent.
    """

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 cause: str = "routing", cause_value: str = "true") -> None:
        message = shorten(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.cause = cause
        self.cause_value = header_safe(shorten(cause_value, MAX_CAUSE_VALUE_CHARS))

    @property
    def error_type(self) -> str:
        return _TYPES.get(self.status, "api_error")

    def to_body(self, style: str = OPENAI) -> dict:
        """The error body in `style`: OpenAI's (the default) or Anthropic's."""
        if style == ANTHROPIC:
            return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(self.status, "api_error"),
                                               "message": self.message}}
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.code}}
