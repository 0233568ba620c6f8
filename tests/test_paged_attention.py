"""Tests of psnrl/kernels/paged_attention.py against psnrl/kernels/attention_reference.py.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py), whose
``tl.dot`` is only trusted in fp32: the CPU tests are fp32 with small shapes, at
atol = rtol = 1e-5 (outputs are convex combinations of V rows of size O(1); the
kernels differ from SDPA only in summation order and exp2, errors ~1e-7 measured).
Every case scatters a sequence's blocks over a shuffled pool and poisons the cache
slots that no sequence uses with NaN, so a read beyond a context or through a wrong
block shows. The bf16/fp16 tests at realistic sizes are marked ``gpu``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from psnrl.kernels.attention_reference import paged_attention_reference
from psnrl.kernels.paged_attention import (DecodeConfig, PrefillConfig, paged_attention, paged_decode_attention,
                                     pick_num_splits, prefill_attention)

ROOT = Path(__file__).resolve().parents[1]
TOL = dict(atol=1e-5, rtol=1e-5)


def make_case(ctx_lens, q_lens, heads, kv_heads, head_dim, block_size, device, seed=0,
              dtype=torch.float32, spare_blocks=3):
    """Random q and paged cache; sequence b owns cdiv(ctx_b, block_size) blocks at shuffled
    places of the pool, its table row is -1 padded, and unused slots hold NaN."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(ctx_lens)
    need = [(c + block_size - 1) // block_size for c in ctx_lens]
    max_blocks = max(need + [1]) + 1  # one spare column of -1 padding
    num_blocks = sum(need) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((batch, max_blocks), -1, dtype=torch.int32)
    k = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"))
    v = torch.full_like(k, float("nan"))
    used = 0
    for b, (c, n) in enumerate(zip(ctx_lens, need)):
        tables[b, :n] = perm[used:used + n].to(torch.int32)
        used += n
        slots = (tables[b, :n].long()[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:c]
        k.view(-1, kv_heads, head_dim)[slots] = torch.randn(c, kv_heads, head_dim, generator=gen)
        v.view(-1, kv_heads, head_dim)[slots] = torch.randn(c, kv_heads, head_dim, generator=gen)
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(q_lens, dtype=torch.int64), 0).to(torch.int32)
    q = torch.randn(int(cu[-1]), heads, head_dim, generator=gen)
    to = dict(device=device)
    return dict(q=q.to(dtype=dtype, **to), k_cache=k.to(dtype=dtype, **to), v_cache=v.to(dtype=dtype, **to),
                cu_seqlens_q=cu.to(**to),
                context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=device),
                block_tables=tables.to(**to), scale=head_dim ** -0.5)


def reference(case) -> torch.Tensor:
    """The fp32 torch reference (the cache's NaN slots are never gathered by it)."""
    f = {k: (v.float() if k in ("q", "k_cache", "v_cache") else v) for k, v in case.items()}
    return paged_attention_reference(f["q"], f["k_cache"], f["v_cache"], f["cu_seqlens_q"],
                                     f["context_lens"], f["block_tables"], f["scale"])


def decode(case, **kw) -> torch.Tensor:
    return paged_decode_attention(case["q"], case["k_cache"], case["v_cache"], case["block_tables"],
                                  case["context_lens"], case["scale"], **kw)


def prefill(case, **kw) -> torch.Tensor:
    return prefill_attention(case["q"], case["k_cache"], case["v_cache"], case["cu_seqlens_q"],
                             case["context_lens"], case["block_tables"], case["scale"], **kw)


def awkward(block_size: int) -> list[int]:
    return [1, block_size - 1, block_size, block_size + 1, 3 * block_size + 5]


# ---------------------------------------------------------------------------
# 1. Decode
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("ratio", [1, 2, 4, 8])
def test_decode_awkward_lengths_and_gqa(block_size, ratio, device):
    ctx = [c for c in awkward(block_size) if c > 0]
    case = make_case(ctx, [1] * len(ctx), heads=2 * ratio, kv_heads=2, head_dim=64,
                     block_size=block_size, device=device, seed=ratio * 100 + block_size)
    out = decode(case)
    assert out.shape == case["q"].shape and out.dtype == case["q"].dtype
    torch.testing.assert_close(out, reference(case), **TOL)


@pytest.mark.parametrize("block_size", [4, 16])
def test_decode_split_k_matches_one_split(block_size, device):
    # Contexts of 1..6 key tiles: with 3 splits some splits of the short ones are empty.
    ctx = [1, block_size + 1, 50, 97]
    case = make_case(ctx, [1] * len(ctx), heads=8, kv_heads=2, head_dim=32, block_size=block_size,
                     device=device, seed=7 + block_size)
    ref = reference(case)
    outs = {s: decode(case, num_splits=s) for s in (1, 2, 3)}
    for s, out in outs.items():
        torch.testing.assert_close(out, ref, **TOL, msg=lambda m: f"num_splits={s}: {m}")
    torch.testing.assert_close(outs[2], outs[1], atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(outs[3], outs[1], atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("head_dim", [32, 80, 128])
def test_decode_head_dims_padded_to_power_of_two(head_dim, device):
    ctx = [3, 21, 40]
    case = make_case(ctx, [1] * 3, heads=4, kv_heads=1, head_dim=head_dim, block_size=16,
                     device=device, seed=head_dim)
    torch.testing.assert_close(decode(case, num_splits=2), reference(case), **TOL)


def test_decode_tile_spans_part_of_a_block(device):
    # block_size 64 > the 16-token tile: tiles read parts of one block; splits cut blocks.
    ctx = [1, 63, 64, 65, 130]
    case = make_case(ctx, [1] * len(ctx), heads=4, kv_heads=2, head_dim=32, block_size=64,
                     device=device, seed=64)
    ref = reference(case)
    torch.testing.assert_close(decode(case, num_splits=1), ref, **TOL)
    torch.testing.assert_close(decode(case, num_splits=3, config=DecodeConfig(32, 4, 1)), ref, **TOL)


def test_decode_table_shared_blocks_and_wide_tables(device):
    # Two sequences share a prefix block (prefix caching): the same physical block in both rows.
    case = make_case([20, 20], [1, 1], heads=4, kv_heads=2, head_dim=32, block_size=16, device=device,
                     seed=5)
    case["block_tables"][1, 0] = case["block_tables"][0, 0]
    torch.testing.assert_close(decode(case, num_splits=2), reference(case), **TOL)


def test_pick_num_splits():
    assert pick_num_splits(64, 2, 100, sms=132) == 1  # short contexts: never split
    assert pick_num_splits(1, 4, 4096, sms=132) == 4096 // 256  # one long sequence: >= 256 tokens each
    assert pick_num_splits(1, 4, 1 << 20, sms=132) == 32  # capped
    assert pick_num_splits(64, 2, 4096, sms=132) == 3  # 128 programs -> ~2 per SM with 3 splits
    assert pick_num_splits(512, 4, 4096, sms=132) == 1  # the batch fills the GPU


# ---------------------------------------------------------------------------
# 2. Prefill (varlen, causal, over the cached context)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [1, 4])
def test_prefill_plain_several_lengths(ratio, device):
    ctx = [1, 5, 16, 17, 33]  # q_len == context_len: plain prefill
    case = make_case(ctx, ctx, heads=2 * ratio, kv_heads=2, head_dim=32, block_size=16,
                     device=device, seed=ratio)
    torch.testing.assert_close(prefill(case), reference(case), **TOL)


@pytest.mark.parametrize("block_size,ratio", [(4, 2), (16, 8)])
def test_prefill_chunked_and_prefix_cached(block_size, ratio, device):
    # q_len < context_len (cached prefix / a later chunk), q_len == context_len and q_len == 1
    # mixed in one call.
    ctx = [20, 33, 16, 40, 5, 9]
    q_lens = [7, 1, 16, 13, 2, 9]
    case = make_case(ctx, q_lens, heads=2 * ratio, kv_heads=2, head_dim=64, block_size=block_size,
                     device=device, seed=block_size + ratio)
    torch.testing.assert_close(prefill(case), reference(case), **TOL)


def test_prefill_one_new_token_equals_decode(device):
    ctx = [1, 15, 16, 17, 41]
    case = make_case(ctx, [1] * len(ctx), heads=8, kv_heads=2, head_dim=32, block_size=16,
                     device=device, seed=11)
    ref = reference(case)
    torch.testing.assert_close(prefill(case), ref, **TOL)
    torch.testing.assert_close(prefill(case), decode(case, num_splits=1), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("config", [PrefillConfig(16, 16, 4, 1), PrefillConfig(64, 32, 4, 1)],
                         ids=["m16n16", "m64n32"])
def test_prefill_tilings_and_head_dim_80(config, device):
    # GROUP 7 (Qwen2.5: 14/2, 28/4): a tile's rows split tokens' head groups; head_dim 80 padded
    # to 128; block_size 32 > the key tile for m16n16.
    ctx = [30, 45, 3]
    q_lens = [30, 12, 3]
    case = make_case(ctx, q_lens, heads=7, kv_heads=1, head_dim=80, block_size=32, device=device,
                     seed=config.block_m)
    torch.testing.assert_close(prefill(case, config=config), reference(case), **TOL)


def test_prefill_empty_sequences_in_batch(device):
    # A sequence with no new tokens this step (0 rows) between others.
    case = make_case([10, 12, 7], [3, 0, 7], heads=4, kv_heads=2, head_dim=32, block_size=4,
                     device=device, seed=3)
    torch.testing.assert_close(prefill(case), reference(case), **TOL)


# ---------------------------------------------------------------------------
# 3. Dispatcher
# ---------------------------------------------------------------------------

def dispatch(case, **kw) -> torch.Tensor:
    return paged_attention(case["q"], case["k_cache"], case["v_cache"], case["cu_seqlens_q"],
                           case["context_lens"], case["block_tables"], case["scale"], **kw)


def test_dispatcher_picks_decode_or_prefill(device, monkeypatch):
    import psnrl.kernels.paged_attention as pa
    calls = []
    monkeypatch.setattr(pa, "paged_decode_attention",
                        lambda *a, **k: calls.append("decode") or paged_decode_attention(*a, **k))
    monkeypatch.setattr(pa, "prefill_attention",
                        lambda *a, **k: calls.append("prefill") or prefill_attention(*a, **k))
    dec = make_case([3, 17], [1, 1], heads=4, kv_heads=2, head_dim=32, block_size=16, device=device)
    pre = make_case([3, 17], [3, 2], heads=4, kv_heads=2, head_dim=32, block_size=16, device=device)
    torch.testing.assert_close(dispatch(dec), reference(dec), **TOL)
    torch.testing.assert_close(dispatch(dec, decode=False), reference(dec), **TOL)
    torch.testing.assert_close(dispatch(pre), reference(pre), **TOL)
    assert calls == ["decode", "prefill", "prefill"]
    with pytest.raises(ValueError, match="decode=True needs one new token per sequence"):
        dispatch(pre, decode=True)


def test_cpu_without_the_interpreter_runs_the_torch_reference():
    code = """
import torch
from psnrl.kernels.attention_reference import paged_attention_reference
from psnrl.kernels.paged_attention import paged_attention, paged_decode_attention, prefill_attention
torch.manual_seed(0)
k, v = torch.randn(6, 4, 2, 8), torch.randn(6, 4, 2, 8)
bt = torch.tensor([[3, 1, -1], [0, 5, 2]], dtype=torch.int32)
ctx = torch.tensor([6, 10], dtype=torch.int32)
q = torch.randn(5, 4, 8)
cu = torch.tensor([0, 2, 5], dtype=torch.int32)
ref = paged_attention_reference(q, k, v, cu, ctx, bt, 0.3)
assert torch.equal(paged_attention(q, k, v, cu, ctx, bt, 0.3), ref)
assert torch.equal(prefill_attention(q, k, v, cu, ctx, bt, 0.3), ref)
cu1 = torch.tensor([0, 1, 2], dtype=torch.int32)
ref1 = paged_attention_reference(q[:2], k, v, cu1, ctx, bt, 0.3)
assert torch.equal(paged_decode_attention(q[:2], k, v, bt, ctx, 0.3), ref1)
assert torch.equal(paged_attention(q[:2], k, v, cu1, ctx, bt, 0.3), ref1)
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ---------------------------------------------------------------------------
# 4. Validation
# ---------------------------------------------------------------------------

def test_validation_errors_name_the_values():
    base = make_case([5, 9], [2, 3], heads=4, kv_heads=2, head_dim=16, block_size=4, device="cpu")

    def bad(match, fn=prefill, **changes):
        case = dict(base, **changes)
        with pytest.raises(ValueError, match=match):
            fn(case)

    bad(r"q heads 3 must be a multiple of the cache's kv heads 2", q=base["q"][:, :3])
    bad(r"context_lens max 20 exceeds the block tables' capacity 4 blocks x block_size 4 = 16",
        context_lens=torch.tensor([5, 20], dtype=torch.int32))
    bad(r"sequence 0 has context_len 1 < 2 new tokens", context_lens=torch.tensor([1, 9], dtype=torch.int32))
    tables = base["block_tables"].clone()
    tables[1, 2] = 99
    bad(r"1 used block_tables entries are outside \[0, num_blocks=8\): block_tables\[1, 2\] = 99",
        block_tables=tables)
    bad(r"block_tables must be \[batch=2, max_blocks\] int32, got \(2, 4\) torch.int64",
        block_tables=base["block_tables"].long())
    bad(r"context_lens must be \[batch=2\] int32", context_lens=base["context_lens"].long())
    bad(r"k_cache torch.float16 and v_cache torch.float32 must have q's dtype torch.float32",
        k_cache=base["k_cache"].half())
    bad(r"block_size \(k_cache.shape\[1\]\) must be a power of two, got 3",
        k_cache=base["k_cache"][:, :3].contiguous(), v_cache=base["v_cache"][:, :3].contiguous())
    bad(r"k_cache and v_cache must be contiguous", k_cache=base["k_cache"].transpose(0, 1).contiguous()
        .transpose(0, 1))
    bad(r"head_dim of q .* is 8 but k_cache .* has 16", q=base["q"][..., :8])
    bad(r"cu_seqlens_q must run from 0 to q's 5 tokens, got 0 .. 4",
        cu_seqlens_q=torch.tensor([0, 2, 4], dtype=torch.int32))
    dec = make_case([5, 9], [1, 1], heads=4, kv_heads=2, head_dim=16, block_size=4, device="cpu")
    with pytest.raises(ValueError, match="num_splits must be a positive int or None, got 0"):
        decode(dec, num_splits=0)
    with pytest.raises(ValueError, match="sequence 1 has context_len 0 < 1 new tokens"):
        decode(dict(dec, context_lens=torch.tensor([5, 0], dtype=torch.int32)))
    with pytest.raises(ValueError, match=r"q must be 3-D \[tokens, heads, head_dim\], got \(2, 64\)"):
        decode(dict(dec, q=dec["q"].reshape(2, -1)))


# ---------------------------------------------------------------------------
# 5. The aligned kernel variant (the sm_90 compile of every launch: tests/test_kernels_compile.py)
# ---------------------------------------------------------------------------

def test_fresh_tensors_take_the_aligned_kernel_variant():
    from psnrl.kernels.paged_attention import _aligned16
    case = make_case([5], [1], heads=4, kv_heads=2, head_dim=128, block_size=16, device="cpu",
                     dtype=torch.bfloat16)
    assert _aligned16(case["q"], case["k_cache"], case["v_cache"])
    assert not _aligned16(case["q"].reshape(-1)[1:129])  # starts 2 bytes into the buffer
    assert not _aligned16(torch.empty(3, 36, dtype=torch.bfloat16))  # 72-byte rows


# ---------------------------------------------------------------------------
# 6. GPU: bf16 / fp16 at realistic sizes (the interpreter's tl.dot is wrong for them)
# ---------------------------------------------------------------------------

def half_tol(ref: torch.Tensor) -> dict:
    """bf16 inputs round q, K, V and P (rel. 2^-9) and the output on store: rtol 2e-2 and an
    atol of 2e-2 times the RMS of the output (entries near 0 carry only absolute error)."""
    return dict(atol=2e-2 * ref.pow(2).mean().sqrt().item(), rtol=2e-2)


GPU_MODELS = [(14, 2, 64), (28, 4, 128)]  # Qwen2.5-0.5B-like and Qwen2.5-7B heads / kv heads / head_dim


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("heads,kv_heads,head_dim", GPU_MODELS, ids=["H14KV2D64", "H28KV4D128"])
def test_gpu_decode_half_precision(heads, kv_heads, head_dim, dtype):
    gen = torch.Generator().manual_seed(heads)
    ctx = torch.randint(1, 4097, (64,), generator=gen)
    ctx[:4] = torch.tensor([1, 15, 16, 4096])
    ctx = ctx.tolist()
    case = make_case(ctx, [1] * 64, heads, kv_heads, head_dim, 16, "cuda", seed=heads, dtype=dtype)
    ref = reference(case)
    for splits in (None, 1, 4):
        out = decode(case, num_splits=splits)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, **half_tol(ref))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("heads,kv_heads,head_dim", GPU_MODELS, ids=["H14KV2D64", "H28KV4D128"])
def test_gpu_prefill_half_precision(heads, kv_heads, head_dim, dtype):
    ctx = [1, 17, 300, 1000, 2048, 4000, 777]
    q_lens = [1, 17, 300, 1000, 512, 129, 1]  # plain, chunked and single-token rows
    case = make_case(ctx, q_lens, heads, kv_heads, head_dim, 16, "cuda", seed=head_dim, dtype=dtype)
    ref = reference(case)
    out = prefill(case)
    torch.testing.assert_close(out.float(), ref, **half_tol(ref))
    torch.testing.assert_close(dispatch(case).float(), ref, **half_tol(ref))


@pytest.mark.gpu
def test_gpu_fp32_matches_reference():
    # fp32 on the GPU uses IEEE dots; sums over up to 4k keys in another order than SDPA.
    ctx = [1, 16, 17, 1000, 4000]
    for q_lens in ([1] * 5, [1, 16, 5, 300, 64]):
        case = make_case(ctx, q_lens, 28, 4, 128, 16, "cuda", seed=len(q_lens))
        out = dispatch(case)
        torch.testing.assert_close(out, reference(case), atol=3e-5, rtol=3e-5)
