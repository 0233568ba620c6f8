"""Tests of psnrl/kernels/noisy_linear.py: the fused multi-stream noisy matmul and its autograd.

Without a GPU the Triton kernel runs in the interpreter (tests/conftest.py), whose
``tl.dot`` is only trusted in fp32, so every CPU test is fp32; the bf16/fp16 tests
are marked ``gpu``.

fp32 tolerance: the kernel sums each dot product in BK-sized chunks in an order
that differs from torch's (and between tile configs). Over K terms of O(1) inputs
the output grows like sqrt(K) and its rounding error like eps * K = eps * sqrt(K) *
sqrt(K), so both atol and rtol are 1e-5 * sqrt(K) (eps = 6e-8 leaves > 10x margin;
the worst case measured in the interpreter used under 7% of it).
The noise alone (identity trick) is checked to atol = rtol = 1e-6 in the interpreter (the
kernel and the torch reference share the arithmetic and differ by at most a couple of ulp)
and to atol 1e-4 on the GPU, whose MUFU log2/sin/cos approximate (see kernels/noise.py).
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from psnrl.kernels import noise
from psnrl.kernels import noise_reference as R
from psnrl.kernels.noise_rows import NoiseStream, StreamRows
from psnrl.kernels.noisy_linear import TileConfig, dual_linear, noisy_linear, pick_tiles
from psnrl.kernels.noisy_linear_reference import noisy_linear_reference

PKEY = noise.param_key("model.layers.0.mlp.up_proj.weight")
NOISE_ATOL = 1e-6 if os.environ.get("TRITON_INTERPRET") == "1" else 1e-4
BIG_SEED = 2**63 + 12345  # high seed word with the top bit set
SMALL_TILES = TileConfig(16, 32, 32, 4, 1)
LARGE_TILES = TileConfig(32, 64, 64, 4, 1)


def fp32_tol(k: int) -> dict:
    t = 1e-5 * math.sqrt(max(k, 1))
    return dict(atol=t, rtol=t)


def randn(*shape, gen: torch.Generator, device, dtype=torch.float32, scale: float = 1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)


def mixed_streams() -> list[NoiseStream]:
    """Two noisy streams (different seeds and sigmas, one seed >= 2**63) and a sigma-0 one."""
    return [NoiseStream(seed=1234, sigma=0.05), NoiseStream(seed=BIG_SEED, sigma=0.3),
            NoiseStream(seed=99, sigma=0.0)]


def make_rows(kind: str, row_shape: tuple[int, ...], device, gen: torch.Generator) -> StreamRows | None:
    m = math.prod(row_shape)
    if kind == "none":
        return None
    if kind == "clean":
        return StreamRows(torch.zeros(row_shape, dtype=torch.int64, device=device), [])
    if kind == "one":
        return StreamRows(torch.ones(row_shape, dtype=torch.int32, device=device),
                          [NoiseStream(seed=777, sigma=0.2)])
    assert kind == "mixed"
    streams = mixed_streams()
    ids = torch.randint(0, len(streams) + 1, (m,), generator=gen)
    # every stream when m >= 4; a noisy one (the 2**63 seed) first, so that m = 1 is noisy
    ids[: min(m, 4)] = torch.tensor([2, 1, 0, 3])[:m]
    ids = ids[torch.randperm(m, generator=gen)]
    return StreamRows(ids.reshape(row_shape).to(device), streams)


def stream_weight(weight: torch.Tensor, stream: NoiseStream, *, key: int = PKEY, row_offset: int = 0,
                  col_offset: int = 0, in_features: int | None = None) -> torch.Tensor:
    """W + sigma E of one stream, from the torch noise reference, in fp32."""
    e = R.noise(tuple(weight.shape), stream.seed, key, stream.sigma, row_offset=row_offset,
                col_offset=col_offset, in_features=in_features, device=weight.device)
    return weight.float() + e


# ---------------------------------------------------------------------------
# 1. fp32 against the materializing reference over awkward shapes
# ---------------------------------------------------------------------------

# Every M in {1, 2, 17, 65}, N in {1, 5, 64, 130} and K in {1, 7, 33, 100, 128} is
# covered, in varied pairings (a full product would take minutes in the interpreter).
SHAPES = [
    (1, 1, 1), (1, 130, 128), (1, 5, 33),
    (2, 5, 7), (2, 64, 100), (2, 130, 1),
    (17, 1, 33), (17, 130, 100), (17, 64, 7),
    (65, 5, 128), (65, 64, 1), (65, 130, 33),
    (1, 64, 7), (2, 1, 128), (17, 5, 1), (65, 1, 100),
]


@pytest.mark.parametrize("rows_kind", ["clean", "one", "mixed"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m,n,k", SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in SHAPES])
def test_fp32_matches_reference(device, m, n, k, with_bias, rows_kind):
    gen = torch.Generator().manual_seed(m * 1_000_003 + n * 1009 + k)
    x = randn(m, k, gen=gen, device=device)
    w = randn(n, k, gen=gen, device=device)
    b = randn(n, gen=gen, device=device) if with_bias else None
    rows = make_rows(rows_kind, (m,), device, gen)
    y = noisy_linear(x, w, b, rows=rows, param_key=PKEY)
    ref = noisy_linear_reference(x, w, b, rows=rows, param_key=PKEY)
    assert y.shape == (m, n) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, **fp32_tol(k))
    if rows_kind != "clean":
        # The noise is really there: rows of noisy streams differ from the clean product.
        noisy = ~rows.clean_mask.to(device)
        assert noisy.any()
        assert not torch.allclose(y[noisy], F.linear(x, w, b)[noisy], atol=1e-4, rtol=0)


@pytest.mark.parametrize("tiles", [None, SMALL_TILES], ids=["auto", "small"])
def test_fp32_matches_reference_with_several_tiles_per_dim(device, tiles):
    """Several row, column and K tiles at once, with streams mixed inside each row tile."""
    gen = torch.Generator().manual_seed(5)
    m, n, k = 65, 130, 100
    x = randn(m, k, gen=gen, device=device)
    w = randn(n, k, gen=gen, device=device)
    b = randn(n, gen=gen, device=device)
    rows = make_rows("mixed", (m,), device, gen)
    y = noisy_linear(x, w, b, rows=rows, param_key=PKEY, tiles=tiles)
    torch.testing.assert_close(y, noisy_linear_reference(x, w, b, rows=rows, param_key=PKEY),
                               **fp32_tol(k))


@pytest.mark.parametrize("rows_kind", ["none", "clean", "mixed"])
def test_leading_batch_dims(device, rows_kind):
    gen = torch.Generator().manual_seed(11)
    k, n = 33, 17
    x = randn(2, 3, k, gen=gen, device=device)
    w = randn(n, k, gen=gen, device=device)
    b = randn(n, gen=gen, device=device)
    rows = make_rows(rows_kind, (2, 3), device, gen)
    y = noisy_linear(x, w, b, rows=rows, param_key=PKEY)
    assert y.shape == (2, 3, n)
    ref = noisy_linear_reference(x, w, b, rows=rows, param_key=PKEY)
    torch.testing.assert_close(y, ref, **fp32_tol(k))
    # Row (i, j) of x uses stream row_streams[i, j]: same as the flattened batch.
    flat_rows = None if rows is None else StreamRows(rows.ids.reshape(6), rows.streams)
    y_flat = noisy_linear(x.reshape(6, k), w, b, rows=flat_rows, param_key=PKEY)
    torch.testing.assert_close(y.reshape(6, n), y_flat, **fp32_tol(k))


def test_param_key_with_top_bit_and_different_keys(device):
    """param_key >= 2**31 reaches the kernel as a negative int32; it must still mean the same key."""
    gen = torch.Generator().manual_seed(3)
    m, n, k = 8, 20, 40
    x = randn(m, k, gen=gen, device=device)
    w = randn(n, k, gen=gen, device=device)
    rows = StreamRows(torch.ones(m, dtype=torch.int32, device=device), [NoiseStream(5, 0.5)])
    outs = {}
    for key in (0, 1, 2**31, 0xFFFFFFFF):
        outs[key] = noisy_linear(x, w, rows=rows, param_key=key)
        torch.testing.assert_close(outs[key], noisy_linear_reference(x, w, rows=rows, param_key=key),
                                   **fp32_tol(k))
    assert not torch.allclose(outs[0], outs[1])
    assert not torch.allclose(outs[2**31], outs[0xFFFFFFFF])


@pytest.mark.parametrize("layout", ["interleaved", "runs", "clean-then-noisy"])
@pytest.mark.parametrize("tiles", [None, SMALL_TILES], ids=["auto", "small"])
def test_many_streams_and_row_layouts(device, layout, tiles):
    """More distinct streams than one row block serves at once (8 noisy + clean), laid out
    interleaved (decode), in runs crossing block boundaries, and as [clean | noisy]."""
    gen = torch.Generator().manual_seed(12)
    m, n, k = 70, 40, 45
    x = randn(m, k, gen=gen, device=device)
    w = randn(n, k, gen=gen, device=device)
    b = randn(n, gen=gen, device=device)
    streams = [NoiseStream(seed=BIG_SEED * (s % 2) + 1000 * s, sigma=0.05 * s) for s in range(1, 9)]
    if layout == "interleaved":
        ids = torch.arange(m) % (len(streams) + 1)
        ids = ids[torch.randperm(m, generator=gen)]
    elif layout == "runs":
        ids = torch.repeat_interleave(torch.tensor([0, 3, 1, 8, 0, 5, 2, 7, 4, 6]),
                                      torch.tensor([9, 1, 17, 5, 3, 11, 2, 8, 6, 8]))
    else:
        ids = torch.cat([torch.zeros(30, dtype=torch.int64), torch.full((40,), 6)])
    rows = StreamRows(ids.to(device), streams)
    y = noisy_linear(x, w, b, rows=rows, param_key=PKEY, tiles=tiles)
    torch.testing.assert_close(y, noisy_linear_reference(x, w, b, rows=rows, param_key=PKEY),
                               **fp32_tol(k))


@pytest.mark.parametrize("split_k", [2, 4])  # K = 100, BK = 32: 2 and 4 K-splits
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_split_k(device, split_k, with_bias):
    """Split-K partial sums (and the bias added after the reduction) match the reference."""
    gen = torch.Generator().manual_seed(13)
    m, n, k = 20, 37, 100
    x = randn(m, k, gen=gen, device=device)
    w = randn(n, k, gen=gen, device=device)
    b = randn(n, gen=gen, device=device) if with_bias else None
    rows = make_rows("mixed", (m,), device, gen)
    tiles = TileConfig(16, 32, 32, 4, 1, split_k=split_k)
    kw = dict(rows=rows, param_key=PKEY, col_offset=3, in_features=k + 10)
    y = noisy_linear(x, w, b, tiles=tiles, **kw)
    torch.testing.assert_close(y, noisy_linear_reference(x, w, b, **kw), **fp32_tol(k))
    torch.testing.assert_close(y, noisy_linear(x, w, b, tiles=SMALL_TILES, **kw), **fp32_tol(k))


def test_decode_shape_with_automatic_split_k(device):
    """Few rows and a long K: the automatic tiles split K (checked, so the test keeps its point)."""
    gen = torch.Generator().manual_seed(14)
    m, n, k = 4, 64, 1024
    cfg = pick_tiles(m, n, k, torch.float32)
    assert getattr(cfg, "split_k", 1) > 1
    x = randn(m, k, gen=gen, device=device)
    w = randn(n, k, gen=gen, device=device)
    b = randn(n, gen=gen, device=device)
    rows = StreamRows(torch.tensor([0, 1, 2, 1], device=device),
                      [NoiseStream(3, 0.1), NoiseStream(BIG_SEED, 0.2)])
    y = noisy_linear(x, w, b, rows=rows, param_key=PKEY)
    torch.testing.assert_close(y, noisy_linear_reference(x, w, b, rows=rows, param_key=PKEY),
                               **fp32_tol(k))


# ---------------------------------------------------------------------------
# 2. A mixed batch equals each stream run alone
# ---------------------------------------------------------------------------

def test_mixed_batch_equals_per_stream_runs(device):
    gen = torch.Generator().manual_seed(21)
    m, n, k = 40, 24, 50
    x = randn(m, k, gen=gen, device=device)
    w = randn(n, k, gen=gen, device=device)
    b = randn(n, gen=gen, device=device)
    streams = mixed_streams()
    rows = make_rows("mixed", (m,), device, gen)
    ids = rows.ids.long()
    y = noisy_linear(x, w, b, rows=rows, param_key=PKEY)
    tol = fp32_tol(k)
    for s in range(len(streams) + 1):
        sel = ids == s
        assert sel.any()
        # this stream's rows alone, through the kernel
        alone = StreamRows(torch.full((int(sel.sum()),), s, dtype=torch.int32, device=device), streams)
        torch.testing.assert_close(y[sel], noisy_linear(x[sel], w, b, rows=alone, param_key=PKEY), **tol)
        # ... and through plain torch
        if s == 0 or streams[s - 1].sigma == 0:
            expected = F.linear(x[sel], w, b)
        else:
            expected = F.linear(x[sel], stream_weight(w, streams[s - 1]), b)
        torch.testing.assert_close(y[sel], expected, **tol)


def test_all_clean_rows_equal_f_linear(device):
    gen = torch.Generator().manual_seed(22)
    x = randn(30, 70, gen=gen, device=device)
    w = randn(45, 70, gen=gen, device=device)
    b = randn(45, gen=gen, device=device)
    expected = F.linear(x, w, b)
    torch.testing.assert_close(noisy_linear(x, w, b), expected, **fp32_tol(70))
    # a stream that no row uses, and a sigma-0 stream, change nothing
    rows = StreamRows(torch.tensor([0, 2] * 15, device=device),
                      [NoiseStream(1, 1.0), NoiseStream(BIG_SEED, 0.0)])
    torch.testing.assert_close(noisy_linear(x, w, b, rows=rows, param_key=PKEY), expected,
                               **fp32_tol(70))


# ---------------------------------------------------------------------------
# 3. Tiling invariance, of the product and of the noise itself
# ---------------------------------------------------------------------------

def test_tile_configs_agree(device):
    gen = torch.Generator().manual_seed(31)
    m, n, k = 50, 70, 100
    x = randn(m, k, gen=gen, device=device)
    w = randn(n, k, gen=gen, device=device)
    b = randn(n, gen=gen, device=device)
    rows = make_rows("mixed", (m,), device, gen)
    y_small = noisy_linear(x, w, b, rows=rows, param_key=PKEY, tiles=SMALL_TILES)
    y_large = noisy_linear(x, w, b, rows=rows, param_key=PKEY, tiles=LARGE_TILES)
    y_auto = noisy_linear(x, w, b, rows=rows, param_key=PKEY)
    torch.testing.assert_close(y_small, y_large, **fp32_tol(k))
    torch.testing.assert_close(y_small, y_auto, **fp32_tol(k))


@pytest.mark.parametrize("k", [33, 64], ids=["K33-unpaired", "K64-paired"])
def test_noise_is_tiling_invariant(device, k):
    """x = I, W = 0, sigma = 1: y = E^T exactly, whatever the tiles."""
    n = 40
    seed = BIG_SEED + 1
    x = torch.eye(k, device=device)
    w = torch.zeros(n, k, device=device)
    rows = StreamRows(torch.ones(k, dtype=torch.int32, device=device), [NoiseStream(seed, 1.0)])
    expected = R.noise((n, k), seed, PKEY, 1.0, device=device)
    outs = [noisy_linear(x, w, rows=rows, param_key=PKEY, tiles=t) for t in (SMALL_TILES, LARGE_TILES)]
    for y in outs:
        torch.testing.assert_close(y.T, expected, atol=NOISE_ATOL, rtol=1e-6)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("row_offset,col_offset,in_features",
                         [(3, 5, 50), (7, 10, 64), (2**31 // 64 + 3, 0, 64)],
                         ids=["odd-col", "even-col", "high-address"])
def test_noise_of_a_shard_is_that_of_the_unsharded_weight(device, row_offset, col_offset, in_features):
    """Same identity trick on a shard: E must be the (row_offset, col_offset) block of the full E.

    The last case puts flat indices above 2**31 (row * in_features in uint32).
    """
    k, n = 33, 20
    seed = 4242
    x = torch.eye(k, device=device)
    w = torch.zeros(n, k, device=device)
    rows = StreamRows(torch.ones(k, dtype=torch.int32, device=device), [NoiseStream(seed, 1.0)])
    y = noisy_linear(x, w, rows=rows, param_key=PKEY, row_offset=row_offset, col_offset=col_offset,
                     in_features=in_features, tiles=SMALL_TILES)
    expected = R.noise((n, k), seed, PKEY, 1.0, row_offset=row_offset, col_offset=col_offset,
                       in_features=in_features, device=device)
    torch.testing.assert_close(y.T, expected, atol=NOISE_ATOL, rtol=1e-6)


# ---------------------------------------------------------------------------
# 4. Shard invariance
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n,split", [(37, 19), (64, 32)], ids=["odd-split", "even-split"])
def test_row_shards_concatenate_to_the_whole(device, n, split):
    gen = torch.Generator().manual_seed(41)
    m, k = 20, 50
    x = randn(m, k, gen=gen, device=device)
    w = randn(n, k, gen=gen, device=device)
    b = randn(n, gen=gen, device=device)
    rows = make_rows("mixed", (m,), device, gen)
    whole = noisy_linear(x, w, b, rows=rows, param_key=PKEY)
    parts = [noisy_linear(x, w[:split], b[:split], rows=rows, param_key=PKEY, row_offset=0),
             noisy_linear(x, w[split:], b[split:], rows=rows, param_key=PKEY, row_offset=split)]
    torch.testing.assert_close(torch.cat(parts, dim=-1), whole, **fp32_tol(k))


@pytest.mark.parametrize("k,split", [(50, 17), (50, 24), (33, 16)],
                         ids=["evenK-odd-split", "evenK-even-split", "oddK-even-split"])
def test_column_shards_sum_to_the_whole(device, k, split):
    gen = torch.Generator().manual_seed(42)
    m, n = 20, 30
    x = randn(m, k, gen=gen, device=device)
    w = randn(n, k, gen=gen, device=device)
    b = randn(n, gen=gen, device=device)
    rows = make_rows("mixed", (m,), device, gen)
    whole = noisy_linear(x, w, b, rows=rows, param_key=PKEY)
    left = noisy_linear(x[:, :split], w[:, :split], b, rows=rows, param_key=PKEY,
                        col_offset=0, in_features=k)
    right = noisy_linear(x[:, split:], w[:, split:], None, rows=rows, param_key=PKEY,
                         col_offset=split, in_features=k)
    torch.testing.assert_close(left + right, whole, **fp32_tol(k))
    # each partial product is the reference's partial product with the full weight's noise
    torch.testing.assert_close(
        right, noisy_linear_reference(x[:, split:], w[:, split:], rows=rows, param_key=PKEY,
                                      col_offset=split, in_features=k), **fp32_tol(k))


def test_two_dim_shard_matches_reference(device):
    gen = torch.Generator().manual_seed(43)
    m, n, k, in_features = 18, 21, 29, 100
    x = randn(m, k, gen=gen, device=device)
    w = randn(n, k, gen=gen, device=device)
    rows = make_rows("mixed", (m,), device, gen)
    kw = dict(rows=rows, param_key=PKEY, row_offset=13, col_offset=37, in_features=in_features)
    torch.testing.assert_close(noisy_linear(x, w, **kw), noisy_linear_reference(x, w, **kw),
                               **fp32_tol(k))


# ---------------------------------------------------------------------------
# 5. Gradients
# ---------------------------------------------------------------------------

def _grads(fn, x, w, b, grad_y):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    b = b.detach().requires_grad_()
    y = fn(x, w, b)
    return torch.autograd.grad(y, (x, w, b), grad_y)


GRAD_TOL = dict(atol=1e-5, rtol=1e-5)  # backward is plain torch matmuls: essentially exact


@pytest.mark.parametrize("batch", [(23,), (2, 3)], ids=["2d", "batched"])
def test_gradients_all_clean_equal_f_linear(device, batch):
    gen = torch.Generator().manual_seed(51)
    n, k = 19, 45
    x = randn(*batch, k, gen=gen, device=device)
    w = randn(n, k, gen=gen, device=device)
    b = randn(n, gen=gen, device=device)
    grad_y = randn(*batch, n, gen=gen, device=device)
    got = _grads(lambda x, w, b: noisy_linear(x, w, b, param_key=PKEY), x, w, b, grad_y)
    exp = _grads(F.linear, x, w, b, grad_y)
    for g, e in zip(got, exp):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, **GRAD_TOL)


@pytest.mark.parametrize("batch", [(40,), (4, 10)], ids=["2d", "batched"])
def test_gradients_mixed_rows(device, batch):
    """Noisy rows are constants; clean rows (stream 0 and sigma-0 streams) get F.linear's gradients."""
    gen = torch.Generator().manual_seed(52)
    n, k = 19, 45
    x = randn(*batch, k, gen=gen, device=device)
    w = randn(n, k, gen=gen, device=device)
    b = randn(n, gen=gen, device=device)
    grad_y = randn(*batch, n, gen=gen, device=device)
    rows = make_rows("mixed", batch, device, gen)
    ids = rows.ids.reshape(batch).long()
    clean = (ids == 0) | (ids == 3)  # stream 3 has sigma 0: it is the clean policy
    assert clean.any() and (~clean).any()
    gx, gw, gb = _grads(lambda x, w, b: noisy_linear(x, w, b, rows=rows, param_key=PKEY),
                        x, w, b, grad_y)
    ex, ew, eb = _grads(F.linear, x[clean], w, b, grad_y[clean])
    assert gx.shape == x.shape and gw.shape == w.shape and gb.shape == b.shape
    assert torch.all(gx[~clean] == 0)
    torch.testing.assert_close(gx[clean], ex, **GRAD_TOL)
    torch.testing.assert_close(gw, ew, **GRAD_TOL)
    torch.testing.assert_close(gb, eb, **GRAD_TOL)


def test_gradients_all_noisy_rows_are_zero(device):
    gen = torch.Generator().manual_seed(53)
    m, n, k = 9, 7, 12
    x = randn(m, k, gen=gen, device=device)
    w = randn(n, k, gen=gen, device=device)
    b = randn(n, gen=gen, device=device)
    rows = StreamRows(torch.ones(m, dtype=torch.int32, device=device), [NoiseStream(8, 0.1)])
    grads = _grads(lambda x, w, b: noisy_linear(x, w, b, rows=rows, param_key=PKEY), x, w, b,
                   randn(m, n, gen=gen, device=device))
    for g in grads:
        assert torch.all(g == 0)


def test_gradient_only_wrt_x(device):
    gen = torch.Generator().manual_seed(54)
    m, n, k = 12, 9, 20
    x = randn(m, k, gen=gen, device=device).requires_grad_()
    w = randn(n, k, gen=gen, device=device)
    grad_y = randn(m, n, gen=gen, device=device)
    (gx,) = torch.autograd.grad(noisy_linear(x, w, param_key=PKEY), (x,), grad_y)
    torch.testing.assert_close(gx, grad_y @ w, **GRAD_TOL)


# ---------------------------------------------------------------------------
# 6. Bad input
# ---------------------------------------------------------------------------

def test_bad_shapes_and_dtypes_raise(device):
    x = torch.randn(4, 8, device=device)
    w = torch.randn(6, 8, device=device)
    with pytest.raises(ValueError, match=r"\(4, 9\).*\(6, 8\).*in_features=8"):
        noisy_linear(torch.randn(4, 9, device=device), w)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        noisy_linear(x, torch.randn(6, 8, 1, device=device))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        noisy_linear(x, torch.randn(8, device=device))
    with pytest.raises(ValueError, match="must share dtype"):
        noisy_linear(x, w.double())
    with pytest.raises(ValueError, match="must share dtype"):
        noisy_linear(x, w.half())
    with pytest.raises(ValueError, match="supports.*float64"):
        noisy_linear(x.double(), w.double())
    with pytest.raises(ValueError, match=r"bias .*\(5,\).*must be \[6\]"):
        noisy_linear(x, w, torch.randn(5, device=device))
    with pytest.raises(ValueError, match=r"bias .*\(1, 6\)"):
        noisy_linear(x, w, torch.randn(1, 6, device=device))
    with pytest.raises(ValueError, match=r"bias .*float64"):
        noisy_linear(x, w, torch.randn(6, device=device, dtype=torch.float64))


def test_bad_row_streams_raise(device):
    x = torch.randn(4, 8, device=device)
    w = torch.randn(6, 8, device=device)
    two = [NoiseStream(1, 0.1), NoiseStream(2, 0.2)]
    with pytest.raises(ValueError, match=r"row_streams shape \(5,\) must equal the row shape of x \(4,\)"):
        noisy_linear(x, w, rows=StreamRows(torch.zeros(5, dtype=torch.int32, device=device), two))
    with pytest.raises(ValueError, match=r"row_streams shape \(4,\) must equal .*\(2, 2\)"):
        noisy_linear(x.reshape(2, 2, 8), w,
                     rows=StreamRows(torch.zeros(4, dtype=torch.int32, device=device), two))
    with pytest.raises(ValueError, match="row_streams must be an integer tensor"):
        StreamRows(torch.zeros(4, device=device), two)
    with pytest.raises(ValueError, match="row_streams must be an integer tensor"):
        StreamRows(torch.zeros(4, dtype=torch.bool, device=device), two)
    with pytest.raises(ValueError, match="row_streams must be an integer tensor"):
        StreamRows([0, 1, 2, 0], two)
    with pytest.raises(ValueError, match=r"stream ids in \[0, 3\].*1\.\.2"):
        StreamRows(torch.tensor([0, 1, 3, 2], device=device), two)
    with pytest.raises(ValueError, match=r"stream ids in \[-1, 2\].*1\.\.2"):
        StreamRows(torch.tensor([0, -1, 2, 2], device=device), two)
    with pytest.raises(ValueError, match=r"stream ids in \[0, 1\].*only 0 \(clean\)"):
        StreamRows(torch.tensor([0, 1], device=device), [])
    with pytest.raises(ValueError, match="streams must be NoiseStream"):
        StreamRows(torch.tensor([0, 1], device=device), [(1, 0.1)])


@pytest.mark.parametrize("sigma", [-1.0, float("nan"), float("inf"), -float("inf")])
def test_bad_sigma_raises(sigma):
    with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
        NoiseStream(seed=1, sigma=sigma)


@pytest.mark.parametrize("seed", [-1, 2**64, 1.0, True, "1"])
def test_bad_seed_raises(seed):
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\)"):
        NoiseStream(seed=seed, sigma=0.1)


def test_seed_bounds_accepted():
    NoiseStream(seed=0, sigma=0.0)
    NoiseStream(seed=2**64 - 1, sigma=1.0)


def test_bad_shard_and_key_raise(device):
    x = torch.randn(4, 8, device=device)
    w = torch.randn(6, 8, device=device)
    with pytest.raises(ValueError, match=r"shard columns \[5, 13\) exceed in_features=12"):
        noisy_linear(x, w, col_offset=5, in_features=12)
    with pytest.raises(ValueError, match=r"shard columns \[0, 8\) exceed in_features=7"):
        noisy_linear(x, w, in_features=7)
    with pytest.raises(ValueError, match="offsets must be >= 0"):
        noisy_linear(x, w, row_offset=-1)
    with pytest.raises(ValueError, match="noise addresses are 32-bit"):
        noisy_linear(x, w, row_offset=2**29)
    with pytest.raises(ValueError, match="param_key must be a 32-bit"):
        noisy_linear(x, w, param_key=2**32)
    with pytest.raises(ValueError, match="param_key must be a 32-bit"):
        noisy_linear(x, w, param_key=-1)
    with pytest.raises(ValueError, match=r"in_features must be in \[1, 2\*\*31\)"):
        noisy_linear(torch.randn(2, 0, device=device), torch.randn(3, 0, device=device))


# ---------------------------------------------------------------------------
# 8. Empty batches
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("with_rows", [False, True], ids=["no-rows", "rows"])
def test_zero_rows(device, with_rows):
    w = torch.randn(6, 8, device=device)
    b = torch.randn(6, device=device)
    for shape in [(0, 8), (2, 0, 8)]:
        x = torch.randn(*shape, device=device, requires_grad=True)
        rows = (StreamRows(torch.zeros(shape[:-1], dtype=torch.int32, device=device),
                           [NoiseStream(1, 0.5)]) if with_rows else None)
        y = noisy_linear(x, w, b, rows=rows, param_key=PKEY)
        assert y.shape == (*shape[:-1], 6) and y.dtype == torch.float32
        (gx,) = torch.autograd.grad(y.sum(), (x,))
        assert gx.shape == x.shape


# ---------------------------------------------------------------------------
# Strided inputs and wide stream ids (regressions: a strided bias was read as if
# contiguous; int64 ids were cast to int32 before the range check and wrapped)
# ---------------------------------------------------------------------------

def test_strided_inputs(device):
    gen = torch.Generator().manual_seed(61)
    m, n, k = 5, 6, 12
    x = randn(k, m, gen=gen, device=device).T            # column-major x
    w = randn(n, 2 * k, gen=gen, device=device)[:, 3:3 + k]  # row stride 2k
    b = randn(2 * n, gen=gen, device=device)[::2]         # stride-2 bias
    rows = StreamRows(torch.tensor([0, 1, 0, 1, 1], device=device), [NoiseStream(9, 0.2)])
    kw = dict(rows=rows, param_key=PKEY)
    ref = noisy_linear_reference(x.contiguous(), w.contiguous(), b.contiguous(), **kw)
    torch.testing.assert_close(noisy_linear(x, w, b, **kw), ref, **fp32_tol(k))
    # the split-K path adds the bias separately
    torch.testing.assert_close(noisy_linear(x, w, b, tiles=TileConfig(16, 32, 32, 4, 1, split_k=2), **kw),
                               ref, **fp32_tol(k))


@pytest.mark.parametrize("bad_id", [2**32 + 1, -2**32, 2**31])
def test_int64_stream_ids_out_of_int32_range_raise(device, bad_id):
    with pytest.raises(ValueError, match="stream ids"):
        StreamRows(torch.tensor([0, bad_id, 1], device=device), [NoiseStream(1, 0.5)])


# ---------------------------------------------------------------------------
# 7. GPU: bf16 / fp16 (the interpreter's tl.dot is wrong for them) and fp32 at real sizes
# ---------------------------------------------------------------------------

GPU_SHAPES = [(1, 4864, 896), (8, 896, 4864), (300, 1000, 129)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m,n,k", GPU_SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in GPU_SHAPES])
def test_gpu_half_precision_matches_fp32_reference(m, n, k, dtype):
    """bf16/fp16 GEMM tolerance: W + sigma E is rounded to the input dtype (rel. 2^-9 for
    bf16) before the tensor cores and y is rounded on store, so rtol 2e-2 and atol 2e-2
    times the RMS of the reference output (entries near 0 have only absolute error)."""
    gen = torch.Generator().manual_seed(m + n + k)
    x = randn(m, k, gen=gen, device="cuda", dtype=dtype)
    w = randn(n, k, gen=gen, device="cuda", dtype=dtype, scale=k ** -0.5)
    b = randn(n, gen=gen, device="cuda", dtype=dtype, scale=0.1)
    streams = [NoiseStream(seed=1234, sigma=0.01), NoiseStream(seed=BIG_SEED, sigma=0.003),
               NoiseStream(seed=99, sigma=0.0)]
    ids = torch.randint(0, 4, (m,), generator=gen)
    ids[: min(m, 4)] = torch.arange(4)[:m]
    rows = StreamRows(ids.cuda(), streams)
    y = noisy_linear(x, w, b, rows=rows, param_key=PKEY)
    assert y.dtype == dtype and y.shape == (m, n)
    ref = noisy_linear_reference(x, w, b, rows=rows, param_key=PKEY)  # upcasts the same inputs
    scale = ref.pow(2).mean().sqrt().item()
    torch.testing.assert_close(y.float(), ref, atol=2e-2 * scale, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", GPU_SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in GPU_SHAPES])
def test_gpu_fp32_matches_reference(m, n, k):
    gen = torch.Generator().manual_seed(m * n + k)
    x = randn(m, k, gen=gen, device="cuda")
    w = randn(n, k, gen=gen, device="cuda", scale=k ** -0.5)
    b = randn(n, gen=gen, device="cuda")
    rows = make_rows("mixed", (m,), "cuda", gen)
    y = noisy_linear(x, w, b, rows=rows, param_key=PKEY)
    ref = noisy_linear_reference(x, w, b, rows=rows, param_key=PKEY)
    torch.testing.assert_close(y, ref, **fp32_tol(k))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_half_precision_gradients_mixed_rows(dtype):
    gen = torch.Generator().manual_seed(71)
    m, n, k = 64, 256, 320
    x = randn(m, k, gen=gen, device="cuda", dtype=dtype)
    w = randn(n, k, gen=gen, device="cuda", dtype=dtype, scale=k ** -0.5)
    b = randn(n, gen=gen, device="cuda", dtype=dtype)
    grad_y = randn(m, n, gen=gen, device="cuda", dtype=dtype)
    rows = make_rows("mixed", (m,), "cuda", gen)
    ids = rows.ids.long()
    clean = (ids == 0) | (ids == 3)
    gx, gw, gb = _grads(lambda x, w, b: noisy_linear(x, w, b, rows=rows, param_key=PKEY),
                        x, w, b, grad_y)
    ex, ew, eb = _grads(F.linear, x[clean], w, b, grad_y[clean])
    assert torch.all(gx[~clean] == 0)
    for g, e in ((gx[clean], ex), (gw, ew), (gb, eb)):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), e.float(), atol=2e-2 * e.float().abs().max().item(),
                                   rtol=2e-2)


def test_cpu_without_the_interpreter_runs_the_torch_path():
    # Outside the interpreter noisy_linear takes the torch path on a CPU (same values and
    # gradients); fill_noise has no such path and says so.
    import os
    import subprocess
    import sys
    code = """
import torch
from psnrl.kernels.noise import fill_noise, param_key
from psnrl.kernels.noise_rows import NoiseStream, StreamRows
from psnrl.kernels.noisy_linear import noisy_linear
from psnrl.kernels.noisy_linear_reference import noisy_linear_reference
x = torch.randn(4, 6, requires_grad=True)
w = torch.randn(5, 6, requires_grad=True)
rows = StreamRows(torch.tensor([0, 1, 0, 1]), [NoiseStream(7, 0.5)])
y = noisy_linear(x, w, rows=rows, param_key=param_key("w"))
assert torch.equal(y, noisy_linear_reference(x, w, rows=rows, param_key=param_key("w")))
y.sum().backward()
assert x.grad[1].abs().sum() == 0 and x.grad[3].abs().sum() == 0 and x.grad[0].abs().sum() > 0
torch.testing.assert_close(w.grad, torch.ones(2, 5).t() @ x.detach()[[0, 2]])
try:
    fill_noise(torch.empty(2, 4), 1, 2)
except ValueError as e:
    assert "CUDA tensor" in str(e), e
else:
    raise SystemExit("no error")
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# -- dual_linear: the learner's clean (grad) and noisy (constant) row groups in one call -----------

@pytest.mark.parametrize("m_clean,m_noisy,n,k", [(1, 1, 7, 5), (13, 13, 33, 40), (5, 9, 64, 31)])
@pytest.mark.parametrize("bias", [False, True])
def test_dual_linear_values_and_gradients(m_clean, m_noisy, n, k, bias):
    gen = torch.Generator().manual_seed(m_clean * 100 + n)
    w = randn(n, k, gen=gen, device="cpu", scale=k ** -0.5).requires_grad_()
    b = randn(n, gen=gen, device="cpu").requires_grad_() if bias else None
    xc = randn(m_clean, k, gen=gen, device="cpu").requires_grad_()
    xn = randn(m_noisy, k, gen=gen, device="cpu")
    streams = [NoiseStream(BIG_SEED, 0.05), NoiseStream(3, 0.02)]
    noisy_ids = torch.arange(m_noisy) % 2 + 1
    rows = StreamRows(torch.cat([torch.zeros(m_clean, dtype=torch.long), noisy_ids]), streams)
    yc, yn = dual_linear(xc, xn, w, b, rows=rows, param_key=PKEY)
    assert yc.requires_grad and not yn.requires_grad
    torch.testing.assert_close(yc, F.linear(xc, w, b), **fp32_tol(k))
    expected = noisy_linear_reference(xn, w.detach(), b.detach() if bias else None,
                                      rows=StreamRows(noisy_ids, streams), param_key=PKEY)
    torch.testing.assert_close(yn, expected, **fp32_tol(k))
    g = randn(m_clean, n, gen=gen, device="cpu")
    grads = torch.autograd.grad(yc, [xc, w] + ([b] if bias else []), g)
    ref = torch.autograd.grad(F.linear(xc, w, b), [xc, w] + ([b] if bias else []), g)
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dual_linear_untargeted_layer_and_bad_input():
    gen = torch.Generator().manual_seed(0)
    w = randn(6, 4, gen=gen, device="cpu")
    xc, xn = randn(3, 4, gen=gen, device="cpu"), randn(2, 4, gen=gen, device="cpu")
    yc, yn = dual_linear(xc, xn, w)  # rows=None: both groups see W
    torch.testing.assert_close(yn, F.linear(xn, w))
    with pytest.raises(ValueError, match=r"rows describe \(4,\) rows but the two groups have 3 \+ 2"):
        dual_linear(xc, xn, w, rows=StreamRows.clean(4, "cpu"))
    with pytest.raises(ValueError, match="same number of features"):
        dual_linear(xc, randn(2, 5, gen=gen, device="cpu"), w)


# ---------------------------------------------------------------------------
# Noise made once per call at decode shapes (weight-stationary launches)
# ---------------------------------------------------------------------------

# Row layouts of a batch: stream id per row (0 clean), a function of the row count.
LAYOUTS = {
    "one-noisy": lambda m: [1] * m,
    "clean|noisy": lambda m: [0] * (m // 2) + [1] * (m - m // 2),
    "interleaved": lambda m: [(0, 1, 2)[i % 3] for i in range(m)],
    "sorted-5-streams": lambda m: sorted(i % 5 for i in range(m)),  # as a decode graph lays them out
}


def _coverage(m: int, n: int, k: int, ids: list[int], device, glu: bool = False, tiles=None) -> dict:
    """Run the kernel (interpreter or GPU, fp32) with a counting perturb_tile: how many times
    each (weight key, stream key, row, col) of the weight was perturbed, as a dense count per
    (weight, stream)."""
    from unittest import mock
    import numpy as np
    streams = [NoiseStream(seed=100 + s, sigma=0.01) for s in range(max(ids))]
    rows = StreamRows(torch.tensor(ids, dtype=torch.int32, device=device), streams)
    counts: dict[int, np.ndarray] = {}
    original = noise.perturb_tile

    def counting(w, k1, k2, rows_, col0, in_features, scale2, BC, PAIRED):
        key1 = int(np.asarray(k1.handle.data).reshape(-1)[0])
        c = counts.setdefault(key1, np.zeros((n, k), dtype=np.int64))
        r = np.asarray(rows_.handle.data).reshape(-1)
        c0 = int(np.asarray(col0.handle.data).reshape(-1)[0])
        cols = np.arange(c0, c0 + int(BC))
        c[np.ix_(r[r < n], cols[cols < k])] += 1
        return original(w, k1, k2, rows_, col0, in_features, scale2, BC, PAIRED)

    gen = torch.Generator().manual_seed(0)
    x = randn(m, k, gen=gen, device=device)
    w = randn(n, k, gen=gen, device=device)
    with mock.patch.object(noise, "perturb_tile", counting), torch.no_grad():
        if glu:
            from psnrl.kernels.noisy_linear import noisy_gate_up
            noisy_gate_up(x, w, w.clone(), rows=rows, gate_key=PKEY, up_key=PKEY ^ 1, tiles=tiles)
        else:
            noisy_linear(x, w, rows=rows, param_key=PKEY, tiles=tiles)
    expected = {R.stream_keys(st.seed, key)[0] for st in streams[:max(ids)] if (streams.index(st) + 1) in ids
                for key in ((PKEY, PKEY ^ 1) if glu else (PKEY,))}
    return {"counts": counts, "expected": expected}


@pytest.mark.skipif(not noise.runs_triton(torch.empty(0)), reason="needs the Triton interpreter or a GPU")
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("m,n,k,glu", [(1, 40, 70, False), (1, 40, 600, False), (33, 24, 100, True),
                                       (200, 40, 70, False)],
                         ids=["m1", "m1-split-k", "m33-glu", "m200"])
def test_each_noise_element_is_made_once_per_call(layout, m, n, k, glu):
    """Every weight element's noise is generated exactly once per stream and call, counted on the
    kernel's real launches (split-K and the gated MLP's two weights included)."""
    if layout == "sorted-5-streams" and m < 5:
        pytest.skip("needs five rows")
    ids = LAYOUTS[layout](m)
    if not any(ids):
        pytest.skip("no noisy row")
    got = _coverage(m, n, k, ids, "cuda" if torch.cuda.is_available() else "cpu", glu=glu)
    assert set(got["counts"]) == got["expected"]
    for key, c in got["counts"].items():
        assert (c == 1).all(), (key, int(c.min()), int(c.max()))


@pytest.mark.parametrize("model", ["0.5B", "1.5B", "7B"])
def test_decode_launch_geometry_makes_noise_once_and_fills_the_gpu(model):
    """Host-side launch plan of the engine's MLP matmuls (bf16, an H100's 132 SMs) at every
    decode batch up to 256 rows: one row tile per stream (so each program makes a W element's
    noise once for all rows), K splits that partition K, and at one row enough programs for
    every SM."""
    from psnrl.bench.model_configs import get_config
    cfg = get_config(model)
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    sms = 132
    for m in (1, 2, 8, 16, 17, 32, 64, 100, 128, 200, 256):
        for name, make in LAYOUTS.items():
            ids = make(m)
            streams = [NoiseStream(seed=s, sigma=0.01) for s in range(1, max(ids) + 1)]
            rows = StreamRows(torch.tensor(ids), streams)
            for n, k, glu in ((i, h, True), (h, i, False)):  # gate_up (one GLU kernel), down
                tiles = pick_tiles(m, n, k, torch.bfloat16, sms=sms, glu=glu)
                ranges, slots = (t.tolist() for t in rows.work_tiles(tiles.block_m))
                assert sum(b - a for a, b in ranges) == m
                present = [s for row in slots for s in row if s >= 0]
                assert sorted(present) == sorted(set(ids)), (model, m, name, slots)  # once each
                if len(set(ids)) <= 4 or ids == sorted(ids):
                    assert len(ranges) <= 2 and tiles.block_m >= m / len(ranges)
                k_per_split = -(-(-(-k // tiles.split_k)) // tiles.block_k) * tiles.block_k
                splits = -(-k // k_per_split)
                assert (splits - 1) * k_per_split < k <= splits * k_per_split  # a partition of K
                if m == 1:
                    assert -(-n // tiles.block_n) * splits >= sms, (model, n, k, tiles)


@pytest.mark.parametrize("k", [64, 33], ids=["paired", "unpaired"])
def test_fused_and_materialized_paths_use_bit_identical_weights(device, k):
    """x = I through the fused kernel (M <= 256, the engine's path) gives back W + sigma E exactly
    (fp32, one nonzero product per output); the materializing fill (the learner's path above 256
    rows) writes the same bits, and so does the dispatcher's materialized path at M > 256."""
    gen = torch.Generator().manual_seed(3)
    n = 24
    w = randn(n, k, gen=gen, device=device, scale=0.02)
    stream = NoiseStream(seed=BIG_SEED, sigma=0.004)
    rows = StreamRows(torch.ones(k, dtype=torch.int32, device=device), [stream])
    fused = noisy_linear(torch.eye(k, device=device), w, rows=rows, param_key=PKEY)
    filled = noise.fill_perturbed(torch.empty_like(w), w, stream.seed, PKEY, stream.sigma)
    assert torch.equal(fused.T, filled)
    m = 300  # above FUSED_MAX_ROWS: one scratch weight, then torch.mm
    x = torch.eye(k, device=device).repeat(m // k + 1, 1)[:m]
    big = StreamRows(torch.ones(m, dtype=torch.int32, device=device), [stream])
    assert torch.equal(noisy_linear(x, w, rows=big, param_key=PKEY)[:k].T, filled)
