"""The fused sampling kernel (psnrl/kernels/sampler.py) against the engine's torch sampler.

The oracle is ``mask_stop_tokens`` then ``sample`` of psnrl/engine/sampling.py, run on the
same device. Tokens and bad flags must be equal and log-probs within 1e-5. On a CPU the
kernel runs in the Triton interpreter (fp32); every seed is fixed, so every test is
deterministic. The torch sampler's own statistical tests (tests/test_sampling.py) cover
the kernel through this exact agreement.
"""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from psnrl.engine import sampling as S
from psnrl.kernels import sampler as K

NEG_INF = float("-inf")
TEMPS = (0.0, 0.3, 1.0, 1.7)
TOP_PS = (0.1, 0.9, 1.0)


def reference(logits, seeds, steps, temps, top_p, top_k, stop_ids, mask_stops, mode):
    """The engine's path: stop tokens masked while step < min_tokens, then ``sample``."""
    x = logits.clone()
    if stop_ids is not None:
        min_tokens = torch.where(mask_stops, steps + 1, steps)
        S.mask_stop_tokens(x, stop_ids.long(), steps, min_tokens)
    return S.sample(x, temps, top_p, top_k, seeds, steps, logprobs_mode=mode)


def check(logits, seeds, steps, temps, top_p, top_k, stop_ids=None, mask_stops=None, mode="sampled",
          block=None):
    ref = reference(logits, seeds, steps, temps, top_p, top_k, stop_ids, mask_stops, mode)
    tok, lp, bad = K.sample_rows(logits, seeds, steps, temps, top_p, top_k, stop_ids=stop_ids,
                                 mask_stops=mask_stops, logprobs_mode=mode, block=block)
    assert torch.equal(bad, ref.bad_rows)
    assert torch.equal(tok, ref.tokens), (tok, ref.tokens)
    assert torch.equal(lp.isnan(), bad)
    torch.testing.assert_close(lp, ref.logprobs, rtol=0, atol=1e-5, equal_nan=True)
    return tok, lp, bad


def mixed_batch(b: int, v: int, device: str, seed: int):
    """Rows that cycle through greedy / temperatures / top-k / top-p / stop masking, with
    ties (a coarse grid of logits) and -inf entries in some rows."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, v, generator=g) * 2.5
    for r in range(b):
        if r % 4 == 1:
            logits[r] = (logits[r] * 2).round() / 2  # many exact ties
        if r % 5 == 2:
            logits[r, torch.rand(v, generator=g) < 0.3] = NEG_INF
            logits[r, 0] = 1.0  # keep a finite entry
    top_ks = (-1, 1, 7, v, v + 5)
    temps = torch.tensor([TEMPS[(r + seed) % 4] for r in range(b)])
    top_p = torch.tensor([TOP_PS[(r // 2 + seed) % 3] for r in range(b)])
    top_k = torch.tensor([top_ks[(r * 3 + seed) % 5] for r in range(b)], dtype=torch.int32)
    seeds = torch.randint(0, 2**63 - 1, (b,), generator=g, dtype=torch.int64)
    steps = torch.randint(0, 2**32 - 1, (b,), generator=g, dtype=torch.int64)
    stop_ids = torch.randint(0, v, (b, 3), generator=g, dtype=torch.int32)
    stop_ids[::3, 2] = -1  # padding
    mask_stops = torch.arange(b) % 2 == 0
    return [t.to(device) for t in (logits, seeds, steps, temps, top_p, top_k, stop_ids, mask_stops)]


@pytest.mark.parametrize("b,v", [(1, 1), (3, 5), (17, 5), (17, 129), (1, 1000), (17, 1000), (1, 4099), (17, 4099)])
@pytest.mark.parametrize("mode", ["sampled", "raw"])
def test_mixed_rows_match_torch_sampler(b, v, mode, device):
    check(*mixed_batch(b, v, device, seed=b * 7919 + v), mode=mode)


@pytest.mark.parametrize("v", [5, 1000])
def test_every_filter_combination_on_one_row(v, device):
    """Each (T, top-k, top-p) of the grid on the same logits, with and without stop masking."""
    combos = [(t, k, p) for t in TEMPS[1:] for k in (-1, 1, 7, v, v + 5) for p in TOP_PS]
    b = len(combos)
    g = torch.Generator().manual_seed(v)
    logits = (torch.randn(1, v, generator=g) * 3).expand(b, v).contiguous()
    temps = torch.tensor([c[0] for c in combos])
    top_k = torch.tensor([c[1] for c in combos], dtype=torch.int64)
    top_p = torch.tensor([c[2] for c in combos])
    seeds = torch.full((b,), 12345, dtype=torch.int64)
    steps = torch.arange(b, dtype=torch.int64)
    stop_ids = torch.tensor([[int(logits[0].argmax()), -1]] * b, dtype=torch.int32)
    mask_stops = torch.arange(b) % 2 == 1
    args = [t.to(device) for t in (logits, seeds, steps, temps, top_p, top_k, stop_ids, mask_stops)]
    check(*args)
    check(*args[:6], mode="raw")


def test_block_size_does_not_change_the_draw(device):
    """A vocabulary spread over many blocks (and a ragged last one) draws the same tokens."""
    args = mixed_batch(6, 1000, device, seed=3)
    a = check(*args, block=64)
    b = check(*args, block=1024)
    assert torch.equal(a[0], b[0])


def test_bad_rows(device):
    v = 9
    logits = torch.randn(7, v)
    logits[0, 3] = float("nan")
    logits[1, 8] = float("inf")
    logits[2] = NEG_INF
    logits[3, 4] = float("nan")  # a masked stop token: -inf before the check, not bad
    logits[4, 1:] = NEG_INF  # only a masked stop token is finite: bad
    logits[5, 2] = float("-inf")
    logits[6, 0] = float("nan")  # NaN at the stop id of a row that masks nothing this step
    stop_ids = S.pad_stop_ids([[], [], [], [4], [0], [], [0]])  # int64, as the engine pads them
    mask_stops = torch.tensor([False, False, False, True, True, False, False])
    b = logits.shape[0]
    args = [t.to(device) for t in (
        logits, torch.arange(b, dtype=torch.int64), torch.zeros(b, dtype=torch.int64),
        torch.tensor([1.0, 0.0, 1.0, 0.0, 0.7, 1.0, 1.0]), torch.tensor([0.9] * b),
        torch.tensor([3] * b, dtype=torch.int32), stop_ids, mask_stops)]
    tok, lp, bad = check(*args)
    assert bad.tolist() == [True, True, True, False, True, False, True]
    assert tok[bad].eq(-1).all() and lp[bad].isnan().all()
    assert tok[3] != 4


def test_ties_first_index_and_support(device):
    """All-equal logits: greedy takes index 0, top-k keeps every tie (the support can exceed
    k), and a tiny top-p still keeps all the tokens tied with the top one."""
    v = 129
    logits = torch.zeros(6, v)
    logits[3:, 100:] = -1.0
    b = logits.shape[0]
    args = [t.to(device) for t in (
        logits, torch.arange(b, dtype=torch.int64) + 2**62, torch.full((b,), 7, dtype=torch.int64),
        torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 1.7]), torch.tensor([1.0, 1.0, 0.1, 1.0, 1.0, 0.1]),
        torch.tensor([-1, 7, -1, -1, 7, 3], dtype=torch.int32))]
    for block in (None, 32):  # one block, and ties across blocks
        for mode in ("sampled", "raw"):
            tok, _, _ = check(*args, mode=mode, block=block)
            assert tok[0] == 0 and tok[3] == 0


def test_extreme_seeds_and_steps(device):
    """Seeds at the top of [0, 2**63) and steps at the top of the 32-bit counter (and past it:
    the step is taken mod 2**32)."""
    seeds = torch.tensor([2**63 - 1, 2**63 - 2, 0, 2**32 - 1, 2**32, 2**63 - 1], dtype=torch.int64)
    steps = torch.tensor([2**32 - 1, 2**32 - 2, 2**32 - 1, 0, 2**32 + 5, 2**40 + 1], dtype=torch.int64)
    b, v = len(seeds), 257
    logits = torch.randn(b, v, generator=torch.Generator().manual_seed(0))
    args = [t.to(device) for t in (logits, seeds, steps, torch.ones(b), torch.ones(b),
                                   torch.full((b,), -1, dtype=torch.int32))]
    check(*args)
    args[3] = torch.full((b,), 0.3, device=device)  # with a filter
    args[5] = torch.full((b,), 11, dtype=torch.int32, device=device)
    check(*args)


def test_tiny_temperature_and_huge_logits(device):
    """z overflows to -inf for tiny T (those tokens drop out), and logits of 1e30 stay finite."""
    v = 64
    logits = torch.randn(4, v, generator=torch.Generator().manual_seed(1))
    logits[2:] *= 1e30
    args = [t.to(device) for t in (
        logits, torch.arange(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64),
        torch.tensor([1e-30, 1e-30, 1.0, 0.5]), torch.tensor([1.0, 0.9, 0.9, 1.0]),
        torch.tensor([-1, 5, -1, 3], dtype=torch.int32))]
    check(*args)


def test_writes_into_given_buffers(device):
    args = mixed_batch(3, 129, device, seed=5)
    out = (torch.full((3,), 9, dtype=torch.int64, device=device), torch.zeros(3, device=device),
           torch.ones(3, dtype=torch.bool, device=device))
    tok, lp, bad = K.sample_rows(*args[:6], stop_ids=args[6], mask_stops=args[7], out=out)
    assert tok is out[0] and lp is out[1] and bad is out[2]
    ref = reference(*args, mode="sampled")
    assert torch.equal(tok, ref.tokens) and torch.equal(bad, ref.bad_rows)


@triton.jit
def _gumbel_kernel(out_ptr, seed_ptr, step_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(seed_ptr)
    k1, k2 = K.stream_keys((seed & 0xFFFFFFFF).to(tl.uint32), (seed >> 32).to(tl.uint32),
                           tl.load(step_ptr).to(tl.uint32) ^ K.STEP_SALT)
    tl.store(out_ptr + offs, K._gumbel(offs.to(tl.uint32), k1, k2), mask=offs < N)


@pytest.mark.parametrize("seed,step", [(0, 0), (2**63 - 1, 2**32 - 1)])
def test_gumbel_noise_is_the_engines(seed, step, device):
    """The race noise -log E of 2**20 vocab ids, the tails included (u near 1 needs log1p).
    On the GPU it is bit-identical (libdevice); the interpreter's logs are correctly rounded
    and torch's CPU ones within an ulp, hence the tolerance there."""
    n, block = 1 << 20, (1 << 16 if device == "cpu" else 1024)  # the interpreter: few big blocks
    seeds = torch.tensor([seed], dtype=torch.int64, device=device)
    steps = torch.tensor([step], dtype=torch.int64, device=device)
    got = torch.empty(n, device=device)
    _gumbel_kernel[(n // block,)](got, seeds, steps, n, BLOCK=block)
    want = S._neg_log_exponentials(seeds, steps, n)[0]
    if device == "cuda":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=2.5e-7, atol=2.5e-7)


def test_step_salt_is_the_engines():
    assert K.STEP_SALT.value == S.STEP_SALT


def test_rejects_bad_arguments(device):
    logits, seeds, steps, temps, top_p, top_k, stop_ids, mask_stops = mixed_batch(3, 5, device, seed=0)
    with pytest.raises(ValueError, match="logprobs_mode"):
        K.sample_rows(logits, seeds, steps, temps, top_p, top_k, logprobs_mode="greedy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seeds"):
        K.sample_rows(logits, seeds.int(), steps, temps, top_p, top_k)
    with pytest.raises(ValueError, match="top_p"):
        K.sample_rows(logits, seeds, steps, temps, top_p[:2], top_k)
    with pytest.raises(ValueError, match="go together"):
        K.sample_rows(logits, seeds, steps, temps, top_p, top_k, stop_ids=stop_ids)
    with pytest.raises(ValueError, match="logits"):
        K.sample_rows(logits.t(), seeds, steps, temps, top_p, top_k)


@pytest.mark.gpu
def test_gpu_vocab_scale_and_cuda_graph():
    """A real vocabulary on the GPU: the same tokens as torch CUDA's sampler (libdevice logf
    and log1pf are the CUDA math functions torch calls), and a CUDA graph replay of the
    kernel with new inputs gives what an eager call gives."""
    b, v = 48, 151936
    args = mixed_batch(b, v, "cuda", seed=11)
    check(*args)
    check(*args, mode="raw")
    static = [a.clone() for a in args]
    out = (torch.empty(b, dtype=torch.int64, device="cuda"), torch.empty(b, device="cuda"),
           torch.empty(b, dtype=torch.bool, device="cuda"))
    K.sample_rows(*static[:6], stop_ids=static[6], mask_stops=static[7], out=out)  # compile first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        K.sample_rows(*static[:6], stop_ids=static[6], mask_stops=static[7], out=out)
    fresh = mixed_batch(b, v, "cuda", seed=12)
    for s, f in zip(static, fresh):
        s.copy_(f)
    graph.replay()
    ref = reference(*fresh, mode="sampled")
    assert torch.equal(out[0], ref.tokens) and torch.equal(out[2], ref.bad_rows)
