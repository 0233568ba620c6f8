"""Per-token log-probs (and entropy) of sampled responses under the clean or a perturbed policy.

One forward over whole sequences (no KV cache); the lm_head and its softmax run
in chunks of response tokens under activation checkpointing, so the
[tokens x vocab] logits are never held for the whole batch, not even for backward.
``dual_stream_logprobs`` is the learner's pass: clean and perturbed log-probs of the
same tokens from one forward that reads each weight once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.checkpoint import checkpoint

from psnrl.engine.attention import AttentionMetadata
from psnrl.engine.model import CausalLM
from psnrl.engine.noise_spec import BatchNoise, NoiseSpec
from psnrl.kernels.lm_head_logprob import lm_head_logprob
from psnrl.kernels.profiling import nvtx_range
from psnrl.trainer.sigma import token_self_certainty


@dataclass
class TokenLogprobs:
    """Response tokens of every sequence, concatenated in order."""

    logprobs: torch.Tensor  # [N] fp32, differentiable when computed with grad
    entropy: torch.Tensor  # [N] fp32 entropy of the policy at each response position
    self_certainty: torch.Tensor  # [N] fp32 KL(uniform || policy) at each response position
    lengths: list[int]  # response tokens per sequence

    def split(self) -> list[torch.Tensor]:
        return list(torch.split(self.logprobs, self.lengths))

    def sequence_self_certainty(self) -> list[float]:
        """Mean self-certainty over each sequence's response tokens (NaN for an empty one)."""
        return [t.mean().item() if t.numel() else float("nan")
                for t in torch.split(self.self_certainty, self.lengths)]


@dataclass
class DualLogprobs:
    """The same response tokens under the clean policy and under the perturbed one."""

    clean: TokenLogprobs  # differentiable when computed with grad
    noisy: TokenLogprobs  # constants


@dataclass
class _Batch:
    """Sequences flattened for one cache-free forward, and the rows that predict responses."""

    ids: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    rows: torch.Tensor  # hidden row t-1 predicts response token t
    targets: torch.Tensor
    lengths: list[int]  # response tokens per sequence
    seq_lens: list[int]


def _flatten(sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int], device) -> _Batch:
    if len(sequences) != len(prompt_lens):
        raise ValueError(f"{len(sequences)} sequences but {len(prompt_lens)} prompt lengths: they must match")
    ids, positions, cu, rows, targets, lengths = [], [], [0], [], [], []
    for seq, n_prompt in zip(sequences, prompt_lens):
        if not 1 <= n_prompt <= len(seq):
            raise ValueError(f"prompt length {n_prompt} is outside [1, {len(seq)}] for a sequence "
                             f"of {len(seq)} tokens")
        start = cu[-1]
        ids.extend(seq)
        positions.extend(range(len(seq)))
        rows.extend(range(start + n_prompt - 1, start + len(seq) - 1))
        targets.extend(seq[n_prompt:])
        lengths.append(len(seq) - n_prompt)
        cu.append(start + len(seq))
    return _Batch(torch.tensor(ids, device=device), torch.tensor(positions, device=device),
                  torch.tensor(cu, dtype=torch.int32, device=device),
                  torch.tensor(rows, dtype=torch.long, device="cpu"),
                  torch.tensor(targets, dtype=torch.long, device=device), lengths,
                  [len(s) for s in sequences])


def _batch_noise(specs_per_seq: Sequence[NoiseSpec | None], seq_lens: Sequence[int],
                 device) -> BatchNoise | None:
    """Per-row noise of sequences laid out one after another (None entries: clean)."""
    specs = list(dict.fromkeys(s for s in specs_per_seq if s is not None))
    if not specs:
        return None
    index = {s: i for i, s in enumerate(specs)}
    row_spec = torch.repeat_interleave(torch.tensor([index[s] if s is not None else -1 for s in specs_per_seq],
                                                    device="cpu"),
                                       torch.tensor(list(seq_lens), device="cpu"))
    return BatchNoise(row_spec, specs, device)


def response_logprobs(model: CausalLM, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int],
                      noise: Sequence[NoiseSpec | None] | None = None,
                      chunk_tokens: int = 2048) -> TokenLogprobs:
    """log pi(token_t | tokens_<t) for every response token (positions >= prompt_len).

    ``noise``: one spec (or None = clean) per sequence; a perturbed sequence gives the
    perturbed policy's log-probs (no gradient flows through its noisy layers).
    """
    if noise is not None and len(noise) != len(sequences):
        raise ValueError(f"{len(sequences)} sequences but {len(noise)} noise entries: they must match")
    device = model.model.embed_tokens.weight.device
    b = _flatten(sequences, prompt_lens, device)
    batch_noise = _batch_noise(noise, b.seq_lens, device) if noise is not None else None
    hidden = model(b.ids, b.positions, AttentionMetadata(cu_seqlens_q=b.cu_seqlens), None, batch_noise)
    return _heads(model, hidden, b, batch_noise, 0, chunk_tokens)


def dual_stream_logprobs(model: CausalLM, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int],
                         noise: NoiseSpec | Sequence[NoiseSpec], chunk_tokens: int = 2048) -> DualLogprobs:
    """Clean and perturbed log-probs of the same responses from ONE forward (the learner's pass).

    Each linear layer runs the clean rows (autograd) and the noisy rows (``noise``: one
    spec, or one per sequence) in one kernel call; the noisy stream's activations are
    never saved for backward. Under ``torch.no_grad()`` it is the cheap mode for the
    old clean and noisy log-probs of a multi-minibatch update.
    """
    specs = [noise] * len(sequences) if isinstance(noise, NoiseSpec) else list(noise)
    if len(specs) != len(sequences) or not all(isinstance(s, NoiseSpec) for s in specs):
        raise ValueError(f"noise must be one NoiseSpec or one per sequence ({len(sequences)}), got {noise!r}")
    device = model.model.embed_tokens.weight.device
    b = _flatten(sequences, prompt_lens, device)
    # Rows of every noisy layer: [clean copy of the tokens | perturbed copy].
    batch_noise = _batch_noise([None] * len(specs) + specs, b.seq_lens * 2, device)
    hidden = model(b.ids, b.positions, AttentionMetadata(cu_seqlens_q=b.cu_seqlens), None, batch_noise,
                   dual=True)
    clean = _heads(model, hidden.clean, b, batch_noise, 0, chunk_tokens)
    with torch.no_grad():
        noisy = _heads(model, hidden.noisy, b, batch_noise, len(b.ids), chunk_tokens)
    return DualLogprobs(clean, noisy)


def _heads(model: CausalLM, hidden: torch.Tensor, b: _Batch, noise: BatchNoise | None, row_offset: int,
           chunk_tokens: int) -> TokenLogprobs:
    """The lm_head and its softmax over chunks of response rows (``noise`` rows start at row_offset).

    A clean lm_head goes through the fused kernel (psnrl/kernels/lm_head_logprob), which never
    holds [tokens x vocab] logits; a perturbed one materializes a chunk's logits and
    recomputes them in backward (activation checkpointing).
    """
    device = hidden.device
    logprobs, entropy, certainty = [], [], []
    for lo in range(0, len(b.rows), chunk_tokens):
        part = b.rows[lo:lo + chunk_tokens]
        part_noise = noise.select(part + row_offset) if noise is not None else None
        h = hidden[part.to(device)]
        tgt = b.targets[lo:lo + chunk_tokens]
        if part_noise is None or part_noise.rows("lm_head") is None:
            with nvtx_range("lm_head_logprob"):
                lp, ent, sc = lm_head_logprob(h, model.lm_head.weight, tgt, model.lm_head.bias)
            sc = sc.detach()
        elif torch.is_grad_enabled() and h.requires_grad:
            lp, ent, sc = checkpoint(_noisy_head, model, h, tgt, part_noise, use_reentrant=False)
        else:
            lp, ent, sc = _noisy_head(model, h, tgt, part_noise)
        logprobs.append(lp)
        entropy.append(ent)
        certainty.append(sc)
    empty = torch.zeros(0, device=device)
    return TokenLogprobs(*(torch.cat(x) if x else empty for x in (logprobs, entropy, certainty)), b.lengths)


def _noisy_head(model: CausalLM, h: torch.Tensor, targets: torch.Tensor, noise: BatchNoise):
    logp = torch.log_softmax(model.logits(h, noise), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(1, targets[:, None]).squeeze(1), entropy, token_self_certainty(logp.detach())


@torch.no_grad()
def last_hidden(model: CausalLM, token_ids: Sequence[int]) -> torch.Tensor:
    """Final hidden states [T, H] of one sequence under the clean policy (for embeddings)."""
    device = model.model.embed_tokens.weight.device
    meta = AttentionMetadata(cu_seqlens_q=torch.tensor([0, len(token_ids)], dtype=torch.int32, device=device))
    return model(torch.tensor(list(token_ids), device=device), torch.arange(len(token_ids), device=device), meta)
