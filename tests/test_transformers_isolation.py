"""Our top-level ``kernels`` package must not look like Hugging Face's ``kernels`` to transformers."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import kernels, kernels.noisy_linear  # ours, imported first on purpose
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.utils.import_utils import is_kernels_available
from transformers.integrations import hub_kernels
assert kernels.__file__.startswith(ROOT), kernels.__file__
assert not is_kernels_available(), "transformers thinks hub kernels are installed"
assert not hasattr(hub_kernels, "_kernels_kernelize"), "transformers imported hub kernels from our package"
cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2)
torch.manual_seed(0)
model = Qwen2ForCausalLM(cfg).eval()
with torch.no_grad():
    logits = model(torch.tensor([[1, 2, 3]])).logits
assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()
print("ok")
"""


def test_transformers_does_not_take_our_kernels_for_hub_kernels():
    # A fresh interpreter, so no earlier import decides the outcome.
    code = f"ROOT = {str(ROOT)!r}\n" + PROBE
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
