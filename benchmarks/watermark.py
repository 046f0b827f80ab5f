"""How well reverie's two watermarks survive common edits, and what they cost in image quality.

Generated images: the shipped ``shapes-t2i`` model on the 72 held-out ``evaluation_prompts()`` x ``--per-prompt``
at its own settings (dpmpp_2m, 20 steps, ddim-trailing) and guidance 4, made exactly as ``reverie eval --metrics
adherence --per-prompt 8 --guidance 4 [--watermark]`` makes them (``evaluate_adherence``; batch k uses seed k), three
times: from the seeds' plain noise, from the same seeds' Tree-Ring-watermarked noise (paired: same prompts and
seeds) and, for the FID noise floor, from plain noise of other seeds (100 + k). Real images: ``shapes`` renders
(a dataset seed the model never saw) and MNIST test digits, half each.

* Tree-Ring (noise space, 32 px): score = the correlation rho of the inverted noise with the key in the ring
  (``reverie.provenance.verify.detect_tree_ring``: DDIM inversion, prompt "", no guidance). Positives: the first
  ``--n`` watermarked images; negatives: ``--n`` real images; the model's own unwatermarked images are a second
  set of negatives (clean and JPEG 75).
* Pixel watermark (``reverie.provenance.pixelmark``, >= 256 px): positives: the watermarked images upscaled 8x
  with nearest neighbour (as ``reverie generate`` upscales images in its grids) and marked; negatives: shapes
  rendered at 256 px and MNIST digits resized to 256 px (bicubic).

Edits, each applied to positives and negatives alike: JPEG q75 and q50; resize 0.5x (bicubic); crop 10% (a
random 90% x 90% window, resized back); Gaussian blur (sigma 1 px at the image's own size); brightness +-10%.
Reported per edit: AUC, TPR at 1% FPR (threshold: the negatives' 99th percentile) and the TPR / FPR at the
detector's own analytic threshold (p < 0.01, what ``reverie verify`` uses). Quality: the paired adherence of the
plain and watermarked images, FID / KID of each set (and of the second plain set) against ``--fid-ref`` real
``shapes`` renders (the held-out draw ``reverie eval`` uses), the pixel mark's PSNR, and the correlation between the
true start noise and the inverted one per frequency radius (why Tree-Ring is weak on this model).

The work is split into stages that cache their results under ``--work`` (rerun to resume; two processes may run
different stages at once, ``pixel`` waits for the images):

    python benchmarks/watermark.py --stages images,treering,pixel \\
        --pixel-edits crop10,blur,bright+10,bright-10                # one CPU slot
    python benchmarks/watermark.py --stages reference,pixel,fid,images2,fid \\
        --pixel-edits clean,jpeg75,jpeg50,resize0.5                  # the other
    python benchmarks/watermark.py --stages report                   # -> benchmarks/results/watermark.json
    python benchmarks/watermark.py --prompts 8 --per-prompt 1 --n 8 --real 8 --fid-ref 32 --work out/wm-smoke \\
        -o out/wm-smoke.json                                         # a smoke run (all stages, about a minute)
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
from tqdm.auto import tqdm

from reverie.data.mnist import MNIST
from reverie.data.shapes import ShapesDataset
from reverie.data.transforms import uint8_to_tensor
from reverie.editing import invert
from reverie.eval.adherence import evaluate_adherence, evaluation_prompts
from reverie.eval.evaluate import EvalSettings, reference_spec
from reverie.eval.fid import dataset_reference, evaluate_samples, get_inception, image_features
from reverie.images import to_pil
from reverie.pipeline import Pipeline
from reverie.provenance import pixelmark, treering
from reverie.provenance.verify import detect_tree_ring
from reverie.sampling import noise_shape

MODEL = Path(__file__).resolve().parent.parent / "src" / "reverie" / "assets" / "shapes-t2i"
KEY = bytes.fromhex("5eed" * 16)  # a fixed benchmark key (any key gives the same statistics)
EDITS = ("clean", "jpeg75", "jpeg50", "resize0.5", "crop10", "blur", "bright+10", "bright-10")
RUNS = {"watermarked": (0, True), "plain": (0, False), "plain_other_seeds": (100, False)}  # seed, watermark
STAGES = ("images", "images2", "treering", "reference", "pixel", "fid", "report")


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


class Recording:
    """A Pipeline that keeps what it samples: 8-bit images and their unit-variance start noise (the one given, or
    the seed's own draw, as ``reverie.sampling.start_noise`` makes it for this image model)."""

    def __init__(self, pipe):
        self.pipe, self.images, self.noise = pipe, [], []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def sample(self, num_images, noise=None, **settings):
        x = self.pipe.sample(num_images, noise=noise, **settings)
        self.images.append(((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
        if noise is None:
            noise = torch.randn(noise_shape(self.pipe, num_images), generator=torch.Generator().manual_seed(
                settings["seed"]))
        self.noise.append(noise.float())
        return x


def stage_images(pipe, args, work: Path, runs) -> None:
    """Each run of ``runs``: the images, their prompts and adherence, cached in ``work/images-<run>.pt``."""
    for name in runs:
        seed, marked = RUNS[name]
        path = work / f"images-{name}.pt"
        if path.exists():
            continue
        t0 = time.time()
        rec = Recording(pipe)
        score = evaluate_adherence(rec, prompts=evaluation_prompts()[:args.prompts], num_per_prompt=args.per_prompt,
                                   steps=20, sampler="dpmpp_2m", guidance_scale=4.0, seed=seed, grid="ddim-trailing",
                                   watermark_key=KEY if marked else None)
        images = torch.cat(rec.images)
        torch.save({"images": images, "noise": torch.cat(rec.noise),
                    "adherence": score, "seconds": round(time.time() - t0)}, path)
        print(f"{name}: {len(images)} images, all_correct {score['all_correct']:.4f} ({time.time() - t0:.0f} s)",
              flush=True)


def load_images(work: Path, name: str, wait: bool = False) -> dict:
    path = work / f"images-{name}.pt"
    while wait and not path.exists():
        time.sleep(30)
    return torch.load(path)


def real_images(n: int, size: int) -> list[Image.Image]:
    shapes = ShapesDataset(resolution=size, seed=777)
    digits = MNIST("test", 32, channels=3)
    out = to_pil(torch.stack([shapes[i]["image"] for i in range(n - n // 2)]))
    out += [im.resize((size, size), Image.BICUBIC) for im in to_pil(torch.stack([digits[i]["image"]
                                                                                  for i in range(n // 2)]))]
    return out


def pil_images(data: dict, n: int) -> list[Image.Image]:
    return to_pil(uint8_to_tensor(data["images"][:n]))


def metrics(pos, neg, pos_p, neg_p) -> dict:
    from sklearn.metrics import roc_auc_score

    pos, neg, pos_p, neg_p = map(np.asarray, (pos, neg, pos_p, neg_p))
    threshold = np.quantile(neg, 0.99)
    return {"auc": float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg])),
            "tpr_at_1pct_fpr": float((pos > threshold).mean()),
            "tpr_analytic": float((pos_p < 0.01).mean()), "fpr_analytic": float((neg_p < 0.01).mean()),
            "n_pos": len(pos), "n_neg": len(neg)}


def cached(path: Path, compute):
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    path.write_text(json.dumps(value))
    return value


def recovery_by_radius(noise: torch.Tensor, inverted: torch.Tensor) -> list[float]:
    """Correlation of the true and the inverted start noise, averaged over the Fourier coefficients of each
    integer radius (cycles per image)."""
    a, b = torch.fft.fft2(noise.double()), torch.fft.fft2(inverted.double())
    power = (a.abs() ** 2).sum(dim=(0, 1)) * (b.abs() ** 2).sum(dim=(0, 1))
    corr = (a * b.conj()).real.sum(dim=(0, 1)) / power.sqrt()
    f = torch.fft.fftfreq(noise.shape[-1], d=1 / noise.shape[-1])
    radius = (f[:, None] ** 2 + f[None, :] ** 2).sqrt()
    return [round(float(corr[(radius >= r) & (radius < r + 1)].mean()), 3) for r in range(noise.shape[-1] // 2)]


def inverted_noise(pipe, images: torch.Tensor, steps: int) -> torch.Tensor:
    """What ``detect_tree_ring`` inverts a 32 px RGB image to (prompt "", no guidance, no layout)."""
    return torch.cat([invert(pipe, images[i:i + 100], prompt="", steps=steps, guidance_scale=1.0,
                             layouts="none").noise for i in range(0, len(images), 100)])


def key_placement(noise: torch.Tensor, inverted: torch.Tensor) -> dict:
    """What a noise-space key would achieve in other places than the shipped ring, read off unwatermarked images:
    the key is the true start noise restricted to a subspace (its marginal is the watermarked noise's exactly), the
    statistic the detector would compute on the inverted noise. Rings: rho with its exact Beta p-value (TPR at
    p < 0.01). "matched": every frequency weighted by its measured recovery (the radius correlations of the first
    half of the images, where positive), tested on the second half: T = <W y, z> / |W y|, exactly N(0, 1) for a
    Gaussian key independent of the image, so z > 2.326 is 1% false positives."""
    shape, out = tuple(noise.shape[1:]), {}
    for lo, hi in ((0, 0), (0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (1, 5), (2, 8), (0, 16)):
        ring = treering.TreeRing(lo, hi)
        pz, py = ring.project(noise).flatten(1), ring.project(inverted).flatten(1)
        rho = (pz * py).sum(1) / (pz.norm(dim=1) * py.norm(dim=1))
        out[f"ring {lo}-{hi}"] = {"dim": ring.dim(shape), "mean_rho": round(float(rho.mean()), 4),
                                  "tpr_at_p01": round(float((ring.p_value(rho, shape) < 0.01).double().mean()), 4)}
    half = len(noise) // 2
    weights = torch.tensor(recovery_by_radius(noise[:half], inverted[:half]) + [0.0], dtype=torch.float64)
    f = torch.fft.fftfreq(noise.shape[-1], d=1 / noise.shape[-1], dtype=torch.float64)
    radius = (f[:, None] ** 2 + f[None, :] ** 2).sqrt().floor().long().clamp(max=len(weights) - 1)
    w = weights[radius].clamp(min=0)
    wy = torch.fft.ifft2(torch.fft.fft2(inverted[half:].double()) * w).real.flatten(1)
    t = (wy * noise[half:].double().flatten(1)).sum(1) / wy.norm(dim=1)
    out["matched"] = {"mean_z": round(float(t.mean()), 3), "tpr_at_1pct": round(float((t > 2.326).double().mean()), 4),
                      "weights_by_radius": [round(float(v), 3) for v in weights[:-1]], "n_test": len(t)}
    return out


def stage_treering(pipe, args, work: Path) -> None:
    ring, shape = treering.TreeRing(), (3, 32, 32)
    marked = load_images(work, "watermarked")
    pos_images, neg_images = pil_images(marked, args.n), real_images(args.real, 32)
    plain_images = pil_images(load_images(work, "plain"), args.n)  # (JPEG 75 only; clean: the inverted noise)

    def rhos(images, name, what):
        rng = random.Random(f"{name} {what}")
        edited = [edit(im, name, rng) for im in images]
        out = []
        for i in tqdm(range(0, len(edited), 100), desc=f"tree-ring {name} {what}", leave=False):
            out += detect_tree_ring(pipe, edited[i:i + 100], KEY, ring, steps=args.inversion_steps)
        return out

    plain = load_images(work, "plain")
    for run, data in (("watermarked", marked), ("plain", plain)):  # clean images' inverted noise, kept for analysis
        path = work / f"inverted-{run}.pt"
        if not path.exists():
            torch.save(inverted_noise(pipe, uint8_to_tensor(data["images"][:args.n]), args.inversion_steps), path)
    inverted, inverted_plain = torch.load(work / "inverted-watermarked.pt"), torch.load(work / "inverted-plain.pt")
    cached(work / "recovery.json", lambda: recovery_by_radius(plain["noise"][:args.n], inverted_plain))
    cached(work / "key-placement.json", lambda: key_placement(plain["noise"][:args.n], inverted_plain))
    for name in args.treering_edits:
        def compute(name=name):
            pos = ([float(r) for r in ring.correlation(inverted, KEY)] if name == "clean"
                   else rhos(pos_images, name, "pos"))
            r = {"pos": pos, "neg": rhos(neg_images, name, "neg")}
            if name == "clean":
                r["plain"] = [float(r) for r in ring.correlation(inverted_plain, KEY)]
            elif name == "jpeg75":
                r["plain"] = rhos(plain_images, name, "plain")
            return r
        r = cached(work / f"treering-{name}.json", compute)
        m = metrics(r["pos"], r["neg"], ring.p_value(r["pos"], shape), ring.p_value(r["neg"], shape))
        print(f"tree-ring {name}: {m}", flush=True)


def stage_pixel(args, work: Path) -> None:
    """Per edit (in ``EDITS`` order, so that a cut-short run has the first ones): the real images, then the
    watermarked ones (waiting for the ``images`` stage of another process if need be)."""
    negatives, positives = real_images(args.real, 256), None

    def scores(images, name, what):
        rng = random.Random(f"{name} {what}")
        found = [pixelmark.detect(edit(im, name, rng), KEY) for im in tqdm(images, desc=f"pixel {name} {what}",
                                                                           leave=False)]
        return {"score": [d.score for d in found], "p": [d.p_value for d in found]}

    for name in args.pixel_edits:
        neg = cached(work / f"pixel-neg-{name}.json", lambda name=name: scores(negatives, name, "neg"))
        if positives is None:
            small = pil_images(load_images(work, "watermarked", wait=True), args.n)
            positives = [pixelmark.embed(im.resize((256, 256), Image.NEAREST), KEY) for im in small]
            psnr = [10 * math.log10(255**2 / max(1e-12, float(np.mean((np.asarray(m, float) - np.asarray(
                im.resize((256, 256), Image.NEAREST), float)) ** 2)))) for m, im in zip(positives, small)]
            (work / "pixel-psnr.json").write_text(json.dumps(float(np.mean(psnr))))
        pos = cached(work / f"pixel-pos-{name}.json", lambda name=name, images=positives: scores(images, name, "pos"))
        print(f"pixel {name}: {metrics(pos['score'], neg['score'], pos['p'], neg['p'])}", flush=True)


def reference(pipe, args):
    name, options = reference_spec(pipe, EvalSettings())
    return (dataset_reference(name, resolution=32, n=args.fid_ref, precision=args.fid_precision, **options),
            f"{name} {options}")


def stage_fid(pipe, args, work: Path) -> None:
    ref, _ = reference(pipe, args)
    extractor = get_inception(precision=args.fid_precision)
    for run in RUNS:  # the floor's run only when the images2 stage made it
        if run == "plain_other_seeds" and not (work / f"images-{run}.pt").exists():
            continue

        def compute(run=run):
            images = uint8_to_tensor(load_images(work, run, wait=True)["images"])
            feats = image_features((images[i:i + 100] for i in range(0, len(images), 100)), extractor,
                                   total=len(images), desc=f"inception {run}")
            return evaluate_samples(feats, ref, ("fid", "kid"))
        print(f"fid {run}: {cached(work / f'fid-{run}.json', compute)}", flush=True)


def _cell(m: dict | None, key: str) -> str:
    return "-" if m is None else f"{m[key]:.3f}"


def markdown_table(table: dict) -> str:
    """The README's table: per edit, TPR at 1% FPR / AUC of each watermark."""
    rows = ["| edit | pixel TPR @1% FPR | pixel AUC | Tree-Ring TPR @1% FPR | Tree-Ring AUC | "
            "Tree-Ring TPR / FPR at p<0.01 |", "|---|---|---|---|---|---|"]
    for name in EDITS:
        p, t = table["pixel"].get(name), table["tree_ring"].get(name)
        analytic = "-" if t is None else f"{t['tpr_analytic']:.3f} / {t['fpr_analytic']:.3f}"
        rows.append(f"| {name} | {_cell(p, 'tpr_at_1pct_fpr')} | {_cell(p, 'auc')} | {_cell(t, 'tpr_at_1pct_fpr')} "
                    f"| {_cell(t, 'auc')} | {analytic} |")
    return "\n".join(rows)


def stage_report(pipe, args, work: Path) -> dict:
    ring, shape = treering.TreeRing(), (3, 32, 32)
    runs = {run: load_images(work, run) for run in RUNS if (work / f"images-{run}.pt").exists()}
    result = {"model": pipe.name, "model_hash": pipe.weights_hash, "per_prompt": args.per_prompt,
              "inversion_steps": args.inversion_steps, "ring": treering.record(KEY, ring),
              "pixel_scheme": pixelmark.SCHEME}
    if "plain" in runs and "watermarked" in runs:
        plain, marked = runs["plain"]["adherence"], runs["watermarked"]["adherence"]
        result["adherence"] = {run: {k: v for k, v in r["adherence"].items() if k not in ("per_prompt",)}
                               for run, r in runs.items()}
        a, b = plain["all_correct"], marked["all_correct"]
        n = plain["num_images"]
        result["adherence_all_correct_points"] = {"plain": round(100 * a, 2), "watermarked": round(100 * b, 2),
                                                  "difference": round(100 * (b - a), 2), "images": n}
    table = {"tree_ring": {}, "pixel": {}, "tree_ring_fpr_on_plain_generated": {}}
    for name in EDITS:
        path = work / f"treering-{name}.json"
        if path.exists():
            r = json.loads(path.read_text())
            table["tree_ring"][name] = metrics(r["pos"], r["neg"], ring.p_value(r["pos"], shape),
                                               ring.p_value(r["neg"], shape))
            if "plain" in r:
                plain_p = ring.p_value(r["plain"], shape).numpy()
                table["tree_ring_fpr_on_plain_generated"][name] = {
                    "fpr_analytic": float((plain_p < 0.01).mean()), "n": len(plain_p),
                    "auc_vs_watermarked": metrics(r["pos"], r["plain"], ring.p_value(r["pos"], shape),
                                                  plain_p)["auc"]}
        pos, neg = work / f"pixel-pos-{name}.json", work / f"pixel-neg-{name}.json"
        if pos.exists() and neg.exists():
            p, q = json.loads(pos.read_text()), json.loads(neg.read_text())
            table["pixel"][name] = metrics(p["score"], q["score"], p["p"], q["p"])
    result["table"] = table
    names = {"recovery": "noise_recovery_by_radius", "key-placement": "key_placement", "pixel-psnr": "pixel_psnr_db"}
    for name, key in names.items():
        if (work / f"{name}.json").exists():
            result[key] = json.loads((work / f"{name}.json").read_text())
    fid = {run: json.loads((work / f"fid-{run}.json").read_text()) for run in RUNS
           if (work / f"fid-{run}.json").exists()}
    if fid:
        result["fid"] = {**fid, "reference": reference_spec(pipe, EvalSettings())[0], "n_ref": args.fid_ref,
                         "inception_precision": args.fid_precision}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("adherence", "table")}, indent=1))
    print(markdown_table(table))
    print(f"wrote {args.output}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of: {', '.join(STAGES)}")
    ap.add_argument("--per-prompt", type=int, default=8, help="images per held-out prompt (72 prompts)")
    ap.add_argument("--prompts", type=int, default=72, help="the first N held-out prompts")
    ap.add_argument("--n", type=int, default=500, help="watermarked images per table cell")
    ap.add_argument("--real", type=int, default=500, help="real images per table cell (half shapes, half MNIST)")
    ap.add_argument("--inversion-steps", type=int, default=10)
    ap.add_argument("--pixel-edits", default=",".join(EDITS),
                    help="the edits the pixel stage measures (two processes can split them)")
    ap.add_argument("--treering-edits", default=",".join(EDITS), help="the edits the treering stage measures")
    ap.add_argument("--fid-ref", type=int, default=2000, help="real shapes renders behind the FID statistics")
    ap.add_argument("--fid-precision", choices=("fp32", "bf16"), default="bf16",
                    help="Inception precision (bf16: ~2.4x faster here; every set and the reference alike)")
    ap.add_argument("--work", default="out/watermark-bench", help="where the stages cache their results")
    ap.add_argument("-o", "--output", default="benchmarks/results/watermark.json")
    args = ap.parse_args()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    for option in ("pixel_edits", "treering_edits"):
        edits = [e.strip() for e in getattr(args, option).split(",") if e.strip()]
        if set(edits) - set(EDITS):
            raise SystemExit(f"unknown edits {sorted(set(edits) - set(EDITS))}; choose from {', '.join(EDITS)}")
        setattr(args, option, edits)
    if set(stages) - set(STAGES):
        raise SystemExit(f"unknown stages {sorted(set(stages) - set(STAGES))}; choose from {', '.join(STAGES)}")
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline.from_pretrained(MODEL)
    for stage in stages:
        t0 = time.time()
        if stage in ("images", "images2"):  # images2: the plain run of other seeds (the FID noise floor)
            stage_images(pipe, args, work, ["plain_other_seeds"] if stage == "images2" else ["plain", "watermarked"])
        elif stage == "treering":
            stage_treering(pipe, args, work)
        elif stage == "reference":
            reference(pipe, args)
        elif stage == "pixel":
            stage_pixel(args, work)
        elif stage == "fid":
            stage_fid(pipe, args, work)
        else:
            stage_report(pipe, args, work)
        print(f"stage {stage}: {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
