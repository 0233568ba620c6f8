"""KV-cache block manager of the paged-attention engine.

The implementation is C++ (``psnrl/engine/csrc/``, its model in ``README.md`` there; built by ``pip
install -e .`` into ``psnrl.engine._block_manager``); this module re-exports it and,
for type checkers, declares its typed API. The runtime classes are the C++ ones
(no Python layer on the hot path); ``help()`` on them shows the same docs.

Model
    ``num_blocks`` physical blocks (ids ``0..num_blocks-1``) of ``block_size``
    token slots. A sequence (int ``seq_id``) has a token list and a block table;
    token ``p`` lives at slot ``table[p // block_size] * block_size + p % block_size``.
    Each block has a reference count (the number of block-table entries that
    point to it); a block with count 0 is free.

Prefix cache
    A full block's hash is chained: ``h0 = XXH64(tokens0)``,
    ``hi = XXH64(le64(h(i-1)) + tokens_i)``, tokens as little-endian int64
    (:func:`hash_block`). ``allocate`` reuses a cached block only if its stored
    token ids and its parent link (parent hash, salt, or none) are equal too: the
    hash alone is never trusted. Freed blocks keep their hash and can still be
    hit until they are handed out again.

Cache salt
    The same tokens do not give the same KV under different policies (a request
    with a NoiseSpec runs theta + eps). ``allocate(..., cache_salt=s)`` tags a
    sequence with an optional uint64 ``s`` naming its policy: its root block
    hashes with the salt in the parent slot, ``h0 = XXH64(le64(s) + tokens0)``
    (``hash_block(s, tokens0)``), and records ``s`` as a salt link, so its whole
    chain differs from the unsalted chain and from any other salt's. Lookups
    check the link: an unsalted sequence hits only parentless roots, a salted
    one only roots linked to the same salt. The blocks a salted sequence
    publishes (``mark_computed``) chain from its salt, and ``fork`` gives the
    child the parent's salt. The engine passes
    no salt for the clean policy and a stable hash of the NoiseSpec otherwise
    (``psnrl.engine.llm.noise_cache_salt``).

Cached-prefix rule
    ``allocate`` returns ``min(hit prefix, len(tokens) - 1)`` rounded down to
    ``block_size``: the engine always computes at least the last prompt token
    (it needs its logits), and the block holding that token is always a fresh,
    exclusively owned one, so a prefill never writes into a shared block.

Only written KV is shared
    A block enters the cache only once it is inside its sequence's *computed
    horizon*: the leading tokens whose KV is written. ``allocate(...,
    num_scheduled=None)`` counts the whole prompt as written (for callers that write
    it before anyone else looks it up); the engine passes 0 and calls
    :meth:`BlockManager.mark_computed` once the step that writes a sequence's tokens
    has completed. ``append_token`` does not move the horizon. So a step that fails
    or is interrupted publishes nothing it did not write, and a sequence freed
    before its KV was written leaves nothing in the cache.

Free pool
    Blocks are handed out from the head of a doubly-linked free list. Blocks
    holding nothing reusable are freed to the head (reused first); blocks that
    keep a cache entry go to the tail, so the least recently freed cached block
    is evicted first (LRU). ``free`` releases a sequence's blocks last to first,
    so a chain's deeper blocks are evicted before its ancestors.

Device block tables
    The engine's decode graphs keep every running sequence's block table in a row of a
    device table and copy only what changed. The manager remembers, per sequence, the row
    it last wrote there and how many leading entries that row still holds (a copy-on-write
    of the last block takes it back by one; a fork starts with none), and which sequence
    wrote each row last: :meth:`BlockManager.sync_decode_tables` emits only the entries a
    row lacks (everything, when the sequence moved or another one wrote its row since).

Weight updates
    Cached KV is stale after the policy's weights change: call
    :meth:`BlockManager.clear_prefix_cache` (keeps live sequences, which the
    engine must then recompute or finish) or :meth:`BlockManager.reset`.

Costs: ``append_token`` O(1) (O(block_size) when it fills a block, to hash it);
``allocate`` O(len(tokens)); ``free``/``fork`` O(blocks of the sequence);
``check_invariants`` O(num_blocks + all tokens), for tests and debugging.
Not thread-safe.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

__all__ = ["AppendResult", "BlockManager", "OutOfBlocks", "hash_block"]

if TYPE_CHECKING:  # the typed API; at run time the C++ classes below are used

    class OutOfBlocks(RuntimeError):
        """Not enough free blocks; the manager's state is unchanged."""

    def hash_block(parent_hash: int | None, token_ids: list[int]) -> int:
        """Chained 64-bit block hash: XXH64(seed 0) of [le64(parent_hash)] + le64(tokens).

        ``parent_hash`` is the previous block's hash; for a sequence's first block it
        is the sequence's cache salt, or None for an unsalted sequence."""
        ...

    class AppendResult:
        """What ``append_token`` did."""

        @property
        def slot(self) -> int:
            """Flat KV slot of the new token: ``block_id * block_size + offset``."""
            ...

        @property
        def block_id(self) -> int:
            """Block holding the new token."""
            ...

        @property
        def new_block(self) -> bool:
            """A block was taken from the free pool (a new last block, or the CoW copy)."""
            ...

        @property
        def cow(self) -> tuple[int, int] | None:
            """``(src, dst)``: copy src's KV rows into dst before writing ``slot``; else None."""
            ...

    class BlockManager:
        """Paged KV-cache block manager with prefix caching, ref counts and copy-on-write."""

        def __init__(self, num_blocks: int, block_size: int, watermark: float = 0.01) -> None:
            """ValueError unless num_blocks >= 1, block_size >= 1 and 0 <= watermark < 1."""

        @property
        def num_blocks(self) -> int: ...
        @property
        def block_size(self) -> int: ...
        @property
        def watermark(self) -> float: ...
        @property
        def watermark_blocks(self) -> int:
            """``int(watermark * num_blocks)``: blocks ``can_allocate`` keeps free."""
            ...

        def can_allocate(self, num_tokens: int) -> bool:
            """Room for a new sequence of num_tokens tokens with watermark_blocks left free,
            ignoring cache hits (conservative). ValueError if num_tokens < 1."""
            ...

        def num_required_blocks(self, token_ids: list[int], cache_salt: int | None = None) -> int:
            """Exact free blocks ``allocate(token_ids, cache_salt=cache_salt)`` would take now
            (cache-aware, no watermark)."""
            ...

        def allocate(self, seq_id: int, token_ids: list[int], num_scheduled: int | None = None,
                     cache_salt: int | None = None) -> int:
            """Blocks for all tokens of a new sequence, through the prefix cache.

            Returns the cached prefix length (multiple of block_size, < len(token_ids)).
            ``cache_salt`` (uint64 or None): the policy the sequence's KV comes from; it
            shares cached blocks only with sequences of the same salt (see "Cache salt").
            ValueError: seq_id exists, token_ids empty, num_scheduled out of [0, len].
            TypeError: cache_salt not in [0, 2**64).
            OutOfBlocks: not enough free blocks (all-or-nothing: state unchanged)."""
            ...

        def mark_computed(self, seq_id: int, num_tokens: int) -> None:
            """KV of the first num_tokens tokens is written (call it once the step that writes it
            has completed); their full blocks may enter the prefix cache. Never lowers the horizon."""
            ...

        def num_computed(self, seq_id: int) -> int:
            """The sequence's computed horizon (see mark_computed)."""
            ...

        def can_append(self, seq_id: int) -> bool:
            """``append_token`` would find its block (a new one when the last is full, or
            a CoW copy when the partial last block is shared). No watermark."""
            ...

        def append_token(self, seq_id: int, token_id: int) -> AppendResult:
            """Add one token (about to be computed; the horizon does not move, see mark_computed).
            OutOfBlocks if a block is needed and none is free (state unchanged)."""
            ...

        def fork(self, parent_seq_id: int, child_seq_id: int) -> None:
            """Child shares all the parent's blocks (ref + 1), its tokens and its cache salt.
            KeyError: unknown parent; ValueError: child exists."""
            ...

        def free(self, seq_id: int) -> None:
            """Release the sequence's blocks (ref - 1, last block first). KeyError if unknown."""
            ...

        def append_last_tokens(self, seq_ids: list[int], last_tokens: list[int],
                               lengths: list[int]) -> tuple[int, list[tuple[int, int]]]:
            """A decode step's ``append_token`` calls in one: each sequence holding
            ``lengths[i] - 1`` tokens gets ``last_tokens[i]``, one holding ``lengths[i]``
            nothing; stops before the first in neither state or needing a block when none is
            free (left unchanged). Returns (how many were handled, their copy-on-writes)."""
            ...

        def set_last_tokens(self, seq_ids: list[int], tokens: list[int]) -> None:
            """The last token of sequence i becomes ``tokens[i]``: a step reserved it before its
            value was known (the engine's overlap). ValueError if it is already computed."""
            ...

        def forget_device_rows(self) -> None:
            """A new device table holds nothing: every sequence writes its whole row at its next
            ``sync_decode_tables``."""
            ...

        def can_append_all(self, seq_ids: list[int]) -> bool:
            """``append_token`` would find a block for every one of these sequences at once."""
            ...

        def mark_computed_all(self, seq_ids: list[int], num_tokens: list[int]) -> None:
            """``mark_computed`` for each sequence, in one call."""
            ...

        def sync_decode_tables(self, seq_ids: list[int], positions: list[int], rows: list[int], num_rows: int,
                               width: int, slots: np.ndarray, updates: np.ndarray) -> int:
            """A graph decode step's KV inputs, for block tables kept on the device in the rows of a
            ``[num_rows, width]`` table (see "Device block tables"). Writes the KV slot of
            ``positions[i]`` of sequence i to ``slots[i]`` and, for each table entry row ``rows[i]``
            lacks, the pair ``(rows[i] * width + entry, block id)`` to ``updates`` (int32 numpy
            arrays, 1-D and [n, 2], written in place); returns the number of pairs. -1, with
            nothing changed, if a row is out of range or repeats, a table is wider than width, a
            position is not one of the sequence's tokens or the outputs are too short. TypeError
            for arrays that are not int32."""
            ...

        def block_table(self, seq_id: int) -> list[int]: ...
        def block_tables(self, seq_ids: list[int]) -> list[list[int]]: ...
        def token_ids(self, seq_id: int) -> list[int]: ...
        def num_tokens(self, seq_id: int) -> int: ...

        def cache_salt(self, seq_id: int) -> int | None:
            """The sequence's cache salt (see allocate), or None."""
            ...

        def sequence_ids(self) -> list[int]: ...
        def num_sequences(self) -> int: ...
        def has_sequence(self, seq_id: int) -> bool: ...
        def __contains__(self, seq_id: int) -> bool: ...

        def slot_of(self, seq_id: int, position: int) -> int:
            """KV slot of one token (negative positions count from the end). IndexError."""
            ...

        def slot_mapping(self, seq_id: int, start: int = 0, end: int | None = None) -> list[int]:
            """KV slots of positions [start, end). IndexError if out of range."""
            ...

        def num_free_blocks(self) -> int:
            """Blocks with ref count 0 (cached ones included: they are evictable)."""
            ...

        def num_cached_blocks(self) -> int:
            """Blocks registered in the prefix cache, referenced or free."""
            ...

        def ref_count(self, block_id: int) -> int: ...
        def block_hash(self, block_id: int) -> int | None: ...
        def is_cached(self, block_id: int) -> bool: ...

        def stats(self) -> dict[str, int | float]:
            """num_blocks, block_size, num_free_blocks, num_cached_blocks, num_sequences,
            prefix_cache_queries / prefix_cache_hits (prompt tokens), prefix_cache_hit_rate,
            cow_copies, evictions (cache entries lost to block reuse)."""
            ...

        def reset_stats(self) -> None: ...

        def check_invariants(self) -> None:
            """RuntimeError naming the first violated invariant (ref counts vs block tables,
            free list, hash map, chained hashes, parent links: a salted sequence's root
            block links to its salt, every other full block to its parent block)."""
            ...

        def reset(self) -> None:
            """Drop all sequences and cache entries; every block free."""
            ...

        def clear_prefix_cache(self) -> None:
            """Forget all cached KV (after a weight update): free blocks lose their hashes,
            blocks of live sequences are never cached again."""
            ...

else:
    try:
        from psnrl.engine._block_manager import AppendResult, BlockManager, OutOfBlocks, hash_block
    except ImportError as e:
        raise ImportError(
            "psnrl.engine._block_manager is not built: run pip install -e . "
            "(it compiles psnrl/engine/csrc/block_manager.cpp)"
        ) from e
