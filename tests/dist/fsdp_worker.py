"""One rank of the 2-process FSDP2 check (run by tests/test_learner.py under torchrun, gloo).

Loads the tiny checkpoint, shards it, runs Learner.update on this rank's rows, and saves
the gathered weights, the perturbed log-probs of the sharded model, and the logits of an
unsharded engine copy after sync_weights, for the test to compare with one process.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from learner_case import ROWS_PER_STEP, loss_config, model_inputs, rank_rows, rows_of  # noqa: E402

from psnrl.engine.loader import load_model  # noqa: E402
from psnrl.trainer.learner import Learner, shard_model, sync_weights  # noqa: E402
from psnrl.trainer.logprobs import dual_stream_logprobs, response_logprobs  # noqa: E402


def main(ckpt: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = shard_model(load_model(ckpt, dtype=torch.float32))
    seqs, plens, spec = model_inputs()
    with torch.no_grad():
        noisy = dual_stream_logprobs(model, seqs, plens, spec).noisy.logprobs
    learner = Learner(model, loss_config(), lr=1e-2, micro_batch_tokens=24)
    stats = learner.update(rows_of(rank_rows(rank, world)), ROWS_PER_STEP // world)
    engine = load_model(ckpt, dtype=torch.float32)
    sync_weights(model, engine)
    with torch.no_grad():
        engine_lp = response_logprobs(engine, seqs, plens).logprobs
        learner_lp = response_logprobs(model, seqs, plens).logprobs
    model.reshard()
    weights = {n: p.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save({"weights": weights, "noisy": noisy, "stats": stats, "engine_lp": engine_lp,
                    "learner_lp": learner_lp}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
