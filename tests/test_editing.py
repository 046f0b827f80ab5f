"""Editing: start noise given to sample_images, DDIM / exact inversion (closed form on Gaussian data, exact
reconstruction on pixel and latent models)."""

from pathlib import Path

import pytest
import torch

import reverie
from helpers import NET, RGB16, TEXT_MODEL, tiny_config, tiny_network
from reverie.build import DiffusionModel
from reverie.editing import (
    Inversion,
    ddim_inversion,
    edit,
    img2img,
    inpaint,
    invert,
    repaint,
    repaint_path,
    strength_steps,
    target_layouts,
)
from reverie.latent import latent_info
from reverie.nets.autoencoder import create_autoencoder
from reverie.samplers import get_sigmas
from reverie.sampling import SamplingOptions, noise_shape, sample_images, sigma_grid

ASSETS = Path(reverie.__file__).parent / "assets"

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def text_model():
    cfg = tiny_config(*TEXT_MODEL, "--model.prediction=v")
    return DiffusionModel(tiny_network(cfg, RGB16).eval(), cfg, RGB16)


@pytest.fixture(scope="module")
def latent_model():
    torch.manual_seed(0)
    vae = create_autoencoder("vae-f4", base_channels=8, channel_mult=(1, 2), norm_groups=4).eval()
    info = latent_info(RGB16, vae)
    cfg = tiny_config(f"--model.network_overrides={NET}", "--data.resolution=16", "--model.prediction=eps")
    return DiffusionModel(tiny_network(cfg, info).eval(), cfg, info, vae=vae)


def _psnr(a, b):
    return float(10 * torch.log10(4 / (a - b).pow(2).mean()))


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral"])
def test_given_noise_is_the_drawn_noise(text_model, sampler):
    """noise= the unit-variance draw of the seed reproduces the seeded samples bit for bit, ancestral too."""
    options = SamplingOptions(sampler=sampler, steps=3, seed=7, guidance_scale=2.0)
    drawn = sample_images(text_model, 2, options, prompts=PROMPTS)
    noise = torch.randn(noise_shape(text_model, 2), generator=torch.Generator().manual_seed(7))
    assert torch.equal(sample_images(text_model, 2, options, prompts=PROMPTS, noise=noise), drawn)
    other = sample_images(text_model, 2, options, prompts=PROMPTS, noise=noise.flip(0))
    assert not torch.equal(other, drawn)


def test_given_noise_is_checked(text_model):
    with pytest.raises(ValueError, match=r"shape \(2, 3, 16, 16\)"):
        sample_images(text_model, 2, SamplingOptions(steps=2), prompts=PROMPTS, noise=torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="non-finite"):
        sample_images(text_model, 1, SamplingOptions(steps=2), noise=torch.full((1, 3, 16, 16), float("nan")))


def test_ddim_inversion_converges_to_the_gaussian_flow_map():
    """Data N(mu, s^2) per pixel: the exact denoiser's probability-flow ODE carries x0 to
    mu + (x0 - mu) sqrt(s^2 + sigma^2) / s, which DDIM inversion approaches as the steps grow (first order)."""
    mu, s = 0.3, 0.5

    def denoiser(x, sigma):
        var = sigma.view(-1, 1, 1, 1) ** 2
        return mu + s**2 / (s**2 + var) * (x - mu)

    x0 = mu + s * torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for n in (20, 80):
        sigmas = get_sigmas("karras", n, 0.01, 20.0).double()
        top = ddim_inversion(denoiser, x0, sigmas, {})[-1]
        exact = mu + (x0 - mu) * (s**2 + 20.0**2) ** 0.5 / s
        errors.append(float((top - exact).abs().max() / exact.abs().max()))
    assert errors[1] < 0.03 and errors[1] < errors[0] / 3.5  # first order: 4x fewer errors for 4x the steps


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_exact_inversion_reconstructs_to_float_precision(text_model, guidance):
    images = sample_images(text_model, 2, SamplingOptions(sampler="ddim", steps=8, seed=3), prompts=PROMPTS)
    exact = invert(text_model, images, PROMPTS, steps=8, guidance_scale=guidance, method="exact")
    assert isinstance(exact, Inversion) and len(exact.residuals) == 8
    assert exact.noise.shape == (2, 3, 16, 16)
    rebuilt = sample_images(text_model, 2, exact.options, prompts=PROMPTS, noise=exact.noise,
                            callback=exact.callback())
    assert (rebuilt - images).abs().max() < 1e-5
    # plain inversion's reconstruction is close but not exact; its noise is the same
    plain = invert(text_model, images, PROMPTS, steps=8, guidance_scale=guidance)
    assert torch.equal(plain.noise, exact.noise) and plain.residuals is None
    again = sample_images(text_model, 2, plain.options, prompts=PROMPTS, noise=plain.noise)
    assert 10 < _psnr(again, images) < 80


def test_exact_inversion_of_a_latent_model_with_any_sampler(latent_model):
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    inv = invert(latent_model, images, steps=6, method="exact", sampler="dpmpp_2m")
    assert inv.noise.shape == (2, *noise_shape(latent_model, 1)[1:])
    latents = inv.trajectory[0]
    seen = []
    sample_images(latent_model, 2, inv.options, noise=inv.noise, callback=lambda step: seen.append(step.x) or
                  inv.callback()(step))
    assert (seen[-1] + inv.residuals[-1] - latents).abs().max() < 1e-5
    decoded = sample_images(latent_model, 2, inv.options, noise=inv.noise, callback=inv.callback())
    assert torch.allclose(decoded, latent_model.vae.from_latent(latents).clamp(-1, 1), atol=1e-5)


def test_invert_rejects_bad_input(text_model):
    images = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match="unknown inversion method"):
        invert(text_model, images, method="edict")
    with pytest.raises(ValueError, match="inverts the ddim sampler"):
        invert(text_model, images, sampler="dpmpp_2m")
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\]"):
        invert(text_model, torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        invert(text_model, images + 2)
    with pytest.raises(ValueError, match="2 prompts for 1 images"):
        invert(text_model, images, PROMPTS)


# --- img2img, inpainting, prompt edits ---


def test_strength_follows_diffusers():
    assert [strength_steps(s, 20) for s in (0.3, 0.5, 0.7, 1.0)] == [6, 10, 14, 20]
    assert strength_steps(0.05, 20) == 1
    for bad in (0, -0.1, 1.2, True):
        with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
            strength_steps(bad, 20)
    with pytest.raises(ValueError, match="runs no step"):
        strength_steps(0.04, 20)  # int(20 * 0.04) = 0: diffusers fails on this


def test_img2img_starts_at_the_strength_level(text_model):
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    options = SamplingOptions(sampler="euler", steps=10, grid="ddim-trailing", seed=4)
    seen = []
    out = img2img(text_model, images, PROMPTS, strength=0.3, options=options, callback=seen.append)
    grid = sigma_grid(text_model, 10, "ddim-trailing")
    assert [s.sigma for s in seen] == grid[7:-1].tolist()
    assert out.shape == images.shape and out.abs().max() <= 1
    # the same seed gives the same bytes; a lower strength stays nearer the input
    assert torch.equal(out, img2img(text_model, images, PROMPTS, strength=0.3, options=options))
    far = img2img(text_model, images, PROMPTS, strength=1.0, options=options)
    assert (out - images).abs().mean() < (far - images).abs().mean()


def test_repaint_path():
    assert repaint_path(4, 2, 2) == [0, 1, 2, 1, 0, 1, 2, 3, 4, 3, 2, 3, 4]
    assert repaint_path(3) == [0, 1, 2, 3]
    path = repaint_path(20, 5, 4)
    assert sum(b > a for a, b in zip(path, path[1:])) == 80 and path[-1] == 20


def test_repaint_resampling_approaches_the_gaussian_conditional():
    """Two pixels with correlation 0.9 under their exact denoiser: given pixel 0 = 1.5, pixel 1 is
    N(1.35, 0.19). Replacement alone (resample 1) barely uses the known pixel; RePaint's resampling does."""
    cov = torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=torch.float64)

    def denoiser(x, sigma):
        gain = cov @ torch.linalg.inv(cov + float(sigma[0]) ** 2 * torch.eye(2, dtype=torch.float64))
        return (x.view(x.shape[0], 2) @ gain.T).view_as(x)

    n = 4000
    known = torch.tensor([1.5, 0.0], dtype=torch.float64).view(1, 1, 1, 2).expand(n, 1, 1, 2)
    mask = torch.tensor([0.0, 1.0], dtype=torch.float64).view(1, 1, 1, 2)
    sigmas = get_sigmas("karras", 30, 0.01, 20.0).double()
    means = {}
    for resample in (1, 10):
        g = torch.Generator().manual_seed(0)
        x = known + 20.0 * torch.randn(known.shape, generator=g, dtype=torch.float64)
        out = repaint(denoiser, x, sigmas, known, mask, repaint_path(30, 3, resample), {}, g)
        assert torch.equal(out[..., 0], known[..., 0])
        means[resample] = float(out[..., 1].mean())
        if resample == 10:
            assert abs(float(out[..., 1].var()) - 0.19) < 0.05
    assert abs(means[10] - 1.35) < 0.08 < abs(means[1] - 1.35)


@pytest.mark.parametrize("which", ["text_model", "latent_model"])
def test_inpaint_keeps_the_unmasked_pixels_exactly(which, request):
    model = request.getfixturevalue(which)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mask = torch.zeros(16, 16)
    mask[4:10, 3:12] = 1
    prompt = PROMPTS if which == "text_model" else ""
    out = inpaint(model, images, mask, prompt, steps=4, jump_length=2, resample=2, seed=5)
    keep = mask == 0
    assert torch.equal(out[:, :, keep], images[:, :, keep])
    assert not torch.equal(out[:, :, ~keep], images[:, :, ~keep])
    assert torch.equal(out, inpaint(model, images, mask, prompt, steps=4, jump_length=2, resample=2, seed=5))


def test_inpaint_rejects_bad_masks(text_model):
    images = torch.zeros(1, 3, 16, 16)
    for mask, message in ((torch.zeros(8, 8), "must be 16x16"), (torch.zeros(16, 16), "empty"),
                          (torch.ones(1, 1, 16, 16), "all white"), (torch.zeros(1, 3, 16, 16), "one channel")):
        with pytest.raises(ValueError, match=message):
            inpaint(text_model, images, mask, "a red circle", steps=2)


def test_edit_to_the_same_prompt_reconstructs(text_model):
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    same = edit(text_model, images, PROMPTS, PROMPTS, steps=6, guidance_scale=2.0)
    assert (same - images.clamp(-1, 1)).abs().max() < 1e-5
    changed = edit(text_model, images, PROMPTS, ["a green triangle", "a yellow star"], steps=6, guidance_scale=2.0)
    assert (changed - images).abs().max() > 1e-3


def test_target_layouts_keep_the_boxes():
    from reverie.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(ASSETS / "shapes-t2i")
    box_a, box_b = (2.0, 3.0, 10.0, 11.0), (14.0, 15.0, 26.0, 27.0)
    source = SamplingOptions(layouts=[[("red circle", box_a), ("blue square", box_b)]]).resolve(pipe.cfg)
    target = target_layouts(pipe, source, ["a green circle above a blue square"])
    assert target.layouts == [[("green circle", box_a), ("blue square", box_b)]]


def test_pipeline_methods_take_pil_images(make_model_dir):
    from reverie.images import to_pil
    from reverie.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(make_model_dir("tiny", TEXT_MODEL, RGB16))
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pil = to_pil(images)[0]
    as_read = pipe._images(pil)
    assert (as_read - images).abs().max() <= 1 / 127.5
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 2:9, 3:7] = 1
    out = pipe.inpaint(pil, to_pil(mask * 2 - 1)[0], "a red circle", steps=2, seed=1)
    assert torch.equal(out, inpaint(pipe, as_read, mask, "a red circle", steps=2, seed=1))
    inv = pipe.invert(pil, "a red circle", steps=3, method="exact")
    assert torch.equal(pipe.edit(pil, "a red circle", "a red circle", steps=3), pipe.sample(
        1, inv.options, prompts=inv.prompts, noise=inv.noise, callback=inv.callback()))
    assert pipe.img2img(pil, "a star", strength=0.5, steps=4).shape == (1, 3, 16, 16)


@pytest.fixture(scope="module")
def layout_model():
    cfg = tiny_config(*TEXT_MODEL, "--model.layout_channels=4", "--model.prediction=v")
    return DiffusionModel(tiny_network(cfg, RGB16).eval(), cfg, RGB16)


def test_local_blend_keeps_everything_outside_the_changed_box(layout_model, text_model):
    from reverie.data.masks import box_pixels

    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    box_a, box_b = (0.1, 0.1, 0.4, 0.45), (0.55, 0.5, 0.95, 0.9)
    layouts = [[("red circle", box_a), ("blue square", box_b)]]
    source, target = "a red circle above a blue square", "a green circle above a blue square"
    out = edit(layout_model, images, source, target, steps=5, guidance_scale=3.0, layouts=layouts)
    outside = (box_pixels(box_a, 16, 2.0) == 0).expand_as(images)
    assert torch.equal(out[outside], images[outside])  # exact, not approximately
    assert (out - images)[~outside].abs().max() > 1e-3  # the changed box was regenerated
    whole = edit(layout_model, images, source, target, steps=5, guidance_scale=3.0, layouts=layouts,
                 local_blend=False)
    assert (whole - images)[outside].abs().max() > 1e-4  # without it the rest drifts
    # an edit that changes no box regenerates the whole image (it reconstructs the same prompt exactly)
    same = edit(layout_model, images, source, source, steps=5, guidance_scale=3.0, layouts=layouts)
    assert (same - images).abs().max() < 1e-5
    with pytest.raises(ValueError, match="layout-conditioned"):
        edit(text_model, images, PROMPTS, PROMPTS, steps=2, local_blend=True)


def test_fresh_noise_redraws_only_the_changed_box(layout_model, monkeypatch):
    """fresh_noise mixes the seed's noise into the inverted noise inside the changed box only, keeping unit
    variance: the start noise given to the sampler is sqrt(f) z + sqrt(1 - f) n_inv there and n_inv elsewhere."""
    from reverie import editing
    from reverie.data.masks import box_pixels

    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    box = (0.1, 0.1, 0.4, 0.45)
    layouts = [[("red circle", box), ("blue square", (0.55, 0.5, 0.95, 0.9))]]
    source, target = "a red circle above a blue square", "a green circle above a blue square"
    seen = []
    real = editing.sample_images
    monkeypatch.setattr(editing, "sample_images",
                        lambda *a, noise=None, **k: seen.append(noise) or real(*a, noise=noise, **k))
    inv = editing.invert(layout_model, images, source, steps=4, guidance_scale=2.0, layouts=layouts, seed=3,
                         method="exact")
    outs = {f: edit(layout_model, images, source, target, steps=4, guidance_scale=2.0, layouts=layouts, seed=3,
                    fresh_noise=f) for f in (0.0, 0.75, 1.0)}
    starts = dict(zip((0.0, 0.75, 1.0), seen[2::2]))  # invert samples once (residuals), each edit twice
    inside = box_pixels(box, 16, 2.0).bool().expand_as(images)
    z = torch.randn(images.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(starts[0.0], inv.noise)
    assert torch.allclose(starts[1.0][inside], z[inside]) and torch.equal(starts[1.0][~inside], inv.noise[~inside])
    mixed = 0.75 ** 0.5 * z + 0.25 ** 0.5 * inv.noise
    assert torch.allclose(starts[0.75][inside], mixed[inside], atol=1e-6)
    for f, out in outs.items():  # outside the box the input stays exactly, whatever the noise inside
        assert torch.equal(out[~inside], images[~inside]), f
    assert (outs[1.0] - outs[0.0])[inside].abs().max() > 1e-3
    for bad in (-0.1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="fresh_noise must be in"):
            edit(layout_model, images, source, target, steps=2, layouts=layouts, fresh_noise=bad)


def test_regional_prompts_reach_inversion_and_repaint(layout_model):
    """Inversion and RePaint call the network through the same regional denoiser as sampling: with a box named
    by another phrase the results change; with one box over the whole image named as the prompt they do not."""
    with torch.no_grad():
        # make the layout matter in this untrained model
        layout_model.net.net.spatial_in.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    mask = torch.zeros(16, 16)
    mask[2:12, 2:12] = 1
    part, whole = [[("blue square", (0.0, 0.0, 0.5, 0.5))]], [[("a red circle", (0.0, 0.0, 1.0, 1.0))]]
    for run in (lambda **kw: invert(layout_model, images, "a red circle", steps=4, guidance_scale=3.0, **kw).noise,
                lambda **kw: inpaint(layout_model, images, mask, "a red circle", steps=4, jump_length=2, resample=2,
                                     seed=5, guidance_scale=3.0, **kw)):
        assert not torch.allclose(run(layouts=part), run(layouts=part, regional=True), atol=1e-4)
        torch.testing.assert_close(run(layouts=whole), run(layouts=whole, regional=True), atol=2e-5, rtol=0)
