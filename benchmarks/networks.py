"""reverie's U-Net vs diffusers' UNet2DModel at equal configuration: parameters, FLOPs, speed, memory.

    python benchmarks/networks.py                                   # CPU, 2 threads, batch 16, fp32 + bf16
    python benchmarks/networks.py --device cuda                     # batch 128: fp32, bf16, bf16-compile
    python benchmarks/networks.py --configs small --repeats 3       # quicker
    python benchmarks/networks.py --threads 1 --timer cpu --memory none \
        --out benchmarks/results/networks_cpu_1thread_cputime.json   # steady on a shared machine

For each configuration (``ddpm-cifar10``: DDPM's CIFAR-10 U-Net at 32x32; ``small``: the
``unet-small`` preset) both networks are built with the same architecture (reverie's
``diffusers_unet2d_kwargs``), their parameter counts and FLOPs per image compared, and diffusers'
weights are loaded into reverie's network to check that both compute the same function. Then,
per precision mode, forward images/s (eval, no grad) and full training-step images/s (train mode
with dropout: forward, MSE loss, backward, AdamW step) are timed with the two implementations
interleaved (A B B A ...) so that both see the same machine load. Each row stores the median and
the best of ``--repeats`` rounds; ratios (reverie / diffusers) are given for both. On a shared
machine noise only adds time, so the best round is the steadier estimate there. With two threads
on cores shared with other jobs, a descheduled OpenMP thread stalls its partner at every parallel
region and steps can take 5-10x longer than on an idle machine; ``--threads 1 --timer cpu`` (CPU
time of the process) is immune to that and is the number to trust for ratios there.

Modes: ``fp32``; ``bf16`` = ``torch.autocast(bfloat16)`` (both keep fp32 weights); ``*-compile``
adds ``torch.compile`` (reverie with ``fullgraph=True``). reverie runs with ``channels_last`` (its
NHWC convolutions, its own channels-last GroupNorm + SiLU, free attention token views) and, as its
trainer does, the fused AdamW; diffusers with PyTorch's default AdamW, as its training examples.
``--extra-variants`` adds reverie in NCHW and a channels-last diffusers, so that "diffusers' best
configuration" is the fastest of fp32 / bf16 / channels_last.

On the CPU the run also measures the bf16 and fp32 matmul peak (2048^2, same threads) and reports
each training step's GFLOP/s as a fraction of it, and (``--profile``, default on the CPU) profiles
one reverie bf16 training step and prints where its time goes (convolutions, GroupNorm + SiLU,
attention, linear layers, dropout, casts and copies, optimizer, ...).

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention;
a multiply-add counts 2), per image, forward and forward + backward. Achieved TFLOP/s = FLOPs x
images/s. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the model's own memory;
on the CPU each network runs once more in a fresh subprocess and we report the growth of the
process's peak resident set (VmHWM on Linux, else ``ru_maxrss``) from after building the model
and inputs to after one forward pass / one training step (optimizer state included), since
tracemalloc does not see torch's allocator.

Writes ``benchmarks/results/networks_<device>.json`` (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from reverie.nets import PRESETS, count_parameters, create_network
from reverie.nets.unet import convert_diffusers_unet2d, diffusers_unet2d_kwargs

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {"ddpm-cifar10": "unet-ddpm-cifar10", "small": "unet-small"}
MODES = ("fp32", "bf16", "fp32-compile", "bf16-compile")
COMPILE_ESTIMATE_S = 60.0  # first guess for one compiled graph (then measured); only for --budget-s


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    p.add_argument("--batch", type=int, default=None, help="default: 16 on the CPU, 128 on CUDA")
    p.add_argument("--configs", default="ddpm-cifar10,small", help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--modes", default=None, help="default: fp32,bf16 (CPU); fp32,bf16,bf16-compile (CUDA)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default: 5)")
    p.add_argument("--iters", type=int, default=None, help="steps per round (default: 1 CPU, 10 CUDA)")
    p.add_argument("--no-diffusers", action="store_true", help="time reverie alone")
    p.add_argument("--extra-variants", action="store_true",
                   help="also time reverie in its other memory layout and diffusers converted to"
                        " channels_last (eager modes only)")
    p.add_argument("--memory", choices=["auto", "none"], default="auto", help="measure peak memory (default)")
    p.add_argument("--budget-s", type=float, default=None, help="skip compile runs that would exceed this")
    p.add_argument("--out", default=None,
                   help="JSON path (default: benchmarks/results/networks_<device>.json)")
    p.add_argument("--timer", choices=["wall", "cpu"], default="wall",
                   help="wall clock (default), or this process's CPU time: steadier on a shared machine"
                        " with --threads 1, where a descheduled thread does not stall the others")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default: inductor)")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                   help="profile one reverie bf16 training step and print its breakdown (default: on the CPU)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- models and steps

def build(impl: str, config: str, device: str):
    """(module, forward fn(x, t) -> tensor) for impl in reverie[-cl|-nchw], diffusers[-cl]."""
    channels_last = impl.endswith("-cl") or impl == "reverie"
    torch.manual_seed(0)
    if impl.startswith("reverie"):
        net = create_network(CONFIGS[config], channels_last=channels_last).to(device)
        return net, net
    from diffusers import UNet2DModel

    net = UNet2DModel(**diffusers_unet2d_kwargs(PRESETS[CONFIGS[config]], strict=False)).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net, lambda x, t: net(x, t).sample


def autocast(mode: str, device: str):
    if mode.startswith("bf16"):
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_steps(net, fwd, impl: str, mode: str, x, t, backend: str = "inductor"):
    """(forward step, training step) closures for one network and mode."""
    if mode.endswith("compile"):
        fwd = torch.compile(fwd, fullgraph=impl.startswith("reverie"), backend=backend)
    target = torch.randn_like(x)
    # reverie's trainer uses the fused AdamW (reverie.train.run.make_optimizer); diffusers' examples the default
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True if impl.startswith("reverie") else None)

    def forward_step():
        net.eval()
        with torch.no_grad(), autocast(mode, x.device.type):
            fwd(x, t)

    def train_step():
        net.train()
        with autocast(mode, x.device.type):
            out = fwd(x, t)
        torch.nn.functional.mse_loss(out.float(), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return forward_step, train_step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_round(step, iters: int, device: str, timer: str = "wall") -> float:
    clock = time.process_time if timer == "cpu" and device == "cpu" else time.perf_counter
    sync(device)
    t0 = clock()
    for _ in range(iters):
        step()
    sync(device)
    return (clock() - t0) / iters


# --------------------------------------------------------------------------- static measurements

def flops_per_image(fwd, net, config: str, device: str) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs for one 32x32 image, counted by FlopCounterMode."""
    cfg = PRESETS[CONFIGS[config]]
    x = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device)
    t = torch.tensor([500.0], device=device)
    net.eval()
    # The math SDPA backend decomposes attention into counted matmuls on every device (the CPU
    # flash kernel has no FLOP formula registered), so both networks are counted alike.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        fwd(x, t)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        fwd(x, t).square().mean().backward()
    net.zero_grad(set_to_none=True)
    return forward, counter.get_total_flops()


def same_function(config: str, device: str) -> dict:
    """Max |reverie - diffusers| with diffusers' weights loaded into reverie (eval mode: no dropout)."""
    cfg = PRESETS[CONFIGS[config]]
    try:
        diffusers_unet2d_kwargs(cfg, strict=True)
    except ValueError as err:  # e.g. UNet2DModel drops the bottleneck attention's GroupNorm with AdaGN
        return {"max_abs_diff_same_weights": None, "note": f"closest UNet2DModel differs: {err}"}
    ref, ref_fwd = build("diffusers", config, device)
    net = create_network(cfg).to(device)
    net.load_state_dict(convert_diffusers_unet2d(ref.state_dict(), cfg), strict=True)
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device)
    t = torch.tensor([10.0, 900.0], device=device)
    net.eval(), ref.eval()
    with torch.no_grad():
        diff = (net(x, t) - ref_fwd(x, t)).abs().max().item()
    return {"max_abs_diff_same_weights": diff}


def matmul_peak_gflops(dtype: torch.dtype, timer: str = "wall", n: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` GFLOP/s of an n x n matmul in ``dtype`` on the CPU: the matrix units' practical peak,
    on the same clock as the steps (``timer``)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        best = min(best, time_round(lambda: a @ b, 1, "cpu", timer))
    return 2 * n**3 / best / 1e9


# Where a profiled operation's time goes: the first category matching its own name or an enclosing event's
# (so a cast inside a convolution counts as a cast, a SiLU inside the fused GroupNorm + SiLU as the norm).
CATEGORIES = (
    ("casts and copies", ("_to_copy", "ToCopyBackward", "aten::copy_", "aten::contiguous", "CloneBackward")),
    ("group norm (+SiLU)", ("GroupNorm", "group_norm")),
    ("attention", ("scaled_dot_product", "softmax", "Softmax", "BmmBackward", "aten::bmm", "UnsafeViewBackward")),
    ("dropout", ("Dropout", "dropout", "bernoulli")),
    ("convolution", ("onvolution", "conv2d")),
    ("linear (projections, time MLP)", ("addmm", "AddmmBackward", "aten::mm", "MmBackward", "linear")),
    ("optimizer (AdamW)", ("Optimizer.", "adamw", "_foreach_")),
    ("SiLU (other)", ("silu", "Silu")),
    ("concat / resample", ("aten::cat", "CatBackward", "upsample", "Upsample")),
)


def profile_breakdown(step, threads: int) -> dict:
    """One profiled call of ``step``: milliseconds of CPU time per category (``CATEGORIES``; the rest is
    "other elementwise and overhead"), from each operation's self time."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.self_cpu_time_total <= 0:
            continue
        chain, node = [], event
        while node is not None:
            chain.append(node.name)
            node = node.cpu_parent
        name = next((c for c, keys in CATEGORIES if any(k in n for k in keys for n in chain)),
                    "other elementwise and overhead")
        totals[name] = totals.get(name, 0.0) + event.self_cpu_time_total / 1e3
    total = sum(totals.values())
    rows = sorted(totals.items(), key=lambda kv: -kv[1])
    return {"threads": threads, "total_cpu_ms": total,
            "categories": [{"category": k, "cpu_ms": v, "share": v / total} for k, v in rows]}


def format_breakdown(b: dict) -> str:
    lines = [f"profile of one reverie bf16 training step ({b['threads']} thread(s), CPU time summed over threads, "
             f"{b['total_cpu_ms']:.0f} ms):"]
    lines += [f"  {r['category']:34s} {r['cpu_ms']:8.1f} ms  {100 * r['share']:5.1f} %" for r in b["categories"]]
    return "\n".join(lines)


def cuda_peak_mb(step, device: str) -> float:
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    sync(device)
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def maxrss_mb() -> float:
    """Peak resident set of this process. On Linux read VmHWM: ``ru_maxrss`` survives ``exec`` and
    would start a fresh child at its parent's peak."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def memory_child(spec: str, args) -> None:
    """Run in a fresh process: print the peak-RSS growth of one forward and one training step."""
    impl, config, mode = spec.split(":")
    torch.set_num_threads(args.threads)
    net, fwd = build(impl, config, "cpu")
    cfg = PRESETS[CONFIGS[config]]
    x = torch.randn(args.batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    t = torch.rand(args.batch) * 999
    forward_step, train_step = make_steps(net, fwd, impl, mode, x, t, args.compile_backend)
    base = maxrss_mb()
    forward_step()
    fwd_mb = maxrss_mb() - base
    train_step()
    print(json.dumps({"forward_mb": fwd_mb, "train_mb": maxrss_mb() - base}))


def cpu_peak_mb(impl: str, config: str, mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", f"{impl}:{config}:{mode}",
           "--threads", str(args.threads), "--batch", str(args.batch),
           "--compile-backend", args.compile_backend]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the run

class Budget:
    """Skips warm-ups (compilations) that would not finish before ``--budget-s``; learns how long a
    compilation of each phase takes from the ones it has seen."""

    def __init__(self, seconds: float | None):
        self.deadline = time.time() + seconds if seconds else None
        self.compile_s = {"train": COMPILE_ESTIMATE_S, "forward": 0.6 * COMPILE_ESTIMATE_S}
        self.seen = set()

    def allows(self, mode: str, phase: str, count: int) -> bool:
        need = count * (self.compile_s[phase] if mode.endswith("compile") else 5.0)
        return self.deadline is None or time.time() + need < self.deadline

    def note(self, mode: str, phase: str, seconds: float) -> None:
        if mode.endswith("compile"):
            self.compile_s[phase] = max(seconds, 10.0)
            if phase == "train" and "forward" not in self.seen:  # an inference graph is smaller
                self.compile_s["forward"] = 0.6 * self.compile_s["train"]
            self.seen.add(phase)


def bench_mode(config: str, mode: str, impls: list[str], models: dict, args, budget: Budget) -> list[dict]:
    """Interleaved timing of all impls in one mode (training step first); one row per impl."""
    cfg = PRESETS[CONFIGS[config]]
    x = torch.randn(args.batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=args.device)
    t = torch.rand(args.batch, device=args.device) * 999
    steps = {i: make_steps(*models[i], i, mode, x, t, args.compile_backend) for i in impls}
    rows = {i: {"config": config, "impl": i, "mode": mode, "batch": args.batch} for i in impls}
    for phase, k in (("train", 1), ("forward", 0)):
        if not budget.allows(mode, phase, len(impls)):  # all impls or none, so that there is a ratio
            for i in impls:
                rows[i][f"{phase}_skipped"] = "time budget"
            continue
        ready = []
        for i in impls:  # warm-up (and compilation) outside the timed rounds
            w0 = time.perf_counter()
            try:
                steps[i][k]()
                steps[i][k]()
                sync(args.device)
            except Exception as err:  # one impl failing (e.g. its compilation) must not lose the others
                rows[i][f"{phase}_error"] = f"{type(err).__name__}: {err}"[:2000]
                print(f"[{config} {mode} {i} {phase}] failed: {rows[i][f'{phase}_error'][:300]}", flush=True)
                continue
            rows[i][f"{phase}_warmup_s"] = time.perf_counter() - w0
            budget.note(mode, phase, rows[i][f"{phase}_warmup_s"])
            ready.append(i)
        times = {i: [] for i in ready}
        for r in range(args.repeats):
            for i in ready if r % 2 == 0 else ready[::-1]:  # ABBA..: neither side always goes first
                times[i].append(time_round(steps[i][k], args.iters, args.device, args.timer))
        for i in ready:
            rows[i][f"{phase}_img_s"] = args.batch / statistics.median(times[i])
            rows[i][f"{phase}_img_s_best"] = args.batch / min(times[i])
            rows[i][f"{phase}_s_per_step"] = times[i]
            if args.device == "cuda":
                rows[i][f"{phase}_peak_mb"] = cuda_peak_mb(steps[i][k], args.device)
    return list(rows.values())


def setup_config(config: str, impls: list[str], device: str) -> tuple[dict, dict]:
    """Build every impl of ``config``; count its parameters and FLOPs per image."""
    models, static = {}, {}
    for i in impls:
        net, fwd = models[i] = build(i, config, device)
        flops_forward, flops_train = flops_per_image(fwd, net, config, device)
        static[i] = {"params": count_parameters(net), "flops_forward": flops_forward,
                     "flops_train": flops_train}
    return models, static


def run_mode(config: str, mode: str, impls: list[str], models: dict, static: dict, args,
             budget: Budget) -> list[dict]:
    t0 = time.time()
    try:
        rows = bench_mode(config, mode, impls, models, args, budget)
    except Exception as err:  # e.g. a compiler failure: keep the other modes' results
        print(f"[{config} {mode}] failed: {type(err).__name__}: {err}", flush=True)
        return [{"config": config, "mode": mode, "error": f"{type(err).__name__}: {err}"[:2000]}]
    for row in rows:
        row.update(static[row["impl"]])
        for phase in ("forward", "train"):
            if f"{phase}_img_s" in row:
                row[f"{phase}_tflops"] = row[f"flops_{phase}"] * row[f"{phase}_img_s"] / 1e12
        if args.device == "cpu" and args.memory == "auto":
            peaks = cpu_peak_mb(row["impl"], config, mode, args)
            row.update({f"{k.replace('_mb', '')}_peak_mb": v for k, v in peaks.items()})
        print(format_row(row), flush=True)
    print(f"[{config} {mode}] {time.time() - t0:.0f} s", flush=True)
    return rows


def ratios(rows: list[dict], peak: float | None = None) -> dict:
    """reverie / diffusers per config and mode, and reverie's best row over diffusers' best row (with
    ``peak``, the bf16 matmul GFLOP/s: each best row's achieved GFLOP/s and its fraction of it)."""
    out = {}
    for config in dict.fromkeys(r["config"] for r in rows):
        entry = {}
        for phase in ("forward", "train"):
            key = f"{phase}_img_s"
            by = {(r["impl"], r["mode"]): r[key] for r in rows if r["config"] == config and key in r}
            per_mode = {m: by[("reverie", m)] / by[("diffusers", m)] for (i, m) in by
                        if i == "reverie" and ("diffusers", m) in by}
            best_round = {(r["impl"], r["mode"]): r[f"{phase}_img_s_best"] for r in rows
                          if r["config"] == config and key in r}
            per_mode_best = {m: best_round[("reverie", m)] / best_round[("diffusers", m)] for m in per_mode}
            best = {}
            for name in ("reverie", "diffusers"):
                mine = {k: v for k, v in by.items() if k[0].startswith(name)}
                if mine:
                    best[name] = max(mine, key=mine.get)
            entry[phase] = {"per_mode": per_mode, "per_mode_best_rounds": per_mode_best}
            if len(best) == 2:
                entry[phase]["best_vs_best"] = by[best["reverie"]] / by[best["diffusers"]]
                entry[phase]["best"] = {k: "/".join(v) for k, v in best.items()}
            if peak and best:
                gflops = {k: next(r[f"{phase}_tflops"] for r in rows if r["config"] == config
                                  and (r["impl"], r["mode"]) == v) * 1e3 for k, v in best.items()}
                entry[phase]["best_gflops"] = gflops
                entry[phase]["best_fraction_of_bf16_matmul_peak"] = {k: v / peak for k, v in gflops.items()}
        out[config] = entry
    return out


def format_row(r: dict) -> str:
    def num(key, fmt, scale=1.0):
        if isinstance(r.get(key), (int, float)):
            return format(r[key] / scale, fmt)
        return "-".rjust(int(fmt.split(".")[0]))

    return (f"{r['config']:13s} {r['impl']:14s} {r['mode']:13s} {num('params', '7.2f', 1e6)} "
            f"{num('flops_forward', '7.2f', 1e9)} {num('forward_img_s', '9.1f')} "
            f"{num('train_img_s', '9.2f')} "
            f"{num('train_img_s_best', '9.2f')} "
            f"{num('forward_tflops', '7.3f')} {num('train_tflops', '7.3f')} "
            f"{num('forward_peak_mb', '7.0f')} {num('train_peak_mb', '7.0f')}")


HEADER = (f"{'config':13s} {'impl':14s} {'mode':13s} {'Mparam':>7s} {'GFLOP':>7s} {'fwd img/s':>9s} "
          f"{'train i/s':>9s} {'trn best':>9s} {'fwd TF/s':>7s} {'trn TF/s':>7s} "
          f"{'fwd MB':>7s} {'trn MB':>7s}")


def main(argv=None) -> None:
    args = parse_args(argv)
    cuda = args.device == "cuda"
    args.batch = args.batch or (128 if cuda else 16)
    args.repeats = args.repeats or 5
    args.iters = args.iters or (10 if cuda else 1)
    args.modes = (args.modes or ("fp32,bf16,bf16-compile" if cuda else "fp32,bf16")).split(",")
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True  # static shapes: let cuDNN pick its fastest kernels (both impls)
    if args.memory_child:
        return memory_child(args.memory_child, args)
    for name in args.configs.split(",") + args.modes:
        if name not in (*CONFIGS, *MODES):
            raise ValueError(f"unknown config or mode {name!r}; configs: {list(CONFIGS)}, "
                             f"modes: {list(MODES)}")
    impls = ["reverie"] + ([] if args.no_diffusers else ["diffusers"])
    if args.extra_variants:
        impls += ["reverie-nchw"] + ([] if args.no_diffusers else ["diffusers-cl"])
    meta = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
            "torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
            "batch": args.batch, "repeats": args.repeats, "iters": args.iters, "timer": args.timer,
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "optimizer": "AdamW(lr=1e-4), PyTorch defaults",
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_benchmark": True}
    if not args.no_diffusers:
        import diffusers

        meta["diffusers"] = diffusers.__version__
    out = Path(args.out) if args.out else RESULTS / f"networks_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, checks, models, static = [], {}, {}, {}

    if not cuda:
        meta["matmul_peak_gflops"] = {"bf16": matmul_peak_gflops(torch.bfloat16, args.timer),
                                      "fp32": matmul_peak_gflops(torch.float32, args.timer)}
        print(f"matmul peak (2048^2, {args.threads} threads): bf16 {meta['matmul_peak_gflops']['bf16']:.0f} GFLOP/s, "
              f"fp32 {meta['matmul_peak_gflops']['fp32']:.0f}", flush=True)
    peak = meta.get("matmul_peak_gflops", {}).get("bf16")
    breakdown = {}

    def save() -> dict:  # after every mode, so a run killed by a time limit keeps what it measured
        result = {"meta": meta, "same_function": checks, "results": rows, "ratios": ratios(rows, peak),
                  "profile": breakdown}
        out.write_text(json.dumps(result, indent=2))
        return result

    print(HEADER, flush=True)
    configs, budget = args.configs.split(","), Budget(args.budget_s)
    for mode in args.modes:  # every config's eager modes before any compilation
        for config in configs:
            if config not in models:
                if not args.no_diffusers:
                    checks[config] = same_function(config, args.device)
                models[config], static[config] = setup_config(config, impls, args.device)
            # compiling costs minutes per graph: compile modes time the two main impls only
            mode_impls = impls
            if mode.endswith("compile"):
                mode_impls = [i for i in impls if i in ("reverie", "diffusers")]
            rows += run_mode(config, mode, mode_impls, models[config], static[config], args, budget)
            save()
    if args.profile if args.profile is not None else not cuda:
        for config in configs:
            net, fwd = models[config]["reverie"] if config in models else build("reverie", config, args.device)
            cfg = PRESETS[CONFIGS[config]]
            x = torch.randn(args.batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=args.device)
            t = torch.rand(args.batch, device=args.device) * 999
            breakdown[config] = profile_breakdown(make_steps(net, fwd, "reverie", "bf16", x, t)[1], args.threads)
            print(f"[{config}] " + format_breakdown(breakdown[config]), flush=True)
    result = save()
    print(json.dumps({"same_function": checks, "ratios": result["ratios"]}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
