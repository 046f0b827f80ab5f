"""Memory of `reverie sample` against the number of images: it refuses a grid too large at once, and with
--out-dir it streams batch by batch, so its peak memory does not grow with --n.

Each measurement runs the real CLI in a fresh process and reads that process's peak resident memory
(``ru_maxrss`` of the child). Also prints the per-batch estimate that ``reverie.sampling.check_batch`` refuses
with, beside the measured growth per image, to show how conservative it is.

    python benchmarks/sample_memory.py                 # the shipped model, 2 sampling steps
    python benchmarks/sample_memory.py --counts 256 1024 4096 --json benchmarks/results/sample_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def run(args: list[str]) -> tuple[int, float, float, str]:
    """(exit status, peak RSS in MiB, seconds, last stderr line) of ``reverie ARGS`` in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK, sys.executable, "-m", "reverie", *args, "--quiet"],
                          capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    code, kib = proc.stdout.split()[-2:]
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    return int(code), int(kib) / 1024, seconds, last


def main() -> None:
    from reverie.cli.common import DEFAULT_MODEL

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--counts", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    results = {"model": args.model, "steps": args.steps, "streaming": [], "batches": []}
    with tempfile.TemporaryDirectory() as tmp:
        code, mib, secs, line = run(["sample", args.model, "--n", "100000", "-o", f"{tmp}/grid.png"])
        results["refusal"] = {"n": 100000, "exit": code, "seconds": secs, "peak_mib": mib, "message": line}
        print(f"--n 100000 into one grid: exit {code} after {secs:.1f} s, peak {mib:.0f} MiB: {line}")
        for n in args.counts:
            out = Path(tmp) / f"n{n}"
            code, mib, secs, _ = run(["sample", args.model, "--n", str(n), "--out-dir", str(out), "--batch-size",
                                      "64", "--steps", str(args.steps)])
            files = len(list(out.glob("*.png")))
            results["streaming"].append({"n": n, "exit": code, "peak_mib": mib, "seconds": secs, "files": files})
            print(f"--n {n:6d} --out-dir, batch 64: exit {code}, {files} files, peak {mib:7.0f} MiB, {secs:6.1f} s")
        for b in args.batch_sizes:
            code, mib, secs, _ = run(["sample", args.model, "--n", str(b), "-o", f"{tmp}/b{b}.png", "--batch-size",
                                      str(b), "--steps", str(args.steps)])
            results["batches"].append({"batch": b, "exit": code, "peak_mib": mib})
            print(f"batch {b:4d}: peak {mib:7.0f} MiB")
    estimate_per_image(args.model, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")


def estimate_per_image(model: str, results: dict) -> None:
    from reverie.pipeline import Pipeline
    from reverie.sampling import bytes_per_image

    pipe = Pipeline.from_pretrained(model)
    estimate = bytes_per_image(pipe, guided=pipe.conditioning != "none") / 2**20
    b = results["batches"]
    measured = (b[-1]["peak_mib"] - b[0]["peak_mib"]) / (b[-1]["batch"] - b[0]["batch"])
    results.update(estimate_mib_per_image=estimate, measured_mib_per_image=measured)
    print(f"memory per image in a batch: estimated {estimate:.2f} MiB (an upper bound), measured {measured:.2f} MiB")


if __name__ == "__main__":
    main()
