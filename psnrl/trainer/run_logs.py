"""What a run logs besides metrics.jsonl: its TensorBoard event stream (tensorboardX, the
``tensorboard`` extra) and the reward/sigma chart (matplotlib, the ``plots`` extra). Either
library missing turns its part off with one line; the run carries on."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from psnrl.trainer.charts import ChartsUnavailable, line_chart

if TYPE_CHECKING:
    from tensorboardX import SummaryWriter

TENSORBOARD_OFF = "TensorBoard logging is off: tensorboardX is not installed (pip install 'psnrl[tensorboard]')"


def event_writer(log_dir: Path, purge_step: int | None = None) -> SummaryWriter | None:
    """A writer of a new event file in ``log_dir``, or None (said in one line) without tensorboardX.

    With ``purge_step`` TensorBoard discards the events of the earlier files from that step on:
    how a resumed run continues its stream. The writer's thread flushes every second (not every
    two minutes), so TensorBoard shows a running run's events at once."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        print(f"psnrl train: {TENSORBOARD_OFF}; log.tensorboard=false hides this", file=sys.stderr)
        return None
    # A NaN metric (e.g. a mean over no tokens) is a value to show, not a warning on every iteration.
    logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)

    class EventWriter(SummaryWriter):
        def _get_file_writer(self):
            # TensorBoard reads a folder's files in name order, and the name starts with the time in
            # whole seconds: the nanosecond time keeps files of the same second (a run killed and
            # resumed at once) in the order they were written. It is taken for each file, as a writer
            # closed at a checkpoint reopens with its suffix: the same name within the same second,
            # and the new file (opened "wb") would replace the events of the first.
            if self.file_writer is None:
                self._filename_suffix = f".{time.time_ns()}.{os.getpid()}"
            return super()._get_file_writer()

    return EventWriter(str(log_dir), purge_step=purge_step, flush_secs=1)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def eval_scalars(result: dict) -> dict[str, float]:
    """An evaluation's figures as TensorBoard tags: eval/<set or average>/<pass@k, ...> (shown as
    pass_k: tensorboardX writes "_" for the characters a TensorBoard tag may not hold)."""
    return {f"eval/{s}/{name}": v for s, r in [*result.get("sets", {}).items(), ("average", result.get("average", {}))]
            for name, v in r.items() if is_number(v)}


def plot_reward_sigma(metrics_path: Path, out: Path) -> None:
    """Mean reward per iteration (and its 10-iteration running mean) on the left axis, sigma on the right."""
    if not metrics_path.exists():
        return
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    it = [r["iteration"] for r in rows]
    reward = [r.get("reward_mean", float("nan")) for r in rows]
    if all(v != v for v in reward):  # nothing to draw yet (no rows, or NaN only)
        return
    running = [sum(reward[max(0, i - 9):i + 1]) / len(reward[max(0, i - 9):i + 1]) for i in range(len(reward))]
    try:
        line_chart(out, {"reward mean": (it, reward), "10-iteration mean": (it, running)},
                   secondary={"sigma": (it, [r.get("sigma", float("nan")) for r in rows])},
                   title=f"{out.parent.name}: mean reward and sigma", xlabel="iteration", ylabel="mean reward",
                   secondary_label="sigma")
    except ChartsUnavailable as e:  # the run itself is unaffected: say what is off (log.plot=false hides it)
        print(f"psnrl train: {out.name} not drawn: {e}", file=sys.stderr)
