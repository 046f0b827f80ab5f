"""How well reverie's two watermarks survive common edits, and what they cost in image quality.

Generated images: the shipped ``shapes-t2i`` model on ``reverie.eval.adherence.evaluation_prompts()`` at its
own settings (dpmpp_2m, 20 steps, guidance 4), each made twice from the same seed: from the seed's plain noise
and from the Tree-Ring-watermarked noise (``reverie.provenance.watermark_noise``). Real images: ``shapes``
renders (a dataset seed the model never saw) and MNIST test digits, half each.

* Tree-Ring (noise space, 32 px): score = the correlation rho of the inverted noise with the key in the ring
  (``reverie.provenance.verify.detect_tree_ring``: DDIM inversion, prompt "", no guidance).
  Positives: the watermarked images; negatives: the real images.
* Pixel watermark (``reverie.provenance.pixelmark``, >= 256 px): positives: the watermarked generated images
  upscaled 8x with nearest neighbour (as ``reverie generate`` upscales images in its grids) and marked;
  negatives: shapes rendered at 256 px and MNIST digits resized to 256 px (bicubic).

Edits, each applied to positives and negatives alike: JPEG q75 and q50; resize 0.5x (bicubic); crop 10% (a
random 90% x 90% window, resized back); Gaussian blur (sigma 1 px at the image's own size); brightness +-10%.
Reported per edit: AUC, TPR at 1% FPR (threshold: the negatives' 99th percentile), and the TPR / FPR at the
detector's own analytic threshold (p < 0.01, what ``reverie verify`` uses). Quality: the adherence of the
plain and watermarked images (same prompts, same seeds: paired), the pixel mark's PSNR, and the correlation
between the true start noise and the inverted one per frequency radius (why Tree-Ring is weak on this model).

    python benchmarks/watermark.py   # 144 generated vs 144 real (Tree-Ring: 48 vs 48 per edit)
    # benchmarks/results/watermark.json: --prompts 48 --per-prompt 1 --real 96 --tree-ring-n 24 (36 min on the
    # 2-core VM at load 30, where it got a fraction of a core)
    python benchmarks/watermark.py --prompts 8 --per-prompt 1 --real 8 --quick -o out/wm.json   # a smoke run
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

from reverie.data.mnist import MNIST
from reverie.data.shapes import ShapesDataset
from reverie.editing import invert
from reverie.eval.adherence import evaluation_prompts, score_images
from reverie.images import to_pil
from reverie.pipeline import Pipeline
from reverie.provenance import pixelmark, treering, watermark_noise
from reverie.provenance.verify import detect_tree_ring

MODEL = Path(__file__).resolve().parent.parent / "src" / "reverie" / "assets" / "shapes-t2i"
KEY = bytes.fromhex("5eed" * 16)  # a fixed benchmark key (any key gives the same statistics)
EDITS = ("clean", "jpeg75", "jpeg50", "resize0.5", "crop10", "blur", "bright+10", "bright-10")


def edit(image: Image.Image, name: str, rng: random.Random) -> Image.Image:
    w, h = image.size
    if name == "clean":
        return image
    if name.startswith("jpeg"):
        buf = io.BytesIO()
        image.convert("RGB").save(buf, "JPEG", quality=int(name[4:]))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if name == "resize0.5":
        return image.resize((max(1, w // 2), max(1, h // 2)), Image.BICUBIC)
    if name == "crop10":
        cw, ch = round(0.9 * w), round(0.9 * h)
        x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
        return image.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC)
    if name == "blur":
        return image.filter(ImageFilter.GaussianBlur(1.0))
    if name.startswith("bright"):
        return ImageEnhance.Brightness(image).enhance(1 + int(name[6:]) / 100)
    raise ValueError(name)


def generate(pipe, prompts: list[str], per_prompt: int, batch: int = 72):
    """(plain, watermarked, start noise of the watermarked, prompt per image)."""
    plain, marked, noises, shown = [], [], [], []
    for k in range(per_prompt):
        for start in range(0, len(prompts), batch):
            chunk = prompts[start:start + batch]
            seed = 1000 * k + start
            noise, _ = watermark_noise(pipe, len(chunk), seed, key=KEY)
            plain.append(pipe.sample(len(chunk), prompts=chunk, seed=seed))
            marked.append(pipe.sample(len(chunk), prompts=chunk, seed=seed, noise=noise))
            noises.append(noise)
            shown += chunk
            print(f"  generated {len(shown)} x 2", flush=True)
    return torch.cat(plain), torch.cat(marked), torch.cat(noises), shown


def real_images(n: int, size: int) -> list[Image.Image]:
    shapes = ShapesDataset(resolution=size, seed=777)
    digits = MNIST("test", 32, channels=3)
    out = to_pil(torch.stack([shapes[i]["image"] for i in range(n - n // 2)]))
    out += [im.resize((size, size), Image.BICUBIC) for im in to_pil(torch.stack([digits[i]["image"]
                                                                                  for i in range(n // 2)]))]
    return out


def metrics(pos: np.ndarray, neg: np.ndarray, pos_p: np.ndarray, neg_p: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score

    threshold = np.quantile(neg, 0.99)
    return {"auc": float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg])),
            "tpr_at_1pct_fpr": float((pos > threshold).mean()),
            "tpr_analytic": float((pos_p < 0.01).mean()), "fpr_analytic": float((neg_p < 0.01).mean())}


def tree_ring_scores(pipe, images: list[Image.Image], ring, steps: int, batch: int = 48) -> np.ndarray:
    rhos = []
    for i in range(0, len(images), batch):
        rhos += detect_tree_ring(pipe, images[i:i + batch], KEY, ring, steps=steps)
    return np.array(rhos)


def recovery_by_radius(pipe, images: torch.Tensor, noise: torch.Tensor, steps: int) -> list[float]:
    """Correlation of the true and the inverted start noise, averaged over the Fourier coefficients of each
    integer radius (cycles per image)."""
    inv = invert(pipe, images, prompt="", steps=steps, guidance_scale=1.0, layouts="none").noise
    a, b = torch.fft.fft2(noise.double()), torch.fft.fft2(inv.double())
    power = (a.abs() ** 2).sum(dim=(0, 1)) * (b.abs() ** 2).sum(dim=(0, 1))
    corr = (a * b.conj()).real.sum(dim=(0, 1)) / power.sqrt()
    f = torch.fft.fftfreq(noise.shape[-1], d=1 / noise.shape[-1])
    radius = (f[:, None] ** 2 + f[None, :] ** 2).sqrt()
    return [round(float(corr[(radius >= r) & (radius < r + 1)].mean()), 3) for r in range(noise.shape[-1] // 2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-prompt", type=int, default=2, help="images per evaluation prompt (72 prompts)")
    ap.add_argument("--real", type=int, default=144, help="real images (half shapes, half MNIST)")
    ap.add_argument("--prompts", type=int, default=72, help="use the first N evaluation prompts")
    ap.add_argument("--tree-ring-n", type=int, default=48,
                    help="Tree-Ring: images of each kind inverted per edit (inversion is the slow part)")
    ap.add_argument("--inversion-steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="Tree-Ring on clean and jpeg75 only")
    ap.add_argument("-o", "--output", default="benchmarks/results/watermark.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    pipe = Pipeline.from_pretrained(MODEL)
    ring = treering.TreeRing()
    prompts = evaluation_prompts()[:args.prompts]
    plain, marked, noise, shown = generate(pipe, prompts, args.per_prompt)
    result = {"model": pipe.name, "model_hash": pipe.weights_hash, "generated": len(marked), "real": args.real,
              "tree_ring_n": args.tree_ring_n, "inversion_steps": args.inversion_steps,
              "ring": treering.record(KEY, ring), "pixel_scheme": pixelmark.SCHEME, "threads": args.threads}
    plain_score, marked_score = score_images(plain, shown), score_images(marked, shown)
    paired = (marked_score["all_correct"] - plain_score["all_correct"]) * 100
    result["adherence"] = {"plain": plain_score, "watermarked": marked_score,
                           "all_correct_difference_points": round(paired, 2)}
    print(f"adherence all_correct: plain {plain_score['all_correct']:.3f}, watermarked "
          f"{marked_score['all_correct']:.3f} ({paired:+.1f} points)", flush=True)
    result["noise_recovery_by_radius"] = recovery_by_radius(pipe, marked[:48], noise[:48], args.inversion_steps)
    print("noise recovery by radius:", result["noise_recovery_by_radius"], flush=True)

    gen_small, real_small = to_pil(marked), real_images(args.real, 32)
    gen_big = [pixelmark.embed(im.resize((256, 256), Image.NEAREST), KEY) for im in gen_small]
    real_big = real_images(args.real, 256)
    psnr = [10 * math.log10(255**2 / max(1e-12, float(np.mean((np.asarray(m, float) - np.asarray(
        im.resize((256, 256), Image.NEAREST), float)) ** 2)))) for m, im in zip(gen_big[:50], gen_small)]
    result["pixel_psnr_db"] = round(float(np.mean(psnr)), 2)
    shape = (3, 32, 32)
    table = {"tree_ring": {}, "pixel": {}}
    for name in EDITS:
        rng = random.Random(name)
        pos = [pixelmark.detect(edit(im, name, rng), KEY) for im in gen_big]
        neg = [pixelmark.detect(edit(im, name, rng), KEY) for im in real_big]
        table["pixel"][name] = metrics(np.array([d.score for d in pos]), np.array([d.score for d in neg]),
                                       np.array([d.p_value for d in pos]), np.array([d.p_value for d in neg]))
        print(f"pixel {name}: {table['pixel'][name]}", flush=True)
        if args.quick and name not in ("clean", "jpeg75"):
            continue
        k = args.tree_ring_n  # real_small: shapes first, then MNIST; take both halves
        real_k = real_small[:k - k // 2] + real_small[len(real_small) - k // 2:]
        pos_rho = tree_ring_scores(pipe, [edit(im, name, rng) for im in gen_small[:k]], ring, args.inversion_steps)
        neg_rho = tree_ring_scores(pipe, [edit(im, name, rng) for im in real_k], ring, args.inversion_steps)
        table["tree_ring"][name] = metrics(pos_rho, neg_rho, ring.p_value(pos_rho, shape).numpy(),
                                           ring.p_value(neg_rho, shape).numpy())
        print(f"tree-ring {name}: {table['tree_ring'][name]}", flush=True)
        result["table"] = table
        result["seconds"] = round(time.time() - start)
        Path(args.output).write_text(json.dumps(result, indent=1))
    result["table"], result["seconds"] = table, round(time.time() - start)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.output} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
