"""Triton kernels with plain-torch twins, chosen per shape by `kernels.dispatch`.

Importing this package needs only torch: Triton is imported when a Triton path first runs, and the
diffusers/transformers integrations when they are installed.
"""
from rfserve.kernels.attention import attention
from rfserve.kernels.decode import decode_attention
from rfserve.kernels.dispatch import clear_decisions, decisions
from rfserve.kernels.velocity import cfg_euler_step, janus_cfg_euler_step, perflow_step


def install_attention(model, backend: str = "auto", required: bool = True) -> int:
    """Route a diffusers model's attention through `kernels.attention`; returns how many modules changed.
    `required=False` for a model that may have none (a VAE without a mid-block attention)."""
    from rfserve.kernels.processors import install_attention as install

    return install(model, backend=backend, required=required)


def register_transformers_attention() -> str:
    """Make `attn_implementation="rfserve"` available to transformers models; returns that name."""
    from rfserve.kernels.hf_attention import register

    return register()


__all__ = [
    "attention",
    "cfg_euler_step",
    "clear_decisions",
    "decisions",
    "decode_attention",
    "install_attention",
    "janus_cfg_euler_step",
    "perflow_step",
    "register_transformers_attention",
]
