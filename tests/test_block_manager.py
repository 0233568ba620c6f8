"""The C++ KV-cache block manager (psnrl/engine/csrc/, its model in README.md there).

Unit tests for each operation, then a randomized operation-sequence test that
runs the manager against a pure-Python reference model (exact block tables, ref
counts, free pool, cache entries) and a simulated KV cache (every slot records
which token prefix wrote it), so a wrong cache hit, a write into a shared block
or a leak shows up as a mismatch.
"""
from __future__ import annotations

import importlib.util
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from psnrl.engine.block_manager import AppendResult, BlockManager, OutOfBlocks, hash_block


def snapshot(bm: BlockManager) -> tuple:
    seqs = sorted(bm.sequence_ids())
    return (
        bm.num_free_blocks(),
        bm.num_cached_blocks(),
        tuple((s, tuple(bm.block_table(s)), tuple(bm.token_ids(s)), bm.num_computed(s)) for s in seqs),
        tuple(bm.ref_count(b) for b in range(bm.num_blocks)),
        tuple(bm.is_cached(b) for b in range(bm.num_blocks)),
    )


# ------------------------------------------------------------------ build --


def test_extension_is_built_and_reexported():
    import psnrl.engine._block_manager as ext

    assert ext.BlockManager is BlockManager
    assert ext.OutOfBlocks is OutOfBlocks
    assert ext.AppendResult is AppendResult
    assert issubclass(OutOfBlocks, RuntimeError)


def test_wrapper_says_how_to_build_when_extension_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "psnrl.engine._block_manager", None)  # makes the import fail
    path = Path(__file__).resolve().parents[1] / "psnrl" / "engine" / "block_manager.py"
    spec = importlib.util.spec_from_file_location("_bm_wrapper_probe", path)
    mod = importlib.util.module_from_spec(spec)
    with pytest.raises(ImportError, match=r"engine\._block_manager is not built: run pip install -e \."):
        spec.loader.exec_module(mod)


# ------------------------------------------------------------------- hash --


def test_hash_block_is_chained_xxh64():
    # Reference values from the xxhash package (xxh64, seed 0) over
    # [le64(parent)] + le64(tokens).
    assert hash_block(None, [1, 2, 3, 4]) == 8356527653647720045
    assert hash_block(12345, [1, 2, 3, 4]) == 6760491017396677292
    assert hash_block(None, list(range(16))) == 50805424035424587
    assert hash_block(2**64 - 1, [-1, 151643, 0, 7]) == 4572162910199285534
    assert hash_block(None, [1, 2]) != hash_block(None, [2, 1])
    assert hash_block(0, [1, 2]) != hash_block(None, [1, 2])


# -------------------------------------------------------------- construct --


@pytest.mark.parametrize(
    "args",
    [(0, 4), (-1, 4), (8, 0), (8, -2), (8, 4, -0.01), (8, 4, 1.0), (8, 4, 1.5), (8, 4, math.nan)],
)
def test_bad_constructor_args(args):
    with pytest.raises(ValueError):
        BlockManager(*args)


def test_constructor_and_properties():
    bm = BlockManager(200, 16, watermark=0.05)
    assert (bm.num_blocks, bm.block_size, bm.watermark, bm.watermark_blocks) == (200, 16, 0.05, 10)
    assert bm.num_free_blocks() == 200 and bm.num_sequences() == 0
    assert BlockManager(10, 4).watermark_blocks == 0  # default 0.01 of 10 blocks rounds down
    bm.check_invariants()
    assert "num_blocks=200" in repr(bm)


# --------------------------------------------------------------- allocate --


def test_allocate_gives_blocks_and_slots():
    bm = BlockManager(8, 4)
    toks = [10, 11, 12, 13, 14, 15]
    assert bm.allocate(7, toks) == 0
    table = bm.block_table(7)
    assert len(table) == 2 and len(set(table)) == 2
    assert bm.num_tokens(7) == 6 and bm.token_ids(7) == toks and 7 in bm
    assert bm.num_free_blocks() == 6
    assert [bm.ref_count(b) for b in table] == [1, 1]
    assert bm.slot_mapping(7) == [table[p // 4] * 4 + p % 4 for p in range(6)]
    assert bm.slot_mapping(7, 4) == bm.slot_mapping(7)[4:]
    assert bm.slot_of(7, 5) == bm.slot_of(7, -1) == table[1] * 4 + 1
    with pytest.raises(IndexError):
        bm.slot_of(7, 6)
    with pytest.raises(IndexError):
        bm.slot_mapping(7, 2, 7)
    assert bm.block_hash(table[0]) == hash_block(None, toks[:4])
    assert bm.block_hash(table[1]) is None  # the partial last block has no hash
    with pytest.raises(ValueError):
        bm.allocate(7, [1])  # already allocated
    with pytest.raises(ValueError):
        bm.allocate(8, [])
    with pytest.raises(ValueError):
        bm.allocate(8, [1, 2], num_scheduled=3)
    with pytest.raises(IndexError):
        bm.ref_count(8)
    bm.check_invariants()


def test_prefix_cache_hit_shares_blocks():
    bm = BlockManager(16, 4)
    prefix = [1, 2, 3, 4, 5, 6, 7, 8]
    assert bm.allocate(1, prefix + [9, 9]) == 0
    assert bm.allocate(2, prefix + [7]) == 8
    t1, t2 = bm.block_table(1), bm.block_table(2)
    assert t1[:2] == t2[:2] and t1[2] != t2[2]
    assert [bm.ref_count(b) for b in t1[:2]] == [2, 2]
    assert bm.num_free_blocks() == 16 - 4
    st = bm.stats()
    assert st["prefix_cache_queries"] == 19 and st["prefix_cache_hits"] == 8
    bm.check_invariants()


def test_cached_prefix_never_covers_the_last_token():
    bm = BlockManager(16, 4)
    bm.allocate(1, list(range(8)))
    # Same 8-token prompt: both blocks are cached, but the last token must be
    # computed, so only the first block is reported and the second is fresh.
    assert bm.allocate(2, list(range(8))) == 4
    t1, t2 = bm.block_table(1), bm.block_table(2)
    assert t1[0] == t2[0] and t1[1] != t2[1]
    assert bm.ref_count(t2[1]) == 1
    assert bm.allocate(3, list(range(9))) == 8  # one more token: both blocks hit
    assert bm.allocate(4, list(range(4))) == 0  # a one-block prompt never hits
    assert bm.allocate(5, list(range(5))) == 4
    bm.check_invariants()


def test_different_tokens_never_share():
    bm = BlockManager(32, 4)
    bm.allocate(1, [1, 2, 3, 4, 5, 6, 7, 8, 0])
    # Same second block after a different first block: its chained hash
    # differs, and nothing is shared.
    assert bm.allocate(2, [9, 9, 9, 9, 5, 6, 7, 8, 0]) == 0
    assert not set(bm.block_table(1)) & set(bm.block_table(2))
    # Same first block, different second: only the first is shared.
    assert bm.allocate(3, [1, 2, 3, 4, 5, 6, 7, 9, 0]) == 4
    assert bm.block_table(3)[0] == bm.block_table(1)[0]
    assert bm.block_table(3)[1] != bm.block_table(1)[1]
    # A permutation of a cached block is a miss.
    assert bm.allocate(4, [2, 1, 3, 4, 0]) == 0
    # A block's content at another depth is a miss (its parent differs).
    assert bm.allocate(5, [5, 6, 7, 8, 1, 2, 3, 4, 0]) == 0
    bm.check_invariants()


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(6, 4)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    bm.allocate(1, prompt)
    t1 = bm.block_table(1)
    bm.free(1)
    assert bm.num_free_blocks() == 6 and bm.num_cached_blocks() == 2
    assert all(bm.ref_count(b) == 0 for b in t1)
    assert bm.num_required_blocks(prompt) == 3  # 2 cached-free blocks come out of the pool + 1 fresh
    assert bm.allocate(2, prompt) == 8
    assert bm.block_table(2)[:2] == t1[:2]
    assert bm.num_free_blocks() == 3
    bm.free(2)
    # Fill the pool with other content: the cached blocks get evicted.
    bm.allocate(3, [50 + i for i in range(24)])
    assert bm.num_free_blocks() == 0 and bm.num_cached_blocks() == 6
    assert bm.stats()["evictions"] == 2
    bm.free(3)
    assert bm.allocate(4, prompt) == 0
    bm.check_invariants()


def test_free_pool_reuses_uncached_first_then_least_recently_freed():
    bm = BlockManager(8, 2)
    bm.allocate(1, [1, 1, 1, 1, 1])  # 2 cached blocks + 1 partial
    bm.allocate(2, [2, 2, 2, 2, 2])
    a, b = bm.block_table(1), bm.block_table(2)
    bm.free(1)  # freed first: its cached blocks are the least recently freed
    bm.free(2)
    # Blocks 6 and 7 were never used; the partial blocks were freed to the
    # head. All 4 hash-less blocks go out before any cached one.
    bm.allocate(3, [9] * 8)
    t3 = bm.block_table(3)
    assert set(t3) == {a[2], b[2], 6, 7}
    assert bm.num_cached_blocks() == 4 + 4  # seq 3's full blocks joined them
    # Next eviction victims: seq 1's blocks, deepest first (freed last block first).
    bm.allocate(4, [8, 8, 8])
    assert bm.block_table(4) == [a[1], a[0]]
    assert bm.allocate(5, [2, 2, 2, 2]) == 2  # seq 2's chain survived
    assert bm.block_table(5)[0] == b[0]
    bm.check_invariants()


# ----------------------------------------------------------------- append --


def test_append_fills_blocks_and_caches_full_ones():
    bm = BlockManager(8, 4)
    bm.allocate(1, [1, 2, 3])
    (b0,) = bm.block_table(1)
    assert bm.can_append(1)
    r = bm.append_token(1, 4)
    assert isinstance(r, AppendResult)
    assert (r.slot, r.block_id, r.new_block, r.cow) == (b0 * 4 + 3, b0, False, None)
    # Full but not yet written (the step computing token 4 has not run): hashed, not shared.
    assert bm.block_hash(b0) == hash_block(None, [1, 2, 3, 4]) and not bm.is_cached(b0)
    assert bm.num_computed(1) == 3
    bm.mark_computed(1, 4)  # the step completed
    assert bm.is_cached(b0)
    r = bm.append_token(1, 5)
    assert r.new_block and r.cow is None
    b1 = bm.block_table(1)[1]
    assert r.block_id == b1 and r.slot == b1 * 4
    for t in (6, 7, 8):
        bm.append_token(1, t)
    assert bm.block_hash(b1) == hash_block(hash_block(None, [1, 2, 3, 4]), [5, 6, 7, 8])
    bm.mark_computed(1, 8)
    assert bm.num_tokens(1) == 8 and bm.num_computed(1) == 8
    # The appended content is hit by a later prompt.
    assert bm.allocate(2, [1, 2, 3, 4, 5, 6, 7, 8, 9]) == 8
    bm.check_invariants()


def test_cow_after_fork_on_partial_last_block():
    bm = BlockManager(8, 4)
    bm.allocate(1, [1, 2, 3, 4, 5, 6])
    full, part = bm.block_table(1)
    bm.fork(1, 2)
    assert bm.block_table(2) == [full, part] and bm.token_ids(2) == bm.token_ids(1)
    assert bm.ref_count(full) == 2 and bm.ref_count(part) == 2
    r = bm.append_token(2, 70)  # the child writes first: it gets the copy
    assert r.cow is not None
    src, dst = r.cow
    assert src == part and dst != src and r.new_block
    assert r.slot == dst * 4 + 2
    assert bm.block_table(1) == [full, part]  # the parent keeps src
    assert bm.block_table(2) == [full, dst]
    assert bm.ref_count(part) == 1 and bm.ref_count(dst) == 1 and bm.ref_count(full) == 2
    r = bm.append_token(1, 60)  # src is no longer shared: written in place
    assert r.cow is None and r.slot == part * 4 + 2
    assert bm.token_ids(1)[-1] == 60 and bm.token_ids(2)[-1] == 70
    assert bm.stats()["cow_copies"] == 1
    bm.check_invariants()


def test_fork_of_full_last_block_needs_no_copy():
    bm = BlockManager(8, 4)
    bm.allocate(1, list(range(8)))
    bm.fork(1, 2)
    r1, r2 = bm.append_token(1, 100), bm.append_token(2, 200)
    assert r1.cow is None and r2.cow is None and r1.new_block and r2.new_block
    assert r1.block_id != r2.block_id
    assert bm.block_table(1)[:2] == bm.block_table(2)[:2]
    bm.check_invariants()


def test_fork_then_free_parent_keeps_child_valid():
    bm = BlockManager(8, 4)
    bm.allocate(1, [1, 2, 3, 4, 5])
    table = bm.block_table(1)
    bm.fork(1, 2)
    bm.free(1)
    assert 1 not in bm and bm.block_table(2) == table
    assert [bm.ref_count(b) for b in table] == [1, 1]
    r = bm.append_token(2, 6)  # no longer shared: no copy
    assert r.cow is None and r.slot == table[1] * 4 + 1
    bm.check_invariants()
    bm.free(2)
    assert bm.num_free_blocks() == 8
    bm.check_invariants()


def test_fork_errors():
    bm = BlockManager(8, 4)
    bm.allocate(1, [1])
    bm.allocate(2, [2])
    with pytest.raises(KeyError):
        bm.fork(3, 4)
    with pytest.raises(ValueError):
        bm.fork(1, 2)
    bm.check_invariants()


def test_unknown_sequence_is_key_error():
    bm = BlockManager(4, 4)
    for call in (
        lambda: bm.free(1),
        lambda: bm.append_token(1, 0),
        lambda: bm.can_append(1),
        lambda: bm.block_table(1),
        lambda: bm.num_tokens(1),
        lambda: bm.mark_computed(1, 0),
    ):
        with pytest.raises(KeyError):
            call()
    bm.allocate(1, [1])
    bm.free(1)
    with pytest.raises(KeyError):
        bm.free(1)  # no double free
    assert bm.num_free_blocks() == 4


# ------------------------------------------------- watermark / OutOfBlocks --


def test_watermark():
    bm = BlockManager(100, 4, watermark=0.05)  # keeps 5 blocks free
    assert bm.can_allocate(95 * 4)
    assert not bm.can_allocate(95 * 4 + 1)
    bm.allocate(1, [0] * (90 * 4))
    assert bm.can_allocate(20) and not bm.can_allocate(21)
    # allocate() itself does not enforce the watermark: the engine decides.
    bm.allocate(2, list(range(1, 41)))
    assert bm.num_free_blocks() == 0
    assert not bm.can_allocate(1)
    with pytest.raises(ValueError):
        bm.can_allocate(0)
    assert BlockManager(10, 4, watermark=0.0).can_allocate(40)


def test_out_of_blocks_leaves_state_unchanged():
    bm = BlockManager(4, 4, watermark=0.0)
    bm.allocate(1, [1, 2, 3, 4, 5, 6, 7, 8])
    bm.free(1)  # two cached free blocks
    bm.allocate(2, [9, 9, 9, 9, 9])
    before = snapshot(bm)
    with pytest.raises(OutOfBlocks):
        bm.allocate(3, list(range(100, 113)))  # needs 4, 2 free
    with pytest.raises(RuntimeError):  # OutOfBlocks is a RuntimeError
        bm.allocate(3, [1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0])  # 2 hits + 2 fresh > 2 free
    assert snapshot(bm) == before
    assert 3 not in bm
    bm.check_invariants()

    # append: full last block and nothing free.
    bm = BlockManager(2, 2, watermark=0.0)
    bm.allocate(1, [1, 2, 3, 4])
    assert not bm.can_append(1)
    before = snapshot(bm)
    with pytest.raises(OutOfBlocks):
        bm.append_token(1, 5)
    assert snapshot(bm) == before
    # append: copy-on-write needs a block and none is free.
    bm = BlockManager(2, 4, watermark=0.0)
    bm.allocate(1, [1, 2, 3, 4, 5])
    bm.fork(1, 2)
    assert not bm.can_append(2)
    before = snapshot(bm)
    with pytest.raises(OutOfBlocks):
        bm.append_token(2, 6)
    assert snapshot(bm) == before
    bm.check_invariants()


# ------------------------------------------- computed horizon / staleness --


def test_chunked_prefill_shares_only_computed_blocks():
    bm = BlockManager(16, 4)
    prompt = list(range(13))
    assert bm.allocate(1, prompt, num_scheduled=4) == 0  # first chunk: 4 tokens
    assert bm.num_computed(1) == 4 and bm.num_cached_blocks() == 1
    assert bm.allocate(2, prompt) == 4  # blocks 1, 2 of seq 1 are not written yet
    bm.mark_computed(1, 12)
    bm.mark_computed(1, 6)  # never lowers
    assert bm.num_computed(1) == 12
    assert bm.allocate(3, prompt) == 12
    with pytest.raises(ValueError):
        bm.mark_computed(1, 14)
    bm.check_invariants()


def test_preempted_prefill_leaves_nothing_in_the_cache():
    bm = BlockManager(16, 4)
    prompt = list(range(9))
    bm.allocate(1, prompt, num_scheduled=0)
    assert bm.num_cached_blocks() == 0
    bm.free(1)  # preempted before its prefill ran
    assert bm.num_cached_blocks() == 0
    assert all(bm.block_hash(b) is None for b in range(16))
    assert bm.allocate(2, prompt) == 0
    bm.check_invariants()


def test_clear_prefix_cache_after_weight_update():
    bm = BlockManager(16, 4)
    bm.allocate(1, list(range(9)))
    bm.free(1)
    bm.allocate(2, list(range(100, 109)))  # stays live across the update
    assert bm.num_cached_blocks() == 4
    bm.clear_prefix_cache()
    assert bm.num_cached_blocks() == 0
    assert bm.num_free_blocks() == 13 and bm.num_sequences() == 1
    assert bm.allocate(3, list(range(9))) == 0
    assert bm.num_required_blocks(list(range(100, 109))) == 3  # the live sequence's KV is stale
    # The live sequence keeps working, but nothing it computes is shared.
    for t in (109, 110, 111):
        decode(bm, 2, t)
    assert bm.num_required_blocks(list(range(100, 113))) == 4
    table = bm.block_table(2)
    assert not any(bm.is_cached(b) for b in table)
    bm.free(2)
    assert all(bm.block_hash(b) is None for b in table)
    bm.check_invariants()
    bm.free(3)  # computed after the update: cached
    assert bm.allocate(6, list(range(9))) == 8
    bm.check_invariants()


def test_reset():
    bm = BlockManager(8, 4)
    bm.allocate(1, list(range(9)))
    bm.fork(1, 2)
    bm.reset()
    assert bm.num_free_blocks() == 8 and bm.num_sequences() == 0 and bm.num_cached_blocks() == 0
    assert bm.stats()["prefix_cache_queries"] == 0
    assert bm.allocate(1, list(range(9))) == 0
    bm.check_invariants()


# ------------------------------------------------------------ cache salt --


def test_salted_and_unsalted_sequences_never_share():
    bm = BlockManager(32, 4)
    toks = list(range(1, 10))
    assert bm.allocate(1, toks) == 0
    assert bm.cache_salt(1) is None
    # Same tokens, another policy: no hit, no shared block.
    assert bm.allocate(2, toks, cache_salt=5) == 0
    assert bm.cache_salt(2) == 5
    t1, t2 = bm.block_table(1), bm.block_table(2)
    assert not set(t1) & set(t2)
    # The salted chain starts from the salt in the parent slot.
    h0 = hash_block(5, toks[:4])
    assert bm.block_hash(t2[0]) == h0 and bm.block_hash(t2[1]) == hash_block(h0, toks[4:8])
    assert bm.block_hash(t1[0]) == hash_block(None, toks[:4])
    assert all(bm.is_cached(b) for b in t1[:2] + t2[:2])
    # Salt 0 is a salt, not "no salt".
    assert bm.allocate(3, toks, cache_salt=0) == 0
    assert not set(bm.block_table(3)) & (set(t1) | set(t2))
    # Each kind of lookup finds its own chain, also after the blocks are freed.
    for sid in (1, 2, 3):
        bm.free(sid)
    assert bm.num_required_blocks(toks) == bm.num_required_blocks(toks, cache_salt=5) == 3
    assert bm.num_required_blocks(toks, cache_salt=6) == 3
    assert bm.allocate(4, toks) == 8 and bm.block_table(4)[:2] == t1[:2]
    assert bm.allocate(5, toks, cache_salt=5) == 8 and bm.block_table(5)[:2] == t2[:2]
    assert bm.allocate(6, toks, cache_salt=6) == 0
    bm.check_invariants()


def test_same_salt_shares_and_different_salts_do_not():
    bm = BlockManager(32, 4)
    toks = [3, 1, 4, 1, 5, 9, 2, 6, 5]
    salt = 2**64 - 1
    assert bm.allocate(1, toks, cache_salt=salt) == 0
    assert bm.allocate(2, toks, None, salt) == 8  # positional num_scheduled, cache_salt
    assert bm.block_table(1)[:2] == bm.block_table(2)[:2]
    assert [bm.ref_count(b) for b in bm.block_table(1)[:2]] == [2, 2]
    assert bm.allocate(3, toks, cache_salt=salt - 1) == 0
    assert bm.allocate(4, toks) == 0
    assert bm.allocate(5, toks, cache_salt=salt - 1) == 8
    assert bm.block_table(5)[:2] == bm.block_table(3)[:2]
    tables = [set(bm.block_table(s)[:2]) for s in (1, 3, 4)]
    assert not (tables[0] & tables[1] or tables[0] & tables[2] or tables[1] & tables[2])
    # A chunked prefill of a salted sequence publishes its blocks chunk by chunk.
    other = [7, 7, 7, 7, 8, 8, 8, 8, 9]
    assert bm.allocate(6, other, num_scheduled=0, cache_salt=salt) == 0
    assert bm.allocate(7, other, num_scheduled=0, cache_salt=salt) == 0  # nothing computed yet
    bm.free(7)
    bm.mark_computed(6, 5)
    assert bm.allocate(8, other, cache_salt=salt) == 4
    assert bm.allocate(9, other) == 0
    bm.check_invariants()
    with pytest.raises(TypeError):
        bm.allocate(10, toks, cache_salt=-1)  # a salt is a uint64
    with pytest.raises(TypeError):
        bm.allocate(10, toks, cache_salt=2**64)
    assert 10 not in bm


def test_salted_root_never_aliases_a_block_whose_parent_hash_equals_the_salt():
    # A salted root hashes the same bytes as a non-root block whose parent hash
    # equals the salt; the parent link (salt or block) still tells them apart.
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    ha = hash_block(None, a)
    bm = BlockManager(32, 4)
    bm.allocate(1, a + [0])  # caches a
    assert bm.allocate(2, b + [0], cache_salt=ha) == 0
    root = bm.block_table(2)[0]
    assert bm.block_hash(root) == hash_block(ha, b) and bm.is_cached(root)
    # An unsalted lookup of a + b finds the salted root under b's hash: a miss.
    assert bm.allocate(3, a + b + [0]) == 4
    assert bm.block_table(3)[1] != root
    bm.check_invariants()
    # The other way round: a salted lookup never hits a non-root block.
    bm = BlockManager(32, 4)
    bm.allocate(1, a + b + [0])
    assert bm.allocate(2, b + [0], cache_salt=ha) == 0
    assert bm.block_table(2)[0] != bm.block_table(1)[1]
    assert not bm.is_cached(bm.block_table(2)[0])  # its hash is taken: not registered
    bm.check_invariants()


def decode(bm: BlockManager, sid: int, token: int):
    """What the engine does for a decode token: append it, run the step, then mark it written."""
    r = bm.append_token(sid, token)
    bm.mark_computed(sid, bm.num_tokens(sid))
    return r


def test_a_block_whose_step_never_completed_is_never_shared():
    """A decode step that fills a block and then fails (the sequence is freed before
    mark_computed): a later prompt with the same tokens must compute them, not reuse them."""
    bm = BlockManager(8, 4)
    bm.allocate(1, [1, 2, 3], num_scheduled=0)
    bm.mark_computed(1, 3)  # the prefill ran
    bm.append_token(1, 4)  # the next step was scheduled ... and never completed
    bm.free(1)
    assert bm.num_cached_blocks() == 0
    assert bm.allocate(2, [1, 2, 3, 4, 5]) == 0
    bm.check_invariants()


def test_fork_keeps_the_salt():
    bm = BlockManager(16, 4)
    salt = 0xDEADBEEF
    bm.allocate(1, [1, 2], cache_salt=salt)
    bm.fork(1, 2)
    assert bm.cache_salt(2) == salt
    # The child fills the shared partial root block (CoW) and a second block.
    r = decode(bm, 2, 3)
    assert r.cow is not None
    decode(bm, 2, 4)
    root = bm.block_table(2)[0]
    h0 = hash_block(salt, [1, 2, 3, 4])
    assert bm.block_hash(root) == h0 and bm.is_cached(root)
    for t in (5, 6, 7, 8):
        decode(bm, 2, t)
    assert bm.block_hash(bm.block_table(2)[1]) == hash_block(h0, [5, 6, 7, 8])
    # The child's appended blocks serve sequences of the same salt only.
    assert bm.allocate(3, [1, 2, 3, 4, 5, 6, 7, 8, 9], cache_salt=salt) == 8
    assert bm.block_table(3)[:2] == bm.block_table(2)[:2]
    assert bm.allocate(4, [1, 2, 3, 4, 5, 6, 7, 8, 9]) == 0
    # A fork of a fork, of an unsalted sequence: no salt.
    bm.fork(3, 5)
    bm.fork(4, 6)
    assert bm.cache_salt(5) == salt and bm.cache_salt(6) is None
    # The parent fills its own root block: same hash as the child's (a duplicate).
    decode(bm, 1, 3)
    decode(bm, 1, 4)
    assert bm.block_hash(bm.block_table(1)[0]) == h0 and not bm.is_cached(bm.block_table(1)[0])
    bm.check_invariants()
    bm.clear_prefix_cache()
    assert bm.cache_salt(2) == salt
    bm.check_invariants()


# -------------------------------------------------------- randomized test --


class RefModel:
    """Pure-Python statement of the manager's policy. The cache is keyed by the
    cache salt and the exact token prefix, i.e. what a collision-free hash would
    give."""

    def __init__(self, num_blocks: int, block_size: int, watermark: float):
        self.nb, self.bs = num_blocks, block_size
        self.wm_blocks = int(watermark * num_blocks)
        self.free = list(range(num_blocks))  # head first
        self.ref = [0] * num_blocks
        self.key: list[tuple | None] = [None] * num_blocks  # (salt, token prefix) a full block holds
        self.computed = [False] * num_blocks
        self.registered = [False] * num_blocks
        self.stale = [False] * num_blocks
        self.cache: dict[tuple, int] = {}
        self.seqs: dict[int, dict] = {}

    def _drop(self, b):
        if self.registered[b]:
            del self.cache[self.key[b]]
        self.key[b], self.computed[b], self.registered[b] = None, False, False

    def _pop(self):
        b = self.free.pop(0)
        self._drop(b)
        self.stale[b] = False
        return b

    def _try_register(self, b):
        if self.key[b] is None or self.stale[b] or not self.computed[b]:
            return False
        if self.registered[b]:
            return True
        if self.key[b] in self.cache:
            return False
        self.cache[self.key[b]] = b
        self.registered[b] = True
        return True

    def _release(self, b):
        self.ref[b] -= 1
        if self.ref[b]:
            return
        if self._try_register(b):
            self.free.append(b)
        else:
            self._drop(b)
            self.stale[b] = False
            self.free.insert(0, b)

    def _advance(self, seq, n):
        if n <= seq["computed"]:
            return
        for i in range(seq["computed"] // self.bs, n // self.bs):
            b = seq["table"][i]
            self.computed[b] = True
            self._try_register(b)
        seq["computed"] = n

    def can_allocate(self, n):
        return len(self.free) - math.ceil(n / self.bs) >= self.wm_blocks

    def allocate(self, sid, toks, sched, salt=None):
        bs, n = self.bs, len(toks)
        nblocks, nfull = math.ceil(n / bs), n // bs
        hits = []
        for i in range((n - 1) // bs):
            b = self.cache.get((salt, tuple(toks[: (i + 1) * bs])))
            if b is None:
                break
            hits.append(b)
        need = nblocks - len(hits) + sum(self.ref[b] == 0 for b in hits)
        if need > len(self.free):
            raise OutOfBlocks("model")
        for b in hits:
            if self.ref[b] == 0:
                self.free.remove(b)
            self.ref[b] += 1
        table = list(hits)
        for i in range(len(hits), nblocks):
            b = self._pop()
            self.ref[b] = 1
            if i < nfull:
                self.key[b] = (salt, tuple(toks[: (i + 1) * bs]))
            table.append(b)
        seq = {"tokens": list(toks), "table": table, "computed": 0, "salt": salt}
        self.seqs[sid] = seq
        cached = len(hits) * bs
        self._advance(seq, max(cached, n if sched is None else sched))
        return cached

    def append(self, sid, tok):
        seq = self.seqs[sid]
        L, bs = len(seq["tokens"]), self.bs
        off = L % bs
        cow = None
        if off == 0:
            if not self.free:
                raise OutOfBlocks("model")
            b = self._pop()
            self.ref[b] = 1
            seq["table"].append(b)
        elif self.ref[seq["table"][-1]] > 1:
            if not self.free:
                raise OutOfBlocks("model")
            src = seq["table"][-1]
            dst = self._pop()
            self.ref[dst] = 1
            self.stale[dst] = self.stale[src]
            self.ref[src] -= 1
            seq["table"][-1] = dst
            cow = (src, dst)
        seq["tokens"].append(tok)
        b = seq["table"][-1]
        if off == bs - 1:
            self.key[b] = (seq["salt"], tuple(seq["tokens"]))
            if len(seq["table"]) > 1 and self.stale[seq["table"][-2]]:
                self.stale[b] = True
        return b * bs + off, cow  # the horizon moves when the step completes (mark_computed)

    def fork(self, parent, child):
        p = self.seqs[parent]
        self.seqs[child] = {"tokens": list(p["tokens"]), "table": list(p["table"]), "computed": p["computed"],
                            "salt": p["salt"]}
        for b in p["table"]:
            self.ref[b] += 1

    def free_seq(self, sid):
        for b in reversed(self.seqs.pop(sid)["table"]):
            self._release(b)

    def clear(self):
        self.cache.clear()
        for b in range(self.nb):
            self.registered[b] = False
            if self.ref[b] == 0:
                self.key[b], self.computed[b] = None, False
            else:
                self.stale[b] = True


def _check_same(bm: BlockManager, model: RefModel):
    assert bm.num_free_blocks() == len(model.free)
    assert bm.num_cached_blocks() == len(model.cache)
    assert sorted(bm.sequence_ids()) == sorted(model.seqs)
    for sid, seq in model.seqs.items():
        assert bm.block_table(sid) == seq["table"], sid
        assert bm.num_tokens(sid) == len(seq["tokens"])
        assert bm.num_computed(sid) == seq["computed"]
        assert bm.cache_salt(sid) == seq["salt"]
    for b in range(model.nb):
        assert bm.ref_count(b) == model.ref[b], b
        assert bm.is_cached(b) == model.registered[b], b


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_operations_against_model(seed):
    rng = random.Random(seed)
    nb, bs = 32, 4
    bm = BlockManager(nb, bs, watermark=0.05)
    model = RefModel(nb, bs, 0.05)
    # Simulated KV cache: slot -> (weights version, cache salt of the writer, token prefix).
    # The salt stands for the policy (e.g. a noise spec) the KV was computed with.
    kv: dict[int, tuple[int, int | None, tuple]] = {}
    version = 0  # bumped by a "weight update" (clear_prefix_cache)
    seq_version: dict[int, int] = {}  # weights version a sequence computes with
    salts = [None, None, 0, 2**64 - 1]  # None (clean) most often
    stems = [[rng.randrange(6) for _ in range(rng.randrange(4, 17))] for _ in range(5)]
    next_id = 0
    counts = {"alloc": 0, "oob": 0, "hit_tokens": 0, "salted_hit_tokens": 0, "other_salt_misses": 0, "cow": 0}

    def write(sid, start, end):
        toks = bm.token_ids(sid)
        for p, slot in zip(range(start, end), bm.slot_mapping(sid, start, end)):
            kv[slot] = (seq_version[sid], bm.cache_salt(sid), tuple(toks[: p + 1]))

    def check_kv():
        for sid in bm.sequence_ids():
            toks = bm.token_ids(sid)
            n = bm.num_computed(sid)
            want_salt = bm.cache_salt(sid)
            for p, slot in enumerate(bm.slot_mapping(sid, 0, n)):
                assert kv.get(slot) == (seq_version[sid], want_salt, tuple(toks[: p + 1])), (sid, p)

    for _ in range(3000):
        live = sorted(model.seqs)
        op = rng.random()
        if op < 0.30 or not live:  # allocate
            stem = rng.choice(stems)
            toks = stem[: rng.randrange(len(stem) + 1)] + [rng.randrange(6) for _ in range(rng.randrange(1, 9))]
            sched = None if rng.random() < 0.7 else rng.randrange(len(toks) + 1)
            salt = rng.choice(salts)
            sid = next_id
            next_id += 1
            assert bm.can_allocate(len(toks)) == model.can_allocate(len(toks))
            if not model.can_allocate(len(toks)) and live and rng.random() < 0.8:
                sid = rng.choice(live)  # what a scheduler does: make room (preempt) first
                model.free_seq(sid)
                bm.free(sid)
                del seq_version[sid]
                bm.check_invariants()
                _check_same(bm, model)
            before = snapshot(bm)
            # Another policy holds this prompt's first block: the lookup must miss it.
            other_salt_holds = len(toks) > bs and any(
                (x, tuple(toks[:bs])) in model.cache for x in set(salts) - {salt})
            try:
                want = model.allocate(sid, toks, sched, salt)
            except OutOfBlocks:
                with pytest.raises(OutOfBlocks):
                    bm.allocate(sid, toks, sched, cache_salt=salt)
                assert snapshot(bm) == before
                counts["oob"] += 1
            else:
                assert bm.allocate(sid, toks, sched, cache_salt=salt) == want
                seq_version[sid] = version
                write(sid, want, bm.num_computed(sid))  # the prefill (first chunk)
                counts["alloc"] += 1
                counts["hit_tokens"] += want
                if salt is not None:
                    counts["salted_hit_tokens"] += want
                if other_salt_holds and want == 0:
                    counts["other_salt_misses"] += 1
        elif op < 0.60:  # append to a fully computed sequence (decode)
            ready = [s for s in live if model.seqs[s]["computed"] == len(model.seqs[s]["tokens"])]
            if not ready:
                continue
            sid = rng.choice(ready)
            tok = rng.randrange(6)
            seq = model.seqs[sid]
            needs_block = len(seq["tokens"]) % bs == 0 or model.ref[seq["table"][-1]] > 1
            assert bm.can_append(sid) == (len(model.free) >= needs_block)
            before = snapshot(bm)
            try:
                slot, cow = model.append(sid, tok)
            except OutOfBlocks:
                assert not bm.can_append(sid)
                with pytest.raises(OutOfBlocks):
                    bm.append_token(sid, tok)
                assert snapshot(bm) == before
                counts["oob"] += 1
            else:
                r = bm.append_token(sid, tok)
                assert (r.slot, r.cow) == (slot, cow)
                if r.cow is not None:
                    src, dst = r.cow
                    for o in range(bs):
                        if src * bs + o in kv:
                            kv[dst * bs + o] = kv[src * bs + o]
                    counts["cow"] += 1
                kv[r.slot] = (seq_version[sid], bm.cache_salt(sid), tuple(bm.token_ids(sid)))
                # The step that wrote it completed: now its block may be shared.
                model._advance(model.seqs[sid], len(model.seqs[sid]["tokens"]))
                bm.mark_computed(sid, bm.num_tokens(sid))
        elif op < 0.68:  # next prefill chunk
            pending = [s for s in live if model.seqs[s]["computed"] < len(model.seqs[s]["tokens"])]
            if not pending:
                continue
            sid = rng.choice(pending)
            start, n = model.seqs[sid]["computed"], len(model.seqs[sid]["tokens"])
            end = rng.randrange(start + 1, n + 1)
            model._advance(model.seqs[sid], end)
            bm.mark_computed(sid, end)
            write(sid, start, end)
        elif op < 0.78:  # fork
            parent = rng.choice(live)
            sid = next_id
            next_id += 1
            model.fork(parent, sid)
            bm.fork(parent, sid)
            seq_version[sid] = seq_version[parent]
        elif op < 0.995:  # free
            sid = rng.choice(live)
            model.free_seq(sid)
            bm.free(sid)
            del seq_version[sid]
        else:  # weight update
            version += 1
            model.clear()
            bm.clear_prefix_cache()
        bm.check_invariants()
        _check_same(bm, model)
        check_kv()

    # The run exercised what it is meant to.
    assert counts["alloc"] > 500 and counts["oob"] > 50 and counts["hit_tokens"] > 500 and counts["cow"] > 30
    assert counts["salted_hit_tokens"] > 100 and counts["hit_tokens"] - counts["salted_hit_tokens"] > 100
    assert counts["other_salt_misses"] > 50
    assert bm.stats()["evictions"] > 50
    # No leak, no double free.
    for sid in sorted(model.seqs):
        bm.free(sid)
        with pytest.raises(KeyError):
            bm.free(sid)
        bm.check_invariants()
    assert bm.num_free_blocks() == nb and bm.num_sequences() == 0
    assert all(bm.ref_count(b) == 0 for b in range(nb))


# --------------------------------------------------- device block tables --

def _sync(bm, ids, positions, rows, num_rows=4, width=4, capacity=64):
    slots = np.full(len(ids) + 1, -9, dtype=np.int32)
    updates = np.full((capacity, 2), -9, dtype=np.int32)
    n = bm.sync_decode_tables(ids, positions, rows, num_rows, width, slots, updates)
    return n, slots[:len(ids)].tolist(), [tuple(p) for p in updates[:max(n, 0)].tolist()]


def test_sync_decode_tables_sends_a_row_once_then_what_changed():
    bm = BlockManager(16, 4)
    bm.allocate(1, list(range(9)), num_scheduled=0)  # blocks 0, 1, 2
    bm.allocate(2, [5, 6], num_scheduled=0)  # block 3
    # First sync: whole rows (row 3 of width 4 starts at 12), and each position's KV slot.
    assert _sync(bm, [1, 2], [8, 1], [3, 0]) == (4, [8, 13], [(12, 0), (13, 1), (14, 2), (0, 3)])
    assert _sync(bm, [1, 2], [8, 1], [3, 0])[0] == 0  # nothing changed
    for t in (7, 8, 9):  # sequence 2 fills block 3 and opens a new one
        bm.append_token(2, t)
    assert _sync(bm, [2, 1], [4, 8], [0, 3]) == (1, [bm.slot_of(2, 4), 8], [(1, bm.block_table(2)[1])])
    # Rows swap: both sequences are rewritten whole.
    n, _, pairs = _sync(bm, [2, 1], [4, 8], [3, 0])
    assert n == 5 and pairs == [(12, 3), (13, bm.block_table(2)[1]), (0, 0), (1, 1), (2, 2)]


def test_sync_decode_tables_resends_an_entry_replaced_by_copy_on_write():
    bm = BlockManager(16, 4)
    bm.allocate(1, [1, 2, 3, 4, 5, 6], num_scheduled=0)
    bm.fork(1, 2)
    assert _sync(bm, [1, 2], [5, 5], [0, 1])[0] == 4  # a fork starts with no row: written whole
    bm.append_token(2, 9)  # its shared partial last block is copied on write
    cow = bm.block_table(2)[1]
    assert _sync(bm, [1, 2], [5, 6], [0, 1]) == (1, [bm.slot_of(1, 5), cow * 4 + 2], [(5, cow)])


def test_sync_decode_tables_rewrites_a_row_another_sequence_wrote_since():
    bm = BlockManager(16, 4)
    bm.allocate(1, [1, 2, 3, 4, 5], num_scheduled=0)
    bm.allocate(2, [6, 7], num_scheduled=0)
    assert _sync(bm, [1], [4], [2])[0] == 2
    assert _sync(bm, [2], [1], [2])[0] == 1  # sequence 2 takes row 2 over
    assert _sync(bm, [1], [4], [2])[0] == 2  # so sequence 1 must write its row whole again
    # A sequence freed and allocated again (a preemption) has no row either.
    bm.free(1)
    bm.allocate(1, [1, 2, 3, 4, 5], num_scheduled=0)
    assert _sync(bm, [1], [4], [2])[0] == 2
    bm.forget_device_rows()  # a new device table: rows hold nothing
    assert _sync(bm, [1], [4], [2])[0] == 2
    bm.reset()
    bm.allocate(3, [1], num_scheduled=0)
    assert _sync(bm, [3], [0], [2]) == (1, [bm.slot_of(3, 0)], [(8, bm.block_table(3)[0])])


@pytest.mark.parametrize("case", ["row out of range", "row twice", "too wide", "position", "few slots",
                                  "few updates"])
def test_sync_decode_tables_refuses_without_changing_anything(case):
    bm = BlockManager(16, 4)
    bm.allocate(1, list(range(9)), num_scheduled=0)  # 3 blocks
    bm.allocate(2, [5, 6], num_scheduled=0)
    assert _sync(bm, [2], [1], [0])[0] == 1
    ids, positions, rows, kw = [1, 2], [8, 1], [3, 1], {}
    if case == "row out of range":
        rows = [4, 1]
    elif case == "row twice":
        rows = [1, 1]
    elif case == "too wide":
        kw = dict(width=2)
    elif case == "position":
        positions = [9, 1]
    elif case == "few updates":
        kw = dict(capacity=3)  # sequence 1 needs 3 entries, sequence 2 (moved) one more
    if case == "few slots":
        slots, updates = np.zeros(1, np.int32), np.zeros((8, 2), np.int32)
        assert bm.sync_decode_tables(ids, positions, rows, 4, 4, slots, updates) == -1
    else:
        assert _sync(bm, ids, positions, rows, **kw) == (-1, [-9, -9], [])
    # Nothing was recorded: sequence 2 still holds row 0 and sequence 1 no row.
    assert _sync(bm, [2, 1], [1, 8], [0, 3])[0] == 3


def test_sync_decode_tables_checks_its_arrays():
    bm = BlockManager(16, 4)
    bm.allocate(1, [1, 2], num_scheduled=0)
    ok_slots, ok_updates = np.zeros(2, np.int32), np.zeros((8, 2), np.int32)
    with pytest.raises(TypeError):
        bm.sync_decode_tables([1], [1], [0], 4, 4, ok_slots.astype(np.int64), ok_updates)
    with pytest.raises(ValueError, match="updates must be a contiguous"):
        bm.sync_decode_tables([1], [1], [0], 4, 4, ok_slots, np.zeros((8, 3), np.int32))
    with pytest.raises(ValueError, match="slots must be a contiguous"):
        bm.sync_decode_tables([1], [1], [0], 4, 4, np.zeros((4, 2), np.int32)[:, 0], ok_updates)
    with pytest.raises(ValueError, match="differ in length"):
        bm.sync_decode_tables([1], [1, 2], [0], 4, 4, ok_slots, ok_updates)
    with pytest.raises(KeyError):
        bm.sync_decode_tables([7], [0], [0], 4, 4, ok_slots, ok_updates)


@pytest.mark.parametrize("seed", [0, 1])
def test_device_rows_follow_the_block_tables_through_random_operations(seed):
    """A simulated device table, updated only by the pairs, always holds the synced sequences'
    tables, while the pairs stay few: a step sends what changed, not whole tables."""
    rng = random.Random(seed)
    nb, bs, num_rows, width = 48, 4, 6, 12
    bm = BlockManager(nb, bs, watermark=0.0)
    device = np.full((num_rows, width), -1, dtype=np.int32)
    row_of: dict[int, int] = {}
    next_id, sent, whole = 0, 0, 0
    for _ in range(2000):
        live = bm.sequence_ids()
        op = rng.random()
        if op < 0.1 or not live:
            toks = [rng.randrange(5) for _ in range(rng.randrange(1, 20))]
            if bm.num_free_blocks() >= -(-len(toks) // bs) and len(live) < num_rows:
                bm.allocate(next_id, toks, num_scheduled=0)
                next_id += 1
        elif op < 0.75:
            sid = rng.choice(live)
            if bm.can_append(sid) and bm.num_tokens(sid) < width * bs:
                bm.append_token(sid, rng.randrange(5))
        elif op < 0.8 and len(live) < num_rows:
            bm.fork(rng.choice(live), next_id)
            next_id += 1
        elif op < 0.85:
            sid = rng.choice(live)
            bm.free(sid)
            row_of.pop(sid, None)
        else:  # a decode step of some sequences; sometimes they move to other free rows
            step = rng.sample(live, rng.randint(1, len(live)))
            taken = {row_of[s] for s in live if s in row_of and s not in step}
            for sid in step:
                if sid not in row_of or rng.random() < 0.1:
                    row_of[sid] = rng.choice([r for r in range(num_rows) if r not in taken])
                taken.add(row_of[sid])
            rows = [row_of[s] for s in step]
            if len(set(rows)) < len(rows):
                for sid in step:  # a collision: a fresh layout
                    row_of.pop(sid)
                free_rows = [r for r in range(num_rows) if r not in {row_of[s] for s in row_of}]
                for sid, r in zip(step, free_rows):
                    row_of[sid] = r
                rows = [row_of[s] for s in step]
            positions = [bm.num_tokens(s) - 1 for s in step]
            n, slots, pairs = _sync(bm, step, positions, rows, num_rows, width, capacity=num_rows * width)
            assert n >= 0
            for index, block in pairs:
                device[index // width, index % width] = block
            for sid, r, slot in zip(step, rows, slots):
                table = bm.block_table(sid)
                assert device[r, :len(table)].tolist() == table
                assert slot == bm.slot_of(sid, -1)
            sent += n
            whole += sum(len(bm.block_table(s)) for s in step)
    assert sent < whole / 2
