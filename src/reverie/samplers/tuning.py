"""Sigma grids tuned to one model and one sampler: few steps placed where they matter.

A grid of n noise levels is n - 1 free numbers (the top is where sampling starts, the last step
goes to 0). :func:`tune_sigmas` chooses them for a given denoiser and sampler by making the n-step
sampler reproduce, on a small pilot batch, the end points of a fine-grid solve of the same
probability-flow ODE from the same starting states (the "teacher"). The ODE's flow map carries
p_sigma_max to p_0, so a grid that reproduces it sample by sample also reproduces the data
distribution. This is the objective of LD3 (Tong et al. 2025, "Learning to Discretize Denoising
Diffusion ODEs") and of OSS (Zhu et al. 2025, "Optimal Stepsize for Diffusion Sampling"); unlike
LD3 it needs no gradient through the sampler (reverie's samplers do their step arithmetic in
Python floats), and unlike OSS's dynamic program it scores the real multistep sampler, corrector
and all, not a first-order proxy.

Search, derivative-free and deterministic:

1. Start from the best of a few standard grids (Karras with rho 3, 7, 12 and the exponential grid,
   each with a few smallest sigmas between ``sigma_min`` and 25x it; Karras over the whole range;
   any the caller adds, such as the model's default grid): one pilot run each, all recorded.
2. Coordinate descent by golden-section search, alternating two coordinate systems: (a) each
   log-sigma between its two neighbours (local moves), (b) the log-lengths of all steps,
   renormalized to the fixed log-range (a change to one step's length moves every level below
   it, so steps can migrate from one end of the grid to the other, which (a) cannot do).
3. Stop when a pair of sweeps improves the loss by less than ``rtol``, or after ``max_sweeps``.

The loss is the mean squared difference per element between sampler and teacher outputs (or any
``distance``). Its cost is ``evaluations`` pilot runs of ``steps`` denoiser calls each, reported on
the result; with an exact Gaussian-mixture denoiser a 10-step grid takes seconds
(``benchmarks/samplers_gmm.py``). On images, closer in pixel MSE is not always better on the metric
that matters: on the shipped text-to-image model a tuned 6-step grid is 12x closer to a 50-step
solve and yet less often draws the prompt's colours (``benchmarks/tuned_grid_t2i.py``).
For stochastic samplers the pilot runs share one generator seed, so the grid is tuned for that
noise; deterministic samplers are the intended use.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .base import check_grid, check_sampler, sample
from .grids import get_sigmas

GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
START_RHOS = (3.0, 7.0, 12.0, math.inf)  # inf: the exponential grid
START_LOW = (1.25, 5.0, 25.0)  # smallest sigma of a starting grid, in units of sigma_min


@dataclass
class TunedGrid:
    """A tuned grid and what it cost. ``sigmas`` (float64, ``steps + 1`` entries, last 0) plugs
    into :func:`reverie.samplers.sample` like any grid from :func:`get_sigmas`."""

    sigmas: Tensor
    sampler: str
    steps: int
    loss: float  # mean squared difference to the teacher per element, on the pilot batch
    start: str  # which starting grid won
    start_losses: dict  # the same loss for every starting grid tried, by name ("karras": rho 7, full range)
    evaluations: int  # pilot runs of the sampler
    denoiser_calls: int  # all calls: teacher, starting grids and search, per pilot batch
    teacher: str
    teacher_steps: int
    pilot: int  # pilot batch size
    teacher_grid: str = "karras"  # the teacher's grid kind ("given": explicit sigmas)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sigmas"] = [float(s) for s in self.sigmas]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TunedGrid:
        known = {f.name for f in fields(cls)}
        missing = sorted(known - set(d) - {"teacher_grid"})
        if missing:
            raise ValueError(f"not a tuned grid: missing {', '.join(missing)}")
        sigmas = check_grid(torch.tensor(d["sigmas"], dtype=torch.float64))
        if len(sigmas) != int(d["steps"]) + 1:
            raise ValueError(f"a grid of {d['steps']} steps needs {int(d['steps']) + 1} sigmas, got {len(sigmas)}")
        return cls(**{**{k: d[k] for k in known if k in d}, "sigmas": sigmas})

    def save(self, path: str | Path) -> Path:
        """Write the grid and its record as JSON (``reverie tune-grid -o``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> TunedGrid:
        """Read a grid written by :meth:`save`; a clear error for anything else."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no grid file {path}")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a JSON grid file: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path} is not a tuned grid (expected a JSON object)")
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{path}: {e}") from None


def _grid(log_sigmas: list[float], sigma_max: float) -> Tensor:
    """The grid for log-levels that start at log(sigma_max): exact top, then the levels, then 0."""
    out = torch.cat([torch.tensor(log_sigmas, dtype=torch.float64).exp(), torch.zeros(1, dtype=torch.float64)])
    out[0] = sigma_max
    return out


def _golden(f, lo: float, hi: float, iters: int) -> tuple[float, float]:
    """Minimize ``f`` on [lo, hi] by golden-section search; (argmin, min) over the points tried."""
    a, b = lo, hi
    x1, x2 = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    f1, f2 = f(x1), f(x2)
    for _ in range(iters):
        if f1 < f2:
            b, x2, f2 = x2, x1, f1
            x1 = b - GOLDEN * (b - a)
            f1 = f(x1)
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + GOLDEN * (b - a)
            f2 = f(x2)
    return (x1, f1) if f1 < f2 else (x2, f2)


def _from_lengths(lengths: list[float], top: float, total: float) -> list[float]:
    """Log-sigmas from positive step lengths (the last one: the slack down to the floor)."""
    scale = total / sum(lengths)
    out, level = [top], top
    for step in lengths[:-1]:
        level -= step * scale
        out.append(level)
    return out


def _checked_starts(starts: dict, steps: int, sigma_min: float, sigma_max: float) -> dict:
    checked = {}
    for name, grid in starts.items():
        grid = check_grid(grid)
        if len(grid) != steps + 1 or not math.isclose(float(grid[0]), sigma_max, rel_tol=1e-9) \
                or float(grid[-2]) < sigma_min * (1 - 1e-9):
            raise ValueError(f"starting grid {name!r} must have {steps + 1} levels from sigma_max {sigma_max:g} to 0, "
                             f"none below sigma_min {sigma_min:g}")
        checked[name] = grid
    return checked


def _standard_starts(steps: int, sigma_min: float, sigma_max: float) -> dict:
    """Karras (rho 7) over the whole range, and Karras / exponential variants that stop higher."""
    starts = {"karras": get_sigmas("karras", steps, sigma_min, sigma_max)}
    for rho in START_RHOS if steps > 1 else ():
        for k in START_LOW:
            low = sigma_min * k
            if low < sigma_max / 2:
                kind = "exponential" if math.isinf(rho) else f"karras(rho={rho:g})"
                starts[f"{kind} down to {low:.4g}"] = get_sigmas(
                    "exponential" if math.isinf(rho) else "karras", steps, low, sigma_max,
                    rho=7.0 if math.isinf(rho) else rho)
    return starts


def _sweep_levels(loss, logs: list[float], cur: float, floor: float, iters: int):
    """One golden-section search per interior level, between its neighbours."""
    steps = len(logs)
    for i in range(1, steps):
        hi = logs[i - 1]
        lo = logs[i + 1] if i + 1 < steps else floor
        margin = 0.02 * (hi - lo)

        def f(v, i=i, logs=logs):
            return loss(logs[:i] + [v] + logs[i + 1:])

        v, val = _golden(f, lo + margin, hi - margin, iters)
        if val < cur:
            logs, cur = logs[:i] + [v] + logs[i + 1:], val
    return logs, cur


def _sweep_lengths(loss, logs: list[float], cur: float, top: float, floor: float, iters: int):
    """One golden-section search per interval length (in log sigma), the others rescaled to keep the span."""
    lengths = [a - b for a, b in zip(logs[:-1], logs[1:])] + [logs[-1] - floor]
    if min(lengths) <= 0:  # a level sits exactly on the floor: nothing to rescale from
        return logs, cur
    logw = [math.log(v) for v in lengths]
    for j in range(len(logw)):

        def f(u, j=j):
            w = logw[:j] + [logw[j] + u] + logw[j + 1:]
            return loss(_from_lengths([math.exp(v) for v in w], top, top - floor))

        u, val = _golden(f, -2.0, 2.0, iters)
        if val < cur:
            logw[j] += u
            cur = val
    return _from_lengths([math.exp(v) for v in logw], top, top - floor), cur


def tune_sigmas(denoiser, x: Tensor, sampler: str, steps: int, sigma_min: float, sigma_max: float, *,
                cond: dict | None = None, teacher: str = "dpmpp_2m", teacher_steps: int = 200,
                teacher_grid: str | Tensor = "karras", target: Tensor | None = None, starts: dict | None = None,
                distance=None, max_sweeps: int = 8, rtol: float = 0.01, search_iters: int = 8, seed: int = 0,
                progress: bool = False, **opts) -> TunedGrid:
    """Tune a ``steps``-level grid for ``sampler`` on the pilot start states ``x`` (at ``sigma_max``).

    Every level stays in [``sigma_min``, ``sigma_max``] (the model's trained range); the top level
    is ``sigma_max``. ``target`` (the teacher's outputs for ``x``) is computed with ``teacher`` on
    ``teacher_grid`` when not given: a sigma-grid kind (``karras``, ``exponential``) of
    ``teacher_steps`` levels over [``sigma_min``, ``sigma_max``], or explicit sigmas (e.g. a model's
    own grid at many steps, for a model that is poor at the smallest sigmas). ``starts`` adds named
    starting grids (e.g. the model's default grid, to be scored beside the tuned one); each must
    have ``steps + 1`` levels from ``sigma_max`` down to 0. ``distance(out, target)`` (float64
    tensors) replaces the mean squared difference as the loss. ``opts`` go to the sampler (e.g.
    ``order``). See the module docstring for the search.
    """
    check_sampler(sampler)
    if steps < 1:
        raise ValueError(f"the number of steps must be at least 1, got {steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    candidates = _checked_starts(starts or {}, steps, sigma_min, sigma_max)
    cond = cond or {}
    calls = 0

    def counted(xx, sigma, **c):
        nonlocal calls
        calls += xx.shape[0] / x.shape[0]  # in pilot-batch units, whatever batching the sampler does
        return denoiser(xx, sigma, **c)

    grid_name = teacher_grid if isinstance(teacher_grid, str) else "given"
    if target is None:
        if isinstance(teacher_grid, str):
            teacher_grid = get_sigmas(teacher_grid, teacher_steps, sigma_min, sigma_max)
        teacher_steps = len(teacher_grid) - 1
        target = sample(teacher, counted, x, teacher_grid.to(x.device), cond=cond,
                        generator=torch.Generator(x.device).manual_seed(seed))
    elif target.shape != x.shape:
        raise ValueError(f"target has shape {tuple(target.shape)}, the pilot batch {tuple(x.shape)}")
    target = target.to(torch.float64)
    bar = tqdm(desc=f"tuning {steps} {sampler} steps", unit="run", disable=not progress, leave=False)
    evaluations = 0

    def loss(log_sigmas: list[float]) -> float:
        nonlocal evaluations
        evaluations += 1
        bar.update(1)
        out = sample(sampler, counted, x, _grid(log_sigmas, sigma_max).to(x.device), cond=cond,
                     generator=torch.Generator(x.device).manual_seed(seed), **opts)
        out = out.to(torch.float64)
        err = float(((out - target) ** 2).mean() if distance is None else distance(out, target))
        return err if math.isfinite(err) else math.inf

    top, floor = math.log(sigma_max), math.log(sigma_min)
    # 1. the best of the starting grids: the user's (checked above), Karras (rho 7) over the whole range, variants
    candidates.update(_standard_starts(steps, sigma_min, sigma_max))
    start_losses = {}
    for name, grid in candidates.items():
        start_losses[name] = loss([top] + [math.log(float(v)) for v in grid[1:-1]])
    start = min(start_losses, key=start_losses.get)
    best = [top] + [math.log(float(v)) for v in candidates[start][1:-1]]
    best_loss = start_losses[start]
    if steps == 1:
        bar.close()
        return TunedGrid(_grid([top], sigma_max), sampler, 1, best_loss, start, start_losses, evaluations,
                         round(calls), teacher, teacher_steps, x.shape[0], grid_name)

    # 2. coordinate descent in two coordinate systems
    logs, cur = best, best_loss
    for _ in range(max_sweeps):
        before = cur
        logs, cur = _sweep_lengths(loss, logs, cur, top, floor, search_iters)
        logs, cur = _sweep_levels(loss, logs, cur, floor, search_iters)
        bar.set_postfix(loss=f"{cur:.3g}")
        if cur >= before * (1 - rtol):
            break
    bar.close()
    return TunedGrid(_grid(logs, sigma_max), sampler, steps, cur, start, start_losses, evaluations,
                     round(calls), teacher, teacher_steps, x.shape[0], grid_name)
