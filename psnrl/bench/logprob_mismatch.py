"""How far the engine's log-probs of a perturbed policy are from the learner's recomputation
(fused dual-stream and a materialized perturbed copy), next to the size of the noise's effect."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from psnrl.bench import model_configs
from psnrl.bench.common import DTYPE_NAMES, free_memory, ratio
from psnrl.bench.naive_psn import perturbed_copy


def _stats(x: torch.Tensor) -> tuple[float, float, float]:
    x = x.double().reshape(-1)
    return x.mean().item(), torch.quantile(x, 0.99).item(), x.max().item()


def measure_mismatch(path: Path, model: str, args: argparse.Namespace, spec) -> dict:
    """Sample with the engine under ``spec``; compare its log-probs with the learner's."""
    from psnrl.engine.llm import LLM
    from psnrl.engine.sampling import SamplingParams
    from psnrl.trainer.logprobs import dual_stream_logprobs, response_logprobs

    n, plen, gen = args.mismatch_prompts, args.mismatch_prompt_len, args.mismatch_tokens
    vocab = model_configs.get_config(model)["vocab_size"]
    g = torch.Generator().manual_seed(args.seed * 7919 + 17)
    prompts = torch.randint(0, vocab, (n, plen), generator=g).tolist()
    block = 16
    blocks = n * (math.ceil((plen + gen) / block) + 1)
    llm = LLM(path, dtype=DTYPE_NAMES[args.dtype], device=args.device, max_model_len=plen + gen, max_num_seqs=n,
              block_size=block, num_kv_blocks=blocks + math.ceil(0.02 * blocks) + 4, seed=args.seed)
    try:
        params = [SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=gen, ignore_eos=True,
                                 seed=args.seed + i) for i in range(n)]
        outs = llm.generate(prompts, params, noise=spec, use_tqdm=False)
        seqs, plens, engine_lp = [], [], []
        for out in outs:
            c = out.outputs[0]
            if len(c.token_ids) != gen:
                raise RuntimeError(f"the engine stopped after {len(c.token_ids)} of {gen} tokens "
                                   f"({c.finish_reason})")
            seqs.append(list(out.prompt_token_ids) + list(c.token_ids))
            plens.append(len(out.prompt_token_ids))
            engine_lp.append(torch.tensor(c.logprobs, dtype=torch.float64))
        with torch.no_grad():
            dual = dual_stream_logprobs(llm.model, seqs, plens, spec)
            noisy_model, _ = perturbed_copy(llm.model, spec)
            naive = response_logprobs(noisy_model, seqs, plens).logprobs
            del noisy_model
    finally:
        llm.close()
        free_memory(args.device)
    eng = torch.cat(engine_lp)
    noisy, clean = dual.noisy.logprobs.double().cpu(), dual.clean.logprobs.double().cpu()
    naive = naive.double().cpu()
    out = {"model": model, "dtype": args.dtype, "sigma": spec.sigma, "targets": spec.targets,
           "prompts": n, "prompt_len": plen, "tokens": int(eng.numel())}
    for name, diff in (("engine_vs_learner", eng - noisy), ("noisy_vs_clean", noisy - clean),
                       ("naive_vs_learner", naive - noisy)):
        mean, p99, mx = _stats(diff.abs())
        out.update({f"{name}_mean": mean, f"{name}_p99": p99, f"{name}_max": mx})
    out["engine_vs_learner_over_effect"] = ratio(out["engine_vs_learner_mean"], out["noisy_vs_clean_mean"])
    out["engine_logprob_mean"] = eng.mean().item()
    # A non-finite figure (a NaN log-prob from the engine) is written as null, not as invalid JSON.
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in out.items()}
