"""Text-to-video (issue 25): the space-time U-Net, moving-shapes data, GIF files and ``reverie generate-video``."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import NET, TEXT, cli
from reverie.conditioning import TextConditionedNet
from reverie.data.moving_shapes import (
    DIRECTIONS,
    MOTIONS,
    MovingShapesDataset,
    is_held_out,
    parse_motion_caption,
    plan_motion_layout,
)
from reverie.layout import is_clip_layout
from reverie.nets import UNet, UNetConfig, VideoUNet, VideoUNetConfig, create_network
from reverie.text import get_text_encoder
from reverie.video import clip_frames, read_frames, read_video_parameters, save_video

SMALL = dict(model_channels=8, channel_mult=(1, 2), attention_resolutions=(8,), head_channels=8, norm_groups=8,
             num_res_blocks=1, sample_size=16, context_dim=16, pooled_dim=16, spatial_channels=4)
VIDEO_MODEL = ("--model.network=video-unet-tiny", f"--model.network_overrides={NET}", "--model.conditioning=text",
               f"--model.text_encoder_options={TEXT}", "--data.resolution=16", "--data.name=moving_shapes",
               "--model.layout_channels=4")
VIDEO16 = {"in_channels": 3, "resolution": 16, "num_classes": 0, "frames": 4}


def perturbed(net: torch.nn.Module, seed: int, scale: float = 0.05, only: str = "") -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if only in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return net


def image_and_video(temporal: str = "both") -> tuple[UNet, VideoUNet]:
    """A random (perturbed) image U-Net and the video U-Net that starts from its weights."""
    torch.manual_seed(0)
    image = perturbed(UNet(UNetConfig(**SMALL)), seed=0)
    video = VideoUNet(VideoUNetConfig(**SMALL, temporal=temporal))
    missing, unexpected = video.load_state_dict(image.state_dict(), strict=False)
    assert not unexpected and missing and all(".temporal." in k for k in missing)
    return image, video


def clip_inputs(batch: int = 2, frames: int = 4, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 3, frames, 16, 16, generator=g), "c_noise": torch.tensor([3.0, 700.0])[:batch],
            "context": torch.randn(batch, 5, 16, generator=g), "pooled": torch.randn(batch, 16, generator=g),
            "spatial": torch.randn(batch, 4, frames, 16, 16, generator=g)}


@pytest.mark.parametrize("temporal", ["both", "attention", "conv"])
def test_video_unet_at_initialization_is_the_image_unet_on_every_frame(temporal):
    image, video = image_and_video(temporal)
    inp = clip_inputs()
    with torch.no_grad():
        out = video(inp["x"], inp["c_noise"], context=inp["context"], pooled=inp["pooled"], spatial=inp["spatial"])
        frames = [image(inp["x"][:, :, t], inp["c_noise"], context=inp["context"], pooled=inp["pooled"],
                        spatial=inp["spatial"][:, :, t]) for t in range(inp["x"].shape[2])]
    assert out.shape == inp["x"].shape
    torch.testing.assert_close(out, torch.stack(frames, dim=2), rtol=0, atol=1e-6)
    assert float(torch.stack(frames).std()) > 1e-3  # the comparison is not between zeros


def test_temporal_layers_mix_frames_once_trained_and_only_then():
    _, video = image_and_video()
    inp = clip_inputs(batch=1)
    changed = inp["x"].clone()
    changed[:, :, 0] += 1.0  # only frame 0 differs

    def last_frame(net, x):
        with torch.no_grad():
            return net(x, inp["c_noise"], context=inp["context"], pooled=inp["pooled"])[:, :, -1]

    # at zero the frames are independent: frame 3 ignores frame 0
    torch.testing.assert_close(last_frame(video, inp["x"]), last_frame(video, changed), rtol=0, atol=0)
    perturbed(video, seed=5, scale=0.2, only=".temporal.")  # a training-like move of the temporal layers
    assert float((last_frame(video, inp["x"]) - last_frame(video, changed)).abs().max()) > 1e-4
    # images (4-D) skip the temporal layers: still the image network
    image, _ = image_and_video()
    x = inp["x"][:, :, 0]
    with torch.no_grad():
        cond = {"context": inp["context"], "pooled": inp["pooled"]}
        torch.testing.assert_close(video(x, inp["c_noise"], **cond), image(x, inp["c_noise"], **cond), rtol=0, atol=0)


def test_video_config_round_trips_and_frame_order_matters_to_attention():
    cfg = VideoUNetConfig(**SMALL, temporal="attention")
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["arch"] == "video-unet" and create_network(d).config == cfg
    assert cfg.image_config() == UNetConfig(**SMALL)
    with pytest.raises(ValueError, match="temporal must be one of"):
        VideoUNetConfig(**SMALL, temporal="lstm")
    video = perturbed(VideoUNet(cfg), seed=2, scale=0.2)
    inp = clip_inputs(batch=1)
    with torch.no_grad():
        out = video(inp["x"], inp["c_noise"], context=inp["context"], pooled=inp["pooled"])
        rev = video(inp["x"].flip(2), inp["c_noise"], context=inp["context"], pooled=inp["pooled"])
    assert float((out.flip(2) - rev).abs().max()) > 1e-4  # frame codes: not permutation-equivariant


def test_per_frame_layouts_paint_one_map_per_frame():
    torch.manual_seed(0)
    encoder = get_text_encoder({"name": "scratch", "width": 32, "depth": 1, "num_heads": 2, "pooled_dim": 16,
                                "max_length": 8, "num_buckets": 64})
    net = TextConditionedNet(VideoUNet(VideoUNetConfig(**{**SMALL, "context_dim": 32})), encoder, layout_channels=4)
    layout = plan_motion_layout("a red circle moves to the right", random.Random(0), frames=4)
    assert is_clip_layout(layout) and not is_clip_layout(layout[0])
    cond = net.encode(["a red circle moves to the right", ""], [layout, None])
    assert cond["layout_boxes"].shape == (2, 4, 4, 4) and cond["layout_mask"][0, :, 0].all()
    assert not cond["layout_mask"][1].any()
    spatial = net.layout(cond["layout_phrases"], cond["layout_boxes"], cond["layout_mask"], (16, 16))
    assert spatial.shape == (2, 4, 4, 16, 16)
    cols = [spatial[0, :, t].abs().sum(dim=(0, 1)).nonzero().float().mean() for t in range(4)]
    assert cols[0] < cols[1] < cols[2] < cols[3]  # the box moves right, frame by frame


# --------------------------------------------------------------------------------------------------- data


def test_captions_match_the_ground_truth_motion():
    data = MovingShapesDataset(resolution=16, frames=6, split="all", two_object_prob=0.4)
    kinds = set()
    for i in range(120):
        item = data[i]
        parsed = parse_motion_caption(item["text"])
        objs = item["objects"]
        assert len(parsed) == item["num_objects"], item["text"]
        for k, p in enumerate(parsed):
            assert (p["shape"], p["color"], p["motion"], p["color_end"]) == tuple(
                int(objs[key][k]) for key in ("shape", "color", "motion", "color_end")), item["text"]
            centers, radii = objs["center"][k], objs["radius"][k]
            name = MOTIONS[p["motion"]]
            kinds.add(name)
            assert (centers - radii[:, None] >= 0).all() and (centers + radii[:, None] <= 1).all()
            if name in DIRECTIONS:
                d = centers[-1] - centers[0]
                axis = 0 if DIRECTIONS[name][0] else 1
                assert float(d[axis]) * sum(DIRECTIONS[name]) >= 0.27 and float(d[1 - axis]) == 0
            elif name == "bounce":
                y = centers[:, 1]
                assert y.argmax() not in (0, len(y) - 1) and y.max() - y[0] > 0.1 and y.max() - y[-1] > 0.1
            elif name in ("grow", "shrink"):
                assert (radii[-1] > 1.5 * radii[0]) == (name == "grow") and (centers == centers[0]).all()
            elif name == "recolor":
                assert p["color_end"] != p["color"]
        if item["num_objects"] == 2:  # never overlapping
            gap = (objs["center"][0] - objs["center"][1]).norm(dim=-1) - objs["radius"][0] - objs["radius"][1]
            assert (gap >= 0.029).all()
        assert item["image"].shape == (3, 6, 16, 16) and len(item["layout"]) == 6
    assert kinds == set(MOTIONS)


def test_held_out_combos_never_train_and_are_all_the_test_split():
    train, test = MovingShapesDataset(resolution=16, split="train"), MovingShapesDataset(resolution=16, split="test")
    for data, held in ((train, False), (test, True)):
        for i in range(60):
            objs = data[i]["objects"]
            for k in range(data[i]["num_objects"]):
                assert is_held_out(int(objs["color"][k]), int(objs["shape"][k]), int(objs["motion"][k])) == held
    assert is_held_out(3, 2, MOTIONS.index("up"))  # "green triangle up", the example prompt
    assert sum(is_held_out(c, s, m) for c in range(10) for s in range(7) for m in range(len(MOTIONS))) == 73


def test_a_sample_is_a_pure_function_of_seed_and_index():
    a, b = MovingShapesDataset(resolution=16, seed=3), MovingShapesDataset(resolution=16, seed=3)
    assert a[7]["text"] == b[7]["text"] and torch.equal(a[7]["image"], b[7]["image"])
    with pytest.raises(ValueError, match="unknown motions"):
        MovingShapesDataset(motions=["spin"])


# -------------------------------------------------------------------------------------------- files and CLI


def test_gif_and_apng_round_trip_frames_and_parameters(tmp_path):
    clips = MovingShapesDataset(resolution=16, frames=5)[0]["image"][None].repeat(2, 1, 1, 1, 1)
    frames = clip_frames(clips, scale=2)
    assert len(frames) == 5 and frames[0].size == (2 * (32 + 2) + 2, 32 + 4)
    params = {"prompt": "a red circle moves to the right", "seed": 3, "steps": 20, "frames": 5}
    for name in ("a.gif", "a.png"):
        path = save_video(frames, tmp_path / name, params, fps=5)
        assert read_video_parameters(path) == params
        back = read_frames(path)
        assert len(back) == 5 and back[0].size == frames[0].size
        for got, want in zip(back, frames):  # flat colours: a shared 256-colour palette keeps them
            err = np.asarray(got, dtype=np.float32) - np.asarray(want.convert("RGB"), dtype=np.float32)
            assert float(np.abs(err).mean()) < 3.0
    with Image.open(tmp_path / "a.gif") as im:
        assert im.info["duration"] == 200 and im.info["loop"] == 0
    (tmp_path / "plain.gif").write_bytes((tmp_path / "a.gif").read_bytes().replace(b"reverie:", b"xxxxxxx:"))
    with pytest.raises(ValueError, match="no reverie generation parameters"):
        read_video_parameters(tmp_path / "plain.gif")


@pytest.fixture(scope="module")
def video_model(make_model_dir):
    return make_model_dir("tiny-video", VIDEO_MODEL, VIDEO16)


def test_generate_video_writes_a_gif_that_reproduces_itself(video_model, tmp_path, capsys):
    out = tmp_path / "v.gif"
    args = ["generate-video", "a green triangle moves up", "-o", str(out), "--model", str(video_model),
            "--steps", "2", "--num-videos", "2", "--seed", "4", "-q"]
    assert cli(args) == 0
    params = read_video_parameters(out)
    assert params["prompt"] == "a green triangle moves up" and params["steps"] == 2 and params["seed"] == 4
    assert params["num_videos"] == 2 and params["frames"] == 4 and params["layout"] == "auto"
    again = tmp_path / "again.gif"
    assert cli(["generate-video", "--from-file", str(out), "-o", str(again), "--model", str(video_model), "-q"]) == 0
    assert [f.tobytes() for f in read_frames(out)] == [f.tobytes() for f in read_frames(again)]
    assert len(read_frames(out)) == 4


@pytest.mark.parametrize("args, message", [
    (["-o", "x.txt"], "must end in .gif or .png or .apng or .mp4"),
    (["--num-videos", "99"], "--num-videos must be between 1 and 16"),
    (["--num-videos", "0"], "must be at least 1"),
    (["--steps", "-3"], "must be at least 1"),
    (["--layout", "[[1, 2]]"], "--layout"),
    (["--from-file", "missing.gif"], "missing.gif"),
    (["--fps", "0"], "--fps"),
])
def test_generate_video_bad_input_is_one_line(args, message, video_model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(["generate-video", "a red circle moves right", "--model", str(video_model), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("reverie: error:") and "\n" not in err and message in err and "Traceback" not in err


def test_generate_video_refuses_an_image_model_in_one_line(make_model_dir, tmp_path, capsys):
    from helpers import RGB16, TEXT_MODEL

    image = make_model_dir("tiny-image", TEXT_MODEL, RGB16)
    assert cli(["generate-video", "a red circle", "--model", str(image), "-o", str(tmp_path / "a.gif")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is an image model" in err and "\n" not in err


def test_moving_mnist_digits_bounce_inside_the_frame():
    from reverie.data.moving_mnist import MovingMNIST, bounce

    assert bounce(30.0, 5.0, 5, 36.0) == [30.0, 35.0, 32.0, 27.0, 22.0]  # reflected at the edge 36
    data = MovingMNIST(split="test", frames=6, length=4)
    item = data[1]
    assert item["image"].shape == (1, 6, 64, 64) and item["text"] == "" and item["positions"].shape == (2, 6, 2)
    assert (item["positions"] >= 0).all() and (item["positions"] <= 36).all()
    x, y = (int(round(float(v))) for v in item["positions"][0, 3])
    assert float(item["image"][0, 3, y:y + 28, x:x + 28].max()) > 0.5  # the digit is where its position says
    assert torch.equal(MovingMNIST(split="test", frames=6, length=4)[1]["image"], item["image"])


@pytest.mark.parametrize("command", [["generate", "a red circle", "--model"], ["sample"]])
def test_image_commands_refuse_a_video_model_in_one_line(command, video_model, tmp_path, capsys):
    assert cli([*command, str(video_model), "-o", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a video model: use reverie generate-video" in err and "\n" not in err


def test_sampling_a_video_model_without_a_prompt_or_with_one_image_layout(video_model):
    from reverie.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(video_model)
    clips = pipe.sample(2, steps=1)  # no prompt: no layout on either side of guidance
    assert clips.shape == (2, 3, 4, 16, 16)
    static = [("red circle", (0.1, 0.1, 0.5, 0.5))]  # one image layout: the same box in every frame
    assert pipe.sample(1, steps=1, prompts=["a red circle"], layouts=[static]).shape == (1, 3, 4, 16, 16)


def test_regional_prompts_follow_each_object_through_the_frames(video_model):
    from reverie.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(video_model)
    with torch.no_grad():  # make the layout matter in this untrained model; seeded: the global RNG depends on test
        # order, and some draws saturate the clamped output in the box (no change left to see)
        pipe.net.net.spatial_in.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    kw = dict(num_images=1, steps=1, guidance_scale=3.0, seed=0, prompts=["a red circle moves right"])
    # the object sits in the top-left quarter of frame 0, the bottom-right one of the last frame
    path = [[("blue square", (0.0, 0.0, 0.5, 0.5))], None, None, [("blue square", (0.5, 0.5, 1.0, 1.0))]]
    changed = (pipe.sample(**kw, layouts=[path]) - pipe.sample(**kw, layouts=[path], regional=True)).abs()
    changed = changed.amax(dim=(0, 1)) > 1e-5  # (T, H, W)
    assert changed[0, :8, :8].any() and not changed[0, 10:, :].any() and not changed[0, :, 10:].any()
    assert changed[3, 8:, 8:].any() and not changed[3, :6, :].any() and not changed[3, :, :6].any()
    assert not changed[1:3].any()  # frames without the object: the whole prompt's estimate alone


def test_mp4_without_ffmpeg_is_one_clear_error(tmp_path, monkeypatch):
    import reverie.video as video

    monkeypatch.setattr(video.shutil, "which", lambda name: None)
    frames = [Image.new("RGB", (8, 8))] * 2
    with pytest.raises(ValueError, match="needs ffmpeg on the PATH"):
        save_video(frames, tmp_path / "a.mp4", {"prompt": "x"})
    assert not (tmp_path / "a.json").exists()


def test_frame_noise_is_randn_at_zero_and_shares_rho_of_each_frames_variance():
    from reverie.process import frame_noise

    shape = (2, 3, 4, 8, 8)
    assert torch.equal(frame_noise(shape, 0.0, torch.Generator().manual_seed(3)),
                       torch.randn(shape, generator=torch.Generator().manual_seed(3)))
    n = frame_noise((4000, 1, 3, 2, 2), 0.6, torch.Generator().manual_seed(0))
    a, b = n[:, :, 0].flatten(), n[:, :, 2].flatten()  # 16,000 draws of two frames of a clip
    assert abs(float(a.var()) - 1) < 0.05 and abs(float(b.var()) - 1) < 0.05
    assert abs(float((a * b).mean()) - 0.6) < 0.04  # iid frames would give 0 +- 0.01
    with pytest.raises(ValueError, match=r"needs clips \(B, C, T, H, W\)"):
        frame_noise((2, 3, 8, 8), 0.5)


def test_a_video_model_with_frame_noise_correlation_starts_from_correlated_noise(make_model_dir):
    from reverie.pipeline import Pipeline
    from reverie.sampling import start_noise

    path = make_model_dir("pyoco", (*VIDEO_MODEL, "--model.frame_noise_correlation=0.9"), VIDEO16)
    model = Pipeline.from_pretrained(path)
    assert model.cfg.model.frame_noise_correlation == 0.9  # stored in config.json, read back
    x = start_noise(model, 64, 1.0, torch.Generator().manual_seed(0))  # scaled by sqrt(1 + 1) (VP)
    frames = x.transpose(1, 2).flatten(2) / 2 ** 0.5  # (B, T, C*H*W)
    corr = (frames[:, 0] * frames[:, 3]).mean()
    assert 0.8 < float(corr) < 1.0


def _square_clip(xs: list[int], y: int = 10, side: int = 4, size: int = 32) -> torch.Tensor:
    """One clip (1, 1, T, size, size) in [-1, 1]: a white ``side`` square at column xs[t], row y."""
    clip = -torch.ones(1, 1, len(xs), size, size)
    for t, x in enumerate(xs):
        clip[0, 0, t, y:y + side, x:x + side] = 1
    return clip


def test_clip_statistics_measure_ink_motion_and_jerk_exactly():
    from statistics import mean, stdev

    from reverie.eval.motion import clip_statistics

    still = clip_statistics(_square_clip([5] * 6))
    assert still == {"ink_drift": [0.0], "motion": [0.0], "jerk_px": [0.0]}
    straight = clip_statistics(_square_clip([2, 5, 8, 11, 14, 17]))  # constant velocity: no acceleration
    # each step uncovers 3 columns of 4 pixels and covers 3 more: 24 of 1,024 pixels change by 1
    assert straight["motion"][0] == pytest.approx(24 / 1024) and straight["jerk_px"][0] == pytest.approx(0, abs=1e-5)
    assert straight["ink_drift"][0] == pytest.approx(0, abs=1e-6)
    bounce = clip_statistics(_square_clip([2, 5, 8, 11, 8, 5]))  # one reflection: |8 - 2 * 11 + 8| = 6 over 4 terms
    assert bounce["jerk_px"][0] == pytest.approx(6 / 4, abs=1e-4) and bounce["motion"][0] == pytest.approx(24 / 1024)
    vanish = _square_clip([2, 5, 8, 11, 14, 17])
    vanish[:, :, 2] = -1  # the square is gone from frame 2
    ink = [16, 16, 0, 16, 16, 16]
    assert clip_statistics(vanish)["ink_drift"][0] == pytest.approx(stdev(ink) / mean(ink), rel=1e-5)
    batch = clip_statistics(torch.cat([_square_clip([5] * 6), _square_clip([2, 5, 8, 11, 8, 5])]))
    assert batch["jerk_px"] == pytest.approx([0.0, 1.5], abs=1e-4)  # one value per clip, in order
    with pytest.raises(ValueError, match="one-channel clips"):
        clip_statistics(torch.zeros(1, 3, 6, 32, 32))
