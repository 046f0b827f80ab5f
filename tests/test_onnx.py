"""ONNX export (``reverie.export``) and the torch-free runner (``reverie.onnx_runtime``) against PyTorch.

The model here is tiny and random, and has every graph: a latent text-to-image layout model (a small VAE, a
small U-Net with a layout map, and the real MiniLM tokenizer in front of a two-layer random BERT of width 32,
which the export treats as MiniLM). The shipped model (pixel space, the real 22M-parameter MiniLM) is exported
and checked the same way by ``reverie export --format onnx`` itself and by ``benchmarks/onnx_export.py``, which
also measure the int8 export's adherence.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install 'reverie[onnx]'")
pytest.importorskip("onnxscript", reason="onnxscript is not installed: pip install 'reverie[onnx]'")

from helpers import RGB16, cli, tiny_config  # noqa: E402
from reverie import onnx_runtime  # noqa: E402
from reverie.build import DiffusionModel, build_network  # noqa: E402
from reverie.conditioning import TextConditionedNet  # noqa: E402
from reverie.export import export_onnx  # noqa: E402
from reverie.export.onnx import TOLERANCE, run_graph  # noqa: E402
from reverie.export.quantize import quantize_export  # noqa: E402
from reverie.guidance import CFGDenoiser  # noqa: E402
from reverie.latent import latent_info  # noqa: E402
from reverie.layout import get_planner, plan_layouts  # noqa: E402
from reverie.nets import create_autoencoder, create_network  # noqa: E402
from reverie.sampling import SamplingOptions, conditions, sample_images  # noqa: E402
from reverie.text.minilm import Bert, MiniLMEncoder  # noqa: E402

SRC = Path(__file__).resolve().parent.parent / "src"
NET = "{model_channels: 8, channel_mult: [1, 2], attention_resolutions: [8], head_channels: 8}"
PROMPTS = ["a red circle above a blue square", "a small green star"]
BLOCK_TORCH = ("import sys\nclass _NoTorch:\n    def find_spec(self, name, path=None, target=None):\n"
               "        if name == 'torch' or name.startswith('torch.'):\n"
               "            raise ImportError('torch is blocked in this test')\n"
               "sys.meta_path.insert(0, _NoTorch())\n")


def tiny_model(seed: int = 0) -> DiffusionModel:
    """A random latent text-to-image layout model: a tiny VAE (16 px images, 8x8x4 latents), MiniLM's tokenizer
    in front of a 2-layer BERT of width 32, and a tiny U-Net with a layout map."""
    torch.manual_seed(seed)
    cfg = tiny_config(f"--model.network_overrides={NET}", "--model.conditioning=text", "--model.layout_channels=4",
                      "--data.resolution=16", "--sample.steps=3")
    encoder = MiniLMEncoder(max_length=12)
    encoder.model = Bert({"hidden_size": 32, "layer_norm_eps": 1e-12, "vocab_size": encoder.tokenizer.get_vocab_size(),
                          "max_position_embeddings": 64, "type_vocab_size": 2, "num_attention_heads": 2,
                          "intermediate_size": 64, "num_hidden_layers": 2}).eval().requires_grad_(False)
    encoder.dim = encoder.pooled_dim = 32
    vae = create_autoencoder("vae-f4", base_channels=8, channel_mult=(1, 2), norm_groups=4).eval().requires_grad_(False)
    info = latent_info(dict(RGB16), vae)
    net = create_network(cfg.model.network, model_channels=8, channel_mult=(1, 2), attention_resolutions=(8,),
                         head_channels=8, in_channels=4, out_channels=4, sample_size=8, context_dim=32, pooled_dim=32,
                         spatial_channels=4)
    net = TextConditionedNet(net, encoder, layout_channels=4).eval().requires_grad_(False)
    for p in [*net.net.parameters(), *net.layout.parameters()]:
        p.add_(torch.randn_like(p) * 0.05)
    return DiffusionModel(net, cfg, info, vae=vae)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_model()
    out = tmp_path_factory.mktemp("onnx") / "tiny"
    return model, out, export_onnx(model, out, steps=[3, 2])


def torch_noise(model, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, model.info["in_channels"], model.info["resolution"], model.info["resolution"],
                       generator=torch.Generator().manual_seed(seed))


def torch_free_env(tmp_path) -> dict:
    """The environment of a Python process in which ``import torch`` fails (a sitecustomize.py blocks it)."""
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(BLOCK_TORCH)
    return {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{SRC}", "OMP_NUM_THREADS": "1"}


def test_every_graph_matches_pytorch(exported):
    model, out, report = exported
    assert set(report.max_error) == {"denoiser", "text_encoder", "layout", "decoder"}
    assert all(err <= TOLERANCE for err in report.max_error.values()), report.max_error
    for name in ("denoiser", "text_encoder", "layout", "decoder"):
        assert (out / f"{name}.onnx").is_file() and not (out / f"{name}.onnx.data").exists()
    # An independent check at batch 1, another sigma and guidance scale, against reverie's own CFG denoiser.
    options = SamplingOptions(layouts="auto", seed=3).resolve(model.cfg)
    cond, uncond = conditions(model, 1, options, PROMPTS[:1])
    assert bool(cond["layout_mask"].any())
    x, sigma = torch_noise(model, 1) * 2.0, torch.tensor([1.7])
    expected = CFGDenoiser(model.denoiser, uncond, guidance_scale=2.5)(x, sigma, **cond)
    both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
    spatial = model.net.layout(both.pop("layout_phrases"), both.pop("layout_boxes"), both.pop("layout_mask"), (8, 8))
    feed = {"x": x, "sigma": sigma, "c_noise": model.denoiser.c_noise(sigma.double()).float(),
            "guidance_scale": torch.tensor([2.5]), **{k: both[k] for k in ("context", "context_mask", "pooled")},
            "spatial": spatial}
    got = run_graph(out / "denoiser.onnx", feed)[0]
    assert np.abs(got - expected.numpy()).max() <= TOLERANCE


def test_runner_pieces_match_reverie(exported):
    model, out, _ = exported
    pipe = onnx_runtime.OnnxPipeline(out)
    texts = ["a red circle above a blue square", "", "a " + "very " * 20 + "long prompt"]
    ids, mask = pipe.token_ids(texts)
    with pytest.warns(UserWarning, match="truncated"):
        ref_ids, ref_mask = model.net.encoder.token_ids(texts)
    assert np.array_equal(ids, ref_ids.numpy()) and np.array_equal(mask, ref_mask.numpy())
    prompts = PROMPTS * 3
    assert pipe.plan_layouts(prompts, seed=5) == plan_layouts(get_planner("shapes"), prompts, 5)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddim"])
def test_runner_reproduces_the_pipeline_in_process(exported, sampler):
    model, out, _ = exported
    noise = torch_noise(model, 3, seed=1)
    options = SamplingOptions(sampler=sampler, steps=3, guidance_scale=3.0, seed=2)
    expected = sample_images(model, 3, options, prompts=PROMPTS, noise=noise)
    got = onnx_runtime.OnnxPipeline(out).sample(PROMPTS, 3, steps=3, guidance_scale=3.0, seed=2,
                                                noise=noise.numpy(), sampler=sampler)
    assert np.abs(got - expected.numpy()).max() <= TOLERANCE


def test_runner_without_torch_matches_the_pipeline(exported, tmp_path):
    """The runner's command in a process where ``import torch`` fails gives the Pipeline's pixels."""
    model, out, _ = exported
    env = torch_free_env(tmp_path)
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert check.returncode != 0 and "torch is blocked" in check.stderr
    noise = torch_noise(model, 2, seed=4)
    np.save(tmp_path / "noise.npy", noise.numpy())
    expected = sample_images(model, 2, SamplingOptions(seed=7), prompts=PROMPTS[:1], noise=noise)
    png = tmp_path / "out.png"
    run = subprocess.run([sys.executable, "-m", "reverie.onnx_runtime", str(out), PROMPTS[0], "-o", str(png),
                          "--num-images", "2", "--seed", "7", "--noise", str(tmp_path / "noise.npy")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    pixels = np.asarray(Image.open(png)).astype(int)
    assert pixels.shape == (16, 2 * 16 + 2, 3)  # two decoded 16 px images in a row
    want = onnx_runtime.to_uint8(expected.numpy()).astype(int)
    assert np.abs(np.stack([pixels[:, :16], pixels[:, 18:]]) - want).max() <= 1  # the same pixels up to rounding
    bad = subprocess.run([sys.executable, "-m", "reverie.onnx_runtime", str(tmp_path), "x"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no reverie-onnx.json" in bad.stderr


def test_int8_export_is_static_qdq_and_runs_without_torch(exported, tmp_path):
    import onnx

    model, out, report = exported
    int8_dir = tmp_path / "int8"
    shutil.copytree(out, int8_dir)
    config = json.loads((int8_dir / "reverie-onnx.json").read_text())
    int8 = quantize_export(int8_dir, config, model, 2, report)
    assert set(int8) == {"denoiser", "text_encoder", "decoder"}
    for file in int8.values():
        ops = {node.op_type for node in onnx.load(int8_dir / file).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        assert not ops & {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"}  # never dynamic quantization
    assert (int8_dir / "denoiser.int8.onnx").stat().st_size < 0.5 * (int8_dir / "denoiser.onnx").stat().st_size
    config["int8"] = int8
    (int8_dir / "reverie-onnx.json").write_text(json.dumps(config))
    run = subprocess.run([sys.executable, "-m", "reverie.onnx_runtime", str(int8_dir), PROMPTS[0], "--int8",
                          "-o", str(tmp_path / "int8.png")], env=torch_free_env(tmp_path), capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_export_command_errors_are_one_line(tmp_path, capsys):
    cfg = tiny_config(f"--model.network_overrides={NET}", "--model.conditioning=text", "--data.resolution=16",
                      "--model.text_encoder=scratch")
    model = DiffusionModel(build_network(cfg, RGB16), cfg, dict(RGB16))
    with pytest.raises(ValueError, match="needs the minilm text encoder"):
        export_onnx(model, tmp_path / "x")
    assert cli(["export", "src/reverie/assets/shapes-t2i", "--int8"]) == 2
    assert "--format onnx" in capsys.readouterr().err
    assert cli(["export", "src/reverie/assets/shapes-t2i", "--format", "onnx", "--steps", "x"]) == 2
    assert "comma-separated" in capsys.readouterr().err
