"""The shared case of the learner tests: rows of a perturbed rollout batch on the tiny model."""
import torch

from psnrl.engine.noise_spec import NoiseSpec
from psnrl.trainer.learner import Rollouts
from psnrl.trainer.losses import LossConfig

SPEC = NoiseSpec(seed=5, sigma=0.05, targets="all")
ROWS_PER_STEP = 4  # two optimizer steps over 8 rows


def loss_config() -> LossConfig:
    return LossConfig(tis_cap=2.0)


def all_rows() -> list[tuple[list[int], int, float]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(8):
        n_prompt, n_resp = 2 + i % 3, 3 + (5 * i) % 7
        seq = torch.randint(3, 40, (n_prompt + n_resp,), generator=g).tolist()
        rows.append((seq, n_prompt, float(torch.randn((), generator=g))))
    return rows


def rank_rows(rank: int, world: int) -> list[int]:
    """Row indices of ``rank`` such that its k-th step holds its share of the global k-th step."""
    per = ROWS_PER_STEP // world
    return [i for lo in range(0, 8, ROWS_PER_STEP) for i in range(lo + rank * per, lo + (rank + 1) * per)]


def rows_of(index: list[int]) -> Rollouts:
    rows = all_rows()
    picked = [rows[i] for i in index]
    g = torch.Generator().manual_seed(1)
    sampler = [-torch.rand(len(s) - n, generator=g) for s, n, _ in rows]
    return Rollouts(seqs=[s for s, _, _ in picked], prompt_lens=[n for _, n, _ in picked],
                    advantages=[a for _, _, a in picked], noise=[SPEC] * len(picked),
                    sampler_logprobs=[sampler[i] for i in index])


def model_inputs():
    rows = all_rows()
    return [s for s, _, _ in rows], [n for _, n, _ in rows], SPEC
