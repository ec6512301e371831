"""What the adapter slots cost (`pool.slot_bytes`), counted from a model's shapes on the meta device, equals what an
AdapterPool really allocates, on the tiny SD UNet and text encoder and through a served pipeline's `enable_lora`;
and the binding holds the largest forward (`lora_rows`)."""
from dataclasses import replace

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from rfserve.model_zoo.lora.layers import MultiLoRA
from rfserve.model_zoo.lora.pool import AdapterPool, PoolConfig, lora_rows, slot_bytes
from rfserve.model_zoo.memory_plan import plan_model
from rfserve.model_zoo.registry import load_model, parse_spec


def allocated(model: torch.nn.Module, binding) -> int:
    """The bytes the wrapped layers' stacks and the shared binding hold, counted from the tensors themselves."""
    stacks = sum(t.nbytes for m in model.modules() if isinstance(m, MultiLoRA) for t in m.buffers(recurse=False))
    return stacks + binding.slots.nbytes + binding.scales.nbytes


def test_lora_rows_is_the_largest_forward():
    assert lora_rows(8, cfg=True) == 16 and lora_rows(8, cfg=False) == 8       # an unconditional copy per row
    assert lora_rows(6, cfg=True, buckets=(1, 2, 4, 8)) == 16                 # 6 images padded to the 8 bucket
    assert lora_rows(8, cfg=False, buckets=(1, 2, 4)) == 8


def tiny(folder, component: str, dtype: torch.dtype) -> torch.nn.Module:
    """The tiny checkpoint's component built from its config on the current device, random weights, at `dtype`."""
    if component == "unet":
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")).to(dtype)
    return CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_slot_bytes_on_meta_equal_a_pools_allocation(tiny_sd, dtype, component):
    """The tiny SD UNet (1×1-conv proj_in/proj_out, self- and cross-attention, feed-forward) and CLIP encoder, each
    wrapped at its component's own targets."""
    config = PoolConfig(slots=3, max_rank=4, max_rows=lora_rows(3, cfg=True), per_row=2)
    with torch.device("meta"):
        planned = slot_bytes(tiny(tiny_sd, component, dtype), component, config)
    model = tiny(tiny_sd, component, dtype)
    pool = AdapterPool(model, component, config)
    assert pool.layers and all(layer.lora_a.dtype == dtype for layer in pool.layers.values())
    assert planned == allocated(model, pool.binding)


def test_the_plan_counts_what_a_served_pipeline_allocates():
    """rf-shapes-2rf (SD layout, CFG at its defaults) at max batch 4: the plan's lora_bytes from its config files on
    meta equals what `enable_lora` allocates on the loaded model's UNet and text encoder, bindings included."""
    spec, batch, config = parse_spec("rf-shapes-2rf"), 4, PoolConfig(slots=2, max_rank=8, per_row=3)
    plan = plan_model(spec, device="meta", dtype=torch.float32, max_batch=batch, lora=config)
    pipe = load_model(spec, torch.device("cpu"), torch.float32).pipeline
    pipe.enable_lora(replace(config, max_rows=lora_rows(batch, cfg=True)))
    unet, text = pipe.adapters.denoiser, pipe.adapters.text
    assert unet.binding.slots.shape == text.binding.slots.shape == (8, 3)
    assert plan.lora_bytes == allocated(pipe.parts.unet, unet.binding) + allocated(pipe.parts.text_encoder,
                                                                                   text.binding)
