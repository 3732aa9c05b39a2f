"""The precise index (routing/kv_index.py): engine block events in, exact per-pod prefix matches out,
hashed by the router itself; and `prefix-cache` using it for the pods that publish events."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import orjson
import pytest

from routing.block_hash import chain_hashes
from routing.kv_index import KvBlockIndex, MalformedEvent
from routing.pods import Pod, PodSnapshot
from routing.request import CHAT_PATH, COMPLETIONS_PATH, parse_body
from routing.router import Router, RoutingSettings
from routing.strategies.prefix_cache import MATCH_HEADER, PrefixCacheSettings
from routing.tokenizers import (
    ByteIdsTokenizer,
    EngineTokenizer,
    HuggingFaceTokenizer,
    make_engine_tokenizer,
    render_chat,
)

BS = 4
A, B, C = "ns/a", "ns/b", "ns/c"


def ids_body(ids: list[int]) -> dict:
    """A completions body whose prompt is token ids: used as they are."""
    return {"model": "m", "prompt": ids}


def make_index(*pods: str, **kw: object) -> KvBlockIndex:
    kv = KvBlockIndex(**kw)  # type: ignore[arg-type]
    kv.set_tokenizers({}, make_engine_tokenizer("bytes"))
    for p in pods:
        kv.track_pod(p, "m")
        kv.set_precise(p, True)
    return kv


def runs(kv: KvBlockIndex, ids: list[int], pods: tuple[str, ...] = (A, B, C)) -> dict[str, int]:
    match = kv.match("m", ids_body(ids), list(pods))
    assert match is not None
    return {k: r[0] for k, r in match.runs.items()}


TOKENS = list(range(100, 124))  # 6 blocks of 4


def test_stored_blocks_match_the_requests_own_chain() -> None:
    kv = make_index(A, B, C)
    kv.store(A, [11, 12, 13], None, TOKENS[:12], BS)
    kv.store(A, [14, 15], 13, TOKENS[12:20], BS)  # continues the chain after engine block 13
    kv.store(B, [21], None, TOKENS[:4], BS)
    assert runs(kv, TOKENS) == {A: 5, B: 1, C: 0}
    # The router's hashes are chain_hashes of the token ids (4-byte big-endian), seeded by the model.
    data = np.asarray(TOKENS, dtype=">u4").tobytes()
    assert set(chain_hashes(data, BS * 4, "m", kv.seed)[:5].tolist()) <= set(kv._held)
    # Another prompt sharing two blocks, then diverging.
    assert runs(kv, [*TOKENS[:8], 1, 2, 3, 4, 5, 6, 7, 8]) == {A: 2, B: 1, C: 0}


def test_engine_hashes_are_never_used_for_matching() -> None:
    kv = make_index(A, B)
    kv.store(A, [1, 2], None, TOKENS[:8], BS)
    kv.store(B, [777, 778], None, TOKENS[:8], BS)  # another engine seed: other hashes, same blocks
    assert runs(kv, TOKENS, (A, B)) == {A: 2, B: 2}


def test_removal_and_clear() -> None:
    kv = make_index(A, B)
    kv.store(A, [1, 2, 3], None, TOKENS[:12], BS)
    kv.store(B, [1, 2, 3], None, TOKENS[:12], BS)
    assert kv.remove(A, [2]) == 1
    assert runs(kv, TOKENS, (A, B)) == {A: 1, B: 3}  # a hole ends the leading run
    assert kv.remove(A, [99]) == 0 and kv.counts(A).unknown_removed == 1
    assert kv.clear_pod(B) == 3
    assert runs(kv, TOKENS, (A, B)) == {A: 1, B: 0}
    assert len(kv) == 2 and kv.pod_blocks() == {A: 2, B: 0}


def test_two_engine_blocks_with_the_same_tokens_are_one_router_block() -> None:
    kv = make_index(A)
    kv.store(A, [1], None, TOKENS[:4], BS)
    kv.store(A, [2], None, TOKENS[:4], BS)  # e.g. another cache salt: the engine keeps both
    kv.remove(A, [1])
    assert runs(kv, TOKENS, (A,)) == {A: 1}
    kv.remove(A, [2])
    assert runs(kv, TOKENS, (A,)) == {A: 0}
    assert kv._held == {}


def test_unknown_parent_stores_nothing() -> None:
    kv = make_index(A)
    assert kv.store(A, [5, 6], 4, TOKENS[4:12], BS) == 0
    assert kv.counts(A).orphaned == 2 and len(kv) == 0


@pytest.mark.parametrize("tokens, size", [(TOKENS[:7], BS), (TOKENS[:8], 0), ([1, 2, 3, -4, 5, 6, 7, 8], BS),
                                          ([1, 2, 3, 2**32, 5, 6, 7, 8], BS)])
def test_malformed_blocks_raise(tokens: list[int], size: int) -> None:
    kv = make_index(A)
    with pytest.raises(MalformedEvent):
        kv.store(A, [1, 2], None, tokens, size)
    assert len(kv) == 0


def test_adapters_mediums_and_groups_are_kept_apart() -> None:
    kv = make_index(A)
    kv.store(A, [1], None, TOKENS[:4], BS, lora_name="my-adapter")
    assert runs(kv, TOKENS, (A,)) == {A: 0}
    match = kv.match("my-adapter", ids_body(TOKENS), [A])
    assert match is not None and match.runs[A][0] == 1
    kv.store(A, [1], None, TOKENS[:4], BS, lora_id=3)  # an adapter known by id alone matches nothing
    assert runs(kv, TOKENS, (A,)) == {A: 0}
    kv.store(A, [7], None, TOKENS[:4], BS, medium="CPU")  # offloaded: still held
    assert runs(kv, TOKENS, (A,)) == {A: 1}
    kv.remove(A, [7])  # the GPU block 7 is not the CPU one
    assert runs(kv, TOKENS, (A,)) == {A: 1}
    kv.remove(A, [7], medium="CPU")
    assert runs(kv, TOKENS, (A,)) == {A: 0}
    assert kv.store(A, [8], None, TOKENS[:4], BS, group=1) == 0 and kv.counts(A).skipped == 1
    # Blocks with extra keys (images, cache salts) are not what their tokens alone say.
    kv.store(A, [9], None, TOKENS[:4], BS, extra_keys=[("mm-hash",)])
    assert runs(kv, TOKENS, (A,)) == {A: 0}


def test_a_pod_is_bounded() -> None:
    kv = make_index(A, max_blocks_per_pod=3)
    kv.store(A, [1, 2, 3, 4, 5], None, TOKENS[:20], BS)
    assert len(kv) == 3 and kv.counts(A).overflow == 2
    kv.remove(A, [3])
    kv.store(A, [4], 2, TOKENS[12:16], BS)
    assert runs(kv, TOKENS, (A,)) == {A: 2}  # block 3 is gone, so block 4 does not extend the run


def test_forgetting_a_pod_frees_its_bit_and_blocks() -> None:
    kv = make_index(A, B)
    kv.store(A, [1, 2], None, TOKENS[:8], BS)
    kv.store(B, [1, 2], None, TOKENS[:8], BS)
    assert kv.retain_pods({B}) == 2
    assert kv.pod_keys == [B] and not kv.is_precise(A) and kv.precise_count == 1
    kv.track_pod(C, "m")  # reuses A's bit: nothing of A's may show through
    kv.set_precise(C, True)
    assert runs(kv, TOKENS, (B, C)) == {B: 2, C: 0}


def test_only_precise_pods_with_a_tokenizer_are_matched() -> None:
    kv = make_index(A)
    kv.track_pod(B, "m")  # tracked, not (yet) live
    assert kv.precise_pods("m", [A, B, C]) == [A]
    assert kv.match("other-model", ids_body(TOKENS), [A]) is not None  # the `*` tokenizer
    kv.set_tokenizers({"m": make_engine_tokenizer("bytes")})
    assert kv.match("other-model", ids_body(TOKENS), [A]) is None
    kv.set_precise(A, False)
    assert kv.precise_count == 0 and kv.match("m", ids_body(TOKENS), [A]) is None


def test_a_fresh_pod_has_vllms_block_size_until_it_stores() -> None:
    kv = make_index(A)
    match = kv.match("m", ids_body(TOKENS), [A])
    assert match is not None and match.runs[A] == (0, 1, 16)
    kv.store(A, [1], None, TOKENS[:16], 16)
    match = kv.match("m", ids_body(TOKENS + TOKENS), [A])
    assert match is not None and match.runs[A] == (1, 3, 16)
    assert not kv.cleared_since(A, 0.0)
    kv.clear_pod(A, now=50.0)
    assert kv.cleared_since(A, 49.0) and not kv.cleared_since(A, 51.0)


# -- engine tokenizers ------------------------------------------------------------------------------

def test_chat_rendering_is_the_simulators() -> None:
    from extproc_router.simulator.tokenizer import render_prompt, tokenize

    body = {"model": "m", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "image_url", "image_url": {}},
                                     {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": None}]}
    text = render_chat(body["messages"], "simulator")
    assert text == render_prompt("chat", body)
    data, total = make_engine_tokenizer("cl100k").encode_body(body, 10_000)
    assert np.frombuffer(data, dtype=">u4").tolist() == tokenize(text, "cl100k") and total == len(tokenize(text))
    data, _ = make_engine_tokenizer("bytes").encode_body(body, 10_000)
    assert np.frombuffer(data, dtype=">u4").tolist() == tokenize(text, "bytes")
    assert render_chat([{"role": "user", "content": "hi"}], "chatml") == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_completion_prompts() -> None:
    tok = EngineTokenizer(ByteIdsTokenizer())
    assert np.frombuffer(tok.encode_body({"prompt": ["ab", "c"]}, 10)[0], dtype=">u4").tolist() == [97, 98, 10, 99]
    assert np.frombuffer(tok.encode_body({"prompt": [[5, 6], [7]]}, 10)[0], dtype=">u4").tolist() == [5, 6, 7]
    assert tok.encode_body({"prompt": [-1]}, 10) is None and tok.encode_body({"prompt": 5}, 10) is None
    assert tok.encode_body(None, 10) is None
    assert np.frombuffer(tok.encode_body({"prompt": "abcdef"}, 3)[0], dtype=">u4").tolist() == [97, 98, 99]


def tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({"[UNK]": 0, "hello": 1, "world": 2, "<|im_start|>": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return tok.to_str()


def test_a_tokenizer_json() -> None:
    pytest.importorskip("tokenizers")
    tok = HuggingFaceTokenizer(tiny_tokenizer_json())
    data, total = tok.encode("hello world hello nope", 10)
    assert np.frombuffer(data, dtype=">u4").tolist() == [1, 2, 1, 0] and total == 4
    assert np.frombuffer(tok.encode("hello world hello nope", 2)[0], dtype=">u4").tolist() == [1, 2]
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        HuggingFaceTokenizer("{not json")


# -- prefix-cache over a mixed fleet -----------------------------------------------------------------

def mixed_router(speculative_s: float = 0.0, clock: Callable[[], float] = lambda: 1000.0) -> Router:
    router = Router(RoutingSettings(prefix_cache=PrefixCacheSettings(kv_events_speculative_s=speculative_s)),
                    rng=random.Random(5), clock=clock)
    pods = [Pod(n, f"10.0.0.{i + 1}:8000", "m", namespace="ns") for i, n in enumerate("abcd")]
    router.update_snapshot(PodSnapshot.build(pods, {p.key for p in pods}, {"m": None}))
    kv = router.stats.kv_blocks
    kv.set_tokenizers({"m": make_engine_tokenizer("bytes")})
    for key in (A, B):
        kv.track_pod(key, "m")
        kv.set_precise(key, True)
    return router


def chat_body(text: str) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": text}]}


def decide(router: Router, body: dict, path: str = CHAT_PATH) -> tuple[str, str]:
    d = router.decide(parse_body(path, orjson.dumps(body)), "prefix-cache")
    router.release(d)
    return d.pod.name, d.echo[MATCH_HEADER]


def test_prefix_cache_uses_events_for_precise_pods_and_history_for_the_others() -> None:
    router = mixed_router()
    kv = router.stats.kv_blocks
    body = chat_body("Describe the harbour at dawn, in detail. " * 20)
    ids = list(render_chat(body["messages"], "simulator").encode())
    n = len(ids) // 16 * 16
    kv.store(B, list(range(1, n // 16 + 1)), None, ids[:n], 16)
    pod, header = decide(router, body)
    assert pod == "b" and ";src=precise;sel=prefix_match" in header and header.startswith("1.00")
    # The engine evicts everything: the approximate index's history (b was sent it) does not count.
    kv.clear_pod(B, now=1000.0)
    pod, header = decide(router, body)
    assert not header.startswith("1.00") or ";src=approx;" in header
    # The pick was recorded in the approximate index all the same: a non-precise pod holding it wins.
    other = chat_body("An unrelated question about tides and currents. " * 20)
    router.stats.load.acquire(A, 10**6)
    router.stats.load.acquire(B, 10**6)
    first, header = decide(router, other)
    assert first in ("c", "d") and ";src=approx;" in header
    assert decide(router, other)[0] == first


def test_no_precise_pod_means_no_precise_work() -> None:
    router = mixed_router()
    kv = router.stats.kv_blocks
    kv.set_precise(A, False)
    kv.set_precise(B, False)
    assert kv.precise_count == 0
    _, header = decide(router, {"model": "m", "prompt": "plain text " * 100}, COMPLETIONS_PATH)
    assert ";src=approx;" in header
    reports = {f.name: f for f in router.strategies["prefix-cache"].report(router.snapshot, router.stats)}
    assert reports["extproc_prefix_cache_routing_source"].samples == [(("m", "approx"), 1)]
    assert ((("m", "a"), 0.0)) in reports["extproc_prefix_cache_precise_pod"].samples


def test_routed_blocks_count_until_the_events_confirm_them() -> None:
    router = mixed_router(speculative_s=2.0)
    kv = router.stats.kv_blocks
    router.stats.load.acquire("ns/c", 10**6)  # only the precise pods a and b are worth it
    router.stats.load.acquire("ns/d", 10**6)
    body = chat_body("A new shared system prompt, never seen before. " * 20)
    first, header = decide(router, body)
    assert first in ("a", "b") and header.startswith("0.00;tokens=0;src=precise;")
    for _ in range(3):  # no event yet: the routed blocks hold the burst together
        pod, header = decide(router, body)
        assert pod == first and header.startswith("1.00") and ";src=precise;" in header
    kv.clear_pod(f"ns/{first}", now=1000.0)  # emptied since: that routing history no longer counts
    assert decide(router, body)[1].startswith("0.00")


def test_blocks_routed_after_a_cache_clear_count_again_within_the_window() -> None:
    now = [1000.0]
    router = mixed_router(speculative_s=2.0, clock=lambda: now[0])
    kv = router.stats.kv_blocks
    router.stats.load.acquire("ns/c", 10**6)
    router.stats.load.acquire("ns/d", 10**6)
    body = chat_body("Another shared system prompt, routed just after the caches were reset. " * 20)
    kv.clear_pod(A, now=1000.0)
    kv.clear_pod(B, now=1000.0)
    now[0] = 1000.5  # the reset was inside the window, the routing below is after it
    first, _ = decide(router, body)
    now[0] = 1000.6
    pod, header = decide(router, body)
    assert pod == first and header.startswith("1.00") and ";src=precise;" in header, header


def test_speculative_and_approximate_matches_are_counted_in_engine_tokens() -> None:
    """With an engine tokenizer every count is in its tokens, including a match that comes from the
    approximate index's blocks (128 bytes, 32 tokens by the bytes / 4 estimate). Here the engine
    counts a token per byte, so a routed block is 128 engine tokens: left at 32, the speculative
    match claimed a quarter of the prompt while the prompt's uncached rest was counted in full."""
    router = mixed_router(speculative_s=2.0)
    router.stats.load.acquire("ns/c", 10**6)
    router.stats.load.acquire("ns/d", 10**6)
    body = chat_body("Another new shared system prompt, never seen before. " * 20)
    engine_tokens = len(render_chat(body["messages"], "simulator").encode())
    d = router.decide(parse_body(CHAT_PATH, orjson.dumps(body)), "prefix-cache")
    assert d.prefill_tokens == engine_tokens  # nothing cached yet: the whole prompt, in engine tokens
    router.release(d)
    d = router.decide(parse_body(CHAT_PATH, orjson.dumps(body)), "prefix-cache")
    router.release(d)
    header = d.echo[MATCH_HEADER]
    assert header.startswith("1.00") and ";src=precise;" in header
    claimed = int(header.split("tokens=")[1].split(";")[0])
    # Every full 128-byte block of the prompt text is claimed: most of the engine's tokens.
    assert 0.8 * engine_tokens <= claimed <= engine_tokens
    assert d.prefill_tokens == engine_tokens - claimed
