"""Launch exactly the kernels psnrl/bench/profile_kernels.sh profiles under Nsight Compute.

    python -m psnrl.bench.profile_targets gemm --model 1.5B --shape gate_up --m 1 --mode noisy
    python -m psnrl.bench.profile_targets attention --batch 32 --context 1024

Each target builds its inputs, runs ``--warmup`` untimed calls (Triton compiles on the
first), then brackets ``--iters`` calls with cudaProfilerStart/Stop
(``torch.cuda.profiler.start/stop``). ncu runs it with ``--profile-from-start off``, so
only the launches inside that bracket are profiled: no warmup launch, no setup kernel
(randn, the block table) ends up in the report.

Targets:
  gemm       one MLP matmul of Qwen2.5 (psnrl/bench/noisy_gemm.py's shapes and inputs): ``--mode``
             noisy (every row on one noisy stream, the dispatcher's path), clean, mixed
             (interleaved clean and noisy rows), fused (the fused kernel at any M), cublas
             (torch.matmul, the baseline) or materialized (fill W + sigma*E, then torch.matmul).
  attention  paged decode attention (psnrl.kernels.paged_attention.paged_decode_attention): one
             query token per sequence over ``--context`` cached tokens in pages of
             ``--block-size``; Qwen2.5-1.5B heads by default (12 query heads, 2 KV heads,
             head_dim 128). Long contexts at small batch take the split-K path (a second,
             reduce kernel).
"""
from __future__ import annotations

import argparse
import os
import sys

NO_CUDA_MESSAGE = "psnrl.bench.profile_targets launches CUDA kernels for Nsight Compute; no CUDA GPU found"
GEMM_MODES = ("noisy", "clean", "mixed", "fused", "cublas", "materialized")
DTYPES = ("bf16", "fp16", "fp32")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m psnrl.bench.profile_targets",
                                     description="Launch one kernel configuration for ncu "
                                                 "(profiled launches between cudaProfilerStart/Stop).")
    sub = parser.add_subparsers(dest="target", required=True, metavar="TARGET")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dtype", choices=DTYPES, default="bf16")
        p.add_argument("--warmup", type=_positive, default=3, help="calls before profiling (default %(default)s)")
        p.add_argument("--iters", type=_positive, default=1, help="profiled calls (default %(default)s)")

    gemm = sub.add_parser("gemm", help="one noisy-linear (or cuBLAS) matmul on a Qwen2.5 MLP shape")
    gemm.add_argument("--model", default="1.5B", help="Qwen2.5 size or full name (default %(default)s)")
    gemm.add_argument("--shape", choices=("gate_up", "down"), default="gate_up")
    gemm.add_argument("--m", type=_positive, default=1, help="rows (tokens) (default %(default)s)")
    gemm.add_argument("--mode", choices=GEMM_MODES, default="noisy")
    gemm.add_argument("--sigma", type=float, default=0.004)
    common(gemm)

    attn = sub.add_parser("attention", help="paged decode attention")
    attn.add_argument("--batch", type=_positive, default=32)
    attn.add_argument("--context", type=_positive, default=1024, help="cached tokens per sequence")
    attn.add_argument("--heads", type=_positive, default=12)
    attn.add_argument("--kv-heads", type=_positive, default=2)
    attn.add_argument("--head-dim", type=_positive, default=128)
    attn.add_argument("--block-size", type=_positive, default=16, help="tokens per KV page")
    attn.add_argument("--num-splits", type=_positive, default=None,
                      help="split-K parts (default: the kernel's heuristic)")
    common(attn)
    return parser


def _torch_dtype(name: str):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def gemm_call(args: argparse.Namespace, device: str = "cuda"):
    """The callable of one gemm target (inputs built here, outside the profiled region)."""
    from psnrl.bench.noisy_gemm import MODELS, Case, make_fns, resolve_model, shape_nk

    model = resolve_model(args.model)
    n, k = shape_nk(args.shape, *MODELS[model])
    fns = make_fns(Case(model, args.shape, args.m, n, k), _torch_dtype(args.dtype), args.sigma, device)
    return fns[args.mode], f"{model}/{args.shape} M={args.m} N={n} K={k} {args.mode} {args.dtype}"


def attention_call(args: argparse.Namespace, device: str = "cuda"):
    """The callable of one paged-decode target: a shuffled block table, every sequence full length."""
    import torch

    from psnrl.kernels.paged_attention import paged_decode_attention

    if args.heads % args.kv_heads:
        raise SystemExit(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    dtype = _torch_dtype(args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    pages = -(-args.context // args.block_size)
    num_blocks = args.batch * pages
    shape = (num_blocks, args.block_size, args.kv_heads, args.head_dim)
    k_cache = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    v_cache = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    q = torch.randn(args.batch, args.heads, args.head_dim, generator=gen, device=device, dtype=dtype)
    perm = torch.randperm(num_blocks, generator=gen, device=device)
    block_tables = perm.reshape(args.batch, pages).to(torch.int32)
    context_lens = torch.full((args.batch,), args.context, dtype=torch.int32, device=device)
    scale = args.head_dim ** -0.5

    def call():
        return paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                      num_splits=args.num_splits)

    what = (f"paged decode B={args.batch} context={args.context} heads={args.heads}/{args.kv_heads} "
            f"head_dim={args.head_dim} page={args.block_size} {args.dtype}")
    return call, what


def run_profiled(fn, warmup: int, iters: int, profiler=None) -> None:
    """``warmup`` calls, then ``iters`` calls between profiler start and stop."""
    import torch

    profiler = profiler or torch.cuda.profiler
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        sync()
        profiler.start()
        try:
            for _ in range(iters):
                fn()
            sync()
        finally:
            profiler.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("psnrl.bench.profile_targets profiles GPU kernels: run it without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        return 2
    fn, what = (gemm_call if args.target == "gemm" else attention_call)(args)
    run_profiled(fn, args.warmup, args.iters)
    print(f"profiled {args.iters} call(s) of {what} on {torch.cuda.get_device_name()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
