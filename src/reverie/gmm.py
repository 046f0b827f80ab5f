"""Gaussian-mixture data with its exact noised marginals and exact optimal denoiser.

For p_0 = sum_k w_k N(mu_k, C_k) and x = x0 + sigma * n (VE coordinates, Karras et al. 2022, eq. 1),
the noised marginal is p_sigma = sum_k w_k N(mu_k, C_k + sigma^2 I), and the minimum-MSE denoiser is

    D(x, sigma) = E[x0 | x] = sum_k r_k(x) (mu_k + C_k (C_k + sigma^2 I)^-1 (x - mu_k)),

with responsibilities r_k(x) proportional to w_k N(x; mu_k, C_k + sigma^2 I) (Bishop 2006, eq. 2.116
for each component's posterior; Tweedie: D = x + sigma^2 grad log p_sigma, Efron 2011, eq. 2.8).

Choices written down here:

* Everything is float64. Each covariance is eigendecomposed once, C_k = U_k diag(lam_k) U_k^T, so
  C_k + sigma^2 I = U_k diag(lam_k + sigma^2) U_k^T for every sigma at no further cost: a batch of
  B different sigmas needs no B x K Cholesky factorizations, and the log-determinant and the solve
  are exact sums over the eigenvalues (as stable as Cholesky for symmetric positive matrices).
* Diagonal covariances (isotropic or axis-aligned components) skip the rotations; with one sigma
  for the whole batch (what samplers pass) the Mahalanobis sums expand into [N, D] x [D, K]
  products, O(N K D) instead of O(N K D^2), which is what makes 20k-sample 64-D benchmarks cheap.
* Responsibilities are normalized in log space with the row maximum subtracted (log-sum-exp), so
  a point far from every component (sigma = 4096, or tiny sigma away from the data) still gets
  finite, normalized weights.
* ``denoiser`` takes ``x`` of shape ``[B, ...]`` whose trailing dims flatten to ``D`` and a scalar or
  ``[B]`` sigma, and returns a tensor of ``x``'s shape and dtype: it is a reverie denoiser.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .utils import batch_sigma

__all__ = ["GaussianMixture", "ring2d", "grid2d", "random_mixture", "sliced_w2", "sorted_projections"]


class GaussianMixture:
    """sum_k w_k N(mu_k, C_k) in float64.

    ``weights`` [K] (normalized here), ``means`` [K, D]; give either ``covs`` [K, D, D] or
    ``stds`` (a scalar, [K] for isotropic components, or [K, D] for diagonal ones).
    """

    def __init__(self, weights, means, covs=None, stds=None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must have shape [K, D], got {tuple(means.shape)}")
        K, D = means.shape
        dev = means.device
        weights = torch.as_tensor(weights, dtype=torch.float64, device=dev).flatten()
        if weights.numel() != K or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError(f"weights must be {K} non-negative numbers with a positive sum")
        if (covs is None) == (stds is None):
            raise ValueError("give exactly one of covs [K, D, D] or stds (scalar, [K] or [K, D])")
        if covs is None:
            var = torch.as_tensor(stds, dtype=torch.float64, device=dev) ** 2
            var = var.reshape(-1, 1).expand(K, D) if var.ndim < 2 else var
            if var.shape != (K, D):
                raise ValueError(f"stds must be a scalar, [K] or [K, D] = [{K}, {D}]")
            covs = torch.diag_embed(var)
        covs = torch.as_tensor(covs, dtype=torch.float64, device=dev)
        if covs.shape != (K, D, D):
            raise ValueError(f"covs must have shape [K, D, D] = [{K}, {D}, {D}], got {tuple(covs.shape)}")
        self.weights = weights / weights.sum()
        self.means = means
        self.covs = (covs + covs.transpose(1, 2)) / 2
        # Diagonal covariances (isotropic or axis-aligned components) need no rotations at all.
        self._diagonal = bool((self.covs == torch.diag_embed(self.covs.diagonal(dim1=1, dim2=2))).all())
        if self._diagonal:
            lam = self.covs.diagonal(dim1=1, dim2=2).clone()
            U = torch.eye(D, dtype=torch.float64, device=dev).expand(K, D, D).clone()
        else:
            lam, U = torch.linalg.eigh(self.covs)
        if bool((lam < -1e-12 * lam.abs().max().clamp(min=1)).any()):
            raise ValueError("covariances must be positive semi-definite")
        self.eigvals, self.eigvecs = lam.clamp(min=0), U  # [K, D], [K, D, D]
        # The same rotations laid out for one matrix product over all components (see _components):
        # [D + 1, K*D], whose last row subtracts U_k^T mu_k, and [K*D, D], the U_k^T stacked over k.
        mu_rot = torch.einsum("kji,kj->ki", U, means).reshape(1, K * D)
        self._proj = torch.cat([U.permute(1, 0, 2).reshape(D, K * D), -mu_rot])
        self._back = U.transpose(1, 2).reshape(K * D, D)

    def to(self, device) -> GaussianMixture:
        """A copy whose tensors live on ``device`` (the denoiser then runs there, still in float64)."""
        new = object.__new__(GaussianMixture)
        new.__dict__ = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.__dict__.items()}
        return new

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> Tensor:
        """Mixture mean sum_k w_k mu_k, [D]."""
        return self.weights @ self.means

    def cov(self) -> Tensor:
        """Mixture covariance sum_k w_k (C_k + mu_k mu_k^T) - m m^T, [D, D] (law of total variance)."""
        m = self.mean()
        outer = self.means[:, :, None] * self.means[:, None]
        second = torch.einsum("k,kij->ij", self.weights, self.covs + outer)
        return second - m[:, None] * m[None]

    def noised(self, sigma: float) -> GaussianMixture:
        """The exact marginal p_sigma of x0 + sigma * n: covariances C_k + sigma^2 I."""
        eye = torch.eye(self.dim, dtype=torch.float64, device=self.means.device)
        return GaussianMixture(self.weights, self.means, covs=self.covs + float(sigma) ** 2 * eye)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` float64 samples [n, D]: a component by weight, then mu_k + U_k sqrt(lam_k) z."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=self.means.device)
        scaled = z * self.eigvals[k].sqrt()
        if self._diagonal:
            return self.means[k] + scaled
        out = torch.empty_like(scaled)
        for j in range(self.num_components):  # one product per component, not an [n, D, D] gather
            rows = k == j
            out[rows] = self.means[j] + scaled[rows] @ self.eigvecs[j].T
        return out

    def _components(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """log N(x; mu_k, C_k + sigma^2 I) [N, K], and a map from responsibilities r [N, K] to
        sum_k r_k E[x0 | x, k] [N, D]. ``sigma`` is [N] or [1] (shared by every row)."""
        K, D = self.means.shape
        shared = sigma.numel() == 1 or bool((sigma == sigma[0]).all())
        log_2pi = D * math.log(2 * math.pi)
        if self._diagonal and shared:
            # Samplers' case: sum_d (x_d - mu_kd)^2 / var_kd expanded into [N, D] x [D, K] products,
            # never forming an [N, K, D] tensor (float64 keeps the expansion's cancellation harmless).
            var = self.eigvals + sigma[0] ** 2  # [K, D]
            inv = 1 / var
            maha = (x * x) @ inv.T - 2 * x @ (self.means * inv).T + (self.means**2 * inv).sum(1)
            ratio = self.eigvals * inv  # lam / (lam + sigma^2)

            def mean_diag(resp):
                return resp @ self.means + x * (resp @ ratio) - resp @ (ratio * self.means)

            return -0.5 * (maha + var.log().sum(1) + log_2pi), mean_diag
        # General case in eigen-coordinates z = U_k^T (x - mu_k), [N, K, D].
        if self._diagonal:
            z = x[:, None, :] - self.means
        else:
            z = (torch.cat([x, x.new_ones(x.shape[0], 1)], 1) @ self._proj).reshape(-1, K, D)
        var = self.eigvals + (sigma[:1] if shared else sigma)[:, None, None] ** 2  # [1 or N, K, D]
        if shared:  # sum_d z^2 / var as one product with a [K*D, K] block-diagonal matrix
            maha = (z * z).reshape(z.shape[0], K * D) @ torch.block_diag(*(1 / var[0, :, :, None]))
        else:
            maha = (z * z / var).sum(-1)

        def mean_general(resp):
            shrunk = z * (resp[:, :, None] * (self.eigvals / var))  # r_k lam / (lam + sigma^2) z_k
            back = shrunk.sum(1) if self._diagonal else shrunk.reshape(z.shape[0], -1) @ self._back
            return resp @ self.means + back

        return -0.5 * (maha + var.log().sum(-1) + log_2pi), mean_general

    def log_prob(self, x: Tensor) -> Tensor:
        """log p_0(x) = logsumexp_k (log w_k + log N(x; mu_k, C_k)) for x [N, D]; differentiable."""
        x = torch.as_tensor(x, dtype=torch.float64)
        log_n, _ = self._components(x, x.new_zeros(1))
        return torch.logsumexp(log_n + self.weights.log(), dim=1)

    def denoiser(self, x: Tensor, sigma, **cond) -> Tensor:
        """Exact E[x0 | x0 + sigma n = x] (module docstring); x [B, ...], sigma scalar or [B]."""
        x64 = x.reshape(x.shape[0], -1).to(torch.float64)
        if x64.shape[1] != self.dim:
            raise ValueError(f"x has {x64.shape[1]} features per sample, the mixture has {self.dim}")
        if x64.shape[0] == 0:
            return x.clone()
        log_n, posterior_mean = self._components(x64, batch_sigma(sigma, x64))
        logits = log_n + self.weights.log()
        resp = (logits - logits.amax(1, keepdim=True)).exp()  # softmax over k, faster for small K
        resp = resp / resp.sum(1, keepdim=True)
        return posterior_mean(resp).reshape(x.shape).to(x.dtype)

    __call__ = denoiser


def ring2d(k: int = 8, radius: float = 1.0, std: float = 0.08) -> GaussianMixture:
    """``k`` equal-weight isotropic Gaussians evenly spaced on a circle in 2-D."""
    angle = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    means = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    return GaussianMixture(torch.ones(k), means, stds=std)


def grid2d(n: int = 5, spacing: float = 0.5, std: float = 0.05) -> GaussianMixture:
    """An ``n`` x ``n`` grid of equal-weight isotropic Gaussians in 2-D, centred at the origin."""
    c = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * spacing
    means = torch.cartesian_prod(c, c)
    return GaussianMixture(torch.ones(n * n), means, stds=std)


def random_mixture(dim: int = 64, k: int = 8, seed: int = 0, mean_scale: float = 0.5,
                   std_range: tuple[float, float] = (0.03, 0.3), rotate: bool = True) -> GaussianMixture:
    """A fixed random mixture: means ~ N(0, mean_scale^2 I), principal stds log-uniform in
    ``std_range`` (anisotropic), each component turned by its own random rotation (``rotate``;
    else axis-aligned, which makes the denoiser about D times cheaper), Dirichlet(1) weights.
    Same arguments, same mixture; ``rotate`` changes only the orientations."""
    g = torch.Generator().manual_seed(seed)
    means = mean_scale * torch.randn(k, dim, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(torch.randn(k, dim, dim, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]  # Haar-uniform rotation
    lo, hi = math.log(std_range[0]), math.log(std_range[1])
    stds = torch.exp(lo + (hi - lo) * torch.rand(k, dim, generator=g, dtype=torch.float64))
    weights = -torch.rand(k, generator=g, dtype=torch.float64).log()  # Dirichlet(1, ..., 1)
    if not rotate:
        return GaussianMixture(weights, means, stds=stds)
    covs = q @ torch.diag_embed(stds**2) @ q.transpose(1, 2)
    return GaussianMixture(weights, means, covs=covs)


def sorted_projections(x: Tensor, num_projections: int = 256, seed: int = 0) -> Tensor:
    """theta^T x for fixed-seed random unit directions theta, each row sorted: [P, N] float64."""
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(num_projections, x.shape[1], generator=g, dtype=torch.float64)
    theta = (theta / theta.norm(dim=1, keepdim=True)).to(x.device)
    return torch.sort(theta @ x.T, dim=1).values  # contiguous rows sort faster than columns


def sliced_w2(x: Tensor, y: Tensor | None = None, num_projections: int = 256, seed: int = 0,
              y_sorted: Tensor | None = None) -> float:
    """Sliced Wasserstein-2 distance sqrt(E_theta W2^2(theta^T x, theta^T y)) (Bonneel et al. 2015),
    over fixed-seed random unit directions; each 1-D W2 by sorting (equal sample counts). Pass
    ``y_sorted = sorted_projections(y, num_projections, seed)`` instead of ``y`` to reuse it."""
    px = sorted_projections(x, num_projections, seed)
    if y_sorted is None:
        if y is None:
            raise ValueError("sliced_w2 needs y or y_sorted")
        y_sorted = sorted_projections(y, num_projections, seed)
    if y_sorted.shape != px.shape:
        raise ValueError(f"sliced_w2 needs equal sample counts, got {px.shape[1]} and {y_sorted.shape[1]}")
    return float(((px - y_sorted) ** 2).mean().sqrt())
