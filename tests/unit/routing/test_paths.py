"""The table of served paths (routing/request.py): every path parses into the model, the text
prefix-cache hashes (empty for load-only paths), stream and max tokens; multipart forms are read
strictly; the path decides the error shape; and the ext_proc stream answers every path."""

from __future__ import annotations

import random

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from ext_proc.control import check_plan, path_error
from ext_proc.metrics import RouterMetrics
from ext_proc.service import ExtProcService, ServiceSettings
from routing.errors import ANTHROPIC, OPENAI, RoutingError
from routing.multipart import parse_form
from routing.pods import Pod, PodSnapshot
from routing.request import (
    CHAT_PATH,
    EMBEDDINGS_PATH,
    MESSAGES_PATH,
    PATHS,
    RESPONSES_PATH,
    TRANSCRIPTIONS_PATH,
    error_style,
    parse_body,
)
from routing.router import Router
from tests.unit.ext_proc.test_hostile_bodies import _deep, _encode, _special, _values
from tests.unit.ext_proc.test_service import FakeStream, body_msg, headers_msg

BOUNDARY = "----extproc-test-7f3a"
FORM_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def form(*parts: tuple[str, bytes, str | None], boundary: str = BOUNDARY) -> bytes:
    """A multipart body of (name, value, filename) parts, as HTTP clients write it."""
    out = b""
    for name, value, filename in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode()
        if filename:
            out += b"Content-Type: audio/wav\r\n"
        out += b"\r\n" + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


AUDIO = b"RIFF\x00\x00WAVE" + bytes(range(256)) * 64  # binary bytes, CRLFs and dashes included
TURNS = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
         {"role": "user", "content": "and now?"}]

# One minimal valid body per path, and the text prefix-cache must hash for it.
MINIMAL: dict[str, tuple[dict, str | None]] = {
    "/v1/chat/completions": ({"messages": TURNS}, None),
    "/v1/completions": ({"prompt": "once upon"}, "once upon"),
    "/v1/messages": ({"max_tokens": 8, "system": "be brief", "messages": TURNS}, None),
    "/v1/responses": ({"input": "hello", "instructions": "be brief"}, None),
    "/v1/embeddings": ({"input": ["alpha", "beta"]}, "alpha\nbeta"),
    "/pooling": ({"input": "alpha"}, "alpha"),
    "/v1/classify": ({"input": "great movie"}, "great movie"),
    "/classify": ({"input": [1, 2, 3]}, "1 2 3"),
    "/v1/rerank": ({"query": "what is x", "documents": ["x is", "y is"]}, "what is x"),
    "/rerank": ({"query": "what is x", "documents": ["x is"]}, "what is x"),
    "/v2/rerank": ({"query": "what is x", "documents": ["x is"], "top_n": 1}, "what is x"),
    "/v1/score": ({"text_1": "what is x", "text_2": ["x is", "y is"]}, "what is x"),
    "/score": ({"queries": "what is x", "documents": ["x is"]}, "what is x"),
    "/v1/images/generations": ({"prompt": "a red cat", "n": 2}, ""),
}


def chat_prompt(messages: list[dict]) -> str:
    return parse_body(CHAT_PATH, orjson.dumps({"model": "m", "messages": messages})).prompt


def test_every_routed_path_has_a_case_here() -> None:
    assert set(PATHS) == set(MINIMAL) | {TRANSCRIPTIONS_PATH, "/v1/audio/translations"}


@pytest.mark.parametrize("path", sorted(MINIMAL))
def test_every_json_path_yields_model_and_the_hashed_text(path: str) -> None:
    body, prompt = MINIMAL[path]
    req = parse_body(path, orjson.dumps({"model": "m", **body}))
    assert req.model == "m" and req.path == path and req.body is not None
    if prompt is not None:
        assert req.prompt == prompt
    assert bool(req.prompt) == bool(PATHS[path].hashed)  # the README's "load-only" column


@pytest.mark.parametrize("path", sorted(MINIMAL))
def test_every_path_refuses_a_body_without_a_model(path: str) -> None:
    body, _ = MINIMAL[path]
    with pytest.raises(RoutingError) as exc:
        parse_body(path, orjson.dumps(body))
    assert exc.value.status == 400 and exc.value.param == "model"


def test_messages_hash_as_the_equivalent_chat() -> None:
    """vLLM serves /v1/messages through its chat template: the same conversation must find the same
    cached prefix whichever API carried it."""
    system_blocks = [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]
    blocks = [{"role": "user", "content": [{"type": "text", "text": "hello"}]},
              {"role": "assistant", "content": "hi"}, {"role": "user", "content": "and now?"}]
    msg = parse_body(MESSAGES_PATH, orjson.dumps({"model": "m", "max_tokens": 5, "stream": True,
                                                  "system": system_blocks, "messages": blocks}))
    assert msg.prompt == chat_prompt([{"role": "system", "content": "be brief"}, *TURNS])
    assert msg.stream and msg.max_tokens == 5 and msg.include_usage  # Anthropic streams always carry usage
    # A system-role message inside `messages` joins the system turn, as vLLM merges it.
    inline = parse_body(MESSAGES_PATH, orjson.dumps({"model": "m", "max_tokens": 5, "messages": [
        {"role": "system", "content": "be brief"}, *TURNS]}))
    assert inline.prompt == msg.prompt
    # Turn N+1 extends turn N: the basis of prefix affinity holds on this path too.
    longer = parse_body(MESSAGES_PATH, orjson.dumps({"model": "m", "max_tokens": 5, "system": "be brief",
                                                     "messages": [*TURNS, {"role": "assistant", "content": "x"}]}))
    assert longer.prompt.startswith(msg.prompt)


def test_responses_hash_as_the_equivalent_chat() -> None:
    text = parse_body(RESPONSES_PATH, orjson.dumps({"model": "m", "instructions": "be brief", "input": "hello",
                                                    "max_output_tokens": 7}))
    assert text.prompt == chat_prompt([{"role": "system", "content": "be brief"}, TURNS[0]])
    assert text.max_tokens == 7
    items = parse_body(RESPONSES_PATH, orjson.dumps({"model": "m", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "hello"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]},
        {"role": "user", "content": "and now?"}]}))
    assert items.prompt == chat_prompt(TURNS)
    tools = parse_body(RESPONSES_PATH, orjson.dumps({"model": "m", "input": [
        {"role": "user", "content": "hello"}, {"type": "function_call_output", "call_id": "c1", "output": "42"}]}))
    assert tools.prompt.startswith(chat_prompt(TURNS[:1])) and "42" in tools.prompt


def test_embeddings_inputs_and_chat_style_messages() -> None:
    for sent, expected in (("one", "one"), (["a", "b"], "a\nb"), ([5, 6], "5 6"), ([[5], [6, 7]], "5\n6 7")):
        assert parse_body(EMBEDDINGS_PATH, orjson.dumps({"model": "m", "input": sent})).prompt == expected
    chat = parse_body(EMBEDDINGS_PATH, orjson.dumps({"model": "m", "messages": TURNS}))
    assert chat.prompt == chat_prompt(TURNS)


@pytest.mark.parametrize(("path", "body", "param"), [
    (MESSAGES_PATH, {"messages": TURNS}, "max_tokens"),
    (MESSAGES_PATH, {"max_tokens": 4, "messages": []}, "messages"),
    (MESSAGES_PATH, {"max_tokens": 4, "messages": [{"role": "user", "content": 5}]}, "messages"),
    (MESSAGES_PATH, {"max_tokens": 4, "system": 5, "messages": TURNS}, "system"),
    (MESSAGES_PATH, {"max_tokens": "4", "messages": TURNS}, "max_tokens"),
    (RESPONSES_PATH, {}, "input"),
    (RESPONSES_PATH, {"input": []}, "input"),
    (RESPONSES_PATH, {"input": "x", "instructions": ["no"]}, "instructions"),
    (RESPONSES_PATH, {"input": "x", "max_output_tokens": -1}, "max_output_tokens"),
    (RESPONSES_PATH, {"input": "x", "stream": "yes"}, "stream"),
    (EMBEDDINGS_PATH, {}, "input"),
    (EMBEDDINGS_PATH, {"input": [1, "a"]}, "input"),
    (EMBEDDINGS_PATH, {"input": []}, "input"),
    ("/v1/rerank", {"documents": ["a"]}, "query"),
    ("/v1/rerank", {"query": "q"}, "documents"),
    ("/v1/rerank", {"query": "q", "documents": 5}, "documents"),
    ("/v1/rerank", {"query": 5, "documents": ["a"]}, "query"),
    ("/v1/score", {"text_1": "q"}, "text_2"),
    ("/v1/score", {"documents": ["a"]}, "text_1"),
    ("/v1/images/generations", {}, "prompt"),
    ("/v1/images/generations", {"prompt": ["a"]}, "prompt"),
])
def test_bad_bodies_are_400_naming_the_field(path: str, body: dict, param: str) -> None:
    with pytest.raises(RoutingError) as exc:
        parse_body(path, orjson.dumps({"model": "m", **body}))
    assert exc.value.status == 400 and exc.value.param == param


def test_the_path_decides_the_error_shape() -> None:
    err = RoutingError(400, "missing required field 'max_tokens'", param="max_tokens", code="invalid_request")
    assert error_style(MESSAGES_PATH) == ANTHROPIC
    assert err.to_body(ANTHROPIC) == {"type": "error", "error": {"type": "invalid_request_error",
                                                                 "message": "missing required field 'max_tokens'"}}
    for status, kind in ((401, "authentication_error"), (404, "not_found_error"), (413, "request_too_large"),
                         (429, "rate_limit_error"), (503, "overloaded_error"), (500, "api_error")):
        assert RoutingError(status, "x").to_body(ANTHROPIC)["error"]["type"] == kind
    for path in set(PATHS) - {MESSAGES_PATH}:
        assert error_style(path) == OPENAI
    assert error_style("/nowhere") == OPENAI


def test_path_rules() -> None:
    for path in PATHS:
        assert path_error("POST", path, True) is None
        assert path_error("GET", path, True).status == 405  # type: ignore[union-attr]
        assert path_error("POST", path, False).status == 400  # type: ignore[union-attr]
    unknown = path_error("POST", "/v1/moderations", True)
    assert unknown is not None and unknown.status == 404 and unknown.code == "unknown_url"
    assert EMBEDDINGS_PATH in unknown.message and "GET /v1/models" in unknown.message
    assert "multipart" in path_error("POST", TRANSCRIPTIONS_PATH, False).message  # type: ignore[union-attr]


# -- multipart ----------------------------------------------------------------------------------------

def test_audio_form_gives_model_and_flags_and_routes_by_load_only() -> None:
    body = form(("model", b"whisper", None), ("language", b"en", None), ("file", AUDIO, "a.wav"),
                ("stream", b"True", None), ("stream_include_usage", b"1", None))
    req = parse_body(TRANSCRIPTIONS_PATH, body, FORM_TYPE)
    assert (req.model, req.prompt, req.stream, req.include_usage, req.body) == ("whisper", "", True, True, None)
    quiet = parse_body("/v1/audio/translations", form(("file", AUDIO, "a.wav"), ("model", b"whisper", None)),
                       f'multipart/form-data; charset=utf-8; boundary="{BOUNDARY}"')
    assert quiet.model == "whisper" and not quiet.stream and not quiet.include_usage


def test_form_reading_copies_no_file_bytes() -> None:
    """The file part is skipped by offset: a bytearray body (several Envoy chunks) is read in place,
    and a file that holds the boundary text without its line break is still one part."""
    trap = b"--" + BOUNDARY.encode() + b"-not-a-delimiter"
    raw = bytearray(form(("file", trap + AUDIO, "a.wav"), ("model", b"m", None)))
    result = parse_form(raw, FORM_TYPE, {"model"})
    assert result.fields == {"model": "m"} and result.files == {"file"} and result.names == {"file", "model"}


def test_a_preamble_and_an_epilogue_are_ignored() -> None:
    body = b"preamble text\r\n" + form(("model", b"m", None), ("file", AUDIO, "a.wav")) + b"epilogue"
    assert parse_body(TRANSCRIPTIONS_PATH, body, FORM_TYPE).model == "m"


@pytest.mark.parametrize(("body", "content_type", "needle"), [
    (form(("model", b"m", None), ("file", AUDIO, "a.wav")), None, "no Content-Type"),
    (form(("model", b"m", None), ("file", AUDIO, "a.wav")), "application/json", "multipart/form-data"),
    (form(("model", b"m", None), ("file", AUDIO, "a.wav")), "multipart/form-data", "no boundary"),
    (form(("model", b"m", None), ("file", AUDIO, "a.wav")), "multipart/form-data; boundary=" + "x" * 71,
     "not valid"),
    (form(("model", b"m", None), ("file", AUDIO, "a.wav"))[:-12], FORM_TYPE, "closing boundary"),
    (b"no parts at all", FORM_TYPE, "no multipart part"),
    (form(("model", b"m", None)), FORM_TYPE, "'file'"),
    (form(("file", AUDIO, "a.wav")), FORM_TYPE, "'model'"),
    (form(("model", b"m", None), ("model", b"n", None), ("file", AUDIO, "a.wav")), FORM_TYPE, "more than once"),
    (form(("model", b"\xff\xfe", None), ("file", AUDIO, "a.wav")), FORM_TYPE, "UTF-8"),
    (form(("model", b"m", None), ("stream", b"maybe", None), ("file", AUDIO, "a.wav")), FORM_TYPE, "'stream'"),
    (form(("model", b"m", None), ("file", AUDIO, "a.wav")).replace(b"form-data; name=\"model\"", b"inline"),
     FORM_TYPE, "form-data"),
    (f"--{BOUNDARY}\r\n\r\nvalue\r\n--{BOUNDARY}--\r\n".encode(), FORM_TYPE, "no headers"),
    (f"--{BOUNDARY}\r\nContent-Disposition: form-data\r\n\r\nv\r\n--{BOUNDARY}--\r\n".encode(), FORM_TYPE,
     "no Content-Disposition name"),
    (form(("model", b"m" * 70_000, None), ("file", AUDIO, "a.wav")), FORM_TYPE, "longer than"),
])
def test_malformed_forms_are_400(body: bytes, content_type: str | None, needle: str) -> None:
    with pytest.raises(RoutingError) as exc:
        parse_body(TRANSCRIPTIONS_PATH, body, content_type)
    assert exc.value.status == 400 and needle in exc.value.message, exc.value.message


# -- through the ext_proc stream ------------------------------------------------------------------------

def service(keys: frozenset[str] = frozenset()) -> ExtProcService:
    router = Router(rng=random.Random(1))
    pods = [Pod(f"p{i}", f"10.0.0.{i + 1}:8000", "m") for i in range(2)]
    router.update_snapshot(PodSnapshot.build(pods, {p.key for p in pods}, {"m": None}))
    return ExtProcService(router, RouterMetrics(CollectorRegistry()), ServiceSettings(api_keys=keys))


def run(svc: ExtProcService, path: str, body: bytes, **headers: str) -> ep.ProcessingResponse:
    stream = FakeStream()
    h = svc.handler(stream)
    h.on_message(headers_msg(path=path, pipelined=False, **headers))
    if stream.sent and stream.sent[-1].WhichOneof("response") == "immediate_response":
        return stream.sent[-1]
    h.on_message(body_msg(body, True))
    h.on_close(reset=False)
    return stream.sent[-1]


@pytest.mark.parametrize("path", sorted(MINIMAL))
def test_every_path_routes_through_the_stream(path: str) -> None:
    body, _ = MINIMAL[path]
    answer = run(service(), path, orjson.dumps({"model": "m", **body}), routing_strategy="prefix-cache")
    assert answer.WhichOneof("response") == "request_body", answer
    assert answer.dynamic_metadata.fields["extproc-router"].struct_value.fields["routing-strategy"].string_value \
        == "prefix-cache"


def test_a_form_routes_through_the_stream() -> None:
    answer = run(service(), TRANSCRIPTIONS_PATH, form(("model", b"m", None), ("file", AUDIO, "a.wav")),
                 content_type=FORM_TYPE, routing_strategy="least-request")
    assert answer.WhichOneof("response") == "request_body"


def test_messages_errors_are_anthropic_shaped_and_take_x_api_key() -> None:
    svc = service(frozenset({"sk-1"}))
    body = orjson.dumps({"model": "m", "max_tokens": 4, "messages": TURNS})
    unauth = run(svc, MESSAGES_PATH, body).immediate_response
    assert unauth.status.code == 401
    assert orjson.loads(unauth.body) == {"type": "error", "error": {"type": "authentication_error",
                                                                    "message": "Incorrect API key provided."}}
    assert run(svc, MESSAGES_PATH, body, x_api_key="sk-1").WhichOneof("response") == "request_body"
    assert run(svc, MESSAGES_PATH, body, authorization="Bearer sk-1").WhichOneof("response") == "request_body"
    # A wrong bearer token is not rescued by a right x-api-key (one credential per request).
    assert run(svc, MESSAGES_PATH, body, authorization="Bearer no", x_api_key="sk-1").WhichOneof(
        "response") == "immediate_response"
    missing = run(svc, MESSAGES_PATH, orjson.dumps({"model": "m", "messages": TURNS}), x_api_key="sk-1")
    err = orjson.loads(missing.immediate_response.body)
    assert missing.immediate_response.status.code == 400
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    unknown = run(svc, MESSAGES_PATH, orjson.dumps({"model": "nope", "max_tokens": 1, "messages": TURNS}),
                  x_api_key="sk-1")
    assert orjson.loads(unknown.immediate_response.body)["error"]["type"] == "not_found_error"
    # Every other path keeps OpenAI's shape.
    other = run(svc, EMBEDDINGS_PATH, orjson.dumps({"model": "m"}), x_api_key="sk-1")
    assert set(orjson.loads(other.immediate_response.body)["error"]) == {"message", "type", "param", "code"}


def test_pd_split_only_on_paths_engines_split() -> None:
    router = Router(rng=random.Random(1))
    pods = [Pod("pre", "10.0.0.1:8000", "m", labels={"role-name": "prefill", "roleset-name": "rs"}),
            Pod("dec", "10.0.0.2:8000", "m", labels={"role-name": "decode", "roleset-name": "rs"})]
    router.update_snapshot(PodSnapshot.build(pods, {p.key for p in pods}, {"m": None}))
    chat = parse_body(CHAT_PATH, orjson.dumps({"model": "m", "messages": TURNS}))
    decision = router.decide(chat, "pd")
    assert decision.prefill is not None and check_plan(chat, decision) is None
    router.release(decision)
    embed = parse_body(EMBEDDINGS_PATH, orjson.dumps({"model": "m", "input": "x"}))
    decision = router.decide(embed, "pd")
    refused = check_plan(embed, decision)
    assert refused is not None and refused.status == 400 and CHAT_PATH in refused.message
    router.release(decision)


# -- generated: hostile values in every field of every path, and mangled forms ----------------------------

def _status(resp: ep.ProcessingResponse, path: str) -> int:
    """200 when routed, else the immediate response's status; its body in the path's error shape."""
    if resp.WhichOneof("response") != "immediate_response":
        return 200
    body = orjson.loads(resp.immediate_response.body)
    if error_style(path) == ANTHROPIC:
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return resp.immediate_response.status.code


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(sorted(MINIMAL)), data=st.data(), value=st.one_of(_values, _deep),
       special=st.one_of(st.none(), _special), strategy=st.sampled_from(["least-request", "prefix-cache"]))
def test_any_value_in_any_field_of_any_path_is_routed_or_a_4xx(path: str, data: st.DataObject, value: object,
                                                               special: str | None, strategy: str) -> None:
    body, _ = MINIMAL[path]
    fields = {"model": '"m"', **{k: orjson.dumps(v).decode() for k, v in body.items()}}
    field = data.draw(st.sampled_from(sorted(fields)))
    fields[field] = special if special is not None else _encode(value)
    raw = ("{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}").encode()
    svc = service()
    assert _status(run(svc, path, raw, routing_strategy=strategy), path) in (200, 400, 404)
    assert svc.router.load.total == 0  # run() closed the stream: nothing stays booked


_VALID_FORM = form(("model", b"m", None), ("stream", b"false", None), ("file", AUDIO[:300], "a.wav"))


@settings(max_examples=300, deadline=None)
@given(cuts=st.lists(st.tuples(st.integers(0, len(_VALID_FORM)), st.integers(0, 8), st.binary(max_size=6)),
                     min_size=1, max_size=4))
def test_mangled_forms_are_routed_or_a_400(cuts: list[tuple[int, int, bytes]]) -> None:
    """Bytes replaced, dropped or inserted anywhere in a form (a boundary, a header, a value): the
    router reads it as the pod would or refuses it with a 400, never anything else."""
    raw = _VALID_FORM
    for at, drop, insert in cuts:
        raw = raw[:at] + insert + raw[at + drop:]
    try:
        req = parse_body(TRANSCRIPTIONS_PATH, raw, FORM_TYPE)
    except RoutingError as err:
        assert err.status == 400
        return
    assert req.prompt == "" and isinstance(req.model, str)


@settings(max_examples=150, deadline=None)
@given(raw=st.binary(max_size=300), boundary=st.text(max_size=80))
def test_arbitrary_bytes_and_boundaries_are_a_400(raw: bytes, boundary: str) -> None:
    for content_type in (FORM_TYPE, f"multipart/form-data; boundary={boundary}"):
        with pytest.raises(RoutingError) as exc:
            parse_body(TRANSCRIPTIONS_PATH, raw, content_type)
        assert exc.value.status == 400
