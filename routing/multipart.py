"""The form fields routing needs from a `multipart/form-data` body, read in one pass over the buffer.

An audio upload is mostly file bytes, and Envoy has already buffered them for ext_proc: the body is
never copied again. Part boundaries are found with `bytes.find` (C speed over the file bytes); only
the part headers and the values of the few fields asked for are copied and decoded. The whole body
is still checked (every part well formed, the closing delimiter present): what the router cannot
parse strictly is a 400, never routed on a reading the pod might not share.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field

from routing.errors import RoutingError

# RFC 2046: 1 to 70 characters of this set, the last one not a space.
_BCHARS = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=? ")
MAX_BOUNDARY = 70
MAX_PART_HEADERS = 8 * 1024  # a part's header block (Content-Disposition, Content-Type) is small
MAX_FIELD_BYTES = 64 * 1024  # a value routing reads (a model name, a flag)


@dataclass(slots=True)
class Form:
    """What a multipart body holds: the values of the asked-for text fields, and every part's name
    (file parts included, their bytes untouched)."""

    fields: dict[str, str] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)
    files: set[str] = field(default_factory=set)


def _bad(message: str, param: str | None = None) -> RoutingError:
    return RoutingError(400, message, param=param, code="invalid_request", cause="request-body-processing")


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a `multipart/form-data` Content-Type; 400 for any other type or a bad boundary."""
    if not content_type:
        raise _bad("this path takes a multipart/form-data body; the request has no Content-Type")
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        raise _bad(f"this path takes a multipart/form-data body, not {kind.strip()!r}")
    boundary = _params(params).get("boundary")
    if not boundary:
        raise _bad("the multipart/form-data Content-Type has no boundary")
    raw = boundary.encode("latin-1", "replace")
    if len(raw) > MAX_BOUNDARY or not set(raw) <= _BCHARS or raw.endswith(b" "):
        raise _bad("the multipart boundary is not valid (RFC 2046: 1-70 characters of a restricted set)")
    return raw


# `key=value` or `key="quoted \"value\""` (a quoted string may hold `;`).
_PARAM = re.compile(r'([^\s=;]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;]*))')
_ESCAPED = re.compile(r"\\(.)")


def _params(text: str) -> dict[str, str]:
    """`; key=value; key="quoted value"` parameters, keys lower-cased."""
    out: dict[str, str] = {}
    for m in _PARAM.finditer(text):
        quoted = m.group(2)
        if quoted is None:
            out[m.group(1).lower()] = m.group(3).strip()
        else:
            out[m.group(1).lower()] = _ESCAPED.sub(r"\1", quoted) if "\\" in quoted else quoted
    return out


def _disposition(block: bytes) -> tuple[str, bool]:
    """(field name, is a file) from a part's header block; 400 without a form-data disposition."""
    if not block:
        raise _bad("a multipart part has no headers (a Content-Disposition with a name is required)")
    name: str | None = None
    is_file = False
    for line in block.split(b"\r\n"):
        key, colon, value = line.partition(b":")
        if not colon:
            raise _bad("a multipart part has a malformed header line")
        if key.strip().lower() != b"content-disposition":
            continue
        kind, _, params = value.decode("utf-8", "replace").partition(";")
        if kind.strip().lower() != "form-data":
            raise _bad("a multipart part's Content-Disposition is not form-data")
        p = _params(params)
        name = p.get("name")
        is_file = "filename" in p or "filename*" in p
    if name is None:
        raise _bad("a multipart part has no Content-Disposition name")
    return name, is_file


def parse_form(raw: bytes | bytearray, content_type: str | None, wanted: Collection[str]) -> Form:
    """Check `raw` as a `multipart/form-data` body and return the `wanted` text fields' values
    (UTF-8) with every part's name. Raises RoutingError (400)."""
    boundary = boundary_of(content_type)
    delim = b"\r\n--" + boundary
    dlen = len(delim)
    form = Form()
    if raw.startswith(delim[2:]):
        pos = dlen - 2
    else:  # a preamble before the first delimiter is allowed and ignored
        first = raw.find(delim)
        if first < 0:
            raise _bad("the body holds no multipart part (no boundary delimiter found)")
        pos = first + dlen
    size = len(raw)
    while True:
        if raw[pos:pos + 2] == b"--":
            break  # the close delimiter; an epilogue after it is ignored
        eol = raw.find(b"\r\n", pos, pos + 256)
        if eol < 0 or raw[pos:eol].strip(b" \t"):
            raise _bad("the multipart body is malformed after a boundary delimiter")
        # The header block ends at the first empty line; a part without headers is refused below.
        end = raw.find(b"\r\n\r\n", eol, eol + MAX_PART_HEADERS + 4)
        if end < 0:
            raise _bad("a multipart part's headers are missing or longer than "
                       f"{MAX_PART_HEADERS} bytes")
        name, is_file = _disposition(bytes(raw[eol + 2:end]))
        start = end + 4
        nxt = raw.find(delim, start)
        if nxt < 0:
            raise _bad("the multipart body ends without its closing boundary")
        if name in form.names:
            raise _bad(f"form field {name!r} is given more than once", name)
        form.names.add(name)
        if is_file:
            form.files.add(name)
        elif name in wanted:
            if nxt - start > MAX_FIELD_BYTES:
                raise _bad(f"form field {name!r} is longer than {MAX_FIELD_BYTES} bytes", name)
            try:
                form.fields[name] = bytes(raw[start:nxt]).decode("utf-8")
            except UnicodeDecodeError:
                raise _bad(f"form field {name!r} is not valid UTF-8", name) from None
        pos = nxt + dlen
        if pos >= size:
            raise _bad("the multipart body ends without its closing boundary")
    return form
