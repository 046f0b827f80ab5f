"""Generate from an exported model (``reverie export M --format onnx``) with onnxruntime, numpy, tokenizers and
Pillow alone: no torch is imported on this path (``tests/test_onnx.py`` runs it where importing torch fails).

    python -m reverie.onnx_runtime DIR "a red circle above a blue square" -o out.png [--int8] [--num-images 4]

What it does, step by step, and where the PyTorch path does the same:

- tokenize with MiniLM's ``tokenizer.json`` and frame as ``MiniLMEncoder.token_ids`` ([CLS] pieces [SEP] [PAD]...,
  cut to ``max_length``); encode each distinct text once with ``text_encoder.onnx``;
- layout models: plan each image's object boxes from its prompt with the data's planner, seeded as
  ``reverie.layout.plan_layouts`` (the ``shapes`` planner is pure Python: it is loaded from reverie's own
  source without ``reverie.data``, whose package imports torch), encode the phrases, paint ``layout.onnx``;
- start noise: ``--noise FILE.npy`` (unit variance, e.g. PyTorch's draw, to reproduce ``reverie generate``
  exactly) or numpy's ``default_rng(seed)``, scaled by the grid's ``noise_scale``;
- sample with DPM-Solver++(2M) or DDIM (its first-order step; both as ``reverie.samplers``, in numpy) on the
  exported grid, calling ``denoiser.onnx`` once per step (guidance is inside it); decode a latent model with
  ``decoder.onnx``; write a PNG (a row of the images).

onnxruntime spins its worker threads between calls; ``threads`` (default ``OMP_NUM_THREADS``, else
onnxruntime's own choice) sets the pool.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import random
import sys
import types
from pathlib import Path

import numpy as np

CONFIG_FILE = "reverie-onnx.json"  # as reverie.export.onnx.CONFIG_FILE
SAMPLERS = ("dpmpp_2m", "ddim")


class OnnxPipeline:
    """An exported model loaded into onnxruntime sessions. ``int8``: the statically quantized graphs
    (``--int8`` at export). ``on_run(graph, feed)``, when set, sees every feed before its session runs (the
    export's int8 calibration records the denoiser's feeds this way)."""

    def __init__(self, path: str | Path, int8: bool = False, threads: int | None = None):
        self.path = Path(path)
        config_path = self.path / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"{self.path} is not an ONNX export (no {CONFIG_FILE}); make one with "
                                    f"`reverie export MODEL --format onnx -o {self.path}`")
        self.config = json.loads(config_path.read_text())
        graphs = dict(self.config["graphs"])
        if int8:
            if not self.config.get("int8"):
                raise ValueError(f"{self.path} holds no int8 graphs: export with --int8")
            graphs.update(self.config["int8"])
        threads = threads if threads is not None else int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        self.sessions = {name: session(self.path / file, threads) for name, file in graphs.items()}
        self.on_run = None
        self.tokenizer = None
        if self.config["text"]:
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(self.path / self.config["text"]["tokenizer"]))
            self.tokenizer.no_truncation()
            self.tokenizer.no_padding()

    def run(self, graph: str, feed: dict) -> list[np.ndarray]:
        if self.on_run is not None:
            self.on_run(graph, feed)
        return self.sessions[graph].run(None, feed)

    # ------------------------------------------------------------------------------------ conditioning

    def token_ids(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, mask)`` ``[B, max_length]``, as ``MiniLMEncoder.token_ids``."""
        length = self.config["text"]["max_length"]
        cls_id, sep_id, pad_id = (self.tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
        ids = np.full((len(texts), length), pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), length), dtype=bool)
        for row, enc in enumerate(self.tokenizer.encode_batch(texts, add_special_tokens=False)):
            pieces = [cls_id, *enc.ids[: length - 2], sep_id]
            ids[row, : len(pieces)], mask[row, : len(pieces)] = pieces, True
        return ids, mask

    def encode(self, texts: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Each distinct text -> (tokens [L, D], mask [L], pooled [P])."""
        unique = list(dict.fromkeys(texts))
        ids, mask = self.token_ids(unique)
        tokens, pooled = self.run("text_encoder", {"ids": ids, "mask": mask})
        return {t: (tokens[k], mask[k], pooled[k]) for k, t in enumerate(unique)}

    def plan_layouts(self, prompts: list[str], seed: int) -> list:
        """One layout per prompt from the data's planner, seeded as ``reverie.layout.plan_layouts``."""
        planner = _planner(self.config["layout"]["planner"])
        if planner is None:
            return [None] * len(prompts)
        return [planner(p, random.Random(f"reverie.layout/{seed}/{i}/{p}")) if p else None
                for i, p in enumerate(prompts)]

    def conditioning(self, prompts: list[str], layouts: list | None, negative: str = "") -> dict:
        """The denoiser's conditioning inputs: conditional rows (``prompts``) then unconditional ones."""
        texts = list(prompts) + [negative] * len(prompts)
        max_objects = self.config["layout"]["max_objects"] if self.config["layout"] else 0
        layouts = (list(layouts) if layouts is not None else [None] * len(prompts)) + [None] * len(prompts)
        phrases = [[p for p, _ in (lay or [])] + [""] * (max_objects - len(lay or [])) for lay in layouts]
        for k, lay in enumerate(layouts):
            if lay and len(lay) > max_objects:
                raise ValueError(f"layout {k} has {len(lay)} objects; this model takes at most {max_objects}")
        emb = self.encode(texts + [p for row in phrases for p in row])
        cond = {"context": np.stack([emb[t][0] for t in texts]), "context_mask": np.stack([emb[t][1] for t in texts]),
                "pooled": np.stack([emb[t][2] for t in texts])}
        if self.config["layout"]:
            boxes = np.zeros((len(texts), max_objects, 4), dtype=np.float32)
            mask = np.zeros((len(texts), max_objects), dtype=bool)
            for b, lay in enumerate(layouts):
                for n, (_, box) in enumerate(lay or []):
                    boxes[b, n], mask[b, n] = box, True
            vectors = np.stack([[emb[p][2] for p in row] for row in phrases])
            cond["spatial"] = self.run("layout", {"phrases": vectors, "boxes": boxes, "mask": mask})[0]
        return cond

    # ------------------------------------------------------------------------------------------ sampling

    def grid(self, steps: int | None) -> dict:
        steps = steps or self.config["sampling"]["steps"]
        grids = self.config["grids"]
        if str(steps) not in grids:
            raise ValueError(f"this export holds grids for {', '.join(grids)} steps, not {steps}; "
                             f"export with --steps {steps}")
        return grids[str(steps)]

    def sample(self, prompts: list[str] | None = None, num_images: int = 1, steps: int | None = None,
               guidance_scale: float | None = None, seed: int = 0, noise: np.ndarray | None = None,
               sampler: str | None = None, layouts: str | list = "auto") -> np.ndarray:
        """``[num_images, C, H, W]`` float32 images in [-1, 1]. ``prompts`` repeat cyclically over the images
        (as ``Pipeline.sample``); ``noise``: unit-variance start noise of the latent shape; ``layouts``:
        ``"auto"`` (planned from the prompts with ``seed``), ``"none"``, or one layout per image."""
        sampler = sampler or self.config["sampling"]["sampler"]
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; the ONNX runner has {', '.join(SAMPLERS)}")
        grid = self.grid(steps)
        shape = (num_images, *self.config["latent_shape"])
        if noise is None:
            noise = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        noise = np.asarray(noise, dtype=np.float32)
        if noise.shape != shape:
            raise ValueError(f"the start noise must have shape {shape}, got {noise.shape}")
        feed = {}
        if self.config["guided"]:
            prompts = ((list(prompts) if prompts else [""]) * num_images)[:num_images]
            if layouts == "auto" and self.config["layout"]:
                layouts = self.plan_layouts(prompts, seed)
            elif isinstance(layouts, str):
                layouts = None
            scale = self.config["sampling"]["guidance_scale"] if guidance_scale is None else guidance_scale
            feed = {**self.conditioning(prompts, layouts), "guidance_scale": np.array([scale], dtype=np.float32)}

        def denoise(x, i):
            n = x.shape[0]
            return self.run("denoiser", {"x": x, "sigma": np.full(n, grid["sigmas"][i], dtype=np.float32),
                                         "c_noise": np.full(n, grid["c_noise"][i], dtype=np.float32), **feed})[0]

        x = dpmpp_2m(denoise, noise * np.float32(grid["noise_scale"]), grid["sigmas"], second_order=sampler != "ddim")
        if "decoder" in self.sessions:
            x = self.run("decoder", {"latents": x})[0]
        return np.clip(x, -1, 1)


def session(path: str | Path, threads: int = 1):
    """An onnxruntime CPU session for an ONNX file; ``threads`` 0: onnxruntime's own choice."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def dpmpp_2m(denoise, x: np.ndarray, sigmas: list[float], second_order: bool = True) -> np.ndarray:
    """DPM-Solver++(2M) in VE coordinates (Lu et al. 2022, Algorithm 2; ``reverie.samplers.dpm_solver``):
    ``x_next = (sigma_next / sigma) x - expm1(-h) D``, plus ``-expm1(-h) / 2 * (D - D_prev) h / h_prev`` from
    the second step on; the last step (to sigma 0) returns D, and grids under 15 steps keep it first order.
    ``second_order=False`` is DDIM with eta = 0 (Song et al. 2021, eq. 12: the same first-order step).
    ``denoise(x, i)`` is D(x, sigmas[i])."""
    n = len(sigmas) - 1
    denoised_prev, h_prev = None, 0.0
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, i)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma / sigma_next)
        x_next = (sigma_next / sigma) * x - math.expm1(-h) * denoised
        if second_order and denoised_prev is not None and h > 0 and not (n < 15 and n - i < 2):
            x_next = x_next + (-0.5 * math.expm1(-h)) * ((denoised - denoised_prev) * (h / h_prev))
        if h > 0:
            denoised_prev, h_prev = denoised, h
        x = x_next
    return x


def _planner(name: str | None):
    """A dataset's layout planner, imported without torch: ``shapes`` is ``reverie/data/shapes/planner.py``
    and its pure-Python siblings, loaded as a private package so that ``reverie.data``'s ``__init__`` (torch
    datasets) never runs."""
    if name != "shapes":
        return None
    alias = "_reverie_shapes_planner"
    if alias not in sys.modules:
        package = types.ModuleType(alias)
        package.__path__ = [str(Path(__file__).parent / "data" / "shapes")]
        sys.modules[alias] = package
    return importlib.import_module(f"{alias}.planner").plan_layout


def to_uint8(images: np.ndarray) -> np.ndarray:
    """``[B, C, H, W]`` in [-1, 1] -> ``[B, H, W, C]`` uint8, rounded as ``reverie.images.to_pil``."""
    return np.round((np.clip(images, -1, 1) + 1) * np.float32(127.5)).astype(np.uint8).transpose(0, 2, 3, 1)


def save_row(images: np.ndarray, path: str | Path, pad: int = 2) -> Path:
    """The images side by side in one PNG."""
    from PIL import Image

    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    row = np.zeros((h, n * w + (n - 1) * pad, c), dtype=np.uint8)
    for k, img in enumerate(pixels):
        row[:, k * (w + pad): k * (w + pad) + w] = img
    Image.fromarray(row[..., 0] if c == 1 else row, "L" if c == 1 else "RGB").save(path)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reverie.onnx_runtime",
                                description="Generate with an ONNX export of a reverie model (no torch).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="directory written by `reverie export MODEL --format onnx`")
    p.add_argument("prompt", nargs="?", default="", help="text prompt (text-to-image models)")
    p.add_argument("-o", "--output", default="out.png", help="PNG to write (the images in a row)")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's own)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: the model's own")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the model's own")
    p.add_argument("--seed", type=int, default=0, help="start noise (numpy) and layout planning")
    p.add_argument("--noise", default=None, help=".npy of unit-variance start noise [N, C, H, W] "
                   "(instead of the seed's)")
    p.add_argument("--layout", choices=("auto", "none"), default="auto", help="plan object boxes from the prompt")
    p.add_argument("--int8", action="store_true", help="use the int8 graphs (export --int8)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: OMP_NUM_THREADS)")
    args = p.parse_args(argv)
    try:
        if args.num_images < 1:
            raise ValueError(f"--num-images must be at least 1, got {args.num_images}")
        pipe = OnnxPipeline(args.model, int8=args.int8, threads=args.threads)
        noise = np.load(args.noise) if args.noise else None
        images = pipe.sample([args.prompt], args.num_images, steps=args.steps, guidance_scale=args.guidance_scale,
                             seed=args.seed, noise=noise, sampler=args.sampler, layouts=args.layout)
        out = save_row(images, args.output)
    except (ValueError, OSError, ImportError) as e:
        print(f"reverie.onnx_runtime: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
