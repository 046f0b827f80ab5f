"""The shipped text-to-image model on onnxruntime (fp32 and static int8) against PyTorch (fp32, and bf16 weights
with channels_last, reverie's default on this CPU): size, latency and prompt adherence.

    python benchmarks/onnx_export.py --export --adherence     # export (fp32 + int8) and score adherence, ~1 thread
    /work/tools/cpuslot --all python benchmarks/onnx_export.py --timing   # latency on a quiet machine, 2 threads

- export: ``reverie.export.export_onnx(..., int8=True)`` into ``--dir`` (each graph checked against PyTorch);
- adherence (``reverie.eval.adherence``): ``--prompts`` held-out evaluation prompts x ``--per-prompt`` images,
  20 steps of dpmpp_2m at guidance 4 with planned layouts (the model's defaults), the same start noise for
  every runtime (PyTorch's seeded draw, passed to the ONNX runner), all-correct % and the rest of the scores;
- timing: each runtime in its own fresh process (onnxruntime's spinning thread pool slows torch in the same
  process): ``generate`` of ``--images`` images at 20 steps from a prompt (text encoding, layouts, sampling
  and conversion to uint8), median over ``--repeats`` after one warm-up, and the median denoiser call;
- size: the files each runtime loads (ONNX graphs; PyTorch: the model's safetensors plus MiniLM's).

Results go to ``--out`` (merged with what an earlier phase wrote).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MODEL = Path(__file__).resolve().parent.parent / "src" / "reverie" / "assets" / "shapes-t2i"
RUNTIMES = ("torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8")
PROMPT = "a green star to the left of a white ring"


class OnnxAsPipeline:
    """``reverie.onnx_runtime.OnnxPipeline`` behind ``Pipeline.sample``'s signature (what
    ``evaluate_adherence`` calls), starting from PyTorch's seeded noise so both runtimes see the same draw."""

    def __init__(self, pipe, onnx_pipe):
        self.pipe, self.onnx = pipe, onnx_pipe
        self.cfg, self.conditioning, self.takes_layouts = pipe.cfg, pipe.conditioning, pipe.takes_layouts

    def sample(self, num_images, steps, sampler, seed, prompts, guidance_scale, **extra):
        import torch

        from reverie.sampling import noise_shape

        noise = torch.randn(noise_shape(self.pipe, num_images), generator=torch.Generator().manual_seed(seed))
        x = self.onnx.sample(prompts, num_images, steps=steps, guidance_scale=guidance_scale, seed=seed,
                             noise=noise.numpy(), sampler=sampler, layouts=extra.get("layouts", "auto"))
        return torch.from_numpy(x)


def export(args) -> dict:
    from reverie.export import export_onnx
    from reverie.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(args.model, precision="fp32")
    t0 = time.perf_counter()
    report = export_onnx(pipe, args.dir, int8=True, calibration_prompts=args.calibration_prompts, progress=True,
                         name=pipe.name)
    return {"export_seconds": round(time.perf_counter() - t0, 1), "max_error_vs_pytorch": report.max_error,
            "int8_max_error_vs_fp32": report.int8_error, "calibration_prompts": args.calibration_prompts,
            "files_bytes": report.sizes}


def sizes(args) -> dict:
    from reverie.text.minilm import model_dir

    config = json.loads((args.dir / "reverie-onnx.json").read_text())
    mb = {"onnx-fp32": sum((args.dir / f).stat().st_size for f in config["graphs"].values()) / 1e6}
    int8 = {**config["graphs"], **(config["int8"] or {})}
    mb["onnx-int8"] = sum((args.dir / f).stat().st_size for f in int8.values()) / 1e6
    torch_mb = ((args.model / "model.safetensors").stat().st_size + (model_dir() / "model.safetensors").stat().st_size)
    mb["torch"] = torch_mb / 1e6
    per_graph = {f: round((args.dir / f).stat().st_size / 1e6, 2) for f in sorted(set(int8.values()) |
                                                                                   set(config["graphs"].values()))}
    return {"size_mb": {k: round(v, 2) for k, v in mb.items()}, "graph_mb": per_graph, "checks": config["checks"]}


def adherence(args) -> dict:
    from reverie.eval.adherence import evaluate_adherence, evaluation_prompts
    from reverie.onnx_runtime import OnnxPipeline
    from reverie.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(args.model, precision="fp32")
    prompts = evaluation_prompts()[: args.prompts]
    runs = {"torch-fp32": pipe, "onnx-fp32": OnnxAsPipeline(pipe, OnnxPipeline(args.dir)),
            "onnx-int8": OnnxAsPipeline(pipe, OnnxPipeline(args.dir, int8=True))}
    out = {}
    for name, model in runs.items():
        t0 = time.perf_counter()
        res = evaluate_adherence(model, prompts, num_per_prompt=args.per_prompt, steps=20, sampler="dpmpp_2m",
                                 guidance_scale=4.0, seed=0, batch_size=64)
        out[name] = {k: res[k] for k in ("all_correct", "color_accuracy", "shape_accuracy", "relation_accuracy",
                                         "count_accuracy", "num_images", "num_prompts")}
        out[name]["two_object_all_correct"] = res["two_object"]["all_correct"]
        out[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(name, json.dumps(out[name]), flush=True)
    return {"adherence": out, "adherence_settings": {"prompts": len(prompts), "per_prompt": args.per_prompt,
                                                     "steps": 20, "sampler": "dpmpp_2m", "guidance_scale": 4.0}}


TIMER = r"""
import json, os, statistics, sys, time
runtime, model, onnx_dir, images, repeats, prompt = sys.argv[1:7]
images, repeats, threads = int(images), int(repeats), int(os.environ.get("OMP_NUM_THREADS", "2"))
calls = []
if runtime.startswith("onnx"):
    import numpy as np
    from reverie.onnx_runtime import OnnxPipeline, to_uint8
    pipe = OnnxPipeline(onnx_dir, int8=runtime == "onnx-int8", threads=threads)
    run = pipe.run
    def timed_run(graph, feed):
        t = time.perf_counter(); out = run(graph, feed)
        if graph == "denoiser": calls.append(time.perf_counter() - t)
        return out
    pipe.run = timed_run
    generate = lambda: to_uint8(pipe.sample([prompt], images, seed=0))
else:
    import torch
    torch.set_num_threads(threads)
    from reverie.pipeline import Pipeline
    pipe = Pipeline.from_pretrained(model, precision=runtime.split("-")[1])  # bf16: bf16 weights, channels_last
    net = pipe.net.net
    forward = net.forward
    def timed_forward(*a, **k):
        t = time.perf_counter(); out = forward(*a, **k); calls.append(time.perf_counter() - t); return out
    net.forward = timed_forward
    generate = lambda: pipe.generate(prompt, num_images=images, seed=0)
generate()
calls.clear()
times = []
for _ in range(repeats):
    t = time.perf_counter(); generate(); times.append(time.perf_counter() - t)
print(json.dumps({"generate_ms": 1000 * statistics.median(times), "generate_ms_all": [1000 * t for t in times],
                  "denoiser_call_ms": 1000 * statistics.median(calls), "threads": threads}))
"""


def timing(args) -> dict:
    out = {}
    for runtime in RUNTIMES:
        proc = subprocess.run([sys.executable, "-c", TIMER, runtime, str(args.model), str(args.dir), str(args.images),
                               str(args.repeats), PROMPT], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{runtime} failed:\n{proc.stderr[-3000:]}")
        out[runtime] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(runtime, json.dumps(out[runtime]), flush=True)
    ref = out["torch-fp32"]["generate_ms"]
    for runtime in RUNTIMES:
        out[runtime]["speedup_vs_torch_fp32"] = round(ref / out[runtime]["generate_ms"], 2)
    threads = out["torch-fp32"]["threads"]
    return {f"latency_{threads}_threads": out,
            "timing_settings": {"images": args.images, "steps": 20, "repeats": args.repeats, "prompt": PROMPT,
                                "processes": "one fresh process per runtime"}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--dir", type=Path, default=Path("out/onnx-shapes-t2i"), help="ONNX export directory")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/onnx_export.json"))
    p.add_argument("--export", action="store_true", help="export fp32 + int8 into --dir")
    p.add_argument("--adherence", action="store_true")
    p.add_argument("--timing", action="store_true")
    p.add_argument("--calibration-prompts", type=int, default=16)
    p.add_argument("--prompts", type=int, default=72, help="held-out evaluation prompts (of 72)")
    p.add_argument("--per-prompt", type=int, default=4)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.export:
        results.update(export(args))
    results.update(sizes(args))
    if args.adherence:
        results.update(adherence(args))
    if args.timing:
        results.update(timing(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
