"""`reverie eval`: FID/KID/PR and NLL wiring (seeds, reference split, JSON) against direct computations.

The Inception network is replaced by a cheap pixel-statistics feature map so that these tests check the
plumbing; tests/test_fid.py checks the metrics themselves and the real network.
"""

import json

import pytest
import torch

import reverie.eval.fid as fid
from helpers import cli
from reverie.cli import main
from reverie.pipeline import Pipeline

NET = "{model_channels: 8, channel_mult: [1, 2], attention_resolutions: [4], head_channels: 8}"


def _features(images):
    flat = images.flatten(1)
    return torch.stack([flat.mean(1), flat.std(1), flat[:, ::7].mean(1)], 1).double()


@pytest.fixture()
def cheap_features(monkeypatch, tmp_path):
    monkeypatch.setenv("REVERIE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fid, "get_inception", lambda *a, **k: _features)
    # reverie.eval.evaluate imported the name: replace it there too (whether or not it is imported yet)
    monkeypatch.setattr("reverie.eval.evaluate.get_inception", lambda *a, **k: _features)


@pytest.fixture(scope="module")
def digits_model(make_model_dir):
    return make_model_dir("tiny-digits", [f"--model.network_overrides={NET}", "--data.name=digits",
                                          "--data.resolution=8", "--model.prediction=eps"],
                          {"in_channels": 1, "resolution": 8, "num_classes": 10})


def test_eval_fid_kid_pr_match_a_direct_computation(digits_model, cheap_features, tmp_path, capsys):
    out = tmp_path / "eval.json"
    args = ["eval", str(digits_model), "--metrics", "fid,kid,pr", "--n", "30", "--ref-n", "50",
            "--batch-size", "12", "--steps", "3", "--sampler", "euler", "--seed", "5", "--json", str(out)]
    assert main(args) == 0
    res = json.loads(out.read_text())
    assert res["n"] == 30 and res["n_ref"] == 50 and res["reference"] == "digits test"
    printed = capsys.readouterr().out
    assert "FID" in printed and "30 samples vs 50 digits test images" in printed

    pipe = Pipeline.from_pretrained(digits_model)
    ref = fid.dataset_reference("digits", resolution=8, n=50, split="test")
    feats = fid.sample_features(lambda k, s: pipe.sample(k, steps=3, sampler="euler", seed=s), 30, batch_size=12,
                                seed=5, progress=False)
    direct = fid.evaluate_samples(feats, ref)
    assert res["fid"] == pytest.approx(direct["fid"], rel=1e-9)
    assert res["kid"] == pytest.approx(direct["kid"], rel=1e-9)
    assert (res["precision"], res["recall"]) == (direct["precision"], direct["recall"])
    # The reference is the test split, not the training images.
    train_ref = fid.dataset_reference("digits", resolution=8, n=50, split="train")
    assert not torch.equal(train_ref.mu, ref.mu)


def test_eval_grid_option_samples_on_that_grid(digits_model, cheap_features, tmp_path):
    out = tmp_path / "eval.json"
    common = ["--metrics", "fid", "--n", "12", "--ref-n", "40", "--steps", "3", "--sampler", "euler"]
    assert main(["eval", str(digits_model), *common, "--grid", "ddim-trailing", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["grid"] == "ddim-trailing"
    pipe = Pipeline.from_pretrained(digits_model)
    ref = fid.dataset_reference("digits", resolution=8, n=40, split="test")

    def direct(grid):
        feats = fid.sample_features(lambda k, s: pipe.sample(k, steps=3, sampler="euler", seed=s, grid=grid), 12,
                                    batch_size=100, seed=0, progress=False)
        return fid.evaluate_samples(feats, ref, ("fid",))["fid"]

    assert res["fid"] == pytest.approx(direct("ddim-trailing"), rel=1e-9)
    assert res["fid"] != pytest.approx(direct("karras"), rel=1e-6)  # the option really changed the grid


def test_eval_watermark_samples_from_the_keys_tree_ring_noise(digits_model, cheap_features, tmp_path, monkeypatch):
    from reverie.provenance import watermark_noise

    key = "ab" * 16
    monkeypatch.setenv("REVERIE_WATERMARK_KEY", key)
    out, common = tmp_path / "eval.json", ["--metrics", "fid", "--n", "12", "--ref-n", "40", "--steps", "3",
                                           "--sampler", "euler", "--batch-size", "5"]
    assert main(["eval", str(digits_model), *common, "--watermark", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["watermark"] == "tree-ring"
    pipe = Pipeline.from_pretrained(digits_model)
    ref = fid.dataset_reference("digits", resolution=8, n=40, split="test")

    def direct(marked):
        def draw(k, s):
            noise = watermark_noise(pipe, k, s, key=bytes.fromhex(key))[0] if marked else None
            return pipe.sample(k, steps=3, sampler="euler", seed=s, noise=noise)
        return fid.evaluate_samples(fid.sample_features(draw, 12, batch_size=5, seed=0, progress=False), ref,
                                    ("fid",))["fid"]

    assert res["fid"] == pytest.approx(direct(True), rel=1e-9)
    assert res["fid"] != pytest.approx(direct(False), rel=1e-6)  # the switch really changed the noise


def test_eval_nll_is_the_elbo_and_the_ode_nll_of_the_test_images(digits_model, cheap_features, tmp_path):
    from reverie.data import get_dataset
    from reverie.likelihood import nll_bits_per_dim
    from reverie.likelihood_ode import ode_bits_per_dim

    out = tmp_path / "nll.json"
    assert main(["eval", str(digits_model), "--metrics", "nll", "--nll-n", "3", "--seed", "1",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())["nll"]
    data = get_dataset("digits", resolution=8, split="test")
    x0 = torch.stack([data[i]["image"] for i in range(3)])
    pipe = Pipeline.from_pretrained(digits_model)
    direct = nll_bits_per_dim(pipe.denoiser, x0, generator=torch.Generator().manual_seed(1))
    assert res["n"] == 3 and res["elbo_bpd"] == pytest.approx(float(direct.mean()), rel=1e-6)
    assert res["elbo_bpd"] > 0
    ode = ode_bits_per_dim(pipe.denoiser, x0, generator=torch.Generator().manual_seed(1))
    assert res["ode_bpd"] == pytest.approx(float(ode.mean()), rel=1e-9)


@pytest.mark.parametrize("args, message", [
    (["--metrics", "fid,sharpness"], "unknown metric"),
    (["--n", "0"], "--n: must be at least 1, got 0"),
    (["--ref", "imagenet"], "unknown reference dataset"),
    (["--grid", "cosine"], "unknown sigma grid 'cosine'; choose one of karras"),
    (["--metrics", "probe"], "probe needs a text-conditioned model"),
    (["--metrics", "probe", "--probe-n", "0"], "--probe-n: must be at least 1, got 0"),
])
def test_eval_bad_input_is_one_line_error(digits_model, cheap_features, capsys, args, message):
    assert cli(["eval", str(digits_model), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_eval_adherence_paraphrase_shows_synonyms_and_scores_the_originals(tmp_path, monkeypatch):
    """The shipped model through the CLI: --paraphrase changes what the model is shown, not what is scored."""
    import reverie.eval.adherence as adherence

    seen = []
    real = adherence.paraphrase
    monkeypatch.setattr(adherence, "paraphrase", lambda text: seen.append(text) or real(text))
    out = tmp_path / "adh.json"
    args = ["eval", "--metrics", "adherence", "--per-prompt", "1", "--steps", "2", "--json", str(out)]
    assert main([*args, "--paraphrase"]) == 0
    res = json.loads(out.read_text())["adherence"]
    prompts = adherence.evaluation_prompts()
    assert res["settings"]["paraphrased"] is True and sorted(seen) == sorted(prompts)
    assert set(res["per_prompt"]) == set(prompts) and res["num_images"] == len(prompts)


def test_eval_probe_on_the_shipped_model(tmp_path, capsys):
    """`--metrics probe` through the CLI on the shipped model: the color control passes clearly at the
    smallest sigma (measured 0.99 at 256 images), every probe reports one accuracy per default sigma, and
    the JSON holds what the table printed."""
    from reverie.eval.probe import DEFAULT_SIGMAS

    out = tmp_path / "probe.json"
    assert main(["eval", "--metrics", "probe", "--probe-n", "24", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["probe"]
    printed = capsys.readouterr().out
    assert res["num_images"] == 24 and res["sigmas"] == list(DEFAULT_SIGMAS)
    for kind, r in res["probes"].items():
        assert len(r["accuracy"]) == len(res["sigmas"])
        assert f"probe {kind}" in printed and f"{r['mean_accuracy']:.3f}" in printed
    assert res["probes"]["color"]["accuracy"][0] > 0.8
