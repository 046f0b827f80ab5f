"""Start-up cost of the frozen MiniLM text encoder: reverie's own BERT + ``tokenizers`` against loading the
same folder through transformers (``AutoTokenizer`` + ``AutoModel``), each in a fresh process after
``import torch`` and reverie (what the encoder adds to ``reverie generate``'s start-up). Also checks that
both give the same states.

    python benchmarks/text_encoder_load.py [--repeats 3] [--out benchmarks/results/text_encoder_load.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

SNIPPETS = {
    "reverie": (
        "enc = MiniLMEncoder()\n"
        "out = enc.encode(['a red circle above a blue square']).tokens[0, :10]\n"
    ),
    "transformers": (
        "import os; os.environ['HF_HUB_OFFLINE'] = '1'\n"
        "from transformers import AutoModel, AutoTokenizer\n"
        "p = model_dir(); tok = AutoTokenizer.from_pretrained(p); m = AutoModel.from_pretrained(p).eval()\n"
        "with torch.no_grad():\n"
        "    out = m(**tok(['a red circle above a blue square'], return_tensors='pt')).last_hidden_state[0]\n"
    ),
}
TEMPLATE = """
import time, json, torch
from reverie.text.minilm import MiniLMEncoder, model_dir  # reverie itself: paid by both, not timed
torch.set_num_threads({threads})
t0 = time.perf_counter()
{snippet}
seconds = time.perf_counter() - t0
print(json.dumps({{"seconds": seconds, "states": out.flatten()[:64].tolist()}}))
"""


def run(name: str, threads: int) -> dict:
    code = TEMPLATE.format(snippet=SNIPPETS[name], threads=threads)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in SNIPPETS}
    states = {}
    for _ in range(args.repeats):  # interleaved, so machine load hits both alike
        for name in SNIPPETS:
            result = run(name, args.threads)
            times[name].append(result["seconds"])
            states[name] = result["states"]
    max_diff = max(abs(a - b) for a, b in zip(states["reverie"], states["transformers"]))
    summary = {
        "command": " ".join(["python", *sys.argv]),
        "threads": args.threads,
        "seconds": times,
        "median_s": {name: statistics.median(t) for name, t in times.items()},
        "speedup": statistics.median(times["transformers"]) / statistics.median(times["reverie"]),
        "max_abs_state_diff": max_diff,
    }
    for name, t in summary["median_s"].items():
        print(f"{name:12s} load + first caption: {t:.2f} s (median of {args.repeats})")
    print(f"speedup {summary['speedup']:.1f}x; hidden states agree to {max_diff:.1e}")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
