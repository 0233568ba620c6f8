"""The rollout engine's front door: ``LLM(path).generate(prompts, params, noise)``.

Loads a local Hugging Face checkpoint, sizes a paged KV cache, and runs
continuous batching over the requests of a call. A call may mix clean requests
and requests with their own NoiseSpec; they share every forward and every read
of the weights.
"""
from __future__ import annotations

import atexit
import dataclasses
import gc
import hashlib
import itertools
import math
import numbers
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence as Seq

import numpy as np
import torch
from tqdm.auto import tqdm

from psnrl.engine.block_manager import BlockManager
from psnrl.engine.loader import load_model
from psnrl.engine.model_runner import FromSamples, ModelRunner, Samples
from psnrl.engine.noise_spec import NoiseSpec
from psnrl.engine.sampling import RowState, SamplingParams, Sampler, check_stop, pack, stop_by_tokens
from psnrl.engine.sampling_slots import SamplingSlots
from psnrl.engine.scheduler import Scheduler, SchedulerConfig, Step
from psnrl.engine.sequence import Sequence, Status, num_computed_of, sample_row_of, seq_id_of
from psnrl.kernels.splitk_workspace import release_workspace
from psnrl.kernels.profiling import nvtx_range

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Engines freeze what they hold out of the collector (LLM.__init__); at exit it goes back, so the
# shutdown collection finalizes it (extension modules report objects never finalized as leaks).
atexit.register(gc.unfreeze)
# KV cache on a CPU (no memory probe there): at most this many bytes unless num_kv_blocks is set.
CPU_KV_BYTES = 1 << 30


@dataclass(frozen=True)
class EngineConfig:
    dtype: str = "auto"  # "auto" (the checkpoint's), "float32", "bfloat16", "float16"
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    # Share of the GPU memory free when the engine starts that it may fill, weights and KV cache included.
    gpu_memory_utilization: float = 0.9
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    num_kv_blocks: int | None = None  # overrides the memory-based sizing
    watermark: float = 0.01  # blocks kept free when admitting new prompts
    seed: int = 0  # seeds requests that have no SamplingParams.seed
    device: str | None = None  # default: cuda if available
    logprobs_mode: Literal["sampled", "raw"] = "sampled"  # see engine.sampling.sample
    # False: on CUDA, pure decode steps replay CUDA graphs captured per batch-size bucket
    # (psnrl/engine/cuda_graphs.py), lazily, at the first step of each kind. True: every step runs
    # eagerly (debugging, profiling single kernels). A CPU always runs eagerly.
    enforce_eager: bool = False
    # True: each StepOutput carries the device time of its forward and of its sampler (CUDA
    # events; a CPU: the wall clock), which the decode bench splits a step's time with.
    time_steps: bool = False
    # True: while a graph decode step runs on the device, the next one is scheduled and launched,
    # its input tokens read on the device (see LLM.step); the host's work hides behind the GPU's.
    overlap: bool = True

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens)  # validates those


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]  # of each sampled token under the distribution it was drawn from
    finish_reason: str | None  # "stop", "length", "abort" or "error: ..."


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    noise: NoiseSpec | None
    outputs: list[CompletionOutput] = field(default_factory=list)  # by index once finished
    finished: bool = False  # every sample has ended


@dataclass
class StepOutput:
    """What one ``LLM.step()`` did."""

    finished: list[RequestOutput]  # requests whose last sample ended in this step
    num_finished_samples: int  # sequences that ended in this step (a progress bar's unit)
    num_seqs: int  # sequences the step's forward ran (0: none ran, e.g. every request ended early)
    decode: bool  # a pure decode step: one new token for each of them
    forward_ms: float | None = None  # with EngineConfig.time_steps: the forward's device time
    sample_ms: float | None = None  # ... and the sampler's


class LLM:
    """A paged-attention batched decoder for one model on one device."""

    def __init__(self, model: str | Path, **kwargs):
        unknown = set(kwargs) - {f.name for f in dataclasses.fields(EngineConfig)}
        if unknown:
            raise ValueError(f"unknown LLM options {sorted(unknown)}; valid: "
                             f"{sorted(f.name for f in dataclasses.fields(EngineConfig))}")
        self.config = cfg = EngineConfig(**kwargs)
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = None if cfg.dtype == "auto" else _DTYPES[cfg.dtype]
        # The memory budget is a share of what is free now, not of the device's total: other
        # processes or engines on the same GPU keep what they hold.
        free_at_start = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        self.closed = False
        self.model = load_model(model, dtype=dtype, device=self.device)
        mcfg = self.model.config
        self.tokenizer = _load_tokenizer(Path(model))
        self.max_model_len = cfg.max_model_len or mcfg.max_position_embeddings
        if self.max_model_len > mcfg.max_position_embeddings:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's "
                             f"max_position_embeddings={mcfg.max_position_embeddings}")
        num_blocks = cfg.num_kv_blocks or self._kv_blocks_for_memory(free_at_start)
        if num_blocks * cfg.block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks x {cfg.block_size} tokens = "
                f"{num_blocks * cfg.block_size} tokens, less than one sequence of max_model_len="
                f"{self.max_model_len}: lower max_model_len or give the cache more memory "
                f"(gpu_memory_utilization={cfg.gpu_memory_utilization}, num_kv_blocks)")
        self.num_kv_blocks = num_blocks
        self.blocks = BlockManager(num_blocks, cfg.block_size, cfg.watermark)
        self.sampler = Sampler(cfg.seed, cfg.logprobs_mode)
        # Room for every sequence a full batch runs, so graphs rarely see the tables move.
        self.slots = SamplingSlots(self.device, mcfg.vocab_size, capacity=2 * cfg.max_num_seqs)
        self.runner = ModelRunner(self.model, self.model.allocate_kv_cache(num_blocks, cfg.block_size),
                                  self.blocks, slots=self.slots, draw=self._draw,
                                  use_cuda_graphs=not cfg.enforce_eager,
                                  max_num_seqs=cfg.max_num_seqs, max_model_len=self.max_model_len)
        self.scheduler = Scheduler(SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens),
                                   self.blocks)
        self.eos_token_id = _eos_ids(Path(model), self.tokenizer)
        self._ids = itertools.count()
        self._pending: dict[int, tuple[RequestOutput, int]] = {}  # request id -> (its output, samples)
        self._specs: list[NoiseSpec] = []  # the noise streams of the queued requests (sequences index it)
        self._ahead: _Launched | None = None  # a step launched before the previous one's samples were read
        self._num_finished = 0  # sequences finished so far (a step launched ahead checks its own)
        # The model, tokenizer and caches live as long as the engine: keep them out of the
        # collector's full passes, which otherwise stall decode steps for a long time.
        gc.collect()
        gc.freeze()

    # -- sizing ---------------------------------------------------------------------------

    def _kv_bytes_per_block(self) -> int:
        m = self.model.config
        elem = self.model.model.embed_tokens.weight.element_size()
        return 2 * m.num_layers * self.config.block_size * m.num_kv_heads * m.head_dim * elem

    def _kv_blocks_for_memory(self, free_at_start: int | None) -> int:
        """Blocks that fit in gpu_memory_utilization x (memory free before the weights loaded),
        less what loading took; on a CPU, room for max_num_seqs full sequences up to CPU_KV_BYTES."""
        per_block = self._kv_bytes_per_block()
        if free_at_start is not None:
            free_now = torch.cuda.mem_get_info(self.device)[0]
            budget = free_at_start * self.config.gpu_memory_utilization - (free_at_start - free_now)
        else:
            per_seq = math.ceil(self.max_model_len / self.config.block_size) * per_block
            budget = min(CPU_KV_BYTES, per_seq * self.config.max_num_seqs)
        return max(int(budget // per_block), 0)

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Free what the engine holds on its device: KV cache, decode CUDA graphs and their
        memory pool, the noisy kernel's workspace and the engine's reference to the weights
        (a trainer that shares them keeps its own). Idempotent; the engine runs nothing after."""
        if self.closed:
            return
        self.closed = True
        if self._ahead is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the step launched ahead still runs on what is freed
        self._ahead = None
        self.runner.close()
        del self.runner.model, self.model, self.slots  # the engine runs nothing after close
        release_workspace(self.device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the cached blocks back, so the next engine can size its cache

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this LLM has been closed; build a new one")

    # -- requests -------------------------------------------------------------------------

    def generate(self, prompts: str | Seq[str] | Seq[int] | Seq[Seq[int]],
                 params: SamplingParams | Seq[SamplingParams] | None = None,
                 noise: NoiseSpec | Seq[NoiseSpec | None] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs keep the prompts' order.

        ``params`` and ``noise`` are one for all prompts or one per prompt; a prompt with
        noise None is sampled from the clean policy. A bad request (too long, empty)
        finishes with an "error: ..." reason; the others run. Malformed input (a token id
        that is not an integer, text without a tokenizer) raises ValueError before any
        request is queued. The call is all or nothing: on any exception, Ctrl-C included,
        the engine's requests are dropped and their blocks freed before the exception
        propagates, so the engine is ready for the next call.
        """
        self._check_open()
        try:  # a Ctrl-C while the requests are queued drops them too
            outputs = self.add_requests(prompts, params, noise)
            waiting = {o.request_id for o in outputs if not o.finished}
            total = sum(self._pending[r][1] for r in waiting)
            with tqdm(total=total, desc="generate", unit="seq", disable=not use_tqdm or total < 2) as bar:
                while waiting:
                    out = self.step()
                    bar.update(out.num_finished_samples)
                    waiting.difference_update(r.request_id for r in out.finished)
        except BaseException:
            self._abandon()
            raise
        return outputs

    def add_requests(self, prompts: str | Seq[str] | Seq[int] | Seq[Seq[int]],
                     params: SamplingParams | Seq[SamplingParams] | None = None,
                     noise: NoiseSpec | Seq[NoiseSpec | None] | None = None) -> list[RequestOutput]:
        """Queue requests (arguments as for ``generate``) for ``step()`` to run; returns their
        outputs, filled in as their samples end (``RequestOutput.finished``). Every prompt is
        checked and tokenized before any is queued."""
        self._check_open()
        prompt_list = _as_prompt_list(prompts)
        params_list = _per_prompt(params if params is not None else SamplingParams(), len(prompt_list),
                                  "params", SamplingParams)
        noise_list = _per_prompt(noise, len(prompt_list), "noise", NoiseSpec)
        tokens_list = [self._tokenize(p) for p in prompt_list]  # before anything is queued
        if not self.scheduler.has_work():
            self._specs = []  # no sequence refers to the old streams any more
        spec_index = {s: i for i, s in enumerate(self._specs)}
        for spec in noise_list:
            if spec is not None and spec not in spec_index:
                spec_index[spec] = len(self._specs)
                self._specs.append(spec)
        return [self._add_request(prompt, tokens, p, spec, spec_index.get(spec, -1))
                for prompt, tokens, p, spec in zip(prompt_list, tokens_list, params_list, noise_list)]

    def has_unfinished_requests(self) -> bool:
        return bool(self._pending)

    def step(self) -> StepOutput:
        """Run one engine step: schedule, one forward over every scheduled sequence, sample.

        With ``EngineConfig.overlap``, a pure decode step that replayed CUDA graphs is followed,
        before its samples are read, by the launch of the next decode step of the same sequences,
        whose input tokens the graphs read from the first step's samples on the device: the
        host's work for step t + 1 (scheduling, inputs) and for step t's samples (stop checks)
        runs while the GPU computes. A step() then returns the step before the one it launched;
        a sequence that stops at step t has computed one token more, which is dropped (its KV
        is never published). Steps where a sequence reaches max_tokens, where requests wait or a
        sequence would need a block that is not free run one at a time. On any exception, Ctrl-C
        included, every queued request is dropped and its blocks freed (a step interrupted half
        way leaves nothing consistent to continue from).
        """
        self._check_open()
        try:
            finished, num_seqs, decode, timer = self._step(self._specs)
        except BaseException:
            self._abandon()
            raise
        done = []
        for seq in finished:
            out, n = self._pending[seq.request_id]
            out.outputs.append(CompletionOutput(seq.index, seq.text, seq.output_tokens, seq.logprobs,
                                                seq.finish_reason))
            if len(out.outputs) == n:
                out.outputs.sort(key=lambda c: c.index)
                out.finished = True
                del self._pending[seq.request_id]
                done.append(out)
        times = timer.spans() if timer is not None and num_seqs else (None, None)
        return StepOutput(done, len(finished), num_seqs, decode, *times)

    def reset_prefix_cache(self) -> None:
        """Forget the cached prompt blocks (after a weight update their KV is stale)."""
        self.blocks.clear_prefix_cache()

    def _abandon(self) -> None:
        """Drop every queued request and free the blocks of its sequences (forks the scheduler
        had not seen yet included). The prefix cache keeps only KV that completed steps wrote
        (``_step`` publishes after its forward)."""
        self._ahead = None  # what it computes on the device is never read
        self.scheduler.abort_all()
        for seq_id in self.blocks.sequence_ids():
            self.blocks.free(seq_id)
        self._pending.clear()
        self._specs = []
        self.slots.reset()

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if not isinstance(prompt, str):
            return prompt
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer files: pass prompts as token ids")
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def _add_request(self, prompt: str | list[int], tokens: list[int], params: SamplingParams,
                     spec: NoiseSpec | None, noise_index: int) -> RequestOutput:
        rid = next(self._ids)
        text = prompt if isinstance(prompt, str) else None
        out = RequestOutput(rid, text, tokens, spec)
        error = None
        if not tokens:
            error = "error: empty prompt"
        elif len(tokens) >= self.max_model_len:
            error = (f"error: prompt of {len(tokens)} tokens leaves no room under "
                     f"max_model_len={self.max_model_len}")
        elif max(tokens) >= self.model.config.vocab_size or min(tokens) < 0:
            error = f"error: prompt token ids must be in [0, {self.model.config.vocab_size})"
        if error:
            out.outputs = [CompletionOutput(i, "", [], [], error) for i in range(params.n)]
            out.finished = True
            return out
        seeds = self.sampler.sample_seeds(params)
        seq = Sequence(seq_id=next(self._ids), request_id=rid, index=0, prompt_len=len(tokens),
                       tokens=list(tokens), params=params, seed=seeds[0], noise=noise_index,
                       stop_ids=frozenset(params.all_stop_token_ids(self.eos_token_id)),
                       max_len=min(len(tokens) + params.max_tokens, self.max_model_len),
                       cache_salt=noise_cache_salt(spec), child_seeds=seeds[1:])
        self.scheduler.add(seq)
        self._pending[rid] = (out, params.n)
        return out

    # -- one step -------------------------------------------------------------------------

    def _step(self, specs: list[NoiseSpec]) -> tuple[list[Sequence], int, bool, _StepTimer | None]:
        """Complete one step, launching it first unless it was launched ahead, and launch the
        next ahead where the overlap can: (the sequences that finished, how many sequences the
        forward ran, whether it was a pure decode step, its timer)."""
        launched = self._ahead or self._launch(specs)
        self._ahead = None
        live = self._can_launch_ahead(launched)
        if live is not None:
            self._ahead = self._launch_ahead(live, launched, specs)
        finished = self._complete(launched)
        if finished and self._ahead is not None and all(seq.finished for seq in self._ahead.sampling):
            self._ahead = None  # every sequence in it has stopped: nobody reads what it computes
        return finished, len(launched.step.seqs), launched.step.decode, launched.timer

    def _launch(self, specs: list[NoiseSpec]) -> _Launched:
        """Schedule a step, run its forward and sampler, and queue its samples' copy to the host."""
        timer = _StepTimer(self.device) if self.config.time_steps else None
        with nvtx_range("scheduler"):
            step = self.scheduler.schedule()
        for seq in step.preempted:  # its slot goes back; it takes one again when it next samples
            if seq.slot >= 0:
                self.slots.release(seq.slot)
                seq.slot = -1
        if not step.seqs:
            if step.finished:
                return _Launched(step, [], [], None, timer)
            raise RuntimeError("the scheduler found nothing to run while requests are pending")
        logits = self._forward(step, specs, timer)
        sampling = [step.seqs[i] for i in step.sampling_entries()]
        for seq, num_new in zip(step.seqs, step.num_new):
            seq.num_computed += num_new
        # The forward wrote these tokens' KV: their full blocks may now be shared.
        self.blocks.mark_computed_all([seq.seq_id for seq in step.seqs], [seq.num_computed for seq in step.seqs])
        rows = list(range(len(sampling)))
        for row in range(len(rows)):
            if sampling[row].child_seeds:  # forks sample from their parent's row
                for child in self._fork(sampling[row]):
                    sampling.append(child)
                    rows.append(row)
        if not sampling:
            return _Launched(step, [], [], None, timer)
        if len(rows) > logits.shape[0]:  # forks sample from their parent's row
            logits = logits[torch.tensor(rows, device=logits.device)]
        return self._sample(step, sampling, logits, timer)

    def _can_launch_ahead(self, prev: _Launched) -> list[Sequence] | None:
        """The overlap's rule: the step after ``prev`` is the decode step of exactly prev's live
        sequences (returned), none of which reaches its length limit with prev's token, that fits
        the decode graphs and the free blocks; and prev's samples are on the device where the
        graphs read them. None where it is not."""
        if not (self.config.overlap and prev.samples is not None and prev.on_graph and prev.step.decode):
            return None
        live = [seq for seq in prev.sampling if seq.status is not Status.FINISHED]
        if not live or len(live) != self.scheduler.num_running or len(live) > self.config.max_num_batched_tokens:
            return None
        if self.scheduler.waiting and len(live) < self.config.max_num_seqs:
            return None  # the schedule would admit a waiting sequence
        graphs = self.runner.graphs
        if graphs is None or graphs.disabled or len(live) > graphs.buckets[-1]:
            return None
        if any(len(seq.tokens) + 1 >= seq.max_len for seq in live):  # prev's token ends one: it must be read
            return None
        return live if self.blocks.can_append_all(list(map(seq_id_of, live))) else None

    def _launch_ahead(self, live: list[Sequence], prev: _Launched, specs: list[NoiseSpec]) -> _Launched:
        """Launch the decode step of ``live``, the sequences still running after ``prev``, before
        reading prev's samples: each holds a placeholder for its token from prev, which the forward
        reads on the device."""
        timer = _StepTimer(self.device) if self.config.time_steps else None
        for seq in live:
            seq.tokens.append(UNREAD_TOKEN)
        with nvtx_range("scheduler"):
            step = self.scheduler.schedule()
        if not step.decode or step.finished or len(step.seqs) != self.scheduler.num_running:
            raise RuntimeError("the step scheduled ahead is not the decode step of the running sequences")
        assert prev.device_samples is not None  # _can_launch_ahead checked it
        from_samples = FromSamples(list(map(sample_row_of, step.seqs)), prev.device_samples)
        logits = self._forward(step, specs, timer, from_samples)
        for seq in step.seqs:
            seq.num_computed += 1  # published once prev's tokens are known (_complete)
        launched = self._sample(step, step.seqs, logits, timer)
        launched.horizons = (list(map(seq_id_of, step.seqs)), list(map(num_computed_of, step.seqs)))
        return launched

    def _forward(self, step: Step, specs: list[NoiseSpec], timer: _StepTimer | None,
                 from_samples: FromSamples | None = None) -> torch.Tensor:
        """A scheduled step's copy-on-writes and forward: the logits of its sampling entries."""
        self.runner.copy_blocks(step.copies)
        if timer is not None:
            timer.mark()
        with nvtx_range("decode_step" if step.decode else "prefill"):
            logits = self.runner.run(step, specs, from_samples)
        if timer is not None:
            timer.mark()
        return logits

    def _sample(self, step: Step, sampling: list[Sequence], logits: torch.Tensor,
                timer: _StepTimer | None) -> _Launched:
        """Sample a step's rows and queue the copy of the samples to the host."""
        for row, seq in enumerate(sampling):
            seq.sample_row = row
            if seq.slot < 0:  # its first sample: its constants go to the device once
                seq.slot = self.slots.acquire(seq.seed, seq.params, seq.stop_ids)
        slots = [seq.slot for seq in sampling]
        generated = [len(seq.tokens) - seq.prompt_len for seq in sampling]
        if timer is not None:
            timer.mark()
        with nvtx_range("sample"):
            packed = self.runner.sample(logits, slots, generated)
        if timer is not None:
            timer.mark()
        return _Launched(step, sampling, generated, self.runner.read_back(packed), timer,
                         on_graph=self.runner.sampled_by_graph, device_samples=packed,
                         num_finished=self._num_finished)

    def _complete(self, launched: _Launched) -> list[Sequence]:
        """Read a launched step's samples and apply them: tokens, log-probs, stop checks."""
        finished = list(launched.step.finished)
        if launched.samples is None:
            return finished
        tokens, logprobs = launched.samples.wait()  # one copy to the host (tokens exact in float64)
        some_stopped = self._num_finished != launched.num_finished  # since it launched (the overlap)
        if launched.horizons is not None:  # launched ahead; its input tokens are known now: publish its KV
            ids, horizons = launched.horizons
            if some_stopped:  # those are not in the block manager any more
                live = [(i, n) for seq, i, n in zip(launched.step.seqs, ids, horizons)
                        if seq.status is not Status.FINISHED]
                ids, horizons = [i for i, _ in live], [n for _, n in live]
            self.blocks.mark_computed_all(ids, horizons)
        stops: list[tuple[Sequence, str]] = []
        text = self.tokenizer is not None
        # The next step, launched ahead, holds a placeholder for the token of each live sequence.
        placeholders = self._ahead is not None
        bad = False
        for seq, n, token, lp in zip(launched.sampling, launched.generated, tokens, logprobs):
            if some_stopped and seq.status is Status.FINISHED:  # it stopped at the step before (overlap)
                continue
            pos = seq.prompt_len + n
            if token < 0:  # a bad row
                del seq.tokens[pos:]  # with the placeholder
                stops.append((seq, "error: non-finite logits"))
                bad = True
                continue
            if placeholders:
                seq.tokens[pos] = token
            else:
                seq.tokens.append(token)
            seq.logprobs.append(lp)
            # Only a stop id or the length can end it by the token rules (max_len is where the
            # length rule fires): the rules run then, or for requests with stop strings.
            if token in seq.stop_ids or pos + 1 >= seq.max_len or (text and seq.params.stop):
                reason = self._stop_reason(seq)
                if reason is not None:
                    stops.append((seq, reason))
        if placeholders:  # the block manager's too, before any of them finishes (and leaves it)
            if some_stopped or bad:
                live = [(seq.seq_id, token) for seq, token in zip(launched.sampling, tokens)
                        if token >= 0 and seq.status is not Status.FINISHED]
                self.blocks.set_last_tokens([i for i, _ in live], [t for _, t in live])
            else:
                self.blocks.set_last_tokens(list(map(seq_id_of, launched.sampling)), tokens)
        for seq, reason in stops:
            self._finish(seq, reason)
            finished.append(seq)
        return finished

    def _draw(self, logits: torch.Tensor, rows: RowState) -> torch.Tensor:
        """The sampler's draw, packed for one copy back ([B, 2] float64: token, log-prob)."""
        return pack(self.sampler(logits, rows))

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """After its prompt is computed, a request's first sequence spawns its other samples."""
        children = []
        for j, seed in enumerate(parent.child_seeds, start=1):
            child = dataclasses.replace(parent, seq_id=next(self._ids), index=j, tokens=list(parent.tokens),
                                        seed=seed, logprobs=[], child_seeds=[], slot=-1)
            self.blocks.fork(parent.seq_id, child.seq_id)
            self.scheduler.add_running(child)
            children.append(child)
        parent.child_seeds = []
        return children

    def _stop_reason(self, seq: Sequence) -> str | None:
        if seq.params.stop and self.tokenizer is not None:
            return self._stop_reason_text(seq)
        # No text to watch: the token rules alone, on the sequence's precomputed stop ids.
        reason = stop_by_tokens(len(seq.tokens) - seq.prompt_len, seq.tokens[-1], seq.params, seq.stop_ids)
        return reason or ("length" if len(seq.tokens) >= self.max_model_len else None)

    def _stop_reason_text(self, seq: Sequence) -> str | None:
        # Text is decoded every step only for requests with stop strings; the others are
        # decoded once when they finish (decoding a long rollout per token is quadratic).
        before = len(seq.text)
        seq.text = self.tokenizer.decode(seq.output_tokens, skip_special_tokens=True)
        check = check_stop(seq.generated, seq.text, seq.params, self.eos_token_id,
                           new_char_count=len(seq.text) - before)
        if check.trim_text_to is not None:
            seq.text = seq.text[:check.trim_text_to]
        if check.finished:
            return check.reason
        if seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        self._num_finished += 1
        if seq.slot >= 0:
            self.slots.release(seq.slot)
            seq.slot = -1
        if not seq.params.stop and self.tokenizer is not None:
            seq.text = self.tokenizer.decode(seq.output_tokens, skip_special_tokens=True)
        self.scheduler.finish(seq, reason)

    # -- weights --------------------------------------------------------------------------

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy new values into the model's parameters in place (Hugging Face names).

        The prefix cache is dropped: KV computed with the old weights is stale. A step the
        overlap launched before the call (sequences still running) computes with the old weights.
        """
        self._check_open()
        params = dict(self.model.named_parameters())
        for name, tensor in named_tensors:
            if name not in params:
                raise ValueError(f"update_weights: no parameter named {name!r}")
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise ValueError(f"update_weights: {name} has shape {tuple(params[name].shape)}, "
                                 f"got {tuple(tensor.shape)}")
            params[name].copy_(tensor)
        self.reset_prefix_cache()


# The token of a sequence whose step was launched before the previous step's samples were read
# (the overlap): its value is on the device until ``_complete`` sets it.
UNREAD_TOKEN = -1


@dataclass
class _Launched:
    """A step whose forward and sampler are queued on the device; its samples not read yet."""

    step: Step
    sampling: list[Sequence]  # the sequences it samples for, in the order of its sample rows
    generated: list[int]  # each one's tokens generated before this one (the sampler's step)
    samples: Samples | None  # their copy to the host; None: nothing sampled
    timer: _StepTimer | None
    on_graph: bool = False  # sampled by a sampler graph, whose output a graph step can read
    device_samples: torch.Tensor | None = None  # the packed samples on the device
    # How many sequences the engine had finished when it launched (more since: some of its own
    # may have stopped at the step before, the overlap).
    num_finished: int = 0
    # Launched ahead (the overlap): its sequences' ids and computed horizons, published
    # (mark_computed) only once its input tokens are read: no block is shared under a
    # placeholder's hash.
    horizons: tuple[list[int], list[int]] | None = None


class _StepTimer:
    """Marks on the device's timeline (CUDA events; a CPU: the wall clock) around a step's
    forward and its sampler; read once the step has copied its tokens back, so no extra sync."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def spans(self) -> tuple[float | None, float | None]:
        """(forward ms, sampler ms); None for a span the step did not reach (nothing sampled)."""
        def span(i: int) -> float | None:
            if len(self.marks) < i + 2:
                return None
            a, b = self.marks[i], self.marks[i + 1]
            return a.elapsed_time(b) if self.cuda else 1e3 * (b - a)
        return span(0), span(2)


def noise_cache_salt(spec: NoiseSpec | None) -> int | None:
    """Prefix-cache salt of the KV a request's policy writes: None where it is the clean
    policy's (no spec, sigma 0, or noise on the lm_head alone, which never reaches K/V),
    else a stable 64-bit digest of the spec.

    The block manager shares cached blocks only between sequences with equal salts. The
    digest (BLAKE2b, 8 bytes) covers the seed, sigma's float64 bits and the sorted groups
    that shape K/V (mlp, attn); unlike ``hash()`` it is the same in every process.
    """
    if spec is None or spec.sigma == 0:
        return None
    groups = sorted(spec.groups - {"lm_head"})
    if not groups:
        return None
    payload = struct.pack("<Qd", spec.seed, float(spec.sigma)) + ",".join(groups).encode()
    digest = hashlib.blake2b(payload, digest_size=8, person=b"psnrl-kv-salt").digest()
    return int.from_bytes(digest, "little")


def _as_prompt_list(prompts) -> list[str | list[int]]:
    """Prompts as text or lists of Python ints: one prompt (a string, or a flat sequence of token
    ids) or a sequence of them. Token ids may be ints or integer numpy / torch scalars; a bool, a
    float or anything else is refused with its value and position."""
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(_is_scalar(t) for t in prompts):
        prompts = [prompts]
    return [p if isinstance(p, str) else _token_ids(p, i) for i, p in enumerate(prompts)]


def _is_scalar(t) -> bool:
    return isinstance(t, (numbers.Number, np.generic)) or (isinstance(t, torch.Tensor) and t.dim() == 0)


def _token_ids(prompt, index: int) -> list[int]:
    if isinstance(prompt, (np.ndarray, torch.Tensor)):
        if prompt.ndim != 1:
            raise ValueError(f"prompt {index}: token ids must be 1-D, got shape {tuple(prompt.shape)}")
        prompt = list(prompt)
    elif not isinstance(prompt, (list, tuple)):
        raise ValueError(f"prompt {index}: a prompt must be a string or a sequence of token ids, "
                         f"got {type(prompt).__name__}")
    ids = []
    for position, t in enumerate(prompt):
        if isinstance(t, torch.Tensor) and t.dim() == 0 and not (t.is_floating_point() or t.is_complex()
                                                                  or t.dtype == torch.bool):
            t = t.item()
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, numbers.Integral):
            kind = "a bool" if isinstance(t, (bool, np.bool_)) else f"a {type(t).__name__}"
            raise ValueError(f"prompt {index}, position {position}: {t!r} is {kind}, not an integer token id")
        ids.append(int(t))
    return ids


def _per_prompt(value, n: int, name: str, kind: type) -> list:
    if value is None or isinstance(value, kind):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} prompts")
    for v in values:
        if v is not None and not isinstance(v, kind):
            raise ValueError(f"{name} entries must be {kind.__name__}, got {type(v).__name__}")
    return values


def _load_tokenizer(path: Path):
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                              "tokenizer.model")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _eos_ids(path: Path, tokenizer) -> list[int]:
    """EOS ids from generation_config.json, else the tokenizer's."""
    import json
    gen = path / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return [tokenizer.eos_token_id]
    return []
