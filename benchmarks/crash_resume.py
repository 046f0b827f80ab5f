"""kill -9 during a checkpoint write, then resume: are the final weights those of an uninterrupted run?

    python benchmarks/crash_resume.py                 # 20 trials, 12 steps, a checkpoint every 2 steps
    python benchmarks/crash_resume.py --trials 50 --seed 1

The acceptance criterion: "A kill -9 during a checkpoint write, repeated 20 times, always resumes to weights
identical to an uninterrupted run." The script

1. trains a tiny class-conditional diffusion model straight through in a subprocess (the tiny settings of
   ``tests/test_trainer.py``: the ``NET`` U-Net of ``tests/helpers.py``, 16x16 ``Toy`` images, batch 4) and keeps
   its final ``model/model.safetensors`` and ``model/ema.safetensors``; it also watches that run's
   ``checkpoints/`` folder to measure how long a ``ckpt-XXXXXXXX.tmp`` directory lives (one write);
2. then, per trial, starts the same training (same command, ``resume="auto"``) in a fresh ``out_dir``, polls
   ``checkpoints/`` and sends SIGKILL during the write of a randomly chosen checkpoint step, at a moment drawn
   from: a random part of a write's measured duration after its ``.tmp`` directory appeared ("time", two times
   in five), as soon as a file is in it ("tensors"), as soon as ``state.json`` is ("state"), or while
   ``latest.tmp`` names it ("pointer"). After the process is dead, a ``.tmp`` entry still present proves the
   kill landed mid-write (the table says what the half-written directory held). The same command is run again
   to resume; in about a third of the trials that run is killed too, during a later checkpoint write (and so is
   a run whose kill came just after the write), and the command is run once more, to the end;
3. compares every tensor of the final weights (model and EMA, ``torch.equal``, same names) and of the final
   checkpoint's ``tensors.safetensors`` (model, EMA, optimizer moments) with the straight run.

Every run is a fresh ``python`` process with ``OMP_NUM_THREADS=1`` (and ``train.threads=1``), the straight run
included, so all runs compute in the same way. The resumed-from checkpoint is the one the checkpoint module names
as the run's latest when the resuming process starts (``latest_checkpoint``). Writes a short summary JSON to
``benchmarks/results/crash_resume.json``. Exit status 1 if any trial is not identical.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
RESULTS = Path(__file__).resolve().parent / "results"
AIMS = ("time", "time", "tensors", "state", "pointer")  # the moments of a write a kill aims at (see below)
_POLL_S = 0.0005  # how often checkpoints/ is listed (a write of the tiny model takes ~100 ms)


# ----------------------------------------------------------------------------------------------- the worker


def _overrides(out_dir: str, steps: int, every: int) -> list[str]:
    sys.path.insert(0, str(TESTS))
    from helpers import NET  # the tiny U-Net of the test suite

    return [f"--model.network_overrides={NET}", "--data.batch_size=4", "--data.resolution=16",
            "--train.progress=false", "--sample.every=0", "--optim.warmup_steps=2", "--model.conditioning=class",
            "--train.log_every=1", "--train.threads=1", f"--train.steps={steps}",
            f"--train.checkpoint_every={every}", f"--train.out_dir={out_dir}"]


def worker(out_dir: str, steps: int, every: int) -> None:
    """One invocation of the training command: ``train(..., resume="auto")`` into ``out_dir``."""
    sys.path.insert(0, str(TESTS))
    from reverie.configs import load_config
    from reverie.train import train
    from reverie.train.checkpoint import latest_checkpoint
    from reverie.train.config import TrainConfig
    from toy_data import Toy

    latest = latest_checkpoint(Path(out_dir) / "checkpoints")
    with open(Path(out_dir).parent / f"{Path(out_dir).name}.starts.jsonl", "a") as f:  # outside out_dir
        f.write(json.dumps({"resume_from": latest.name if latest else None}) + "\n")
    train(load_config(TrainConfig, None, _overrides(out_dir, steps, every)), resume="auto", dataset=Toy(40))


# ------------------------------------------------------------------------------------------------- driver


def _command(args, out_dir: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", str(out_dir), "--steps", str(args.steps),
            "--checkpoint-every", str(args.checkpoint_every)]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)}


def _tmp_entries(ckpt_dir: Path) -> list[str]:
    try:
        return sorted(name for name in os.listdir(ckpt_dir) if name.endswith(".tmp"))
    except FileNotFoundError:
        return []


def _launch(args, out_dir: Path, log) -> subprocess.Popen:
    return subprocess.Popen(_command(args, out_dir), env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            cwd=str(ROOT))


def _finish(proc: subprocess.Popen, what: str, log_path: Path) -> None:
    if proc.wait() != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{what} failed with exit status {proc.returncode}:\n{tail}")


def straight_run(args, out_dir: Path) -> list[float]:
    """Train uninterrupted; return how long each observed ``ckpt-*.tmp`` directory lived (seconds)."""
    ckpt_dir, seen, durations = out_dir / "checkpoints", {}, []
    log_path = out_dir.parent / f"{out_dir.name}.log"
    with open(log_path, "w") as log:
        proc = _launch(args, out_dir, log)
        while proc.poll() is None:
            now, present = time.perf_counter(), {n for n in _tmp_entries(ckpt_dir) if n.startswith("ckpt-")}
            for name in present - seen.keys():
                seen[name] = now
            for name in [n for n in seen if n not in present]:
                durations.append(now - seen.pop(name))
            time.sleep(_POLL_S)
    _finish(proc, "the straight run", log_path)
    return durations


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _pointer_names(ckpt_dir: Path, name: str) -> bool:
    try:
        return (ckpt_dir / "latest.tmp").read_text().strip() == name
    except (FileNotFoundError, UnicodeDecodeError):
        return False


def _fires(aim: str, ckpt_dir: Path, step: int) -> bool:
    """Whether the checkpoint write of ``step`` has reached the moment ``aim`` waits for."""
    tmp = f"ckpt-{step:08d}.tmp"
    if aim == "pointer":  # the checkpoint is in place, the ``latest`` pointer is being replaced
        return _pointer_names(ckpt_dir, f"ckpt-{step:08d}")
    if tmp not in _tmp_entries(ckpt_dir):
        return False
    if aim == "time":
        return True
    files = _listdir(ckpt_dir / tmp)
    return bool(files) if aim == "tensors" else "state.json" in files


def _kill_during_write(proc: subprocess.Popen, ckpt_dir: Path, steps: list[int], aim: str, delay: float,
                       deadline: float):
    """Poll ``checkpoints/`` until the write of ``steps[0]`` reaches ``aim`` ("time": its ``.tmp`` directory
    appeared; "tensors": a file is in it; "state": ``state.json`` is in it; "pointer": ``latest.tmp`` names
    it), wait ``delay`` s and SIGKILL. A moment too short to see is given up when a later checkpoint's ``.tmp``
    appears: that write is killed instead, ``delay`` after it appeared. Returns (step, aim, seconds waited),
    or None if the process finished first."""
    while proc.poll() is None and time.perf_counter() < deadline:
        if _fires(aim, ckpt_dir, steps[0]):
            t0 = time.perf_counter()
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
            waited = time.perf_counter() - t0
            proc.wait()
            return steps[0], aim, waited
        if aim != "time" and len(steps) > 1 and _fires("time", ckpt_dir, steps[1]):
            steps, aim = steps[1:], "time"
            continue
        time.sleep(_POLL_S)
    return None


def _in_flight(ckpt_dir: Path) -> dict:
    """What a dead process left half-written: each ``.tmp`` entry and the files (with sizes) it holds."""
    left = {}
    for name in _tmp_entries(ckpt_dir):
        path = ckpt_dir / name
        left[name] = ({f.name: f.stat().st_size for f in sorted(path.iterdir())} if path.is_dir()
                      else {"(file)": path.stat().st_size})
    return left


def _compare(a_dir: Path, b_dir: Path) -> tuple[list[str], list[str]]:
    """Names of differing tensors: (final model and EMA weights, final checkpoint tensors)."""
    import torch
    from safetensors.torch import load_file

    from reverie.train.checkpoint import latest_checkpoint

    def diff(fa: Path, fb: Path, label: str) -> list[str]:
        a, b = load_file(str(fa)), load_file(str(fb))
        out = [f"{label}:{k} (only in one)" for k in sorted(set(a) ^ set(b))]
        return out + [f"{label}:{k}" for k in sorted(set(a) & set(b)) if not torch.equal(a[k], b[k])]

    weights = [d for name in ("model.safetensors", "ema.safetensors")
               for d in diff(a_dir / "model" / name, b_dir / "model" / name, name.split(".")[0])]
    ca, cb = latest_checkpoint(a_dir / "checkpoints"), latest_checkpoint(b_dir / "checkpoints")
    if ca is None or cb is None or ca.name != cb.name:
        return weights, [f"final checkpoint {ca and ca.name} vs {cb and cb.name}"]
    return weights, diff(ca / "tensors.safetensors", cb / "tensors.safetensors", "ckpt")


def trial(args, k: int, rng: random.Random, work: Path, straight: Path, write_s: float) -> dict:
    out_dir = work / f"trial-{k:02d}"
    ckpt_dir, steps, every = out_dir / "checkpoints", args.steps, args.checkpoint_every
    log_path = work / f"trial-{k:02d}.log"
    ckpt_steps = list(range(every, steps + 1, every))
    kills_wanted = 2 if (rng.random() < args.double_kill and len(ckpt_steps) > 2) else 1
    # the first kill leaves room for a second one, and for a missed moment to fall back on a later write
    target_step = rng.choice(ckpt_steps[:-2] if kills_wanted == 2 else ckpt_steps[:-1])
    kills, runs = [], 0
    with open(log_path, "w") as log:
        while True:
            runs += 1
            proc = _launch(args, out_dir, log)
            if len(kills) < kills_wanted and target_step is not None:
                aim = rng.choice(AIMS)
                # "time": a random moment of the write (now and then just after it); the others: at once or soon
                delay = rng.uniform(0.0, write_s) if aim == "time" else rng.choice([0.0, rng.uniform(0.0, 0.002)])
                later = [s for s in ckpt_steps if s >= target_step]
                got = _kill_during_write(proc, ckpt_dir, later, aim, delay, time.perf_counter() + args.run_timeout)
                if got is not None:
                    step, aim, waited = got
                    left = _in_flight(ckpt_dir)
                    kills.append({"step": step, "aim": aim, "delay_ms": round(1e3 * waited, 2),
                                  "mid_write": f"ckpt-{step:08d}.tmp" in left or "latest.tmp" in left,
                                  "left": left})
                    if not kills[-1]["mid_write"]:  # it landed just after the write: one more try, later
                        kills_wanted += 1
                    later = [s for s in ckpt_steps[:-1] if s > step]
                    target_step = rng.choice(later) if later else None
                    continue
            _finish(proc, f"trial {k} run {runs}", log_path)
            break
    starts = [json.loads(line)["resume_from"] for line in
              (work / f"trial-{k:02d}.starts.jsonl").read_text().splitlines()]
    weights, ckpt = _compare(straight, out_dir)
    return {"trial": k, "kills": kills, "resumed_from": starts[1:], "runs": runs,
            "identical": not weights, "checkpoint_identical": not ckpt, "differing": (weights + ckpt)[:20]}


def _phase(kill: dict) -> str:
    """Where in ``save_checkpoint`` the kill landed, from what the dead process left in ``checkpoints/``."""
    files = kill["left"].get(f"ckpt-{kill['step']:08d}.tmp")
    if files is not None:
        if "state.json" in files:
            return "tmp: tensors+state"
        return "tmp: writing tensors" if files else "tmp: empty"
    return "pointer update" if "latest.tmp" in kill["left"] else "after the write"


def _short(name: str) -> str:
    return "ckpt-" + (name[5:13].lstrip("0") or "0") if name.startswith("ckpt-") and len(name) >= 13 else name


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--steps", type=int, default=12, help="training steps of every run")
    p.add_argument("--checkpoint-every", type=int, default=2)
    p.add_argument("--double-kill", type=float, default=0.35, help="share of trials killed again while resuming")
    p.add_argument("--seed", type=int, default=0, help="draws the kill steps and moments")
    p.add_argument("--run-timeout", type=float, default=300, help="seconds one run may take")
    p.add_argument("--work", default=None, help="folder for the runs (default: a temporary one, removed after)")
    p.add_argument("--output", default=str(RESULTS / "crash_resume.json"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.checkpoint_every)
        return 0
    sys.path.insert(0, str(ROOT / "src"))

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="crash-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    straight = work / "straight"
    shutil.rmtree(straight, ignore_errors=True)
    durations = straight_run(args, straight)
    if not durations:
        raise SystemExit("the straight run's checkpoint writes were too quick to observe; cannot aim the kills")
    write_s = statistics.median(durations)
    print(f"straight run: {args.steps} steps, a checkpoint every {args.checkpoint_every}, "
          f"{time.perf_counter() - t0:.1f} s; saw {len(durations)} checkpoint writes, median "
          f"{1e3 * write_s:.1f} ms (range {1e3 * min(durations):.1f}-{1e3 * max(durations):.1f} ms)\n")

    rng = random.Random(args.seed)
    header = (f"{'trial':>5}  {'kill at':<13} {'aimed at':<8} {'+ms':>6}  {'.tmp in flight':<14}  {'where':<20}  "
              f"{'resumed from':<13}  identical")
    print(header + "\n" + "-" * len(header))
    results = []
    for k in range(1, args.trials + 1):
        shutil.rmtree(work / f"trial-{k:02d}", ignore_errors=True)
        (work / f"trial-{k:02d}.starts.jsonl").unlink(missing_ok=True)
        r = trial(args, k, rng, work, straight, write_s)
        results.append(r)
        same = ("yes" if r["identical"] else "NO") + ("" if r["checkpoint_identical"] else " (ckpt differs)")
        if not r["kills"]:
            print(f"{k:>5}  {'(no kill landed: the run ended first)':<82}  {same}")
        for j, kill in enumerate(r["kills"]):
            resumed = r["resumed_from"][j] if j < len(r["resumed_from"]) else None
            print(f"{k if j == 0 else '':>5}  {'ckpt-' + str(kill['step']) + ' write':<13} {kill['aim']:<8} "
                  f"{kill['delay_ms']:>6.1f}  "
                  f"{'yes' if kill['mid_write'] else 'no':<14}  {_phase(kill):<20}  "
                  f"{_short(resumed) if resumed else 'fresh start':<13}  {same if j == 0 else ''}")
        if r["differing"]:
            print(f"       differing tensors: {', '.join(r['differing'])}")

    kills = [kill for r in results for kill in r["kills"]]
    identical = sum(r["identical"] for r in results)
    summary = {
        "trials": args.trials, "identical": identical,
        "checkpoint_tensors_identical": sum(r["checkpoint_identical"] for r in results),
        "kills": len(kills), "kills_mid_write": sum(kill["mid_write"] for kill in kills),
        "trials_killed_more_than_once": sum(len(r["kills"]) > 1 for r in results),
        "trials_with_a_mid_write_kill": sum(any(kill["mid_write"] for kill in r["kills"]) for r in results),
        "trials_without_a_kill": sum(not r["kills"] for r in results),
        "kills_by_phase": {phase: sum(_phase(kill) == phase for kill in kills) for phase in
                           ("tmp: empty", "tmp: writing tensors", "tmp: tensors+state", "pointer update",
                            "after the write")},
        "steps": args.steps, "checkpoint_every": args.checkpoint_every, "seed": args.seed,
        "write_ms_median": round(1e3 * write_s, 2), "seconds": round(time.perf_counter() - t0, 1),
        "per_trial": [{"trial": r["trial"], "identical": r["identical"], "resumed_from": r["resumed_from"],
                       "kills": [{"step": kill["step"], "aim": kill["aim"], "ms": kill["delay_ms"],
                                  "phase": _phase(kill)}
                                 for kill in r["kills"]]} for r in results],
        "not_identical": [{k: r[k] for k in ("trial", "kills", "resumed_from", "differing")}
                          for r in results if not (r["identical"] and r["checkpoint_identical"])],
    }
    print(f"\n{identical}/{args.trials} identical (final model and EMA weights, every tensor); "
          f"{summary['checkpoint_tensors_identical']}/{args.trials} final checkpoints identical too; "
          f"{summary['kills']} kills, {summary['kills_mid_write']} while a .tmp checkpoint was in flight "
          f"({summary['trials_with_a_mid_write_kill']}/{args.trials} trials had one); "
          f"{summary['trials_killed_more_than_once']} trials killed more than once; {summary['seconds']:.0f} s")
    print("kills by moment: " + ", ".join(f"{phase} {n}" for phase, n in summary["kills_by_phase"].items()))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = summary.pop("per_trial")
    head = json.dumps(summary, indent=1)
    out.write_text(head[:-2] + ',\n "per_trial": [\n' + ",\n".join("  " + json.dumps(r) for r in rows) + "\n ]\n}\n")
    print(f"wrote {out}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if identical == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
