"""The distilled text-to-image model against its teacher: prompt adherence on the 72 held-out prompts at 1, 2
and 4 consistency steps (one network call per step, guidance folded in) vs the teacher's 20 guided dpmpp_2m
steps (40 network calls per image), measured in the same run, plus the distillation's training cost read from
its run directory.

    python benchmarks/distill.py --model src/reverie/assets/shapes-t2i-fast --run runs/shapes-t2i-distill
        # -> benchmarks/results/distill.json and distill.png
    python benchmarks/distill.py --model runs/shapes-t2i-distill/model --per-prompt 2 --out /tmp/d.json  # quicker

Both models see the same prompts, noise seeds and planned layouts (``evaluate_adherence``'s batching). The
target of issue 22: at 2 steps, all-correct >= 95 % of the teacher's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from reverie.cli.common import DEFAULT_MODEL
from reverie.eval.adherence import evaluate_adherence
from reverie.images import make_grid
from reverie.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
SHOW = ["a red circle above a blue square", "a green star to the left of a white ring",
        "an orange diamond below a purple cross", "a yellow triangle"]
KEYS = ("color_accuracy", "shape_accuracy", "relation_accuracy", "all_correct")


def adherence(pipe, per_prompt: int, steps: int, sampler: str, guidance: float) -> dict:
    start = time.perf_counter()
    res = evaluate_adherence(pipe, num_per_prompt=per_prompt, steps=steps, sampler=sampler, guidance_scale=guidance,
                             progress=False)
    return {k: res[k] for k in KEYS} | {"two_object_all_correct": res["two_object"]["all_correct"],
                                        "num_images": res["num_images"], "steps": steps, "sampler": sampler,
                                        "guidance_scale": guidance, "eval_s": round(time.perf_counter() - start, 1)}


def picture(teacher, student, steps: list[int], teacher_steps: int, path: Path) -> None:
    """Rows: four prompts (two seeds each); columns: the teacher, then the student at each step count."""
    columns = [(teacher, {"steps": teacher_steps})] + [(student, {"steps": n, "sampler": "consistency",
                                                                  "guidance_scale": 1.0}) for n in steps]
    images = [pipe.generate(prompt, num_images=1, seed=seed, **kw)[0]
              for prompt in SHOW for seed in (0, 1) for pipe, kw in columns]
    make_grid(images, ncols=len(columns), scale=2).save(path)


def training_cost(run: Path) -> dict | None:
    """Steps, images, wall time and network calls of a distillation run (its config.json and log.jsonl)."""
    if not (run / "log.jsonl").is_file():
        return None
    cfg = json.loads((run / "config.json").read_text())
    last = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()][-1]
    images = last["step"] * cfg["data"]["batch_size"] * cfg["train"]["grad_accum"]
    dist = cfg["distill"]
    teacher = (2 if dist["guidance_scale"] != 1 else 1) * (2 if dist["solver"] == "heun" else 1)
    # per image: the guided teacher's ODE step, the EMA target, the student (forward and backward)
    return {"steps": last["step"], "batch_size": cfg["data"]["batch_size"], "images_seen": images,
            "wall_time_min": round(last["elapsed_s"] / 60, 1), "threads": cfg["train"]["threads"],
            "mixed_precision": cfg["train"]["mixed_precision"],
            "network_calls_per_image": {"teacher_forward": teacher, "target_forward": 1, "student_forward_backward": 1},
            "teacher_forward_calls": images * teacher, "student_forward_backward_calls": images,
            "final_loss": last["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "src/reverie/assets/shapes-t2i-fast"), help="distilled model")
    ap.add_argument("--teacher", default=str(DEFAULT_MODEL))
    ap.add_argument("--run", default=str(ROOT / "runs/shapes-t2i-distill"), help="the distillation run directory")
    ap.add_argument("--per-prompt", type=int, default=8)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--teacher-steps", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/distill.json"))
    args = ap.parse_args()

    teacher, student = Pipeline.from_pretrained(args.teacher), Pipeline.from_pretrained(args.model)
    g = teacher.cfg.sample.guidance_scale
    result = {"teacher": {"model": teacher.name, "hash": teacher.weights_hash,
                          **adherence(teacher, args.per_prompt, args.teacher_steps, teacher.cfg.sample.sampler, g)},
              "student": {"model": student.name, "hash": student.weights_hash, "by_steps": {}}}
    print(f"teacher {args.teacher_steps} steps: all correct {result['teacher']['all_correct']:.3f}", flush=True)
    for steps in args.steps:
        res = adherence(student, args.per_prompt, steps, "consistency", 1.0)
        res["all_correct_vs_teacher"] = res["all_correct"] / result["teacher"]["all_correct"]
        result["student"]["by_steps"][str(steps)] = res
        print(f"student {steps} step(s): all correct {res['all_correct']:.3f} "
              f"({res['all_correct_vs_teacher']:.1%} of the teacher's)", flush=True)
    result["training"] = training_cost(Path(args.run))
    two = result["student"]["by_steps"].get("2")
    result["target_2_steps_95pct"] = None if two is None else two["all_correct_vs_teacher"] >= 0.95
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    picture(teacher, student, args.steps, args.teacher_steps, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out} and its picture (rows: prompts x 2 seeds; columns: teacher {args.teacher_steps} steps, "
          f"student {', '.join(map(str, args.steps))} steps)")


if __name__ == "__main__":
    main()
