"""Which requests of a batch run a perturbed policy, and which layers the noise touches."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from psnrl.kernels.noise import check_sigma, split_seed
from psnrl.kernels.noise_rows import NoiseStream, StreamRows

# Linear-layer groups that noise can target; "all" is every group.
TARGET_GROUPS = ("mlp", "attn", "lm_head")


@dataclass(frozen=True)
class NoiseSpec:
    """A perturbed policy theta + eps, eps ~ N(0, sigma^2 I), fixed for a whole rollout.

    ``targets``: "mlp" (gate/up/down, the default), "attn" (q/k/v/o), "lm_head",
    "all", or a tuple of those groups.
    """

    seed: int
    sigma: float
    targets: str | tuple[str, ...] = "mlp"

    def __post_init__(self) -> None:
        split_seed(self.seed)
        check_sigma(self.sigma)
        self.groups  # validates targets

    @property
    def groups(self) -> frozenset[str]:
        names = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        groups: set[str] = set()
        for name in names:
            if name == "all":
                groups.update(TARGET_GROUPS)
            elif name in TARGET_GROUPS:
                groups.add(name)
            else:
                raise ValueError(f"unknown noise target {name!r}; valid: {TARGET_GROUPS + ('all',)}")
        return frozenset(groups)


class BatchNoise:
    """Per-row noise of one forward: row i runs ``specs[row_spec[i]]`` (-1 = clean).

    Builds, once per batch, the kernels' StreamRows for each target group; a row
    whose spec does not target a group is clean in that group's layers.
    """

    def __init__(self, row_spec: Sequence[int] | torch.Tensor, specs: Sequence[NoiseSpec | None],
                 device: torch.device | str):
        ids = torch.as_tensor(row_spec, dtype=torch.long, device="cpu").reshape(-1)
        if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= len(specs)):
            raise ValueError(f"row_spec ids must be in [-1, {len(specs) - 1}]")
        self.row_spec = ids
        self.specs = list(specs)
        self.device = torch.device(device)
        self._rows: dict[str, StreamRows | None] = {}
        for group in TARGET_GROUPS:
            # Stream s >= 1 is specs[s - 1]; specs that skip this group map to 0 (clean).
            lookup = torch.tensor([0] + [i + 1 if s is not None and s.sigma > 0 and group in s.groups
                                         else 0 for i, s in enumerate(self.specs)], device="cpu")
            stream_ids = lookup[ids + 1]
            if ids.numel() == 0 or not bool((stream_ids > 0).any()):
                self._rows[group] = None
                continue
            streams = [NoiseStream(s.seed, s.sigma) if s is not None else NoiseStream(0, 0.0)
                       for s in self.specs]
            self._rows[group] = StreamRows(stream_ids.to(device), streams)

    def rows(self, group: str) -> StreamRows | None:
        """StreamRows for layers of ``group``, or None when every row is clean there."""
        return self._rows[group]

    def select(self, index: torch.Tensor) -> "BatchNoise":
        """The same specs for a subset of rows (e.g. the last token of each sequence)."""
        return BatchNoise(self.row_spec[index.cpu()], self.specs, self.device)
