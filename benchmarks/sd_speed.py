"""Stable Diffusion 1.5 text-to-image speed and memory: reverie against diffusers, in one run.

The full SD 1.5 architecture (860M-parameter U-Net, KL-VAE, 12-layer CLIP ViT-L text encoder) with random
weights, built locally from the released configs (``tests/sd_models.py``; nothing is downloaded) and saved once
as a diffusers folder under ``out/``. Both libraries load that folder and generate one 512x512 image with
DPM-Solver++(2M), classifier-free guidance 7.5 and a negative prompt: 20 denoiser steps, each one U-Net call on a
batch of 2 (conditional + unconditional), then the VAE decode.

Each configuration runs in its own process (so its peak RSS is its own): reverie and diffusers, each in float32
and in bfloat16 with channels_last (the fast path on CPUs with AMX). On a shared machine a whole 20-step run per
configuration takes long, so ``--timed-steps N`` runs N steps and reports

    seconds / image = measured total + (20 - N) x (median seconds of the steps after the first)

(each step is the same U-Net call, so the extrapolation adds only identical work). ``--timed-steps 20`` measures
the whole run. The ratio is diffusers' fastest configuration over reverie's fastest.

On a machine shared with other jobs, whose load drifts over minutes, separate runs compare poorly.
``--interleaved DTYPE`` loads both libraries in one process and times their guided denoiser steps and VAE decodes
alternately (``--rounds`` of each), which is the fair speed comparison there; the separate runs still give each
configuration's own peak memory.

    python benchmarks/sd_speed.py --interleaved bfloat16 --out benchmarks/results/sd_speed_bf16.json
    python benchmarks/sd_speed.py --interleaved float32 --rounds 2 --out benchmarks/results/sd_speed_fp32.json
    python benchmarks/sd_speed.py --interleaved bfloat16 --rounds 2 --threads 1 --timer cpu   # a busy machine
    python benchmarks/sd_speed.py --interleaved bfloat16 --compile --threads 2   # + both U-Nets torch.compiled
    python benchmarks/sd_speed.py --interleaved bfloat16 --cpu-attention-pair --threads 1 --timer cpu
        # + reverie with the CPU flash kernel forced: what chunked attention gains where reverie picks it
    python benchmarks/sd_speed.py --timed-steps 3             # separate processes: peak memory, end to end
    python benchmarks/sd_speed.py --device cuda --timed-steps 20 --configs reverie-fp16,diffusers-fp16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photo of an astronaut riding a horse on the moon"
NEGATIVE = "blurry, ugly"
CONFIGS = {  # name: (library, dtype, channels_last)
    "reverie-bf16-cl": ("reverie", "bfloat16", True),
    "diffusers-bf16-cl": ("diffusers", "bfloat16", True),
    "diffusers-bf16": ("diffusers", "bfloat16", False),
    "reverie-fp32": ("reverie", "float32", False),
    "diffusers-fp32": ("diffusers", "float32", False),
    "reverie-fp16": ("reverie", "float16", False),
    "diffusers-fp16": ("diffusers", "float16", False),
}


def build_model(folder: Path) -> Path:
    """The random-weight SD 1.5 folder, built once."""
    if (folder / "model_index.json").is_file():
        return folder
    sys.path.insert(0, str(ROOT / "tests"))
    from sd_models import save_sd_pipeline

    print(f"building random-weight SD 1.5 in {folder} (once) ...", flush=True)
    return save_sd_pipeline("sd15", folder)


def _run_reverie(folder, dtype, channels_last, steps, size, device, stamps):
    from reverie.pipeline import Pipeline
    from reverie.sampling import SamplingOptions, sample_images
    from reverie.sd import set_image_size

    model = Pipeline.from_pretrained(folder, device=device, dtype=dtype, channels_last=channels_last)
    set_image_size(model, size)
    stamps["loaded"] = time.perf_counter()
    options = SamplingOptions(sampler="dpmpp_2m", steps=steps, grid="ddim-trailing", guidance_scale=7.5,
                              negative_prompt=NEGATIVE, seed=0)
    steps_at = stamps.setdefault("steps", [])
    stamps["start"] = time.perf_counter()
    image = sample_images(model, 1, options, prompts=[PROMPT], callback=lambda s: steps_at.append(_now(device)))
    stamps["end"] = _now(device)
    return float(image.float().std())


def _run_diffusers(folder, dtype, channels_last, steps, size, device, stamps):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype, safety_checker=None)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config,
                                                                       timestep_spacing="trailing")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if channels_last:
        pipe.unet.to(memory_format=torch_module().channels_last)
        pipe.vae.to(memory_format=torch_module().channels_last)
    stamps["loaded"] = time.perf_counter()
    steps_at = stamps.setdefault("steps", [])

    def on_step(_pipe, _i, _t, tensors):
        steps_at.append(_now(device))
        return tensors

    torch = torch_module()
    stamps["start"] = time.perf_counter()
    out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5, height=size,
               width=size, generator=torch.Generator().manual_seed(0), output_type="pt", callback_on_step_end=on_step)
    stamps["end"] = _now(device)
    return float(out.images.float().std())


def torch_module():
    import torch

    return torch


def _now(device: str) -> float:
    if device.startswith("cuda"):
        torch_module().cuda.synchronize()
    return time.perf_counter()


def child(name: str, folder: Path, steps: int, size: int, device: str, threads: int) -> dict:
    """One configuration in this process: times, peak memory."""
    torch = torch_module()
    if threads:
        torch.set_num_threads(threads)
    library, dtype, channels_last = CONFIGS[name]
    run = _run_reverie if library == "reverie" else _run_diffusers
    stamps = {"begin": time.perf_counter()}
    with torch.inference_mode():
        std = run(folder, getattr(torch, dtype), channels_last, steps, size, device, stamps)
    step_times = [b - a for a, b in zip([stamps["start"]] + stamps["steps"][:-1], stamps["steps"])]
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {"config": name, "library": library, "dtype": dtype, "channels_last": channels_last,
            "load_s": stamps["loaded"] - stamps["begin"], "run_s": stamps["end"] - stamps["start"],
            "step_s": step_times, "after_steps_s": stamps["end"] - stamps["steps"][-1], "image_std": std,
            "peak_gb": peak, "peak_kind": "GPU max allocated" if device.startswith("cuda") else "process max RSS"}


def interleaved(folder: Path, dtype_name: str, rounds: int, size: int, steps: int, timer: str = "wall",
                compile: bool = False, attention_pair: bool = False) -> dict:
    """Both libraries in one process, their guided denoiser steps (one U-Net call on a batch of 2, as each
    pipeline runs it) and VAE decodes timed alternately, so that a machine whose load drifts slows both alike.
    seconds / image = text encoding + ``steps`` x median step + median decode.

    ``compile``: also each library's U-Net under ``torch.compile`` (inductor): reverie's through
    ``Pipeline.compile()``, diffusers' through ``unet.compile()``, the same ``nn.Module.compile`` call. Each
    round then times four steps (reverie eager, reverie compiled, diffusers eager, diffusers compiled); the
    decode is eager in both. The first compiled call (compilation included) is timed apart, and the compiled
    step's output is checked against the eager one (relative difference)."""
    import diffusers
    import torch

    from reverie.guidance import CFGDenoiser
    from reverie.pipeline import Pipeline
    from reverie.sampling import SamplingOptions, conditions
    from reverie.sd import set_image_size

    dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype_name, dtype_name))
    fast = dtype != torch.float32  # bf16 / fp16: channels_last, the fast CPU path, for both libraries
    ours = Pipeline.from_pretrained(folder, dtype=dtype, channels_last=fast)
    set_image_size(ours, size)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype, safety_checker=None)
    if fast:
        ref.unet.to(memory_format=torch.channels_last)
        ref.vae.to(memory_format=torch.channels_last)
    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([float(ours.schedule.sigmas[500])])
    libs = ["reverie", "diffusers"] + (["reverie-compiled", "diffusers-compiled"] if compile else []) + \
        (["reverie-sdpa"] if attention_pair else [])
    times = {f"{lib}_{part}": [] for part in ("encode", "step", "decode") for lib in libs}
    clock = time.process_time if timer == "cpu" else time.perf_counter

    def timed(key, fn):
        start = clock()
        out = fn()
        times[key].append(clock() - start)
        return out

    options = SamplingOptions(guidance_scale=7.5, negative_prompt=NEGATIVE)
    with torch.inference_mode():
        cond, uncond = timed("reverie_encode", lambda: conditions(ours, 1, options, [PROMPT]))
        embeds = timed("diffusers_encode", lambda: ref.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE))
        guided = CFGDenoiser(ours.denoiser, uncond, guidance_scale=7.5)
        context = torch.cat([embeds[1], embeds[0]])  # diffusers' order: unconditional first

        def diffusers_step(unet=None):  # StableDiffusionPipeline.__call__'s loop body
            unet = unet or ref.unet
            model_input = torch.cat([latents.to(unet.dtype)] * 2)
            eps = unet(model_input, 500, encoder_hidden_states=context.to(unet.dtype)).sample
            eps_uncond, eps_text = eps.chunk(2)
            return eps_uncond + 7.5 * (eps_text - eps_uncond)

        step = {"reverie": lambda: guided(latents, sigma, **cond), "diffusers": diffusers_step}
        extra = compile_unets(ours, ref, step) if compile else {}
        decode = {"reverie": lambda: ours.vae.from_latent(latents),
                  "diffusers": lambda: ref.vae.decode(latents.to(dtype) / ref.vae.config.scaling_factor)}
        if attention_pair:
            extra["attention"] = attention_pair_setup(ours, step, decode)
        for r in range(rounds + 1):  # round 0 warms both up (oneDNN primitives) and is not counted
            for lib in libs:
                timed(f"{lib}_step", step[lib])
            if r % 2 == 0:
                for lib in decode:
                    timed(f"{lib}_decode", decode[lib])
    for lib in libs[2:]:  # the decode and text encoder are the eager library's (reverie-sdpa: its own decode)
        for part in ("encode", "decode"):
            if not times[f"{lib}_{part}"]:
                times[f"{lib}_{part}"] = times[f"{lib.removesuffix('-compiled').removesuffix('-sdpa')}_{part}"]
    return {"dtype": dtype_name, "channels_last": fast, "rounds": rounds, "timer": timer, **extra,
            **paired_summary(times, steps, libs)}


def attention_pair_setup(ours, step: dict, decode: dict) -> dict:
    """``--cpu-attention-pair``: reverie's step and decode once more with ``REVERIE_CPU_ATTENTION=sdpa`` (the CPU
    flash kernel everywhere; "reverie-sdpa"), beside reverie as this CPU runs it (``cpu_attention`` in the JSON:
    ``chunked`` on AVX512-BF16 CPUs without AMX, ``reverie.nets.layers``), and how far each step is from the same
    step with a float32 copy of the U-Net (relative L2)."""
    import copy

    from reverie.nets.layers import CPU_ATTENTION_ENV, cpu_attention_kind
    from reverie.nets.packing import unpack_weights

    def with_sdpa(fn):
        def run():
            saved = os.environ.get(CPU_ATTENTION_ENV)
            os.environ[CPU_ATTENTION_ENV] = "sdpa"
            try:
                return fn()
            finally:
                os.environ.pop(CPU_ATTENTION_ENV) if saved is None else os.environ.update({CPU_ATTENTION_ENV: saved})
        return run

    step["reverie-sdpa"] = with_sdpa(step["reverie"])
    decode["reverie-sdpa"] = with_sdpa(decode["reverie"])
    unet = ours.net.net
    exact = copy.deepcopy(unet).float()
    unpack_weights(exact)
    ours.net.net = exact
    try:
        reference = step["reverie"]().float()
    finally:
        ours.net.net = unet
    del exact

    def rel(x):
        return float((x.float() - reference).norm() / reference.norm())

    return {"cpu_attention": cpu_attention_kind(), "step_rel_error_vs_fp32": rel(step["reverie"]()),
            "sdpa_step_rel_error_vs_fp32": rel(step["reverie-sdpa"]())}


def compile_unets(ours, ref, step: dict) -> dict:
    """Compile both U-Nets (``nn.Module.compile``, inductor), add their steps to ``step`` ("reverie-compiled",
    "diffusers-compiled") and run each once: the seconds of that first call (tracing, code generation, C++
    compilation or the on-disk cache, one run), and how far its output is from the same step in float32
    (relative L2; a float32 copy of each library's U-Net), next to how far the eager bf16 step is: a compiled
    step no further from float32 than the eager one is right.

    reverie's compiled U-Net is a copy (``Pipeline.compile`` on it), so that the eager one keeps its packed
    weights (``reverie.nets.packing``; compiling unpacks); diffusers' eager step runs its U-Net with the compiled
    call switched off."""
    import copy

    from reverie.nets.packing import unpack_weights

    out = {}
    expected = {lib: fn().float() for lib, fn in step.items()}
    unet = ours.net.net

    def run_with(net, fn):
        ours.net.net = net
        try:
            return fn()
        finally:
            ours.net.net = unet

    exact = copy.deepcopy(unet).float()
    unpack_weights(exact)  # plain float32 layers: no packed float32 copies next to them
    reference = {"reverie": run_with(exact, step["reverie"]).float()}
    del exact
    exact = copy.deepcopy(ref.unet).float()
    reference["diffusers"] = step["diffusers"](exact).float()
    del exact
    ours.net.net = copy.deepcopy(unet)
    compiled = ours.compile().net.net
    ours.net.net = unet
    ref.unet.compile()
    eager_reverie, eager_diffusers = step["reverie"], step["diffusers"]
    step["reverie-compiled"] = lambda: run_with(compiled, eager_reverie)
    step["diffusers-compiled"] = eager_diffusers

    def diffusers_eager():
        saved, ref.unet._compiled_call_impl = ref.unet._compiled_call_impl, None
        try:
            return eager_diffusers()
        finally:
            ref.unet._compiled_call_impl = saved

    step["diffusers"] = diffusers_eager

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    for lib in ("reverie", "diffusers"):
        start = time.perf_counter()
        got = step[f"{lib}-compiled"]().float()
        out[f"{lib}_compile_first_call_s"] = time.perf_counter() - start
        eager_err, compiled_err = rel(expected[lib], reference[lib]), rel(got, reference[lib])
        out[f"{lib}_eager_vs_fp32_rel"], out[f"{lib}_compiled_vs_fp32_rel"] = eager_err, compiled_err
        out[f"{lib}_compiled_vs_eager_rel"] = rel(got, expected[lib])
        print(f"{lib}: compiled first call {out[f'{lib}_compile_first_call_s']:.0f} s; relative difference to "
              f"float32: eager {eager_err:.2e}, compiled {compiled_err:.2e}", flush=True)
    return out


def paired_summary(times: dict, steps: int, libs=("reverie", "diffusers")) -> dict:
    """Medians, seconds per image, and speedups as the median of the per-round ratios (each round's
    measurements ran back to back, under the same load; round 0, the warm-up, is left out): every reverie
    configuration against every diffusers one (``speedups["reverie-compiled/diffusers"]``); ``speedup`` and
    ``step_speedup`` are eager reverie over eager diffusers, as before."""
    def counted(values):  # without the warm-up round, unless it is all there is
        return values[1:] if len(values) > 1 else values

    med = {k: statistics.median(counted(v)) for k, v in times.items()}
    per_image = {lib: med[f"{lib}_encode"] + steps * med[f"{lib}_step"] + med[f"{lib}_decode"] for lib in libs}
    speedups, ratios = {}, {}
    for ours in (lib for lib in libs if lib.startswith("reverie")):
        refs = [lib for lib in libs if lib.startswith("diffusers")]
        for ref in refs + (["reverie-sdpa"] if ours == "reverie" and "reverie-sdpa" in libs else []):
            pair = {part: [d / r for r, d in zip(counted(times[f"{ours}_{part}"]), counted(times[f"{ref}_{part}"]))]
                    for part in ("step", "decode")}
            step, decode = (statistics.median(pair[p]) for p in ("step", "decode"))
            encode = med[f"{ref}_encode"] / med[f"{ours}_encode"]
            # per image: the reference's time of each part, over ours at that part's paired ratio
            mine = med[f"{ref}_encode"] / encode + steps * med[f"{ref}_step"] / step + med[f"{ref}_decode"] / decode
            ratios[f"{ours}/{ref}"] = pair
            speedups[f"{ours}/{ref}"] = {"step": step, "decode": decode, "image": per_image[ref] / mine}
    base = speedups["reverie/diffusers"]
    return {"times_s": times, "median_s": med, "seconds_per_image": per_image, "paired_ratios": ratios,
            "speedups": speedups, "step_speedup": base["step"], "decode_speedup": base["decode"],
            "speedup": base["image"]}


def summarize(result: dict, steps: int) -> dict:
    """Seconds per image at ``steps`` steps from a run of ``len(step_s)`` steps (module docstring)."""
    timed = result["step_s"]
    per_step = statistics.median(timed[1:]) if len(timed) > 1 else timed[0]
    return {**result, "per_step_s": per_step,
            "seconds_per_image": result["run_s"] + (steps - len(timed)) * per_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="reverie-bf16-cl,diffusers-bf16-cl,diffusers-bf16,reverie-fp32,"
                                             "diffusers-fp32", help=f"comma list of {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=20, help="denoiser steps per image")
    parser.add_argument("--timed-steps", type=int, default=20, help="steps actually run (see the docstring)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--model-dir", default=str(ROOT / "out" / "sd15-random"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sd_speed.json"))
    parser.add_argument("--interleaved", default=None, metavar="DTYPE",
                        help="float32 or bfloat16: time both libraries alternately in one process (see interleaved)")
    parser.add_argument("--rounds", type=int, default=4, help="--interleaved: timed rounds")
    parser.add_argument("--timer", choices=["wall", "cpu"], default="wall",
                        help="--interleaved: wall clock, or this process's CPU time (steadier on a shared machine, "
                             "with --threads 1)")
    parser.add_argument("--compile", action="store_true",
                        help="--interleaved: also time both U-Nets under torch.compile (see compile_unets)")
    parser.add_argument("--cpu-attention-pair", action="store_true",
                        help="--interleaved: also time reverie with the CPU flash kernel forced "
                             "(REVERIE_CPU_ATTENTION=sdpa; see attention_pair_setup)")
    parser.add_argument("--inductor-threads", type=int, default=0,
                        help="--compile: threads the generated C++ kernels are built for (0: --threads); they are "
                             "part of inductor's cache key, so a 1-thread run with 2 here fills the on-disk cache "
                             "for a later 2-thread run")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = Path(args.model_dir)
    if args.interleaved:
        build_model(folder)
        torch = torch_module()
        torch.set_num_threads(args.threads or torch.get_num_threads())
        if args.compile:
            import torch._inductor.config as inductor

            inductor.cpp.threads = args.inductor_threads or torch.get_num_threads()
        load = os.getloadavg()
        result = {"model": "SD 1.5 architecture, random weights", "size": args.size, "steps": args.steps,
                  "guidance_scale": 7.5, "machine": _machine(args.device),
                  **interleaved(folder, args.interleaved, args.rounds, args.size, args.steps, args.timer,
                                args.compile, args.cpu_attention_pair),
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "loadavg_1min_before_after": [load[0], os.getloadavg()[0]]}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        med, per = result["median_s"], result["seconds_per_image"]
        for lib in per:
            print(f"{lib:18s} {args.interleaved}: step {med[lib + '_step']:6.2f} s  "
                  f"decode {med[lib + '_decode']:6.2f} s  encode {med[lib + '_encode']:5.2f} s  "
                  f"-> {per[lib]:7.1f} s/image")
        for pair, up in result["speedups"].items():
            print(f"{pair:37s} {up['image']:.2f}x per image ({up['step']:.2f}x per step, {up['decode']:.2f}x decode)")
        print(f"peak RSS {result['peak_rss_gb']:.1f} GB (both libraries in this process) -> {args.out}")
        return
    if args.child:
        print(json.dumps(child(args.child, folder, args.timed_steps, args.size, args.device, args.threads)))
        return
    build_model(folder)
    results = []
    for name in args.configs.split(","):
        if name not in CONFIGS:
            raise SystemExit(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
        cmd = [sys.executable, __file__, "--child", name, "--model-dir", str(folder), "--timed-steps",
               str(args.timed_steps), "--size", str(args.size), "--device", args.device, "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if proc.returncode:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results.append(summarize(json.loads(proc.stdout.strip().splitlines()[-1]), args.steps))
        r = results[-1]
        print(f"{name:18s} {r['seconds_per_image']:8.1f} s/image  {r['per_step_s']:6.2f} s/step  "
              f"peak {r['peak_gb']:5.1f} GB  (load {r['load_s']:.0f} s)", flush=True)
    best = {lib: min((r for r in results if r["library"] == lib), key=lambda r: r["seconds_per_image"], default=None)
            for lib in ("reverie", "diffusers")}
    ratio = (best["diffusers"]["seconds_per_image"] / best["reverie"]["seconds_per_image"]
             if best["reverie"] and best["diffusers"] else None)
    summary = {"model": "SD 1.5 architecture, random weights", "size": args.size, "steps": args.steps,
               "timed_steps": args.timed_steps, "sampler": "DPM-Solver++(2M), trailing timesteps",
               "guidance_scale": 7.5, "device": args.device, "machine": _machine(args.device),
               "results": results, "best": {k: v and v["config"] for k, v in best.items()},
               "speedup_reverie_over_diffusers": ratio}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    if ratio:
        print(f"best: reverie {best['reverie']['config']} vs diffusers {best['diffusers']['config']}: "
              f"{ratio:.2f}x  -> {args.out}")


def _machine(device: str) -> str:
    torch = torch_module()
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
