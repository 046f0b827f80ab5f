"""Training-step throughput of a config's network, eager vs ``torch.compile``, in the same run.

    python benchmarks/train_compile.py                                  # configs/shapes-tiny.yaml, 2 threads
    python benchmarks/train_compile.py --config configs/shapes-t2i-scratch.yaml --threads 1

One training step here is what the trainer does per batch: encode the captions (text models; the
encoder stays eager), forward under the config's mixed precision, a squared-error loss, backward and
AdamW; whether every loss stayed finite is recorded too. Each mode runs in its own subprocess (so
compiled code and caches do not leak into the eager timing) and reports images/s after its warm-up;
the compiled mode also reports the warm-up (compilation) time, which is what a short run pays before
the speed-up starts.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(config: str, mode: str, batch: int, steps: int, threads: int, precision: str | None = None) -> dict:
    import torch

    from reverie.build import build_dataset, build_network, dataset_info
    from reverie.configs import load_config
    from reverie.train.config import TrainConfig

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    cfg = load_config(TrainConfig, config, [f"--train.mixed_precision={precision}"] if precision else [])
    dataset = build_dataset(cfg)
    net = build_network(cfg, dataset_info(dataset))
    image_net = net.net if hasattr(net, "encoder") else net
    if mode == "compile":
        image_net.compile()
    samples = [dataset[i] for i in range(batch)]
    x = torch.stack([s["image"] for s in samples])
    texts = [s["text"] for s in samples]
    c_noise = torch.rand(batch)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    precision = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision)

    losses = []

    def step():
        with torch.autocast("cpu", dtype=precision or torch.float32, enabled=precision is not None):
            cond = net.encode(texts) if hasattr(net, "encoder") else {}
            out = image_net(x, c_noise, **cond)
            loss = (out.float() - x).square().mean()
        losses.append(loss.detach())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(3):
        step()
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - t0
    finite = bool(torch.isfinite(torch.stack(losses)).all())
    return {"mode": mode, "img_s": steps * batch / seconds, "warmup_s": warmup, "steps": steps,
            "precision": cfg.train.mixed_precision, "all_losses_finite": finite,
            "first_nonfinite_step": next((k for k, v in enumerate(losses) if not torch.isfinite(v)), None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/shapes-tiny.yaml")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=60, help="timed steps per mode (after 3 warm-up steps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=["no", "bf16", "fp16"], help="override the config's mixed_precision")
    ap.add_argument("--out", default="benchmarks/results/train_compile_cpu.json", help="result JSON")
    ap.add_argument("--one", choices=["eager", "compile"], help=argparse.SUPPRESS)  # worker mode
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.config, args.one, args.batch, args.steps, args.threads, args.precision)))
        return
    import torch

    rows = []
    for mode in ("eager", "compile"):
        cmd = [sys.executable, __file__, "--one", mode, "--config", args.config, "--batch", str(args.batch),
               "--steps", str(args.steps), "--threads", str(args.threads),
               *(["--precision", args.precision] if args.precision else [])]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{mode} failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        print(f"{mode:8s} {row['img_s']:7.1f} img/s   warm-up {row['warmup_s']:6.1f} s   "
              f"losses finite: {row['all_losses_finite']} (first non-finite step: {row['first_nonfinite_step']})")
    ratio = rows[1]["img_s"] / rows[0]["img_s"]
    print(f"compiled / eager: {ratio:.2f}x")
    result = {"meta": {"config": args.config, "batch": args.batch, "threads": args.threads,
                       "precision": args.precision or "config's",
                       "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
                       "command": "python benchmarks/train_compile.py " + " ".join(sys.argv[1:])},
              "results": rows, "compiled_over_eager": ratio}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
