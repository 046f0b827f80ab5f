"""Stable Diffusion checkpoints in reverie against diffusers 0.42.1 (test-only reference).

Small SD 1- and SD 2-shaped pipelines with random weights (``sd_models.py``: 2 levels, 32-128 channels, a 2-3
layer CLIP with a vocabulary written by the test) are saved with ``save_pretrained``, loaded by reverie into its
own modules, and sampled from the same start noise with the same prompt, negative prompt and guidance (7.5) by
both. The final latents and the decoded images must agree to 1e-4 relative in float32.

Grids (reverie's grid options reproduce diffusers' timesteps exactly):

* DDIM and Euler: the SD scheduler config's own spacing, "leading" with ``steps_offset=1`` (timesteps 951, 901,
  ... at 20 steps) = ``get_sigmas("ddim-leading", n, schedule=s, offset=1)``. DDIM's config says
  ``set_alpha_to_one=False``, which ends diffusers' last step at alpha_bar[0] (sigma 0.029) instead of 0;
  reverie's grids end at 0, so diffusers runs with ``set_alpha_to_one=True`` here.
* DPM-Solver++(2M) and UniPC(bh2): ``timestep_spacing="trailing"`` = reverie's ``"ddim-trailing"`` grid
  (diffusers' multistep "leading" spaces by T // (n + 1), a grid reverie does not name).
"""

from __future__ import annotations

import math

import pytest
import torch

from reverie.pipeline import Pipeline
from reverie.samplers import get_sigmas
from reverie.sampling import SamplingOptions, sample_images
from reverie.sd import load_stable_diffusion, set_image_size

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

from sd_models import save_sd_pipeline, to_single_file  # noqa: E402

RTOL = 1e-4
STEPS = 6
PROMPT, NEGATIVE = "a red circle on a blue square", "blurry"
SAMPLERS = {  # reverie sampler: (diffusers scheduler, overrides of the SD scheduler config, reverie grid)
    "ddim": ("DDIMScheduler", {"set_alpha_to_one": True}, "leading"),
    "euler": ("EulerDiscreteScheduler", {}, "leading"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}, "ddim-trailing"),
    "unipc": ("UniPCMultistepScheduler", {"timestep_spacing": "trailing"}, "ddim-trailing"),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return {kind: save_sd_pipeline(kind, root / kind) for kind in ("tiny-sd1", "tiny-sd2")}


@pytest.fixture(scope="module")
def reference(folders):
    pipes = {kind: diffusers.StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None)
             for kind, path in folders.items()}
    for pipe in pipes.values():  # each test's scheduler starts from the saved config, not the last test's
        pipe.saved_scheduler_config = dict(pipe.scheduler.config)
    return pipes


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _grid(model, kind: str) -> torch.Tensor | str:
    if kind == "leading":
        return get_sigmas("ddim-leading", STEPS, schedule=model.schedule, offset=1)
    return kind


def _load(path) -> Pipeline:
    return Pipeline.from_pretrained(path)


def _reverie(model, sampler: str, grid, seed: int = 0, prompt: str = PROMPT, negative: str = NEGATIVE,
             steps: int = STEPS):
    """(final latents, images in [0, 1]) from reverie's sampling, as ``reverie generate`` runs it."""
    latents = []
    options = SamplingOptions(sampler=sampler, steps=None if not isinstance(grid, str) else steps, grid=grid,
                              guidance_scale=7.5, negative_prompt=negative, seed=seed)
    images = sample_images(model, 1, options, prompts=[prompt], callback=lambda step: latents.append(step.x))
    return latents[-1], (images + 1) / 2


def _diffusers(pipe, sampler: str, seed: int = 0, prompt: str = PROMPT, negative: str = NEGATIVE,
               steps: int = STEPS, size: int | None = None):
    """(final latents, images in [0, 1]) from diffusers' pipeline, from reverie's start noise for ``seed``
    (the pipeline scales it by the scheduler's ``init_noise_sigma``, as reverie does)."""
    name, overrides, _ = SAMPLERS[sampler]
    base = getattr(pipe, "saved_scheduler_config", pipe.scheduler.config)  # as saved (the fixture keeps it)
    pipe.scheduler = getattr(diffusers, name).from_config(base, **overrides)
    size = size or pipe.unet.config.sample_size
    noise = torch.randn((1, 4, size, size), generator=torch.Generator().manual_seed(seed))
    latents = []

    def keep(_pipe, _i, _t, tensors):
        latents.append(tensors["latents"])
        return tensors

    out = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=7.5,
               latents=noise, height=size * pipe.vae_scale_factor,
               width=size * pipe.vae_scale_factor, output_type="pt", callback_on_step_end=keep)
    return latents[-1], out.images


@pytest.mark.parametrize("kind", ["tiny-sd1", "tiny-sd2"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_samples_match_diffusers(folders, reference, kind, sampler):
    model = _load(folders[kind])
    assert model.cfg.model.prediction == ("eps" if kind == "tiny-sd1" else "v")
    ours_latents, ours_images = _reverie(model, sampler, _grid(model, SAMPLERS[sampler][2]))
    ref_latents, ref_images = _diffusers(reference[kind], sampler)
    assert ref_latents.std() > 0.1 and 0.05 < ref_images.std()  # a real signal, not saturated
    assert _rel(ours_latents, ref_latents) < RTOL
    assert _rel(ours_images, ref_images) < RTOL


def test_seed_prompt_and_negative_prompt_change_the_image(folders):
    model = _load(folders["tiny-sd1"])
    base = _reverie(model, "ddim", "ddim-trailing")[0]
    assert torch.equal(base, _reverie(model, "ddim", "ddim-trailing")[0])  # same seed: same bytes
    for changed in (dict(seed=1), dict(prompt="a green cat"), dict(negative="ugly")):
        assert _rel(_reverie(model, "ddim", "ddim-trailing", **changed)[0], base) > 1e-2


@pytest.mark.parametrize("kind", ["tiny-sd1", "tiny-sd2"])
def test_single_file_gives_identical_outputs(folders, tmp_path, kind):
    """The same weights in the CompVis / A1111 single-file layout load into identical modules: every tensor of
    reverie's U-Net, VAE and text encoder is equal, and so are the samples."""
    meta = {"modelspec.prediction_type": "v"} if kind == "tiny-sd2" else None
    file = to_single_file(folders[kind], tmp_path / f"{kind}.safetensors", metadata=meta)
    (tmp_path / "tokenizer").symlink_to(folders[kind] / "tokenizer")
    from_folder, from_file = _load(folders[kind]), _load(file)
    for a, b in ((from_folder.net.net, from_file.net.net), (from_folder.vae, from_file.vae),
                 (from_folder.net.encoder.model, from_file.net.encoder.model)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert from_file.cfg.model.prediction == from_folder.cfg.model.prediction
    assert from_file.info["image_resolution"] == (512 if kind == "tiny-sd1" else 768)  # SD 1 / SD 2's own size
    set_image_size(from_file, 16)
    assert torch.equal(_reverie(from_folder, "dpmpp_2m", "karras")[1], _reverie(from_file, "dpmpp_2m", "karras")[1])


def test_single_file_layout_agrees_with_diffusers_loader(folders, tmp_path):
    """The test's CompVis writer is checked by diffusers' own single-file converter: it reads the file back into
    the original weights (so the single-file test above is a test of reverie's converter, not of itself)."""
    file = to_single_file(folders["tiny-sd1"], tmp_path / "sd1.safetensors")
    unet = diffusers.UNet2DConditionModel.from_single_file(str(file), config=str(folders["tiny-sd1"]),
                                                           subfolder="unet", local_files_only=True)
    original = diffusers.UNet2DConditionModel.from_pretrained(str(folders["tiny-sd1"] / "unet"))
    sa, sb = unet.state_dict(), original.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pipeline_generate(folders):
    pipe = Pipeline.from_pretrained(folders["tiny-sd1"])
    images = pipe.generate(PROMPT, num_images=2, steps=3, seed=5, negative_prompt=NEGATIVE)
    assert [im.size for im in images] == [(16, 16)] * 2
    assert pipe.image_shape == (3, 16, 16) and pipe.conditioning == "text"
    again = pipe.generate(PROMPT, num_images=2, steps=3, seed=5, negative_prompt=NEGATIVE)
    assert images[1].tobytes() == again[1].tobytes()


def test_bf16_channels_last_agrees_with_float32(folders):
    """The fast CPU path (bf16 weights, channels_last activations) samples what float32 does, to bf16 accuracy;
    the sampler's state stays float32."""
    fast = Pipeline.from_pretrained(folders["tiny-sd2"], dtype=torch.bfloat16, channels_last=True)
    assert {p.dtype for p in fast.net.parameters()} == {torch.bfloat16}
    assert fast.net.net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    latents, images = _reverie(fast, "dpmpp_2m", "ddim-trailing", steps=4)
    ref_latents, ref_images = _reverie(_load(folders["tiny-sd2"]), "dpmpp_2m", "ddim-trailing", steps=4)
    assert latents.dtype == torch.float32 and 0 < _rel(latents, ref_latents) < 0.05
    assert _rel(images.float(), ref_images) < 0.05
    with pytest.raises(ValueError, match="options of Stable Diffusion checkpoints"):
        Pipeline.from_pretrained(folders["tiny-sd2"] / "unet", dtype=torch.bfloat16)


@pytest.mark.parametrize("kind", ["tiny-sd1", "tiny-sd2"])
@pytest.mark.parametrize("fast", [False, True])
def test_guidance_twins_run_once_up_to_the_first_cross_attention(folders, kind, fast):
    """A batch of two identical halves (guidance's [x, x] with cond / uncond contexts) runs its shared half alone
    until the first cross-attention: the same outputs as the whole batch run through (float32: to 1e-5; bf16 +
    channels_last: to bf16 rounding), with the first res block seeing half the batch; other batches, and
    training, run whole."""
    from reverie.nets.sd_unet import SDUNet

    dtype = torch.bfloat16 if fast else torch.float32
    net = Pipeline.from_pretrained(folders[kind], dtype=dtype, channels_last=fast).net.net
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g).repeat(2, 1, 1, 1)  # two images, twice
    t = torch.tensor([300.0, 700.0]).repeat(2)
    context = torch.randn(4, 7, net.config.context_dim, generator=g)
    seen = []
    hook = net.down[0].resnets[0].register_forward_hook(lambda m, a, out: seen.append(out.shape[0]))
    with torch.no_grad():
        out = net(x, t, context=context)
        assert seen == [2] and SDUNet.twin_halves(x, t) == 2
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(SDUNet, "twin_halves", staticmethod(lambda x, c: 0))
            whole = net(x, t, context=context)
        assert seen == [2, 4]
        apart = torch.cat([net(x[:2], t[:2], context=context[:2]), net(x[2:], t[2:], context=context[2:])])
    tol = 2e-2 if fast else 1e-5
    assert _rel(out.float(), whole.float()) < tol and _rel(out.float(), apart.float()) < tol
    assert not torch.equal(out[:2], out[2:])  # the contexts differ, so do the halves
    hook.remove()
    x2 = x.clone()
    x2[3] += 1e-3
    with torch.no_grad():
        assert SDUNet.twin_halves(x2, t) == 0 and SDUNet.twin_halves(x, torch.tensor([1.0, 2.0, 3.0, 4.0])) == 0
        assert SDUNet.twin_halves(x[:3], t[:3]) == 0 and SDUNet.twin_halves(x, torch.tensor(5.0)) == 2
    assert SDUNet.twin_halves(x, t) == 0  # with gradients: training runs whole


def test_schedule_comes_from_the_scheduler_config(folders):
    model = load_stable_diffusion(folders["tiny-sd1"])
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(model.schedule.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=1e-12, atol=0)
    assert math.isclose(model.vae.config.scaling_factor, 0.18215)


# --------------------------------------------------------------------------- refusals: one line each, exit 2

def _file(path, tensors: dict, metadata: dict | None = None):
    from safetensors.torch import save_file

    save_file({k: torch.zeros(s) for k, s in tensors.items()}, str(path), metadata=metadata)
    return path


UNET = "model.diffusion_model."
COMPLETE = {UNET + "input_blocks.0.0.weight": (32, 4, 3, 3), "first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": (64,)}


def _sd_folder_variant(tmp_path, folders, edit):
    import shutil

    folder = shutil.copytree(folders["tiny-sd1"], tmp_path / "variant")
    edit(folder)
    return folder


def _edit_json(file, **changes):
    import json

    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


REFUSALS = {
    "sdxl-file": (lambda p, f: _file(p / "xl.safetensors", {**COMPLETE, "conditioner.embedders.0.x": (2,)}),
                  "is an SDXL checkpoint: SDXL is not supported yet"),
    "inpainting-file": (lambda p, f: _file(p / "inpaint.safetensors",
                                           {**COMPLETE, UNET + "input_blocks.0.0.weight": (32, 9, 3, 3)}),
                        "is an inpainting or other variant checkpoint (9 U-Net input channels)"),
    "lora-file": (lambda p, f: _file(p / "lora.safetensors",
                                     {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32)}),
                  "is a LoRA (adapter weights only), not a full Stable Diffusion checkpoint"),
    "ckpt-file": (lambda p, f: (p / "model.ckpt").write_bytes(b"PK\x03\x04 pickle") and p / "model.ckpt",
                  "reverie loads only .safetensors checkpoints"),
    "truncated-file": (lambda p, f: (p / "cut.safetensors").write_bytes(
                           (f["tiny-sd1"] / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()[:5000])
                       and p / "cut.safetensors", "is damaged or not a safetensors file"),
    "foreign-file": (lambda p, f: _file(p / "other.safetensors", {"net.conv_in.weight": (8, 3, 3, 3)}),
                     "is not a Stable Diffusion checkpoint: no model.diffusion_model.* tensors"),
    "vae-only-file": (lambda p, f: _file(p / "vae.safetensors", {k: v for k, v in COMPLETE.items()
                                                                 if not k.startswith("cond_stage_model.")}),
                      "lacks the text encoder (cond_stage_model.* tensors)"),
    "incomplete-file": (lambda p, f: _file(p / "part.safetensors", COMPLETE),
                        "is not a complete SD 1.x / 2.x checkpoint"),
    "sdxl-folder": (lambda p, f: _sd_folder_variant(p, f, lambda d: (d / "text_encoder_2").mkdir()),
                    "is an SDXL pipeline"),
    "inpainting-folder": (lambda p, f: _sd_folder_variant(p, f, lambda d: _edit_json(d / "unet" / "config.json",
                                                                                      in_channels=9)),
                          "is an inpainting or other variant U-Net (9 input channels)"),
    "pickled-folder": (lambda p, f: _sd_folder_variant(p, f, lambda d: (
                           d / "vae" / "diffusion_pytorch_model.safetensors").rename(d / "vae" / "model.bin")),
                       "holds only pickled weights (.bin), which reverie does not load"),
    "no-text-encoder-folder": (lambda p, f: _sd_folder_variant(
                                   p, f, lambda d: __import__("shutil").rmtree(d / "text_encoder")),
                               "text_encoder/ is missing"),
    "damaged-unet-config": (lambda p, f: _sd_folder_variant(p, f, lambda d: (d / "unet" / "config.json")
                                                            .write_text('{"block_out_channels": [32, 64]}')),
                            "unet/config.json is damaged: missing 'down_block_types'"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_with_one_line(folders, tmp_path, capsys, case):
    from reverie.cli import main

    make, expected = REFUSALS[case]
    path = make(tmp_path, folders)
    code = main(["generate", "x", "--model", str(path), "-o", str(tmp_path / "out.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("reverie: error: ")
    assert expected in err, err
    assert not (tmp_path / "out.png").exists()


def test_cli_generate_writes_size_and_settings(folders, tmp_path, capsys):
    import json

    from PIL import Image

    from reverie.cli import main

    out = tmp_path / "sd.png"
    assert main(["generate", "a red circle", "--model", str(folders["tiny-sd1"]), "--width", "24", "--num-images", "1",
                 "--steps", "2", "--negative-prompt", "blurry", "--seed", "7", "-o", str(out), "--quiet"]) == 0
    with Image.open(out) as im:
        meta = json.loads(im.text["reverie"])
        assert im.size == (24, 24)
    assert (meta["width"], meta["height"], meta["negative_prompt"], meta["seed"]) == (24, 24, "blurry", 7)
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "--model", str(folders["tiny-sd1"]), "-o", str(again)]) == 0
    with Image.open(out) as a, Image.open(again) as b:
        assert a.tobytes() == b.tobytes()
    wide = tmp_path / "wide.png"
    assert main(["generate", "x", "--model", str(folders["tiny-sd1"]), "--width", "32", "--height", "16",
                 "--steps", "2", "--num-images", "1", "-o", str(wide), "--quiet"]) == 0
    with Image.open(wide) as im:
        assert im.size == (32, 16) and json.loads(im.text["reverie"])["height"] == 16


def test_non_square_images_match_diffusers(folders, reference):
    """A wide image: the start noise, U-Net and VAE run at the requested height and width."""
    from reverie.sd import set_image_size

    model = _load(folders["tiny-sd1"])
    set_image_size(model, 32, 16)
    ours_latents, ours_images = _reverie(model, "ddim", _grid(model, SAMPLERS["ddim"][2]))
    pipe = reference["tiny-sd1"]
    name, overrides, _ = SAMPLERS["ddim"]
    base = getattr(pipe, "saved_scheduler_config", pipe.scheduler.config)  # as saved (the fixture keeps it)
    pipe.scheduler = getattr(diffusers, name).from_config(base, **overrides)
    f = pipe.vae_scale_factor
    noise = torch.randn((1, 4, 16 // f, 32 // f), generator=torch.Generator().manual_seed(0))
    out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, latents=noise,
               height=16, width=32, output_type="pt")
    assert ours_images.shape == out.images.shape == (1, 3, 16, 32)
    assert _rel(ours_images, out.images) < RTOL


# --------------------------------------------------------------------------- large images: sliced and tiled decoding

def test_vae_decodes_one_image_at_a_time_and_in_tiles(folders):
    """Slicing decodes a batch image by image (the same numbers as one batched call), and tiling blends
    overlapping tiles so that a decoder that is local gives exactly its untiled output: checked with a decoder
    replaced by nearest upsampling, where every tile's pixels equal the whole image's."""
    import torch.nn.functional as F

    vae = load_stable_diffusion(folders["tiny-sd1"]).vae
    z = torch.randn(3, 4, 10, 10, generator=torch.Generator().manual_seed(0))
    batched = vae.decoder(vae.post_quant_conv(z))
    assert _rel(vae.decode(z), batched) < 1e-5
    assert torch.equal(vae.decode_tiled(z[:1], tile=16, overlap=4), vae.decode(z[:1]))  # one tile: the whole image
    f = vae.config.downsample_factor
    vae._decode_whole = lambda part: F.interpolate(part[:, :3], scale_factor=f) * 2 + 1
    big = torch.randn(1, 4, 37, 29, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(vae.decode_tiled(big, tile=12, overlap=4), vae._decode_whole(big), rtol=1e-6, atol=1e-6)
    vae.tile_latent, vae.tile_overlap = 12, 4
    assert vae.decode(big).shape == (1, 3, 37 * f, 29 * f)  # above tile_latent, decode tiles on its own


# --------------------------------------------------------------------------- the full SD 1.5 / SD 2.1 architectures

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd15", "sd21"])
def test_full_size_architectures_match_diffusers(tmp_path, kind):
    """The released SD 1.5 and SD 2.1 configurations with random weights (860M / 865M-parameter U-Nets, the
    12-layer CLIP ViT-L / 23-layer OpenCLIP ViT-H text towers): a 3-step guided DPM-Solver++ sample at 256 px
    matches diffusers to 1e-4, and the single-file layout loads into identical weights. Measured at 27cef7a on one
    thread of the shared 2-core Xeon: 206 s (sd15) and 141 s (sd21), 16 GB peak RSS for the two in one process
    (`pytest -m slow tests/test_sd.py -k full_size`)."""
    folder = save_sd_pipeline(kind, tmp_path / kind)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    pipe = _load(folder)
    set_image_size(pipe, 256)  # the architecture is the same at any size; 256 px keeps the test short
    ours_latents, ours_images = _reverie(pipe, "dpmpp_2m", "ddim-trailing", steps=3)
    ref_latents, ref_images = _diffusers(ref, "dpmpp_2m", steps=3, size=32)
    assert _rel(ours_latents, ref_latents) < RTOL and _rel(ours_images, ref_images) < RTOL
    del ref
    meta = {"modelspec.prediction_type": "v"} if kind == "sd21" else None
    file = to_single_file(folder, tmp_path / f"{kind}.safetensors", metadata=meta)
    (tmp_path / "tokenizer").symlink_to(folder / "tokenizer")
    from_file = _load(file)
    for a, b in ((pipe.net.net, from_file.net.net), (pipe.vae, from_file.vae),
                 (pipe.net.encoder.model, from_file.net.encoder.model)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert from_file.info["image_resolution"] == (512 if kind == "sd15" else 768)



def test_save_pretrained_refuses_a_stable_diffusion_model(folders, tmp_path):
    with pytest.raises(ValueError, match="is a Stable Diffusion checkpoint: copy its folder or file"):
        _load(folders["tiny-sd1"]).save_pretrained(tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_sd2_single_file_without_a_hint_is_a_visible_guess(folders, tmp_path, capsys):
    """An SD 2 file that says neither eps nor v loads as v with one warning naming --prediction; the argument (or
    --prediction) decides without a warning, and also overrides a folder's scheduler config."""
    import warnings

    from reverie.cli import main
    from reverie.sd import PredictionGuessWarning

    file = to_single_file(folders["tiny-sd2"], tmp_path / "sd2.safetensors")
    (tmp_path / "tokenizer").symlink_to(folders["tiny-sd2"] / "tokenizer")
    with pytest.warns(PredictionGuessWarning, match="guessed v .* pass --prediction eps"):
        assert load_stable_diffusion(file).cfg.model.prediction == "v"
    with warnings.catch_warnings():
        warnings.simplefilter("error", PredictionGuessWarning)
        eps = load_stable_diffusion(file, prediction="eps")
        sd1 = to_single_file(folders["tiny-sd1"], tmp_path / "sd1.safetensors")
        assert load_stable_diffusion(sd1).cfg.model.prediction == "eps"  # SD 1 files are eps: no guess to show
    assert eps.cfg.model.prediction == "eps" and eps.info["image_resolution"] == 512
    assert load_stable_diffusion(folders["tiny-sd2"], prediction="eps").cfg.model.prediction == "eps"
    common = ["generate", "x", "--model", str(file), "--width", "16", "--steps", "1", "--num-images", "1", "--quiet"]
    assert main([*common, "-o", str(tmp_path / "v.png")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("reverie: warning: sd2.safetensors does not say") and \
        "--prediction eps" in err[0], err
    assert main([*common, "--prediction", "eps", "-o", str(tmp_path / "eps.png")]) == 0
    assert capsys.readouterr().err == ""
    from PIL import Image  # the PNG records the prediction: --from-png reproduces it without the flag or the guess

    assert main(["generate", "--from-png", str(tmp_path / "eps.png"), "--model", str(file), "-o",
                 str(tmp_path / "again.png")]) == 0
    assert capsys.readouterr().err == ""
    with Image.open(tmp_path / "eps.png") as a, Image.open(tmp_path / "again.png") as b, \
            Image.open(tmp_path / "v.png") as v:
        assert a.tobytes() == b.tobytes() != v.tobytes()
        assert '"prediction": "eps"' in a.text["reverie"] and '"prediction": "v"' in v.text["reverie"]
    assert main(["generate", "x", "--prediction", "v", "-o", str(tmp_path / "own.png")]) == 2  # not an SD model
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "options of Stable Diffusion checkpoints" in err[0], err
