"""Janus / Janus-Pro (deepseek-community/Janus-Pro-1B, -7B) through transformers: text to image as 576 VQ
tokens generated autoregressively with CFG, for a batch at once. Loaded from the HF checkpoint layout."""
from rfserve.model_zoo.janus.pipeline import JanusPipeline
from rfserve.model_zoo.janus.registry_entry import janus_card, load_janus

__all__ = ["JanusPipeline", "janus_card", "load_janus"]
