"""Variational diffusion models (Kingma et al. 2021, "VDM"): a learned monotone log-SNR schedule, the
continuous-time VP process it defines, its denoiser view, and the continuous-time ELBO in bits per dimension.

The schedule is gamma(t) = -logSNR(t), increasing on t in [0, 1] (VDM eq. 3 and Sec. 4). A VP latent is
z_t = alpha_t x + sigma_t eps with alpha_t^2 = sigmoid(-gamma(t)) and sigma_t^2 = sigmoid(gamma(t)) (VDM
eq. 4); in reverie's VE coordinates x = z_t / alpha_t = x0 + sigma eps with sigma = sqrt(exp(gamma)). The
negative ELBO of data x (VDM eq. 11, 17 and App. C) is the sum of three terms, in nats summed over dims:

    prior           KL(q(z_1 | x) || N(0, I))
    reconstruction  -log p(x | z_0), p(x_i = v_k | z_0) proportional to q(z_0 | x_i = v_k) over the levels
    diffusion       0.5 E_{t ~ U(0,1), eps} [gamma'(t) |eps - eps_hat(z_t, gamma(t))|^2]

The diffusion term equals 0.5 int_{gamma_0}^{gamma_1} exp(-gamma) E|x0 - D(x0 + e^{gamma/2} eps)|^2 d gamma
(VDM eq. 17 after the change of variables gamma = gamma(t)): it depends on the schedule only through its
endpoints, provided the network sees the noise level and not t. Here the network is conditioned on gamma,
so the schedule's shape changes only the variance of the Monte-Carlo estimate, and it is trained to
minimize that variance (VDM Sec. 5.2): the endpoints get the ELBO's gradient, the shape parameters the
gradient of E[L_diff^2] (by the invariance, the gradient of the variance), computed in one backward pass
by scaling their incoming gradient per sample by 2 L_diff (:func:`variance_gradient`).

Choices written down here:

* ``GammaNetwork`` follows VDM App. H: gamma_tilde(t) = l1(t) + l3(phi(l2(2t - 1))) / H with positive
  weights (here softplus of a raw parameter, smooth where VDM takes absolute values) and phi = tanh, so it
  is increasing by construction; gamma(t) = gamma_0 + (gamma_1 - gamma_0) s(t) with the shape
  s(t) = (gamma_tilde(t) - gamma_tilde(0)) / (gamma_tilde(1) - gamma_tilde(0)) in [0, 1]. The endpoints
  are parameters, learned or frozen. Everything is float64 (autocast leaves float64 alone).
* ``FixedGamma``: linear in gamma (VDM's fixed baseline) or the truncated continuous cosine
  (gamma(t) = 2 log tan(a t + b), Nichol & Dhariwal 2021 eq. 17 without the offset, with a, b placing
  the endpoints exactly), the same interface, nothing to learn.
* The network's noise input is c_noise = 1000 (gamma - GAMMA_REF[0]) / (GAMMA_REF[1] - GAMMA_REF[0]),
  a fixed affine map of gamma (VDM conditions its score network on normalized gamma the same way), so
  the scale matches reverie's U-Net time embeddings and does not move when the schedule learns.
* Denoiser view (:class:`VDMScheduleView`): a schedule over T = 1000 table timesteps t_i = i / (T - 1),
  as ``DiscreteVPSchedule`` presents itself, so every sampler and grid works on a learned schedule.
  ``t_from_sigma`` inverts the monotone gamma by bisection in float64 (60 halvings: exact to rounding);
  :class:`VDMNet` maps the table timestep back to gamma. The round trip sigma -> t -> gamma is exact.
* The decoder uses reverie's image levels v_k = 2k / (L - 1) - 1 (L = 256) and, as VDM's, has no
  network: its logits are -(x - v_k)^2 / (2 sigma_0^2) in VE coordinates, normalized over the levels.
  Bits per dimension are nats / (n ln 2) with no dequantization term: the decoder is a distribution
  over the discrete levels.
* :func:`continuous_elbo` evaluates any reverie denoiser ``D(x, sigma)`` (a VDM model through its view,
  or a discrete-time model at its own endpoints): t is drawn uniform in [0, 1] (with ``antithetic``
  stratification, VDM's low-discrepancy sampler: t_i = (u + i / B) mod 1) and mapped through a schedule
  of the given endpoints; by the invariance any schedule gives an unbiased estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .utils import append_dims

__all__ = [
    "GAMMA_REF",
    "GAMMA_KINDS",
    "GammaNetwork",
    "FixedGamma",
    "make_gamma",
    "gamma_with_derivative",
    "variance_gradient",
    "VDMScheduleView",
    "VDMNet",
    "c_noise_from_gamma",
    "sample_times",
    "prior_kl",
    "reconstruction_nll",
    "diffusion_loss",
    "ELBOTerms",
    "continuous_elbo",
    "linear_gamma_between",
    "optimal_gaussian_diffusion_loss",
]

GAMMA_REF = (-13.3, 5.0)   # VDM's initial endpoints (App. H); also the fixed range c_noise is normalized by
GAMMA_KINDS = ("learned", "linear", "cosine")
_TABLE_STEPS = 1000


def _positive(raw: Tensor) -> Tensor:
    return F.softplus(raw)


class _Endpoints(nn.Module):
    """gamma_0 = gamma(0) (lowest noise) and gamma_1 = gamma(1), learned or frozen."""

    def __init__(self, gamma_min: float, gamma_max: float, learn_endpoints: bool):
        super().__init__()
        if not gamma_min < gamma_max:
            raise ValueError(f"need gamma_min < gamma_max, got {gamma_min} and {gamma_max}")
        self.gamma_0 = nn.Parameter(torch.tensor(float(gamma_min), dtype=torch.float64),
                                    requires_grad=learn_endpoints)
        self.gamma_1 = nn.Parameter(torch.tensor(float(gamma_max), dtype=torch.float64),
                                    requires_grad=learn_endpoints)
        self.init = (float(gamma_min), float(gamma_max))
        self.learn_endpoints = learn_endpoints

    @property
    def gamma_min(self) -> float:
        return float(self.gamma_0.detach())

    @property
    def gamma_max(self) -> float:
        return float(self.gamma_1.detach())

    def shape(self, t: Tensor) -> Tensor:
        """s(t), increasing from s(0) = 0 to s(1) = 1."""
        raise NotImplementedError

    def forward(self, t: Tensor) -> Tensor:
        """gamma(t) (float64, t's shape)."""
        return self.from_shape(self.shape(t))

    def from_shape(self, s: Tensor) -> Tensor:
        return self.gamma_0 + (self.gamma_1 - self.gamma_0) * s


class GammaNetwork(_Endpoints):
    """VDM's monotone log-SNR network (App. H), increasing in t by construction (positive weights)."""

    kind = "learned"

    def __init__(self, gamma_min: float = GAMMA_REF[0], gamma_max: float = GAMMA_REF[1],
                 learn_endpoints: bool = True, hidden: int = 1024, speed: float = 1.0):
        super().__init__(gamma_min, gamma_max, learn_endpoints)
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        self.hidden, self.speed = hidden, float(speed)
        f64 = dict(dtype=torch.float64)
        # l1: 1 -> 1; l2: 1 -> H; l3: H -> 1. Raw weights through softplus; l3 starts small, so the
        # schedule starts close to linear in gamma (VDM initializes to its linear schedule). The stored
        # parameters are raw / speed: Adam moves each by about lr per step, so the raw weights move speed x lr
        # (a learning-rate multiplier for the shape that needs no optimizer change).
        self.w1 = nn.Parameter(torch.zeros((), **f64))
        self.w2 = nn.Parameter(torch.randn(hidden, **f64) * 0.5 / speed)
        self.b2 = nn.Parameter(torch.randn(hidden, **f64) / speed)
        self.w3 = nn.Parameter(torch.full((hidden,), -4.0 / speed, **f64))

    def tilde(self, t: Tensor) -> Tensor:
        """gamma_tilde(t), unnormalized and increasing."""
        t, k = t.to(torch.float64), self.speed
        h = torch.tanh((2 * t - 1)[..., None] * _positive(k * self.w2) + k * self.b2)
        return _positive(k * self.w1) * t + (h * _positive(k * self.w3)).sum(-1) / self.hidden

    def shape(self, t: Tensor) -> Tensor:
        ends = self.tilde(torch.tensor([0.0, 1.0], dtype=torch.float64, device=self.w1.device))
        return (self.tilde(t) - ends[0]) / (ends[1] - ends[0])

    def config(self) -> dict:
        return {"kind": self.kind, "gamma_min": self.init[0], "gamma_max": self.init[1],
                "learn_endpoints": self.learn_endpoints, "hidden": self.hidden, "speed": self.speed}


class FixedGamma(_Endpoints):
    """A fixed-shape schedule: ``linear`` in gamma, or the truncated continuous ``cosine``."""

    def __init__(self, kind: str = "linear", gamma_min: float = GAMMA_REF[0], gamma_max: float = GAMMA_REF[1],
                 learn_endpoints: bool = False):
        if kind not in ("linear", "cosine"):
            raise ValueError(f"unknown fixed schedule {kind!r}; choose linear or cosine")
        super().__init__(gamma_min, gamma_max, learn_endpoints)
        self.kind = kind

    def forward(self, t: Tensor) -> Tensor:
        t = t.to(torch.float64)
        if self.kind == "linear":
            return self.from_shape(t)
        # alpha^2 = cos^2(theta), sigma^2 = sin^2(theta): gamma = 2 log tan(theta), theta from b to b + a
        b = torch.atan(torch.exp(self.gamma_0 / 2))
        a = torch.atan(torch.exp(self.gamma_1 / 2)) - b
        return 2 * torch.log(torch.tan(a * t + b))

    def shape(self, t: Tensor) -> Tensor:
        return (self(t) - self.gamma_0) / (self.gamma_1 - self.gamma_0)

    def config(self) -> dict:
        return {"kind": self.kind, "gamma_min": self.init[0], "gamma_max": self.init[1],
                "learn_endpoints": self.learn_endpoints}


def make_gamma(config: dict) -> _Endpoints:
    """A schedule from its ``config()`` (stored in a model directory's ``config.json`` under ``"vdm"``)."""
    config = dict(config)
    kind = config.pop("kind", "learned")
    if kind == "learned":
        return GammaNetwork(**config)
    if kind in GAMMA_KINDS:
        return FixedGamma(kind, **config)
    raise ValueError(f"unknown VDM schedule kind {kind!r}; choose one of {', '.join(GAMMA_KINDS)}")


def linear_gamma_between(sigma_min: float, sigma_max: float) -> FixedGamma:
    """The linear-in-gamma schedule between two VE noise levels (for evaluating any model's ELBO)."""
    return FixedGamma("linear", 2 * math.log(sigma_min), 2 * math.log(sigma_max))


class _VarianceGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``box["scale"]`` (set after the loss)."""

    @staticmethod
    def forward(ctx, x, box):
        ctx.box = box
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        scale = ctx.box.get("scale")
        if scale is None:
            raise RuntimeError("variance_gradient: set box['scale'] before backward")
        return grad * append_dims(scale.to(grad), grad.ndim), None


def variance_gradient(x: Tensor, box: dict) -> Tensor:
    """Route the shape parameters' gradient through per-sample factors ``box["scale"]`` [B]: with
    ``scale = 2 L_diff.detach()`` the gradient of mean(L_diff) becomes that of mean(L_diff^2) (VDM Sec. 5.2)."""
    return _VarianceGrad.apply(x, box)


def gamma_with_derivative(schedule: _Endpoints, t: Tensor, create_graph: bool = False,
                          box: dict | None = None) -> tuple[Tensor, Tensor]:
    """gamma(t) and gamma'(t) [B] (float64). ``create_graph`` keeps both differentiable in the schedule's
    parameters (training); ``box``: route the shape's gradient through :func:`variance_gradient`."""
    t = t.detach().to(torch.float64).requires_grad_(True)
    with torch.enable_grad():
        s = schedule.shape(t)
        (ds,) = torch.autograd.grad(s.sum(), t, create_graph=create_graph)
    if not create_graph:
        s = s.detach()
    if box is not None:
        s, ds = variance_gradient(s, box), variance_gradient(ds, box)
    return schedule.from_shape(s), (schedule.gamma_1 - schedule.gamma_0) * ds


def c_noise_from_gamma(gamma: Tensor) -> Tensor:
    """The network's noise input: a fixed affine map of gamma onto [0, 1000] over GAMMA_REF."""
    return 1000.0 * (gamma - GAMMA_REF[0]) / (GAMMA_REF[1] - GAMMA_REF[0])


class VDMScheduleView:
    """A gamma schedule as samplers see a schedule: T table timesteps t_i = i / (T - 1), VE sigmas, and the
    exact ``t_from_sigma`` / ``sigma_from_t`` (module docstring). Reads the schedule's current parameters on
    every call, so a view of a schedule that is training stays current."""

    name = "vdm"
    zero_terminal_snr = False

    def __init__(self, gamma: _Endpoints, num_timesteps: int = _TABLE_STEPS):
        self.gamma, self.num_timesteps = gamma, num_timesteps

    @torch.no_grad()
    def _sigma_at(self, t: Tensor) -> Tensor:
        return torch.exp(self.gamma(t.to(torch.float64)) / 2)

    @property
    def sigmas(self) -> Tensor:
        return self._sigma_at(torch.linspace(0, 1, self.num_timesteps, dtype=torch.float64))

    @property
    def log_sigmas(self) -> Tensor:
        return self.sigmas.log()

    @property
    def alphas_cumprod(self) -> Tensor:
        return 1 / (1 + self.sigmas**2)

    @property
    def sigma_min(self) -> float:
        return math.exp(self.gamma.gamma_min / 2)

    @property
    def sigma_max(self) -> float:
        return math.exp(self.gamma.gamma_max / 2)

    @property
    def finite_sigmas(self) -> Tensor:
        return self.sigmas

    def config(self) -> dict:
        return {"kind": "vdm", **self.gamma.config()}

    def sigma_from_t(self, t) -> Tensor:
        """VE sigma at table timestep t in [0, T - 1] (fractional allowed)."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_timesteps - 1)
        return self._sigma_at(t / (self.num_timesteps - 1))

    @torch.no_grad()
    def t_from_sigma(self, sigma) -> Tensor:
        """Table timestep for VE sigma: gamma inverted by bisection (clamped to the endpoints)."""
        target = 2 * torch.as_tensor(sigma, dtype=torch.float64).log()
        lo, hi = torch.zeros_like(target), torch.ones_like(target)
        for _ in range(60):
            mid = (lo + hi) / 2
            below = self.gamma(mid) < target
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return (lo + hi) / 2 * (self.num_timesteps - 1)


class VDMNet(nn.Module):
    """A noise-prediction network with its gamma schedule: ``forward(x_vp, c_noise)`` takes the view's table
    timestep (what ``EpsDenoiser`` passes), or ``gamma=`` directly (training). Saved as one module
    (``net.*`` and ``gamma.*`` weights); ``schedule_view`` is what sampling uses as the model's schedule."""

    def __init__(self, net: nn.Module, gamma: _Endpoints):
        super().__init__()
        self.net, self.gamma = net, gamma

    @property
    def config(self):
        return self.net.config

    def schedule_config(self) -> dict:
        return self.gamma.config()

    @property
    def schedule_view(self) -> VDMScheduleView:
        return VDMScheduleView(self.gamma)

    def forward(self, x: Tensor, c_noise: Tensor | None = None, *, gamma: Tensor | None = None, **cond) -> Tensor:
        if gamma is None:
            with torch.no_grad():
                gamma = self.gamma(c_noise.to(torch.float64) / (_TABLE_STEPS - 1))
        return self.net(x, c_noise_from_gamma(gamma).to(x.dtype), **cond)


def sample_times(batch_size: int, generator: torch.Generator, antithetic: bool = True) -> Tensor:
    """t [B] in [0, 1) (float64): uniform, or VDM's low-discrepancy t_i = (u + i / B) mod 1."""
    if antithetic:
        u = torch.rand((), generator=generator, dtype=torch.float64)
        return (u + torch.arange(batch_size, dtype=torch.float64) / batch_size) % 1.0
    return torch.rand(batch_size, generator=generator, dtype=torch.float64)


def _sum_dims(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).sum(-1)


def prior_kl(x0: Tensor, gamma_1: Tensor) -> Tensor:
    """KL(N(alpha_1 x0, sigma_1^2 I) || N(0, I)) [B] in nats (VDM eq. 11's prior term)."""
    g = torch.as_tensor(gamma_1, dtype=torch.float64)
    var, mean_sq = torch.sigmoid(g), torch.sigmoid(-g) * x0.to(torch.float64) ** 2
    return 0.5 * _sum_dims(var + mean_sq - 1 - F.logsigmoid(g))


def reconstruction_nll(x0: Tensor, gamma_0: Tensor, noise: Tensor, num_levels: int = 256) -> Tensor:
    """-log p(x0 | z_0) [B] in nats with VDM's decoder over ``num_levels`` levels in [-1, 1] (App. C):
    z_0 = x0 + sigma_0 noise (VE), p(v_k | z_0) proportional to exp(-(z_0 - v_k)^2 / (2 sigma_0^2)).

    The normalizer sums over the levels within 12 sigma_0 + |noise| of z_0's own level, not all of them: a
    level further away weighs below exp(-72) of z_0's nearest one, so the result is exact in float64, at a
    few levels per pixel instead of 256."""
    x64 = x0.to(torch.float64)
    sigma_0 = torch.exp(torch.as_tensor(gamma_0, dtype=torch.float64) / 2)
    noise64 = noise.to(torch.float64)
    z = (x64 + sigma_0 * noise64).reshape(-1, 1)
    spacing = 2.0 / (num_levels - 1)
    k = ((x64 + 1) / spacing).round().long().clamp(0, num_levels - 1).reshape(-1, 1)
    reach = float(sigma_0.detach()) * (12 + float(noise64.abs().max()))
    width = min(num_levels - 1, math.ceil(reach / spacing) + 1)
    offsets = torch.arange(-width, width + 1, device=x0.device)
    idx = k + offsets                                            # [N, 2w + 1] candidate levels
    inside = (idx >= 0) & (idx < num_levels)
    levels = idx.clamp(0, num_levels - 1).to(torch.float64) * spacing - 1
    logits = (-0.5 * ((z - levels) / sigma_0) ** 2).masked_fill(~inside, -math.inf)
    logp = logits[:, width] - logits.logsumexp(-1)               # offset 0 is x0's own level
    return -logp.reshape(x0.shape[0], -1).sum(-1)


def diffusion_loss(noise: Tensor, eps_hat: Tensor, dgamma: Tensor) -> Tensor:
    """0.5 gamma'(t) |eps - eps_hat|^2 [B] in nats (VDM eq. 17, one t per sample)."""
    err = _sum_dims((noise.float() - eps_hat.float()) ** 2).to(torch.float64)
    return 0.5 * dgamma.to(torch.float64) * err


@dataclass
class ELBOTerms:
    """Per-sample terms of the negative continuous-time ELBO [B], in nats summed over dimensions."""

    prior: Tensor
    reconstruction: Tensor
    diffusion: Tensor
    num_dims: int

    @property
    def total(self) -> Tensor:
        return self.prior + self.reconstruction + self.diffusion

    def bits_per_dim(self) -> Tensor:
        return self.total / (self.num_dims * math.log(2.0))


@torch.no_grad()
def continuous_elbo(denoiser, x0: Tensor, schedule: _Endpoints, generator: torch.Generator,
                    num_t: int = 1, antithetic: bool = True, num_levels: int = 256, cond: dict | None = None
                    ) -> ELBOTerms:
    """The negative ELBO of ``x0`` (levels in [-1, 1]) under denoiser ``D(x, sigma)`` with the endpoints of
    ``schedule`` (VDM eq. 11 and 17): the diffusion term averaged over ``num_t`` draws of (t, eps) per sample.
    Draws come from ``generator`` (CPU) in a fixed order, so a seed gives the same estimate."""
    B, n = x0.shape[0], x0[0].numel()
    gamma_0 = torch.tensor(schedule.gamma_min, dtype=torch.float64)
    gamma_1 = torch.tensor(schedule.gamma_max, dtype=torch.float64)
    noise0 = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(x0.device)
    recon = reconstruction_nll(x0, gamma_0, noise0, num_levels)
    diff = torch.zeros(B, dtype=torch.float64, device=x0.device)
    for _ in range(num_t):
        t = sample_times(B, generator, antithetic)
        gamma, dgamma = gamma_with_derivative(schedule, t)
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
        sigma = torch.exp(gamma / 2).to(x0.device)
        x = x0 + append_dims(sigma.to(x0.dtype), x0.ndim) * eps
        x0_hat = denoiser(x, sigma.to(x0.dtype), **(cond or {}))
        # eps - eps_hat = (x0_hat - x0) / sigma, so 0.5 gamma' |eps - eps_hat|^2 = 0.5 gamma' e^-gamma |x0_hat - x0|^2
        err = _sum_dims((x0_hat.to(torch.float64) - x0.to(torch.float64)) ** 2)
        diff += 0.5 * dgamma.to(x0.device) * torch.exp(-gamma.to(x0.device)) * err / num_t
    return ELBOTerms(prior_kl(x0, gamma_1), recon, diff, n)


def optimal_gaussian_diffusion_loss(variance: float, num_dims: int, gamma_min: float, gamma_max: float) -> float:
    """The diffusion term (nats) under the optimal denoiser for data N(0, v I): the integrand
    exp(-gamma) E|x0 - D*|^2 = n v / (v + e^gamma), integrated: 0.5 n [gamma - log(v + e^gamma)] between
    the endpoints. The closed form the tests check the estimators and the invariance against."""
    def antiderivative(g: float) -> float:
        return g - math.log(variance + math.exp(g))
    return 0.5 * num_dims * (antiderivative(gamma_max) - antiderivative(gamma_min))
