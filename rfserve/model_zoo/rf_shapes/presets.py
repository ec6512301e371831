"""Recommended serving defaults for the shipped rf-shapes checkpoints (imported by the server's preset table)."""
from pathlib import Path

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"

RF_SHAPES_DEFAULTS = {
    # One-step distilled model: one Euler step from t=1000, no CFG (guidance is baked in by distillation).
    "rf-shapes": {"path": CHECKPOINT_DIR / "rf-shapes", "steps": 1, "guidance": 0.0,
                  "negative_prompt": "", "size": "64x64"},
    # 2-RF teacher: few-step Euler with CFG against the empty caption it was trained with.
    "rf-shapes-2rf": {"path": CHECKPOINT_DIR / "rf-shapes-2rf", "steps": 8, "guidance": 2.0,
                      "negative_prompt": "", "size": "64x64"},
}
