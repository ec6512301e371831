"""Hunyuan-DiT's transformer, for which diffusers has no LoRA loader: a peft adapter saved under "transformer."
in the diffusers/peft layout (with its metadata, as diffusers writes it) reads through files.py, and each row of
a mixed batch equals the transformer with that adapter injected by peft (CPU, fp32, within 1e-5), or the base
transformer for a row without one."""
import copy

import torch
from diffusers import HunyuanDiT2DModel
from diffusers.loaders import SanaLoraLoaderMixin
from diffusers.models.embeddings import get_2d_rotary_pos_embed
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

from rfserve.model_zoo.hunyuan_dit.arch import HunyuanArchConfig
from rfserve.model_zoo.lora.files import load_lora
from rfserve.model_zoo.lora.pool import AdapterPool, PoolConfig


def forward(model, x, t, g):
    rows = x.shape[0]
    rope = get_2d_rotary_pos_embed(16, ((0, 0), (8, 8)), (8, 8), output_type="pt")
    with torch.no_grad():
        return model(x, t, encoder_hidden_states=g[0][:rows], text_embedding_mask=torch.ones(rows, 77),
                     encoder_hidden_states_t5=g[1][:rows], text_embedding_mask_t5=torch.ones(rows, 256),
                     image_rotary_emb=rope, return_dict=False)[0]


def test_transformer_rows_equal_peft(tmp_path):
    torch.manual_seed(0)
    base = HunyuanDiT2DModel(**HunyuanArchConfig.preset("tiny").transformer).eval().requires_grad_(False)
    refs = {}
    for name, config in {"x": LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_v", "ff.net.2"],
                                         init_lora_weights=False),
                         "y": LoraConfig(r=2, lora_alpha=4, target_modules=["to_k", "to_out.0", "ff.net.0.proj"],
                                         init_lora_weights=False)}.items():
        refs[name] = inject_adapter_in_model(config, copy.deepcopy(base), adapter_name=name)
        # The writer of diffusers' transformer families (Sana's; Hunyuan-DiT has none), with the adapter's metadata.
        SanaLoraLoaderMixin.save_lora_weights(tmp_path / name, get_peft_model_state_dict(refs[name], adapter_name=name),
                                              transformer_lora_adapter_metadata=config.to_dict())
    model = copy.deepcopy(base)
    pool = AdapterPool(model, "transformer", PoolConfig(slots=2, max_rank=4, max_rows=4, per_row=1))
    for name in refs:
        pool.register(name, load_lora(tmp_path / name))
    choices = [[("y", 1.0)], [], [("x", 1.0)]]
    pool.bind(*pool.rows(choices))
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 4, 16, 16, generator=gen), torch.tensor([900.0, 500.0, 20.0])
    g = torch.randn(3, 77, 32, generator=gen), torch.randn(3, 256, 32, generator=gen)
    mixed = forward(model, x, t, g)
    for i, choice in enumerate(choices):
        ref = refs[choice[0][0]] if choice else base
        row = (x[i:i + 1], t[i:i + 1], (g[0][i:i + 1], g[1][i:i + 1]))
        want = forward(ref, *row)
        assert not choice or (want - forward(base, *row)).abs().max() > 1e-3
        torch.testing.assert_close(mixed[i:i + 1], want, atol=1e-5, rtol=0, msg=f"row {i} {choice}")
