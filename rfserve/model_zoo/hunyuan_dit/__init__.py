"""Hunyuan-DiT (Tencent): a 1.5B DiT with BERT and mT5 text encoders, served from the official
HunyuanDiT-*-Diffusers folders. Sampler: the checkpoint's DDPM by default; `?scheduler=ddim|dpm`."""
from rfserve.model_zoo.hunyuan_dit.loader import hunyuan_card, load_hunyuan
from rfserve.model_zoo.hunyuan_dit.pipeline import HunyuanPipeline

__all__ = ["HunyuanPipeline", "hunyuan_card", "load_hunyuan"]
