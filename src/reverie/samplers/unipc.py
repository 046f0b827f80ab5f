"""UniPC (Zhao et al. 2023, "UniPC"): multistep predictor UniP-p plus corrector UniC-p, data
prediction, B(h) variants, in VE coordinates with lambda = -log(sigma).

Exact step from lambda_s to lambda_t = lambda_s + h (as in :mod:`.dpm_solver`), with D expanded in
Taylor series around lambda_s:

    x_t = e^{-h} x_s + (1 - e^{-h}) D_s + sum_{k>=1} h^{k+1} phi_{k+1}(-h) D^(k)_s,

phi_1(z) = (e^z - 1) / z, phi_{k+1}(z) = (phi_k(z) - 1/k!) / z. UniPC replaces the sum by
-B(h) sum_m rho_m (D_m - D_s) / r_m over earlier points (or, for the corrector, also the new point
at r = 1), with r_m = (lambda_m - lambda_s) / h and rho solving the order conditions (paper Sec. 3.1,
data-prediction form, h -> -h):

    sum_m rho_m r_m^{k-1} = k! (-h) phi_{k+1}(-h) / B(h),    k = 1 .. p.

B(h) = -h ("bh1") or e^{-h} - 1 ("bh2"). When p conditions are solved exactly B(h) cancels; it
matters where UniPC uses rho = 1/2 instead (UniP-2 and UniC-1, as the paper's code does).

The predictor of order p uses p - 1 earlier points (conditions 1 .. p - 1). After the next
denoiser call, at the predicted point, the corrector UniC-p re-solves the previous step with that
new point too (conditions 1 .. p), for order p + 1 at no extra call; the new denoised output is
then reused by the next predictor.

Choices written down here:

* Step i has order min(order, i + 1) (warm-up); with ``lower_order_final`` also at most n - i,
  the steps left, as the UniPC reference code and diffusers do.
* The step to sigma = 0 is exact and first order: x = D(x, sigma). The corrector is applied after
  every step except that last one (its output would need another call); ``use_corrector=False``
  or ``disable_corrector=(i, ...)`` skip it, for all steps or for the outputs of steps i.
* The corrector adds its difference to the predictor (x^c - x^p, in closed form) to the state a
  callback returned, so a callback that edits x (e.g. inpainting) keeps its edit.
* The nonzero part of the grid must be strictly decreasing (repeated sigmas make the order
  conditions singular).
"""

from __future__ import annotations

import math

import torch

from .base import denoise, register, report

VARIANTS = ("bh1", "bh2")
ORDERS = (1, 2, 3)


def _b_vector(h: float, p: int, variant: str) -> tuple[list[float], float]:
    """Right-hand sides k! (-h) phi_{k+1}(-h) / B(h), k = 1..p, and B(h) (UniPC Sec. 3.1)."""
    hh = -h
    B = hh if variant == "bh1" else math.expm1(hh)
    phi = math.expm1(hh) / hh  # phi_1(hh)
    fact, b = 1.0, []
    for k in range(1, p + 1):
        phi = (phi - 1.0 / fact) / hh  # phi_{k+1}, fact = k!
        b.append(fact * hh * phi / B)
        fact *= k + 1
    return b, B


def _rhos(rs: list[float], b: list[float], simple: bool) -> list[float]:
    """Solve sum_m rho_m r_m^{k-1} = b_k (a Vandermonde system); ``simple`` takes rho = 1/2."""
    if simple:
        return [0.5]
    R = torch.tensor([[r ** (k - 1) for r in rs] for k in range(1, len(rs) + 1)], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64)).tolist()


def _weighted(coeffs: list[float], tensors: list) -> torch.Tensor | float:
    out = 0.0
    for c, t in zip(coeffs, tensors):
        out = out + c * t
    return out


def _earlier_points(hist, h: float, count: int):
    """r_m = (lambda_m - lambda_s) / h and (D_m - D_s) / r_m for the ``count`` points before hist[-1]."""
    lam_s, d_s = hist[-1]
    rs = [(hist[-2 - m][0] - lam_s) / h for m in range(count)]
    return rs, [(hist[-2 - m][1] - d_s) / r for m, r in enumerate(rs)]


def _predict(x, hist, lam_t: float, p: int, variant: str):
    """UniP-p from the newest history point (lambda_s, D_s) to lambda_t; p - 1 earlier points."""
    lam_s, d_s = hist[-1]
    h = lam_t - lam_s
    x_t = math.exp(-h) * x - math.expm1(-h) * d_s
    if p == 1:
        return x_t
    rs, diffs = _earlier_points(hist, h, p - 1)
    b, B = _b_vector(h, p - 1, variant)
    rho_p = _rhos(rs, b, simple=p == 2)
    return x_t - B * _weighted(rho_p, diffs)


def _correction(hist, lam_t: float, d_t, p: int, variant: str):
    """UniC-p minus UniP-p for the step from hist[-1] to lambda_t, given D at the predicted point."""
    lam_s, d_s = hist[-1]
    h = lam_t - lam_s
    rs, diffs = _earlier_points(hist, h, p - 1)
    b, B = _b_vector(h, p, variant)
    rho_c = _rhos(rs + [1.0], b, simple=p == 1)
    rho_p = _rhos(rs, b[:-1], simple=p == 2) if p > 1 else []
    delta = [c - q for c, q in zip(rho_c[:-1], rho_p)]
    return -B * (_weighted(delta, diffs) + rho_c[-1] * (d_t - d_s))


def _check(sigmas, order: int, variant: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"unipc order must be one of {ORDERS}, got {order!r}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown UniPC variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    nonzero = torch.as_tensor(sigmas, dtype=torch.float64)[:-1]
    if bool((nonzero <= 0).any()) or bool((nonzero[1:] >= nonzero[:-1]).any()):
        raise ValueError("unipc needs a strictly decreasing grid with a single final 0")


@register("unipc")
def sample_unipc(denoiser, x, sigmas, *, generator=None, callback=None, cond=None, order=2,
                 variant="bh2", use_corrector=True, disable_corrector=(), lower_order_final=True):
    """Multistep UniPC (Zhao et al. 2023, Sec. 3, data prediction): UniP-``order`` steps, each
    corrected by UniC at the next denoiser call. ``variant`` picks B(h): "bh1" or "bh2"."""
    _check(sigmas, order, variant)
    cond = cond or {}
    n = len(sigmas) - 1
    skip = set(disable_corrector)
    hist, prev_order = [], 0  # hist: (lambda, denoised) of the last `order` points
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        lam = -math.log(sigma)
        denoised = denoise(denoiser, x, sigma, cond)
        if sigma_next == 0:
            x_next = denoised  # exact (lambda_next = inf); a correction of x would not reach it
        else:
            if hist and use_corrector and (i - 1) not in skip:
                x = x + _correction(hist, lam, denoised, prev_order, variant)
            hist = (hist + [(lam, denoised)])[-order:]
            p = min(order, i + 1, n - i if lower_order_final else order)
            x_next = _predict(x, hist, -math.log(sigma_next), p, variant)
            prev_order = p
        x = report(callback, i, sigmas, x_next, denoised)
    return x
