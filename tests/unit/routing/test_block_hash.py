"""Chained block hashes (routing/block_hash.py)."""

from __future__ import annotations

import numpy as np

from routing.block_hash import DEFAULT_HASH_SEED, chain_hashes
from routing.strategies.prefix_cache import PrefixCacheSettings


def test_chain_hashes_are_prefix_closed_model_scoped_and_stable() -> None:
    data = bytes(range(256)) * 4  # 1024 bytes: 8 blocks of 128
    h = chain_hashes(data, 128, "m")
    assert len(h) == 8 and h.dtype == np.uint64
    # A longer prompt with the same start has the same leading hashes; a change in block 2 changes
    # every hash from block 2 on, because each hash covers its parent.
    assert list(chain_hashes(data + b"more" * 100, 128, "m")[:8]) == list(h)
    changed = chain_hashes(data[:300] + b"X" + data[301:], 128, "m")
    assert list(changed[:2]) == list(h[:2]) and not set(changed[2:].tolist()) & set(h.tolist())
    # The model starts the chain: two models never share a hash.
    assert not set(chain_hashes(data, 128, "other").tolist()) & set(h.tolist())
    # Only full blocks; a cap on blocks hashed.
    assert len(chain_hashes(data[:127], 128, "m")) == 0 and len(chain_hashes(data, 128, "m", max_blocks=3)) == 3
    # The seed is fixed (not random per process): every replica, every version hashes alike.
    assert PrefixCacheSettings().hash_seed == DEFAULT_HASH_SEED
    assert int(chain_hashes(b"a" * 128, 128, "m")[0]) == 0xCBBCAC78B4308652
    assert int(chain_hashes(b"a" * 128, 128, "m", seed=1)[0]) != 0xCBBCAC78B4308652
