"""Noise-scale (sigma) schedulers of PSN-GRPO, and the helpers that compute their inputs.

PSN paper (arXiv 2602.02555), Section 3.5 "Adaptive Noise Scheduling" and Appendix B. The
perturbed sampler draws theta~ = theta + eps, eps ~ N(0, sigma^2 I); a scheduler chooses sigma
for each iteration. Three schedulers, built by ``make_scheduler(name, **kwargs)``:

``fixed`` (``FixedSigma``)
    sigma = sigma_0 for the whole run (the paper's "Fixed-Noise PSN", sigma = 0.004).

``var1`` (``VarISigma``), Section 3.5.1 "Variant I: Non-Real Scheduler", Eq. 5-6. The paper:
    "we adjust sigma to maintain a target KL divergence, delta_KL, between the clean and noisy
    policies. After each batch, we compute d(pi_theta, pi_theta~) = E_s[KL(pi_theta~(.|s) ||
    pi_theta(.|s))]. The noise scale for the next iteration, sigma_{k+1}, is updated via
    sigma_{k+1} = beta sigma_k if d <= delta_KL, (1/beta) sigma_k otherwise, where beta > 1".
    Implemented as ``sigma <- clamp(beta*sigma if kl <= kl_target else sigma/beta)``; ``update``
    is called *after* a batch with that batch's d and returns the sigma of the *next* batch.
    ``sampled_kl`` estimates d from the per-token log-probs the learner already has.

``var2`` (``VarIISigma``), Section 3.5.2 "Variant II: Real-Time Computationally Efficient
Scheduler", Eq. 7-10. Per query, two probe rollouts o(1), o(2) from the *clean* policy:
    d_sem,i = cos(f(o(1)), f(o(2)))        "f a fixed sentence embedding model"      (Eq. 7)
    d_sem,t = (1/B) sum_i d_sem,i           "mean of semantic similarity of current batch"
    Self-certainty(o|q) = (1/|o|) sum_i KL(U || p_theta(.|q, o_<i))                 (Eq. 8)
    SC_t    = batch average of self-certainty
    SC_t^norm = clip((SC_t - S_min) / (S_max - S_min + eps), 0, 1)   "a global history buffer
              of running extrema (S_min, S_max)"                                     (Eq. 9)
    Ind_t   = SC_t^norm + d_sem,t
    sigma_k = beta sigma_{k-1} if mean(Ind) <= Ind_t, (1/beta) sigma_{k-1} otherwise   (Eq. 10)
``update`` is called *before* the batch's noisy rollouts (after the probes) and returns the
sigma for *this* batch ("real-time").

Range. Appendix B, Table 5: "Adaptive Noise Update Step beta 1.01" and "Adaptive Noise Scale
Range [0.8 sigma_init, 1.2 sigma_init]". Eq. 6 and Eq. 10 show no clamp; the table names the
range for the adaptive noise in general, not for one variant, so both ``var1`` and ``var2``
clamp every update to [min_factor * sigma_0, max_factor * sigma_0] (defaults 0.8 and 1.2).
A clamped sigma then moves by beta from the bound (e.g. 1.2 sigma_0 / beta), so it does not
"remember" steps that the clamp cut off.

Ambiguities of the paper and the choices made here (each class docstring repeats its own):

1. Var-II: only self-certainty is normalized. Eq. 9 normalizes SC_t and the text defines
   "Ind_t = SC_t^norm + d_sem,t" with the raw batch-mean cosine (normalizing both, a natural
   reading of the method's summary, is not what the equations write). The default follows the
   paper; ``normalize_similarity=True`` applies Eq. 9's running-extrema
   normalization to d_sem,t as well.
2. Var-II: the batch value is normalized, not each prompt's. Eq. 9 normalizes "the
   batch-averaged self-certainty SC_t" and Eq. 7 averages d_sem over the batch, so the running
   extrema are over *batch means* (one value per update), not over per-prompt values.
   ``update`` takes per-prompt (or per-rollout) values and averages them itself.
3. Var-II: the running extrema include the current batch: S_min, S_max are updated with SC_t
   first, then SC_t is normalized. So the first update (S_max == S_min) and constant inputs
   give SC_t^norm = 0 / (0 + eps) = 0 (exactly 0, also with eps = 0), a new maximum gives
   ~1 and a new minimum 0; the clip of Eq. 9 is then a no-op kept for safety. (Updating the
   extrema after normalizing would leave the first update undefined and clip new extremes
   to the same 0 / 1.) eps is not given in the paper: 1e-8 here.
4. Var-II: "its historical mean" is the mean of every Ind so far, the current one included:
   mean = (Ind_1 + ... + Ind_t) / t. For t >= 2 this is the same test as comparing with the
   mean of the previous values (Ind_t >= mean_{1..t} <=> Ind_t >= mean_{1..t-1}); it makes
   the first update a tie, so the first update multiplies sigma by beta. Past Ind values are
   kept as they were computed (with the extrema of their time), not re-normalized. The sum is
   kept as an exact rational (``fractions.Fraction`` of the floats), so ties are exact: a
   constant Ind is never "below its mean" by rounding. Consequence of "<=": constant signals
   raise sigma every step until the upper bound.
5. Var-II: self-certainty is averaged over the probe rollouts (per rollout a token mean,
   Eq. 8; then the batch mean). Passing per-prompt means of the two probes or all 2B
   per-rollout values gives the same SC_t. The two inputs need not have the same length.
6. Var-I: d <= delta raises sigma (Eq. 6, "<="); any finite d is accepted, negative
   estimates included (the k1 estimator can be negative).
7. beta == 1 is accepted (sigma then never moves), beta < 1 is an error (the paper: beta > 1).
   min_factor <= 1 <= max_factor is required, so sigma_0 lies in its own range;
   max_factor = inf turns the upper clamp off.

Checkpoints. Every scheduler has ``state_dict()`` (plain Python values: floats, ints, lists,
None; safe for ``torch.save`` / ``torch.load(weights_only=True)`` and JSON) and
``load_state_dict(state)``; a scheduler built with the same arguments and loaded from a state
continues exactly as the saved one would have. Loading checks that the name and the
configuration match and raises ValueError otherwise.

The sentence embedders behind d_sem are in psnrl/trainer/embedders.py.
"""
from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = [
    "SCHEDULERS", "FixedSigma", "VarISigma", "VarIISigma", "make_scheduler",
    "token_self_certainty", "self_certainty", "sequence_mean", "sampled_kl",
]

SCHEDULERS = ("fixed", "var1", "var2")


# ----------------------------------------------------------------------------- validation

def _real(name: str, x: Any, *, allow_inf: bool = False) -> float:
    """x as a Python float; ValueError for bools, non-numbers and NaN (and inf unless allowed)."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(x.shape)}")
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {x!r}")
    v = float(x)
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def _values(name: str, x: Sequence[float] | Tensor) -> Tensor:
    """A non-empty, finite, flat float64 CPU tensor from a sequence or tensor of numbers."""
    if isinstance(x, Tensor):
        t = x.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    else:
        if x is None or isinstance(x, (str, bytes, dict)):
            raise ValueError(f"{name} must be a sequence, array or tensor of numbers, got {type(x).__name__}")
        try:
            t = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{name} must be a sequence or tensor of numbers: {e}") from None
    if t.numel() == 0:
        raise ValueError(f"{name} is empty: need at least one value per update")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")
    return t


def _check_range(sigma0: float, beta: float, min_factor: float, max_factor: float) -> None:
    if sigma0 < 0:
        raise ValueError(f"sigma0 must be >= 0, got {sigma0}")
    if beta < 1:
        raise ValueError(f"beta must be >= 1 (the paper's step constant beta > 1), got {beta}")
    if min_factor < 0:
        raise ValueError(f"min_factor must be >= 0, got {min_factor}")
    if min_factor > max_factor:
        raise ValueError(f"min_factor must be <= max_factor, got {min_factor} > {max_factor}")
    if not min_factor <= 1.0 <= max_factor:
        raise ValueError("the range [min_factor, max_factor] * sigma0 must contain sigma0, got "
                         f"[{min_factor}, {max_factor}]")


# ----------------------------------------------------------------------------- schedulers

class _Scheduler:
    """Shared parts: ``sigma``, ``steps``, ``state_dict`` / ``load_state_dict``."""

    name: str = ""

    def __init__(self, sigma0: float) -> None:
        self.sigma0 = _real("sigma0", sigma0)
        if self.sigma0 < 0:
            raise ValueError(f"sigma0 must be >= 0, got {self.sigma0}")
        self._sigma = self.sigma0
        self.steps = 0

    @property
    def sigma(self) -> float:
        """The current noise scale: the value the last ``update`` returned (sigma0 before any)."""
        return self._sigma

    def config(self) -> dict[str, Any]:
        return {"sigma0": self.sigma0}

    def _state(self) -> dict[str, Any]:
        return {}

    def _load_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values (no tensors): the name, the configuration and the state."""
        return {"name": self.name, "config": self.config(), "sigma": self._sigma,
                "steps": self.steps, **self._state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; the scheduler must have been built with the same arguments."""
        if state.get("name") != self.name:
            raise ValueError(f"state is for scheduler {state.get('name')!r}, not {self.name!r}")
        if state.get("config") != self.config():
            raise ValueError(f"state was saved with config {state.get('config')}, this scheduler "
                             f"has {self.config()}; build it with the saved arguments")
        self._sigma = float(state["sigma"])
        self.steps = int(state["steps"])
        self._load_state(state)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args}; sigma={self._sigma!r}, steps={self.steps})"


class FixedSigma(_Scheduler):
    """sigma = sigma0 always. ``update`` accepts (and ignores) any inputs, so a trainer loop can
    call every scheduler the same way."""

    name = "fixed"

    def update(self, *args: Any, **kwargs: Any) -> float:
        self.steps += 1
        return self._sigma


class _Adaptive(_Scheduler):
    def __init__(self, sigma0: float, beta: float, min_factor: float, max_factor: float) -> None:
        super().__init__(sigma0)
        self.beta = _real("beta", beta)
        self.min_factor = _real("min_factor", min_factor)
        self.max_factor = _real("max_factor", max_factor, allow_inf=True)
        _check_range(self.sigma0, self.beta, self.min_factor, self.max_factor)
        self.sigma_min = self.min_factor * self.sigma0
        self.sigma_max = self.max_factor * self.sigma0 if self.sigma0 > 0 else 0.0

    def config(self) -> dict[str, Any]:
        return {"sigma0": self.sigma0, "beta": self.beta, "min_factor": self.min_factor,
                "max_factor": self.max_factor}

    def _step(self, increase: bool) -> float:
        s = self._sigma * self.beta if increase else self._sigma / self.beta
        self._sigma = min(max(s, self.sigma_min), self.sigma_max)
        self.steps += 1
        return self._sigma


class VarISigma(_Adaptive):
    """Variant I (paper Eq. 5-6): keep the noisy policy at a target KL from the clean one.

    ``update(kl)`` after each batch, with kl = d(pi_theta, pi_theta~) = E_s KL(pi_theta~ || pi_theta)
    measured on that batch (e.g. ``sampled_kl``):
        sigma <- beta * sigma   if kl <= kl_target   ("d <= delta_KL")
        sigma <- sigma / beta   otherwise
    then clamped to [min_factor, max_factor] * sigma0. The returned sigma is for the next batch.
    Defaults are the paper's Table 5: delta = 0.03, beta = 1.01, range [0.8, 1.2] * sigma_init.
    The paper's Eq. 6 has no clamp; Table 5's "Adaptive Noise Scale Range" is applied here too
    (see the module docstring). Any finite kl is accepted (negative k1 estimates included).
    """

    name = "var1"

    def __init__(self, sigma0: float, kl_target: float = 0.03, beta: float = 1.01,
                 min_factor: float = 0.8, max_factor: float = 1.2) -> None:
        super().__init__(sigma0, beta, min_factor, max_factor)
        self.kl_target = _real("kl_target", kl_target)
        if self.kl_target < 0:
            raise ValueError(f"kl_target must be >= 0, got {self.kl_target}")
        self.last_kl: float | None = None

    def config(self) -> dict[str, Any]:
        return {**super().config(), "kl_target": self.kl_target}

    def _state(self) -> dict[str, Any]:
        return {"last_kl": self.last_kl}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.last_kl = state.get("last_kl")

    def update(self, kl: float | Tensor) -> float:
        v = _real("kl", kl)
        self.last_kl = v
        return self._step(v <= self.kl_target)


class _RunningMinMax:
    """Running extrema over every value seen, Eq. 9's normalization with the current value included."""

    def __init__(self, eps: float) -> None:
        self.eps = eps
        self.lo: float | None = None
        self.hi: float | None = None

    def normalize(self, x: float) -> float:
        self.lo = x if self.lo is None else min(self.lo, x)
        self.hi = x if self.hi is None else max(self.hi, x)
        span = self.hi - self.lo
        if span == 0.0:
            return 0.0          # first value or constant inputs: 0 / (0 + eps) = 0
        return min(max((x - self.lo) / (span + self.eps), 0.0), 1.0)

    def state(self) -> list[float | None]:
        return [self.lo, self.hi]

    def load(self, s: Sequence[float | None]) -> None:
        self.lo = None if s[0] is None else float(s[0])
        self.hi = None if s[1] is None else float(s[1])


class VarIISigma(_Adaptive):
    """Variant II (paper Eq. 7-10): real-time schedule from two clean probe rollouts per prompt.

    ``update(semantic_similarity, self_certainty)`` once per batch, after the probes and before
    the noisy rollouts; returns the sigma for this batch. Inputs (sequences or tensors of any
    shape, flattened): ``semantic_similarity`` per prompt d_sem,i = cos(f(o1), f(o2)) (see
    ``probe_similarity``); ``self_certainty`` per prompt or per probe rollout (``self_certainty``).
    Steps (t counts updates):
        sem_t   = mean of semantic_similarity                         (Eq. 7: d_sem,t)
        SC_t    = mean of self_certainty                              (batch-averaged SC)
        S_min, S_max <- min / max(S_min, S_max, SC_t)                 (running, all batches)
        SC_norm = clip((SC_t - S_min) / (S_max - S_min + eps), 0, 1)  (Eq. 9; 0 when S_max == S_min)
        sem_used = sem_t  (paper), or the same running min/max normalization of sem_t when
                   normalize_similarity=True
        Ind_t   = SC_norm + sem_used
        mean    = (Ind_1 + ... + Ind_t) / t                           ("its historical mean")
        sigma  <- beta * sigma if mean <= Ind_t else sigma / beta     (Eq. 10), then clamp to
                  [min_factor, max_factor] * sigma0
    Choices where the paper is not explicit (module docstring, items 1-5): the paper normalizes
    only SC (default ``normalize_similarity=False``); the extrema are over batch means and include
    the current batch, so the first update and constant inputs give SC_norm = 0; the historical
    mean includes the current Ind (the first update is a tie and raises sigma), and it is kept as
    an exact rational so ties are exact. Defaults: beta = 1.01, range [0.8, 1.2] * sigma0 (Table 5),
    eps = 1e-8 (not given in the paper).

    ``last`` holds the quantities of the latest update (for logging).
    """

    name = "var2"

    def __init__(self, sigma0: float, beta: float = 1.01, min_factor: float = 0.8,
                 max_factor: float = 1.2, *, eps: float = 1e-8,
                 normalize_similarity: bool = False) -> None:
        super().__init__(sigma0, beta, min_factor, max_factor)
        self.eps = _real("eps", eps)
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        self.normalize_similarity = bool(normalize_similarity)
        self._sc = _RunningMinMax(self.eps)
        self._sem = _RunningMinMax(self.eps)
        self._ind_sum = Fraction(0)
        self.last: dict[str, float | bool] = {}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "eps": self.eps,
                "normalize_similarity": self.normalize_similarity}

    @property
    def ind_mean(self) -> float | None:
        """The historical mean of Ind over all updates so far (None before the first)."""
        return None if self.steps == 0 else float(self._ind_sum / self.steps)

    def _state(self) -> dict[str, Any]:
        return {"sc_minmax": self._sc.state(), "sem_minmax": self._sem.state(),
                "ind_sum": [self._ind_sum.numerator, self._ind_sum.denominator],
                "last": dict(self.last)}

    def _load_state(self, state: dict[str, Any]) -> None:
        self._sc.load(state["sc_minmax"])
        self._sem.load(state["sem_minmax"])
        num, den = state["ind_sum"]
        self._ind_sum = Fraction(int(num), int(den))
        self.last = dict(state.get("last", {}))

    def update(self, semantic_similarity: Sequence[float] | Tensor,
               self_certainty: Sequence[float] | Tensor) -> float:
        sem_v = _values("semantic_similarity", semantic_similarity)
        sc_v = _values("self_certainty", self_certainty)
        sem = float(sem_v.mean())
        sc = float(sc_v.mean())
        sc_norm = self._sc.normalize(sc)
        sem_used = self._sem.normalize(sem) if self.normalize_similarity else sem
        ind = sc_norm + sem_used
        self._ind_sum += Fraction(ind)
        n = self.steps + 1
        increase = Fraction(ind) * n >= self._ind_sum      # mean(Ind_1..Ind_t) <= Ind_t, exactly
        self.last = {"semantic_similarity": sem, "self_certainty": sc, "self_certainty_norm": sc_norm,
                     "semantic_term": sem_used, "ind": ind, "ind_mean": float(self._ind_sum / n),
                     "increase": bool(increase)}
        return self._step(increase)


def make_scheduler(name: str, **kwargs: Any) -> FixedSigma | VarISigma | VarIISigma:
    """Build a scheduler by name: "fixed" (FixedSigma), "var1" (VarISigma), "var2" (VarIISigma).

    kwargs go to the class (sigma0 is required by all three)."""
    classes = {"fixed": FixedSigma, "var1": VarISigma, "var2": VarIISigma}
    if name not in classes:
        raise ValueError(f"unknown sigma scheduler {name!r}; valid names: {', '.join(SCHEDULERS)}")
    return classes[name](**kwargs)


# ----------------------------------------------------------------------------- inputs: self-certainty

def token_self_certainty(x: Tensor, *, chunk_rows: int = 1024) -> Tensor:
    """Per position KL(U || p) over the last (vocabulary) dim: shape ``x.shape[:-1]``, float32.

    ``x`` holds logits or log-probs (any shift per position: the formula is shift-invariant):
        KL(U || p) = sum_v (1/V) log((1/V) / p_v) = -log V - (1/V) sum_v log p_v
                   = logsumexp(x) - mean(x) - log V,        V = x.shape[-1]
    This is Kang et al.'s (2025) self-certainty, the one the PSN paper's Eq. 8 uses. 0 for a
    uniform p, large for a peaked one (up to inf when some p_v = 0, e.g. -inf logits). V is the
    full last dim, padded vocabulary entries included. Computed in float32 (float64 inputs stay
    float64) in chunks of ``chunk_rows`` positions so only a chunk-sized temporary is made.
    """
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError("x must be a tensor [..., V] of logits or log-probs with V >= 1")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor, got {x.dtype}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    V = x.shape[-1]
    flat = x.reshape(-1, V)
    out = torch.empty(flat.shape[0], dtype=dtype, device=x.device)
    log_v = math.log(V)
    for i in range(0, flat.shape[0], chunk_rows):
        c = flat[i:i + chunk_rows].to(dtype)
        out[i:i + chunk_rows] = torch.logsumexp(c, dim=-1) - c.mean(dim=-1) - log_v
    return out.reshape(x.shape[:-1])


def sequence_mean(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over the last (token) dim of ``values`` [..., T], counting only ``mask`` != 0.

    A row with no valid token gives NaN (its mean is undefined): drop such rows before
    ``VarIISigma.update``, which rejects NaN."""
    if mask is None:
        return values.mean(dim=-1)
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != values shape {tuple(values.shape)}")
    m = mask.to(values.dtype)
    return (values * m).sum(dim=-1) / m.sum(dim=-1)


def self_certainty(x: Tensor, mask: Tensor | None = None, *, chunk_rows: int = 1024) -> Tensor:
    """Self-certainty of responses (paper Eq. 8): the mean over a response's tokens of KL(U || p).

    ``x`` [..., T, V] holds the logits (or log-probs) of the policy at each response position,
    ``mask`` [..., T] marks the response tokens (None: all). Returns shape [...] (a 0-d tensor
    for one response [T, V]). If the lm_head already gives per-token KL(U || p), use
    ``sequence_mean(token_values, mask)`` instead."""
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError("x must be a tensor [..., T, V]")
    return sequence_mean(token_self_certainty(x, chunk_rows=chunk_rows), mask)


# ----------------------------------------------------------------------------- inputs: KL for Var-I

def sampled_kl(noisy_logp: Tensor, clean_logp: Tensor, mask: Tensor | None = None,
               estimator: str = "k3") -> float:
    """Estimate d = E_s KL(pi_theta~(.|s) || pi_theta(.|s)) (paper Eq. 5) from sampled tokens.

    ``noisy_logp`` / ``clean_logp`` [..., T]: log-prob of each token (sampled from pi_theta~)
    under the noisy and the clean policy; ``mask`` marks the response tokens. With
    r = pi_theta / pi_theta~ at each token, "k1" averages -log r (unbiased, can be negative)
    and "k3" averages r - 1 - log r (unbiased, >= 0). The average is over all valid tokens of
    the batch (every state s weighs the same)."""
    if noisy_logp.shape != clean_logp.shape:
        raise ValueError(f"shapes differ: {tuple(noisy_logp.shape)} vs {tuple(clean_logp.shape)}")
    log_r = clean_logp.double() - noisy_logp.double()
    if estimator == "k1":
        per_tok = -log_r
    elif estimator == "k3":
        per_tok = torch.expm1(log_r) - log_r
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: k1, k3")
    if mask is None:
        return float(per_tok.mean())
    if mask.shape != per_tok.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != log-prob shape {tuple(per_tok.shape)}")
    m = mask.double()
    if m.sum() == 0:
        raise ValueError("mask selects no token")
    return float((per_tok * m).sum() / m.sum())


# ----------------------------------------------------------------------------- inputs: similarity
