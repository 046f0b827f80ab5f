"""Speed of the shipped model's ``Pipeline.generate`` (4 images, 20 steps): this tree's precisions against a
baseline source tree (e.g. main at an earlier commit), interleaved.

    git archive 2d11505 src | tar -x -C /tmp/base      # the baseline's sources
    python benchmarks/generate_speed.py --baseline-src /tmp/base/src --out benchmarks/results/generate_speed.json

Each configuration (``baseline``: the baseline tree as it was; ``fp32`` and ``auto``: this tree with
``Pipeline.from_pretrained(precision=...)``, auto being bf16 + channels_last on CPUs with AMX/AVX512-BF16) runs
in its own subprocess per round (so that both trees can be imported), loads the model, generates once to warm
up, then times ``--calls`` generations of 4 images at 20 steps (``dpmpp_2m``, guidance 4, planned layouts: the
model's defaults), each with its own seed. Rounds alternate the order of the configurations, so that a machine
whose load drifts slows all alike; the figure per configuration is the median over all timed calls, and each
speedup is the baseline's median over the configuration's. Wall-clock time (``--timer wall``) or this process's
CPU time (``--timer cpu``: steadier on a shared machine with one thread).

``auto+compile``: ``auto`` with ``Pipeline.compile()`` (torch.compile of the U-Net). Its first call compiles and
is reported apart (``compile_s``), with how far its images are from the eager ones of the same seed (mean
absolute difference in 0-255 levels, and the share of pixel values off by more than 8); the timed calls follow.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle above a blue square", "a green triangle to the left of a yellow star",
           "a white ring", "a purple diamond below an orange heart"]


def child(config: str, calls: int, timer: str) -> dict:
    import numpy as np
    import torch  # noqa: F401  (imported before timing)

    from reverie.cli.common import DEFAULT_MODEL
    from reverie.pipeline import Pipeline

    precision, compiled = config.removesuffix("+compile"), config.endswith("+compile")
    kwargs = {} if precision == "baseline" else {"precision": precision}
    pipe = Pipeline.from_pretrained(DEFAULT_MODEL, **kwargs)
    clock = time.process_time if timer == "cpu" else time.perf_counter
    eager = pipe.generate(PROMPTS[0], num_images=4, steps=20, seed=0)
    extra = {}
    if compiled:  # the first call compiles; its images against the eager ones of the same seed
        start = time.perf_counter()
        got = pipe.compile().generate(PROMPTS[0], num_images=4, steps=20, seed=0)
        diff = np.abs(np.stack([np.asarray(i, np.int16) for i in got]) - np.stack([np.asarray(i, np.int16)
                                                                                    for i in eager]))
        extra = {"compile_s": time.perf_counter() - start, "mean_abs_diff_vs_eager": float(diff.mean()),
                 "pixels_off_by_more_than_8": float((diff > 8).mean())}
    times = []
    for k in range(calls):
        start = clock()
        pipe.generate(PROMPTS[k % len(PROMPTS)], num_images=4, steps=20, seed=k + 1)
        times.append(clock() - start)
    return {"precision": getattr(pipe, "precision", "fp32") + ("+compile" if compiled else ""), "times_s": times,
            **extra}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline-src", default=None, help="src/ folder of the baseline tree (omit: no baseline)")
    p.add_argument("--configs", default="fp32,auto,auto+compile",
                   help="this tree's precisions (comma list; +compile: Pipeline.compile)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=3, help="timed generations per round and configuration")
    p.add_argument("--timer", choices=["wall", "cpu"], default="wall")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generate_speed.json"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.calls, args.timer)))
        return
    configs = {name: str(ROOT / "src") for name in args.configs.split(",")}
    if args.baseline_src:
        configs = {"baseline": args.baseline_src, **configs}
    times = {name: [] for name in configs}
    resolved, compiled = {}, {}
    for r in range(args.rounds):
        for name in (list(configs) if r % 2 == 0 else list(configs)[::-1]):
            env = {**os.environ, "PYTHONPATH": configs[name], "TQDM_DISABLE": "1"}
            cmd = [sys.executable, __file__, "--child", name, "--calls", str(args.calls), "--timer", args.timer]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if out.returncode:
                raise SystemExit(f"{name} failed:\n{out.stderr[-2000:]}")
            got = json.loads(out.stdout.strip().splitlines()[-1])
            times[name] += got["times_s"]
            resolved[name] = got["precision"]
            if "compile_s" in got:
                compiled.setdefault(name, []).append({k: got[k] for k in ("compile_s", "mean_abs_diff_vs_eager",
                                                                          "pixels_off_by_more_than_8")})
            print(f"round {r} {name:8s} ({got['precision']}): " + " ".join(f"{t:.3f}" for t in got["times_s"]),
                  flush=True)
    median = {name: statistics.median(v) for name, v in times.items()}
    reference = "baseline" if "baseline" in median else next(iter(median))
    result = {"what": "Pipeline.generate of the shipped shapes-t2i model, 4 images, 20 steps (dpmpp_2m, guidance 4)",
              "timer": args.timer, "threads": os.environ.get("OMP_NUM_THREADS", "torch default"),
              "baseline_src": args.baseline_src, "precisions": resolved, "times_s": times, "median_s": median,
              "speedup_vs_" + reference: {name: median[reference] / m for name, m in median.items()},
              "compile": compiled,
              "command": " ".join([os.path.basename(sys.executable), *sys.argv])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, m in median.items():
        print(f"{name:8s} {m:.3f} s per generate  {median[reference] / m:.2f}x {reference}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
