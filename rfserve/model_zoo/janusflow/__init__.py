"""JanusFlow (deepseek-ai/JanusFlow-1.3B): one Llama LLM that chats about images and generates
them by rectified flow over SDXL-VAE latents. Loaded from the official checkpoint layout."""
from rfserve.model_zoo.janusflow.pipeline import JanusFlowPipeline
from rfserve.model_zoo.janusflow.registry_entry import janusflow_card, load_janusflow

__all__ = ["JanusFlowPipeline", "janusflow_card", "load_janusflow"]
