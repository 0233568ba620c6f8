"""Trainer configuration: shipped YAML files, overrides, round trips and every error path."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from psnrl.engine.llm import EngineConfig
from psnrl.engine.sampling import SamplingParams
from psnrl.trainer.config import (CONFIG_DIR, SHIPPED_CONFIGS, AlgoConfig, ConfigError, RolloutConfig,
                            TrainConfig, config_from_dict, config_to_dict, dump_config, load_config)
from psnrl.trainer.datasets import EVAL_SETS
from psnrl.trainer.losses import LossConfig

TINY = CONFIG_DIR / "tiny.yaml"
PAPER = ("qwen2.5-math-1.5b", "qwen2.5-math-7b")


@pytest.fixture
def checkpoint(tmp_path) -> str:
    """A directory that passes model.path's check (a config.json in it)."""
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return str(path)


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error(path=None, *overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# ---------------------------------------------------------------------------- shipped files

def test_shipped_configs_are_listed():
    assert SHIPPED_CONFIGS == ("qwen2.5-math-1.5b", "qwen2.5-math-7b", "tiny")


def test_defaults_are_tiny_yaml():
    assert load_config(None) == TrainConfig() == load_config(TINY) == load_config("tiny")
    # tiny.yaml spells out every key (test_shipped_files_set_every_key), so they overlap everywhere
    assert config_to_dict(load_config(TINY)) == config_to_dict(TrainConfig())


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_shipped_files_set_every_key(name):
    """No shipped config silently inherits a tiny default."""
    written = yaml.load((CONFIG_DIR / f"{name}.yaml").read_text(), Loader=yaml.SafeLoader)
    expected = config_to_dict(TrainConfig())
    assert list(written) == list(expected)
    for section, keys in expected.items():
        assert list(written[section]) == list(keys), section


def test_tiny_values():
    cfg = load_config("tiny")
    assert cfg.model.path == "tiny" and cfg.data.train == "tiny-arith"
    assert cfg.eval.sets == ("tiny-arith",)
    assert cfg.checkpoint.dir == str(Path("runs/tiny") / "checkpoints")


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs(name, checkpoint):
    cfg = load_config(CONFIG_DIR / f"{name}.yaml", [f"model.path={checkpoint}"])
    assert cfg.model.path == checkpoint and cfg.model.dtype == "bfloat16"
    n = cfg.noise
    assert (n.sigma, n.targets, n.beta, n.kl_target) == (0.004, "mlp", 1.01, 0.03)
    assert (n.sigma_min_factor, n.sigma_max_factor) == (0.8, 1.2)
    assert cfg.noise.enabled and cfg.noise.scheduler == "var2"
    a = cfg.algo
    assert (a.tis_cap, a.clip_low, a.clip_high, a.kl_coef) == (10.0, 0.2, 0.2, 1e-4)
    assert cfg.algo.advantage == "grpo" and cfg.algo.k is None
    r = cfg.rollout
    assert (r.group_size, r.prompts_per_iter, r.max_tokens, r.temperature) == (8, 512, 8192, 1.0)
    assert cfg.train.mini_batch_prompts == 256
    assert r.max_model_len == cfg.data.max_prompt_tokens + r.max_tokens
    assert cfg.data.train == "train_math_l35"
    assert cfg.eval.sets == EVAL_SETS
    assert cfg.loss_config() == LossConfig(clip_low=0.2, clip_high=0.2, tis_cap=10.0, kl_coef=1e-4)


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_need_a_model_path(name):
    message = error(name)
    assert f"{name}.yaml" in message
    assert "model.path '/path/to/" in message and "does not exist" in message
    assert "local Hugging Face checkpoint directory" in message and "model.path=" in message


def test_model_path_without_config_json(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.path .* has no config\.json"):
        load_config(None, [f"model.path={tmp_path}"])
    with pytest.raises(ConfigError, match=r"model\.path .* is not a directory"):
        load_config(None, [f"model.path={write(tmp_path, 'x')}"])


# ---------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_dump_load_round_trip(name, checkpoint, tmp_path):
    cfg = load_config(name, [f"model.path={checkpoint}"] if name in PAPER else [])
    text = dump_config(cfg)
    again = load_config(write(tmp_path, text))
    assert again == cfg
    assert dump_config(again) == text
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_round_trip_of_overridden_values(tmp_path):
    cfg = load_config(None, ["noise.targets=[mlp, attn]", "algo.tis_cap=null", "train.grad_clip=null",
                             "algo.advantage=maxpo", "algo.k=4", "eval.sets=[math500, aime24]",
                             "algo.aggregation=seq_mean_token_sum_norm", "train.lr=1e-5"])
    text = dump_config(cfg)
    assert "targets: [mlp, attn]" in text and "sets: [math500, aime24]" in text
    assert load_config(write(tmp_path, text)) == cfg


def test_config_to_dict_is_plain():
    d = config_to_dict(TrainConfig())
    assert d["eval"]["ks"] == [1, 4] and d["train"]["betas"] == [0.9, 0.999]
    assert yaml.safe_load(yaml.safe_dump(d)) == d


# ---------------------------------------------------------------------------- overrides

def test_overrides_nested_values_and_lists():
    cfg = load_config("tiny", ["rollout.group_size=4", "eval.ks=[1, 2]", "noise.targets=[mlp, attn]",
                               "train.betas=[0.9, 0.95]", "noise.enabled=false", "algo.kl_coef=1e-3",
                               "algo.tis_cap=null", "eval.sets=[math500]", "log.dir=out/x"])
    assert cfg.rollout.group_size == 4 and cfg.eval.ks == (1, 2)
    assert cfg.noise.targets == ("mlp", "attn") and cfg.train.betas == (0.9, 0.95)
    assert cfg.noise.enabled is False and cfg.algo.kl_coef == 1e-3 and cfg.algo.tis_cap is None
    assert cfg.eval.sets == ("math500",)
    assert cfg.checkpoint.dir == str(Path("out/x") / "checkpoints")
    assert cfg.rollout.temperature == 1.0  # untouched keys keep the file's values


def test_later_override_wins_and_spaces():
    cfg = load_config(None, ["rollout.group_size=4", " rollout.group_size = 6"])
    assert cfg.rollout.group_size == 6


def test_int_accepted_for_float():
    cfg = load_config(None, ["train.lr=1", "rollout.temperature=2", "algo.tis_cap=5"])
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert type(cfg.rollout.temperature) is float and type(cfg.algo.tis_cap) is float
    assert type(load_config(None, ["train.betas=[0, 0]"]).train.betas[0]) is float


def test_scientific_notation_in_files(tmp_path):
    cfg = load_config(write(tmp_path, "algo:\n  kl_coef: 1e-3\ntrain:\n  lr: 5E-7\n"))
    assert cfg.algo.kl_coef == 1e-3 and cfg.train.lr == 5e-7


def test_partial_and_empty_files(tmp_path):
    assert load_config(write(tmp_path, "")) == TrainConfig()
    assert load_config(write(tmp_path, "rollout:\n")) == TrainConfig()
    cfg = load_config(write(tmp_path, "rollout:\n  group_size: 4\n"))
    assert cfg == dataclasses.replace(TrainConfig(), rollout=RolloutConfig(group_size=4))


def test_data_paths_are_accepted(tmp_path):
    data = write(tmp_path, '{"problem": "1+1", "answer": "2"}\n', "mine.jsonl")
    cfg = load_config(None, [f"data.train={data}", f"eval.sets=[{data}, math500]"])
    assert cfg.data.train == str(data) and cfg.eval.sets == (str(data), "math500")


def test_eval_every_zero_needs_no_sets():
    assert load_config(None, ["eval.every=0", "eval.sets=[]"]).eval.sets == ()


def test_built_objects():
    cfg = load_config(None, ["rollout.top_p=0.95", "model.dtype=bfloat16", "train.seed=7"])
    assert cfg.sampling_params() == SamplingParams(n=8, temperature=1.0, top_p=0.95, max_tokens=4)
    assert cfg.engine_config() == EngineConfig(dtype="bfloat16", max_model_len=64, gpu_memory_utilization=0.9,
                                               block_size=16, seed=7)
    assert load_config(None, ["rollout.num_kv_blocks=40"]).engine_config().num_kv_blocks == 40
    sum_norm = load_config(None, ["algo.aggregation=seq_mean_token_sum_norm"]).loss_config()
    assert sum_norm.max_len == 4


def test_frozen():
    cfg = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rollout.group_size = 3  # type: ignore[misc]


def test_direct_construction_is_validated():
    with pytest.raises(ConfigError, match=r"rollout\.group_size must be >= 2"):
        RolloutConfig(group_size=1)
    with pytest.raises(ConfigError, match=r"algo\.tis_cap must be finite, got inf"):
        AlgoConfig(tis_cap=float("inf"))
    with pytest.raises(ConfigError, match="section rollout must be a RolloutConfig"):
        TrainConfig(rollout={"group_size": 4})


# ---------------------------------------------------------------------------- errors: names

def test_unknown_key_suggests():
    assert error(None, "rollout.grop_size=8") == (
        "override 'rollout.grop_size=8': unknown key rollout.grop_size; did you mean rollout.group_size?")


def test_unknown_key_without_a_close_match_lists_keys():
    with pytest.raises(ConfigError,
                       match=r"unknown key log\.zzzz; valid: log\.dir, log\.tensorboard, log\.plot"):
        load_config(None, ["log.zzzz=1"])


def test_unknown_section_suggests():
    with pytest.raises(ConfigError, match="unknown section rollot; did you mean rollout"):
        load_config(None, ["rollot.group_size=8"])


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = write(tmp_path, "noise:\n  sigmaa: 0.1\n")
    assert error(path) == f"{path}: unknown key noise.sigmaa; did you mean noise.sigma?"
    path = write(tmp_path, "nosie:\n  sigma: 0.1\n")
    assert error(path) == f"{path}: unknown section nosie; did you mean noise?"


@pytest.mark.parametrize("override, pattern", [
    ("noise.scheduler=var3",
     r"noise\.scheduler must be one of fixed, var1, var2, got 'var3'; did you mean var2\?"),
    ("noise.seed_per=batch", r"noise\.seed_per must be one of iteration, prompt, got 'batch'"),
    ("noise.embedder=bert", r"noise\.embedder must be one of auto, minilm, hidden, got 'bert'"),
    ("noise.targets=mpl", r"noise\.targets: unknown noise target 'mpl'"),
    ("noise.targets=[mlp, ffn]", r"noise\.targets: unknown noise target 'ffn'"),
    ("algo.advantage=gpro", r"algo\.advantage must be one of grpo, .*got 'gpro'; did you mean grpo\?"),
    ("algo.aggregation=mean", r"algo\.aggregation must be one of seq_mean_token_mean"),
    ("data.template=chatml", r"data\.template must be one of plain, chat, got 'chatml'"),
    ("model.dtype=fp8", r"model\.dtype must be 'auto' or one of .*got 'fp8'"),
    ("data.train=math5000", r"data\.train 'math5000' is neither a data set name .*did you mean math500\?"),
    ("eval.sets=[math500, aime2024]", r"eval\.sets 'aime2024' is neither a data set name"),
])
def test_bad_names(override, pattern):
    with pytest.raises(ConfigError, match=rf"^override {re.escape(repr(override))}: {pattern}"):
        load_config(None, [override])


# ---------------------------------------------------------------------------- errors: types

@pytest.mark.parametrize("override, message", [
    ("rollout.group_size=eight", "rollout.group_size must be int, got 'eight' (str)"),
    ("rollout.group_size=true", "rollout.group_size must be int, got True (bool)"),
    ("rollout.group_size=8.0", "rollout.group_size must be int, got 8.0 (float)"),
    ("train.lr=fast", "train.lr must be float, got 'fast' (str)"),
    ("train.lr=false", "train.lr must be float, got False (bool)"),
    ("noise.enabled=maybe", "noise.enabled must be bool, got 'maybe' (str)"),  # (OmegaConf: 1, yes, on are true)
    ("model.path=null", "model.path must be str, got None (NoneType)"),
    ("algo.tis_cap=[10]", "algo.tis_cap must be float or null, got [10] (list)"),
    ("eval.ks=4", "eval.ks must be list of int, got 4 (int)"),
    ("eval.ks=[1, x]", "eval.ks must be list of int, got [1, 'x'] (list)"),
    ("train.betas=[0.9]", "train.betas must be list of 2 floats, got [0.9] (list)"),
    ("noise.targets=3", "noise.targets must be str or list of str, got 3 (int)"),
    ("algo.kl_coef=.nan", "algo.kl_coef must be finite, got nan"),
    ("rollout.temperature=.inf", "rollout.temperature must be finite, got inf"),
])
def test_wrong_types(override, message):
    assert error(None, override) == f"override {override!r}: {message}"


def test_wrong_type_in_file_names_the_file(tmp_path):
    path = write(tmp_path, "rollout:\n  group_size: eight\n")
    assert error(path) == f"{path}: rollout.group_size must be int, got 'eight' (str)"


def test_override_fixes_file_value_and_blames_override(tmp_path):
    path = write(tmp_path, "rollout:\n  group_size: eight\n")
    assert load_config(path, ["rollout.group_size=4"]).rollout.group_size == 4
    assert error(path, "rollout.group_size=1").startswith("override 'rollout.group_size=1': ")


# ---------------------------------------------------------------------------- errors: ranges

@pytest.mark.parametrize("overrides, pattern", [
    (["rollout.group_size=1"], r"rollout\.group_size must be >= 2 .*got 1"),
    (["rollout.prompts_per_iter=0"], r"rollout\.prompts_per_iter must be >= 1, got 0"),
    (["rollout.temperature=0"], r"rollout\.temperature must be > 0 .*got 0\.0"),
    (["rollout.temperature=-1"], r"rollout\.temperature must be > 0"),
    (["rollout.top_p=1.5"], r"rollout\.top_p must be in \(0, 1\], got 1\.5"),
    (["rollout.top_p=0"], r"rollout\.top_p must be in \(0, 1\]"),
    (["rollout.max_tokens=0"], r"rollout\.max_tokens must be an int >= 1, got 0"),
    (["rollout.gpu_memory_utilization=1.5"],
     r"rollout\.gpu_memory_utilization must be in \(0, 1\], got 1\.5"),
    (["rollout.block_size=12"], r"rollout\.block_size must be a power of two, got 12"),
    (["rollout.num_kv_blocks=0"], r"rollout\.num_kv_blocks must be >= 1, got 0"),
    (["rollout.max_model_len=19"],
     r"rollout\.max_model_len = 19 is less than data\.max_prompt_tokens \+ rollout\.max_tokens = 20"),
    (["data.max_prompt_tokens=0"], r"data\.max_prompt_tokens must be >= 1, got 0"),
    (["noise.sigma=-0.1"], r"noise\.sigma must be >= 0, got -0\.1"),
    (["noise.sigma=0"], r"noise\.sigma must be > 0 when noise\.enabled .*got 0\.0"),
    (["noise.beta=0.99"], r"noise\.beta must be >= 1 .*got 0\.99"),
    (["noise.kl_target=0"], r"noise\.kl_target must be > 0, got 0\.0"),
    (["noise.sigma_min_factor=1.1"], r"noise\.sigma_min_factor must be in \(0, 1\], got 1\.1"),
    (["noise.sigma_max_factor=0.9"], r"noise\.sigma_max_factor must be >= 1, got 0\.9"),
    (["algo.tis_cap=0.5"], r"algo\.tis_cap must be >= 1 .*got 0\.5"),
    (["algo.clip_low=-0.2"], r"algo\.clip_low must be a finite number >= 0, got -0\.2"),
    (["algo.kl_coef=-1e-4"], r"algo\.kl_coef must be a finite number >= 0"),
    (["algo.advantage=maxpo", "algo.k=8"], r"algo\.k: maxpo needs k <= G - 1 = 7"),
    (["algo.advantage=pkpo", "algo.k=9"], r"algo\.k: k must satisfy 1 <= k <= G = 8, got k = 9"),
    (["algo.k=4"], r"algo\.k: advantage estimator 'grpo' takes no k, got k = 4"),
    (["train.iterations=0"], r"train\.iterations must be >= 1, got 0"),
    (["train.micro_batch_tokens=19"],
     r"train\.micro_batch_tokens = 19 cannot hold one sequence of .* = 20"),
    (["train.mini_batch_prompts=5"],
     r"rollout\.prompts_per_iter = 32 must be a multiple of train\.mini_batch_prompts = 5"),
    (["train.lr=0"], r"train\.lr must be > 0, got 0\.0"),
    (["train.weight_decay=-0.1"], r"train\.weight_decay must be >= 0, got -0\.1"),
    (["train.betas=[0.9, 1.0]"], r"train\.betas must both be in \[0, 1\), got \(0\.9, 1\.0\)"),
    (["train.grad_clip=0"], r"train\.grad_clip must be > 0 \(or null: off\), got 0\.0"),
    (["train.sft_warmup_steps=-1"], r"train\.sft_warmup_steps must be >= 0, got -1"),
    (["train.seed=-1"], r"train\.seed must be in \[0, 2\*\*63\), got -1"),
    (["eval.every=-1"], r"eval\.every must be >= 0 \(0: never\), got -1"),
    (["eval.n_samples=0"], r"eval\.n_samples must be >= 1, got 0"),
    (["eval.ks=[1, 32]"], r"eval\.ks must be in \[1, eval\.n_samples = 16\], got \(1, 32\)"),
    (["eval.ks=[]"], r"eval\.ks must be a non-empty list of distinct ints, got \(\)"),
    (["eval.ks=[1, 1]"], r"eval\.ks must be a non-empty list of distinct ints"),
    (["eval.sets=[]"], r"eval\.sets must name at least one set when eval\.every > 0, got \(\)"),
    (["checkpoint.every=-1"], r"checkpoint\.every must be >= 0 \(0: never\), got -1"),
    (["checkpoint.keep=-1"], r"checkpoint\.keep must be >= 0 \(0: keep all\), got -1"),
    (["checkpoint.dir=''"], r"checkpoint\.dir must be a non-empty path or null, got ''"),
    (["log.dir=''"], r"log\.dir must be a non-empty path, got ''"),
])
def test_out_of_range(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_range_error_keeps_the_key():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["noise.sigma=-1"])
    assert info.value.key == "noise.sigma"
    assert isinstance(info.value, ValueError)


def test_noise_off_allows_sigma_zero():
    assert load_config(None, ["noise.enabled=false", "noise.sigma=0"]).noise.sigma == 0.0


# ---------------------------------------------------------------------------- errors: syntax, files

@pytest.mark.parametrize("override", ["foo", "rollout=3", "rollout.group_size", ".group_size=3",
                                      "rollout.=3", "rollout.group.size=3", "=3"])
def test_malformed_override(override):
    assert error(None, override) == f"malformed override {override!r}: expected section.key=value"


def test_override_must_be_a_string_list():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, [3])
    with pytest.raises(ConfigError, match="overrides must be a list"):
        load_config(None, "rollout.group_size=3")


def test_unparsable_override_value():
    with pytest.raises(ConfigError, match=r"^override 'eval\.ks=\[1,': invalid YAML: did not find expected"):
        load_config(None, ["eval.ks=[1,"])


def test_bad_interpolation(tmp_path):
    assert error(None, "log.dir=${") == "override 'log.dir=${': no viable alternative at input '${'"
    path = write(tmp_path, "log:\n  dir: ${nope}\n")
    assert error(path) == f"{path}: log.dir: Interpolation key 'nope' not found"
    assert load_config(path, ["log.dir=runs/x"]).log.dir == "runs/x"


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope\.yaml' does not exist; .*shipped config: "
                                          r"qwen2\.5-math-1\.5b, qwen2\.5-math-7b, tiny"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is not a file"):
        load_config(tmp_path)


def test_file_not_a_mapping(tmp_path):
    path = write(tmp_path, "- rollout\n- noise\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: a config file must be a mapping"):
        load_config(path)
    path = write(tmp_path, "rollout: 8\n")
    assert error(path) == f"{path}: section rollout must be a mapping of keys, got 8 (int)"
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: section rollout must be a mapping"):
        load_config(path, ["rollout.group_size=4"])


def test_invalid_yaml_file(tmp_path):
    path = write(tmp_path, "rollout:\n  group_size: [8\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}, line 3, column 1: invalid YAML: .*expected ','"):
        load_config(path)


def test_config_from_dict_needs_a_mapping():
    with pytest.raises(ConfigError, match="a config must be a mapping of sections, got list"):
        config_from_dict([])
