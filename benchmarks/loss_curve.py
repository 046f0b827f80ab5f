"""Training loss of a run against steps, from its ``log.jsonl`` (raw points and a moving average), with the
learning rate on a second axis.

    python benchmarks/loss_curve.py runs/shapes-t2i -o docs/shapes_t2i_loss.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_log(run: Path) -> list[dict]:
    path = run / "log.jsonl"
    if not path.is_file():
        raise SystemExit(f"{run} has no log.jsonl (is it a training run directory?)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r and "step" in r]
    by_step = {r["step"]: r for r in rows}  # a resumed run logs some steps twice: keep the last
    return [by_step[s] for s in sorted(by_step)]


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for k, v in enumerate(values):
        total += v
        if k >= window:
            total -= values[k - window]
        out.append(total / min(k + 1, window))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--window", type=int, default=50, help="moving-average window, in log rows")
    args = parser.parse_args()
    rows = read_log(args.run)
    if not rows:
        raise SystemExit(f"{args.run}/log.jsonl has no loss rows")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, loss = [r["step"] for r in rows], [r["loss"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=120)
    ax.plot(steps, loss, lw=0.5, alpha=0.3, color="tab:blue", label="loss (every logged step)")
    ax.plot(steps, moving_average(loss, args.window), lw=1.5, color="tab:blue", label=f"moving average ({args.window})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    lr = ax.twinx()
    lr.plot(steps, [r.get("lr", float("nan")) for r in rows], lw=1, color="tab:orange", label="learning rate")
    lr.set_ylabel("learning rate", color="tab:orange")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"{args.run.name}: {len(rows)} logged steps, last {steps[-1]}", fontsize=9)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
