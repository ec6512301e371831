"""What a long recipe run leans on: a training stage resumed part-way, and --resume's check of the settings."""
import copy
import dataclasses

import pytest
import torch

from rfserve.model_zoo.rf_shapes import stages
from rfserve.model_zoo.rf_shapes.config import StageConfig, preset, stage_settings
from rfserve.model_zoo.rf_shapes.train import Run

CFG = StageConfig(steps=23, batch=8, lr=1e-2, warmup=3, ema=0.9)


class Stop(Exception):
    pass


def _fit(checkpoint=None, stop_at=None, alongside=False):
    """A small regression fitted by `stages._fit`; every batch comes from the generator, as in the real stages. With
    `alongside`, a second model trains in the same loop, as the tuning's fake flow does."""
    torch.manual_seed(0)
    model, other, gen, log = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), torch.Generator().manual_seed(5), []
    ema = stages.EMA(model, CFG.ema)

    def loss_fn(step):
        if step == stop_at:
            raise Stop
        x = torch.randn(CFG.batch, 4, generator=gen)
        loss = ((model(x) - x[:, :3].flip(1)) ** 2).mean()
        return loss + ((other(x) - x[:, 1:]) ** 2).mean() if alongside else loss

    stages._fit("test", list(model.parameters()), CFG, loss_fn, log, gen, ema, checkpoint, every=5,
                alongside=list(other.parameters()) if alongside else None)
    return (model, other), ema, log


@pytest.mark.parametrize("alongside", [False, True], ids=["one model", "a second alongside"])
def test_a_stage_stopped_part_way_ends_with_the_weights_of_an_unbroken_run(tmp_path, alongside):
    whole, whole_ema, whole_log = _fit(alongside=alongside)
    checkpoint = tmp_path / "stage.partial.pt"
    with pytest.raises(Stop):
        _fit(checkpoint, stop_at=17, alongside=alongside)
    assert torch.load(checkpoint, weights_only=True)["step"] == 15  # the last save before the stop
    resumed, resumed_ema, resumed_log = _fit(checkpoint, alongside=alongside)
    pairs = [(whole[0], resumed[0]), (whole_ema.module, resumed_ema.module)]
    if alongside:  # the second model trained (an untrained one keeps its initial weights), and resumed with the first
        assert not torch.equal(whole[1].weight, _fit()[0][1].weight)
        pairs.append((whole[1], resumed[1]))
    for a, b in pairs:
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q)
    assert resumed_log == whole_log and [e["step"] for e in whole_log] == [23]
    assert resumed_ema.updates == whole_ema.updates == CFG.steps


def test_the_model_alongside_learns_at_its_own_multiple_of_the_learning_rate():
    """DMD's fake flow learns faster than the student (two time-scale rule): from the same weights, under the same
    loss, Adam's first step moves the second model five times as far."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    other, start, gen = copy.deepcopy(model), copy.deepcopy(model), torch.Generator().manual_seed(5)

    def loss_fn(step):
        x = torch.randn(8, 4, generator=gen)
        return ((model(x) - x[:, :3]) ** 2).mean() + ((other(x) - x[:, :3]) ** 2).mean()

    stages._fit("test", list(model.parameters()), StageConfig(steps=1, batch=8, lr=1e-2, warmup=0, ema=0.0), loss_fn,
                [], gen, alongside=list(other.parameters()), alongside_lr_scale=5.0)
    for p, q, p0 in zip(model.parameters(), other.parameters(), start.parameters()):
        assert (p - p0).abs().min() > 1e-3
        torch.testing.assert_close(q - p0, 5 * (p - p0))


def test_the_last_save_is_the_last_multiple_before_the_end(tmp_path):
    """The end of a stage is saved as the stage's cache, not as a checkpoint."""
    checkpoint = tmp_path / "stage.partial.pt"
    _fit(checkpoint)
    assert torch.load(checkpoint, weights_only=True)["step"] == 20


def test_resume_reuses_a_stage_only_while_its_settings_and_the_earlier_ones_are_unchanged(tmp_path):
    calls = []

    def run_stages(cfg, resume):
        run = Run(tmp_path, resume, torch.device("cpu"), cfg)
        for name in ("vae", "teacher", "rf2"):
            run.stage(name, lambda name=name: calls.append(name) or {"x": torch.ones(2)}, {"x": None})
        return run

    tiny = preset("tiny")
    run_stages(tiny, resume=False)
    assert calls == ["vae", "teacher", "rf2"]
    run_stages(tiny, resume=True)
    assert calls == ["vae", "teacher", "rf2"]                 # all three cached
    torch.save({"seconds": 1.0}, tmp_path / "stages" / "teacher.partial.pt")
    longer = dataclasses.replace(tiny, teacher=dataclasses.replace(tiny.teacher, steps=11))
    run = run_stages(longer, resume=True)
    assert calls[3:] == ["teacher", "rf2"]                    # the VAE does not depend on the teacher's settings
    assert run.log["teacher"]["seconds"] < 1.0                # another recipe's partial stage was dropped, not resumed
    run_stages(longer, resume=False)
    assert calls[5:] == ["vae", "teacher", "rf2"]             # without --resume every stage runs


def test_the_counting_recipe_reuses_a_full_runs_vae_and_teacher():
    """A `counting` run with --resume in a `full` run's folder starts at the counter: the long stages stay cached."""
    full, counting = preset("full"), preset("counting")
    for name in ("vae", "teacher"):
        assert stage_settings(full, name) == stage_settings(counting, name), name
    assert stage_settings(full, "counter") != stage_settings(counting, "counter")
