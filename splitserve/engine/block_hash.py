"""Chained content hashes of full KV blocks, the key of the prefix cache.

Block i's hash covers its tokens and block i-1's hash, so equal hashes mean equal prefixes.
A cryptographic hash (not Python's `hash`) keeps one tenant from forging a collision with
another tenant's prefix, and gives the same value in every process, which the router needs.
"""

from __future__ import annotations

import hashlib
from array import array

ROOT_HASH = b"splitserve-kv-v1"


def hash_block(parent: bytes, token_ids) -> bytes:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def block_hashes_for(token_ids: list[int], block_size: int, known: list[bytes] | None = None) -> list[bytes]:
    """Hashes of every full block of token_ids, extending `known` (a prefix of the answer) in place."""
    hashes = known if known is not None else []
    num_full = len(token_ids) // block_size
    parent = hashes[-1] if hashes else ROOT_HASH
    for i in range(len(hashes), num_full):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes
