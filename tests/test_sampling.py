"""Tests of the token sampler (psnrl/engine/sampling.py).

Every seed is fixed, so every test is deterministic. Statistical bounds are derived
from the sample size and stated next to each check. Reference computations are plain
per-row float64 loops, written independently of the vectorized sampler.
"""
from __future__ import annotations

import math

import pytest
import torch

from psnrl.engine import sampling as S
from psnrl.engine.sampling import SampleOutput, SamplingParams, check_stop
from psnrl.kernels import noise_reference as R

NEG_INF = float("-inf")


def run(logits, temps, top_p=None, top_k=None, seeds=None, steps=None, mode="sampled") -> SampleOutput:
    b = logits.shape[0]
    temps = torch.as_tensor(temps, dtype=torch.float32).expand(b).contiguous()
    top_p = torch.ones(b) if top_p is None else torch.as_tensor(top_p, dtype=torch.float32).expand(b).contiguous()
    top_k = torch.full((b,), -1) if top_k is None else torch.as_tensor(top_k, dtype=torch.int64).expand(b).contiguous()
    seeds = torch.arange(b, dtype=torch.int64) if seeds is None else torch.as_tensor(seeds, dtype=torch.int64)
    steps = torch.zeros(b, dtype=torch.int64) if steps is None else torch.as_tensor(steps, dtype=torch.int64)
    return S.sample(logits, temps, top_p, top_k, seeds, steps, logprobs_mode=mode)


def reference_dist(logits_row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Float64 q over the vocab: softmax(logits / T), top-k, then the smallest nucleus of mass >= p."""
    x = logits_row.double() / temperature
    probs = torch.softmax(x, dim=0)
    order = sorted(range(len(probs)), key=lambda i: -float(x[i]))
    kept = order if top_k == -1 else order[:top_k]
    mass = sum(float(probs[i]) for i in kept)
    nucleus, acc = [], 0.0
    for i in kept:
        if acc >= top_p * mass and nucleus:
            break
        nucleus.append(i)
        acc += float(probs[i])
    q = torch.zeros_like(probs)
    for i in nucleus:
        q[i] = probs[i]
    return q / q.sum()


# ----------------------------------------------------------------------------- params


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("n", 1.5), ("temperature", -0.1), ("temperature", float("nan")),
    ("temperature", float("inf")), ("top_p", 0.0), ("top_p", 1.01), ("top_p", float("nan")),
    ("top_k", 0), ("top_k", -2), ("max_tokens", 0), ("min_tokens", -1), ("min_tokens", 300),
    ("seed", -1), ("seed", 2 ** 63), ("stop", ("ok", "")), ("stop_token_ids", (3, -1)),
    ("ignore_eos", 1),
])
def test_params_validation_names_field_and_value(field, value):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value)


def test_params_accept_lists_and_edges():
    p = SamplingParams(n=8, temperature=0, top_p=1, top_k=1, max_tokens=5, min_tokens=5,
                       seed=2 ** 63 - 1, stop=["</s>", "\n\n"], stop_token_ids=[7, 9])
    assert p.stop == ("</s>", "\n\n") and p.stop_token_ids == (7, 9)
    assert isinstance(p.temperature, float) and p.greedy
    hash(p)  # frozen and hashable once lists became tuples
    assert SamplingParams(stop="x").stop == ("x",)
    assert SamplingParams(ignore_eos=True, stop_token_ids=[3]).all_stop_token_ids(2) == (3,)
    assert SamplingParams(stop_token_ids=[3]).all_stop_token_ids([2, 3]) == (3, 2)


# ----------------------------------------------------------------------------- greedy and filters


def test_greedy_is_argmax_with_raw_logprob():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 100, generator=g) * 3
    out = run(logits, 0.0)
    assert torch.equal(out.tokens, logits.argmax(-1))
    ref = torch.log_softmax(logits.double(), -1).gather(1, out.tokens[:, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs.double(), ref, atol=1e-5, rtol=0)
    assert not out.bad_rows.any()


@pytest.mark.parametrize("kwargs", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, top_p=1e-6)])
def test_top_k_1_and_tiny_top_p_are_greedy(kwargs):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(256, 500, generator=g) * 2
    out = run(logits, 0.8, **kwargs)
    assert torch.equal(out.tokens, logits.argmax(-1))
    assert torch.all(out.logprobs == 0)  # a one-token support has probability 1


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (0.7, -1, 0.6), (1.3, 12, 0.8),
                                                     (1.0, -1, 0.95)])
def test_filters_leave_exactly_the_expected_support(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(2)
    row = torch.randn(64, generator=g) * 1.5
    support = set(torch.nonzero(reference_dist(row, temperature, top_k, top_p)).flatten().tolist())
    assert 1 < len(support) < 64
    # 1) the vectorized threshold keeps exactly the reference support
    thr = S.filter_threshold((row[None] / temperature), torch.tensor([top_k]), torch.tensor([top_p]))
    assert set(torch.nonzero(row / temperature >= thr).flatten().tolist()) == support
    # 2) 20k draws (different seeds and steps) never leave it, and visit all of it
    n = 20000
    out = run(row.expand(n, -1), temperature, top_p, top_k, seeds=torch.arange(n) * 7919 + 3,
              steps=torch.arange(n) % 97)
    seen = set(out.tokens.tolist())
    assert seen <= support
    assert seen == support or min(float(reference_dist(row, temperature, top_k, top_p)[i])
                                  for i in support - seen) * n < 5  # unseen only if E[count] < 5


def test_filters_vary_per_row_in_one_batch():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 40, generator=g)
    ks = torch.tensor([-1, 3, 40, 100, 1, 7])
    ps = torch.tensor([0.5, 1.0, 0.9, 1.0, 1.0, 0.3])
    thr = S.filter_threshold(logits, ks, ps)
    for r in range(6):
        ref = reference_dist(logits[r], 1.0, int(ks[r]) if int(ks[r]) <= 40 else -1, float(ps[r]))
        assert set(torch.nonzero(logits[r] >= thr[r]).flatten().tolist()) == \
            set(torch.nonzero(ref).flatten().tolist()), r


# ----------------------------------------------------------------------------- distribution


def chi2_quantile(df: int, z: float) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at standard-normal z."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 6, 0.9), (1.3, -1, 1.0), (1.0, -1, 0.8)])
def test_empirical_distribution_matches_renormalized_softmax(temperature, top_k, top_p):
    row = torch.tensor([2.0, 1.5, 1.2, 0.9, 0.3, 0.0, -0.4, -1.0, -2.0, -3.5])
    q = reference_dist(row, temperature, top_k, top_p)
    n = 50000  # rows with distinct seeds; step also varies
    out = run(row.expand(n, -1), temperature, top_p, top_k, seeds=torch.arange(n) + 10 ** 12,
              steps=torch.arange(n) % 13)
    counts = torch.bincount(out.tokens, minlength=len(row)).double()
    assert counts[q == 0].sum() == 0
    mask = q > 0
    expected = n * q[mask]
    # Per bin: |count - n q| <= 5 sqrt(n q (1 - q)) (a 5-sigma binomial bound; with <= 10
    # bins the chance that a correct sampler fails it is < 10 * 5.7e-7).
    dev = (counts[mask] - expected).abs()
    assert torch.all(dev <= 5 * torch.sqrt(expected * (1 - q[mask]))), (counts, expected)
    # Pearson chi-square with df = |support| - 1 against its 1 - 1e-6 quantile (z = 4.753).
    chi2 = float(((counts[mask] - expected) ** 2 / expected).sum())
    df = int(mask.sum()) - 1
    assert chi2 < chi2_quantile(df, 4.753), (chi2, df)


# ----------------------------------------------------------------------------- log-probs


def test_logprobs_are_exact_under_the_sampling_distribution():
    g = torch.Generator().manual_seed(4)
    b, v = 96, 300
    logits = torch.randn(b, v, generator=g) * 2
    temps = torch.tensor([0.5, 1.0, 1.7])[torch.arange(b) % 3]
    ks = torch.tensor([-1, 20, 3, 150])[torch.arange(b) % 4]
    ps = torch.tensor([1.0, 0.9, 0.5, 0.97, 0.2])[torch.arange(b) % 5]
    out = run(logits, temps, ps, ks, seeds=torch.arange(b) * 31 + 5, steps=torch.arange(b))
    raw = run(logits, temps, ps, ks, seeds=torch.arange(b) * 31 + 5, steps=torch.arange(b), mode="raw")
    assert torch.equal(out.tokens, raw.tokens)  # the mode changes the reported log-prob only
    for r in range(b):
        q = reference_dist(logits[r], float(temps[r]), int(ks[r]), float(ps[r]))
        tok = int(out.tokens[r])
        assert q[tok] > 0
        assert abs(float(out.logprobs[r]) - math.log(float(q[tok]))) < 1e-5, r
        ref_raw = float(torch.log_softmax(logits[r].double(), 0)[tok])
        assert abs(float(raw.logprobs[r]) - ref_raw) < 1e-5, r


def test_sampled_and_raw_logprobs_coincide_at_t1_untruncated():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 1000, generator=g) * 4
    a = run(logits, 1.0)
    b = run(logits, 1.0, mode="raw")
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="logprobs_mode"):
        run(logits, 1.0, mode="bogus")


# ----------------------------------------------------------------------------- randomness


def test_row_keys_are_the_noise_reference_stream_keys():
    seeds = [0, 1, 12345, 2 ** 32 - 1, 2 ** 32, 2 ** 63 - 1, 0x0123456789ABCDEF]
    steps = [0, 1, 7, 4095, 2 ** 31, 2 ** 32 - 1, 100]
    k1, k2 = S.row_keys(torch.tensor(seeds), torch.tensor(steps))
    for i, (s, t) in enumerate(zip(seeds, steps)):
        assert (int(k1[i]), int(k2[i])) == R.stream_keys(s, t ^ S.STEP_SALT)
    bits = S.uniform_bits(torch.tensor(seeds), torch.tensor(steps), 50)
    v = torch.arange(50)
    for i in range(len(seeds)):
        assert torch.equal(bits[i], R.pair_hash(v, int(k1[i]), int(k2[i])))
    assert len(set(bits[0].tolist())) == 50  # a bijection of v within a row


def test_uniforms_strictly_inside_unit_interval_and_tails_exact():
    h = torch.tensor([0, 1, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 2, 2 ** 32 - 1])
    u = S.uniforms(h)
    assert torch.all((u > 0) & (u < 1))
    e = S.exponentials(h)
    assert torch.all(torch.isfinite(e) & (e > 0)) and torch.all(torch.isfinite(torch.log(e)))
    ref = -torch.log(u)  # float64
    torch.testing.assert_close(e.double(), ref, rtol=1e-6, atol=0)
    # Bulk: 1e6 uniforms of many rows; mean within 5 / sqrt(12 N) of 1/2, E mean within 5/sqrt(N) of 1.
    bits = S.uniform_bits(torch.arange(100) * 977, torch.arange(100), 10000)
    n = bits.numel()
    uu = S.uniforms(bits)
    assert torch.all((uu > 0) & (uu < 1))
    assert abs(float(uu.mean()) - 0.5) < 5 / math.sqrt(12 * n)
    assert abs(float(S.exponentials(bits).double().mean()) - 1.0) < 5 / math.sqrt(n)


def test_draws_independent_of_batch_composition_and_order():
    g = torch.Generator().manual_seed(6)
    v = 1000
    rows = [  # (logits, temperature, top_p, top_k, seed, step)
        (torch.randn(v, generator=g) * 2, 1.0, 1.0, -1, 42, 0),
        (torch.randn(v, generator=g) * 2, 0.6, 0.9, 50, 2 ** 40 + 3, 17),
        (torch.randn(v, generator=g) * 2, 1.2, 0.7, -1, 7, 4000),
        (torch.randn(v, generator=g) * 2, 0.0, 1.0, -1, 9, 1),
        (torch.randn(v, generator=g) * 2, 1.0, 1.0, 5, 2 ** 63 - 1, 123456),
    ]

    def batch(items):
        logits = torch.stack([r[0] for r in items])
        return run(logits, [r[1] for r in items], [r[2] for r in items], [r[3] for r in items],
                   seeds=[r[4] for r in items], steps=[r[5] for r in items])

    alone = [batch([r]) for r in rows]
    fillers = [(torch.randn(v, generator=g) * 3, 0.9, 0.8, 30, 1000 + i, i) for i in range(11)]
    mixed = fillers[:4] + [rows[3], rows[0]] + fillers[4:7] + [rows[4], rows[2], rows[1]] + fillers[7:]
    out = batch(mixed)
    for r, a in zip(rows, alone):
        pos = next(i for i, m in enumerate(mixed) if m is r)
        assert int(out.tokens[pos]) == int(a.tokens[0])
        assert float(out.logprobs[pos]) == float(a.logprobs[0])
    again = batch(mixed)
    assert torch.equal(again.tokens, out.tokens) and torch.equal(again.logprobs, out.logprobs)


def test_different_steps_and_seeds_give_different_draws():
    v = 1000
    flat = torch.zeros(200, v)  # uniform over 1000 tokens
    by_step = run(flat, 1.0, seeds=torch.full((200,), 5), steps=torch.arange(200)).tokens
    by_seed = run(flat, 1.0, seeds=torch.arange(200) + 123, steps=torch.zeros(200)).tokens
    # 200 uniform draws of 1000 values: E[distinct] = 1000 (1 - 0.999^200) ~ 181.3, sd ~ 3.6.
    assert len(set(by_step.tolist())) > 160 and len(set(by_seed.tolist())) > 160
    assert not torch.equal(by_step, by_seed)
    bits = S.uniform_bits(torch.tensor([5, 5, 6]), torch.tensor([0, 1, 0]), v)
    assert not torch.equal(bits[0], bits[1]) and not torch.equal(bits[0], bits[2])


def test_engine_seeds_requests_reproducibly():
    unseeded = SamplingParams(n=4)
    a, b, c = S.Sampler(seed=1), S.Sampler(seed=1), S.Sampler(seed=2)
    sa = [a.sample_seeds(unseeded) for _ in range(3)]
    assert sa == [b.sample_seeds(unseeded) for _ in range(3)]
    assert sa != [c.sample_seeds(unseeded) for _ in range(3)]
    assert len({s for seeds in sa for s in seeds}) == 12  # samples and requests all differ
    assert all(0 <= s < 2 ** 63 for seeds in sa for s in seeds)
    seeded = SamplingParams(n=3, seed=99)
    assert a.sample_seeds(seeded) == c.sample_seeds(seeded) == [S.derive_sample_seed(99, j) for j in range(3)]
    assert S.Sampler(seed=1).request_seed(seeded) == 99
    rows = S.RowState(torch.ones(2), torch.ones(2), torch.full((2,), -1), torch.tensor([1, 2]),
                      torch.zeros(2, dtype=torch.int64), truncates=False)
    out = a(torch.zeros(2, 10), rows)
    assert out.tokens.dtype == torch.int64 and out.logprobs.dtype == torch.float32
    packed = S.pack(out)
    assert packed.dtype == torch.float64 and packed[:, 0].tolist() == out.tokens.tolist()


def test_the_sampler_bars_stop_tokens_of_the_rows_below_min_tokens():
    logits = torch.zeros(3, 8)
    logits[:, 2] = 10.0  # the stop token is everyone's favourite
    rows = S.RowState(torch.zeros(3), torch.ones(3), torch.full((3,), -1), torch.arange(3),
                      torch.tensor([0, 4, 1]), truncates=False, stop_ids=torch.tensor([[2, -1], [2, -1], [2, 6]]),
                      min_tokens=torch.tensor([1, 4, 5]))
    out = S.Sampler()(logits, rows)
    assert out.tokens.tolist() == [0, 2, 0] and logits[:, 2].eq(10.0).all()  # barred on a copy


# ----------------------------------------------------------------------------- bad rows, masking


def test_nan_and_empty_rows_are_flagged_not_sampled():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(5, 30, generator=g)
    good = run(logits.clone(), [1.0, 0.0, 1.0, 1.0, 0.7], top_k=[-1, -1, -1, 3, -1])
    logits[1, 4] = float("nan")
    logits[2] = NEG_INF
    logits[3, 0] = float("inf")
    out = run(logits, [1.0, 0.0, 1.0, 1.0, 0.7], top_k=[-1, -1, -1, 3, -1])
    assert out.bad_rows.tolist() == [False, True, True, True, False]
    assert out.tokens[1:4].tolist() == [-1, -1, -1] and torch.isnan(out.logprobs[1:4]).all()
    assert torch.equal(out.tokens[[0, 4]], good.tokens[[0, 4]])
    assert torch.equal(out.logprobs[[0, 4]], good.logprobs[[0, 4]])
    partial = torch.full((1, 30), NEG_INF)
    partial[0, 11] = -3.0  # one finite entry is a valid (certain) row
    p = run(partial, 1.0)
    assert not p.bad_rows[0] and int(p.tokens[0]) == 11 and float(p.logprobs[0]) == 0.0


def test_stop_tokens_masked_until_min_tokens():
    eos = 2
    params = [SamplingParams(min_tokens=3, stop_token_ids=[5]), SamplingParams(min_tokens=3, stop_token_ids=[5]),
              SamplingParams(min_tokens=0), SamplingParams(min_tokens=3, ignore_eos=True)]
    stop_ids = S.pad_stop_ids([p.all_stop_token_ids(eos) for p in params])
    assert stop_ids.tolist() == [[5, 2], [5, 2], [2, -1], [-1, -1]]
    num_generated = torch.tensor([2, 3, 0, 0])
    min_tokens = torch.tensor([p.min_tokens for p in params])
    logits = torch.zeros(4, 8)
    logits[:, 2] = 10.0  # EOS the favourite
    logits[:, 5] = 9.0
    masked = S.mask_stop_tokens(logits.clone(), stop_ids, num_generated, min_tokens)
    expect = logits.clone()
    expect[0, [2, 5]] = NEG_INF
    assert torch.equal(masked, expect)  # row 1 reached min_tokens, row 2 has none, row 3 ignores EOS
    out = S.sample(masked, torch.zeros(4), torch.ones(4), torch.full((4,), -1), torch.arange(4), num_generated)
    assert out.tokens.tolist() == [0, 2, 2, 2]


# ----------------------------------------------------------------------------- check_stop


def test_check_stop_eos_ignore_eos_and_stop_ids():
    eos = 0
    p = SamplingParams(max_tokens=10)
    assert check_stop([5, 6], "ab", p, eos) == (False, None, None)
    assert check_stop([5, 0], "ab", p, eos) == (True, "stop", None)
    assert check_stop([5, 9], "ab", p, [0, 9]) == (True, "stop", None)  # several EOS ids
    assert check_stop([5, 0], "ab", SamplingParams(ignore_eos=True), eos) == (False, None, None)
    q = SamplingParams(stop_token_ids=[7], ignore_eos=True)
    assert check_stop([1, 7], "x", q, eos) == (True, "stop", None)
    assert check_stop([0], "", SamplingParams(min_tokens=2), eos) == (False, None, None)
    assert check_stop([0], "", SamplingParams(), None) == (False, None, None)


def test_check_stop_strings_spanning_tokens_and_trim():
    p = SamplingParams(stop=["###", "\nQ:"])
    # "##" then "#x": the stop string spans two tokens; trimmed before it
    assert check_stop([1, 2], "answer ##", p, 0) == (False, None, None)
    assert check_stop([1, 2, 3], "answer ###x", p, 0) == (True, "stop", 7)
    incl = SamplingParams(stop=["###", "\nQ:"], include_stop_str_in_output=True)
    assert check_stop([1, 2, 3], "answer ###x", incl, 0) == (True, "stop", 10)
    # earliest occurrence wins over list order; at an equal start the shorter (completed first)
    assert check_stop([1], "a\nQ: b ###", p, 0) == (True, "stop", 1)
    both = SamplingParams(stop=["abc", "ab"], include_stop_str_in_output=True)
    assert check_stop([1], "xabcd", both, 0) == (True, "stop", 3)
    # with new_char_count, only occurrences ending in the latest token's chars count
    late = SamplingParams(stop=["##"], min_tokens=3)
    assert check_stop([1, 2], "##", late, 0) == (False, None, None)  # before min_tokens
    assert check_stop([1, 2, 3], "## ok", late, 0, new_char_count=3) == (False, None, None)
    assert check_stop([1, 2, 3], "## ok", late, 0) == (True, "stop", 0)  # whole-text search
    assert check_stop([1, 2, 3, 4], "## ok #", late, 0, new_char_count=1) == (False, None, None)
    assert check_stop([1, 2, 3, 4, 5], "## ok ##", late, 0, new_char_count=1) == (True, "stop", 6)


def test_check_stop_max_tokens():
    p = SamplingParams(max_tokens=3, stop=["zz"])
    assert check_stop([1, 2], "ab", p, 0) == (False, None, None)
    assert check_stop([1, 2, 3], "abc", p, 0) == (True, "length", None)
    assert check_stop([1, 2, 0], "ab", p, 0) == (True, "stop", None)       # EOS beats length
    assert check_stop([1, 2, 3], "abzz", p, 0) == (True, "stop", 2)       # stop string beats length
    assert check_stop([1, 2, 0], "ab", SamplingParams(max_tokens=3, ignore_eos=True), 0) == \
        (True, "length", None)


def test_stop_checks_read_the_generated_tokens_through_a_view():
    from psnrl.engine.sequence import TokensFrom

    tokens = [9, 9, 9, 5, 0]
    view = TokensFrom(tokens, 3)
    assert len(view) == 2 and view[0] == 5 and view[-1] == 0 and view[-2] == 5
    with pytest.raises(IndexError):
        view[2]
    with pytest.raises(IndexError):
        view[-3]
    p = SamplingParams(max_tokens=10)
    assert check_stop(view, "", p, 0) == check_stop([5, 0], "", p, 0) == (True, "stop", None)
    assert check_stop(TokensFrom(tokens, 5), "", p, 0) == (False, None, None)  # nothing generated yet
