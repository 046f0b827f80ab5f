"""Train the ``shapes`` attribute classifier that ships in ``reverie/assets/shapes-classifier``.

The shipped weights come from exactly this command (CPU, one thread, a few minutes)::

    python benchmarks/train_shapes_classifier.py

It trains on fresh generator samples (dataset seed ``--data-seed``; see ``reverie.eval.attributes``),
then measures accuracy on held-out real images of another dataset seed (``--eval-seed``) at 32x32 and at
64x64 (resized to 32), writes the weights + ``config.json`` (with those numbers) to ``--out`` and a JSON
report to ``benchmarks/results/shapes_classifier.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from reverie.eval.attributes import (
    DEFAULT_PATH,
    TrainSettings,
    classifier_accuracy,
    save_classifier,
    train_classifier,
)


def main() -> None:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--data-seed", type=int, default=defaults.data_seed)
    parser.add_argument("--eval-seed", type=int, default=12345)
    parser.add_argument("--eval-images", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "shapes_classifier.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             data_seed=args.data_seed)
    start = time.time()
    model = train_classifier(settings)
    train_seconds = time.time() - start
    accuracy = {f"{res}px": classifier_accuracy(model, args.eval_images, seed=args.eval_seed, resolution=res)
                for res in (32, 64)}
    report = {
        "command": "python benchmarks/train_shapes_classifier.py " + " ".join(
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("out", "results")),
        "training": vars(settings), "train_seconds": round(train_seconds, 1), "threads": args.threads,
        "parameters": sum(p.numel() for p in model.parameters()),
        "eval_seed": args.eval_seed, "accuracy_real": accuracy,
    }
    save_classifier(model, args.out, extra={"training": vars(settings), "accuracy_real": accuracy})
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
