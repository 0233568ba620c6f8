"""Token sampling for the rollout engine: SamplingParams, the batched sampler, stop checks.

Pipeline of one decode step (``sample``), per row r of fp32 logits ``[B, V]``:

1. Bad rows: a row with any NaN or +inf, or with no finite logit (all -inf), is not
   sampled; it gets token -1, log-prob NaN and ``bad_rows[r] = True`` so the engine can
   finish the request with finish reason "error".
2. Greedy rows (temperature 0): token = argmax(logits) (the first index among exact
   ties); its log-prob is ``log_softmax(logits)[token]`` of the raw logits (temperature 1,
   untruncated). The distribution a greedy token is "drawn from" is a point mass whose
   log-prob is always 0, which carries no information; the raw log-prob is what a
   learner or an evaluation can use (it is the T -> 0 limit's ranking distribution).
3. Sampled rows: ``z = (logits - max(logits)) / T`` (the shift keeps z <= 0, so tiny
   temperatures cannot overflow), then top-k, then top-p on the top-k-renormalized
   distribution, both with one descending sort of the whole batch and per-row k and p.
   Both filters become a per-row *value* threshold ``thr_r``: a token is kept iff
   ``z_v >= thr_r``. So ties with the boundary token are all kept (the support can then
   exceed k, or exceed the minimal nucleus), which makes the support independent of how
   the sort orders ties (a device/algorithm detail).
   - top-k: thr = the k-th largest z (k = -1, or k >= V: off).
   - top-p: keep the smallest prefix of the sorted distribution whose mass reaches p:
     sorted rank i is kept iff the mass of ranks < i is < p (rank 0 is always kept;
     p = 1 keeps everything that survived top-k, without trusting the fp32 cumsum).
4. Draw with counter-based randomness (no global RNG): ``token = argmax_v(z_v - log E_v)``
   over the kept tokens (the exponential race, equivalently Gumbel-max with
   g = -log E), where ``E_v = -log u_v`` and ``u_v`` is a uniform determined only by
   (request seed s_r, generation step t_r, vocab id v) — see ``uniform_bits``. The draw
   of a request is therefore identical whatever the batch size, the row's position and
   the other rows; preemption + recompute redraws the same tokens.

The returned log-prob (``logprobs_mode="sampled"``, the default) is
``log q_r(token)`` where q_r is the distribution the token was actually drawn from:
``q_r = softmax(z masked to the kept set)``, i.e. after temperature, top-k and top-p
and renormalization over the kept set. This is the behaviour policy's probability, the
denominator of an importance ratio (the TIS weight of PSN-GRPO is
``min(pi_theta(y) / pi_sampler(y), C)``, and pi_sampler is this q). ``"raw"`` returns
``log_softmax(logits)[token]`` instead (temperature 1, no truncation: the model's own
full distribution, what the learner recomputes with its fused lm_head log-prob).
Which to use: with temperature 1, top_p 1 and top_k -1 (the paper's train setting)
the two coincide up to fp32 rounding, so either is right. With any truncation or
T != 1 the sampled token came from q, not from softmax(logits): an importance ratio
against the behaviour policy must use "sampled"; "raw" is for comparing the engine's
model with the learner's recomputation (e.g. measuring engine/learner mismatch) or for
reporting model likelihoods.

Numerics and cost: everything is fp32 except the integer hash (int64 holding 32-bit
words, as in psnrl/kernels/noise_reference.py). The [B, V] intermediates (a sort, the hash
temporaries) are transient; the hash is computed in row chunks to bound its int64
temporaries. Row-local reductions (max, softmax, cumsum, logsumexp) never mix rows, so
results are batch-invariant wherever torch's row reductions are (bit-exact on CPU; on
GPU the randomness is batch-invariant by construction).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Container, Iterable, Literal, NamedTuple, Protocol, Sequence

import torch

from psnrl.kernels import noise_reference as R

M32 = 0xFFFFFFFF
SEED_LIMIT = 1 << 63  # request seeds live in [0, 2**63): they fit an int64 tensor
STEP_LIMIT = 1 << 32  # a generation step is a 32-bit counter
# Domain salts: the step key is ``t ^ STEP_SALT`` and the key of sample j of a request is
# ``j ^ SAMPLE_INDEX_SALT``; they keep the sampler's streams apart from each other and
# (in practice) from the weight-noise streams, which use the same mixer with CRC32 keys.
STEP_SALT = 0x5A3C96E1
SAMPLE_INDEX_SALT = 0x3C6EF372
# Rows x vocab elements hashed at a time (bounds the int64 temporaries of the hash).
HASH_CHUNK_ELEMENTS = 1 << 24

LogprobsMode = Literal["sampled", "raw"]


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample the completions of one prompt (modeled on vLLM's SamplingParams).

    n: samples per prompt. temperature: 0 = greedy, else logits / temperature.
    top_p: nucleus mass in (0, 1]. top_k: -1 = off, else keep the k most likely tokens.
    max_tokens / min_tokens: bounds on generated tokens (stop tokens are masked until
    min_tokens are generated, and stop strings do not count before then).
    seed: per-request seed in [0, 2**63) (None: the engine draws one). stop_token_ids,
    stop (strings): finish with reason "stop". ignore_eos: EOS neither stops nor is
    masked. include_stop_str_in_output: keep the matched stop string in the text.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 256
    min_tokens: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        def bad(field: str, value, why: str) -> ValueError:
            return ValueError(f"SamplingParams.{field} {why}, got {value!r}")

        if not _is_int(self.n) or self.n < 1:
            raise bad("n", self.n, "must be an int >= 1")
        if not _is_real(self.temperature):
            raise bad("temperature", self.temperature, "must be a number")
        temperature = float(self.temperature)
        if not math.isfinite(temperature) or temperature < 0:
            raise bad("temperature", self.temperature, "must be finite and >= 0 (0 = greedy)")
        object.__setattr__(self, "temperature", temperature)
        if not _is_real(self.top_p) or not 0.0 < float(self.top_p) <= 1.0:  # also rejects NaN
            raise bad("top_p", self.top_p, "must be in (0, 1]")
        object.__setattr__(self, "top_p", float(self.top_p))
        if not _is_int(self.top_k) or not (self.top_k == -1 or self.top_k >= 1):
            raise bad("top_k", self.top_k, "must be -1 (off) or an int >= 1")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", self.max_tokens, "must be an int >= 1")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", self.min_tokens, f"must be an int in [0, max_tokens={self.max_tokens}]")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT):
            raise bad("seed", self.seed, "must be None or an int in [0, 2**63)")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        for s in stop:
            if not isinstance(s, str) or not s:
                raise bad("stop", self.stop, "must hold non-empty strings")
        object.__setattr__(self, "stop", stop)
        ids: tuple[Any, ...] = ((self.stop_token_ids,) if _is_int(self.stop_token_ids)
                                else tuple(self.stop_token_ids))
        for i in ids:
            if not _is_int(i) or i < 0:
                raise bad("stop_token_ids", self.stop_token_ids, "must hold ints >= 0")
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in ids))
        for field in ("n", "top_k", "max_tokens", "min_tokens", "seed"):  # numpy ints -> int
            if getattr(self, field) is not None:
                object.__setattr__(self, field, int(getattr(self, field)))
        for field in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, field), bool):
                raise bad(field, getattr(self, field), "must be a bool")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def all_stop_token_ids(self, eos_token_id: int | Iterable[int] | None) -> tuple[int, ...]:
        """Token ids that finish this request: stop_token_ids plus EOS unless ignore_eos."""
        ids = list(self.stop_token_ids)
        if not self.ignore_eos:
            ids += [i for i in _as_ids(eos_token_id) if i not in ids]
        return tuple(ids)


def _as_ids(eos_token_id: int | Iterable[int] | None) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, Iterable):
        return tuple(int(i) for i in eos_token_id)
    return (int(eos_token_id),)


# ----------------------------------------------------------------------------- randomness


def derive_sample_seed(request_seed: int, sample_index: int) -> int:
    """Seed of sample j of a request (its n samples must differ), in [0, 2**63).

    ``(k1, k2) = stream_keys(request_seed, j ^ SAMPLE_INDEX_SALT)`` and the seed is the
    64-bit word ``k2:k1`` with its top bit cleared. It depends only on (seed, j).
    """
    if not _is_int(request_seed) or not 0 <= request_seed < SEED_LIMIT:
        raise ValueError(f"request_seed must be an int in [0, 2**63), got {request_seed!r}")
    if not _is_int(sample_index) or not 0 <= sample_index <= M32:
        raise ValueError(f"sample_index must be a 32-bit unsigned int, got {sample_index!r}")
    k1, k2 = R.stream_keys(request_seed, sample_index ^ SAMPLE_INDEX_SALT)
    return ((k2 << 32) | k1) & (SEED_LIMIT - 1)


def row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row hash keys: vectorized ``noise_reference.stream_keys(seed, step ^ STEP_SALT)``.

    seeds, steps: int64 [B]. The seed's two 32-bit words are its low and high words
    (seeds are used bitwise: any int64 is accepted, a negative one as two's complement);
    the step is taken mod 2**32. Returns (k1, k2), int64 [B] in [0, 2**32).
    """
    seeds = seeds.to(torch.int64)
    lo = seeds & M32
    hi = (seeds >> 32) & M32
    key = (steps.to(torch.int64) & M32) ^ STEP_SALT
    # R.fmix32 updates its argument in place; every argument below is a fresh temporary.
    k1 = R.fmix32(lo ^ R.fmix32(key ^ R._c(R.N.KEY_SALT1)))
    k2 = R.fmix32(hi ^ R.fmix32((k1 + R._c(R.N.KEY_SALT2)) & M32))
    return k1, k2


def uniform_bits(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int,
                 rows: slice | None = None) -> torch.Tensor:
    """32 hash bits per (row, vocab id): ``pair_hash(v, k1_r, k2_r)``, int64 [B, V].

    ``pair_hash`` is ``lowbias32((v * (k1 | 1) + k2) mod 2**32)``: for a fixed row it is a
    bijection of v (odd multiplier, invertible finalizer), so no two vocab entries of a
    row share bits. v < 2**31 keeps every product inside int64.
    """
    if not 0 < vocab_size < 1 << 31:
        raise ValueError(f"vocab_size must be in [1, 2**31), got {vocab_size}")
    k1, k2 = row_keys(seeds, steps)
    if rows is not None:
        k1, k2 = k1[rows], k2[rows]
    v = torch.arange(vocab_size, dtype=torch.int64, device=seeds.device)
    return R.pair_hash(v[None, :], k1[:, None], k2[:, None])


def uniforms(bits: torch.Tensor) -> torch.Tensor:
    """The uniforms behind ``bits``: u = (h + 1/2) / 2**32 in fp64, in [2**-33, 1 - 2**-33]."""
    return (bits.to(torch.float64) + 0.5) * 2.0 ** -32


def exponentials(bits: torch.Tensor) -> torch.Tensor:
    """E = -log(u), u = (h + 1/2) / 2**32, computed in fp32 without losing either tail.

    For u < 1/2, -log(u) of the fp32 u (relative rounding 6e-8); for u >= 1/2,
    -log1p(-w) with w = 1 - u = (2**32 - 1 - h + 1/2) / 2**32 formed from the integer,
    so u near 1 (E near 0, the tokens' best draws) keeps full resolution instead of
    rounding to u = 1. u and w are both >= 2**-33 > 0: E is finite and in
    [~1.2e-10, ~22.9], so log(E) is finite.
    """
    scale = 2.0 ** -32
    low = bits < (1 << 31)
    u = (bits.to(torch.float32) + 0.5) * scale
    w = ((M32 - bits).to(torch.float32) + 0.5) * scale
    return torch.where(low, -torch.log(u), -torch.log1p(-w))


def _neg_log_exponentials(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Gumbel noise g = -log(E) [B, V] fp32, hashed in row chunks."""
    b = seeds.shape[0]
    out = torch.empty((b, vocab_size), dtype=torch.float32, device=seeds.device)
    step = max(1, HASH_CHUNK_ELEMENTS // vocab_size)
    for start in range(0, b, step):
        rows = slice(start, min(b, start + step))
        out[rows] = -torch.log(exponentials(uniform_bits(seeds, steps, vocab_size, rows)))
    return out


# ----------------------------------------------------------------------------- sampling


@dataclass
class SampleOutput:
    """tokens int64 [B] (-1 on bad rows), logprobs fp32 [B] (NaN on bad rows), bad_rows bool [B]."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    bad_rows: torch.Tensor


@dataclass
class RowState:
    """One step's per-row sampling inputs, on the device (the engine gathers them from its
    SamplingSlots)."""

    temperatures: torch.Tensor  # fp32 [B]
    top_p: torch.Tensor  # fp32 [B]
    top_k: torch.Tensor  # int64 [B]
    seeds: torch.Tensor  # int64 [B]
    steps: torch.Tensor  # int64 [B]: index of the token being generated
    truncates: bool  # some row has top-k or top-p (known on the host: no device read)
    # Set when some row still bars its stop tokens (step < min_tokens), else None:
    stop_ids: torch.Tensor | None = None  # int64 [B, S], each row's stop tokens padded with -1
    min_tokens: torch.Tensor | None = None  # int64 [B]

    @property
    def mask_stops(self) -> torch.Tensor | None:
        """bool [B]: the rows whose stop tokens are barred this step."""
        return None if self.min_tokens is None else self.steps < self.min_tokens


def filter_threshold(z: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per-row threshold [B] such that top-k then top-p keeps exactly {v : z_v >= thr}.

    z: fp32 [B, V] (temperature-scaled, may hold -inf); top_k int [B] (<= 0 or >= V:
    off); top_p fp32 [B] in (0, 1]. One descending sort for the whole batch.
    """
    b, v = z.shape
    sorted_z, _ = torch.sort(z, dim=-1, descending=True)
    k = top_k.to(device=z.device, dtype=torch.int64)
    k = torch.where((k <= 0) | (k > v), torch.full_like(k, v), k)
    kth = sorted_z.gather(1, (k - 1)[:, None])                            # [B, 1]
    sorted_z = sorted_z.masked_fill(sorted_z < kth, float("-inf"))        # top-k
    probs = torch.softmax(sorted_z, dim=-1)
    cum = torch.cumsum(probs, dim=-1)
    mass_before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)  # monotone
    p = top_p.to(device=z.device, dtype=torch.float32)[:, None]
    keep = ((mass_before < p) | (p >= 1.0)) & (sorted_z > float("-inf"))
    keep[:, 0] = True
    last = keep.sum(dim=-1, keepdim=True) - 1                             # keep is a prefix
    return sorted_z.gather(1, last).squeeze(1)


def bad_row_mask(logits: torch.Tensor) -> torch.Tensor:
    """Rows that cannot be sampled: any NaN or +inf, or no finite entry (all -inf)."""
    return (torch.isnan(logits) | (logits == float("inf"))).any(dim=-1) | \
        ~torch.isfinite(logits).any(dim=-1)


def sample(logits: torch.Tensor, temperatures: torch.Tensor, top_p: torch.Tensor,
           top_k: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor, *,
           logprobs_mode: LogprobsMode = "sampled", truncates: bool | None = None) -> SampleOutput:
    """Sample one token per row of ``logits`` [B, V] (see the module docstring).

    temperatures fp [B] (0 = greedy), top_p fp [B] in (0, 1], top_k int [B] (-1 = off),
    seeds int64 [B] (the per-sample seed, see ``derive_sample_seed``), steps int64 [B]
    (index of the token being generated: 0 for the first output token).
    logprobs_mode: "sampled" = log-prob under the distribution the token was drawn from
    (after temperature, top-k, top-p, renormalized); "raw" = log_softmax(logits) at the
    token. Greedy rows always report the raw log-prob. truncates: whether some row has top-k
    (below V) or top-p (below 1), when the caller knows (None: read from the device).
    """
    if logprobs_mode not in ("sampled", "raw"):
        raise ValueError(f"logprobs_mode must be 'sampled' or 'raw', got {logprobs_mode!r}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    b, v = logits.shape
    dev = logits.device
    for name, t in (("temperatures", temperatures), ("top_p", top_p), ("top_k", top_k),
                    ("seeds", seeds), ("steps", steps)):
        if t.shape != (b,):
            raise ValueError(f"{name} must have shape [{b}], got {tuple(t.shape)}")
    logits = logits.float()
    bad = bad_row_mask(logits)
    x = logits.masked_fill(bad[:, None], 0.0)              # bad rows: harmless placeholders
    shifted = x - x.max(dim=-1, keepdim=True).values       # <= 0, max entry exactly 0
    raw_lse = torch.logsumexp(shifted, dim=-1)

    temps = temperatures.to(device=dev, dtype=torch.float32)
    greedy = temps == 0
    z = shifted / torch.where(greedy, torch.ones_like(temps), temps)[:, None]
    top_k = top_k.to(device=dev)
    top_p = top_p.to(device=dev, dtype=torch.float32)
    if truncates is None:
        truncates = bool((((top_k > 0) & (top_k < v)) | (top_p < 1.0)).any())
    if truncates:
        thr = filter_threshold(z, top_k, top_p)
        z = z.masked_fill(z < thr[:, None], float("-inf"))
    keys = z + _neg_log_exponentials(seeds.to(dev), steps.to(dev), v)
    drawn = keys.argmax(dim=-1)
    tokens = torch.where(greedy, shifted.argmax(dim=-1), drawn)

    raw_lp = shifted.gather(1, tokens[:, None]).squeeze(1) - raw_lse
    if logprobs_mode == "raw":
        lp = raw_lp
    else:
        sampled_lp = z.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(z, dim=-1)
        lp = torch.where(greedy, raw_lp, sampled_lp)
    tokens = tokens.masked_fill(bad, -1)
    lp = lp.masked_fill(bad, float("nan"))
    return SampleOutput(tokens=tokens, logprobs=lp, bad_rows=bad)


def mask_stop_tokens(logits: torch.Tensor, stop_ids: torch.Tensor, num_generated: torch.Tensor,
                     min_tokens: torch.Tensor) -> torch.Tensor:
    """Set the stop tokens' logits to -inf (in place) on rows with fewer than min_tokens outputs.

    stop_ids: int64 [B, S], each row's ``params.all_stop_token_ids(eos)`` (EOS left out
    when ignore_eos) padded with -1 (see ``pad_stop_ids``); num_generated, min_tokens:
    int [B] (num_generated = the step of the token about to be sampled). The engine calls
    this before ``sample``. No host sync; duplicate ids are harmless. Returns ``logits``.
    """
    b, v = logits.shape
    if stop_ids.numel() == 0:
        return logits
    active = (num_generated.to(logits.device) < min_tokens.to(logits.device))[:, None]
    ids = stop_ids.to(device=logits.device, dtype=torch.int64)
    valid = active & (ids >= 0) & (ids < v)
    mask = torch.zeros((b, v + 1), dtype=torch.bool, device=logits.device)
    mask.scatter_(1, torch.where(valid, ids, torch.full_like(ids, v)), True)  # column v: dump
    return logits.masked_fill_(mask[:, :v], float("-inf"))


def pad_stop_ids(per_row: Sequence[Sequence[int]], device: torch.device | str | None = None) -> torch.Tensor:
    """Ragged per-row stop ids -> int64 [B, max(S, 1)] padded with -1."""
    width = max([len(r) for r in per_row] + [1])
    out = torch.full((len(per_row), width), -1, dtype=torch.int64)
    for i, row in enumerate(per_row):
        if row:
            out[i, :len(row)] = torch.tensor(list(row), dtype=torch.int64)
    return out.to(device) if device is not None else out


class Sampler:
    """The engine's sampler: owns the generator that seeds unseeded requests.

    ``Sampler(seed)``: requests without ``params.seed`` get one drawn, once per request,
    from a torch.Generator seeded with ``seed`` (so a run is reproducible given the
    engine's seed and the order requests are added). Sample j of a request uses
    ``derive_sample_seed(request_seed, j)``; its step-t draw depends on nothing else.
    """

    def __init__(self, seed: int = 0, logprobs_mode: LogprobsMode = "sampled"):
        if logprobs_mode not in ("sampled", "raw"):
            raise ValueError(f"logprobs_mode must be 'sampled' or 'raw', got {logprobs_mode!r}")
        self.generator = torch.Generator().manual_seed(seed)
        self.logprobs_mode = logprobs_mode
        # The fused kernel: None = on CUDA logits; True also runs it under Triton's interpreter.
        self.fused: bool | None = None

    def request_seed(self, params: SamplingParams) -> int:
        """params.seed, or a fresh draw in [0, 2**63 - 1) from the engine's generator."""
        if params.seed is not None:
            return params.seed
        return int(torch.randint(0, SEED_LIMIT - 1, (1,), generator=self.generator, dtype=torch.int64))

    def sample_seeds(self, params: SamplingParams) -> list[int]:
        """The per-sample seeds of the n samples of one request (draws once if unseeded)."""
        s = self.request_seed(params)
        return [derive_sample_seed(s, j) for j in range(params.n)]

    def __call__(self, logits: torch.Tensor, rows: RowState) -> SampleOutput:
        """One token per row of ``logits`` with the rows' inputs ``rows``, stop tokens barred
        where ``rows`` says so. On a GPU one fused kernel (psnrl/kernels/sampler.py: the same
        draws, no [B, V] temporaries, no host sync); elsewhere ``mask_stop_tokens`` then
        ``sample``, its torch reference."""
        if self.fused if self.fused is not None else logits.is_cuda:
            from psnrl.kernels.sampler import sample_rows

            tokens, logprobs, bad = sample_rows(logits, rows.seeds, rows.steps, rows.temperatures, rows.top_p,
                                                rows.top_k, stop_ids=rows.stop_ids, mask_stops=rows.mask_stops,
                                                logprobs_mode=self.logprobs_mode)
            return SampleOutput(tokens, logprobs, bad)
        if rows.stop_ids is not None and rows.min_tokens is not None:
            # On a copy: the logits may be a buffer the runner reuses.
            logits = mask_stop_tokens(logits.clone(), rows.stop_ids, rows.steps, rows.min_tokens)
        return sample(logits, rows.temperatures, rows.top_p, rows.top_k, rows.seeds, rows.steps,
                      logprobs_mode=self.logprobs_mode, truncates=rows.truncates)


def pack(out: SampleOutput) -> torch.Tensor:
    """float64 [B, 2]: each row's token (exact: ids are far below 2**53; -1 on a bad row) and
    log-prob, so a step reads its samples back in one copy."""
    return torch.stack((out.tokens.double(), out.logprobs.double()), dim=1)


# ----------------------------------------------------------------------------- stopping


class StopCheck(NamedTuple):
    finished: bool
    reason: Literal["stop", "length"] | None
    trim_text_to: int | None


class TokenIds(Protocol):
    """What a stop check reads of the generated tokens: their count and the latest."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> int: ...


def check_stop(token_ids_so_far: TokenIds, new_text_so_far: str, params: SamplingParams,
               eos_token_id: int | Iterable[int] | None, *, new_char_count: int | None = None) -> StopCheck:
    """Whether a request is finished after its latest token, checked in this order.

    token_ids_so_far: the generated tokens (prompt excluded), the latest last.
    new_text_so_far: their decoded text. Returns (finished, reason, trim_text_to):

    0. fewer than min_tokens generated: not finished (stop strings seen so far are
       ignored, as are stop tokens, which the sampler masks anyway).
    1. latest token is EOS (any of them if a list) and not ignore_eos: "stop".
    2. latest token in stop_token_ids: "stop". (In 1-2 the text is not trimmed; the
       engine decides whether a special token's text is shown.)
    3. a stop string occurs: the earliest occurrence (smallest start; among equal
       starts, the shortest string, i.e. the one completed first) wins: "stop", and the
       text is to be cut to ``text[:trim_text_to]`` with trim_text_to = its start, or
       its end with include_stop_str_in_output. Occurrences may span tokens. With
       ``new_char_count`` (chars the latest token appended) only occurrences that end
       in those chars count: O(1) per step, and occurrences completed before
       min_tokens are never matched later. Without it the whole text is searched.
    4. len(token_ids_so_far) >= max_tokens: "length".
    Otherwise (False, None, None).
    """
    n = len(token_ids_so_far)
    if n == 0:
        return StopCheck(False, None, None)
    by_token = stop_by_tokens(n, token_ids_so_far[-1], params, params.all_stop_token_ids(eos_token_id))
    if by_token == "stop" or n < params.min_tokens:
        return StopCheck(by_token is not None, by_token, None)
    best: tuple[int, int] | None = None
    for s in params.stop:
        start = 0
        if new_char_count is not None:
            start = max(0, len(new_text_so_far) - new_char_count - len(s) + 1)
        i = new_text_so_far.find(s, start)
        if i >= 0 and (best is None or (i, i + len(s)) < best):
            best = (i, i + len(s))
    if best is not None:
        return StopCheck(True, "stop", best[1] if params.include_stop_str_in_output else best[0])
    return StopCheck(by_token is not None, by_token, None)


def stop_by_tokens(num_generated: int, last: int, params: SamplingParams,
                   stop_ids: Container[int]) -> Literal["stop", "length"] | None:
    """The token rules of ``check_stop`` (0, 1-2 and 4) after ``num_generated`` >= 1 tokens, the
    latest ``last``: "stop" for a stop id (``params.all_stop_token_ids(eos)``), "length" at
    max_tokens, None before min_tokens or otherwise. ``check_stop`` puts the stop strings between
    "stop" and "length"; the engine calls this alone for requests without them."""
    if num_generated < params.min_tokens:
        return None
    if last in stop_ids:
        return "stop"
    return "length" if num_generated >= params.max_tokens else None
