"""Tree-Ring (the noise-space watermark) on any model: does inverting an image recover its start noise?

``benchmarks/watermark.py`` measures Tree-Ring on the shipped 32 px ``shapes-t2i``, where it fails (the sampler
forgets almost all of its start noise). This script measures it on any unconditional (or class/text-conditional,
sampled without a prompt) model directory, to show where the scheme works and what stops it:

* positives: ``--n`` samples from Tree-Ring-marked start noise (the user's key replaced by a fixed benchmark key;
  seed i for image i), at the model's own sampler settings, saved as 8-bit images;
* negatives: ``--n`` real images of the model's data (MNIST test digits for a 1-channel model, ``shapes`` renders
  otherwise), at the model's resolution;
* the detector is ``reverie verify``'s: ``detect_tree_ring`` (DDIM inversion under prompt "", no guidance,
  ``--inversion-steps``), rho against the key inside the ring, the exact p < 0.01 threshold;
* per edit (``watermark.py``'s edits): AUC, TPR at 1% FPR (the negatives' 99th percentile), TPR / FPR at p < 0.01;
* why images are missed: rho beside the fraction of the image's pixels at the clamp (-1 or 1 before 8-bit
  rounding); where that fraction is large, clamping has erased what the start noise wrote there;
* the correlation of the true and the inverted start noise per frequency radius.

    python benchmarks/treering_models.py --model DIR [--n 200] [--edits clean,jpeg75]

An MNIST model to run it on: the eps baseline of ``benchmarks/pde_diffusion.py`` (``--stages train --resolution 32
--train-steps 600 --batch-size 32 --out out/pde32`` trains it into ``out/pde32/eps/model``). Writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reverie.data.mnist import MNIST  # noqa: E402
from reverie.data.shapes import ShapesDataset  # noqa: E402
from reverie.data.transforms import uint8_to_tensor  # noqa: E402
from reverie.images import to_pil  # noqa: E402
from reverie.pipeline import Pipeline  # noqa: E402
from reverie.provenance import treering  # noqa: E402
from reverie.provenance.verify import detect_tree_ring  # noqa: E402
from reverie.sampling import SamplingOptions, noise_shape, sample_images  # noqa: E402
from watermark import EDITS, KEY, edit, inverted_noise, metrics, recovery_by_radius  # noqa: E402


def real_images(pipe, n: int) -> list:
    res, channels = pipe.info["resolution"], pipe.info["in_channels"]
    if channels == 1:
        data = MNIST("test", res)
    else:
        data = ShapesDataset(resolution=res, seed=777)
    return to_pil(torch.stack([data[i]["image"] for i in range(n)]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a model directory (sampled without a prompt)")
    p.add_argument("--n", type=int, default=200, help="watermarked and real images each")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--inversion-steps", type=int, default=10)
    p.add_argument("--edits", default="clean,jpeg75", help=f"comma-separated, of: {', '.join(EDITS)}")
    p.add_argument("--out", default="out/treering_models.json")
    a = p.parse_args(argv)
    edits = a.edits.split(",")
    if bad := [e for e in edits if e not in EDITS]:
        p.error(f"unknown edits {bad}; valid: {', '.join(EDITS)}")
    pipe = Pipeline.from_pretrained(a.model)
    ring = treering.TreeRing()
    t0 = time.time()
    noise = torch.cat([treering.watermarked_noise(noise_shape(pipe, 1), i, KEY, ring) for i in range(a.n)])
    raw = torch.cat([sample_images(pipe, len(noise[i:i + a.batch]), SamplingOptions(seed=i), noise=noise[i:i + a.batch])
                     for i in range(0, a.n, a.batch)]).float()
    sample_s = time.time() - t0
    saturated = ((raw <= -1) | (raw >= 1)).flatten(1).float().mean(1).numpy()
    quantized = uint8_to_tensor(((raw.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))  # what the PNGs hold
    pos_images, neg_images = to_pil(quantized), real_images(pipe, a.n)
    shape = tuple(noise.shape[1:])
    result = {"model": a.model, "model_hash": pipe.weights_hash, "n": a.n, "inversion_steps": a.inversion_steps,
              "ring": [ring.r_lo, ring.r_hi], "ring_dim": ring.dim(shape), "rho_threshold_p01": ring.threshold(shape),
              "sample_seconds": round(sample_s, 1), "edits": {}}
    rng = random.Random(0)
    for name in edits:
        pos = detect_tree_ring(pipe, [edit(im, name, rng) for im in pos_images], KEY, ring, a.inversion_steps)
        neg = detect_tree_ring(pipe, [edit(im, name, rng) for im in neg_images], KEY, ring, a.inversion_steps)
        row = metrics(pos, neg, ring.p_value(pos, shape).tolist(), ring.p_value(neg, shape).tolist())
        if name == "clean":
            pos_arr = np.asarray(pos)
            low = saturated < 0.5
            row["rho_vs_saturated_corr"] = float(np.corrcoef(pos_arr, saturated)[0, 1])
            hits = ring.p_value(pos_arr[low], shape) < 0.01
            row["tpr_analytic_saturated_below_half"] = float(hits.float().mean()) if low.any() else None
            row["share_saturated_below_half"] = float(low.mean())
        result["edits"][name] = row
        print(name, json.dumps(row), flush=True)
    result["recovery_by_radius"] = recovery_by_radius(noise, inverted_noise(pipe, quantized, a.inversion_steps))
    print("recovery by radius", result["recovery_by_radius"], flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
