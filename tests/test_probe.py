"""Caption probes (reverie.eval.probe): the caption pairs differ in exactly the probed attribute, a
text-blind denoiser scores chance exactly, a denoiser that knows the true captions scores 1."""

import pytest
import torch

from reverie.data.shapes import parse_caption
from reverie.eval.probe import PROBES, caption_probe, probe_pairs


@pytest.mark.parametrize("kind", PROBES)
def test_pairs_differ_in_the_probed_attribute_only(kind):
    images, true, altered = probe_pairs(kind, num_images=24)
    assert images.shape == (24, 3, 32, 32) and len(true) == len(altered) == 24
    for a, b in zip(true, altered):
        pa, pb = parse_caption(a), parse_caption(b)
        assert a != b and len(pa["objects"]) == len(pb["objects"])
        diff = {key for oa, ob in zip(pa["objects"], pb["objects"]) for key in oa if oa[key] != ob[key]}
        rel_changed = pa["relations"] != pb["relations"]
        expected = {"color": ({"color"}, False), "shape": ({"shape"}, False), "position": ({"position"}, False),
                    "binding": ({"color"}, False), "relation": (set(), True)}[kind]
        assert (diff, rel_changed) == expected, (a, b)
        if kind == "binding":  # the same two colors, exchanged between two different shapes
            assert [o["color"] for o in pa["objects"]] == [o["color"] for o in pb["objects"]][::-1]
            assert pa["objects"][0]["shape"] != pa["objects"][1]["shape"]
        if kind == "relation":  # the inverse relation: left <-> right, above <-> below
            assert pb["relations"][0][1] == (1, 0, 3, 2)[pa["relations"][0][1]]
        if kind == "position":  # the cell mirrored through the center
            assert pb["objects"][0]["position"] == 8 - pa["objects"][0]["position"] != 4


def test_true_captions_describe_the_images():
    from reverie.data.shapes import ShapesDataset

    ds = ShapesDataset(min_objects=2, max_objects=2, seed=2024)
    _, true, _ = probe_pairs("relation", num_images=8)
    for k, text in enumerate(true):
        item, parsed = ds[k], parse_caption(text)
        assert [o["color"] for o in parsed["objects"]] == item["objects"]["color"][:2].tolist()
        assert [o["shape"] for o in parsed["objects"]] == item["objects"]["shape"][:2].tolist()
        assert parsed["relations"] == [(0, item["relation"], 1)]


def test_text_blind_denoiser_scores_chance_and_an_oracle_scores_one():
    def blind(x, sigma, text):
        return x / (1 + sigma[:, None, None, None] ** 2)

    res = caption_probe(blind, kinds=("relation", "color"), num_images=16, sigmas=(1.0, 4.0), progress=False)
    for r in res["probes"].values():
        assert r["accuracy"] == [0.5, 0.5] and r["error_ratio"] == pytest.approx([1.0, 1.0])

    known = {}
    for kind in ("position", "binding"):
        images, true, _ = probe_pairs(kind, num_images=16)
        known.update(zip(true, images))

    def oracle(x, sigma, text):  # the clean image for a true caption, a blind guess otherwise
        guess = x / (1 + sigma[:, None, None, None] ** 2)
        return torch.stack([known[t] if t in known else g for t, g in zip(text, guess)])

    res = caption_probe(oracle, kinds=("position", "binding"), num_images=16, sigmas=(0.5, 8.0), progress=False,
                        batch_size=5)
    for r in res["probes"].values():
        assert r["accuracy"] == [1.0, 1.0] and min(r["error_ratio"]) > 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown probe"):
        probe_pairs("size")
    with pytest.raises(ValueError):
        probe_pairs("color", num_images=0)
    with pytest.raises(ValueError, match="positive sigmas"):
        caption_probe(lambda x, s, text: x, sigmas=(0.0,))


def test_denoiser_sees_ve_noise_the_same_for_both_captions_and_probes_are_independent():
    """x = x0 + sigma * n with n ~ N(0, I), sigma [B]; the true and altered captions see the same x; a probe's
    noise does not depend on which other probes ran."""
    images, true, _ = probe_pairs("relation", num_images=32)
    x0 = dict(zip(true, images))
    calls = []

    def recording(x, sigma, text):
        calls.append((x.clone(), sigma.clone(), list(text)))
        return x / (1 + sigma[:, None, None, None] ** 2) + 0.01 * torch.tensor([len(t) % 3 for t in text])[:, None,
                                                                                                          None, None]

    sigma = 3.0
    alone = caption_probe(recording, kinds=("relation",), num_images=32, sigmas=(sigma,), progress=False)
    (x_true, s_true, texts), (x_alt, _, _) = calls
    assert s_true.shape == (32,) and torch.all(s_true == sigma) and torch.equal(x_true, x_alt)
    noise = (x_true - torch.stack([x0[t] for t in texts])) / sigma
    assert abs(noise.mean().item()) < 0.02 and abs(noise.std().item() - 1) < 0.02
    both = caption_probe(recording, kinds=("color", "relation"), num_images=32, sigmas=(sigma,), progress=False)
    assert both["probes"]["relation"] == alone["probes"]["relation"]


def test_pairs_follow_a_restricted_vocabulary():
    from reverie.data.shapes import COLORS

    _, true, altered = probe_pairs("color", num_images=20, colors=["red", "blue", "white"], resolution=16)
    allowed = {list(COLORS).index(c) for c in ("red", "blue", "white")}
    for text in true + altered:
        assert parse_caption(text)["objects"][0]["color"] in allowed
