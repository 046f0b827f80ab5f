"""``reverie.nets.packing``: convolutions and Linears through oneDNN with weights reordered once give the plain
layers' numbers bit for bit, fall back where they must, and follow weight changes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from reverie.nets.packing import geglu, is_packed, linear, pack_weights, packing_available, unpack_weights

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
    with torch.inference_mode():  # weights made under inference mode (they count no in-place writes)
        made_here = _net()
        pack_weights(made_here)
        assert torch.equal(made_here(_x()), plain[0])


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
    assert not any(map(is_packed, plain.net.modules())) and packed.precision == plain.precision == "bf16"
    exact = Pipeline.from_pretrained(folder)  # float32
    settings = dict(num_images=1, steps=3, seed=3, guidance_scale=7.5, negative_prompt="blurry")
    got, want, truth = (p.sample(prompts=["a red circle"], **settings).double() for p in (packed, plain, exact))
    # the fused feed-forward rounds differently: packed and plain bf16 differ by bf16's error, not more, and
    # the packed one is as close to float32 (both about 5.5% on this random-weight model at guidance 7.5)
    error, plain_error = (float((a - truth).norm() / truth.norm()) for a in (got, want))
    assert error < 0.1 and error < 1.2 * plain_error
    assert not any(map(is_packed, packed.compile().net.net.modules()))  # inductor traces plain layers


def test_fused_feed_forward_and_residual_match_the_plain_ones():
    """``geglu`` and ``linear(add=)``: fused into oneDNN's GEMM epilogues on packed layers (to bf16 accuracy: one
    rounding fewer), and exactly the plain expressions on plain ones."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    proj, out = nn.Linear(32, 128).bfloat16(), nn.Linear(64, 32).bfloat16()
    x = torch.randn(2, 40, 32, dtype=torch.bfloat16)

    def plain():
        a, b = proj(x).chunk(2, dim=-1)
        return out(F.gelu(b) * a) + x

    with torch.no_grad():
        want = plain()
        assert torch.equal(linear(out, geglu(proj, x), add=x), want)  # not packed: the same expression
        pack_weights(proj), pack_weights(out)
        got = linear(out, geglu(proj, x), add=x)
        assert got.shape == want.shape and 0 < float((got - want).float().norm() / want.float().norm()) < 1e-2
        exact = (out.float()(F.gelu(proj.float()(x.float()).chunk(2, -1)[1]) * proj.float()(x.float()).chunk(2, -1)[0])
                 + x.float())
    assert float((got.float() - exact).norm()) <= float((want.float() - exact).norm()) * 1.5  # no worse than plain
