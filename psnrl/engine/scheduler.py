"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Each step has a token budget shared by decodes (one token each) and prefills
(chunked when a prompt is longer than what is left of the budget). Running
sequences go first; waiting ones are admitted first come, first served while
blocks and budget last. When the cache runs out, the most recently admitted
running sequence is preempted: its blocks are freed and it goes back to the
front of the queue to be recomputed later (its generated tokens are kept).
"""
from __future__ import annotations

import bisect
import itertools
from collections import deque
from dataclasses import dataclass, field

from psnrl.engine.block_manager import BlockManager, OutOfBlocks
from psnrl.engine.sequence import Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass
class Step:
    """The sequences of one forward and how many tokens each computes (parallel lists: a step
    allocates no object per sequence)."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)  # tokens whose KV it computes, from num_computed on
    # Entries whose tokens stop short of their sequence's last one (a prefill chunk): they sample nothing.
    partial: list[int] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) KV blocks to copy first
    finished: list[Sequence] = field(default_factory=list)  # ended while scheduling (cannot fit)
    preempted: list[Sequence] = field(default_factory=list)  # sent back to the queue to make room
    num_tokens: int = 0  # tokens the forward computes, all sequences together

    @property
    def decode(self) -> bool:
        """A pure decode step: one new token per sequence."""
        return bool(self.seqs) and self.num_tokens == len(self.seqs)

    def sampling_entries(self) -> list[int]:
        """The entries that reach their sequence's last token, so yield its next token's logits."""
        if not self.partial:
            return list(range(len(self.seqs)))
        partial = set(self.partial)
        return [i for i in range(len(self.seqs)) if i not in partial]

    def add(self, seq: Sequence, n: int) -> None:
        """Schedule ``n`` of ``seq``'s uncomputed tokens."""
        if n < seq.num_uncomputed:
            self.partial.append(len(self.seqs))
        self.seqs.append(seq)
        self.num_new.append(n)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, blocks: BlockManager):
        self.cfg = cfg
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._finished_running = 0  # finished sequences still in ``running``, dropped at the next schedule
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence that already owns blocks (a fork of a running one)."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    @property
    def num_running(self) -> int:
        """Running sequences that have not finished."""
        return len(self.running) - self._finished_running

    def has_work(self) -> bool:
        return bool(self.waiting) or self.num_running > 0

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished and give its blocks back (O(1): ``running`` drops it at the next schedule)."""
        if seq.status is Status.RUNNING:
            self.blocks.free(seq.seq_id)
            self._finished_running += 1
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def abort_all(self) -> list[Sequence]:
        """Finish every waiting and running sequence with reason "abort" and free the blocks
        they hold, whatever state an interrupted step left them in."""
        self._drop_finished()
        seqs = [*self.running, *self.waiting]
        self.running, self.waiting = [], deque()
        for seq in seqs:
            if self.blocks.has_sequence(seq.seq_id):
                self.blocks.free(seq.seq_id)
            seq.status = Status.FINISHED
            seq.finish_reason = "abort"
        return seqs

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.seq_id)
        self.running.remove(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _drop_finished(self) -> None:
        if self._finished_running:
            self.running = [seq for seq in self.running if seq.status is Status.RUNNING]
            self._finished_running = 0

    def schedule(self) -> Step:
        self._drop_finished()
        budget = self.cfg.max_num_batched_tokens
        step = Step()
        # 1. Running sequences: their new tokens need slots; preempt from the back when out of blocks.
        i = 0
        while i < len(self.running) and budget > 0:
            i, budget = self._schedule_decodes(step, i, budget)
            if i == len(self.running) or budget <= 0:
                break
            seq = self.running[i]  # one the batched call stopped at
            if not self._reserve(seq, step):
                continue  # seq itself was preempted; the same index now holds the next one
            n = min(seq.num_uncomputed, budget)
            step.add(seq, n)
            budget -= n
            i += 1
        # 2. Waiting sequences, first come first served.
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            alone = not self.running
            if not alone and not self.blocks.can_allocate(seq.num_tokens):
                break
            try:
                # The salt keeps a noisy sequence off blocks computed by another policy.
                cached = self.blocks.allocate(seq.seq_id, seq.tokens, num_scheduled=0,
                                              cache_salt=seq.cache_salt)
            except OutOfBlocks:
                if alone:  # the cache holds max_model_len (checked at start-up); the watermark aside
                    self.waiting.popleft()
                    seq.status = Status.FINISHED
                    seq.finish_reason = "error: the prompt does not fit in the KV cache"
                    step.finished.append(seq)
                    continue
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            seq.num_computed = cached
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            step.add(seq, n)
            budget -= n
        step.num_tokens = self.cfg.max_num_batched_tokens - budget  # each scheduled token took one
        return step

    def _schedule_decodes(self, step: Step, start: int, budget: int) -> tuple[int, int]:
        """Schedule ``running[start:]`` while the budget lasts, reserving in one block-manager call
        the token each sampled last step; stops at the first the call leaves (one that needs a
        block when none is free). Returns (where it stopped, the budget left)."""
        seqs = self.running[start:start + budget]  # each takes at least one token of the budget
        new = [len(seq.tokens) - seq.num_computed for seq in seqs]
        if sum(new) > budget:
            seqs = seqs[:bisect.bisect_left(list(itertools.accumulate(new)), budget) + 1]
        done, copies = self.blocks.append_last_tokens([seq.seq_id for seq in seqs], [seq.tokens[-1] for seq in seqs],
                                                      [len(seq.tokens) for seq in seqs])
        step.copies += copies
        # The KV these tokens get is published (mark_computed) only once the step has run.
        if done <= budget and new.count(1) == len(new):  # the usual decode step: one token each
            step.seqs += seqs[:done]
            step.num_new += [1] * done
            return start + done, budget - done
        for seq, n in zip(seqs[:done], new):
            step.add(seq, min(n, budget))
            budget -= n
        return start + done, max(budget, 0)

    def _reserve(self, seq: Sequence, step: Step) -> bool:
        """Give the block manager the tokens it has not seen; False if ``seq`` had to be preempted."""
        seen = self.blocks.num_tokens(seq.seq_id)
        while seen < len(seq.tokens):
            try:
                result = self.blocks.append_token(seq.seq_id, seq.tokens[seen])
            except OutOfBlocks:
                victim = self.running[-1]
                self._preempt(victim)
                step.preempted.append(victim)
                if victim is seq:
                    return False
                continue
            seen += 1
            if result.cow is not None:
                step.copies.append(result.cow)
        return True
