"""Runs are owned: one trainer per run directory, damaged checkpoints skipped, network changes refused,
other changes kept in the run's history, and a log without repeated steps after a resume."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import NET
from reverie.configs import load_config
from reverie.train import TrainingError, train
from reverie.train.config import TrainConfig
from reverie.train.errors import RunChanged, RunInUse
from reverie.train.lock import RunLock
from toy_data import Toy

ROOT = Path(__file__).resolve().parents[1]
TINY = [f"--model.network_overrides={NET}", "--data.batch_size=4", "--data.resolution=16", "--train.progress=false",
        "--sample.every=0", "--optim.warmup_steps=2", "--train.log_every=1", "--train.checkpoint_every=2"]


def _cfg(out, *extra):
    return load_config(TrainConfig, None, [*TINY, f"--train.out_dir={out}", *extra])


def _weights(out):
    return {name: load_file(str(Path(out) / "model" / f"{name}.safetensors")) for name in ("model", "ema")}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    train(_cfg(out, "--train.steps=6"), resume=False, dataset=Toy(40))
    return _weights(out)


def test_a_second_trainer_is_refused_while_the_first_holds_the_run(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunInUse, match=f"pid {os.getpid()}"):
            train(_cfg(tmp_path / "run", "--train.steps=2"), resume=False, dataset=Toy(40))
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any step
    train(_cfg(tmp_path / "run", "--train.steps=2"), resume=False, dataset=Toy(40))  # released: trains


def test_the_lock_of_a_killed_process_is_free_at_once(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from reverie.train.lock import RunLock
        RunLock({str(tmp_path / "run")!r}).acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(RunInUse):
        RunLock(tmp_path / "run").acquire()
    proc.kill()  # SIGKILL: no cleanup runs
    proc.wait()
    RunLock(tmp_path / "run").acquire().release()  # no stale lock to remove


def test_a_damaged_latest_checkpoint_falls_back_to_an_older_one(straight, tmp_path, capsys):
    out = tmp_path / "run"
    train(_cfg(out, "--train.steps=4"), resume=False, dataset=Toy(40))
    tensors = out / "checkpoints" / "ckpt-00000004" / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])  # a torn write
    train(_cfg(out, "--train.steps=6"), resume="auto", dataset=Toy(40))
    said = capsys.readouterr().out
    assert "skipped damaged checkpoint(s) ckpt-00000004" in said and "resuming from ckpt-00000002" in said
    for name, tensors in straight.items():  # resumed from step 2: still exactly the straight run
        assert all(torch.equal(tensors[k], _weights(out)[name][k]) for k in tensors)
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 3-4 were logged twice and kept once


def test_every_checkpoint_damaged_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, "--train.steps=4"), resume=False, dataset=Toy(40))
    for ckpt in (out / "checkpoints").glob("ckpt-*"):
        (ckpt / "state.json").write_text("{not json")
    with pytest.raises(TrainingError, match="every checkpoint .* is damaged.*away to start afresh"):
        train(_cfg(out, "--train.steps=6"), resume="auto", dataset=Toy(40))


def test_a_latest_pointer_to_a_missing_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, "--train.steps=2"), resume=False, dataset=Toy(40))
    for ckpt in (out / "checkpoints").glob("ckpt-*"):  # a copied run directory without its checkpoints
        for f in ckpt.iterdir():
            f.unlink()
        ckpt.rmdir()
    with pytest.raises(TrainingError, match="names 'ckpt-00000002', which is not there.*away to start afresh"):
        train(_cfg(out, "--train.steps=4"), resume="auto", dataset=Toy(40))
    (out / "checkpoints" / "latest").unlink()  # moved away: a fresh start
    train(_cfg(out, "--train.steps=2"), resume="auto", dataset=Toy(40))
    assert (out / "checkpoints" / "ckpt-00000002" / "state.json").is_file()


def test_a_resume_that_changes_the_network_is_refused(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, "--train.steps=2"), resume=False, dataset=Toy(40))
    wider = NET.replace("model_channels: 8", "model_channels: 16")
    with pytest.raises(RunChanged, match=r"model\.network_overrides\.model_channels 8 -> 16"):
        train(_cfg(out, "--train.steps=4", f"--model.network_overrides={wider}"), resume="auto", dataset=Toy(40))
    with pytest.raises(RunChanged, match=r"schedule\.name 'linear' -> 'cosine'"):
        train(_cfg(out, "--train.steps=4", "--schedule.name=cosine"), resume="auto", dataset=Toy(40))


def test_other_changes_are_allowed_and_kept_in_the_history(tmp_path, capsys):
    out = tmp_path / "run"
    train(_cfg(out, "--train.steps=2"), resume=False, dataset=Toy(40))
    train(_cfg(out, "--train.steps=4", "--optim.lr=1e-4", "--train.seed=7"), resume="auto", dataset=Toy(40))
    assert "resuming with changed settings: optim.lr 0.0002 -> 0.0001" in capsys.readouterr().out
    (record,) = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert record["step"] == 2
    assert record["changed"] == {"optim.lr": [2e-4, 1e-4], "train.seed": [0, 7], "train.steps": [2, 4]}
    assert json.loads((out / "config.json").read_text())["optim"]["lr"] == 1e-4  # the run's current settings


def test_the_cli_refuses_a_busy_run_in_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"train: {{out_dir: {tmp_path / 'run'}, steps: 2}}\n")
    with RunLock(tmp_path / "run"):
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "reverie", "train", str(cfg)], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "being trained by another process" in lines[0], proc.stderr
    assert time.monotonic() - start < 60 and not (tmp_path / "run" / "checkpoints").exists()


def test_a_fresh_start_over_an_earlier_runs_checkpoints_is_refused(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, "--train.steps=4"), resume=False, dataset=Toy(40))
    # pruning keeps the highest steps: a fresh run's checkpoints would be deleted as soon as written
    with pytest.raises(RunChanged, match="holds checkpoints of an earlier run"):
        train(_cfg(out, "--train.steps=2"), resume=False, dataset=Toy(40))
    assert sorted(p.name for p in (out / "checkpoints").glob("ckpt-*")) == ["ckpt-00000002", "ckpt-00000004"]


def test_changes_inside_dict_fields_count_but_new_fields_do_not():
    from reverie.train.run import _changes

    old = {"model": {"network": "unet-tiny", "network_overrides": {}}, "optim": {"lr": 1.0}}
    new = {"model": {"network": "unet-tiny", "network_overrides": {"dropout": 0.1}}, "optim": {"lr": 1.0, "new": 2}}
    assert _changes(old, new) == {"model.network_overrides.dropout": ("(absent)", 0.1)}
    assert _changes(new, old) == {"model.network_overrides.dropout": (0.1, "(absent)")}
