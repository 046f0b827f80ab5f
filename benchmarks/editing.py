"""Image editing, measured on generated ``shapes`` scenes with known objects (issue 21's acceptance).

The shipped text-to-image model (``reverie/assets/shapes-t2i``) draws two-object scenes from fixed seeded
prompts; the shipped detector (``reverie/assets/shapes-classifier``) reads color, shape and center of each
object. Scenes where it finds exactly the two prompted objects are the test set (their detected centers
and planned boxes are the truth). Then:

* **Inpainting**: the first object's box (2 px margin) is repainted under a prompt naming a new object
  (a color and shape neither object has), keeping the box in the layout. Success: the detector finds the
  new color and shape within the box and the other object unchanged. Unmasked pixels are compared for
  equality; the seam is the gradient energy in the 2-px band along the mask edge (one pixel either side),
  relative to the same band on real renders of the training data with the same masks.
  Two methods, side by side: (a) training-free RePaint on the text-to-image model, without resampling
  (resample 1) and with RePaint's resampling (jump 5, resample 2); (b) the mask-aware model
  (``--inpaint-model``, default ``runs/shapes-inpaint`` from ``reverie train configs/shapes-inpaint.yaml``: the
  same model fine-tuned with the masked image and the mask as extra input channels; not shipped, as it did not
  beat (a)), sampled with the default sampler at the same number of steps, with the known region put back
  at each step's noise level (``blend``, the default) and without it (the model alone).
* **img2img** at strengths 0.3 / 0.5 / 0.7 under the prompt with the first object's color changed:
  the change rate (new color, same shape, at the same place) and the position kept (centroid within 2 px).
* **Inversion**: reconstruction PSNR at 10 / 20 / 50 steps, guidance 1 and 4, plain DDIM and exact.
* **Prompt edits** (color of the first object for half the scenes, shape for the other half): exact
  inversion under the source prompt, regeneration under the target with ``edit``'s default local blending
  (only the changed layout box, +2 px, is regenerated), with and without fresh noise in that box
  (``--fresh-noise``: 0 and the default 0.75); success, the other object kept (color, shape, within 2 px),
  and the background PSNR (pixels outside both boxes with a 2 px margin).

    python benchmarks/editing.py                 # everything in one process
    python benchmarks/editing.py --part scenes   # or: the scenes first, then the parts in parallel processes,
    python benchmarks/editing.py --part inpainting &   # inpainting_model, img2img, prompt_edit, inversion likewise
    python benchmarks/editing.py --part collect  # -> benchmarks/results/editing.json, editing.png, editing_img2img.png
    python benchmarks/editing.py --quick         # 24 scenes, a smoke run
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from reverie.data.masks import box_pixels
from reverie.data.shapes import COLOR_NAMES, SHAPES, ShapesDataset
from reverie.editing import edit, fixed_layouts, img2img, inpaint, invert
from reverie.eval.attributes import load_classifier
from reverie.images import make_grid, to_pil
from reverie.pipeline import Pipeline
from reverie.sampling import SamplingOptions, sample_images

RESULTS = Path(__file__).resolve().parent / "results"
RELATIONS = ("above", "below", "left of", "right of")
SIDE = 32


def phrase(color: int, shape: int) -> str:
    return f"{COLOR_NAMES[color]} {SHAPES[shape]}"


def scene_prompts(n: int, seed: int = 0) -> list[dict]:
    """Two objects with different colors and shapes and a relation; a third (color, shape) for inpainting."""
    rng = random.Random(f"reverie.editing-benchmark/{seed}")
    scenes = []
    for k in range(n):
        colors = rng.sample(range(len(COLOR_NAMES)), 3)
        shapes = rng.sample(range(len(SHAPES)), 3)
        a, b, new = (colors[0], shapes[0]), (colors[1], shapes[1]), (colors[2], shapes[2])
        scenes.append({"a": a, "b": b, "new": new, "rel": RELATIONS[k % 4]})
    return scenes


def prompt(first: tuple[int, int], scene: dict) -> str:
    return f"a {phrase(*first)} {scene['rel']} a {phrase(*scene['b'])}"


def detect(classifier, images: torch.Tensor) -> dict:
    pred = classifier.predict(images)
    pred["center"] = pred["center"] * SIDE  # pixels
    return pred


def find(pred: dict, n: int, color: int, shape: int):
    """Center (pixels) of the detected object of image n with this color and shape, else None."""
    for k in range(int(pred["count"][n].clamp(max=3))):
        if int(pred["color"][n, k]) == color and int(pred["shape"][n, k]) == shape:
            return pred["center"][n, k]
    return None


def nearest(pred: dict, n: int, point: torch.Tensor):
    """(color, shape, center) of the detected object of image n nearest to ``point``, else None."""
    best = None
    for k in range(int(pred["count"][n].clamp(max=3))):
        d = float((pred["center"][n, k] - point).norm())
        if best is None or d < best[0]:
            best = (d, int(pred["color"][n, k]), int(pred["shape"][n, k]), pred["center"][n, k])
    return None if best is None else best[1:]


def box_mask(box, margin: float = 2.0) -> torch.Tensor:
    """A [32, 32] 0/1 mask of a layout box (image fractions) grown by ``margin`` pixels."""
    return box_pixels(box, SIDE, margin)


def band(mask: torch.Tensor) -> torch.Tensor:
    """The 2-px band along the edge of masks ``[B, 1, H, W]``: one pixel either side."""
    grown = F.max_pool2d(mask, 3, 1, 1)
    shrunk = 1 - F.max_pool2d(1 - mask, 3, 1, 1)
    return (grown - shrunk).bool()


def gradient_energy(images: torch.Tensor, where: torch.Tensor) -> float:
    """Mean squared forward difference (x and y, summed over channels) over the pixels ``where``."""
    dx = F.pad(images[..., :, 1:] - images[..., :, :-1], (0, 1)).pow(2).sum(1, keepdim=True)
    dy = F.pad(images[..., 1:, :] - images[..., :-1, :], (0, 0, 0, 1)).pow(2).sum(1, keepdim=True)
    return float((dx + dy)[where].mean())


def psnr(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor | None = None) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), per image then averaged."""
    err = (a - b).pow(2)
    if where is None:
        mse = err.flatten(1).mean(1)
    else:
        w = where.expand_as(err).float()
        mse = (err * w).flatten(1).sum(1) / w.flatten(1).sum(1)
    return float((10 * torch.log10(4 / mse.clamp(min=1e-20))).mean())


def batched(fn, n: int, batch: int, *arrays, **kw) -> torch.Tensor:
    """``fn`` over chunks of every list / tensor in ``arrays`` (prompts, images, masks, layouts)."""
    out = []
    for s in range(0, n, batch):
        out.append(fn(*[a[s:s + batch] for a in arrays], **kw))
    return torch.cat(out)


def make_scenes(pipe, classifier, num: int, steps: int, batch: int) -> dict:
    scenes = scene_prompts(int(num * 1.9) + 8)  # about 60 % of the scenes come out with both objects detected
    prompts = [prompt(s["a"], s) for s in scenes]
    options = fixed_layouts(pipe, SamplingOptions(steps=steps, seed=0).resolve(pipe.cfg), prompts)
    images = batched(lambda p, lay: sample_images(pipe, len(p), SamplingOptions.make(options, layouts=lay),
                                                  prompts=p), len(prompts), batch, prompts, options.layouts)
    pred = detect(classifier, images)
    keep = []
    for n, s in enumerate(scenes):
        ca, cb = find(pred, n, *s["a"]), find(pred, n, *s["b"])
        if int(pred["count"][n]) == 2 and ca is not None and cb is not None:
            keep.append(n)
            s.update(center_a=ca, center_b=cb, layout=options.layouts[n])
    keep = keep[:num]
    return {"scenes": [scenes[n] for n in keep], "images": images[keep], "prompts": [prompts[n] for n in keep],
            "generated": len(prompts), "correct": len(keep)}


def relabel(layout, first: tuple[int, int]):
    return [(phrase(*first), layout[0][1])] + list(layout[1:])


def inpainting_task(data: dict) -> dict:
    """Masks (the first object's box grown by 2 px), prompts naming the new object, relabelled layouts."""
    scenes = data["scenes"]
    return {"masks": torch.stack([box_mask(s["layout"][0][1]) for s in scenes])[:, None],
            "prompts": [prompt(s["new"], s) for s in scenes],
            "layouts": [relabel(s["layout"], s["new"]) for s in scenes]}


def measure_inpainting(pipe, classifier, data: dict, steps: int, batch: int, real: torch.Tensor,
                       methods: dict) -> dict:
    """``methods``: name -> keywords of ``reverie.editing.inpaint`` (method, jump_length, resample, blend), all on
    ``pipe``."""
    scenes, images = data["scenes"], data["images"]
    task = inpainting_task(data)
    masks = task["masks"]
    edge = band(masks)
    real_energy = gradient_energy(real[:len(scenes)], edge)
    results, outputs = {}, {}
    for name, kw in methods.items():
        start = time.perf_counter()

        def run(im, m, p, lay, kw=kw):
            return inpaint(pipe, im, m, p, steps=steps, layouts=lay, seed=1, **kw)

        out = batched(run, len(scenes), batch, images, masks, task["prompts"], task["layouts"])
        seconds = time.perf_counter() - start
        out = quantize(out)
        pred = detect(classifier, out)
        ok, other_ok = 0, 0
        for n, s in enumerate(scenes):
            x0, y0, x1, y1 = (v * SIDE for v in s["layout"][0][1])
            c = find(pred, n, *s["new"])
            ok += c is not None and x0 - 2 <= float(c[0]) <= x1 + 2 and y0 - 2 <= float(c[1]) <= y1 + 2
            cb = find(pred, n, *s["b"])
            other_ok += cb is not None and float((cb - s["center_b"]).norm()) <= 2
        keep = masks.expand_as(out) == 0
        results[name] = {
            "model": pipe.name, "model_hash": pipe.weights_hash, **kw, "nfe_per_image": steps * kw.get("resample", 1),
            "new_object_correct": ok / len(scenes), "other_object_kept": other_ok / len(scenes),
            "unmasked_identical": bool(torch.equal(out[keep], quantize(images)[keep])),
            "seam_energy": gradient_energy(out, edge), "seam_energy_input": gradient_energy(quantize(images), edge),
            "seam_energy_real": real_energy, "seam_ratio_to_real": gradient_energy(out, edge) / real_energy,
            "seconds": round(seconds, 1)}
        outputs[name] = out
        print(name, json.dumps(results[name]), flush=True)
    return {"results": results, "outputs": outputs, "masks": masks}


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Images as saved to 8-bit PNG and read back."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def measure_img2img(pipe, classifier, data: dict, steps: int, batch: int) -> dict:
    scenes, images = data["scenes"], data["images"]
    targets = [((s["a"][0] + 1 + n % (len(COLOR_NAMES) - 1)) % len(COLOR_NAMES), s["a"][1])
               for n, s in enumerate(scenes)]
    targets = [(c if c != s["b"][0] else (c + 1) % len(COLOR_NAMES), sh) for (c, sh), s in zip(targets, scenes)]
    prompts = [prompt(t, s) for t, s in zip(targets, scenes)]
    layouts = [relabel(s["layout"], t) for t, s in zip(targets, scenes)]
    curve, outputs = [], {}
    for strength in (0.3, 0.5, 0.7):
        def run(im, p, lay, st=strength):
            return img2img(pipe, im, p, strength=st, steps=steps, layouts=lay, seed=2)

        out = quantize(batched(run, len(scenes), batch, images, prompts, layouts))
        pred = detect(classifier, out)
        changed = kept = both = 0
        for n, (s, t) in enumerate(zip(scenes, targets)):
            got = nearest(pred, n, s["center_a"])
            close = got is not None and float((got[2] - s["center_a"]).norm()) <= 2
            new = got is not None and (got[0], got[1]) == t and float((got[2] - s["center_a"]).norm()) <= 4
            changed += new
            kept += close
            both += new and close
        curve.append({"strength": strength, "attribute_changed": changed / len(scenes),
                      "position_kept": kept / len(scenes), "changed_and_kept": both / len(scenes)})
        outputs[strength] = out
    return {"curve": curve, "outputs": outputs, "targets": targets}


def measure_inversion(pipe, data: dict, batch: int, num: int, step_counts=(10, 20, 50), guidances=(1.0, 4.0)
                      ) -> list[dict]:
    images, prompts = data["images"][:num], data["prompts"][:num]
    layouts = [s["layout"] for s in data["scenes"][:num]]
    rows = []
    for guidance in guidances:
        for steps in step_counts:
            inv = [invert(pipe, images[s:s + batch], prompts[s:s + batch], steps=steps, guidance_scale=guidance,
                          method="exact", layouts=layouts[s:s + batch]) for s in range(0, num, batch)]
            plain = torch.cat([sample_images(pipe, len(i.prompts), i.options, prompts=i.prompts, noise=i.noise)
                               for i in inv])
            exact = torch.cat([sample_images(pipe, len(i.prompts), i.options, prompts=i.prompts, noise=i.noise,
                                             callback=i.callback()) for i in inv])
            noise = torch.cat([i.noise for i in inv])
            rows.append({"guidance": guidance, "steps": steps, "psnr_plain_ddim": psnr(plain, images),
                         "psnr_exact": psnr(exact, images), "noise_std": float(noise.std())})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def measure_prompt_edit(pipe, classifier, data: dict, steps: int, batch: int, guidance: float,
                        fresh_noise: float = 0.75) -> dict:
    scenes, images = data["scenes"], data["images"]
    targets = []
    for n, s in enumerate(scenes):
        c, sh = s["a"]
        if n % 2 == 0:  # color edit
            c = next(k for k in range(c + 1, c + len(COLOR_NAMES)) if k % len(COLOR_NAMES) != s["b"][0]) \
                % len(COLOR_NAMES)
        else:  # shape edit
            sh = next(k for k in range(sh + 1, sh + len(SHAPES)) if k % len(SHAPES) != s["b"][1]) % len(SHAPES)
        targets.append((c, sh))
    sources = data["prompts"]
    target_prompts = [prompt(t, s) for t, s in zip(targets, scenes)]
    layouts = [s["layout"] for s in scenes]
    start = time.perf_counter()
    out = quantize(batched(lambda im, sp, tp, lay: edit(pipe, im, sp, tp, steps=steps, guidance_scale=guidance,
                                                         layouts=lay, fresh_noise=fresh_noise),
                           len(scenes), batch, images, sources, target_prompts, layouts))
    seconds = time.perf_counter() - start
    pred = detect(classifier, out)
    success = other = both = 0
    for n, (s, t) in enumerate(zip(scenes, targets)):
        got = nearest(pred, n, s["center_a"])
        ok = got is not None and (got[0], got[1]) == t and float((got[2] - s["center_a"]).norm()) <= 4
        cb = find(pred, n, *s["b"])
        kept = cb is not None and float((cb - s["center_b"]).norm()) <= 2
        success += ok
        other += kept
        both += ok and kept
    background = torch.stack([1 - torch.maximum(box_mask(s["layout"][0][1]), box_mask(s["layout"][1][1]))
                              for s in scenes])[:, None].bool()
    n = len(scenes)
    return {"result": {"guidance": guidance, "steps": steps, "local_blend": "auto", "fresh_noise": fresh_noise,
                       "edit_success": success / n,
                       "other_kept": other / n,
                       "success_and_other_kept": both / n, "background_psnr": psnr(out, quantize(images), background),
                       "seconds": round(seconds, 1)},
            "output": out, "targets": targets}


def picture(data: dict, outputs: dict, path: Path, rows: int = 6) -> None:
    """Columns: input, inpainting mask, inpainted by (a) RePaint with resampling and (b) the mask-aware model (if
    measured), img2img 0.3 / 0.5 / 0.7, prompt edit."""
    images = quantize(data["images"][:rows])
    mask = outputs["masks"][:rows].expand(-1, 3, -1, -1) * 2 - 1
    edits = sorted(k for k in outputs if k.startswith("edit_"))
    edit_key = "edit_4.0_f0.75" if "edit_4.0_f0.75" in edits else edits[-1]  # the defaults' edit
    inpainted = [outputs[k][:rows] for k in ("inpainted", "inpainted_model") if k in outputs]
    cols = [images, mask, *inpainted, *(outputs[f"img2img_{s}"][:rows] for s in (0.3, 0.5, 0.7)),
            outputs[edit_key][:rows]]
    tiles = to_pil(torch.stack(cols, 1).flatten(0, 1))
    make_grid(tiles, ncols=len(cols), scale=3).save(path)


def img2img_plot(curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.2), dpi=120)
    s = [c["strength"] for c in curve]
    ax.plot(s, [c["attribute_changed"] for c in curve], "o-", label="color changed")
    ax.plot(s, [c["position_kept"] for c in curve], "s-", label="centroid within 2 px")
    ax.plot(s, [c["changed_and_kept"] for c in curve], "^--", label="both")
    ax.set_xlabel("strength")
    ax.set_ylabel("fraction of scenes")
    ax.set_ylim(0, 1.02)
    ax.set_title("img2img: change against preservation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


PARTS = ("inpainting", "inpainting_model", "img2img", "prompt_edit", "inversion")
INPAINT_MODEL = "runs/shapes-inpaint"  # where `reverie train configs/shapes-inpaint.yaml` trains (b)


def save_scenes(data: dict, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"images": data["images"].contiguous()}, str(path.with_suffix(".safetensors")))
    scenes = [{**s, "center_a": s["center_a"].tolist(), "center_b": s["center_b"].tolist()} for s in data["scenes"]]
    path.with_suffix(".json").write_text(json.dumps({**{k: data[k] for k in ("prompts", "generated", "correct")},
                                                     "scenes": scenes}))


def load_scenes(path: Path) -> dict:
    from safetensors.torch import load_file

    data = json.loads(path.with_suffix(".json").read_text())
    for s in data["scenes"]:
        s.update(center_a=torch.tensor(s["center_a"]), center_b=torch.tensor(s["center_b"]),
                 a=tuple(s["a"]), b=tuple(s["b"]), new=tuple(s["new"]),
                 layout=[(ph, tuple(box)) for ph, box in s["layout"]])
    data["images"] = load_file(str(path.with_suffix(".safetensors")))["images"]
    return data


def run_part(part: str, pipe, classifier, data: dict, args) -> tuple[object, dict]:
    """(the JSON result, the outputs the picture needs) of one part."""
    if part in ("inpainting", "inpainting_model"):
        real = torch.stack([ShapesDataset(resolution=SIDE, max_objects=2, min_objects=2, seed=7)[i]["image"]
                            for i in range(len(data["scenes"]))])
        if part == "inpainting":  # (a): training-free, on the text-to-image model
            methods = {"repaint_r1": dict(method="repaint", jump_length=1, resample=1),
                       f"repaint_j5_r{args.resample}": dict(method="repaint", jump_length=5, resample=args.resample)}
            inp = measure_inpainting(pipe, classifier, data, args.steps, args.batch, real, methods)
            return inp["results"], {"inpainted": inp["outputs"][f"repaint_j5_r{args.resample}"], "masks": inp["masks"]}
        model = Pipeline.from_pretrained(args.inpaint_model)  # (b): the mask-aware model
        methods = {"model": dict(method="model"), "model_unblended": dict(method="model", blend=False)}
        inp = measure_inpainting(model, classifier, data, args.steps, args.batch, real, methods)
        return inp["results"], {"inpainted_model": inp["outputs"]["model"]}
    if part == "img2img":
        i2i = measure_img2img(pipe, classifier, data, args.steps, args.batch)
        return i2i["curve"], {f"img2img_{s}": out for s, out in i2i["outputs"].items()}
    if part == "prompt_edit":
        rows, outputs = [], {}
        for guidance in args.edit_guidance:
            for fresh in args.fresh_noise:
                e = measure_prompt_edit(pipe, classifier, data, args.steps, args.batch, guidance, fresh)
                rows.append(e["result"])
                print(json.dumps(e["result"]), flush=True)
                outputs[f"edit_{guidance}_f{fresh}"] = e["output"]
        return rows, outputs
    return measure_inversion(pipe, data, args.batch, min(args.inversion_scenes, data["correct"]),
                             args.inversion_steps, args.inversion_guidance), {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenes", type=int, default=104)
    ap.add_argument("--steps", type=int, default=20, help="editing steps")
    ap.add_argument("--scene-steps", type=int, default=20, help="steps that generate the test scenes")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--inversion-scenes", type=int, default=32)
    ap.add_argument("--resample", type=int, default=2, help="RePaint passes per block of 5 steps (against 1)")
    ap.add_argument("--inpaint-model", default=INPAINT_MODEL,
                    help="(b): a mask-aware model directory or training run (skipped when absent)")
    ap.add_argument("--inversion-steps", type=int, nargs="+", default=[10, 20, 50])
    ap.add_argument("--inversion-guidance", type=float, nargs="+", default=[1.0, 4.0])
    ap.add_argument("--edit-guidance", type=float, nargs="+", default=[1.0, 4.0])
    ap.add_argument("--fresh-noise", type=float, nargs="+", default=[0.0, 0.75],
                    help="prompt edits: shares of the start noise drawn anew in the changed box (0.75: the default)")
    ap.add_argument("--part", choices=("scenes", *PARTS, "collect", "all"), default="all",
                    help="run one part (after --part scenes; the parts may run in parallel), then --part collect")
    ap.add_argument("--work", default="out/editing-benchmark", help="folder for the scenes and part results")
    ap.add_argument("--limit", type=int, default=0, help="measure on the first N cached scenes only")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "editing.json"))
    args = ap.parse_args()
    if args.quick:
        args.scenes, args.inversion_scenes = 24, 8
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline.from_pretrained(Path(__file__).resolve().parent.parent / "src/reverie/assets/shapes-t2i")
    classifier = load_classifier()
    t0 = time.perf_counter()
    if args.part in ("scenes", "all"):
        data = make_scenes(pipe, classifier, args.scenes, args.scene_steps, args.batch)
        save_scenes(data, work / "scenes")
        print(f"{data['correct']} scenes with both objects detected (of {data['generated']} generated) in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    data = load_scenes(work / "scenes")
    if args.limit:  # the first scenes only (a shorter run)
        data.update(scenes=data["scenes"][:args.limit], images=data["images"][:args.limit],
                    prompts=data["prompts"][:args.limit], correct=min(data["correct"], args.limit))
    parts = [p for p in PARTS if p != "inpainting_model" or Path(args.inpaint_model).is_dir()]
    for part in parts if args.part == "all" else (args.part,) if args.part in PARTS else ():
        start = time.perf_counter()
        result, outputs = run_part(part, pipe, classifier, data, args)
        from safetensors.torch import save_file

        (work / f"{part}.json").write_text(json.dumps({"result": result,
                                                       "seconds": round(time.perf_counter() - start, 1)}))
        if outputs:
            save_file({k: v.contiguous() for k, v in outputs.items()}, str(work / f"{part}.safetensors"))
        print(part, json.dumps(result), flush=True)
    if args.part in ("collect", "all"):
        collect(pipe, data, work, args)


def collect(pipe, data: dict, work: Path, args) -> None:
    from safetensors.torch import load_file

    report = {"model": pipe.name, "model_hash": pipe.weights_hash, "scenes": data["correct"],
              "generated": data["generated"], "scene_steps": args.scene_steps, "steps": args.steps,
              "machine": "2-core Xeon (AMX), torch 2.13 CPU, shared with other jobs (times are not comparable)"}
    outputs = {}
    for part in PARTS:
        if not (work / f"{part}.json").is_file():
            report.setdefault("not_measured", []).append(part)
            continue
        found = json.loads((work / f"{part}.json").read_text())
        report[part], report[f"{part}_seconds"] = found["result"], found["seconds"]
        if (work / f"{part}.safetensors").is_file():
            outputs.update(load_file(str(work / f"{part}.safetensors")))
    if "inpainting_model" in report:  # (a) against (b), one table
        report["inpainting"].update(report.pop("inpainting_model"))
        report["inpainting_seconds"] += report.pop("inpainting_model_seconds")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    stem = out.with_suffix("")
    if {"inpainting", "img2img", "prompt_edit"} <= set(report):
        picture(data, outputs, Path(f"{stem}.png"))
    if "img2img" in report:
        img2img_plot(report["img2img"], Path(f"{stem}_img2img.png"))
    print(f"wrote {out}, {stem}.png and {stem}_img2img.png")


if __name__ == "__main__":
    main()
