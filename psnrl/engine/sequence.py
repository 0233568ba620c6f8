"""A sequence being generated: its tokens, its progress through the cache, its outcome."""
from __future__ import annotations

import enum
import operator
from dataclasses import dataclass, field

from psnrl.engine.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One sample of a request. ``tokens`` = prompt + generated; the KV of the first
    ``num_computed`` of them is in the cache."""

    seq_id: int
    request_id: int
    index: int  # which of the request's n samples
    prompt_len: int
    tokens: list[int]
    params: SamplingParams
    seed: int
    noise: int  # index into the step's noise specs, -1 = clean
    # Prefix-cache salt of the policy its KV comes from (engine.llm.noise_cache_salt):
    # None for the clean policy; forks keep it, like the noise.
    cache_salt: int | None = None
    status: Status = Status.WAITING
    num_computed: int = 0
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    text: str = ""
    # n > 1: the first sample prefills the prompt, then forks one sample per seed here.
    child_seeds: list[int] = field(default_factory=list)
    slot: int = -1  # its row of the engine's SamplingSlots, from its first sample on
    stop_ids: frozenset[int] = frozenset()  # tokens that finish it: params.all_stop_token_ids(eos)
    # The length it ends at: prompt + max_tokens, at most the engine's max_model_len (0: not known,
    # and the engine's overlap never runs it ahead).
    max_len: int = 0
    sample_row: int = -1  # its row in the samples of the last step that sampled it

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def output_tokens(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def generated(self) -> TokensFrom:
        """The generated tokens without copying them (a stop check per step stays O(1))."""
        return TokensFrom(self.tokens, self.prompt_len)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


# A field of each sequence of a batch, for map() on the per-step hot path (no Python frame per item).
seq_id_of = operator.attrgetter("seq_id")
num_computed_of = operator.attrgetter("num_computed")
noise_of = operator.attrgetter("noise")
slot_of = operator.attrgetter("slot")
sample_row_of = operator.attrgetter("sample_row")


class TokensFrom:
    """A read-only view of ``tokens[start:]``: its length and items, nothing copied."""

    __slots__ = ("tokens", "start")

    def __init__(self, tokens: list[int], start: int):
        self.tokens, self.start = tokens, start

    def __len__(self) -> int:
        return len(self.tokens) - self.start

    def __getitem__(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} tokens")
        return self.tokens[self.start + i if i >= 0 else i]
