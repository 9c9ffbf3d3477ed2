"""A sentencepiece "precompiled charsmap" built from a plain {text: replacement} map.

This is the normalizer XLM-R's tokenizer carries (tokenizers' `normalizers.Precompiled`,
transformers' `_spm_precompiled_charsmap`). Layout: a little-endian uint32 byte length of the
trie, the trie (Darts-clone double array of uint32 units over the keys' UTF-8 bytes), then
the replacements as NUL-terminated UTF-8; a key's value is its replacement's byte offset.
"""

from __future__ import annotations

import struct
from collections import deque

LEAF = -1  # key of a trie node's value in the nested dicts below
HAS_LEAF = 1 << 8
IS_LEAF = 1 << 31  # a leaf unit's label never equals a byte, so lookups cannot walk into it


def precompiled_charsmap(mapping: dict[str, str]) -> bytes:
    """Pack `mapping` (e.g. {"Ａ": "A", "\\t": " ", "\\x01": ""}) as a precompiled charsmap.

    Example:
        >>> from tokenizers import normalizers
        >>> normalizers.Precompiled(precompiled_charsmap({"Ａ": "A"})).normalize_str("Ａb")
        'Ab'
    """
    blob = bytearray()
    trie: dict = {}
    for key, replacement in sorted(mapping.items()):
        if not key or "\0" in key:
            raise ValueError(f"charsmap keys must be non-empty and hold no NUL: {key!r}")
        node = trie
        for byte in key.encode():
            node = node.setdefault(byte, {})
        node[LEAF] = len(blob)
        blob += replacement.encode() + b"\0"
    units = _double_array(trie)
    return struct.pack("<I", 4 * len(units)) + struct.pack(f"<{len(units)}I", *units) + bytes(blob)


def _double_array(trie: dict) -> list[int]:
    """Units such that from a node at `pos` with unit `u`, byte `c` leads to
    `pos ^ offset(u) ^ c`, whose unit's label must be `c`; the node's value, if it has one,
    sits at `pos ^ offset(u)` (label 0). Each node gets its own base, so no lookup lands on
    another node's child."""
    units = [0] * 256
    taken = bytearray(256)
    taken[0] = 1  # the root
    bases: set[int] = set()
    first_free = 1
    queue = deque([(0, trie)])
    while queue:
        pos, node = queue.popleft()
        labels = sorted(k for k in node if k != LEAF)
        slots = ([0] if LEAF in node else []) + labels
        while first_free < len(taken) and taken[first_free]:
            first_free += 1
        base = _free_base(slots, taken, bases, first_free)
        needed = (base | 0xFF) + 1  # lookups of any byte stay inside the base's 256-unit block
        if needed > len(units):
            units += [0] * (needed - len(units))
            taken += bytearray(needed - len(taken))
        offset = pos ^ base
        assert offset < 1 << 21, "charsmap too large for the unextended offset field"
        units[pos] |= offset << 10 | (HAS_LEAF if LEAF in node else 0)
        bases.add(base)
        for slot in slots:
            taken[base ^ slot] = 1
        if LEAF in node:
            units[base] = node[LEAF] | IS_LEAF
        for c in labels:
            units[base ^ c] = c
            queue.append((base ^ c, node[c]))
    return units


def _free_base(slots: list[int], taken: bytearray, bases: set[int], pos: int) -> int:
    """The lowest unused base that puts the first slot on a free unit at or after `pos`
    and every other slot on a free unit too."""
    size = len(taken)
    while True:
        pos = taken.find(0, pos) if pos < size else pos
        if pos < 0:
            pos = size
        base = pos ^ slots[0]
        if base not in bases and all(base ^ s >= size or not taken[base ^ s] for s in slots[1:]):
            return base
        pos += 1
