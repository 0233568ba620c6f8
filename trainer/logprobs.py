"""Per-token log-probs (and entropy) of sampled responses under the clean or a perturbed policy.

One forward over whole sequences (no KV cache); the lm_head and its softmax run
in chunks of response tokens under activation checkpointing, so the
[tokens x vocab] logits are never held for the whole batch, not even for backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.checkpoint import checkpoint

from engine.attention import AttentionMetadata
from engine.model import CausalLM
from engine.noise_spec import BatchNoise, NoiseSpec
from trainer.sigma import token_self_certainty


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


def response_logprobs(model: CausalLM, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int],
                      noise: Sequence[NoiseSpec | None] | None = None,
                      chunk_tokens: int = 2048) -> TokenLogprobs:
    """log pi(token_t | tokens_<t) for every response token (positions >= prompt_len).

    ``noise``: one spec (or None = clean) per sequence; a perturbed sequence gives the
    perturbed policy's log-probs (no gradient flows through its noisy layers).
    """
    if len(sequences) != len(prompt_lens) or (noise is not None and len(noise) != len(sequences)):
        raise ValueError(f"{len(sequences)} sequences, {len(prompt_lens)} prompt lengths, "
                         f"{len(noise) if noise is not None else 0} noise entries: they must match")
    device = model.model.embed_tokens.weight.device
    ids, positions, cu, rows, targets, lengths = [], [], [0], [], [], []
    for seq, n_prompt in zip(sequences, prompt_lens):
        if not 1 <= n_prompt <= len(seq):
            raise ValueError(f"prompt length {n_prompt} is outside [1, {len(seq)}] for a sequence "
                             f"of {len(seq)} tokens")
        start = cu[-1]
        ids.extend(seq)
        positions.extend(range(len(seq)))
        rows.extend(range(start + n_prompt - 1, start + len(seq) - 1))  # position t-1 predicts t
        targets.extend(seq[n_prompt:])
        lengths.append(len(seq) - n_prompt)
        cu.append(start + len(seq))
    batch_noise = None
    specs = list(dict.fromkeys(s for s in (noise or []) if s is not None))
    if specs:
        index = {s: i for i, s in enumerate(specs)}
        row_spec = torch.repeat_interleave(
            torch.tensor([index[s] if s is not None else -1 for s in noise]),
            torch.tensor([len(s) for s in sequences]))
        batch_noise = BatchNoise(row_spec, specs, device)
    meta = AttentionMetadata(cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device))
    hidden = model(torch.tensor(ids, device=device), torch.tensor(positions, device=device), meta,
                   None, batch_noise)
    rows_t = torch.tensor(rows, dtype=torch.long)
    targets_t = torch.tensor(targets, dtype=torch.long, device=device)
    logprobs, entropy, certainty = [], [], []
    for lo in range(0, len(rows), chunk_tokens):
        part = rows_t[lo:lo + chunk_tokens]
        part_noise = batch_noise.select(part) if batch_noise is not None else None
        h = hidden[part.to(device)]
        tgt = targets_t[lo:lo + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            lp, ent, sc = checkpoint(_head, model, h, tgt, part_noise, use_reentrant=False)
        else:
            lp, ent, sc = _head(model, h, tgt, part_noise)
        logprobs.append(lp)
        entropy.append(ent)
        certainty.append(sc)
    empty = torch.zeros(0, device=device)
    return TokenLogprobs(*(torch.cat(x) if x else empty for x in (logprobs, entropy, certainty)), lengths)


def _head(model: CausalLM, h: torch.Tensor, targets: torch.Tensor, noise: BatchNoise | None):
    logp = torch.log_softmax(model.logits(h, noise), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(1, targets[:, None]).squeeze(1), entropy, token_self_certainty(logp.detach())


@torch.no_grad()
def last_hidden(model: CausalLM, token_ids: Sequence[int]) -> torch.Tensor:
    """Final hidden states [T, H] of one sequence under the clean policy (for embeddings)."""
    device = model.model.embed_tokens.weight.device
    meta = AttentionMetadata(cu_seqlens_q=torch.tensor([0, len(token_ids)], dtype=torch.int32, device=device))
    return model(torch.tensor(list(token_ids), device=device), torch.arange(len(token_ids), device=device), meta)
