"""`MultiModalityCausalLM`: the JanusFlow module tree under the official attribute names.

One Llama LLM with two visual paths: SigLIP + a linear aligner for understanding, and the
ShallowUViT encoder/decoder + aligners that carry rectified-flow latents through the LLM.
The official class hard-codes the aligner widths (1024/768 ↔ 2048); here they follow the
sub-configs, which gives the same shapes for JanusFlow-1.3B and lets the tiny preset shrink.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from rfserve.model_zoo.janusflow.config import JanusFlowConfig
from rfserve.model_zoo.janusflow.siglip import UnderstandingEncoder
from rfserve.model_zoo.janusflow.uvit import ShallowUViTDecoder, ShallowUViTEncoder


class MultiModalityCausalLM(nn.Module):
    def __init__(self, cfg: JanusFlowConfig):
        super().__init__()
        self.config = cfg
        hidden = cfg.hidden_size
        enc_ch = cfg.gen_encoder.block_out_channels[0]
        if cfg.gen_encoder.hidden_size != hidden or cfg.gen_decoder.hidden_size != hidden:
            raise ValueError("the generation heads' hidden_size must equal the LLM hidden_size")
        self.vision_und_enc_model = UnderstandingEncoder(cfg.understanding)
        self.vision_und_enc_aligner = nn.Linear(cfg.understanding.arch.width, hidden)
        self.beg_of_und_embed = nn.Parameter(torch.zeros(1, hidden))
        self.vision_gen_enc_model = ShallowUViTEncoder(cfg.gen_encoder)
        self.vision_gen_enc_aligner = nn.Linear(enc_ch, hidden)
        self.vision_gen_dec_model = ShallowUViTDecoder(cfg.gen_decoder)
        self.language_model = LlamaForCausalLM(cfg.language)
        self.vision_gen_dec_aligner_norm = LlamaRMSNorm(hidden, eps=cfg.language.rms_norm_eps)
        self.vision_gen_dec_aligner = nn.Linear(hidden, cfg.gen_decoder.in_channels)

    # -- understanding -----------------------------------------------------------
    def embed_prompt(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                     image_positions: torch.Tensor | None) -> torch.Tensor:
        """Text embeddings with each image's [begin-of-image embed, patch features] written over
        its `<begin_of_image>` + placeholder slots, as the official `prepare_inputs_embeds`.

        input_ids (L,); pixel_values (n, 3, S, S); image_positions (n·(1+N),) indices into L.
        """
        embeds = self.language_model.get_input_embeddings()(input_ids)           # (L, D)
        if pixel_values is None or pixel_values.shape[0] == 0:
            return embeds
        feats = self.vision_und_enc_aligner(self.vision_und_enc_model(pixel_values))   # (n, N, D)
        begin = self.beg_of_und_embed.view(1, 1, -1).expand(feats.shape[0], 1, -1)
        images = torch.cat([begin, feats], dim=1).reshape(-1, embeds.shape[-1])   # (n·(1+N), D)
        if image_positions is None or image_positions.numel() != images.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} image(s) need {images.shape[0]} image slots in the prompt")
        embeds = embeds.clone()
        embeds[image_positions] = images.to(embeds.dtype)
        return embeds

    # -- generation --------------------------------------------------------------
    def encode_latents(self, z: torch.Tensor, t: torch.Tensor):
        """z (R, 4, h, w), t (R,) → LLM tokens (R, G, D), t_emb (R, D), decoder skips."""
        h, t_emb, skips = self.vision_gen_enc_model(z, t)
        tokens = self.vision_gen_enc_aligner(h.flatten(2).transpose(1, 2))       # (R, G, D), row-major grid
        return tokens, t_emb, skips

    def decode_velocity(self, hidden: torch.Tensor, skips: list[torch.Tensor], t_emb: torch.Tensor) -> torch.Tensor:
        """LLM outputs at the G image tokens (R, G, D) → velocity (R, 4, h, w)."""
        grid = skips[-1].shape[-2:]
        h = self.vision_gen_dec_aligner(self.vision_gen_dec_aligner_norm(hidden))  # (R, G, C)
        h = h.transpose(1, 2).reshape(h.shape[0], h.shape[2], *grid)              # (R, C, gh, gw)
        return self.vision_gen_dec_model(h, skips, t_emb)
