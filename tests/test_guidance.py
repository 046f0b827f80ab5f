import pytest
import torch
from torch import nn

from reverie.guidance import CFGDenoiser, RegionalDenoiser


class CondToy(nn.Module):
    """D(x, sigma, class_labels) = x / (1 + sigma^2) + label-dependent offset; counts calls."""

    calls = 0

    def forward(self, x, sigma, class_labels):
        self.calls += 1
        offset = class_labels.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return x / (1 + sigma.view(-1, *([1] * (x.ndim - 1))) ** 2) + offset


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g)
    return x, torch.full((3,), 2.0), {"class_labels": torch.tensor([1, 2, 3])}


def test_scale_one_is_the_conditional_model_exactly():
    d = CondToy()
    x, s, cond = _inputs()
    cfg = CFGDenoiser(d, {"class_labels": torch.zeros(3, dtype=torch.long)}, guidance_scale=1.0)
    assert torch.equal(cfg(x, s, **cond), d(x, s, **cond))


def test_guided_combination_and_single_batched_call():
    d = CondToy()
    x, s, cond = _inputs()
    uncond = {"class_labels": torch.zeros(1, dtype=torch.long)}  # broadcast over the batch
    cfg = CFGDenoiser(d, uncond, guidance_scale=3.0)
    before = d.calls
    out = cfg(x, s, **cond)
    assert d.calls == before + 1
    base = x / 5
    expected = base + 3.0 * cond["class_labels"].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(out, expected)


def test_rescale_matches_conditional_std():
    d = CondToy()
    x, s, cond = _inputs()
    uncond = {"class_labels": torch.zeros(3, dtype=torch.long)}
    full = CFGDenoiser(d, uncond, guidance_scale=5.0, guidance_rescale=1.0)(x, s, **cond)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), d(x, s, **cond).std(dim=(1, 2, 3)))
    half = CFGDenoiser(d, uncond, guidance_scale=5.0, guidance_rescale=0.5)(x, s, **cond)
    plain = CFGDenoiser(d, uncond, guidance_scale=5.0)(x, s, **cond)
    torch.testing.assert_close(half, 0.5 * full + 0.5 * plain)


def test_interval_limits_guidance():
    d = CondToy()
    x, s, cond = _inputs()
    uncond = {"class_labels": torch.zeros(3, dtype=torch.long)}
    cfg = CFGDenoiser(d, uncond, guidance_scale=3.0, interval=(0.5, 1.0))
    torch.testing.assert_close(cfg(x, s, **cond), d(x, s, **cond))  # sigma 2 is outside
    torch.testing.assert_close(cfg(x, s * 0.4, **cond), CFGDenoiser(d, uncond, 3.0)(x, s * 0.4, **cond))


def test_bad_options():
    with pytest.raises(ValueError):
        CFGDenoiser(CondToy(), {}, guidance_scale=-1)
    with pytest.raises(ValueError):
        CFGDenoiser(CondToy(), {}, guidance_rescale=2)


def test_regional_composites_each_region_estimate_then_guides_in_one_call():
    d = CondToy()
    x, s, cond = _inputs()  # labels 1, 2, 3: the whole prompt's offsets
    regions = [{"class_labels": torch.tensor([10, 20, 30])}, {"class_labels": torch.tensor([100, 200, 300])}]
    w = torch.zeros(2, 3, 1, 4, 4)
    w[0, :, :, :2] = 1.0     # region 0: the top half
    w[1, :2, :, :, :1] = 0.5  # region 1: the left column, half weight, in samples 0 and 1 only
    uncond = {"class_labels": torch.zeros(1, dtype=torch.long)}
    before, sizes = d.calls, []
    handle = d.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    out = RegionalDenoiser(d, regions, w, uncond=uncond, guidance_scale=3.0)(x, s, **cond)
    handle.remove()
    assert d.calls == before + 1 and sizes == [3 + 3 + 2 + 3]  # one batch; region 1 only where it has weight
    offset = lambda labels: labels.float().view(-1, 1, 1, 1)  # noqa: E731
    d_c = x / 5 + (1 - w.sum(0)) * offset(cond["class_labels"]) + sum(
        w[j] * offset(r["class_labels"]) for j, r in enumerate(regions))
    torch.testing.assert_close(out, x / 5 + 3.0 * (d_c - x / 5))
    # unguided: the composite itself; a region conditioned as the whole prompt changes nothing
    torch.testing.assert_close(RegionalDenoiser(d, regions, w)(x, s, **cond), d_c)
    same = RegionalDenoiser(d, [dict(cond)] * 2, w, uncond=uncond, guidance_scale=3.0)(x, s, **cond)
    torch.testing.assert_close(same, CFGDenoiser(d, uncond, guidance_scale=3.0)(x, s, **cond))
    with pytest.raises(ValueError, match="2 weight maps"):
        RegionalDenoiser(d, regions[:1], w)
