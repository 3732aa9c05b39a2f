"""Hostile request bodies through the whole request path (parse -> control -> decide -> Envoy answer),
without a network. The rule: a client's mistake is a 4xx with an OpenAI-shaped body, never a 5xx,
never an exception out of the state machine, never an unanswered stream, and nothing the client
sent is reflected unbounded. Hypothesis generates the adversarial shapes on purpose (deep nesting,
lone surrogates, NaN, huge strings, every field with every wrong type), which random JSON alone
rarely reaches."""

from __future__ import annotations

import json
import random

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from ext_proc.metrics import RouterMetrics
from ext_proc.service import ExtProcService, ServiceSettings
from routing.errors import MAX_CAUSE_VALUE_CHARS, MAX_MESSAGE_CHARS, RoutingError
from routing.pods import Pod, PodSnapshot
from routing.request import CHAT_PATH, COMPLETIONS_PATH, parse_body
from routing.router import Router
from tests.unit.ext_proc.test_service import FakeStream, body_msg, headers_msg

STRATEGIES = ["random", "least-request", "prefix-cache", "least-request:1,prefix-cache:2"]


def make_service() -> ExtProcService:
    router = Router(rng=random.Random(1))
    pods = [Pod(f"p{i}", f"10.0.0.{i + 1}:8000", "m") for i in range(2)]
    router.update_snapshot(PodSnapshot.build(pods, {p.key for p in pods}, {"m": None}))
    return ExtProcService(router, RouterMetrics(CollectorRegistry()), ServiceSettings(max_body_bytes=8 << 20))


def answer(body: bytes, path: str = CHAT_PATH, strategy: str = "prefix-cache") -> ep.ProcessingResponse:
    """Drive one request through the state machine; the one answer it must give."""
    svc = make_service()
    stream = FakeStream()
    h = svc.handler(stream)
    h.on_message(headers_msg(path=path, pipelined=False, routing_strategy=strategy))
    h.on_message(body_msg(body, True))
    h.on_close(False)
    assert len(stream.sent) == 2, stream.sent  # the headers answer, then exactly one body answer
    assert svc.router.load.total == 0  # whatever happened, nothing stays booked
    return stream.sent[1]


def status_of(resp: ep.ProcessingResponse) -> int:
    """200 when routed, else the status of the immediate response (which must be OpenAI-shaped)."""
    if resp.WhichOneof("response") != "immediate_response":
        return 200
    imm = resp.immediate_response
    err = orjson.loads(imm.body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and len(err["message"]) <= MAX_MESSAGE_CHARS + 40
    for h in imm.headers.set_headers:
        value = h.header.raw_value.decode("ascii")  # header values stay ASCII
        assert value.isprintable() and len(value) < 8 * MAX_CAUSE_VALUE_CHARS
    return imm.status.code


def nested(depth: int, leaf: str = "x") -> str:
    return "[" * depth + json.dumps(leaf) + "]" * depth


@pytest.mark.parametrize(("raw", "status"), [
    # Nesting orjson reads (1024) but does not write back (255): accepted, hashed through the fallback.
    (f'{{"model":"m","messages":[{{"role":"user","content":[{nested(300)}]}}]}}', 200),
    (f'{{"model":"m","messages":[{{"role":"user","content":{{"a":{nested(300)}}}}}]}}', 200),
    (f'{{"model":"m","messages":[{{"role":"user","content":[{nested(1100)}]}}]}}', 400),
    # Lone surrogates, anywhere: no engine accepts them, so neither does the router.
    ('{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a\\ud800"}]}]}', 400),
    ('{"model":"\\ud800","messages":[{"role":"user","content":"hi"}]}', 400),
    ('{"model":"m","messages":[{"role":"user","content":"hi"}],"\\udfff":1}', 400),
    # Behind an integer beyond 64 bits (the one case the strict second parser looks at) too.
    ('{"n":123456789012345678901234567890,"model":"m","messages":[{"role":"\\ud800","content":"x"}]}', 400),
    ('{"n":123456789012345678901234567890,"model":"m","messages":[{"role":"u","content":"x"}],"t":NaN}', 400),
    ('{{"n":123456789012345678901234567890,"model":"m","messages":[{{"role":"u","content":[{}]}}]}}'
     .format(nested(300, "y")), 200),
    ('{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":NaN}', 400),
    ('{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":Infinity}', 400),
    ('{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":-Infinity}', 400),
])
def test_adversarial_shapes(raw: str, status: int) -> None:
    assert status_of(answer(raw.encode())) == status


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_other_unicode_encodings_are_400(encoding: str) -> None:
    raw = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode(encoding)
    assert status_of(answer(raw)) == 400


def test_a_huge_unknown_model_name_is_not_reflected_whole() -> None:
    name = "M" * (3 << 20)
    resp = answer(orjson.dumps({"model": name, "messages": [{"role": "user", "content": "hi"}]}))
    assert status_of(resp) == 404
    assert resp.ByteSize() < 16 * 1024  # was 2 x 3 MB: the message and the x-error header
    headers = {h.header.key: h.header.raw_value for h in resp.immediate_response.headers.set_headers}
    assert len(headers["x-error-no-model-backends"]) < 2 * MAX_CAUSE_VALUE_CHARS


def test_control_characters_cannot_inject_headers() -> None:
    resp = answer(orjson.dumps({"model": "no\r\nset-cookie: x=1", "messages": [{"role": "u", "content": "h"}]}))
    assert status_of(resp) == 404
    value = next(h.header.raw_value for h in resp.immediate_response.headers.set_headers
                 if h.header.key == "x-error-no-model-backends")
    assert b"\r" not in value and b"\n" not in value


# -- generated: every field with every kind of value ------------------------------------------------
_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                     st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
                     st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1,
                             max_size=2))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                       max_leaves=12)
_deep = st.integers(min_value=200, max_value=1200).map(lambda d: json.loads(nested(d)) if d < 1000 else None)
_special = st.sampled_from(["NaN", "Infinity", "-Infinity", '"\\ud800"', '"\\udc00x"', '"' + "z" * 100_000 + '"',
                            nested(1100), "123456789012345678901234567890"])
_FIELDS = ["model", "messages", "prompt", "stream", "max_tokens", "max_completion_tokens", "stream_options"]


def _encode(value: object) -> str:
    """JSON text of a generated value; lone surrogates are written as escapes, as a client would."""
    return json.dumps(value, ensure_ascii=True)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from([*_FIELDS, "content", "role", "part"]), value=st.one_of(_values, _deep),
       special=st.one_of(st.none(), _special), path=st.sampled_from([CHAT_PATH, COMPLETIONS_PATH]),
       strategy=st.sampled_from(STRATEGIES))
def test_any_value_in_any_field_is_routed_or_a_4xx(field: str, value: object, special: str | None, path: str,
                                                   strategy: str) -> None:
    text = special if special is not None else _encode(value)
    message = '{"role":"user","content":"hi"}'
    if field == "content":
        message = f'{{"role":"user","content":{text}}}'
    elif field == "role":
        message = f'{{"role":{text},"content":"hi"}}'
    elif field == "part":
        message = f'{{"role":"user","content":[{{"type":"text","text":"a"}},{text}]}}'
    fields = {"model": '"m"', "messages": f"[{message}]", "prompt": '"p"'}
    if field in _FIELDS:
        fields[field] = text
    raw = "{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}"
    assert status_of(answer(raw.encode(), path, strategy)) in (200, 400, 404)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_are_a_400(raw: bytes) -> None:
    try:
        parse_body(CHAT_PATH, raw)
    except RoutingError as err:
        assert err.status == 400
