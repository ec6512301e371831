"""`rfserve.kernels` must import and run its twins without Triton."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_imports_and_runs_the_twins_without_triton():
    script = """
import sys
sys.modules["triton"] = None  # as if the gpu extra were not installed
import torch
from rfserve import kernels
from rfserve.kernels import dispatch
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
