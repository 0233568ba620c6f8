"""One PSN-GRPO training run: rollouts from a perturbed policy, rewards, advantages, updates.

Each iteration draws a noise seed, asks the sigma scheduler for sigma, samples G
completions per prompt from the engine with NoiseSpec(seed, sigma, targets), scores
them, and updates the clean policy with the GRPO surrogate corrected by truncated
importance sampling against the perturbed policy's log-probs, which the learner's
dual-stream pass computes alongside the clean ones (or, with
``algo.noisy_logprobs=sampler``, the engine's log-probs of the sampled tokens). Plain GRPO is the same loop with
``noise.enabled=false``. In one process, engine and learner share one model
(colocated), so an update is visible to the next rollout at no cost; only the
prefix cache, which holds KV of the old weights, is dropped. Under torchrun
(``torchrun --nproc-per-node N -m psnrl.trainer.cli train ...``) each rank's engine
samples its slice of the prompts (a prompt's G samples stay on one rank), the
learner is FSDP2 over all ranks, and the weights are copied into each engine
after every update.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from tqdm.auto import tqdm

from psnrl.engine.llm import LLM, RequestOutput
from psnrl.engine.loader import load_model
from psnrl.engine.noise_spec import NoiseSpec
from psnrl.trainer.advantages import compute_advantages
from psnrl.trainer.checkpoint import (checkpoints, latest_checkpoint, load_checkpoint,
                                      old_checkpoints, save_checkpoint)
from psnrl.trainer.config import TrainConfig, dump_config
from psnrl.trainer.datasets import Problem, format_prompt, load_problems
from psnrl.trainer import distributed
from psnrl.trainer.learner import Learner, Rollouts, reshard, shard_model, sync_weights
from psnrl.trainer.logprobs import last_hidden, response_logprobs
from psnrl.trainer.evaluate import pass_at_k_eval, write_json
from psnrl.trainer.export import export_model
from psnrl.trainer.run_logs import event_writer, eval_scalars, is_number, plot_reward_sigma
from psnrl.trainer.reward import math_reward
from psnrl.trainer.embedders import HiddenStateEmbedder, make_embedder, semantic_similarity
from psnrl.trainer.sigma import make_scheduler
from psnrl.trainer.tiny import TINY_SET, ArithmeticTask, build_checkpoint, exact_answer_reward
from psnrl.kernels.profiling import nvtx_range

if TYPE_CHECKING:
    from tensorboardX import SummaryWriter

MASK64 = (1 << 64) - 1


def _mix(*words: int) -> int:
    """A 64-bit seed from integers (splitmix64 steps), stable across runs and resumes."""
    x = 0
    for w in words:
        x = (x + (w & MASK64) + 0x9E3779B97F4A7C15) & MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
        x ^= x >> 31
    return x


class ProblemStream:
    """Endless shuffled passes over a problem set; its position is part of a checkpoint."""

    def __init__(self, problems: list[Problem], seed: int):
        if not problems:
            raise ValueError("the training set is empty (after dropping prompts over data.max_prompt_tokens)")
        self.problems, self.seed = problems, seed
        self.epoch, self.pos = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(_mix(self.seed, self.epoch)).shuffle(order)
        return order

    def next(self, n: int) -> list[Problem]:
        out = []
        while len(out) < n:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.problems[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._shuffle()


class RunDirError(ValueError):
    """The run folder does not fit the request (it holds another run, or nothing to resume)."""


EVAL_BEFORE_RL = "eval_before_rl.json"
# What a run writes into its folder (log.dir); --overwrite removes these and nothing else.
RUN_FILES = ("config.yaml", "metrics.jsonl", EVAL_BEFORE_RL, "reward_sigma.png", "tensorboard", "init-model",
             "final")


class PSNTrainer:
    """One run. ``resume``: continue the run in ``log.dir`` from its last checkpoint; else start
    a new one, which ``log.dir`` must not hold yet unless ``overwrite``. The folder is checked
    before anything is written, and nothing is written before :meth:`run`."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, overwrite: bool = False):
        self.cfg = cfg
        self.run_dir = Path(cfg.log.dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.overwrite = overwrite
        self.resume_from = self._check_run_dir(resume, overwrite)
        torch.manual_seed(cfg.train.seed)
        self.tiny = cfg.model.path == "tiny"
        self.model_path = Path(cfg.model.path)
        if self.tiny:  # built from the seed by every rank (before the process group: transformers saves
            # on rank 0 only then), outside the run folder until run() starts
            self._tiny_dir = tempfile.TemporaryDirectory(prefix="psnrl-tiny-")
            self.model_path = build_checkpoint(Path(self._tiny_dir.name) / "init-model", seed=cfg.train.seed)
        # Under torchrun: each rank runs an engine on its slice of the prompts and the
        # learner is FSDP2 over all ranks; rank 0 writes logs and checkpoints.
        self.rank, self.world = distributed.init_from_env()
        self.main = self.rank == 0
        t = cfg.train
        for name, value in (("rollout.prompts_per_iter", cfg.rollout.prompts_per_iter),
                            ("train.mini_batch_prompts", t.mini_batch_prompts)):
            if value % self.world:
                raise ValueError(f"{name}={value} must be a multiple of the number of processes ({self.world})")
        self.writer: SummaryWriter | None = None  # open while run() runs: a new stream, or the resumed one
        self.llm = LLM(self.model_path, **dataclasses.asdict(cfg.engine_config()))
        if self.world == 1:
            self.model = self.llm.model  # colocated: the learner trains the engine's weights
        else:  # the engine keeps a full copy; weights are synced to it after each update
            self.model = self._sharded_model()
        self.model.activation_checkpointing = t.activation_checkpointing
        self.tokenizer = self.llm.tokenizer
        if self.tokenizer is None:
            raise ValueError(f"{self.model_path} has no tokenizer files; training needs one to read answers")
        self.loss_cfg = cfg.loss_config()
        self.learner = Learner(self.model, self.loss_cfg, lr=t.lr, weight_decay=t.weight_decay, betas=t.betas,
                               grad_clip=t.grad_clip, micro_batch_tokens=t.micro_batch_tokens,
                               noisy_logprobs=cfg.algo.noisy_logprobs)
        self.optimizer = self.learner.optimizer
        n = cfg.noise
        adaptive = {"beta": n.beta, "min_factor": n.sigma_min_factor, "max_factor": n.sigma_max_factor}
        extra = {"var1": {**adaptive, "kl_target": n.kl_target}, "var2": adaptive}
        self.sigma = make_scheduler(n.scheduler if n.enabled else "fixed", sigma0=n.sigma,
                                    **(extra.get(n.scheduler, {}) if n.enabled else {}))
        # Var-II: two clean probe rollouts per prompt, compared with a sentence embedder.
        self.probes = n.enabled and n.scheduler == "var2"
        self.embedder = (make_embedder(n.embedder, hidden_fn=functools.partial(last_hidden, self.llm.model),
                                       device=self.llm.device)
                         if self.probes else None)
        if cfg.data.train == TINY_SET:
            self.data = ArithmeticTask(seed=_mix(t.seed, 1) >> 1)
        else:
            self.data = ProblemStream(self._fits(load_problems(cfg.data.train)), t.seed)
        self.ref_model = None
        self.iteration = 0
        self.stop_requested = False  # Ctrl-C seen: stop at the next iteration boundary
        self.saved_iteration: int | None = None  # the iteration of the last checkpoint written or loaded

    def _check_run_dir(self, resume: bool, overwrite: bool) -> Path | None:
        """The checkpoint to resume from (None: a new run); raises before anything is written."""
        if old_checkpoints(self.ckpt_dir) and not overwrite:
            raise RunDirError(f"{self.ckpt_dir} holds pickled iter-*.pt checkpoints of an earlier psnrl, which "
                              f"this version refuses to load; start in a new folder (log.dir=...) or replace "
                              f"that run with --overwrite")
        if resume:
            if overwrite:
                raise RunDirError("--resume and --overwrite exclude each other")
            last = latest_checkpoint(self.ckpt_dir)
            if last is None:
                raise FileNotFoundError(f"--resume: no checkpoint in {self.ckpt_dir}")
            return last
        held = [self.run_dir / name for name in RUN_FILES if (self.run_dir / name).exists()]
        held += checkpoints(self.ckpt_dir)
        if held and not overwrite:
            raise RunDirError(f"{self.run_dir} holds another run ({held[0].name}): continue it with --resume, "
                              f"start this one in a new folder (log.dir=...), or replace it with --overwrite")
        return None

    def _clear_run_dir(self) -> None:
        """--overwrite: remove the files of the run this folder held (and nothing else)."""
        for name in RUN_FILES:
            path = self.run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        for path in checkpoints(self.ckpt_dir) + old_checkpoints(self.ckpt_dir):
            path.unlink()

    def _sharded_model(self) -> torch.nn.Module:
        """A learner model sharded over the ranks (FSDP2), loaded from the run's checkpoint."""
        dtype = self.llm.model.model.embed_tokens.weight.dtype
        return shard_model(load_model(self.model_path, dtype=dtype, device=self.llm.device))

    def _frozen_copy(self) -> torch.nn.Module:
        """The reference policy of the KL term: the current weights, frozen."""
        if self.world == 1:
            ref = copy.deepcopy(self.model)
        else:
            ref = self._sharded_model()
            reshard(self.model)
            with torch.no_grad():  # same sharding: each rank copies its own shards
                for p, q in zip(ref.parameters(), self.model.parameters()):
                    p.to_local().copy_(q.to_local())
        return ref.eval().requires_grad_(False)

    def _sync_engine(self) -> None:
        """The engine's model gets the learner's weights (a no-op when they share storage)."""
        if self.model is not self.llm.model:
            sync_weights(self.model, self.llm.model)
        self.llm.reset_prefix_cache()  # KV of the old weights is stale

    # -- data, prompts, rewards -------------------------------------------------------------

    def _prompt(self, problem: Problem) -> str:
        return problem.problem if self.tiny else format_prompt(problem, self.cfg.data.template, self.tokenizer)

    def _fits(self, problems: list[Problem]) -> list[Problem]:
        limit = self.cfg.data.max_prompt_tokens
        return [p for p in problems if len(self.tokenizer.encode(self._prompt(p), add_special_tokens=False)) <= limit]

    def close(self) -> None:
        """Free the engine (KV cache, CUDA graphs) and drop the models and optimizer state, so
        another trainer or engine in this process gets the memory back. Idempotent."""
        self.llm.close()
        self.model = self.ref_model = self.learner = self.optimizer = self.embedder = None

    def __enter__(self) -> "PSNTrainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _reward(self, text: str, answer: str) -> float:
        return exact_answer_reward(text, answer) if self.tiny else math_reward(text, answer)

    def _problems(self, n: int) -> list[Problem]:
        return self.data.problems(n) if isinstance(self.data, ArithmeticTask) else self.data.next(n)

    # -- phases -----------------------------------------------------------------------------

    def sft_warmup(self) -> list[float]:
        """Teacher-forced NLL on reference answers, so the first rewards are not all zero."""
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.train.sft_lr)
        eos = self.tokenizer.eos_token_id
        losses = []
        for _ in tqdm(range(self.cfg.train.sft_warmup_steps), desc="sft warm-up", unit="step"):
            problems = self._problems(64)
            seqs, plens = [], []
            for p in problems:
                prompt = self.tokenizer.encode(self._prompt(p), add_special_tokens=False)
                seqs.append(prompt + self.tokenizer.encode(p.answer, add_special_tokens=False) + [eos])
                plens.append(len(prompt))
            loss = -response_logprobs(self.model, seqs, plens).logprobs.sum() / len(problems)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        self._sync_engine()
        return losses

    def _noise(self, k: int, num_prompts: int) -> list[NoiseSpec] | None:
        n = self.cfg.noise
        sigma = self.sigma.sigma
        if not n.enabled or sigma == 0:
            return None
        if n.seed_per == "prompt":  # each prompt its own perturbed policy, one batch
            return [NoiseSpec(_mix(self.cfg.train.seed, k, i), sigma, n.targets) for i in range(num_prompts)]
        return [NoiseSpec(_mix(self.cfg.train.seed, k), sigma, n.targets)] * num_prompts

    def step(self) -> dict:
        cfg, k = self.cfg, self.iteration
        times = {}
        problems = self._problems(cfg.rollout.prompts_per_iter)
        noise = self._noise(k, len(problems))
        problems = problems[self.rank::self.world]  # this rank's prompts
        noise = noise[self.rank::self.world] if noise is not None else None
        sigma = self.sigma.sigma
        params = dataclasses.replace(cfg.sampling_params(), seed=_mix(cfg.train.seed, k, (1 << 40) + self.rank) >> 1)
        prompts = [self._prompt(p) for p in problems]
        t = time.perf_counter()
        with nvtx_range("rollout"):
            outs, probe_outs = self._rollout(prompts, params, noise)
        times["rollout"] = time.perf_counter() - t
        t = time.perf_counter()
        with nvtx_range("sigma_scheduler"):  # Var-II: scoring the probes (they were in the rollout)
            probe_stats = self._var2_update(probe_outs) if self.probes else {}
        times["sigma"] = time.perf_counter() - t
        t = time.perf_counter()
        with nvtx_range("reward"):
            rewards = torch.tensor([[self._reward(c.text, p.answer) for c in o.outputs]
                                    for o, p in zip(outs, problems)], dtype=torch.float64)
        times["reward"] = time.perf_counter() - t
        advantages = compute_advantages(cfg.algo.advantage, rewards, cfg.algo.k)
        t = time.perf_counter()
        learn = self._learn(outs, advantages)
        times["learner"] = time.perf_counter() - t
        t = time.perf_counter()
        self._sync_engine()
        times["sync"] = time.perf_counter() - t
        if noise is not None and cfg.noise.scheduler == "var1":
            with nvtx_range("sigma_scheduler"):
                self.sigma.update(learn["kl_noisy_clean"])
        lengths = [len(c.token_ids) for o in outs for c in o.outputs]
        if self.world > 1:  # every rank reports the whole batch
            parts = distributed.gather_objects((rewards, lengths))
            rewards = torch.cat([r for r, _ in parts])
            lengths = [n for _, ns in parts for n in ns]
        self.iteration += 1
        return {"iteration": self.iteration, "reward_mean": rewards.mean().item(),
                "solve_rate": (rewards.max(dim=1).values > 0).float().mean().item(),
                f"pass@{cfg.rollout.group_size}": (rewards.max(dim=1).values > 0).float().mean().item(),
                "response_length": sum(lengths) / max(len(lengths), 1), "sigma": sigma, **learn,
                **probe_stats,
                **{f"time_{name}": v for name, v in times.items()},
                "rollout_tokens_per_s": sum(lengths) / max(times["rollout"], 1e-9)}

    def _rollout(self, prompts: list[str], params, noise) -> tuple[list[RequestOutput], list[RequestOutput]]:
        """The G rollouts per prompt, and for Var-II two clean probes per prompt in the same batches."""
        if not self.probes:
            return self.llm.generate(prompts, params, noise=noise, use_tqdm=False), []
        probe = dataclasses.replace(params, n=2, seed=_mix(self.cfg.train.seed, self.iteration,
                                                          (2 << 40) + self.rank) >> 1)
        both = self.llm.generate(prompts + prompts, [params] * len(prompts) + [probe] * len(prompts),
                                 noise=(noise or [None] * len(prompts)) + [None] * len(prompts), use_tqdm=False)
        return both[:len(prompts)], both[len(prompts):]

    def _var2_update(self, probe_outs: list[RequestOutput]) -> dict:
        """Semantic similarity and self-certainty of the two clean probes of each prompt -> sigma.

        Every rank measures its own prompts on its engine's (clean, current) model; the
        scheduler then sees all prompts, so sigma stays the same on every rank.
        """
        pairs = [o for o in probe_outs if len(o.outputs) == 2 and all(c.token_ids for c in o.outputs)]
        similarity, self_cert = torch.zeros(0), torch.zeros(0)
        if pairs:
            seqs = [o.prompt_token_ids + c.token_ids for o in pairs for c in o.outputs]
            plens = [len(o.prompt_token_ids) for o in pairs for _ in o.outputs]
            with torch.no_grad():
                certainty = response_logprobs(self.llm.model, seqs, plens).sequence_self_certainty()
            if isinstance(self.embedder, HiddenStateEmbedder):
                emb = self.embedder.embed(token_ids=[s[n:] for s, n in zip(seqs, plens)])
            else:
                emb = self.embedder.embed(texts=[c.text for o in pairs for c in o.outputs])
            similarity = semantic_similarity(emb[0::2], emb[1::2]).cpu()
            self_cert = torch.tensor(certainty).view(-1, 2).mean(dim=1)
        if self.world > 1:
            parts = distributed.gather_objects((similarity, self_cert))
            similarity, self_cert = torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])
        if not len(similarity):
            return {}
        self.sigma.update(similarity, self_cert)
        return {"probe_similarity": similarity.mean().item(), "probe_self_certainty": self_cert.mean().item()}

    def _learn(self, outs: list[RequestOutput], advantages: torch.Tensor) -> dict:
        done = [(out, c, advantages[i, c.index].item())
                for i, out in enumerate(outs) for c in out.outputs if c.token_ids]
        rows = Rollouts(seqs=[out.prompt_token_ids + c.token_ids for out, c, _ in done],
                        prompt_lens=[len(out.prompt_token_ids) for out, _, _ in done],
                        advantages=[a for _, _, a in done], noise=[out.noise for out, _, _ in done],
                        sampler_logprobs=[torch.tensor(c.logprobs) for _, c, _ in done])
        per_step = self.cfg.train.mini_batch_prompts * self.cfg.rollout.group_size
        return self.learner.update(rows, per_step, self.ref_model)

    def evaluate(self) -> dict:
        """pass@k of the clean policy on each eval set (eval.n_samples per problem)."""
        e = self.cfg.eval
        sets = {name: ArithmeticTask(seed=_mix(self.cfg.train.seed, 2) >> 1).problems(128)
                if name == TINY_SET else load_problems(name) for name in e.sets}
        params = dataclasses.replace(self.cfg.sampling_params(), n=e.n_samples,
                                     seed=_mix(self.cfg.train.seed, 3) >> 1)
        return pass_at_k_eval(self.llm, sets, params, e.ks, self._prompt, self._reward, self.embedder)

    # -- checkpoints --------------------------------------------------------------------------

    def _state_options(self) -> StateDictOptions:
        # Full (unsharded) state dicts: one checkpoint format for any number of processes.
        return StateDictOptions(full_state_dict=True, cpu_offload=self.world > 1)

    def state_dict(self) -> dict:
        """The run's state (under torchrun a collective: every rank calls it, rank 0 gets it)."""
        if self.optimizer.state:
            model, optimizer = get_state_dict(self.model, self.optimizer, options=self._state_options())
        else:  # before the first update (a checkpoint at iteration 0): get_state_dict would create
            # the moments with a zero-lr optimizer step, which counts as a step for Adam
            model, optimizer = get_model_state_dict(self.model, options=self._state_options()), None
        ref = get_model_state_dict(self.ref_model, options=self._state_options()) if self.ref_model else None
        return {"iteration": self.iteration, "model": model, "optimizer": optimizer,
                "sigma": self.sigma.state_dict(), "data": self.data.state_dict(), "ref_model": ref,
                "torch_rng": torch.get_rng_state(), "config": dump_config(self.cfg), "log": self._log_offsets()}

    def _log_offsets(self) -> dict:
        """How far the metrics file reaches at this iteration: a resume cuts it back to here, so
        rows of iterations redone after a crash are never doubled."""
        return {"metrics_bytes": self.metrics_path.stat().st_size if self.metrics_path.exists() else 0}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = state["iteration"]
        options = StateDictOptions(full_state_dict=True)
        if state["optimizer"] is None:
            set_model_state_dict(self.model, state["model"], options=options)
        else:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"], options=options)
        self.sigma.load_state_dict(state["sigma"])
        self.data.load_state_dict(state["data"])
        if state["ref_model"] is not None:
            self.ref_model = self._frozen_copy()
            set_model_state_dict(self.ref_model, state["ref_model"], options=options)
        torch.set_rng_state(state["torch_rng"])
        self._sync_engine()

    def _restore_logs(self, offsets: dict) -> None:
        """Cut metrics.jsonl back to the checkpoint and continue it; continue the event stream in a
        new file whose purge step hides the events the earlier files have from the next iteration on."""
        have = self.metrics_path.stat().st_size if self.metrics_path.exists() else 0
        if have < offsets["metrics_bytes"]:
            raise RunDirError(f"{self.metrics_path} is shorter ({have} bytes) than at the checkpoint "
                              f"({offsets['metrics_bytes']} bytes): the run folder was changed; cannot resume")
        os.truncate(self.metrics_path, offsets["metrics_bytes"])
        if self.cfg.log.tensorboard:
            self.writer = event_writer(self.run_dir / "tensorboard", purge_step=self.iteration + 1)

    def _start_logs(self) -> None:
        """A new run's folder: the resolved config, the initial model, empty metrics, a new event stream."""
        if self.overwrite:
            self._clear_run_dir()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(self.cfg))
        if self.tiny:
            shutil.copytree(self.model_path, self.run_dir / "init-model")
        self.metrics_path.write_bytes(b"")
        if self.cfg.log.tensorboard:
            self.writer = event_writer(self.run_dir / "tensorboard")

    def _save(self) -> None:
        if self.saved_iteration == self.iteration:
            return  # this iteration is saved already
        state = self.state_dict()
        self.saved_iteration = self.iteration
        if self.main:
            if self.writer is not None:
                # The events up to the checkpoint must be on disk before it: tensorboardX writes from a
                # thread and its flush() does not wait for it, close() does. The next event opens a new
                # file, which must not purge again.
                self.writer.close()
                self.writer.purge_step = None
            save_checkpoint(self.ckpt_dir, self.iteration, state, self.cfg.checkpoint.keep)
            if self.cfg.log.plot:
                plot_reward_sigma(self.metrics_path, self.run_dir / "reward_sigma.png")

    @contextlib.contextmanager
    def _ctrl_c_at_boundaries(self):
        """Ctrl-C stops the run at the next iteration boundary, not where it lands.

        Only a boundary state resumes exactly: mid-iteration the sampler has drawn the
        iteration's prompts and the learner may have changed some of the weights and moments.
        Snapshotting all of that at every iteration start would cost a copy of the model and
        optimizer, so the signal waits instead; a second Ctrl-C stops at once (the last
        checkpoint is then the resume point). Under torchrun the ranks would see the signal at
        different points, so there Ctrl-C stops at once and the last periodic checkpoint counts.
        """
        if self.world > 1 or threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_sigint(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            print(f"\nCtrl-C: stopping after iteration {self.iteration + 1} (Ctrl-C again to stop now "
                  f"without saving it)", file=sys.stderr)

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _boundary(self) -> None:
        """An iteration boundary: honour a pending Ctrl-C by saving this state and stopping."""
        if self.stop_requested:
            self._save()
            raise KeyboardInterrupt

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> list[dict]:
        """Train to train.iterations; the policy ends up in <log.dir>/final (a Hugging Face folder).

        Every checkpoint, the one written on Ctrl-C included, is an iteration boundary; a
        KeyboardInterrupt leaves this method once it is written (``self.saved_iteration``).
        """
        cfg = self.cfg
        try:
            with self._ctrl_c_at_boundaries():
                if self.resume_from is not None:
                    state = load_checkpoint(self.resume_from)
                    self.load_state_dict(state)
                    self.saved_iteration = self.iteration
                    if self.main:
                        self._restore_logs(state["log"])
                else:
                    if self.main:
                        self._start_logs()
                    if cfg.train.sft_warmup_steps:
                        self.sft_warmup()
                    if self.loss_cfg.kl_coef > 0:  # k3 KL to the policy RL starts from
                        self.ref_model = self._frozen_copy()
                    if self.main and cfg.eval.every:  # the baseline of the run's pass@k
                        self._log_eval_before_rl(self.evaluate())
                    self._boundary()
                history = self._iterate()
        finally:  # the writer's thread hands its queued events to the file before the process ends
            if self.writer is not None:
                self.writer.close()
                self.writer = None
        # One process needs no collective (and the distributed helper keeps the model alive past close()).
        weights = (self.model.state_dict() if self.world == 1
                   else get_model_state_dict(self.model, options=self._state_options()))
        if self.main:
            export_model(weights, self.model_path, self.run_dir / "final")
            if cfg.log.plot:
                plot_reward_sigma(self.metrics_path, self.run_dir / "reward_sigma.png")
        return history

    def _iterate(self) -> list[dict]:
        cfg = self.cfg
        history = []
        bar = tqdm(total=cfg.train.iterations, initial=self.iteration, desc="psn-grpo", unit="it",
                   disable=not self.main)
        try:
            while self.iteration < cfg.train.iterations:
                metrics = self.step()
                it = self.iteration
                if self.main and cfg.eval.every and (it % cfg.eval.every == 0 or it == cfg.train.iterations):
                    metrics["eval"] = self.evaluate()
                history.append(metrics)
                if self.main:
                    self._log(metrics)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", sigma=f"{metrics['sigma']:.4g}")
                bar.update(1)
                if cfg.checkpoint.every and (it % cfg.checkpoint.every == 0 or it == cfg.train.iterations):
                    self._save()
                self._boundary()
        finally:
            bar.close()
        return history

    def _log_eval_before_rl(self, result: dict) -> None:
        """The policy RL starts from (after the warm-up): eval_before_rl.json and TensorBoard step 0."""
        write_json(result, self.run_dir / EVAL_BEFORE_RL)
        self._add_scalars(0, eval_scalars(result))

    def _log(self, metrics: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        scalars = {name: v for name, v in metrics.items() if name != "iteration" and is_number(v)}
        self._add_scalars(metrics["iteration"], {**scalars, **eval_scalars(metrics.get("eval", {}))})

    def _add_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
