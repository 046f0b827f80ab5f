"""The training loop: exact resume (also after kill -9), non-finite handling, export, DDP."""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import NET, tiny_network
from reverie.configs import load_config
from reverie.pipeline import Pipeline
from reverie.train import TrainingError, latest_checkpoint, train
from reverie.train.config import TrainConfig
from reverie.train.data import ShardedSampler
from toy_data import Toy

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def _subprocess_env() -> dict:
    """The environment of a subprocess that imports ``toy_data`` from this directory."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


TINY = [f"--model.network_overrides={NET}",
        "--data.batch_size=4", "--data.resolution=16", "--train.progress=false", "--sample.every=0",
        "--optim.warmup_steps=2", "--model.conditioning=class", "--train.log_every=1"]


def _cfg(out, *extra):
    return load_config(TrainConfig, None, [*TINY, f"--train.out_dir={out}", *extra])


def _weights(out):
    return load_file(str(Path(out) / "model" / "model.safetensors")), load_file(
        str(Path(out) / "model" / "ema.safetensors"))


def _assert_same(a, b):
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
        assert torch.equal(a[1][k], b[1][k]), k


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    train(_cfg(out, "--train.steps=8", "--train.checkpoint_every=4"), resume=False, dataset=Toy(40))
    return out


def test_resume_reproduces_uninterrupted_run(straight, tmp_path):
    train(_cfg(tmp_path, "--train.steps=4", "--train.checkpoint_every=4"), resume=False, dataset=Toy(40))
    train(_cfg(tmp_path, "--train.steps=8", "--train.checkpoint_every=4"), resume="auto", dataset=Toy(40))
    _assert_same(_weights(straight), _weights(tmp_path))
    # 40 images / batch 4 = 10 batches per epoch: step 8 is in epoch 0, batch 8.
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))
    elapsed = [r["elapsed_s"] for r in log]  # the whole run's time: the resumed invocation goes on counting
    assert elapsed == sorted(elapsed) and elapsed[0] > 0


def test_time_limit_stops_with_a_checkpoint_and_resumes_exactly(straight, tmp_path):
    # A limit of 60 microseconds is over after the first step: the run stops there, checkpointed and
    # exported, and a second invocation (no limit) finishes the very same run.
    # Sample grids are written at sample.every and for the last step (they must not disturb the run).
    # The stopping step is logged even off the log_every grid.
    result = train(_cfg(tmp_path, "--train.steps=8", "--train.checkpoint_every=4", "--train.time_limit_min=1e-6",
                        "--sample.every=4", "--sample.num_images=2", "--sample.steps=2", "--train.log_every=5"),
                   resume=False, dataset=Toy(40))
    assert result.step == 1
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1]
    assert latest_checkpoint(tmp_path / "checkpoints").name.startswith("ckpt-00000001")
    assert (tmp_path / "model" / "config.json").is_file()
    assert sorted(f.name for f in (tmp_path / "samples").iterdir()) == ["step-00000001.png"]
    train(_cfg(tmp_path, "--train.steps=8", "--train.checkpoint_every=4", "--sample.every=4", "--sample.num_images=2",
               "--sample.steps=2"), resume="auto", dataset=Toy(40))
    _assert_same(_weights(straight), _weights(tmp_path))
    assert sorted(f.name for f in (tmp_path / "samples").iterdir()) == [
        "step-00000001.png", "step-00000004.png", "step-00000008.png"]


def test_kill_9_then_resume_matches(straight, tmp_path):
    script = textwrap.dedent(f"""
        from toy_data import Toy
        from reverie.configs import load_config
        from reverie.train import train
        from reverie.train.config import TrainConfig
        cfg = load_config(TrainConfig, None, {TINY!r} + ["--train.out_dir={tmp_path}", "--train.steps=8",
                          "--train.checkpoint_every=4"])
        train(cfg, resume="auto", dataset=Toy(40))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=_subprocess_env())
    deadline = time.monotonic() + 240
    while latest_checkpoint(tmp_path / "checkpoints") is None and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no cleanup runs
    proc.wait()
    if (tmp_path / "model").exists():  # finished before the kill landed: start over from step 4
        shutil.rmtree(tmp_path / "model")
    assert latest_checkpoint(tmp_path / "checkpoints") is not None
    train(_cfg(tmp_path, "--train.steps=8", "--train.checkpoint_every=4"), resume="auto", dataset=Toy(40))
    _assert_same(_weights(straight), _weights(tmp_path))


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_checkpoints_the_step_and_resumes_exactly(sig, tmp_path):
    # Ctrl-C (SIGINT) or SIGTERM lets the step under way finish, writes a checkpoint there (the run has no
    # periodic checkpoints before step 10,000) and stops with TrainingInterrupted; resuming from it gives the
    # weights of a straight run.
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys
        from toy_data import Toy
        from reverie.configs import load_config
        from reverie.train import TrainingInterrupted, train
        from reverie.train.config import TrainConfig
        cfg = load_config(TrainConfig, None, {TINY!r} + ["--train.out_dir={out}", "--train.steps=10000",
                          "--train.checkpoint_every=10000"])
        try:
            train(cfg, resume=False, dataset=Toy(40))
        except TrainingInterrupted as e:
            print(e.step, e.signum, e.checkpoint.name, e, sep="|")
            sys.exit(3)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=_subprocess_env(),
                            stdout=subprocess.PIPE, text=True)
    log, deadline = out / "log.jsonl", time.monotonic() + 240
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(getattr(signal, sig))
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, stdout
    step, signum, name, message = stdout.strip().split("|")
    step = int(step)
    assert int(signum) == getattr(signal, sig) and name == f"ckpt-{step:08d}"
    assert f"stopped by {sig} after step {step} of 10000" in message and "resumes" in message
    assert latest_checkpoint(out / "checkpoints").name == name
    assert json.loads(log.read_text().splitlines()[-1])["step"] == step  # the stopping step is logged
    assert not (out / "model").exists()  # stopped, not finished
    train(_cfg(out, f"--train.steps={step + 2}", "--train.checkpoint_every=10000"), resume="auto",
          dataset=Toy(40))
    train(_cfg(tmp_path / "straight", f"--train.steps={step + 2}"), resume=False, dataset=Toy(40))
    _assert_same(_weights(tmp_path / "straight"), _weights(out))


def test_cli_reports_an_interrupted_run_in_one_line(monkeypatch, tmp_path, capsys):
    from reverie import cli
    from reverie.train.errors import TrainingInterrupted

    def interrupted(args):
        raise TrainingInterrupted("stopped by SIGTERM after step 7 of 100; checkpoint X written. The same command "
                                  "resumes the run", 7, tmp_path, signal.SIGTERM)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  steps: 5\n")
    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_train(parser(), interrupted))
    assert cli.main(["train", str(cfg)]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["reverie: stopped by SIGTERM after step 7 of 100; checkpoint X written. The same command resumes "
                   "the run"]


def _with_train(parser, func):
    """``parser`` whose ``train`` subcommand runs ``func``."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub.choices["train"].set_defaults(func=func)
    return parser


def test_export_loads_in_pipeline_and_validates(straight, tmp_path):
    pipe = Pipeline.from_pretrained(straight / "model")
    imgs = pipe.sample(num_images=3, steps=2, sampler="euler", seed=1)
    assert imgs.shape == (3, 3, 16, 16) and torch.isfinite(imgs).all()
    assert torch.equal(imgs, pipe.sample(num_images=3, steps=2, sampler="euler", seed=1))
    bad = tmp_path / "bad"
    shutil.copytree(straight / "model", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["network"]["model_channels"] = 16
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="wrong shape"):
        Pipeline.from_pretrained(bad)


def test_nonfinite_losses_stop_with_a_clear_message(tmp_path):
    with pytest.raises(TrainingError, match="non-finite losses in a row.*Last good checkpoint"):
        train(_cfg(tmp_path, "--train.steps=10", "--train.max_nonfinite=3"), resume=False,
              dataset=Toy(40, nan=True))


def test_sharded_sampler_partitions_each_epoch():
    seen = []
    for rank in range(3):
        seen += list(ShardedSampler(100, rank, 3, seed=0, epoch=2, shuffle=True))
    assert sorted(seen) == list(range(100))
    a = list(ShardedSampler(100, 1, 3, seed=0, epoch=2, shuffle=True))
    b = list(ShardedSampler(100, 1, 3, seed=0, epoch=2, shuffle=True, start=5))
    assert b == a[5:]
    assert a != list(ShardedSampler(100, 1, 3, seed=0, epoch=3, shuffle=True))


def test_two_process_ddp_gloo(tmp_path):
    """torchrun, 2 CPU processes: identical weights, disjoint data, only rank 0 writes."""
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(f"""
        from toy_data import Toy
        from reverie.configs import load_config
        from reverie.train import train
        from reverie.train.config import TrainConfig
        cfg = load_config(TrainConfig, None, {TINY!r} + ["--train.out_dir={tmp_path / 'run'}",
                          "--train.steps=4", "--train.checkpoint_every=2"])
        result = train(cfg, resume=False, dataset=Toy(32, log="{tmp_path / 'seen'}"))
        import os
        from safetensors.torch import save_file
        state = {{k: v.detach().clone().contiguous() for k, v in result.model.state_dict().items()}}
        save_file(state, f"{tmp_path}/rank{{os.environ['RANK']}}.safetensors")
    """))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517"]
    subprocess.run([*cmd, str(script)], cwd=ROOT, env={**_subprocess_env(), "OMP_NUM_THREADS": "1"}, check=True,
                   timeout=400)
    seen = {r: [int(x) for x in (tmp_path / f"seen.{r}").read_text().split()] for r in (0, 1)}
    # 4 steps x batch 4 = 16 per rank = one epoch of 32 split in two: disjoint, covering all.
    assert len(seen[0]) == len(seen[1]) == 16 + 1  # + the first item read for dataset info
    assert set(seen[0][1:]).isdisjoint(seen[1][1:])
    assert sorted(seen[0][1:] + seen[1][1:]) == list(range(32))
    w0, w1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    init = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert all(torch.equal(w0[k], init[k]) for k in w0)
    run = tmp_path / "run"
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["ckpt-00000002", "ckpt-00000004", "latest"]
    assert len((run / "log.jsonl").read_text().splitlines()) == 4  # one writer


def test_negative_time_limit_is_a_config_error():
    from reverie.configs import ConfigError

    with pytest.raises(ConfigError, match="train.time_limit_min must be >= 0"):
        _cfg("unused", "--train.time_limit_min=-5")


@pytest.mark.skipif(not hasattr(torch, "compile") or sys.platform == "win32", reason="torch.compile unavailable")
def test_compiled_training_matches_eager_and_saves_the_same_names(straight, tmp_path):
    train(_cfg(tmp_path, "--train.steps=8", "--train.checkpoint_every=4", "--train.compile=true"),
          resume=False, dataset=Toy(40))
    eager, compiled = _weights(straight), _weights(tmp_path)
    for a, b in zip(eager, compiled):
        assert a.keys() == b.keys()  # no "_orig_mod." prefixes: checkpoints interchange with eager runs
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for CPU training")
def test_compile_with_mixed_precision_on_the_cpu_is_refused(tmp_path):
    with pytest.raises(TrainingError, match="mixed_precision=no"):
        train(_cfg(tmp_path, "--train.steps=2", "--train.compile=true", "--train.mixed_precision=bf16"),
              resume=False, dataset=Toy(8))
    assert not (tmp_path / "checkpoints").exists()  # refused before anything was written


def test_lr_schedules_follow_their_closed_forms():
    from reverie.configs import ConfigError
    from reverie.train.run import lr_lambda

    cos = lr_lambda(_cfg("unused", "--train.steps=102", "--optim.lr_schedule=cosine", "--optim.min_lr_ratio=0.1"))
    assert cos(0) == pytest.approx(0.5) and cos(1) == pytest.approx(1.0)  # linear warmup over 2 steps
    assert cos(52) == pytest.approx(0.55) and cos(102) == pytest.approx(0.1) and cos(500) == pytest.approx(0.1)
    wsd = lr_lambda(_cfg("unused", "--train.steps=100", "--optim.lr_schedule=wsd", "--optim.min_lr_ratio=0.2",
                         "--optim.decay_fraction=0.25"))
    assert [wsd(s) for s in (2, 50, 75)] == [1.0, 1.0, 1.0]  # stable until the last 25 steps
    assert wsd(85) == pytest.approx(1 - 0.8 * 10 / 25) and wsd(100) == pytest.approx(0.2)
    # extending a run: the same step is back on the plateau when train.steps grows
    longer = lr_lambda(_cfg("unused", "--train.steps=200", "--optim.lr_schedule=wsd", "--optim.decay_fraction=0.25"))
    assert longer(85) == 1.0 and longer(200) == pytest.approx(0.0)
    # the 1-sqrt cooldown: 1 - (1 - floor) sqrt(progress), steeper early than linear, the same end points
    sq = lr_lambda(_cfg("unused", "--train.steps=100", "--optim.lr_schedule=wsd", "--optim.min_lr_ratio=0.2",
                        "--optim.decay_fraction=0.25", "--optim.decay_shape=1-sqrt"))
    assert sq(75) == 1.0 and sq(100) == pytest.approx(0.2)
    assert sq(85) == pytest.approx(1 - 0.8 * (10 / 25) ** 0.5) and sq(85) < wsd(85)
    for bad in ("--optim.decay_fraction=0", "--optim.min_lr_ratio=1.5", "--optim.decay_shape=cosine"):
        with pytest.raises(ConfigError):
            _cfg("unused", bad)


def test_edm_models_sample_only_on_sigma_grids():
    from reverie.build import DiffusionModel
    from reverie.configs import ConfigError
    from reverie.sampling import SamplingOptions, sample_images

    edm = ["--model.prediction=edm", "--loss.noise_levels=lognormal", "--loss.weighting=edm"]
    with pytest.raises(ConfigError, match="edm samples on sample.grid=karras or exponential, not 'ddim-trailing'"):
        _cfg("unused", *edm, "--sample.grid=ddim-trailing")
    cfg = _cfg("unused", *edm, "--model.conditioning=none")
    info = {"in_channels": 3, "resolution": 16, "num_classes": 0}
    # perturbed off the zero-initialized output, so that the grid matters
    model = DiffusionModel(tiny_network(cfg, info, seed=0, perturb=0.05), cfg, info)
    # A VP timestep grid asked for explicitly is an error, never silently replaced by another grid.
    with pytest.raises(ValueError, match="an EDM model samples on a sigma grid"):
        sample_images(model, 2, SamplingOptions(steps=2, grid="ddim-trailing"))
    karras = sample_images(model, 2, SamplingOptions(steps=3, grid="karras"))
    expo = sample_images(model, 2, SamplingOptions(steps=3, grid="exponential"))
    assert torch.isfinite(expo).all() and not torch.equal(karras, expo)


def test_sample_grid_puts_each_prompt_in_its_own_column(tmp_path, monkeypatch):
    from PIL import Image

    from reverie import sampling
    from reverie.build import DiffusionModel

    # 8 images of 4 prompts (repeated cyclically) -> a 4-column grid; 6 images of 4 prompts do not tile -> default
    monkeypatch.setattr(sampling, "sample_images", lambda model, n, options, **kw: torch.zeros(n, 3, 16, 16))
    cfg = load_config(TrainConfig, None, ["--sample.num_images=8", "--sample.prompts=[a, b, c, d]"])
    with Image.open(sampling.save_sample_grid(DiffusionModel(None, cfg, {}), tmp_path / "a.png")) as im:
        assert im.size == (4 * (64 + 2) + 2, 2 * (64 + 2) + 2)
    cfg = load_config(TrainConfig, None, ["--sample.num_images=6", "--sample.prompts=[a, b, c, d]"])
    with Image.open(sampling.save_sample_grid(DiffusionModel(None, cfg, {}), tmp_path / "b.png")) as im:
        assert im.size == (3 * (64 + 2) + 2, 2 * (64 + 2) + 2)


def test_two_process_ddp_skips_a_nonfinite_loss_on_one_rank_together(tmp_path):
    """Rank 0 alone sees a NaN at step 0: both ranks skip that step (no collective mismatch) and stay identical."""
    script = tmp_path / "ddp_nan.py"
    script.write_text(textwrap.dedent(f"""
        import os
        import torch
        from toy_data import Toy
        from reverie.configs import load_config
        from reverie.train import train
        from reverie.train.config import TrainConfig

        class OneNaN(Toy):
            def __getitem__(self, i):
                item = super().__getitem__(i)
                return {{**item, "image": item["image"] * float("nan")}} if i == 0 else item

        cfg = load_config(TrainConfig, None, {TINY!r} + ["--train.out_dir={tmp_path / 'run'}", "--train.steps=3",
                          "--train.checkpoint_every=3", "--data.shuffle=false"])
        result = train(cfg, resume=False, dataset=OneNaN(32))
        from safetensors.torch import save_file
        state = {{k: v.detach().clone().contiguous() for k, v in result.model.state_dict().items()}}
        save_file(state, f"{tmp_path}/rank{{os.environ['RANK']}}.safetensors")
    """))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519"]
    subprocess.run([*cmd, str(script)], cwd=ROOT, env={**_subprocess_env(), "OMP_NUM_THREADS": "1"}, check=True,
                   timeout=400)
    w0, w1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["nonfinite_skipped"] == 1 and log[-1]["step"] == 3
