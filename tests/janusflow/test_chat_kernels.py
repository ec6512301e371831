"""Chat's attention goes through the kernel dispatcher: the prompt through `kernels.attention` (causal), each
decode step through `kernels.decode_attention` (each row's live columns), SigLIP through `kernels.attention`.
With the Triton kernels forced (Triton's interpreter on the CPU), the greedy tokens are the twins'."""
import numpy as np
import torch

from rfserve import kernels
from rfserve.kernels import dispatch
from rfserve.model_zoo.registry import load_model, parse_spec
from tests.janusflow.greedy import greedy


def test_prefill_and_decode_run_the_kernels(tiny_janus, monkeypatch):
    model = load_model(parse_spec(f"janusflow-1.3b={tiny_janus}"), torch.device("cpu"), torch.float32)
    decoder = model.chat.decoder(2, 64)
    rng = np.random.default_rng(0)
    vocab = decoder.lm.config.vocab_size
    prompts = [[int(t) for t in rng.integers(10, vocab, n)] for n in (5, 9)]
    kernels.clear_decisions()
    twin = greedy(decoder, prompts, steps=4)
    ops = {key[0] for key in kernels.decisions()}
    assert {"attention", "decode_attention"} <= ops
    monkeypatch.setenv(dispatch.ENV, "triton")
    try:
        assert greedy(decoder, prompts, steps=4) == twin
        assert not [k for k, d in kernels.decisions().items() if d.reason.startswith("self-check failed")]
    finally:
        kernels.clear_decisions()


def test_siglip_attention_runs_the_kernel(tiny_janus):
    model = load_model(parse_spec(f"janusflow-1.3b={tiny_janus}"), torch.device("cpu"), torch.float32)
    tower = model.pipeline.parts.model.vision_und_enc_model.vision_tower
    kernels.clear_decisions()
    try:
        side = tower.patch_embed.proj.kernel_size[0] * round(tower.pos_embed.shape[1] ** 0.5)   # its image size
        with torch.inference_mode():
            tower(torch.randn(1, 3, side, side))
        assert any(key[0] == "attention" for key in kernels.decisions())
    finally:
        kernels.clear_decisions()
