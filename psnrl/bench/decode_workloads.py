"""The decode bench's workloads and how each is timed: the fixed and nano-vllm workloads, one
engine run step by step (each pure decode step split into forward, sampler and host time), one
transformers ``generate``, and the bytes a decode step must read (the roofline)."""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from psnrl.bench import model_configs

FIXED, NANO_VLLM = "fixed", "nano-vllm"
NANO_VLLM_SEQS = 256
NANO_VLLM_LENGTHS = (100, 1024)  # prompt and output lengths, uniform, both ends included

# Peak DRAM bandwidth in GB/s by device-name substring, first match wins (case-insensitive),
# so the more specific names come first. Vendor datasheet figures.
PEAK_GBPS: tuple[tuple[str, float], ...] = (
    ("GH200", 4000.0),
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),
    ("H800", 3350.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("A10G", 600.0),
    ("A10", 600.0),
    ("L4", 300.0),
    ("RTX 4090", 1008.0),
)


def peak_gbps(device_name: str) -> float | None:
    """The device's peak memory bandwidth (GB/s) from PEAK_GBPS, or None if unknown."""
    name = device_name.lower()
    for key, gbps in PEAK_GBPS:
        if key.lower() in name:
            return gbps
    return None


def decode_bytes_per_step(model, batch: int, context: float, dtype: torch.dtype | str) -> int:
    """Bytes one decode step of ``batch`` sequences with ``context`` cached tokens must read."""
    cfg = model_configs.get_config(model)
    elem = torch.empty(0, dtype=model_configs.as_dtype(dtype)).element_size()
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    params = model_configs.param_count(cfg)
    if not cfg.get("tie_word_embeddings", False):
        params -= vocab * hidden  # the input embedding is gathered, not read whole
    weights = (params + batch * hidden) * elem
    kv = batch * context * model_configs.kv_bytes_per_token(cfg, dtype)
    return int(weights + kv)


def mean_decode_context(prompt_len: int, output_len: int) -> float:
    """Mean cached tokens (new one included) over the decode steps: prompt_len + output_len / 2."""
    return prompt_len + output_len / 2



@dataclass
class Timing:
    total_s: float          # wall time of the whole generate call
    decode_ms: list[float]  # each pure decode step
    prefill_s: float        # steps that computed prompt tokens (HF: up to its first token)
    output_tokens: int
    # The engine's pure decode steps split (StepOutput's device times): forward, sampler, and
    # the rest of the wall time, when the device waits for the host. Empty for HF.
    forward_ms: list[float] = field(default_factory=list)
    sample_ms: list[float] = field(default_factory=list)
    host_ms: list[float] = field(default_factory=list)


@dataclass
class Workload:
    """The sequences of one measurement: each one's prompt and exact output length.

    Sequences of one group share a prompt (the same list object) and follow each other.
    """
    name: str
    prompts: list[list[int]]
    output_lens: list[int]
    group_size: int

    @property
    def batch(self) -> int:
        return len(self.prompts)

    @property
    def prompt_len(self) -> int:
        """The prompt length (its rounded mean when the lengths vary)."""
        return round(statistics.fmean(len(p) for p in self.prompts))

    @property
    def output_len(self) -> int:
        return round(statistics.fmean(self.output_lens))

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def fixed_workload(batch: int, prompt_len: int, output_len: int, group_size: int, vocab_size: int,
                   seed: int) -> Workload:
    """``batch`` sequences in groups of ``group_size`` sharing a random prompt (the last group may be short)."""
    gen = torch.Generator().manual_seed(seed * 7919 + batch)
    groups = math.ceil(batch / group_size)
    distinct = torch.randint(0, vocab_size, (groups, prompt_len), generator=gen).tolist()
    return Workload(FIXED, [distinct[i // group_size] for i in range(batch)], [output_len] * batch,
                    group_size)


def nano_vllm_workload(vocab_size: int, seed: int, seqs: int = NANO_VLLM_SEQS,
                       lengths: tuple[int, int] = NANO_VLLM_LENGTHS) -> Workload:
    """nano-vllm's benchmark: random prompts and output lengths, both uniform in ``lengths``."""
    gen = torch.Generator().manual_seed(seed * 7919 + 1)
    lo, hi = lengths
    prompt_lens = torch.randint(lo, hi + 1, (seqs,), generator=gen).tolist()
    output_lens = torch.randint(lo, hi + 1, (seqs,), generator=gen).tolist()
    prompts = [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in prompt_lens]
    return Workload(NANO_VLLM, prompts, output_lens, 1)


def sequence_noise(batch: int, mode: str, spec, group_size: int, probes: int) -> list:
    """Each sequence's NoiseSpec (None: clean). Mixed: in every run of ``group_size`` sequences
    the last ``probes`` are clean and the others noisy (so a lone sequence is noisy)."""
    if mode == "clean":
        return [None] * batch
    if mode == "noisy":
        return [spec] * batch
    if mode == "mixed":
        return [spec if i % group_size < group_size - probes else None for i in range(batch)]
    raise ValueError(f"not an engine mode: {mode!r}")


def engine_requests(work: Workload, noise: list) -> list[tuple[list[int], int, int, object]]:
    """(prompt, n, output_len, spec) per request: neighbours with the same prompt, length and
    noise become one request with n samples, which share the prompt's KV blocks."""
    requests: list[list] = []
    for prompt, length, spec in zip(work.prompts, work.output_lens, noise):
        last = requests[-1] if requests else None
        if last is not None and last[0] is prompt and last[2] == length and last[3] == spec:
            last[1] += 1
        else:
            requests.append([prompt, 1, length, spec])
    return [tuple(r) for r in requests]


def time_engine(llm, work: Workload, noise: list, *, greedy: bool, seed: int,
                sync: Callable[[], None]) -> Timing:
    """One ``llm.generate`` of the whole workload, every sequence to its exact length, timed per step."""
    from psnrl.engine.sampling import SamplingParams

    requests = engine_requests(work, noise)
    params = [SamplingParams(n=n, temperature=0.0 if greedy else 1.0, top_p=1.0, top_k=-1,
                             max_tokens=length, ignore_eos=True, seed=seed + i)
              for i, (_, n, length, _) in enumerate(requests)]
    llm.reset_prefix_cache()  # every run computes its prompts
    steps: list[tuple[float, bool]] = []  # (seconds, pure decode) of every step that ran a forward
    split: list[tuple[float, float, float]] = []  # (forward, sampler, rest) ms of the decode steps
    sync()
    t0 = time.perf_counter()
    outputs = llm.add_requests([r[0] for r in requests], params, noise=[r[3] for r in requests])
    while llm.has_unfinished_requests():
        t = time.perf_counter()
        # A step ends by reading samples back, so the time between returns is the step's period
        # (with the overlap, the step after it is already running: no sync here).
        out = llm.step()
        seconds = time.perf_counter() - t
        if out.num_seqs:
            steps.append((seconds, out.decode))
        if out.decode and out.forward_ms is not None and out.sample_ms is not None:
            split.append((out.forward_ms, out.sample_ms, 1e3 * seconds - out.forward_ms - out.sample_ms))
    total = time.perf_counter() - t0
    produced = 0
    for out, (_, n, length, _) in zip(outputs, requests):
        if len(out.outputs) != n:
            raise RuntimeError(f"request {out.request_id} returned {len(out.outputs)} of {n} samples")
        for completion in out.outputs:
            if len(completion.token_ids) != length or completion.finish_reason != "length":
                raise RuntimeError(f"request {out.request_id} stopped after {len(completion.token_ids)} "
                                   f"of {length} tokens ({completion.finish_reason})")
            produced += len(completion.token_ids)
    forward, sample, host = (list(x) for x in zip(*split)) if split else ([], [], [])
    return Timing(total, [1e3 * s for s, decode in steps if decode],
                  sum(s for s, decode in steps if not decode), produced, forward, sample, host)


def time_hf(model, prompts: list[list[int]], output_len: int, *, greedy: bool, seed: int,
            sync: Callable[[], None]) -> Timing:
    """One transformers ``generate`` of the batch to exactly ``output_len`` new tokens.

    A stopping criterion that never stops timestamps every generation step.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Clock(StoppingCriteria):
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            sync()
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    device = next(model.parameters()).device
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    clock = Clock()
    options = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=not greedy,
                   stopping_criteria=StoppingCriteriaList([clock]), pad_token_id=0)
    if not greedy:
        options.update(temperature=1.0, top_p=1.0, top_k=0)
    torch.manual_seed(seed)
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)
        sync()
        total = time.perf_counter() - t0
    new = out.shape[1] - ids.shape[1]
    if new != output_len:
        raise RuntimeError(f"transformers generated {new} of {output_len} tokens")
    times = [t0] + clock.times
    steps = [1e3 * (b - a) for a, b in zip(times[1:], times[2:])]
    return Timing(total, steps, times[1] - t0 if len(times) > 1 else total, new * ids.shape[0])


