"""Recommended serving defaults for the shipped rf-shapes checkpoints (imported by the server's preset table)."""
from pathlib import Path

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"

RF_SHAPES_DEFAULTS = {
    # One-step distilled model: one Euler step from t=1000, no CFG (guidance is baked in by distillation).
    "rf-shapes": {"path": CHECKPOINT_DIR / "rf-shapes", "steps": 1, "guidance": 0.0,
                  "negative_prompt": "", "size": "64x64"},
    # 2-RF teacher: few-step Euler with CFG against the empty caption it was trained with, steered by the count
    # guide its folder ships (γ = 10, guide.py). On the 384 held-out eval prompts 16 steps at CFG 2.5 read shape
    # 0.93, count 0.91, where 8 steps at CFG 2 without the guide read 0.84 and 0.68 (benchmarks/RESULTS.md).
    "rf-shapes-2rf": {"path": CHECKPOINT_DIR / "rf-shapes-2rf", "steps": 16, "guidance": 2.5,
                      "negative_prompt": "", "size": "64x64"},
}
