"""Compile psnrl's Triton kernels for sm_90 on any machine and count their SASS (registers, spills,
instructions); ``compile_all_launches`` compiles what the wrappers launch. psnrl/bench/README.md.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Callable, Iterator
from unittest import mock

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("kernel-sass compiles for the GPU: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, CompiledKernel  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from psnrl.bench import model_configs  # noqa: E402
from psnrl.bench.common import TORCH_DTYPES  # noqa: E402
from psnrl.kernels import noise  # noqa: E402
from psnrl.kernels.lm_head_logprob import lm_head_logprob  # noqa: E402
from psnrl.kernels.noise import FILL_BITS, FILL_NOISE, _fill_kernel  # noqa: E402
from psnrl.kernels.noise_rows import NoiseStream, StreamRows  # noqa: E402
from psnrl.kernels.noisy_linear import _noisy_linear_kernel, dual_linear, noisy_gate_up, noisy_linear  # noqa: E402
from psnrl.kernels.kv_store import store_kv_skip_padding  # noqa: E402
from psnrl.kernels.paged_attention import (paged_attention, paged_decode_attention, pick_num_splits,  # noqa: E402
                                     prefill_attention)
from psnrl.kernels.sampler import sample_rows  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
# Dynamic shared memory one block may use on an H100 (sm_90 opt-in maximum).
HOPPER_MAX_SHARED = 232448
DTYPES = TORCH_DTYPES
_SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\s+`?\(?(\.L_x_\d+)")
# The noise budget: generating a weight element's noise and adding it to the tile must cost
# at most this many issued SASS instructions in the fused matmul's K loop (kernels/README.md).
NOISE_BUDGET = 16


def compile_for(fn, types: dict[str, str], constexprs: dict, target: GPUTarget = HOPPER, **options):
    """Compile a @triton.jit function for ``target``; ``types`` maps each runtime arg to a Triton type."""
    signature = {name: ("constexpr" if name in constexprs else types[name]) for name in fn.arg_names}
    index = {name: i for i, name in enumerate(fn.arg_names)}
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(index[k],): v for k, v in constexprs.items()})
    return triton.compile(src, target=target, options=options)


def _run_tool(tool: str, args: list[str], cubin: bytes) -> str:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(path), *args, f.name], capture_output=True, text=True,
                              check=True).stdout


def sass_opcodes(kernel) -> collections.Counter:
    """Histogram of SASS opcodes (without modifiers) of a compiled kernel."""
    text = _run_tool("nvdisasm", ["-c"], kernel.asm["cubin"])
    return collections.Counter(op for op in _SASS_OP.findall(text) if op != "NOP")


def resources(kernel) -> dict[str, int]:
    """Registers and stack/shared/local bytes, from cuobjdump (spills land on the stack)."""
    text = _run_tool("cuobjdump", ["--dump-resource-usage"], kernel.asm["cubin"])
    reg, stack, shared, local = (int(v) for v in _RESOURCES.search(text).groups())
    return {"registers": reg, "stack": stack, "shared": shared, "local": local}


def loop_body_opcodes(kernel) -> collections.Counter:
    """Opcode histogram of the largest loop of a compiled kernel (the span from a label to the
    backward branch that returns to it): a matmul's steady-state K step."""
    lines = _run_tool("nvdisasm", ["-c"], kernel.asm["cubin"]).splitlines()
    labels: dict[str, int] = {}
    best = (0, -1)
    for i, line in enumerate(lines):
        if (m := _LABEL.match(line)):
            labels[m.group(1)] = i
        elif (m := _BRANCH.search(line)) and m.group(1) in labels and i - labels[m.group(1)] > best[1] - best[0]:
            best = (labels[m.group(1)], i)
    return collections.Counter(op for op in _SASS_OP.findall("\n".join(lines[best[0]:best[1] + 1]))
                               if op != "NOP")


@triton.jit
def _keep_weight(w, k1, k2, rows, col0, in_features, scale2, BC: tl.constexpr, PAIRED: tl.constexpr):
    return w


def without_noise(fn: JITFunction) -> JITFunction:
    """A twin of a kernel whose ``noise.perturb_tile`` returns the weight tile unchanged: the
    difference of the two K loops is what generating and applying the noise costs. The
    kernel's helpers from its own module are copied too, so that none reaches the real one."""
    stub = types.ModuleType("noise_without_noise")
    stub.__dict__.update(vars(noise))
    stub.perturb_tile = _keep_weight
    copies: dict[JITFunction, JITFunction] = {}

    def copy(f: JITFunction) -> JITFunction:
        if f not in copies:
            glob = dict(f.fn.__globals__, noise=stub)
            twin = types.FunctionType(f.fn.__code__, glob, f.fn.__name__, f.fn.__defaults__, f.fn.__closure__)
            twin.__module__, twin.__annotations__ = f.fn.__module__, f.fn.__annotations__
            copies[f] = JITFunction(twin, do_not_specialize=f.do_not_specialize)
            for name, value in f.fn.__globals__.items():
                if isinstance(value, JITFunction) and value.fn.__module__ == f.fn.__module__:
                    glob[name] = copy(value)
        return copies[f]

    return copy(fn)


def noise_cost(fn: JITFunction, args: tuple, kwargs: dict, grid, compiled: CompiledKernel) -> dict:
    """Instructions per generated noise element in the K loop of a noisy matmul launch: (its
    loop - the twin's loop without noise) / the weight elements one thread perturbs per K
    step (BN x BK per weight and stream slot, GLU's two weights, over the program's threads)."""
    twin = _RUN(without_noise(fn), *args, grid=grid, warmup=True, **kwargs)
    noisy, clean = loop_body_opcodes(compiled), loop_body_opcodes(twin)
    per_thread = (kwargs["BN"] * kwargs["BK"] * kwargs["SLOTS"] * (2 if kwargs["GLU"] else 1)
                  / (32 * compiled.metadata.num_warps))
    return {"noise_instructions_per_element": round((sum(noisy.values()) - sum(clean.values())) / per_thread, 2),
            "noise_mufu_per_element": round((noisy["MUFU"] - clean["MUFU"]) / per_thread, 2),
            "loop_instructions": sum(noisy.values())}


def fill_kernel(mode: int, paired: bool, block: tuple[int, int] = (32, 128), num_warps: int = 4):
    types_ = {name: "i32" for name in _fill_kernel.arg_names}
    types_.update({"out_ptr": "*i32" if mode == FILL_BITS else "*fp32", "w_ptr": "*fp32", "sigma": "fp32"})
    return compile_for(_fill_kernel, types_, dict(MODE=mode, PAIRED=paired, BR=block[0], BC=block[1]),
                       num_warps=num_warps)


class _HopperDriver:
    """Stands in for the CUDA driver: a launch asks it only for the device, stream and target."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return HOPPER


_RUN = JITFunction.run  # the real launcher, which compile_only wraps


@contextlib.contextmanager
def compile_only() -> Iterator[list[tuple[JITFunction, tuple, dict, object, CompiledKernel]]]:
    """Within: the wrappers take their Triton path on CPU tensors, and every launch only compiles
    for sm_90 (a warmup returns the compiled kernel before launching). Yields the list of
    (kernel, launch arguments, keyword arguments, grid, compiled kernel), one entry per launch."""
    launches: list[tuple[JITFunction, tuple, dict, object, CompiledKernel]] = []

    def warmup_run(self: JITFunction, *args, grid, warmup: bool, **kwargs) -> CompiledKernel:
        compiled = _RUN(self, *args, grid=grid, warmup=True, **kwargs)
        launches.append((self, args, kwargs, grid, compiled))
        return compiled

    # driver._active, not set_active: reset_active() would build the real driver, which needs a GPU.
    with mock.patch.object(driver, "_active", _HopperDriver()), \
            mock.patch.object(JITFunction, "run", warmup_run), \
            mock.patch.object(noise, "runs_triton", lambda t: True):
        yield launches


_QWEN = model_configs.get_config("1.5B")
_HIDDEN, _INTER, _VOCAB = _QWEN["hidden_size"], _QWEN["intermediate_size"], _QWEN["vocab_size"]
_BLOCK = 16  # engine.llm's default KV block size


AttentionModel = str | tuple[int, int, int]  # a model name, or (query heads, KV heads, head_dim)


def _attention_shape(model: AttentionModel) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim): all that attention kernels specialise on of a model."""
    if isinstance(model, tuple):
        return model
    cfg = model_configs.get_config(model)
    return cfg["num_attention_heads"], cfg["num_key_value_heads"], model_configs.head_dim(cfg)


def _linear(dtype: torch.dtype, m: int, n: int, k: int, streams: list[int], bias: bool = False,
            grad: bool = False) -> None:
    """noisy_linear of [m, k] rows by an [n, k] weight; ``streams``: the rows' stream ids, each
    repeated over m / len(streams) consecutive rows."""
    ids = torch.tensor(streams, dtype=torch.int32).repeat_interleave(m // len(streams))
    rows = StreamRows(ids, [NoiseStream(s, 1e-3) for s in range(1, int(ids.max()) + 1)])
    x = torch.empty(m, k, dtype=dtype, requires_grad=grad)
    b = torch.empty(n, dtype=dtype) if bias else None
    noisy_linear(x, torch.empty(n, k, dtype=dtype), b, rows=rows, param_key=7)


def _gate_up(dtype: torch.dtype, m: int, streams: list[int], n: int = _INTER, k: int = _HIDDEN) -> None:
    """noisy_gate_up (SiLU(gate) * up in one kernel) of [m, k] rows by two [n, k] weights, as the
    engine's MLP."""
    ids = torch.tensor(streams, dtype=torch.int32).repeat_interleave(m // len(streams))
    rows = StreamRows(ids, [NoiseStream(s, 1e-3) for s in range(1, int(ids.max()) + 1)])
    with torch.no_grad():
        noisy_gate_up(torch.empty(m, k, dtype=dtype), torch.empty(n, k, dtype=dtype),
                      torch.empty(n, k, dtype=dtype), rows=rows, gate_key=7, up_key=8)


def _dual_linear(dtype: torch.dtype, m: int, n: int, k: int) -> None:
    """The learner's [clean | noisy] halves of m rows through one linear."""
    rows = StreamRows(torch.tensor([0, 1], dtype=torch.int32).repeat_interleave(m // 2),
                      [NoiseStream(1, 1e-3)])
    weight = torch.empty(n, k, dtype=dtype, requires_grad=True)
    dual_linear(torch.empty(m // 2, k, dtype=dtype, requires_grad=True), torch.empty(m // 2, k, dtype=dtype),
                weight, rows=rows, param_key=7)


def _paged(dtype: torch.dtype, model: AttentionModel, context_lens: list[int]) -> dict:
    """Queries for one token per context and a paged KV cache holding each sequence's blocks in a
    row (contents unset)."""
    heads, kv_heads, head_dim = _attention_shape(model)
    blocks = [-(-n // _BLOCK) for n in context_lens]
    table = torch.full((len(blocks), max(blocks)), -1, dtype=torch.int32)
    first = 0
    for b, n in enumerate(blocks):
        table[b, :n] = torch.arange(first, first + n)
        first += n
    shape = (first, _BLOCK, kv_heads, head_dim)
    return dict(q=torch.empty(len(blocks), heads, head_dim, dtype=dtype),
                k_cache=torch.empty(shape, dtype=dtype), v_cache=torch.empty(shape, dtype=dtype),
                block_tables=table, context_lens=torch.tensor(context_lens, dtype=torch.int32),
                scale=head_dim ** -0.5)


def _decode(dtype: torch.dtype, model: AttentionModel, context_lens: list[int]) -> None:
    c = _paged(dtype, model, context_lens)
    paged_decode_attention(c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["context_lens"], c["scale"])


def _graph_decode(dtype: torch.dtype, model: AttentionModel, bucket: int, max_model_len: int) -> None:
    """A CUDA-graph decode step (psnrl/engine/cuda_graphs.py): the store that skips padding rows
    (slot -1, context 0), then decode with the graph's fixed splits and no checks."""
    live = bucket // 2
    c = _paged(dtype, model, [max_model_len] * live + [_BLOCK] * (bucket - live))
    c["context_lens"][live:] = 0
    slots = torch.full((bucket,), -1, dtype=torch.int64)
    slots[:live] = torch.arange(live) * 7
    kv = torch.empty(bucket, *c["k_cache"].shape[2:], dtype=dtype)
    store_kv_skip_padding(kv, kv, c["k_cache"], c["v_cache"], slots)
    splits = pick_num_splits(bucket, c["k_cache"].shape[2], max_model_len)
    paged_decode_attention(c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["context_lens"],
                           c["scale"], num_splits=splits, check=False)


def _prefill(dtype: torch.dtype, model: AttentionModel, q_lens: list[int], context_lens: list[int],
             dispatch: bool = False) -> None:
    """Attention of q_lens new tokens per sequence: prefill_attention, or the dispatcher (which
    takes the decode kernel when every sequence has one new token)."""
    c = _paged(dtype, model, context_lens)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.empty(sum(q_lens), *c["q"].shape[1:], dtype=dtype)
    attend = paged_attention if dispatch else prefill_attention
    attend(q, c["k_cache"], c["v_cache"], cu, c["context_lens"], c["block_tables"], c["scale"])


def _logprob(dtype: torch.dtype, tokens: int, vocab: int, hidden: int, backward: bool) -> None:
    h = torch.empty(tokens, hidden, dtype=dtype, requires_grad=backward)
    lp, ent, sc = lm_head_logprob(h, torch.empty(vocab, hidden, dtype=dtype), torch.arange(tokens) % vocab)
    if backward:
        (lp.sum() + ent.sum() + sc.sum()).backward()


def _fill(dtype: torch.dtype) -> None:
    noise.fill_noise(torch.empty(_INTER, _HIDDEN, dtype=dtype), seed=3, key=7, sigma=1e-3)


def _sample(dtype: torch.dtype, stops: bool) -> None:
    b = 64
    i64 = dict(dtype=torch.int64)
    masking = dict(stop_ids=torch.full((b, 2), -1, dtype=torch.int32), mask_stops=torch.zeros(b, dtype=torch.bool))
    sample_rows(torch.empty(b, _VOCAB, dtype=dtype), torch.zeros(b, **i64), torch.zeros(b, **i64), torch.ones(b),
                torch.ones(b), torch.full((b,), -1, **i64), **(masking if stops else {}))


def launch_cases() -> list[tuple[str, Callable[[torch.dtype], None]]]:
    """(description, call with a dtype): the wrapper calls that the engine and the learner make on
    a GPU, at Qwen2.5-1.5B's shapes (and 7B's attention heads)."""
    h, i = _HIDDEN, _INTER
    cases = [
        ("noisy_linear M=1 gate_proj, 1 noisy stream", lambda dt: _linear(dt, 1, i, h, [1])),
        ("noisy_linear M=1 down_proj, 1 noisy stream (split-K)", lambda dt: _linear(dt, 1, h, i, [1])),
        ("noisy_linear M=16 q_proj+bias, clean + 4 streams interleaved (split-K)",
         lambda dt: _linear(dt, 16, h, h, [0, 1, 2, 3, 4] * 3 + [0], bias=True)),
        ("noisy_linear M=64 down_proj, clean | noisy (split-K)", lambda dt: _linear(dt, 64, h, i, [0, 1])),
        ("noisy_linear M=256 down_proj, clean | noisy (split-K)", lambda dt: _linear(dt, 256, h, i, [0, 1])),
        ("noisy_linear M=4096 q_proj+bias, 1 noisy stream, autograd (materialized)",
         lambda dt: _linear(dt, 4096, h, h, [1], bias=True, grad=True)),
        ("dual_linear M=4096 up_proj, clean | noisy (materialized)", lambda dt: _dual_linear(dt, 4096, i, h)),
        ("noisy_gate_up M=1, 1 noisy stream", lambda dt: _gate_up(dt, 1, [1])),
        ("noisy_gate_up M=1 at Qwen2.5-0.5B's MLP, 1 noisy stream",
         lambda dt: _gate_up(dt, 1, [1], 4864, 896)),
        ("noisy_gate_up M=1 at Qwen3-0.6B's MLP, 1 noisy stream (split-K)",
         lambda dt: _gate_up(dt, 1, [1], 3072, 1024)),
        ("noisy_gate_up M=64, clean + 2 streams", lambda dt: _gate_up(dt, 64, [0, 1, 2, 0])),
        ("noisy_gate_up M=256, 8 noisy + 2 clean per group", lambda dt: _gate_up(dt, 250, [1] * 8 + [0] * 2)),
        ("noisy_gate_up M=4096, 1 noisy stream (materialized)", lambda dt: _gate_up(dt, 4096, [1])),
        (f"lm_head_logprob T=16 V={_VOCAB} forward", lambda dt: _logprob(dt, 16, _VOCAB, h, False)),
        (f"lm_head_logprob T=256 V={_VOCAB} forward", lambda dt: _logprob(dt, 256, _VOCAB, h, False)),
        # The backward's matmuls are slow in bf16 on a CPU: V=19456 and H=128 keep the kernels those
        # of the real sizes (an integer argument specialises a kernel only by being 1 or a multiple
        # of 16; each split still gets several vocabulary tiles).
        ("lm_head_logprob T=16 forward+backward", lambda dt: _logprob(dt, 16, 19456, 128, True)),
        ("lm_head_logprob T=256 forward+backward", lambda dt: _logprob(dt, 256, 19456, 128, True)),
        ("fill_noise gate_proj weight", _fill),
        (f"sample_rows B=64 V={_VOCAB}", lambda dt: _sample(dt, False)),
        (f"sample_rows B=64 V={_VOCAB}, stop tokens masked", lambda dt: _sample(dt, True)),
    ]
    for model in ("1.5B", "7B"):
        cases += [
            (f"{model} paged_decode_attention B=4 ctx<=300 (1 split)",
             lambda dt, m=model: _decode(dt, m, [300, 17, 1, 256])),
            (f"{model} paged_decode_attention B=4 ctx<=4096 (split-K)",
             lambda dt, m=model: _decode(dt, m, [4096, 4000, 100, 1])),
            (f"{model} graph decode B=8: store_kv_skip_padding + decode",
             lambda dt, m=model: _graph_decode(dt, m, 8, 4096)),
            (f"{model} prefill_attention 2 seqs, one prefix-cached",
             lambda dt, m=model: _prefill(dt, m, [300, 37], [300, 100])),
            (f"{model} paged_attention: decode", lambda dt, m=model: _prefill(dt, m, [1, 1], [50, 700], True)),
            (f"{model} paged_attention: chunked prefill",
             lambda dt, m=model: _prefill(dt, m, [64, 1], [128, 9], True)),
        ]
    mha = (8, 8, 128)  # multi-head attention (GROUP 1), as Llama-2-style checkpoints have
    cases += [("MHA 8/8 paged_decode_attention (split-K)", lambda dt: _decode(dt, mha, [4096, 100])),
              ("MHA 8/8 prefill_attention", lambda dt: _prefill(dt, mha, [300, 37], [300, 100]))]
    return cases


def compile_all_launches() -> tuple[list[dict], list[dict]]:
    """Compile every launch of ``launch_cases`` for sm_90: (one row per launch, failed cases).

    A case fails when a kernel it launches does not compile, or would not fit an H100."""
    rows, failures = [], []
    usage: dict[str, dict[str, int]] = {}  # per compiled kernel (hash): cuobjdump's counts
    with compile_only() as launches:
        for dtype, torch_dtype in DTYPES.items():
            for case, call in launch_cases():
                first = len(launches)
                try:
                    call(torch_dtype)
                except Exception as e:  # a compile error (or a harness bug): report it, go on
                    failures.append({"case": case, "dtype": dtype, "error": f"{type(e).__name__}: {e}"})
                    continue
                for fn, args, kwargs, grid, compiled in launches[first:]:
                    if compiled.hash not in usage:
                        usage[compiled.hash] = resources(compiled)
                        if fn is _noisy_linear_kernel:
                            usage[compiled.hash].update(noise_cost(fn, args, kwargs, grid, compiled))
                    constexprs = {p.name: kwargs[p.name] for p in fn.params if p.is_constexpr}
                    name, smem = fn.fn.__name__, compiled.metadata.shared
                    rows.append({"kernel": name, "dtype": dtype, "case": case, "constexprs": constexprs,
                                 "grid": list(grid), "num_warps": compiled.metadata.num_warps,
                                 "num_stages": compiled.metadata.num_stages, "smem": smem,
                                 **usage[compiled.hash]})
                    if smem > HOPPER_MAX_SHARED:  # the first launch would raise OutOfResources
                        failures.append({"case": case, "dtype": dtype, "error": f"{name} needs {smem} B of "
                                         f"shared memory, an H100 block has {HOPPER_MAX_SHARED} B"})
    return rows, failures


def report() -> dict:
    rows = []
    block, warps = (32, 128), 4
    per_thread = block[0] * block[1] / (32 * warps)
    for paired in (True, False):
        ops = sass_opcodes(fill_kernel(FILL_NOISE, paired, block=block, num_warps=warps))
        rows.append({"kernel": "fill_noise", "variant": "paired" if paired else "unpaired",
                     "instructions": sum(ops.values()),
                     "instructions_per_element": round(sum(ops.values()) / per_thread, 1),
                     "mufu_per_element": round(ops["MUFU"] / per_thread, 2),
                     "top": ops.most_common(8)})
    launches, failures = compile_all_launches()
    return {"target": "sm_90", "triton": triton.__version__, "noise_budget": NOISE_BUDGET, "rows": rows,
            "launches": launches, "failures": failures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="psnrl bench kernel-sass", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    result = report()
    if args.json:
        print(json.dumps(result, indent=1))
        return 1 if result["failures"] else 0
    print(f"SASS for {result['target']} (Triton {result['triton']})")
    for row in result["rows"]:
        print(f"{row['kernel']:13s} {row['variant']:10s} {row['instructions']:6d} instr  "
              f"{row['instructions_per_element']} instr/element, {row['mufu_per_element']} MUFU/element")
    print(f"\nWrapper launches compiled for {result['target']} (noise: issued instructions per generated "
          f"element in the K loop, budget {result['noise_budget']})")
    for row in result["launches"]:
        config = " ".join(f"{k}={v}" for k, v in row["constexprs"].items())
        cost = (f", noise {row['noise_instructions_per_element']} instr/element "
                f"({row['noise_mufu_per_element']} MUFU)" if "noise_instructions_per_element" in row else "")
        print(f"{row['kernel']:21s} {row['dtype']:4s} {row['case']}\n    {config} grid={row['grid']} "
              f"warps={row['num_warps']} stages={row['num_stages']}: {row['registers']} regs, "
              f"stack {row['stack']} B, smem {row['smem']} B{cost}")
    for failure in result["failures"]:
        print(f"FAILED {failure['dtype']} {failure['case']}: {failure['error']}")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
