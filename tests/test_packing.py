"""``reverie.nets.packing``: convolutions and Linears through oneDNN with weights reordered once give the plain
layers' numbers bit for bit, fall back where they must, and follow weight changes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from reverie.nets.packing import is_packed, pack_weights, packing_available, unpack_weights

pytestmark = pytest.mark.skipif(not packing_available(), reason="this PyTorch has no oneDNN")


class Tokens(nn.Module):
    def forward(self, x):
        return x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, C)


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1),
                        Tokens(), nn.Linear(16, 24))
    return net.to(torch.bfloat16).to(memory_format=torch.channels_last).eval().requires_grad_(False)


def _x(h=12, w=12, seed=1):
    x = torch.randn(2, 8, h, w, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    return x.to(memory_format=torch.channels_last)


def test_packed_layers_give_the_plain_numbers_at_any_size():
    net = _net()
    plain = [net(_x()), net(_x(10, 6, seed=2))]
    assert pack_weights(net) == 3 and pack_weights(net) == 0  # two convs and a Linear, routed once
    for got, want in zip([net(_x()), net(_x(10, 6, seed=2))], plain):  # the second size: packed for the first
        assert got.shape == want.shape and torch.equal(got, want)
    copied = copy.deepcopy(net)  # the packed copies stay beside the layers: a copy is plain and packs anew
    assert torch.equal(copied(_x()), plain[0]) and sum(map(is_packed, copied.modules())) == 3
    assert unpack_weights(net) == 3 and not any(map(is_packed, net.modules()))
    assert torch.equal(net(_x()), plain[0])


def test_weight_changes_and_gradients_use_the_current_weights():
    net = _net()
    pack_weights(net)
    net(_x())
    with torch.no_grad():
        net[0].weight.mul_(2)  # in place: packed again at the next call
    changed = net(_x())
    unpack_weights(net)
    assert torch.equal(changed, net(_x()))
    pack_weights(net)
    net.float()  # another dtype: the plain weights are new tensors
    packed = net(_x().float())
    unpack_weights(net)
    assert torch.equal(packed, net(_x().float()))
    pack_weights(net, dtypes=(torch.float32,))
    net.requires_grad_(True)
    loss = net(_x().float()).square().mean()  # gradients wanted: the plain path, which autograd follows
    loss.backward()
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0


def test_a_stable_diffusion_model_loads_packed_in_bf16_and_samples_the_same(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from reverie.pipeline import Pipeline
    from sd_models import save_sd_pipeline

    folder = save_sd_pipeline("tiny-sd1", tmp_path / "sd")
    packed = Pipeline.from_pretrained(folder, dtype=torch.bfloat16, channels_last=True)
    plain = Pipeline.from_pretrained(folder, dtype=torch.bfloat16, channels_last=True, pack=False)
    assert any(map(is_packed, packed.net.net.modules())) and any(map(is_packed, packed.vae.modules()))
    assert not any(map(is_packed, plain.net.modules()))
    settings = dict(num_images=1, steps=3, seed=3, guidance_scale=7.5, negative_prompt="blurry")
    assert torch.equal(packed.sample(prompts=["a red circle"], **settings),
                       plain.sample(prompts=["a red circle"], **settings))
    assert not any(map(is_packed, packed.compile().net.net.modules()))  # inductor traces plain layers
