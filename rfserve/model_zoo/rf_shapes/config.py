"""Model and training-schedule presets for rf-shapes.

`full` produces the shipped 2-RF checkpoint and its count guide within the CPU budget (about 90 min on a quiet 2-core
CPU, two threads); `counting` is `full` with guided pairs, a longer distillation and tuning (issue #35), and run
from the shipped 2-RF (`train --from-2rf`) it produced the shipped one-step model; `tiny` exercises every stage,
count guidance and tuning included, in a couple of minutes for smoke runs and tests.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


@dataclass(frozen=True)
class ModelConfig:
    unet_channels: tuple[int, ...] = (32, 64, 96)
    # 3 levels: 64x64 pixels -> 16x16 latents of 8 channels. With 4 channels the decoder blurred small shapes
    # past recognition (the checker read 59% of shapes right on reconstructions). 32x32x4 latents reconstruct
    # well, but a CPU-sized UNet then has to draw every outline itself and its teachers drew blobs.
    vae_channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 8
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    attention_head_dim: int = 8
    # GroupNorm removes each group's spatial mean; flat-colour images carry their colour in
    # the differences between channel means, so groups must span several channels.
    norm_groups: int = 8
    vae_norm_groups: int = 1


@dataclass(frozen=True)
class StageConfig:
    steps: int
    batch: int
    lr: float
    warmup: int = 100
    ema: float = 0.999


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    seed: int = 0
    dataset_size: int = 16_000  # images rendered and VAE-encoded once, reused by the 1-RF stage
    vae: StageConfig = StageConfig(steps=1200, batch=32, lr=1.5e-3, warmup=20, ema=0.0)
    kl_weight: float = 1e-6
    vae_edge_weight: float = 10.0  # extra reconstruction weight on shape outlines
    teacher: StageConfig = StageConfig(steps=4800, batch=64, lr=1e-3)
    caption_dropout: float = 0.1  # empty caption, so CFG against "" works
    # Count guidance (issue #35, `counter.py`): a classifier that counts shapes in x_t steers both pair ODEs towards
    # the caption's count with this scale (γ); 0, as in the shipped recipe, makes the pairs unguided.
    count_guidance: float = 0.0
    # The scale the 2-RF folder's count guide is saved with (`guide.py`), which the server samples with: γ = 10 took
    # the shipped 2-RF's count from 0.71 to 0.88 at 12 steps. With both scales 0 the classifier's stage is skipped.
    served_count_guidance: float = 10.0
    counter_samples: int = 12_000  # renders of 0 to 5 shapes the classifier trains on
    counter: StageConfig = StageConfig(steps=2500, batch=128, lr=2e-3, ema=0.0)
    reflow_pairs: int = 3072
    reflow_ode_steps: int = 10  # Euler steps of the 1-RF teacher ODE that makes the pairs
    reflow_guidance: float = 2.0  # CFG used to make the pairs (and baked into 2-RF and the one-step model)
    rf2: StageConfig = StageConfig(steps=700, batch=64, lr=2e-4)
    anneal_fraction: float = 0.3  # SlimFlow annealing reflow: independent pairs fade out over this fraction
    distill_pairs: int = 3072
    # Target quality mattered more than pair count: in pilots, 8 ODE steps instead of 4 took one-step shape
    # 0.66 -> 0.73 and FD 8.8 -> 5.8 (1,500 steps each), while 4x the pairs at 4 steps barely moved either.
    distill_ode_steps: int = 8  # 2-RF ODE steps that make the distillation targets
    distill: StageConfig = StageConfig(steps=1000, batch=64, lr=3e-4)
    # Tuning (issue #35, `tuning.py`): after distillation, the one-step model goes on with half of each batch on
    # fresh noise and captions from a pool of tune_captions training-split ones, rewarded by the counting classifier
    # reading its output noised to a progress in tune_count_t (tune_count_weight), and matched to the 2-RF's
    # distribution (tune_match_weight, DMD) as sampled with CFG tune_match_guidance and the count guide at
    # tune_match_count_guidance, its fake flow learning tune_fake_lr_scale times as fast as the student. With both
    # weights 0 the stage is skipped. With DMD, tune_gan_weight adds DMD2's GAN term against the latents of
    # tune_real_scenes renders, the head weighted by tune_gan_head_weight.
    tune_count_weight: float = 0.0
    tune_count_t: tuple[float, float] = (0.2, 0.5)
    tune_match_weight: float = 0.0
    tune_match_guidance: float = 2.0
    tune_match_count_guidance: float = 0.0
    tune_fake_lr_scale: float = 1.0
    tune_captions: int = 20_000
    tune_gan_weight: float = 0.0
    tune_gan_head_weight: float = 0.1
    tune_real_scenes: int = 12_288
    tune: StageConfig = StageConfig(steps=600, batch=64, lr=1e-4, warmup=50)
    eval_samples: int = 384

    def __post_init__(self):
        if self.tune_gan_weight and not self.tune_match_weight:  # found now, not after an hour of earlier stages
            raise ValueError("tune_gan_weight needs tune_match_weight: the GAN head reads DMD's fake flow")
        if self.tune_match_count_guidance and not self.tune_match_weight:
            raise ValueError("tune_match_count_guidance needs tune_match_weight: it steers DMD's teacher")


# The settings each stage adds, in recipe order: a stage's result depends on its own and every earlier stage's.
STAGE_SETTINGS: dict[str, tuple[str, ...]] = {
    "vae": ("model", "seed", "dataset_size", "vae", "kl_weight", "vae_edge_weight"),
    "teacher": ("teacher", "caption_dropout"),
    "counter": ("count_guidance", "counter_samples", "counter"),
    "reflow_pairs": ("reflow_pairs", "reflow_ode_steps", "reflow_guidance"),
    "rf2": ("rf2", "anneal_fraction"),
    "distill_pairs": ("distill_pairs", "distill_ode_steps"),
    "one_step": ("distill",),
    "tune": ("tune_count_weight", "tune_count_t", "tune_match_weight", "tune_match_guidance",
             "tune_match_count_guidance", "tune_fake_lr_scale", "tune_captions", "tune_gan_weight",
             "tune_gan_head_weight", "tune_real_scenes", "tune"),
}


def stage_settings(cfg: TrainConfig, stage: str) -> dict:
    """Every setting that `stage`'s result depends on, so a cached stage is reused only while they are unchanged."""
    names, everything = list(STAGE_SETTINGS), asdict(cfg)
    return {k: everything[k] for s in names[:names.index(stage) + 1] for k in STAGE_SETTINGS[s]}


PRESETS: dict[str, TrainConfig] = {
    "full": TrainConfig(),
    # Pilots on the shipped 2-RF (RESULTS, issue #35): guided 12-step targets count 0.87 and draw shapes at 0.88; a
    # student of 12,288 of them over 3,000 steps counts 0.73 (shape 0.78), where 3,072 over 1,000 counted 0.70.
    # Count tuning from that student (600 steps): reading its output at t in [0.2, 0.5] with weight 0.2 took count to
    # 0.83 with colour 0.99 and FD 8.5 (untuned: 0.73, 0.98, 7.2); reading it at [0.4, 1] with weight 0.1 took count
    # to 0.82 but colour to 0.92 and FD to 15.5. Adding distribution matching (DMD) at weight 2 took shape from 0.78 to
    # 0.86 and FD from 8.5 to 5.0, count 0.81; at weight 1, shape 0.80, count 0.84, FD 4.8. In the recipe itself,
    # DMD2's GAN term at weight 0.05 took FD from 4.10 to 2.95 (shape 0.84 -> 0.83, count 0.82 -> 0.83), where twice
    # the tuning steps without it gave 3.99 (0.83, 0.84). Steering DMD's teacher with the count guide (γ = 10) and
    # letting its fake flow learn 5x as fast as the student took shape to 0.87 and count to 0.84 at FD 2.99; the guide
    # alone gave 0.84 / 0.85 / 3.45, and the fake at 10x 0.84 / 0.83 / 2.91.
    "counting": TrainConfig(count_guidance=10.0, distill_pairs=12_288, distill_ode_steps=12,
                            distill=StageConfig(steps=3000, batch=64, lr=3e-4), tune_count_weight=0.2,
                            tune_match_weight=2.0, tune_match_count_guidance=10.0, tune_fake_lr_scale=5.0,
                            tune_gan_weight=0.05),
    "tiny": TrainConfig(
        model=ModelConfig(unet_channels=(16, 32, 32), vae_channels=(8, 16, 16), text_width=32,
                          text_layers=1, norm_groups=4),
        dataset_size=256,
        vae=StageConfig(steps=10, batch=16, lr=1e-3, warmup=2, ema=0.0),
        teacher=StageConfig(steps=10, batch=16, lr=5e-4, warmup=2),
        reflow_pairs=64, reflow_ode_steps=4,
        rf2=StageConfig(steps=10, batch=16, lr=2e-4, warmup=2),
        distill_pairs=64, distill_ode_steps=2,
        distill=StageConfig(steps=10, batch=16, lr=1e-4, warmup=2),
        count_guidance=10.0, counter_samples=256, counter=StageConfig(steps=10, batch=16, lr=1e-3, warmup=2, ema=0.0),
        tune_count_weight=0.1, tune_match_weight=1.0, tune_match_count_guidance=10.0, tune_fake_lr_scale=5.0,
        tune_captions=64, tune_gan_weight=0.05, tune_real_scenes=64,
        tune=StageConfig(steps=10, batch=16, lr=1e-4, warmup=2),
        eval_samples=32,
    ),
}


def preset(name: str, **overrides) -> TrainConfig:
    return replace(PRESETS[name], **overrides)
