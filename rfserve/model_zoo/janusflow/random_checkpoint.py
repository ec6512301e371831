"""Random-weight JanusFlow checkpoints in the official layout, for tests and benchmarks.

`save_random_checkpoint` writes what the hub repository holds (config.json, model.safetensors,
tokenizer.json + tokenizer_config.json + special_tokens_map.json, preprocessor_config.json,
processor_config.json) plus a `vae/` AutoencoderKL folder, so the real loader reads it.
The tokenizer is a small byte-level BPE, like DeepSeek's, carrying the JanusFlow special tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rfserve.model_zoo.janusflow.config import JanusFlowConfig, preset
from rfserve.model_zoo.janusflow.model import MultiModalityCausalLM
from rfserve.model_zoo.janusflow.processor import BOS, EOS, PAD, SPECIAL_TOKENS

_CORPUS = [
    "a photo of a cat sitting on a red chair", "describe the image in detail", "what color is the sky",
    "the quick brown fox jumps over the lazy dog", "a blue square next to a green circle",
    "User: hello there\n\nAssistant: hi, how can I help you today?", "write a short poem about the sea",
    "numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ! ? : ; ( ) [ ] { }",
]

VAE_PRESETS = {
    # SDXL VAE architecture (stabilityai/sdxl-vae config.json)
    "janusflow-1.3b": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                           sample_size=1024),
    "tiny": dict(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, sample_size=16),
}


def build_tokenizer(vocab_size: int = 400, special_tokens: tuple[str, ...] = SPECIAL_TOKENS) -> Tokenizer:
    """`special_tokens`: fewer than JanusFlow's seven makes a tokenizer like the published one, which the
    processor completes."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    return tok


def random_vae(name: str, seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    n = len(VAE_PRESETS[name]["block_out_channels"])
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, scaling_factor=0.13025,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         **VAE_PRESETS[name])


def random_model(cfg: JanusFlowConfig, seed: int, device="cpu") -> MultiModalityCausalLM:
    """Random weights; parameters the official init leaves at zero get small noise so tests see them."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = MultiModalityCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    return model.eval().requires_grad_(False)


def save_random_checkpoint(folder: Path, name: str = "tiny", seed: int = 0) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.save(str(folder / "tokenizer.json"))
    cfg_dict = preset(name, vocab_size=tok.get_vocab_size() if name == "tiny" else None)
    (folder / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    cfg = JanusFlowConfig.from_dict(cfg_dict)
    model = random_model(cfg, seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state.update(_attn_pool_state(cfg, seed))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizerFast", "add_bos_token": True, "add_eos_token": False,
        "bos_token": BOS, "eos_token": EOS, "pad_token": None, "model_max_length": 16384}, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
         "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD)]}, indent=2))
    side = cfg.understanding.image_size
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "VLMImageProcessor", "image_size": side, "min_size": 14,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255,
        "do_normalize": True}, indent=2))
    (folder / "processor_config.json").write_text(json.dumps({
        "processor_class": "VLChatProcessor", "image_tag": "<image_placeholder>", "sft_format": "deepseek",
        "num_image_tokens": cfg.understanding.num_tokens, "add_special_token": False}, indent=2))
    random_vae(name, seed).save_pretrained(folder / "vae", safe_serialization=True)
    return folder


def _attn_pool_state(cfg: JanusFlowConfig, seed: int) -> dict[str, torch.Tensor]:
    """The official tower's unused attention-pooling head (timm AttentionPoolLatent), so the file
    has every key the official checkpoint has."""
    g = torch.Generator().manual_seed(seed)
    w = cfg.understanding.arch.width
    hidden = int(w * cfg.understanding.arch.mlp_ratio)
    shapes = {"latent": (1, 1, w), "q.weight": (w, w), "q.bias": (w,), "kv.weight": (2 * w, w),
              "kv.bias": (2 * w,), "proj.weight": (w, w), "proj.bias": (w,), "norm.weight": (w,),
              "norm.bias": (w,), "mlp.fc1.weight": (hidden, w), "mlp.fc1.bias": (hidden,),
              "mlp.fc2.weight": (w, hidden), "mlp.fc2.bias": (w,)}
    return {f"vision_und_enc_model.vision_tower.attn_pool.{k}": torch.randn(s, generator=g) * 0.02
            for k, s in shapes.items()}
