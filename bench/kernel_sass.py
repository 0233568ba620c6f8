"""Compile psnrl's Triton kernels for a GPU target on any machine and count their SASS.

``psnrl bench kernel-sass`` needs no GPU: Triton ships ptxas and nvdisasm, so the
kernels are compiled for Hopper (sm_90) here and their machine code is counted.
It reports, per kernel configuration, registers, spilled bytes and instructions, and for
the noise generator the static instructions per generated element (the budget
that decides whether noise hides under the weight read; see kernels/README.md).
It also serves as a compile check: the interpreter accepts code that the GPU
compiler rejects.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("kernel-sass compiles for the GPU: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels.noise import _fill_kernel  # noqa: E402
from kernels.noisy_linear import _noisy_linear_kernel, pick_tiles  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
_SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


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


def noisy_linear_kernel(dtype: str, m: int, n: int, k: int, slots: int = 1, paired: bool = True):
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    cfg = pick_tiles(m, n, k, torch_dtype)
    types = {name: "*i32" if name.endswith("_ptr") else "i32" for name in _noisy_linear_kernel.arg_names}
    types.update({name: f"*{dtype}" for name in ("x_ptr", "w_ptr", "b_ptr", "y_ptr")})
    types["sigma_ptr"] = "*fp32"
    constexprs = dict(HAS_BIAS=False, PAIRED=paired, IEEE=dtype == "fp32", SLOTS=slots,
                      PARTIAL=cfg.split_k > 1, BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k)
    if constexprs["PARTIAL"]:
        types["y_ptr"] = "*fp32"
    return cfg, compile_for(_noisy_linear_kernel, types, constexprs, num_warps=cfg.num_warps,
                            num_stages=cfg.num_stages)


def fill_kernel(paired: bool, bits: bool = False, block: tuple[int, int] = (32, 128), num_warps: int = 4):
    types = {name: "i32" for name in _fill_kernel.arg_names}
    types.update({"out_ptr": "*i32" if bits else "*fp32", "sigma": "fp32"})
    return compile_for(_fill_kernel, types, dict(BITS=bits, PAIRED=paired, BR=block[0], BC=block[1]),
                       num_warps=num_warps)


def report() -> dict:
    rows = []
    block, warps = (32, 128), 4
    per_thread = block[0] * block[1] / (32 * warps)
    for paired in (True, False):
        ops = sass_opcodes(fill_kernel(paired, block=block, num_warps=warps))
        rows.append({"kernel": "fill_noise", "variant": "paired" if paired else "unpaired",
                     "instructions": sum(ops.values()),
                     "instructions_per_element": round(sum(ops.values()) / per_thread, 1),
                     "mufu_per_element": round(ops["MUFU"] / per_thread, 2),
                     "top": ops.most_common(8)})
    for dtype in ("bf16", "fp32"):
        for m, slots in ((1, 1), (16, 2), (64, 1), (4096, 1)):
            cfg, kernel = noisy_linear_kernel(dtype, m, 4864, 896, slots)
            ops = sass_opcodes(kernel)
            rows.append({"kernel": "noisy_linear", "variant": f"{dtype} M={m} slots={slots}",
                         "tiles": [cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages,
                                   cfg.split_k],
                         **resources(kernel), "instructions": sum(ops.values()),
                         "top": ops.most_common(8)})
    return {"target": "sm_90", "triton": triton.__version__, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="psnrl bench kernel-sass", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    result = report()
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"SASS for {result['target']} (Triton {result['triton']})")
    for row in result["rows"]:
        extra = (f"{row['instructions_per_element']} instr/element, {row['mufu_per_element']} MUFU/element"
                 if row["kernel"] == "fill_noise" else
                 f"tiles {row['tiles']}, {row['registers']} regs, stack {row['stack']} B")
        print(f"{row['kernel']:13s} {row['variant']:22s} {row['instructions']:6d} instr  {extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
