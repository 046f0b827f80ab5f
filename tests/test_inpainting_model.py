"""Mask-aware inpainting models (issue 21 (b)): zero-initialized mask channels that start as the base model,
the masked-image/mask condition (diffusers' convention as the reference), random training masks, inpainting
and plain generation with such a model, its model directory, and one line for each bad input."""

import json

import pytest
import torch
from PIL import Image

from helpers import RGB16, TEXT_MODEL, cli, tiny_config, tiny_network
from reverie.build import DiffusionModel, build_network
from reverie.conditioning import inpaint_condition
from reverie.configs import ConfigError, load_config
from reverie.data.masks import box_pixels, training_masks
from reverie.data.shapes import BACKGROUND_NAMES, BACKGROUNDS, ShapesDataset, render_array, render_object_masks
from reverie.editing import inpaint, inpaint_method
from reverie.pipeline import Pipeline
from reverie.sampling import SamplingOptions, sample_images
from reverie.train.config import TrainConfig
from reverie.train.data import collate
from reverie.train.diffusion import init_weights

INPAINT = (*TEXT_MODEL, "--model.inpainting=true")
PROMPTS = ["a red circle", "a blue square"]


def _mask_aware(seed: int = 0, move: float = 0.3) -> DiffusionModel:
    """A tiny mask-aware model whose mask channels matter (their zero-initialized weights moved)."""
    cfg = tiny_config(*INPAINT, "--model.prediction=v")
    net = tiny_network(cfg, RGB16, seed=seed).eval()
    with torch.no_grad():
        net.net.inpaint_in.weight.normal_(0, move, generator=torch.Generator().manual_seed(seed))
    return DiffusionModel(net, cfg, RGB16)


@pytest.fixture(scope="module")
def model():
    return _mask_aware()


@pytest.fixture()
def scene():
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mask = torch.zeros(16, 16)
    mask[4:10, 3:12] = 1
    return images, mask


# ------------------------------------------------------------------------------------ network and condition

def test_zero_initialized_mask_channels_start_as_the_base_model(make_model_dir):
    base_dir = make_model_dir("base", TEXT_MODEL, RGB16)
    base = Pipeline.from_pretrained(base_dir).net
    net = tiny_network(tiny_config(*INPAINT), RGB16, seed=1, perturb=0).eval()
    assert net.net.config.inpaint_channels == 4
    assert init_weights(net, base_dir) == ["net.inpaint_in"]
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 700.0])
    condition = inpaint_condition(torch.rand(2, 3, 16, 16) * 2 - 1, (torch.rand(2, 1, 16, 16) > 0.5).float())
    with torch.no_grad():
        want = base(x, t, text=PROMPTS)
        assert torch.equal(net(x, t, text=PROMPTS, inpaint=condition), want)
        # once trained, the condition moves the output
        net.net.inpaint_in.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        assert not torch.allclose(net(x, t, text=PROMPTS, inpaint=condition), want)


def test_mask_channels_are_extra_input_channels_of_the_first_convolution():
    """conv_in(x) + inpaint_in(c) is one 3x3 convolution over [x, c]: the issue's "extra input channels"."""
    net = _mask_aware().net.net
    x, c = torch.randn(2, 3, 16, 16), torch.randn(2, 4, 16, 16)
    joint = torch.nn.functional.conv2d(torch.cat([x, c], 1), torch.cat([net.conv_in.weight, net.inpaint_in.weight], 1),
                                       net.conv_in.bias + net.inpaint_in.bias, padding=1)
    with torch.no_grad():
        assert torch.allclose(net.conv_in(x) + net.inpaint_in(c), joint, atol=1e-5)


def test_condition_follows_diffusers_masks(model):
    """White = repaint; the masked image is zero under the mask: what diffusers' inpainting pipeline builds
    (``init_image * (mask_condition < 0.5)``, the mask from its mask processor) from the same PIL mask."""
    diffusers = pytest.importorskip("diffusers")
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pil = Image.new("L", (16, 16), 0)
    pil.paste(255, (3, 4, 12, 10))  # x0, y0, x1, y1
    processor = diffusers.image_processor.VaeImageProcessor(do_normalize=False, do_binarize=True,
                                                            do_convert_grayscale=True)
    theirs = processor.preprocess(pil, height=16, width=16)
    ours = Pipeline(model.net, model.cfg, model.info)._images(pil)[:, :1]  # how Pipeline.inpaint reads a mask
    mask = ((ours + 1) / 2 > 0.5).float()
    assert torch.equal(mask, theirs) and float(mask[0, 0, 4, 3]) == 1 and float(mask[0, 0, 10, 3]) == 0
    condition = inpaint_condition(image, mask)
    assert condition.shape == (1, 4, 16, 16)
    assert torch.equal(condition[:, :3], image * (theirs < 0.5)) and torch.equal(condition[:, 3:], mask)
    assert bool((condition[:, :3][mask.expand(-1, 3, -1, -1) == 1] == 0).all())


def test_network_refuses_a_missing_or_misshapen_condition(model):
    net, x, t = model.net, torch.randn(1, 3, 16, 16), torch.tensor([5.0])
    cond = net.encode(["a"])
    with pytest.raises(ValueError, match="inpaint"):
        net(x, t, **cond)
    with pytest.raises(ValueError, match=r"must be \(1, 4, 16, 16\)"):
        net(x, t, inpaint=torch.zeros(1, 3, 16, 16), **cond)


# ------------------------------------------------------------------------------------------------ masks

def test_object_masks_are_the_rendered_objects():
    ds = ShapesDataset(resolution=32, max_objects=2, min_objects=2, gradient_prob=0.0, object_masks=True)
    for i in range(6):
        item, (scene, _) = ds[i], ds.scene(i)
        masks = item["object_masks"]
        assert masks.shape == (3, 32, 32) and float(masks[2].abs().sum()) == 0  # two objects, the third padded
        assert torch.equal(masks, torch.from_numpy(render_object_masks(scene, 32)))
        pixels = torch.from_numpy(render_array(scene, 32)).float()
        background = torch.tensor(BACKGROUNDS[BACKGROUND_NAMES[scene.background]], dtype=torch.float32)
        uncovered = masks.sum(0) == 0
        assert torch.equal(pixels[uncovered], background.expand(int(uncovered.sum()), 3))  # nothing drawn outside
        assert bool(((pixels - background).abs().sum(-1)[masks.sum(0) == 1] > 0).all())  # all drawn inside


def test_training_masks_mix_the_kinds():
    ds = ShapesDataset(resolution=32, max_objects=2, min_objects=2, object_masks=True)
    batch = collate([ds[i] for i in range(64)])
    shares = {"object": 0.5, "box": 0.2, "strokes": 0.2, "full": 0.1}
    masks = training_masks(batch, 32, torch.Generator().manual_seed(0), shares)
    again = training_masks(batch, 32, torch.Generator().manual_seed(0), shares)
    assert masks.shape == (64, 1, 32, 32) and torch.equal(masks, again)
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    area = masks.flatten(1).mean(1)
    assert bool((area > 0).all()) and 2 <= int((area == 1).sum()) <= 14  # ~10 % full masks
    objects_only = training_masks(batch, 32, torch.Generator().manual_seed(1), {"object": 1.0})
    for b in range(64):  # each covers one object: its silhouette, or its box (pixel centers inside)
        covers = [bool((objects_only[b, 0][batch["object_masks"][b, k] > 0] == 1).all())
                  or bool((objects_only[b, 0][box_pixels(box, 32) == 1] == 1).all())
                  for k, (_, box) in enumerate(batch["layout"][b])]
        assert any(covers) and float(objects_only[b].mean()) < 0.6
    boxes = training_masks({"image": torch.zeros(8, 3, 32, 32)}, 32, torch.Generator(), {"object": 1.0})
    assert bool((boxes.flatten(1).sum(1) > 0).all())  # no objects known: a random box instead


# ------------------------------------------------------------------------------------------ inpainting

def test_inpaint_uses_the_mask_channels_and_keeps_the_unmasked_pixels(model, scene):
    images, mask = scene
    assert model.takes_masks and inpaint_method(model) == "model"
    out = inpaint(model, images, mask, PROMPTS, steps=4, guidance_scale=3.0, seed=5)
    keep = mask == 0
    assert torch.equal(out[:, :, keep], images[:, :, keep])
    assert torch.equal(out, inpaint(model, images, mask, PROMPTS, steps=4, guidance_scale=3.0, seed=5))
    repainted = inpaint(model, images, mask, PROMPTS, steps=4, guidance_scale=3.0, seed=5, method="repaint")
    assert torch.equal(repainted[:, :, keep], images[:, :, keep]) and not torch.equal(repainted, out)
    # the known pixels reach the network: other pixels outside the mask give another fill
    other = images.clone()
    other[:, :, keep] = -other[:, :, keep]
    moved = inpaint(model, other, mask, PROMPTS, steps=4, guidance_scale=3.0, seed=5)
    assert not torch.allclose(moved[:, :, ~keep], out[:, :, ~keep])


def test_blending_puts_the_known_region_back_at_each_level(model, scene):
    images, mask = scene
    keep, seen = mask == 0, []

    def look(step):
        seen.append((step.sigma_next, (step.x - images)[:, :, keep]))

    blended = inpaint(model, images, mask, PROMPTS, steps=4, seed=5, callback=look)
    assert len(seen) == 4 and seen[-1][0] == 0 and float(seen[-1][1].abs().max()) == 0
    for sigma, diff in seen[:-1]:  # known + sigma z: the known region noised to the step's level
        assert abs(float((diff / sigma).std()) - 1) < 0.1
    alone = inpaint(model, images, mask, PROMPTS, steps=4, seed=5, blend=False)
    assert torch.equal(alone[:, :, keep], images[:, :, keep]) and not torch.equal(alone, blended)


def test_plain_generation_is_an_all_ones_mask(model):
    options = SamplingOptions(steps=3, seed=1, guidance_scale=2.0)
    plain = sample_images(model, 2, options, prompts=PROMPTS)
    from reverie.sampling import run_sampler, sigma_grid, start_noise

    sigmas = sigma_grid(model, 3, options.resolve(model.cfg).grid)
    x = start_noise(model, 2, float(sigmas[0]), torch.Generator().manual_seed(1))
    everything = inpaint_condition(torch.zeros(2, 3, 16, 16), torch.ones(2, 1, 16, 16))
    given = run_sampler(model, x, sigmas, options.resolve(model.cfg), PROMPTS, inpaint=everything).clamp(-1, 1)
    assert torch.equal(plain, given)


def test_a_mask_aware_model_directory_round_trips(model, tmp_path, capsys):
    from reverie.build import save_diffusion

    path = save_diffusion(tmp_path / "inp", model.cfg, model.info, model.net)
    config = json.loads((path / "config.json").read_text())
    assert config["train_config"]["model"]["inpainting"] is True and config["network"]["inpaint_channels"] == 4
    pipe = Pipeline.from_pretrained(path)
    assert pipe.takes_masks
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = box_pixels((0.2, 0.2, 0.7, 0.6), 16)
    assert torch.equal(pipe.inpaint(images, mask, "a red circle", steps=3, seed=2),
                       inpaint(model, images, mask, "a red circle", steps=3, seed=2))
    assert len(pipe.generate("a red circle", steps=2)) == 1
    assert cli(["inspect", str(path)]) == 0
    assert "inpainting: mask-aware" in capsys.readouterr().out


def test_inpaint_command_records_the_method_and_reproduces(model, tmp_path):
    from reverie.build import save_diffusion
    from reverie.images import to_pil

    path = save_diffusion(tmp_path / "inp", model.cfg, model.info, model.net)
    image = tmp_path / "in.png"
    to_pil(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1)[0].save(image)
    out, again = tmp_path / "out.png", tmp_path / "again.png"
    assert cli(["inpaint", str(image), "a red circle", "--box", "2,3,9,12", "--model", str(path), "--steps", "3",
                "-o", str(out)]) == 0
    with Image.open(out) as im:
        meta = json.loads(im.text["reverie"])
    assert meta["method"] == "model" and "resample" not in meta
    assert cli(["inpaint", "--from-png", str(out), "--model", str(path), "-o", str(again)]) == 0
    with Image.open(out) as a, Image.open(again) as b:
        assert a.tobytes() == b.tobytes()


# -------------------------------------------------------------------------------------------- bad input

def test_bad_inputs_get_one_line(make_model_dir, tmp_path, capsys):
    plain = DiffusionModel(tiny_network(tiny_config(*TEXT_MODEL), RGB16), tiny_config(*TEXT_MODEL), RGB16)
    with pytest.raises(ValueError, match="needs a mask-aware inpainting model"):
        inpaint_method(plain, "model")
    with pytest.raises(ValueError, match="unknown inpainting method"):
        inpaint_method(plain, "magic")
    for overrides, message in (((*INPAINT, "--model.network=dit-s-2"), "needs a U-Net"),
                               ((*INPAINT, "--model.autoencoder=vae"), "pixel-space"),
                               ((*INPAINT, "--train.mask_kinds={blob: 1}"), "mask_kinds"),
                               ((*INPAINT, "--train.mask_kinds={box: 0}"), "mask_kinds")):
        with pytest.raises(ConfigError, match=message):
            load_config(TrainConfig, None, list(overrides))
    model_dir = make_model_dir("plain", TEXT_MODEL, RGB16)
    image = tmp_path / "in.png"
    Image.new("RGB", (16, 16), (10, 20, 30)).save(image)
    code = cli(["inpaint", str(image), "x", "--box", "2,2,8,8", "--method", "model", "--model", str(model_dir),
                "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2 and "mask-aware" in err and len(err.strip().splitlines()) == 1


def test_fine_tuning_trains_the_mask_channels(make_model_dir, tmp_path):
    from reverie.train import train

    src = make_model_dir("text", TEXT_MODEL, RGB16)
    cfg = tiny_config(*INPAINT, "--data.batch_size=4", "--train.progress=false", "--sample.every=0",
                      "--train.steps=2", f"--train.out_dir={tmp_path / 'run'}", f"--train.init_from={src}",
                      "--train.checkpoint_every=0", "--data.options={max_objects: 2, object_masks: true}",
                      "--optim.warmup_steps=0", "--optim.lr=1e-2")
    result = train(cfg, resume=False)
    assert result.step == 2 and float(result.model.net.inpaint_in.weight.detach().abs().sum()) > 0
    assert Pipeline.from_pretrained(result.export_dir).takes_masks


def test_build_network_adds_one_mask_channel_to_the_image_channels():
    cfg = tiny_config(*INPAINT)
    assert build_network(cfg, {"in_channels": 1, "resolution": 16, "num_classes": 0}).net.config.inpaint_channels == 2


def test_reproducing_a_png_without_model_loads_the_shipped_model_it_names(tmp_path):
    from types import SimpleNamespace

    from reverie.cli.common import DEFAULT_MODEL
    from reverie.cli.edit import _model_dir

    given, default = SimpleNamespace(model=str(tmp_path)), tmp_path / "default"
    assert _model_dir(given, {"model": "shapes-t2i"}, default) == tmp_path  # --model wins
    none = SimpleNamespace(model=None)
    assert _model_dir(none, {"model": "shapes-t2i"}, default) == DEFAULT_MODEL
    for named in ("", "no-such-model", "../shapes-t2i", "shapes-t2i/../shapes-t2i"):
        assert _model_dir(none, {"model": named}, default) == default


def test_the_prompt_may_follow_the_options(model, tmp_path):
    """The issue's form `reverie inpaint IMAGE --mask MASK.png "a yellow star"` (argparse alone rejected it)."""
    from reverie.build import save_diffusion
    from reverie.images import to_pil

    path = save_diffusion(tmp_path / "inp", model.cfg, model.info, model.net)
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    to_pil(torch.zeros(1, 3, 16, 16))[0].save(image)
    Image.fromarray((box_pixels((0.2, 0.2, 0.6, 0.6), 16).numpy() * 255).astype("uint8")).save(mask)
    for n, argv in enumerate((["inpaint", str(image), "--mask", str(mask), "a yellow star"],
                              ["inpaint", "--mask", str(mask), str(image), "a yellow star"])):
        out = tmp_path / f"o{n}.png"
        assert cli([*argv, "--model", str(path), "--steps", "2", "-o", str(out)]) == 0
        with Image.open(out) as im:
            assert json.loads(im.text["reverie"])["prompt"] == "a yellow star"
    assert cli(["inpaint", str(image), "--mask", str(mask), "a", "b", "--model", str(path), "-o",
                str(tmp_path / "x.png")]) == 2
