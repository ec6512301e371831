"""Our `kernels` package must import without Triton and must not pass for Hugging Face's `kernels`."""
import subprocess
import sys
from pathlib import Path

import kernels

REPO = Path(__file__).resolve().parents[2]


def test_diffusers_and_transformers_do_not_mistake_ours_for_hf_kernels():
    from diffusers.utils.import_utils import is_kernels_available as diffusers_sees
    from transformers.utils import is_kernels_available as transformers_sees

    assert Path(kernels.__file__).parent == REPO / "kernels"
    assert not diffusers_sees()
    assert not transformers_sees()


def test_imports_and_runs_the_twins_without_triton():
    script = """
import sys
sys.modules["triton"] = None  # as if the gpu extra were not installed
import torch, kernels
from kernels import dispatch
assert not dispatch.triton_available()
q = torch.randn(1, 2, 8, 40)
assert torch.allclose(kernels.attention(q, q, q), torch.nn.functional.scaled_dot_product_attention(q, q, q))
x = torch.randn(2, 3)
assert kernels.cfg_euler_step(x, torch.randn(4, 3), 0.1, 2.0).shape == x.shape
try:
    kernels.attention(q, q, q, backend="triton")
except ImportError as err:
    print(err)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "the Triton kernels need the gpu extra: pip install 'rfserve[gpu]'"
