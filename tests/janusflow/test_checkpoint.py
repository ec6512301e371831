"""The official checkpoint layout: names, shapes, config keys, the loader's one-line errors,
and the processor's prompt and pixel formats."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from rfserve.model_zoo.janusflow.config import JanusFlowConfig, preset
from rfserve.model_zoo.janusflow.loading import UNUSED_OFFICIAL_KEYS, build_model, load_parts
from rfserve.model_zoo.janusflow.processor import SYSTEM_PROMPT, USER, ImageProcessorConfig, preprocess_image, sft_prompt
from rfserve.model_zoo.loading import CheckpointError

# Parameter names of the official MultiModalityCausalLM (janus/janusflow/models: modeling_vlm.py,
# clip_encoder.py, siglip_vit.py with timm blocks, uvit.py; transformers LlamaForCausalLM).
# "{i}" stands for a block index.
SIGLIP_BLOCK = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                "mlp.fc2.weight", "mlp.fc2.bias"]
CONVNEXT = ["depthwise.weight", "depthwise.bias", "norm.weight", "channelwise_linear_1.weight",
            "channelwise_linear_1.bias", "channelwise_norm.weight", "channelwise_norm.bias",
            "channelwise_linear_2.weight", "channelwise_linear_2.bias", "cond_embeds_mapper.weight",
            "cond_embeds_mapper.bias"]
LLAMA_LAYER = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
               "input_layernorm.weight", "post_attention_layernorm.weight"]
ATTN_POOL = ["latent", "q.weight", "q.bias", "kv.weight", "kv.bias", "proj.weight", "proj.bias", "norm.weight",
             "norm.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
OFFICIAL = {
    "": ["beg_of_und_embed", "vision_und_enc_aligner.weight", "vision_und_enc_aligner.bias",
         "vision_gen_enc_aligner.weight", "vision_gen_enc_aligner.bias", "vision_gen_dec_aligner_norm.weight",
         "vision_gen_dec_aligner.weight", "vision_gen_dec_aligner.bias", "language_model.model.embed_tokens.weight",
         "language_model.model.norm.weight", "language_model.lm_head.weight"],
    "vision_und_enc_model.vision_tower.": ["pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                                           "norm.weight", "norm.bias"],
    "vision_und_enc_model.vision_tower.blocks.{i}.": SIGLIP_BLOCK,
    "vision_und_enc_model.vision_tower.attn_pool.": ATTN_POOL,
    "vision_gen_enc_model.": ["time_embed.linear_1.weight", "time_embed.linear_1.bias", "time_embed.linear_2.weight",
                              "time_embed.linear_2.bias", "in_conv.weight", "in_conv.bias"],
    "vision_gen_enc_model.mid_block.res_blocks.{i}.": CONVNEXT,
    "vision_gen_dec_model.": ["input_norm.weight", "out_convs.0.norm.weight", "out_convs.0.unpatch_conv.weight",
                              "out_convs.0.unpatch_conv.bias"],
    "vision_gen_dec_model.mid_block.res_blocks.{i}.": CONVNEXT,
    "language_model.model.layers.{i}.": LLAMA_LAYER,
}


def official_names(cfg: JanusFlowConfig) -> set[str]:
    counts = {"vision_und_enc_model.vision_tower.blocks.{i}.": cfg.understanding.depth,
              "vision_gen_enc_model.mid_block.res_blocks.{i}.": cfg.gen_encoder.layers_in_middle,
              "vision_gen_dec_model.mid_block.res_blocks.{i}.": cfg.gen_decoder.layers_in_middle,
              "language_model.model.layers.{i}.": cfg.language.num_hidden_layers}
    return {prefix.format(i=i) + name for prefix, names in OFFICIAL.items()
            for i in range(counts.get(prefix, 1)) for name in names}


@pytest.mark.parametrize("name", ["tiny", "janusflow-1.3b"])
def test_module_tree_has_exactly_the_official_names(name):
    cfg = JanusFlowConfig.from_dict(preset(name))
    ours = set(build_model(cfg, "meta", torch.float32).state_dict())
    official = official_names(cfg)
    unused = {n for n in official if n.startswith(UNUSED_OFFICIAL_KEYS)}
    assert unused and official - unused == ours


def test_real_config_gives_the_published_shapes():
    cfg = JanusFlowConfig.from_dict(preset("janusflow-1.3b"))
    state = build_model(cfg, "meta", torch.bfloat16).state_dict()
    shapes = {"vision_und_enc_aligner.weight": (2048, 1024), "vision_gen_enc_aligner.weight": (2048, 768),
              "vision_gen_dec_aligner.weight": (768, 2048), "beg_of_und_embed": (1, 2048),
              "vision_und_enc_model.vision_tower.pos_embed": (1, 576, 1024),
              "vision_gen_enc_model.in_conv.weight": (768, 4, 2, 2),
              "vision_gen_dec_model.out_convs.0.unpatch_conv.weight": (16, 1536, 1, 1),
              "language_model.model.embed_tokens.weight": (102400, 2048)}
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert cfg.understanding.depth == 24 and cfg.understanding.num_tokens == 576


def test_checkpoint_files_are_the_official_layout(tiny_janus):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "preprocessor_config.json", "processor_config.json",
                 "vae/config.json", "vae/diffusion_pytorch_model.safetensors"):
        assert (tiny_janus / name).is_file(), name
    cfg = json.loads((tiny_janus / "config.json").read_text())
    assert cfg["model_type"] == "multi_modality"
    assert [cfg[k]["cls"] for k in ("vision_und_enc_config", "vision_gen_enc_config", "vision_gen_dec_config")] == \
        ["CLIPVisionTower", "ShallowUViTEncoder", "ShallowUViTDecoder"]
    keys = set(load_file(str(tiny_janus / "model.safetensors")))
    assert keys == official_names(JanusFlowConfig.from_dict(cfg))


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_loader_errors_name_the_file(tiny_janus, tmp_path):
    broken = copy_ckpt(tiny_janus, tmp_path / "a")
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_parts(broken)
    bad_json = copy_ckpt(tiny_janus, tmp_path / "b")
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="malformed file: .*config.json"):
        load_parts(bad_json)
    renamed = copy_ckpt(tiny_janus, tmp_path / "c")
    state = load_file(str(renamed / "model.safetensors"))
    state["vision_gen_dec_aligner.w"] = state.pop("vision_gen_dec_aligner.weight")
    save_file(state, str(renamed / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing key.*vision_gen_dec_aligner.weight"):
        load_parts(renamed)


def test_vae_comes_from_base_when_the_folder_has_none(tiny_janus, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    no_vae = copy_ckpt(tiny_janus, tmp_path / "novae")
    shutil.move(no_vae / "vae", tmp_path / "my-vae")
    with pytest.raises(CheckpointError, match="stabilityai/sdxl-vae"):
        load_parts(no_vae)
    parts = load_parts(no_vae, base=str(tmp_path / "my-vae"))
    assert parts.vae.config.scaling_factor == pytest.approx(0.13025)


def test_prompt_templates():
    assert sft_prompt([(USER, " a cat ")], system="") == "User: a cat\n\nAssistant:"
    chat = sft_prompt([(USER, "<image_placeholder>\nwhat?"), ("Assistant", "a dog"), (USER, "sure?")], SYSTEM_PROMPT)
    assert chat == (SYSTEM_PROMPT + "\n\nUser: <image_placeholder>\nwhat?\n\nAssistant: a dog<｜end▁of▁sentence｜>"
                    "User: sure?\n\nAssistant:")


def test_t2i_prefix_drops_the_begin_of_image_token(janus_pipe):
    proc = janus_pipe.parts.processor
    full = proc.encode("User: a cat\n\nAssistant:<begin_of_image>")
    assert full[0] == proc.bos_id and full[-1] == proc.image_start_id
    assert proc.t2i_prefix("a cat") == full[:-1]


def test_image_preprocessing_resizes_pads_and_normalises():
    cfg = ImageProcessorConfig(image_size=16, min_size=2, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    white = Image.new("RGB", (32, 16), (255, 255, 255))
    x = preprocess_image(white, cfg)
    assert x.shape == (3, 16, 16) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 4:12], 1.0, atol=1e-6)               # the 16x8 image, centred
    np.testing.assert_allclose(x[:, :4], (127 / 255 - 0.5) / 0.5, atol=1e-6)   # mean-colour padding
