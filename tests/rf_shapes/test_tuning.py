"""The one-step model's tuning (issue #35): a reward's pull on fresh noise, distribution matching's direction, and
the GAN term's."""
import copy
from types import SimpleNamespace

import pytest
import torch

from rfserve.model_zoo.rf_shapes import counter, stages, tuning
from rfserve.model_zoo.rf_shapes.config import StageConfig, preset
from rfserve.model_zoo.rf_shapes.models import build_text_encoder, build_unet
from rfserve.model_zoo.rf_shapes.tokenizer import build_tokenizer
from rfserve.model_zoo.rf_shapes.train import tokenize


class _MeanReader(torch.nn.Module):
    """Stands in for the classifier: it reads the count as the latent's mean times 10, so the reward's pull is plain
    to see (and works at any t, as the real one does on blobs)."""

    def forward(self, x, t):
        return -(10 * x.mean((1, 2, 3))[:, None] - torch.arange(counter.MAX_COUNT + 1)) ** 2  # (B, classes)


def test_count_tuning_raises_the_asked_count_on_fresh_noise_and_only_with_a_weight():
    """A tiny one-step model tuned with the reward draws, on noise it never saw, latents the reader takes for the
    asked count more often than the same tuning with weight 0, which is plain distillation."""
    torch.manual_seed(0)
    cfg, tokenizer = preset("tiny").model, build_tokenizer()
    unet, te = build_unet(cfg), build_text_encoder(cfg, tokenizer).eval().requires_grad_(False)
    captions = ["a red circle on a blue background", "two green squares on a white background",
                "three blue triangles on a red background"]
    ids, counts = tokenize(tokenizer, captions * 8), torch.tensor([1, 2, 3] * 8)
    noise = torch.randn(24, cfg.latent_channels, 8, 8, generator=torch.Generator().manual_seed(2))
    ends = torch.randn_like(noise)
    stage = StageConfig(steps=20, batch=16, lr=2e-3, warmup=2, ema=0.0)

    def tuned(weight):
        reward = tuning.Reward(_MeanReader(), weight, (0.3, 0.6))
        model = tuning.tune_one_step(copy.deepcopy(unet), te, noise, ends, ids, ids, counts, reward, None, stage,
                                     torch.Generator().manual_seed(3), [])
        fresh = torch.randn(24, cfg.latent_channels, 8, 8, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            x, t = stages.one_step(model, fresh, te(ids)[0]), torch.full((24,), 0.45)
            read = _MeanReader()(counter.noised(x, t, torch.Generator().manual_seed(5)), t).argmax(1)
        return (read == counts).float().mean().item()

    assert tuned(weight=1.0) > tuned(weight=0.0) + 0.3


class _Towards(torch.nn.Module):
    """Stands in for a flow whose every denoised estimate is `target`: v = (target − x_t)/(1 − t), with 1 − t the
    UNet timestep / 1000. `learned` makes it a fake flow with a parameter for the fake's loss to reach."""

    def __init__(self, target: float):
        super().__init__()
        self.learned = torch.nn.Parameter(torch.tensor(target))

    def forward(self, x, timestep, encoder_hidden_states):
        return SimpleNamespace(sample=(self.learned - x) / (timestep / 1000).view(-1, 1, 1, 1))


def test_matching_moves_the_sample_towards_the_teachers_estimate_and_trains_only_the_fake_on_its_loss():
    """DMD's step is fake − real: with the teacher's estimates at +1 and the fake's at −1, the student's loss pushes
    every element of its output up, and the fake's loss reaches the fake but never the student's output."""
    fake = _Towards(-1.0)
    matching = tuning.Matching(_Towards(1.0).requires_grad_(False), fake, torch.zeros(1, 5, 4), 2.0, 1.0)
    x = torch.zeros(6, 3, 4, 4, requires_grad=True)
    student_loss, fake_loss = tuning._matching_losses(matching, x, torch.zeros(6, 5, 4),
                                                      torch.ones(6, dtype=torch.long), torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(student_loss, x)
    assert (grad < 0).all()
    assert torch.autograd.grad(fake_loss, x, allow_unused=True)[0] is None
    assert torch.autograd.grad(fake_loss, fake.learned)[0] != 0


def test_matching_against_a_fake_that_already_draws_the_teachers_samples_moves_nothing():
    """Where the fake's estimates are the teacher's (CFG at scale 1 is the conditional velocity), the step is 0."""
    matching = tuning.Matching(_Towards(0.5), _Towards(0.5), torch.zeros(1, 5, 4), 1.0, 1.0)
    x = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    student_loss, _ = tuning._matching_losses(matching, x, torch.zeros(6, 5, 4), torch.ones(6, dtype=torch.long),
                                              torch.Generator().manual_seed(0))
    assert student_loss.item() < 1e-10


def test_the_count_guide_in_the_teachers_estimate_moves_the_sample_towards_the_asked_count():
    """With teacher and fake agreeing, only the guide moves the student: outputs at 0, which the reader takes for no
    shape, are pushed up (towards its "three", a mean of 0.3) when three are asked for."""
    guide = counter.CountGuide(_MeanReader(), 1.0)
    matching = tuning.Matching(_Towards(0.0), _Towards(0.0), torch.zeros(1, 5, 4), 1.0, 1.0, guide)
    x = torch.zeros(6, 3, 4, 4, requires_grad=True)
    student_loss, _ = tuning._matching_losses(matching, x, torch.zeros(6, 5, 4), torch.full((6,), 3),
                                              torch.Generator().manual_seed(0))
    assert (torch.autograd.grad(student_loss, x)[0] < 0).all()


def _tiny_adversarial(weight: float, ids: torch.Tensor):
    """A tiny UNet as both flows (DMD weight 0), a fresh head on its mid-block, and 8 'real' latents, all +1, with the
    captions ids[:8]."""
    cfg = preset("tiny").model
    unet = build_unet(cfg)
    uncond = torch.zeros(1, ids.shape[1], cfg.text_width)
    matching = tuning.Matching(copy.deepcopy(unet).requires_grad_(False), unet, uncond, 1.0, 0.0)
    head = tuning.discriminator_head(cfg.unet_channels[-1], 2)  # 8x8 latents, two downsamplings
    real = torch.ones(8, cfg.latent_channels, 8, 8)
    return matching, tuning.Adversarial(head, real, ids[:8], weight, 1.0)


def test_the_gan_term_moves_the_student_only_by_its_loss_and_the_head_and_fake_only_by_theirs():
    """DMD2's two losses share one backward pass: the student's reads the head and fake frozen, and the head's reads
    the student's output detached, so neither model is trained to help the other."""
    torch.manual_seed(0)
    matching, adversarial = _tiny_adversarial(1.0, torch.zeros(8, 5, dtype=torch.long))
    x = torch.randn(4, 8, 8, 8, requires_grad=True)
    emb = torch.randn(4, 5, preset("tiny").model.text_width)
    student_loss, head_loss = tuning._adversarial_losses(adversarial, matching, x, emb, adversarial.latents[:4], emb,
                                                         torch.Generator().manual_seed(0))
    learned = list(adversarial.head.parameters()) + list(matching.fake.parameters())
    assert torch.autograd.grad(student_loss, x)[0].abs().sum() > 0
    assert all(g is None for g in torch.autograd.grad(student_loss, learned, allow_unused=True, retain_graph=True))
    assert torch.autograd.grad(head_loss, x, allow_unused=True, retain_graph=True)[0] is None
    head_grads = torch.autograd.grad(head_loss, learned, allow_unused=True)
    assert all(g is not None for g in head_grads[:len(list(adversarial.head.parameters()))])
    assert all(p.requires_grad for p in learned)  # unfrozen again for the fake's own losses


class _Bottleneck(torch.nn.Module):
    """Stands in for the fake flow: its mid-block is the identity on the noised input, so the head reads x_t."""

    def __init__(self):
        super().__init__()
        self.mid_block = torch.nn.Identity()

    def forward(self, x, timestep, encoder_hidden_states):
        return SimpleNamespace(sample=self.mid_block(x))


class _MeanHead(torch.nn.Module):
    """Stands in for the head: the logit is the features' mean times `gain`, so it says real where latents are high."""

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(0.1))

    def forward(self, features):
        return self.gain * features.mean((1, 2, 3))[:, None]


def test_the_gan_term_moves_the_sample_where_the_head_says_real_and_teaches_the_head_to_tell_them_apart():
    """Real latents at +1, outputs at −1: the student's loss pushes every element of its output up, and the head's
    loss raises the head's gain, which is what separates the two."""
    matching = tuning.Matching(_Towards(0.0), _Bottleneck(), torch.zeros(1, 5, 4), 1.0, 0.0)
    adversarial = tuning.Adversarial(_MeanHead(), torch.ones(6, 3, 4, 4), torch.zeros(6, 5, dtype=torch.long),
                                     1.0, 1.0)
    x = torch.full((6, 3, 4, 4), -1.0, requires_grad=True)
    emb = torch.zeros(6, 5, 4)
    student_loss, head_loss = tuning._adversarial_losses(adversarial, matching, x, emb, adversarial.latents, emb,
                                                         torch.Generator().manual_seed(0))
    assert (torch.autograd.grad(student_loss, x)[0] < 0).all()
    assert torch.autograd.grad(head_loss, adversarial.head.gain)[0] < 0


@pytest.mark.parametrize("setting", ["tune_gan_weight", "tune_match_count_guidance"])
def test_a_setting_that_needs_distribution_matching_is_refused_without_it_when_the_recipe_is_configured(setting):
    with pytest.raises(ValueError, match=f"{setting} needs tune_match_weight"):
        preset("tiny", **{"tune_match_weight": 0.0, "tune_gan_weight": 0.0, setting: 1.0})
