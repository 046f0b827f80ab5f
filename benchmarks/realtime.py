"""Real-time generation with the distilled model: latency of ``Pipeline.generate`` (4 images, 2 consistency
steps) over repeated calls in one process, as a page that redraws while a person types would call it.

    /work/tools/cpuslot --all python benchmarks/realtime.py     # -> benchmarks/results/realtime.json

For each variant (the network's weights in fp32 / bf16 via ``Pipeline.set_precision``, NCHW / channels_last;
bf16 + channels_last is the default on CPUs with AMX) it makes ``--calls`` calls after a warm-up and
reports p50 / p95 / mean in ms, with the same prompt every call (its text embedding and planned layout served
from the caches after the first) and with a new prompt every call (a held-out adherence prompt: MiniLM encodes
it and its object phrases, the planner draws its boxes). The model and text encoder load once, before timing.
The teacher's default call (20 guided dpmpp_2m steps, its default precision) is timed in the same run as the
reference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from reverie.cli.common import DEFAULT_MODEL
from reverie.eval.adherence import evaluation_prompts
from reverie.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle above a blue square"


def timed_calls(pipe, prompts, calls: int, warmup: int = 5, **settings) -> dict:
    ms = []
    for k in range(warmup + calls):
        prompt = prompts[k % len(prompts)]
        start = time.perf_counter()
        pipe.generate(prompt, num_images=4, seed=k, **settings)
        if k >= warmup:
            ms.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(ms, n=20)
    return {"p50_ms": round(statistics.median(ms), 2), "p95_ms": round(q[18], 2),
            "mean_ms": round(statistics.fmean(ms), 2), "min_ms": round(min(ms), 2), "calls": calls}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "src/reverie/assets/shapes-t2i-fast"))
    ap.add_argument("--teacher", default=str(DEFAULT_MODEL))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--teacher-calls", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/realtime.json"))
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))

    pipe = Pipeline.from_pretrained(args.model)
    new_prompts = evaluation_prompts()
    result = {"model": pipe.name, "hash": pipe.weights_hash, "threads": torch.get_num_threads(),
              "images_per_call": 4, "steps": args.steps, "variants": {}}
    for name, precision, channels_last in (("fp32", "fp32", False), ("fp32_channels_last", "fp32", True),
                                           ("bf16", "bf16", False), ("bf16_channels_last", "bf16", True)):
        pipe.set_precision(precision)
        pipe.net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        same = timed_calls(pipe, [PROMPT], args.calls, steps=args.steps)
        new = timed_calls(pipe, new_prompts, min(args.calls, len(new_prompts) - 5), steps=args.steps)
        result["variants"][name] = {"same_prompt": same, "new_prompt_each_call": new}
        print(f"{name}: same prompt p50 {same['p50_ms']:.1f} ms p95 {same['p95_ms']:.1f} ms; new prompt each call "
              f"p50 {new['p50_ms']:.1f} ms p95 {new['p95_ms']:.1f} ms", flush=True)
    teacher = Pipeline.from_pretrained(args.teacher)
    ref = timed_calls(teacher, [PROMPT], args.teacher_calls, warmup=2)
    result["teacher_default"] = {"model": teacher.name, "steps": teacher.cfg.sample.steps,
                                 "precision": teacher.precision, "sampler": teacher.cfg.sample.sampler, **ref}
    best = min(result["variants"].items(), key=lambda kv: kv[1]["same_prompt"]["p50_ms"])
    result["best"] = best[0]
    result["speedup_vs_teacher_p50"] = round(ref["p50_ms"] / best[1]["same_prompt"]["p50_ms"], 1)
    result["target_50ms_met"] = best[1]["same_prompt"]["p50_ms"] <= 50
    print(f"teacher ({teacher.cfg.sample.steps} guided steps, {teacher.precision}) p50 {ref['p50_ms']:.0f} ms; "
          f"best {best[0]}: {result['speedup_vs_teacher_p50']}x faster")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
