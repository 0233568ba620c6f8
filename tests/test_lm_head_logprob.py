"""Tests of psnrl/kernels/lm_head_logprob.py: fused lm_head log-prob, entropy and self-certainty.

Without a GPU the Triton kernels run in the interpreter (tests/conftest.py) in fp32
only (its ``tl.dot`` is wrong on bf16), on small shapes (it is slow); bf16 and real
sizes are ``gpu`` tests. The torch path (a CPU outside the interpreter) is reached by
patching ``psnrl.kernels.noise.runs_triton``.

fp32 tolerance: the logits are dot products over H summed in another order than
torch's (error ~ eps * sqrt(H) * |z|, |z| a few units here); logsumexp, entropy and
the gradients add a few ulp of that. 2e-6 * sqrt(H) for atol and rtol: the largest error
measured (kernels in the interpreter and the torch path) used 41% of it.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from psnrl.bench import lm_head_logprob as bench
from psnrl.kernels import lm_head_logprob as K
from psnrl.kernels import noise
from psnrl.kernels.lm_head_logprob import LogprobTiles, lm_head_logprob, vocab_chunk
from psnrl.kernels.lm_head_logprob_reference import lm_head_logprob_reference

ROOT = Path(__file__).resolve().parents[1]


def fp32_tol(h: int) -> dict:
    t = 2e-6 * math.sqrt(max(h, 1))
    return dict(atol=t, rtol=t)


def problem(t: int, v: int, h: int, *, device, seed: int, bias: bool = True, dtype=torch.float32,
            scale: float = 1.0):
    """hidden, weight, bias, targets, and per-token weights of the three outputs in a loss."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * (scale / math.sqrt(h))
    b = torch.randn(v, generator=gen) * 0.5 if bias else None
    targets = torch.randint(0, v, (t,), generator=gen)
    mix = torch.randn(3, t, generator=gen)
    to = dict(device=device, dtype=dtype)
    return (hidden.to(**to), weight.to(**to), None if b is None else b.to(**to),
            targets.to(device), mix.to(device))


def outputs_and_grads(fn, hidden, weight, bias, targets, mix):
    """The three outputs and the gradients of sum(mix[0] lp + mix[1] entropy + mix[2] sc)."""
    leaves = [x.detach().requires_grad_() for x in (hidden, weight) + ((bias,) if bias is not None else ())]
    outs = fn(leaves[0], leaves[1], targets, leaves[2] if bias is not None else None)
    loss = sum((m * o).sum() for m, o in zip(mix, outs))
    grads = torch.autograd.grad(loss, leaves)
    return [o.detach() for o in outs], list(grads)


def assert_matches_reference(hidden, weight, bias, targets, mix, tol, **kw):
    got, got_g = outputs_and_grads(lambda *a: lm_head_logprob(*a, **kw), hidden, weight, bias, targets, mix)
    exp, exp_g = outputs_and_grads(lm_head_logprob_reference, hidden, weight, bias, targets, mix)
    for name, g, e in zip(("logprob", "entropy", "self_certainty"), got, exp):
        assert g.dtype == torch.float32 and g.shape == (hidden.shape[0],), name
        torch.testing.assert_close(g, e, **tol, msg=lambda m: f"{name}: {m}")
    for name, g, e, x in zip(("hidden", "weight", "bias"), got_g, exp_g, (hidden, weight, bias)):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        torch.testing.assert_close(g.float(), e.float(), **tol, msg=lambda m: f"grad {name}: {m}")


# ---------------------------------------------------------------------------
# 1. Triton kernels (interpreter, fp32) against full log_softmax
# ---------------------------------------------------------------------------

# fp32 tiles: 16 or 32 tokens x 32 vocabulary x 32 hidden. T = 1, T not a multiple of
# the token block; V = 1, V < the vocabulary tile, V not a multiple of it; H = 1, H not
# a power of two, H > the hidden tile.
SHAPES = [(1, 1, 5), (1, 200, 48), (17, 31, 1), (37, 300, 100), (33, 65, 7), (16, 32, 32)]


@pytest.mark.parametrize("t,v,h", SHAPES, ids=[f"{t}x{v}x{h}" for t, v, h in SHAPES])
def test_triton_matches_reference(device, t, v, h):
    args = problem(t, v, h, device=device, seed=t * 1000 + v + h, bias=(t + v) % 2 == 0, scale=3.0)
    assert_matches_reference(*args, fp32_tol(h))


@pytest.mark.parametrize("tiles", [LogprobTiles(16, 32, 32, 4, 1, splits=1),
                                   LogprobTiles(16, 32, 16, 4, 1, splits=3)],
                         ids=["one-split", "three-splits"])
def test_triton_vocab_splits_and_backward_chunks(device, tiles):
    """One program streaming every vocabulary tile (online rescaling across 10 tiles) and
    three splits combined by torch; a small chunk_bytes gives three backward chunks
    (128, 128, 44 entries)."""
    args = problem(20, 300, 40, device=device, seed=7, scale=4.0)
    assert_matches_reference(*args, fp32_tol(40), tiles=tiles, chunk_bytes=20 * 128 * 4)


def test_extreme_logits(device):
    """Peaked distributions (target log-probs near -100), logits all far below 0 (a masked
    column must not count as a logit of 0), and the maximum in the last vocabulary tile."""
    hidden, weight, bias, targets, mix = problem(9, 100, 24, device=device, seed=3, scale=40.0)
    bias = torch.full_like(bias, -200.0)
    bias[97] = -150.0  # in the last, partial tile of 32
    got, exp = lm_head_logprob(hidden, weight, targets, bias), lm_head_logprob_reference(
        hidden, weight, targets, bias)
    assert got[0].min() < -30
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, atol=2e-4, rtol=1e-5)  # |z| ~ 200: eps * 200 * few
    assert_matches_reference(hidden, weight, bias, targets, mix, dict(atol=2e-4, rtol=1e-4))


def test_zero_tokens(device):
    hidden = torch.zeros(0, 8, device=device, requires_grad=True)
    weight = torch.randn(5, 8, device=device, requires_grad=True)
    outs = lm_head_logprob(hidden, weight, torch.zeros(0, dtype=torch.long, device=device))
    assert all(o.shape == (0,) and o.dtype == torch.float32 for o in outs)
    gh, gw = torch.autograd.grad(sum(o.sum() for o in outs), (hidden, weight), allow_unused=True)
    assert gh.shape == (0, 8) and torch.all(gw == 0)


@pytest.mark.parametrize("wrt", ["hidden", "weight"])
def test_gradient_wrt_one_input(device, wrt):
    hidden, weight, bias, targets, mix = problem(10, 70, 20, device=device, seed=5)
    x = (hidden if wrt == "hidden" else weight).clone().requires_grad_()
    args = (x, weight) if wrt == "hidden" else (hidden, x)
    loss = lambda outs: (mix[0] * outs[0] + mix[1] * outs[1]).sum()  # noqa: E731
    (got,) = torch.autograd.grad(loss(lm_head_logprob(*args, targets, bias)), (x,))
    (exp,) = torch.autograd.grad(loss(lm_head_logprob_reference(*args, targets, bias)), (x,))
    torch.testing.assert_close(got, exp, **fp32_tol(20))


def test_backward_chunks_are_bounded(device, monkeypatch):
    """The backward never makes a gradient chunk larger than chunk_bytes (here 3 chunks)."""
    shapes = []
    real = K._triton_grad_logits

    def spy(*a, **kw):
        g = real(*a, **kw)
        shapes.append(tuple(g.shape))
        return g

    monkeypatch.setattr(K, "_triton_grad_logits", spy)
    hidden, weight, bias, targets, _ = problem(8, 300, 16, device=device, seed=9)
    weight.requires_grad_()
    lp, _, _ = lm_head_logprob(hidden, weight, targets, bias, chunk_bytes=8 * 128 * 4)
    lp.sum().backward()
    assert shapes == [(8, 128), (8, 128), (8, 44)]


def test_vocab_chunk_sizes():
    assert vocab_chunk(8192, 151936, 2, 256 << 20) == 16384
    assert vocab_chunk(16384, 151936, 2, 256 << 20) == 8192
    assert vocab_chunk(3, 100, 4, 256 << 20) == 100          # whole vocabulary
    assert vocab_chunk(10**6, 151936, 2, 1 << 20) == 128      # never below the alignment
    assert vocab_chunk(0, 50, 4, 1) == 50


# ---------------------------------------------------------------------------
# 2. The torch path (a CPU outside the interpreter)
# ---------------------------------------------------------------------------

@pytest.fixture
def torch_path(monkeypatch):
    monkeypatch.setattr(noise, "runs_triton", lambda t: False)


@pytest.mark.parametrize("t,v,h", SHAPES, ids=[f"{t}x{v}x{h}" for t, v, h in SHAPES])
@pytest.mark.parametrize("chunk_bytes", [1 << 30, 1], ids=["one-chunk", "128-entry-chunks"])
def test_torch_path_matches_reference(torch_path, t, v, h, chunk_bytes):
    args = problem(t, v, h, device="cpu", seed=t + v * 7 + h, bias=(t + v) % 2 == 1, scale=3.0)
    assert_matches_reference(*args, fp32_tol(h), chunk_bytes=chunk_bytes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_torch_path_half_precision(torch_path, dtype):
    """Half-precision inputs are upcast, as in the reference: fp32-tight outputs, gradients
    in the input dtype (rounded once)."""
    args = problem(30, 300, 40, device="cpu", seed=11, dtype=dtype, scale=3.0)
    got, got_g = outputs_and_grads(lambda *a: lm_head_logprob(*a, chunk_bytes=1), *args)
    exp, exp_g = outputs_and_grads(lm_head_logprob_reference, *args)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, **fp32_tol(40))
    for g, e in zip(got_g, exp_g):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), e.float(), atol=1e-2 * e.abs().max().item(), rtol=1e-2)


def test_cpu_without_the_interpreter_runs_the_torch_path():
    code = """
import torch
from psnrl.kernels.lm_head_logprob import lm_head_logprob
from psnrl.kernels.lm_head_logprob_reference import lm_head_logprob_reference
h = torch.randn(6, 10, requires_grad=True)
w = torch.randn(300, 10, requires_grad=True)
t = torch.tensor([0, 299, 5, 128, 127, 3])
got = lm_head_logprob(h, w, t, chunk_bytes=1)
for g, e in zip(got, lm_head_logprob_reference(h, w, t)):
    torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
sum(o.sum() for o in got).backward()
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ---------------------------------------------------------------------------
# 3. Bad input
# ---------------------------------------------------------------------------

def test_bad_input_raises(device):
    h = torch.randn(4, 8, device=device)
    w = torch.randn(6, 8, device=device)
    t = torch.tensor([0, 1, 5, 2], device=device)
    with pytest.raises(ValueError, match=r"hidden must be a 2-D tensor.*\(4, 8, 1\)"):
        lm_head_logprob(h[..., None], w, t)
    with pytest.raises(ValueError, match=r"weight must be \[vocab, 8\].*\(6, 9\)"):
        lm_head_logprob(h, torch.randn(6, 9, device=device), t)
    with pytest.raises(ValueError, match=r"vocab >= 1"):
        lm_head_logprob(h, torch.randn(0, 8, device=device), t)
    with pytest.raises(ValueError, match="supports.*float64"):
        lm_head_logprob(h.double(), w.double(), t)
    with pytest.raises(ValueError, match="must share dtype and device"):
        lm_head_logprob(h, w.half(), t)
    with pytest.raises(ValueError, match="must share dtype and device"):
        lm_head_logprob(h, w.to("meta"), t)
    with pytest.raises(ValueError, match=r"bias .*\(5,\).*must be \[6\]"):
        lm_head_logprob(h, w, t, torch.randn(5, device=device))
    with pytest.raises(ValueError, match=r"bias .*float16"):
        lm_head_logprob(h, w, t, torch.randn(6, device=device).half())
    with pytest.raises(ValueError, match="targets must be an integer tensor"):
        lm_head_logprob(h, w, t.float())
    with pytest.raises(ValueError, match="targets must be an integer tensor"):
        lm_head_logprob(h, w, [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"targets .*\(3,\).*must be \[4\]"):
        lm_head_logprob(h, w, t[:3])
    with pytest.raises(ValueError, match=r"token ids in \[0, 6\], outside the vocabulary \[0, 6\)"):
        lm_head_logprob(h, w, torch.tensor([0, 6, 1, 1], device=device))
    with pytest.raises(ValueError, match=r"token ids in \[-1, 5\]"):
        lm_head_logprob(h, w, torch.tensor([-1, 5, 1, 1], device=device))
    with pytest.raises(ValueError, match="chunk_bytes must be a positive int"):
        lm_head_logprob(h, w, t, chunk_bytes=0)


# ---------------------------------------------------------------------------
# 4. The benchmark's CPU-side parts
# ---------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_bench_without_cuda_returns_2_with_message(capsys):
    assert bench.main([]) == 2
    assert bench.NO_CUDA_MESSAGE in capsys.readouterr().err


def test_bench_results_files(tmp_path):
    meta = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.13.0", "triton": "3.6.0", "dtype": "bf16",
            "method": "CUDA events"}
    rows = [bench.build_row(8192, 151936, 1536, {"ours": 50.0, "naive": 40.0},
                            {"ours": 300 << 20, "naive": 20 << 30}, {"logprob": 1e-3, "entropy": 2e-3},
                            grad_bytes=(8192 + 151936) * 1536 * 2),
            bench.build_row(16384, 151936, 1536, {"ours": 90.0}, {"ours": 400 << 20}, {},
                            errors={"naive": "OutOfMemoryError: CUDA out of memory"})]
    assert rows[0]["ours_over_naive_time"] == 1.25
    assert rows[0]["naive_over_ours_memory"] == pytest.approx(20 * 1024 / 300, abs=0.01)
    json_path, md_path = bench.FILES.write(tmp_path, meta, rows)
    assert json_path.name == "lm_head_logprob-nvidia-h100-80gb-hbm3.json"
    doc = json.loads(json_path.read_text())
    assert doc["device"] == meta["device"] and len(doc["rows"]) == 2
    md = md_path.read_text()
    assert "| 8192 | 151936 | 1536 | 50.00 | 40.00 | 300.0 | 20,480.0 | 469.1 | 1.250 | 68.3 | 1.00e-03 | 2.00e-03 |" in md  # noqa: E501
    assert "| 16384 | 151936 | 1536 | 90.00 | — |" in md
    assert "T=16384 H=1536 naive: OutOfMemoryError: CUDA out of memory" in md


# ---------------------------------------------------------------------------
# 5. GPU: bf16 / fp16 (the interpreter's tl.dot is wrong for them), real sizes, memory
# ---------------------------------------------------------------------------

GPU_SHAPES = [(300, 5000, 256), (1, 151936, 896), (1000, 1000, 129)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("t,v,h", GPU_SHAPES, ids=[f"{t}x{v}x{h}" for t, v, h in GPU_SHAPES])
def test_gpu_half_precision_matches_fp32_reference(t, v, h, dtype):
    """Logits are exact products of the half inputs summed in fp32, so the outputs are
    fp32-close to the reference on the same (upcast) inputs; the gradient wrt the logits is
    rounded to the input dtype before cuBLAS, and the gradients are returned in it."""
    args = problem(t, v, h, device="cuda", seed=t + v + h, dtype=dtype, scale=3.0)
    got, got_g = outputs_and_grads(lm_head_logprob, *args)
    exp, exp_g = outputs_and_grads(lm_head_logprob_reference, *args)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, atol=1e-4 * math.sqrt(h), rtol=1e-4)
    for g, e in zip(got_g, exp_g):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), e.float(), atol=2e-2 * e.abs().max().item(), rtol=2e-2)


@pytest.mark.gpu
def test_gpu_fp32_matches_reference():
    args = problem(300, 5000, 256, device="cuda", seed=1, scale=3.0)
    assert_matches_reference(*args, dict(atol=1e-4, rtol=1e-4))


@pytest.mark.gpu
def test_gpu_peak_memory_is_a_fraction_of_the_logits():
    t, v, h = 4096, 65536, 256
    hidden, weight, bias, targets, mix = problem(t, v, h, device="cuda", seed=2, dtype=torch.bfloat16)
    hidden.requires_grad_()
    weight.requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    outs = lm_head_logprob(hidden, weight, targets, chunk_bytes=64 << 20)
    grads = torch.autograd.grad(sum((m * o).sum() for m, o in zip(mix, outs)), (hidden, weight))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - sum(g.numel() * g.element_size() for g in grads)
    assert extra < t * v * 2 // 4, extra  # bf16 logits alone would be t * v * 2 bytes
