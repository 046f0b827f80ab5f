"""Compute per generated image: pixel-space vs latent-space diffusion at the same output resolution.

    python benchmarks/latent_vs_pixel.py                       # 64 and 128, unet-small, 20 steps, 1 thread
    python benchmarks/latent_vs_pixel.py --resolutions 128 --network unet-tiny --vae runs/vae-shapes-f4/model

For each output resolution R the same U-Net configuration (``--network``, attention at the same
levels) is built for
(a) pixels, 3 x R x R, and (b) the latents of an f4 and an f8 KL autoencoder (4 x R/f x R/f). One
generated image costs ``steps`` U-Net forward passes plus, for (b), one VAE decode. FLOPs come from
``torch.utils.flop_counter`` (a multiply-add is 2 FLOPs); wall time is the median of ``--rounds``
timed generations of ``--batch`` images with the dpmpp_2m sampler, all models in the same run, same
thread count. Weights are random: compute does not depend on them. Image quality at equal training
budget is a separate measurement (see the latent-diffusion notes). Writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _network(name: str, channels: int, size: int):
    """The preset with its attention at the same levels (not feature-map sizes) at another input size."""
    from reverie.nets import PRESETS, create_network

    preset = PRESETS[name]
    levels = [lv for lv, res in preset.attention_levels.items() if res in preset.attention_resolutions]
    return create_network(name, in_channels=channels, sample_size=size,
                          attention_resolutions=tuple(size // 2**lv for lv in levels))


def _models(args, resolution: int):
    from reverie.build import load_autoencoder
    from reverie.nets.autoencoder import create_autoencoder

    out = {"pixel": (_network(args.network, 3, resolution), None, (3, resolution))}
    for name in ("vae-f4", "vae-f8"):
        vae = load_autoencoder(args.vae) if (args.vae and name == "vae-f4") else create_autoencoder(name)
        f = vae.config.downsample_factor
        if resolution // f < 8:
            continue
        net = _network(args.network, vae.config.latent_channels, resolution // f)
        out[f"latent-{name[-2:]}"] = (net, vae.eval(), (vae.config.latent_channels, resolution // f))
    return out


def _generate(net, vae, shape, batch: int, steps: int):
    from reverie.denoisers import EpsDenoiser
    from reverie.samplers import get_sigmas, sample
    from reverie.schedules import DiscreteVPSchedule

    schedule = DiscreteVPSchedule.from_name("linear")
    sigmas = get_sigmas("karras", steps, schedule=schedule)
    channels, size = shape
    x = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(0)) * float(sigmas[0])
    with torch.no_grad():
        out = sample("dpmpp_2m", EpsDenoiser(net, schedule), x, sigmas)
        if vae is not None:
            out = vae.from_latent(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--network", default="unet-small")
    p.add_argument("--resolutions", type=int, nargs="*", default=[64, 128])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vae", default=None, help="a trained f4 autoencoder directory to time instead of a random one")
    p.add_argument("--out", default=str(RESULTS / "latent_vs_pixel.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for resolution in args.resolutions:
        models = _models(args, resolution)
        times: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(args.rounds):  # interleaved, so machine noise hits every model alike
            for key, (net, vae, shape) in models.items():
                net.eval()
                t0 = time.perf_counter()
                _generate(net, vae, shape, args.batch, args.steps)
                times[key].append((time.perf_counter() - t0) / args.batch)
        for key, (net, vae, shape) in models.items():
            channels, size = shape
            x = torch.randn(1, channels, size, size)
            with torch.no_grad():
                unet = _flops(lambda: net(x, torch.tensor([500.0])))  # noqa: B023 - evaluated at once
                decode = _flops(lambda: vae.from_latent(x)) if vae is not None else 0  # noqa: B023
            rows.append({
                "resolution": resolution, "model": key, "network_input": [channels, size, size],
                "unet_params": sum(q.numel() for q in net.parameters()),
                "unet_gflops_per_call": unet / 1e9, "decode_gflops": decode / 1e9,
                "gflops_per_image": (args.steps * unet + decode) / 1e9,
                "seconds_per_image": statistics.median(times[key]),
            })
    for resolution in args.resolutions:
        base = next(r for r in rows if r["resolution"] == resolution and r["model"] == "pixel")
        for r in rows:
            if r["resolution"] == resolution:
                r["flops_ratio_pixel_over_this"] = base["gflops_per_image"] / r["gflops_per_image"]
                r["speedup_vs_pixel"] = base["seconds_per_image"] / r["seconds_per_image"]
    result = {"network": args.network, "steps": args.steps, "batch": args.batch, "threads": args.threads,
              "sampler": "dpmpp_2m", "rows": rows, "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'res':>4s} {'model':10s} {'input':>10s} {'GFLOP/img':>10s} {'s/img':>7s} {'speedup':>8s}")
    for r in rows:
        shape = "x".join(str(v) for v in r["network_input"])
        print(f"{r['resolution']:4d} {r['model']:10s} {shape:>10s} {r['gflops_per_image']:10.1f} "
              f"{r['seconds_per_image']:7.2f} {r['speedup_vs_pixel']:7.1f}x")


if __name__ == "__main__":
    main()
