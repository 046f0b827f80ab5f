import dataclasses
import random
import subprocess
import sys
import textwrap
import time
from typing import Literal

import numpy as np
import pytest
import torch
from torch import nn

from reverie.configs import ConfigError, apply_overrides, from_dict, load_config, to_dict
from reverie.train import EMA, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


@dataclasses.dataclass
class Inner:
    lr: float = 1e-4
    steps: int = 10
    kind: Literal["cosine", "constant"] = "constant"
    betas: tuple[float, float] = (0.9, 0.999)


@dataclasses.dataclass
class Outer:
    name: str = "x"
    train: Inner = dataclasses.field(default_factory=Inner)
    extra: dict = dataclasses.field(default_factory=dict)
    maybe: int | None = None


def test_config_round_trip_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: run\ntrain:\n  lr: 3e-4\n  kind: cosine\n")
    cfg = load_config(Outer, p, ["--train.steps=7", "maybe=3", "--extra.k=[1, 2]"])
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.kind == "cosine"
    assert cfg.train.steps == 7 and cfg.maybe == 3 and cfg.extra == {"k": [1, 2]}
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize("override, message", [
    ("--train.lrr=1", "did you mean train.lr"),
    ("--train.steps=many", "expected an integer"),
    ("--train.kind=linear", "not one of"),
    ("--train.lr=true", "expected a number"),
    ("--nosuch=1", "unknown config key"),
    ("--train.lr", "must look like"),
])
def test_config_errors_are_clear(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, [override])


def test_yaml_boolean_spellings_reach_string_choices():
    from reverie.train.config import TrainConfig

    assert load_config(TrainConfig, None, ["--train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="not one of"):
        load_config(TrainConfig, None, ["--train.mixed_precision=yes"])


def test_override_into_scalar_is_an_error():
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_ema_warmup_and_update():
    net = nn.Linear(3, 2)
    ema = EMA(net, max_decay=0.999, power=1.0, inv_gamma=1.0)
    assert ema.decay(0) == 0.0 and ema.decay(1) == pytest.approx(0.5)
    assert ema.decay(10**9) == pytest.approx(0.999)
    before = ema.model.weight.clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net, step=1)  # decay 0.5: halfway to the new weights
    torch.testing.assert_close(ema.model.weight, before + 0.5)
    half = EMA(net, half_life_images=64)
    assert half.decay(5, batch_size=64) == pytest.approx(0.5)


def _state():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    return {
        "step": 5, "model": net.state_dict(), "optimizer": opt.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "numpy": np.random.default_rng(0).bit_generator.state},
        "data": {"epoch": 1, "position": 17},
    }


def test_checkpoint_round_trip_is_exact(tmp_path):
    state = _state()
    path = save_checkpoint(tmp_path, 5, state)
    back = load_checkpoint(path)
    assert back["step"] == 5 and back["data"] == {"epoch": 1, "position": 17}
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v)
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    for i, s in state["optimizer"]["state"].items():
        assert torch.equal(back["optimizer"]["state"][i]["exp_avg"], s["exp_avg"])
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    random.setstate(back["rng"]["python"])  # a tuple again, accepted by random
    assert not list(tmp_path.glob("*.tmp"))


def test_keep_last_and_latest_pointer(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((2,), float(step))}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000003", "ckpt-00000004"]
    assert latest_checkpoint(tmp_path).name == "ckpt-00000004"
    # A crash mid-write leaves a .tmp directory and the old pointer: latest stays valid.
    (tmp_path / "ckpt-00000005.tmp").mkdir()
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 4


def test_kill_during_checkpointing_never_corrupts_latest(tmp_path):
    """SIGKILL a writer at random moments; 'latest' must always load and be complete."""
    script = textwrap.dedent(f"""
        import torch
        from reverie.train import save_checkpoint
        step = 0
        while True:
            step += 1
            w = torch.full((200_000,), float(step))
            save_checkpoint({str(tmp_path)!r}, step, {{"step": step, "w": w}}, keep_last=2)
    """)
    for delay in (0.0, 0.05, 0.13, 0.31):
        proc = subprocess.Popen([sys.executable, "-c", script])
        deadline = time.monotonic() + 120
        while latest_checkpoint(tmp_path) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        state = load_checkpoint(latest_checkpoint(tmp_path))
        assert torch.equal(state["w"], torch.full((200_000,), float(state["step"])))
    assert latest_checkpoint(tmp_path) is not None
