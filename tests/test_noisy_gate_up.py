"""Tests of psnrl/kernels/noisy_linear.py's noisy_gate_up: a gated MLP's SiLU(gate) * up in one kernel.

The reference is the two noisy linears of the torch reference followed by
``F.silu(gate) * up``; on CPU the kernel runs in the Triton interpreter in fp32
(tolerances as in tests/test_noisy_linear.py: 1e-5 * sqrt(K) on each product,
and SiLU(g) * u is within a few of those of the reference for O(1) inputs).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from psnrl.kernels import noise
from psnrl.kernels.noise_rows import NoiseStream, StreamRows
from psnrl.kernels.noisy_linear import TileConfig, noisy_gate_up, noisy_linear, pick_tiles
from psnrl.kernels.noisy_linear_reference import noisy_gate_up_reference

GATE = noise.param_key("model.layers.0.mlp.gate_proj.weight")
UP = noise.param_key("model.layers.0.mlp.up_proj.weight")


def tol(k: int) -> dict:
    t = 4e-5 * math.sqrt(max(k, 1))
    return dict(atol=t, rtol=t)


def inputs(m: int, n: int, k: int, device, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x, wg, wu = (torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
                 for shape in ((m, k), (n, k), (n, k)))
    return x, wg, wu, gen


def rows_of(kind: str, m: int, device, gen: torch.Generator) -> StreamRows | None:
    if kind == "none":
        return None
    streams = [NoiseStream(1234, 0.05), NoiseStream(2**63 + 5, 0.3), NoiseStream(99, 0.0)]
    if kind == "one":
        return StreamRows(torch.ones(m, dtype=torch.int32, device=device), streams[:1])
    ids = torch.randint(0, 4, (m,), generator=gen)
    ids[: min(m, 4)] = torch.tensor([2, 1, 0, 3])[:m]
    return StreamRows(ids[torch.randperm(m, generator=gen)].to(device), streams)


SHAPES = [(1, 1, 1), (1, 70, 64), (2, 33, 31), (5, 64, 97), (17, 5, 128), (65, 70, 33), (70, 130, 8)]


@pytest.mark.parametrize("kind", ["none", "one", "mixed"])
@pytest.mark.parametrize("m,n,k", SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in SHAPES])
def test_matches_reference(device, m, n, k, kind):
    x, wg, wu, gen = inputs(m, n, k, device, seed=m * 1009 + n * 31 + k)
    rows = rows_of(kind, m, device, gen)
    with torch.no_grad():
        y = noisy_gate_up(x, wg, wu, rows=rows, gate_key=GATE, up_key=UP)
    ref = noisy_gate_up_reference(x, wg, wu, rows=rows, gate_key=GATE, up_key=UP)
    assert y.shape == (m, n) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, **tol(k))
    if kind != "none":  # the noise is there, and each weight gets its own
        swapped = noisy_gate_up_reference(x, wg, wu, rows=rows, gate_key=UP, up_key=GATE)
        assert not torch.allclose(y, swapped, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tiles", [TileConfig(16, 32, 32, 4, 1), TileConfig(32, 64, 16, 4, 1),
                                   TileConfig(16, 32, 16, 4, 1, split_k=3)],
                         ids=["small", "large", "split-k"])
def test_tilings_and_split_k_agree(device, tiles):
    x, wg, wu, gen = inputs(37, 70, 100, device, seed=7)
    rows = rows_of("mixed", 37, device, gen)
    with torch.no_grad():
        y = noisy_gate_up(x, wg, wu, rows=rows, gate_key=GATE, up_key=UP, tiles=tiles)
    torch.testing.assert_close(y, noisy_gate_up_reference(x, wg, wu, rows=rows, gate_key=GATE, up_key=UP),
                               **tol(100))


def test_equals_the_unfused_kernels(device):
    """The same activation as gate and up through noisy_linear, then F.silu(gate) * up."""
    x, wg, wu, gen = inputs(24, 48, 40, device, seed=3)
    rows = rows_of("mixed", 24, device, gen)
    with torch.no_grad():
        fused = noisy_gate_up(x.reshape(4, 6, 40), wg, wu, rows=StreamRows(rows.ids.reshape(4, 6), rows.streams),
                              gate_key=GATE, up_key=UP)
        gate = noisy_linear(x, wg, rows=rows, param_key=GATE)
        up = noisy_linear(x, wu, rows=rows, param_key=UP)
    assert fused.shape == (4, 6, 48)
    torch.testing.assert_close(fused.reshape(24, 48), F.silu(gate) * up, **tol(40))


def test_shard_noise_is_that_of_the_unsharded_weights(device):
    x, wg, wu, gen = inputs(9, 40, 24, device, seed=11)
    rows = rows_of("one", 9, device, gen)
    shard = dict(row_offset=16, col_offset=8, in_features=64)
    with torch.no_grad():
        y = noisy_gate_up(x, wg, wu, rows=rows, gate_key=GATE, up_key=UP, **shard)
    ref = noisy_gate_up_reference(x, wg, wu, rows=rows, gate_key=GATE, up_key=UP, **shard)
    torch.testing.assert_close(y, ref, **tol(24))
    unshifted = noisy_gate_up_reference(x, wg, wu, rows=rows, gate_key=GATE, up_key=UP)
    assert not torch.allclose(y, unshifted, atol=1e-4, rtol=0)


def test_bad_input_raises(device):
    x, wg, wu, _ = inputs(4, 8, 6, device, seed=0)
    with torch.no_grad():
        with pytest.raises(ValueError, match="up weight"):
            noisy_gate_up(x, wg, wu[:, :5], gate_key=GATE, up_key=UP)
        with pytest.raises(ValueError, match="up weight"):
            noisy_gate_up(x, wg, wu.double(), gate_key=GATE, up_key=UP)
        with pytest.raises(ValueError, match="in_features"):
            noisy_gate_up(x[:, :5], wg, wu, gate_key=GATE, up_key=UP)
        with pytest.raises(ValueError, match="param_key"):
            noisy_gate_up(x, wg, wu, gate_key=GATE, up_key=2**40)
    with pytest.raises(ValueError, match="no backward"):
        noisy_gate_up(x, wg.requires_grad_(), wu, gate_key=GATE, up_key=UP)


def test_tiles_keep_the_row_block_and_halve_the_columns():
    for m in (1, 16, 64, 100, 256, 4096):
        plain, glu = (pick_tiles(m, 8960, 1536, torch.bfloat16, sms=132, glu=g) for g in (False, True))
        assert glu.block_m == plain.block_m  # the CUDA-graph tile tables depend on it
        assert 2 * glu.block_n == plain.block_n  # two weights' noise tiles in the registers of one


def test_cpu_without_the_interpreter_runs_the_torch_path():
    code = """
import torch
from psnrl.kernels.noise_rows import NoiseStream, StreamRows
from psnrl.kernels.noisy_linear import noisy_gate_up
from psnrl.kernels.noisy_linear_reference import noisy_gate_up_reference
x, wg, wu = torch.randn(4, 6), torch.randn(5, 6), torch.randn(5, 6)
rows = StreamRows(torch.tensor([0, 1, 0, 1]), [NoiseStream(7, 0.5)])
with torch.no_grad():
    y = noisy_gate_up(x, wg, wu, rows=rows, gate_key=1, up_key=2)
assert torch.equal(y, noisy_gate_up_reference(x, wg, wu, rows=rows, gate_key=1, up_key=2))
h = noisy_gate_up(x.bfloat16(), wg.bfloat16(), wu.bfloat16(), rows=rows, gate_key=1, up_key=2)
assert h.dtype == torch.bfloat16
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 16, 64, 200, 1024])
def test_gpu_half_precision_matches_the_unfused_path(m, dtype):
    """Rounded like F.silu(gate) * up on the rounded linears: within one ulp of the input
    dtype of the unfused kernels (their sums may differ in the last bit), and close to fp32."""
    n, k = 1000, 896
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).to("cuda", dtype)
    wg, wu = (torch.randn(n, k, generator=gen).mul(k ** -0.5).to("cuda", dtype) for _ in range(2))
    ids = torch.randint(0, 3, (m,), generator=gen)
    rows = StreamRows(ids.cuda(), [NoiseStream(1234, 0.01), NoiseStream(2**63 + 5, 0.003)])
    with torch.inference_mode():
        fused = noisy_gate_up(x, wg, wu, rows=rows, gate_key=GATE, up_key=UP)
        unfused = F.silu(noisy_linear(x, wg, rows=rows, param_key=GATE)) * noisy_linear(
            x, wu, rows=rows, param_key=UP)
    assert fused.dtype == dtype
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    torch.testing.assert_close(fused.float(), unfused.float(), rtol=2 * ulp, atol=1e-3)
    ref = noisy_gate_up_reference(x, wg, wu, rows=rows, gate_key=GATE, up_key=UP)
    scale = ref.pow(2).mean().sqrt().item()
    torch.testing.assert_close(fused.float(), ref, atol=3e-2 * scale, rtol=3e-2)
