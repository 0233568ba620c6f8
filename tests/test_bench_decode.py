"""psnrl/bench/decode.py and psnrl/bench/model_configs.py: configs, random checkpoints, rows, markdown, and a
CPU smoke run of the whole bench (tiny model); the real run on a GPU."""
import json
import math
import statistics

import pytest
import torch
from safetensors import safe_open

from psnrl.bench import decode as bench
from psnrl.bench import decode_workloads as workloads
from psnrl.bench import model_configs as mc
from psnrl.bench.common import device_slug

HAS_CUDA = torch.cuda.is_available()


# ---------------------------------------------------------------------------
# model_configs
# ---------------------------------------------------------------------------

def test_qwen25_configs_have_the_published_shapes():
    expect = {  # hidden, intermediate, layers, heads, kv heads, vocab, tied, max positions
        "Qwen2.5-0.5B": (896, 4864, 24, 14, 2, 151936, True, 32768),
        "Qwen2.5-1.5B": (1536, 8960, 28, 12, 2, 151936, True, 131072),
        "Qwen2.5-7B": (3584, 18944, 28, 28, 4, 152064, False, 131072),
    }
    assert mc.QWEN25 == tuple(expect)
    for name, values in expect.items():
        c = mc.CONFIGS[name]
        assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
                c["num_attention_heads"], c["num_key_value_heads"], c["vocab_size"],
                c["tie_word_embeddings"], c["max_position_embeddings"]) == values
        assert c["architectures"] == ["Qwen2ForCausalLM"] and c["torch_dtype"] == "bfloat16"
        assert c["rope_theta"] == 1e6 and c["rms_norm_eps"] == 1e-6
        assert mc.head_dim(name) == (64 if name == "Qwen2.5-0.5B" else 128)
    # The model cards: 0.49B, 1.54B, 7.61B parameters.
    assert mc.param_count("0.5B") == 494_032_768
    assert mc.param_count("1.5B") == 1_543_714_304
    assert mc.param_count("7B") == 7_615_616_512
    assert math.isclose(mc.param_count("0.5B"), 0.49e9, rel_tol=0.01)
    assert math.isclose(mc.param_count("1.5B"), 1.54e9, rel_tol=0.01)
    assert mc.kv_bytes_per_token("1.5B", torch.bfloat16) == 2 * 28 * 2 * 128 * 2


@pytest.mark.parametrize("name", list(mc.CONFIGS))
def test_param_shapes_match_transformers(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = mc.get_config(name)
    hf_cfg = AutoConfig.for_model(raw.pop("model_type"), **{k: v for k, v in raw.items()
                                                            if k != "torch_dtype"})
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_cfg)
    hf_shapes = {k: tuple(p.shape) for k, p in hf.named_parameters()}  # tied lm_head listed once
    assert mc.param_shapes(name) == hf_shapes
    assert mc.param_count(name) == sum(p.numel() for p in hf.parameters())


def test_resolve_and_get_config():
    assert mc.resolve("7b") == mc.resolve("Qwen2.5-7B") == "Qwen2.5-7B"
    assert mc.resolve("TINY") == "tiny"
    with pytest.raises(ValueError, match="unknown model '13B'"):
        mc.resolve("13B")
    cfg = mc.get_config("0.5B")
    cfg["hidden_size"] = 1
    assert mc.CONFIGS["Qwen2.5-0.5B"]["hidden_size"] == 896  # a copy
    assert mc.get_config({"a": [1]}) == {"a": [1]}
    assert mc.as_dtype("bf16") is torch.bfloat16 and mc.as_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError):
        mc.as_dtype("int8")


def _file_tensors(path):
    files = sorted(path.glob("model*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


@pytest.mark.parametrize("shard", [False, True], ids=["single-file", "sharded"])
def test_random_checkpoint_loads_in_the_engine(tmp_path, shard):
    from psnrl.engine.loader import load_model

    options = {"max_shard_bytes": 20_000} if shard else {}
    path = mc.write_random_checkpoint("tiny", tmp_path / "ck", dtype="fp32", seed=3, **options)
    assert path == tmp_path / "ck"
    raw = json.loads((path / "config.json").read_text())
    assert raw["torch_dtype"] == "float32" and raw["hidden_size"] == 64
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 1
    assert (path / mc.INDEX_FILE).is_file() == shard
    assert len(list(path.glob("model*.safetensors"))) == (1 if not shard else
                                                          len(list(path.glob("model-*-of-*"))))
    tensors = _file_tensors(path)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == mc.param_shapes("tiny")
    model = load_model(path)  # the dtype from config.json
    params = dict(model.named_parameters())
    assert set(params) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(params[name].detach(), t), name
    assert torch.equal(params["model.layers.0.input_layernorm.weight"], torch.ones(64))
    w = params["model.layers.1.mlp.down_proj.weight"]
    assert 0.015 < w.std().item() < 0.025  # initializer_range
    # Same seed: same weights; another seed: others. Rewriting replaces the files.
    again = _file_tensors(mc.write_random_checkpoint("tiny", tmp_path / "ck2", dtype="fp32", seed=3))
    other = _file_tensors(mc.write_random_checkpoint("tiny", tmp_path / "ck", dtype="bf16", seed=4))
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)
    assert not torch.equal(other["model.embed_tokens.weight"].float(), tensors["model.embed_tokens.weight"])
    assert not (tmp_path / "ck" / mc.INDEX_FILE).exists()
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_random_checkpoint_untied_and_transformers_agree(tmp_path):
    """An untied config gets an lm_head; transformers loads the same weights and the engine's
    greedy tokens equal transformers' (wide weights, so argmax ties cannot flip)."""
    from transformers import AutoModelForCausalLM

    from psnrl.engine.llm import LLM
    from psnrl.engine.sampling import SamplingParams

    cfg = {**mc.get_config("tiny"), "tie_word_embeddings": False}
    path = mc.write_random_checkpoint(cfg, tmp_path / "untied", dtype=torch.float32, seed=1, std=0.3)
    assert "lm_head.weight" in _file_tensors(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(path, dtype="float32", device="cpu", block_size=4, num_kv_blocks=32, max_model_len=64)
    for name, p in llm.model.named_parameters():
        assert torch.equal(p.detach(), hf.state_dict()[name]), name
    prompt = [5, 17, 33, 2, 9, 100]
    ours = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6,
                             do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs


# ---------------------------------------------------------------------------
# Rows, roofline, markdown
# ---------------------------------------------------------------------------

def test_peak_bandwidth_table():
    assert workloads.peak_gbps("NVIDIA H100 80GB HBM3") == 3350
    assert workloads.peak_gbps("NVIDIA H100 PCIe") == 2000
    assert workloads.peak_gbps("NVIDIA H200") == 4800
    assert workloads.peak_gbps("NVIDIA GH200 480GB") == 4000
    assert workloads.peak_gbps("NVIDIA A100-SXM4-80GB") == 2039
    assert workloads.peak_gbps("NVIDIA A100-SXM4-40GB") == 1555
    assert workloads.peak_gbps("NVIDIA A10G") == 600
    assert workloads.peak_gbps("cpu") is None


def test_decode_bytes_per_step():
    # Tied 0.5B, no context: every parameter once (the embedding is the lm_head) + the batch's rows.
    assert workloads.decode_bytes_per_step("0.5B", 1, 0, torch.bfloat16) == (494_032_768 + 896) * 2
    # Untied 7B: the input embedding is only gathered; K/V of 8 sequences x 100 tokens.
    b = workloads.decode_bytes_per_step("7B", 8, 100, "bf16")
    weights = (7_615_616_512 - 152064 * 3584 + 8 * 3584) * 2
    assert b == weights + 8 * 100 * mc.kv_bytes_per_token("7B", "bf16")
    assert workloads.mean_decode_context(128, 256) == 256


def timing(tps_tokens=100, total=2.0, steps=(10.0, 12.0, 11.0), prefill=0.5):
    return workloads.Timing(total_s=total, decode_ms=list(steps), prefill_s=prefill,
                        output_tokens=tps_tokens)


def work(batch=8, prompt_len=128, output_len=256, group_size=10):
    return workloads.fixed_workload(batch, prompt_len, output_len, group_size, vocab_size=1000, seed=0)


def fixture_rows(model="Qwen2.5-0.5B", batch=8):
    speeds = {"clean": 4.0, "noisy": 5.0, "mixed": 5.0, "hf": 10.0}  # total seconds for 100 tokens
    rows = [bench.build_row(model, work(batch), mode, [timing(total=t)], 1_000_000_000, 3350.0)
            for mode, t in speeds.items()]
    return rows


def test_fixed_workload_groups_share_a_prompt():
    w = work(batch=23, prompt_len=5, output_len=7, group_size=10)
    assert (w.name, w.batch, w.prompt_len, w.output_len, w.output_tokens) == ("fixed", 23, 5, 7, 161)
    firsts = [w.prompts[i] for i in (0, 10, 20)]
    assert all(w.prompts[i] is firsts[i // 10] for i in range(23))  # one list object per group
    assert len({tuple(p) for p in firsts}) == 3 and all(len(p) == 5 for p in firsts)
    assert w.prompts[3] == work(batch=23, prompt_len=5, output_len=7).prompts[3]  # seeded


def test_nano_vllm_workload_has_uniform_random_lengths():
    w = workloads.nano_vllm_workload(vocab_size=50, seed=3)
    assert (w.name, w.batch, w.group_size) == ("nano-vllm", 256, 1)
    prompt_lens = [len(p) for p in w.prompts]
    for lengths in (prompt_lens, w.output_lens):
        assert min(lengths) >= 100 and max(lengths) <= 1024
        # uniform on [100, 1024]: mean 562, std 267; 256 draws put the mean within 4 sigma/16 = 67
        assert abs(statistics.fmean(lengths) - 562) < 67
    assert len({tuple(p) for p in w.prompts}) == 256 and max(max(p) for p in w.prompts) < 50
    assert w.output_lens == workloads.nano_vllm_workload(vocab_size=50, seed=3).output_lens
    small = workloads.nano_vllm_workload(vocab_size=50, seed=3, seqs=4, lengths=(2, 3))
    assert small.batch == 4 and {len(p) for p in small.prompts} <= {2, 3}


def test_sequence_noise_and_requests():
    spec = object()
    assert workloads.sequence_noise(3, "clean", spec, 10, 2) == [None] * 3
    assert workloads.sequence_noise(3, "noisy", spec, 10, 2) == [spec] * 3
    mixed = workloads.sequence_noise(23, "mixed", spec, 10, 2)
    assert mixed == ([spec] * 8 + [None] * 2) * 2 + [spec] * 3  # 8 noisy + 2 clean probes per group
    assert workloads.sequence_noise(1, "mixed", spec, 10, 2) == [spec]
    with pytest.raises(ValueError, match="not an engine mode"):
        workloads.sequence_noise(1, "hf", spec, 10, 2)
    w = work(batch=23, prompt_len=5, output_len=7)
    requests = workloads.engine_requests(w, mixed)
    assert [(n, length, s) for _, n, length, s in requests] == [
        (8, 7, spec), (2, 7, None), (8, 7, spec), (2, 7, None), (3, 7, spec)]
    assert [r[0] for r in requests] == [w.prompts[i] for i in (0, 8, 10, 18, 20)]
    nano = workloads.nano_vllm_workload(vocab_size=50, seed=0, seqs=3, lengths=(2, 9))
    assert [n for _, n, _, _ in workloads.engine_requests(nano, [None] * 3)] == [1, 1, 1]


def test_build_row_and_ratios():
    row = bench.build_row("Qwen2.5-0.5B", work(), "noisy",
                          [timing(total=2.0), timing(total=4.0), timing(total=3.0)], 2_000_000_000, 4000.0)
    assert set(bench.ROW_KEYS) <= set(row)
    assert (row["workload"], row["batch"], row["prompt_len"], row["output_len"]) == ("fixed", 8, 128, 256)
    assert row["tok_s"] == pytest.approx(100 / 3.0, abs=0.01)  # median over repeats
    assert row["step_ms"] == 11.0  # median over all decode steps
    assert row["gbps"] == pytest.approx(2e9 / 11e-3 / 1e9, abs=1e-4)
    assert row["roofline_frac"] == pytest.approx(row["gbps"] / 4000, abs=1e-4)
    assert row["decode_steps"] == 3 and row["repeats"] == 3
    nano = bench.build_row("Qwen2.5-0.5B", workloads.nano_vllm_workload(100, 0, seqs=4), "clean",
                           [timing()], None, 4000.0)
    assert nano["workload"] == "nano-vllm" and nano["gbps"] is None and nano["roofline_frac"] is None

    rows = bench.add_ratios(fixture_rows() + fixture_rows(batch=32)[:1])
    by = {(r["batch"], r["mode"]): r for r in rows}
    assert by[(8, "clean")]["over_hf"] == 2.5 and by[(8, "clean")]["over_clean"] is None
    assert by[(8, "clean")]["hf_tok_s"] == 10.0
    assert by[(8, "noisy")]["over_hf"] == 2.0 and by[(8, "noisy")]["over_clean"] == 0.8
    assert by[(8, "mixed")]["over_noisy"] == 1.0 and by[(8, "mixed")]["over_clean"] == 0.8
    assert by[(8, "hf")]["over_hf"] is None and by[(8, "hf")]["over_clean"] is None
    assert by[(32, "clean")]["over_hf"] is None and by[(32, "clean")]["hf_tok_s"] is None


def test_markdown_puts_modes_side_by_side_and_lists_errors():
    meta = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11", "triton": "3.6", "transformers": "5.17",
            "dtype": "bf16", "peak_gbps": 3350.0, "peak_source": "PEAK_GBPS table", "method": "M."}
    err = bench.error_row("Qwen2.5-0.5B", work(256), "hf", RuntimeError("CUDA out of memory"))
    assert set(bench.ROW_KEYS) <= set(err)
    md = bench.render_markdown(meta, bench.add_ratios(fixture_rows() + [err]))  # as FILES writes it
    assert "# decode on NVIDIA H100 80GB HBM3" in md
    assert "## Qwen2.5-0.5B, prompt 128, output 256" in md
    assert "| batch | clean tok/s | noisy tok/s | mixed tok/s | hf tok/s |" in md
    line8 = next(line for line in md.splitlines() if line.startswith("| 8 |"))
    assert "| 25 | 20 | 20 | 10 |" in line8 and "| 2.50 | 2.00 | 0.800 | 0.800 | 1.000 |" in line8
    assert "3,350 GB/s" in md
    assert "- Qwen2.5-0.5B fixed batch 256 hf: RuntimeError: CUDA out of memory" in md


def test_write_results_and_merge(tmp_path):
    meta = {"device": "NVIDIA H200", "torch": "t", "triton": "tr", "transformers": "tf"}
    json_path, md_path = bench.FILES.write(tmp_path, meta, fixture_rows())
    assert json_path.name == "decode-nvidia-h200.json" and md_path.name == "decode-nvidia-h200.md"
    doc = json.loads(json_path.read_text())
    assert list(doc)[:4] == list(bench.META_KEYS) and doc["rows"][1]["over_clean"] == 0.8
    with pytest.raises(ValueError, match="transformers"):
        bench.FILES.write(tmp_path, {"device": "x", "torch": "", "triton": ""}, [])
    args = bench.parse_args(["--models", "0.5B", "--batches", "8", "--modes", "hf", "--prompt-len", "128",
                             "--output-len", "256", "--out-dir", str(tmp_path)])
    kept = bench.previous_rows(args, "NVIDIA H200")
    assert [(r["batch"], r["mode"]) for r in kept] == [(8, "clean"), (8, "noisy"), (8, "mixed")]
    nano = bench.build_row("Qwen2.5-0.5B", workloads.nano_vllm_workload(100, 0, seqs=4), "clean",
                           [timing()], None, None)
    bench.FILES.write(tmp_path, meta, fixture_rows() + [nano])
    kept = bench.previous_rows(bench.parse_args(["--models", "0.5B", "--modes", "clean", "--batches", "8",
                                                 "--out-dir", str(tmp_path)]), "NVIDIA H200")
    assert nano["workload"] not in {r["workload"] for r in kept}  # measured again: replaced
    assert len(kept) == 4  # the fixed rows at prompt 128 / output 256 are not planned


# ---------------------------------------------------------------------------
# Command line and the whole run
# ---------------------------------------------------------------------------

@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU path")
def test_main_without_cuda_returns_2_with_message(capsys, tmp_path):
    assert bench.main(["--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "psnrl bench decode needs a CUDA GPU; none found" in err and "--device cpu" in err
    assert list(tmp_path.iterdir()) == []


def test_arguments():
    args = bench.parse_args([])
    assert args.models == ["Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-7B"] and args.batches == [1, 16, 64, 256]
    assert args.modes == ["clean", "noisy", "mixed", "hf"] and args.dtype == "bf16"
    assert (args.prompt_len, args.output_len, args.sigma, args.targets) == (512, 512, 0.004, "mlp")
    assert (args.group_size, args.probes, args.nano_vllm_model) == (10, 2, "Qwen2.5-0.5B")
    assert (args.nano_vllm_seqs, args.nano_vllm_lengths) == (256, [100, 1024])
    args = bench.parse_args(["--models", "7b,tiny", "--batches", "32", "1,8", "--modes", "hf", "clean"])
    assert args.models == ["Qwen2.5-7B", "tiny"] and args.batches == [1, 8, 32]
    assert args.modes == ["clean", "hf"] and args.nano_vllm_model is None  # 0.5B not among the models
    assert bench.parse_args(["--models", "0.5B", "--nano-vllm-model", "none"]).nano_vllm_model is None
    for bad in (["--models", "13B"], ["--modes", "vllm"], ["--batches", "0"], ["--sigma", "0"],
                ["--targets", "embed"], ["--models", "tiny", "--prompt-len", "1000"],
                ["--probes", "10"], ["--group-size", "2", "--probes", "2"],
                ["--models", "1.5B", "--nano-vllm-model", "0.5B"],
                ["--nano-vllm-lengths", "9", "3"], ["--models", "tiny", "--nano-vllm-model", "tiny"]):
        with pytest.raises(SystemExit) as exc:
            bench.parse_args(bad)
        assert exc.value.code == 2, bad


def test_registered_in_the_cli():
    from psnrl.trainer.cli import BENCHES

    assert BENCHES["decode"] == "psnrl.bench.decode"


def test_cpu_smoke_run_end_to_end(tmp_path, monkeypatch, capsys):
    """The whole bench on the tiny model: engine clean/noisy/mixed and HF, results files."""
    # The engine's CPU reference paths instead of the (slow) Triton interpreter.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "results"
    rc = bench.main(["--device", "cpu", "--models", "tiny", "--batches", "1", "12", "--prompt-len", "4",
                     "--output-len", "3", "--dtype", "fp32", "--warmup", "0", "--peak-gbps", "50",
                     "--nano-vllm-model", "tiny", "--nano-vllm-seqs", "5", "--nano-vllm-lengths", "2", "6",
                     "--out-dir", str(out)])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["decode-cpu.json", "decode-cpu.md"]
    doc = json.loads((out / "decode-cpu.json").read_text())
    assert set(bench.META_KEYS) | {"rows"} <= set(doc) and doc["device"] == "cpu"
    assert doc["torch"] == torch.__version__ and doc["peak_gbps"] == 50
    rows = doc["rows"]
    assert [(r["workload"], r["batch"], r["mode"]) for r in rows] == [
        ("fixed", 1, "clean"), ("fixed", 1, "noisy"), ("fixed", 1, "mixed"),
        ("fixed", 12, "clean"), ("fixed", 12, "noisy"), ("fixed", 12, "mixed"),
        ("nano-vllm", 5, "clean"), ("nano-vllm", 5, "noisy"), ("nano-vllm", 5, "mixed"),
        ("fixed", 1, "hf"), ("fixed", 12, "hf")]
    by = {(r["workload"], r["batch"], r["mode"]): r for r in rows}
    for row in rows:
        assert set(bench.ROW_KEYS) <= set(row) and "error" not in row
        assert row["tok_s"] > 0 and row["step_ms"] > 0
        if row["mode"] != "hf":  # the engine's decode steps split into forward, sampler and the rest
            assert row["forward_ms"] > 0 and row["sample_ms"] > 0
            assert row["forward_ms"] + row["sample_ms"] < 1.5 * row["step_ms"]
        if row["mode"] in ("noisy", "mixed"):
            clean = by[(row["workload"], row["batch"], "clean")]["tok_s"]
            assert row["over_clean"] == pytest.approx(row["tok_s"] / clean, rel=1e-3)
        if row["workload"] == "nano-vllm":
            assert row["gbps"] is None and row["hf_tok_s"] is None and row["over_hf"] is None
            assert 2 <= row["prompt_len"] <= 6 and 2 <= row["output_len"] <= 6
            continue
        assert (row["model"], row["prompt_len"], row["output_len"]) == ("tiny", 4, 3)
        assert row["decode_steps"] == 2 and row["gbps"] > 0  # the first token comes with the prefill
        assert row["roofline_frac"] == pytest.approx(row["gbps"] / 50, abs=2e-4)
        hf = by[("fixed", row["batch"], "hf")]["tok_s"]
        assert row["hf_tok_s"] == hf
        if row["mode"] != "hf":
            # stored rounded to 4 decimals: a small ratio (HF fast on a loaded CPU) is off by up to 5e-5
            assert row["over_hf"] == pytest.approx(row["tok_s"] / hf, rel=1e-3, abs=5e-5)
    md = (out / "decode-cpu.md").read_text()
    assert "## tiny, prompt 4, output 3" in md and "| 12 |" in md and "Errors" not in md
    nano_table = md.split("## tiny, nano-vllm setting")[1]
    assert "| 5 |" in nano_table and "hf tok/s" not in nano_table  # no HF column for nano-vllm


@pytest.mark.gpu
def test_main_on_a_small_subset(tmp_path):
    rc = bench.main(["--models", "0.5B", "--batches", "1", "8", "--prompt-len", "16", "--output-len", "16",
                     "--nano-vllm-seqs", "8", "--nano-vllm-lengths", "16", "32", "--out-dir", str(tmp_path)])
    assert rc == 0
    slug = device_slug(torch.cuda.get_device_name())
    doc = json.loads((tmp_path / f"decode-{slug}.json").read_text())
    assert (tmp_path / f"decode-{slug}.md").exists()
    assert len(doc["rows"]) == 2 * 4 + 3  # fixed: 2 batches x 4 modes; nano-vllm: 3 engine modes
    for row in doc["rows"]:
        assert "error" not in row and row["tok_s"] > 0 and row["step_ms"] > 0
