"""psnrl installs one import name and never shadows anyone else's package.

transformers >= 5.25 imports Hugging Face's ``kernels`` package while loading any model
class; psnrl's kernels live at ``psnrl.kernels`` so the two never meet. Each probe runs in
a fresh interpreter (no earlier import decides the outcome), from the repository root
(where a top-level folder would shadow site-packages) and from an unrelated folder.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OLD_TOP_LEVEL = ("kernels", "engine", "trainer", "bench")

PROBE = r"""
import importlib.util, sys
from pathlib import Path
import torch
from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

root = Path(sys.argv[1])
def ours(path):  # a top-level folder of the checkout, or anything inside psnrl/
    path = Path(path).resolve()
    return path.parent.parent == root or root / "psnrl" in path.parents
# Hugging Face's `kernels` (a dependency of transformers >= 5.25) is theirs, never ours;
# engine, trainer and bench resolve to nothing of psnrl's.
spec = importlib.util.find_spec("kernels")
if spec is not None:
    import kernels
    assert not ours(kernels.__file__), kernels.__file__
for name in ("engine", "trainer", "bench"):
    spec = importlib.util.find_spec(name)
    assert spec is None or not ours(spec.origin or root / name / "-"), (name, spec)

from psnrl import LLM, NoiseSpec, SamplingParams

torch.manual_seed(0)
cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
hf = Qwen2ForCausalLM(cfg).eval()
hf.save_pretrained(sys.argv[2])
prompt = [5, 17, 33, 2, 9]
with torch.no_grad():
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                       pad_token_id=0)[0, len(prompt):].tolist()
llm = LLM(sys.argv[2], dtype="float32", block_size=4)
greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
clean, noisy = llm.generate([prompt, prompt], greedy, noise=[None, NoiseSpec(seed=1, sigma=0.01)],
                            use_tqdm=False)
assert clean.outputs[0].token_ids == want, (clean.outputs[0].token_ids, want)
assert len(noisy.outputs[0].token_ids) == 6
print("ok")
"""


@pytest.mark.parametrize("where", ["repo-root", "elsewhere"])
def test_transformers_and_psnrl_load_side_by_side(tmp_path, where):
    cwd = ROOT if where == "repo-root" else tmp_path
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), str(tmp_path / "ckpt")], cwd=cwd,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_no_old_top_level_packages_in_the_checkout():
    # A top-level folder named like a dependency shadows it for anyone running from the root.
    for name in OLD_TOP_LEVEL:
        assert not (ROOT / name / "__init__.py").exists(), name


def test_import_psnrl_is_cheap_and_exports_the_public_api():
    code = (
        "import sys, psnrl\n"
        "heavy = [m for m in ('torch', 'triton', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from psnrl import LLM, NoiseSpec, PSNTrainer, SamplingParams, load_config\n"
        "from psnrl.engine.llm import LLM as L\n"
        "from psnrl.trainer.loop import PSNTrainer as T\n"
        "assert LLM is L and PSNTrainer is T\n"
        "assert set(psnrl.__all__) <= set(dir(psnrl))\n"
        "try:\n"
        "    psnrl.nope\n"
        "except AttributeError as e:\n"
        "    assert 'nope' in str(e)\n"
        "else:\n"
        "    raise AssertionError('psnrl.nope resolved')\n"
        "print(psnrl.__version__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == importlib.import_module("psnrl").__version__


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_name(tmp_path):
    # pip builds it as a user's `pip install .` would: an isolated build of a copy of the tree.
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("psnrl-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        top_level = z.read(f"{dist_info}/top_level.txt").decode().split()
    assert {n.split("/")[0] for n in names} == {"psnrl", dist_info}
    assert top_level == ["psnrl"]
    # The shipped data, configs and the C++ extension travel with their components.
    assert any(n.startswith("psnrl/engine/_block_manager") and n.endswith(".so") for n in names)
    for needed in ("psnrl/__init__.py", "psnrl/trainer/configs/tiny.yaml", "psnrl/trainer/data/math500.jsonl",
                   "psnrl/trainer/data/SOURCES.md", "psnrl/kernels/README.md", "psnrl/bench/README.md"):
        assert needed in names, needed
