"""The count classifier's training set, its guide and the sampler's steer hook (issue #35)."""
import numpy as np
import torch
import torch.nn.functional as F

from rfserve.model_zoo.rf_shapes import counter, stages
from rfserve.model_zoo.rf_shapes.checker import read
from rfserve.model_zoo.rf_shapes.config import StageConfig, preset
from rfserve.model_zoo.rf_shapes.models import build_text_encoder, build_unet
from rfserve.model_zoo.rf_shapes.sampling import euler_sample
from rfserve.model_zoo.rf_shapes.tokenizer import build_tokenizer
from rfserve.model_zoo.rf_shapes.train import tokenize


def test_the_counting_set_holds_every_count_and_size_says_little_about_it():
    images, counts = counter.counting_set(seed=3, n=240)
    assert images.shape == (240, 64, 64, 3) and set(counts) == set(range(counter.MAX_COUNT + 1))
    assert all(read(image, 0.0).count == count for image, count in zip(images, counts))
    # Mean shape area per image: one shape and three shapes overlap in size, unlike in the grammar, where one
    # shape is always larger than any of three.
    area = {c: [(image != image[0, 0]).any(-1).mean() / c for image, n in zip(images, counts) if n == c]
            for c in (1, 3)}
    assert min(area[1]) < np.median(area[3]) < max(area[1])


class _Blind(torch.nn.Module):
    """A classifier that ignores t, so the guide's own factor of t can be read off."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, counter.MAX_COUNT + 1))

    def forward(self, x, t):
        return self.net(x)


def test_the_guide_raises_the_asked_counts_probability_and_scales_as_the_score_does():
    torch.manual_seed(0)
    x, counts = torch.randn(6, 2, 4, 4), torch.arange(6)
    guide = counter.CountGuide(_Blind(), scale=1.0)

    def logp(x):
        return guide.classifier(x, None).log_softmax(1).gather(1, counts.view(-1, 1)).squeeze(1)

    v = guide.velocity(x, 0.5, counts)
    assert (logp(x + 1e-2 * v) > logp(x)).all()
    score = v  # at t = 0.5 the factor (1 − t)/t is 1
    for t in (0.2, 0.8):
        torch.testing.assert_close(guide.velocity(x, t, counts), (1 - t) / t * score)
    torch.testing.assert_close(guide.velocity(x, 0.0, counts), guide.velocity(x, counter.T_FLOOR, counts) / 0.95)
    guide3 = counter.CountGuide(guide.classifier, scale=3.0)
    torch.testing.assert_close(guide3.velocity(x, 0.5, counts), 3 * v)


class _Still(torch.nn.Module):
    """A UNet stand-in whose velocity is zero, so that every move comes from the steer."""

    def forward(self, x, t, encoder_hidden_states):
        return type("Out", (), {"sample": torch.zeros_like(x)})


def test_the_sampler_adds_the_steer_at_each_steps_progress():
    seen = []

    def steer(x, t):
        seen.append(t)
        return torch.full_like(x, t)

    noise, emb = torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 8)
    out = euler_sample(_Still(), noise, emb, None, 4, 1.0, steer)
    assert seen == [0.0, 0.25, 0.5, 0.75]
    torch.testing.assert_close(out, torch.full_like(noise, sum(seen) / 4))


def test_the_classifier_learns_to_count_from_pooled_renders():
    """Average-pooled 16×16 renders stand in for latents: 300 steps must count clean ones far above chance (1/6,
    where near-pure noise stays)."""
    images, counts = counter.counting_set(seed=5, n=1200)
    x = F.avg_pool2d(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1, 4)  # (N, 3, 16, 16)
    x = (x - x.mean()) / x.std()
    counts_t = torch.from_numpy(counts)
    torch.manual_seed(0)
    classifier = counter.train_counter(counter.CountClassifier(3, width=32), x[:1000], counts_t[:1000],
                                       StageConfig(steps=300, batch=64, lr=2e-3, warmup=20, ema=0.0),
                                       torch.Generator().manual_seed(0), [])
    gen = torch.Generator().manual_seed(1)
    clean, noisy = (counter.accuracy(classifier, x[1000:], counts_t[1000:], t, gen) for t in (1.0, 0.05))
    assert clean > 0.45 and noisy < 0.3


def test_pairs_follow_the_guide_only_when_one_is_given():
    torch.manual_seed(0)
    cfg, tokenizer = preset("tiny").model, build_tokenizer()
    unet, te = build_unet(cfg).eval(), build_text_encoder(cfg, tokenizer).eval()
    ids, empty = tokenize(tokenizer, ["two red circles on a blue background"] * 3), tokenize(tokenizer, [""])[0]
    guide = counter.CountGuide(counter.CountClassifier(cfg.latent_channels), scale=10.0)

    def pairs(**guided):
        return stages.make_pairs(unet, te, ids, empty, 3, 2.0, torch.Generator().manual_seed(1), **guided)

    (noise, plain), (_, steered) = pairs(), pairs(counts=torch.full((3,), 2), count_guide=guide)
    with torch.no_grad():
        cond, uncond = te(ids)[0], te(empty[None])[0].expand(3, -1, -1)
    torch.testing.assert_close(plain, euler_sample(unet, noise, cond, uncond, 3, 2.0))
    assert not torch.allclose(plain, steered)
