"""Prompt tokenizers (routing/tokenizers.py)."""

from __future__ import annotations

import pytest

from routing.tokenizers import CharacterTokenizer


def test_character_tokenizer_caps_work_and_handles_unicode() -> None:
    tok = CharacterTokenizer()
    data, tokens = tok.encode("héllo wörld ✓ 日本語", 1000)
    assert data == "héllo wörld ✓ 日本語".encode() and tokens == len(data) / 4
    data, tokens = tok.encode("日本語" * 1000, 100)  # 9000 bytes: only the first 100 are encoded
    assert len(data) == 100 and tokens == pytest.approx(9000 / 4)
    data, _ = tok.encode("a\ud800b", 10)  # a lone surrogate is valid JSON; it must not raise
    assert len(data) == 5
