"""A training run that stops at a named point: ``python interrupt_child.py MODE POINT N LOG_DIR OVERRIDES...``.

At the N-th time the run reaches POINT it either waits for the parent (MODE ``sigint``: it
creates ``LOG_DIR.ready`` and continues once ``LOG_DIR.go`` exists, the parent having sent
SIGINT in between) or kills itself with SIGKILL (MODE ``kill``). Used by test_interrupt.py.
"""
import os
import signal
import sys
import time
from pathlib import Path

from psnrl.engine.llm import LLM
from psnrl.trainer import checkpoint, loop
from psnrl.trainer.cli import main
from psnrl.trainer.learner import Learner

mode, point, nth, log_dir, *overrides = sys.argv[1:]
nth = int(nth)
seen = 0


def stop_here() -> None:
    global seen
    seen += 1
    if seen != nth:
        return
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    Path(f"{log_dir}.ready").touch()
    deadline = time.monotonic() + 120
    while not Path(f"{log_dir}.go").exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def before(owner, name):
    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
        stop_here()
        return real(*args, **kwargs)
    setattr(owner, name, wrapped)


def after(owner, name):
    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        stop_here()
        return out
    setattr(owner, name, wrapped)


{"warmup": lambda: before(loop.PSNTrainer, "sft_warmup"),
 "rollout": lambda: before(LLM, "generate"),
 "learner": lambda: after(Learner, "update"),  # the weights have changed, the iteration is not over
 "eval": lambda: before(loop.PSNTrainer, "evaluate"),
 "metrics": lambda: after(loop.PSNTrainer, "_log"),  # a row written, its checkpoint not yet
 "checkpoint-tmp": lambda: after(checkpoint, "save_file"),  # the temporary file, before the rename
 "checkpoint": lambda: after(loop, "save_checkpoint"),
 }[point]()
sys.exit(main(["train", f"log.dir={log_dir}", *overrides]))
