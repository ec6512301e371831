"""Diffusers models give the same output with the rfserve processor installed, through the twin and
through the Triton kernel (interpreter here)."""
import pytest
import torch
from diffusers import AutoencoderKL, HunyuanDiT2DModel, UNet2DConditionModel
from diffusers.models.embeddings import get_2d_rotary_pos_embed

from rfserve import kernels
import rfserve.kernels.triton_attention
from rfserve.kernels.processors import RfserveAttnProcessor

from kernel_checks import DEVICE, assert_close_to


@pytest.fixture
def triton_calls(monkeypatch):
    """Count launches of the Triton attention kernel."""
    calls = []
    real = kernels.triton_attention.attention_triton

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels.triton_attention, "attention_triton", spy)
    return calls


def tiny_unet():
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
    ).to(DEVICE).eval()


def tiny_vae():
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
        norm_num_groups=8, sample_size=16,
    ).to(DEVICE).eval()


def _with_and_without(model, backend, *args, **kwargs):
    with torch.no_grad():
        ref = model(*args, **kwargs)[0]
        replaced = kernels.install_attention(model, backend=backend)
        out = model(*args, **kwargs)[0]
    return replaced, ref, out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unet(backend, triton_calls):
    x, t, text = (a.to(DEVICE) for a in (torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 7, 32)))
    replaced, ref, out = _with_and_without(tiny_unet(), backend, x, t, text)
    assert replaced == 8  # self- and cross-attention in the down, mid and up blocks
    assert (len(triton_calls) > 0) == (backend == "triton")
    assert_close_to(out, ref)


def test_unet_with_an_encoder_attention_mask_keeps_diffusers_mask_semantics():
    x, t, text = (a.to(DEVICE) for a in (torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.randn(2, 7, 32)))
    keep = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], device=DEVICE)
    replaced, ref, out = _with_and_without(tiny_unet(), "triton", x, t, text, encoder_attention_mask=keep)
    assert replaced == 8
    assert_close_to(out, ref)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vae(backend, triton_calls):
    image = torch.randn(1, 3, 16, 16, device=DEVICE)
    replaced, ref, out = _with_and_without(tiny_vae(), backend, image, sample_posterior=False)
    assert replaced == 2  # encoder and decoder mid-block attention
    assert (len(triton_calls) > 0) == (backend == "triton")
    assert_close_to(out, ref)


def test_hunyuan_dit_qk_norm_and_rope(triton_calls):
    model = HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, patch_size=2, sample_size=8, hidden_size=32,
        num_layers=2, cross_attention_dim=32, cross_attention_dim_t5=32, pooled_projection_dim=16, text_len=5,
        text_len_t5=6, use_style_cond_and_image_meta_size=False,
    ).to(DEVICE).eval()
    # (cos, sin), each (16 tokens, head dim 16)
    rope = get_2d_rotary_pos_embed(16, ((0, 0), (4, 4)), (4, 4), output_type="pt", device=DEVICE)
    inputs = dict(
        hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([100.0, 700.0]),
        encoder_hidden_states=torch.randn(2, 5, 32), text_embedding_mask=torch.ones(2, 5),
        encoder_hidden_states_t5=torch.randn(2, 6, 32), text_embedding_mask_t5=torch.ones(2, 6),
    )
    inputs = {name: value.to(DEVICE) for name, value in inputs.items()}
    inputs.update(image_rotary_emb=rope, return_dict=False)
    replaced, ref, out = _with_and_without(model, "triton", **inputs)
    assert replaced == 4  # self- and cross-attention per block
    assert all(isinstance(block.attn1.processor, RfserveAttnProcessor) for block in model.blocks)
    assert len(triton_calls) == 4
    assert_close_to(out, ref)


def test_install_refuses_a_model_without_supported_processors():
    with pytest.raises(ValueError, match="no attention module"):
        kernels.install_attention(torch.nn.Linear(2, 2))
