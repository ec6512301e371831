"""`attn_implementation="rfserve"` in transformers matches "sdpa" on a tiny Llama."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rfserve import kernels
from kernel_checks import DEVICE


@pytest.fixture
def attention_calls(monkeypatch):
    """Count calls into kernels.attention made by the transformers hook."""
    calls = []
    real = kernels.attention

    def spy(q, k, v, **kwargs):
        calls.append(kwargs["causal"])
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(kernels, "attention", spy)
    return calls


def _config():
    return LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _pair():
    # One config each: _from_config records the implementation on the config it is given.
    reference = LlamaForCausalLM._from_config(_config(), attn_implementation="sdpa").to(DEVICE).eval()
    name = kernels.register_transformers_attention()
    ours = LlamaForCausalLM._from_config(_config(), attn_implementation=name).to(DEVICE).eval()
    ours.load_state_dict(reference.state_dict())
    return reference, ours


@pytest.mark.parametrize("env", ["torch", "triton"])
def test_prefill_logits_match_sdpa(monkeypatch, attention_calls, env):
    monkeypatch.setenv("RFSERVE_KERNELS", env)
    reference, ours = _pair()
    ids = torch.randint(0, 97, (2, 11), device=DEVICE)
    with torch.no_grad():
        expected, got = reference(ids).logits, ours(ids).logits
    assert attention_calls == [True, True]  # both layers, causal, through the kernel
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_padded_batch_and_cached_decoding_match_sdpa(attention_calls):
    reference, ours = _pair()
    ids = torch.randint(0, 97, (2, 9), device=DEVICE)
    mask = torch.ones(2, 9, dtype=torch.long, device=DEVICE)
    mask[1, :3] = 0  # left padding goes through transformers' SDPA with the mask
    with torch.no_grad():
        expected = reference.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected)
    ids = ids[:1]
    with torch.no_grad():
        expected = reference.generate(ids, max_new_tokens=4, do_sample=False)
        got = ours.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected)
    assert True in attention_calls and False in attention_calls  # causal prefill, then one-token decode steps
