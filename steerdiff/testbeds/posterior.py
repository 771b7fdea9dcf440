"""The exact posterior of a Gaussian-mixture prior under a linear measurement with Gaussian noise.

Prior p(x0) = sum_k w_k N(x0; mu_k, S_k) (S_k = diag(s_k^2), the :class:`GaussianMixtureDenoiser`'s components),
measurement y = A x0 + sigma_y n with n ~ N(0, I) on the range of A.  Write A = U diag(d) V^T (SVD, rank r),
A_r = U_r^T A (full row rank) and y_r = U_r^T y: the measurement is y_r = A_r x0 + sigma_y n_r, n_r ~ N(0, I_r),
and the rest of y carries no information.  Each component is conjugate, so the posterior is again a mixture:

    G_k   = A_r S_k A_r^T + sigma_y^2 I                (covariance of y_r under component k)
    K_k   = S_k A_r^T G_k^{-1}                         (Kalman gain)
    m'_k  = mu_k + K_k (y_r - A_r mu_k)
    C'_k  = S_k - K_k A_r S_k
    w'_k  ∝ w_k N(y_r; A_r mu_k, G_k)

sigma_y = 0 is allowed (G_k stays positive definite because S_k is); then C'_k is singular along the measured
directions and samples satisfy A x0 = y exactly.  Everything is float64.

The identity used by the tests to check component weights: for x0 ~ p(x0 | y), the prior responsibility
r_k(x0) = w_k N(x0; mu_k, S_k) / p(x0) has expectation E[r_k(x0) | y] = P(k | y) = w'_k, because y depends on
the component only through x0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..guidance.operators import LinearOperator
from .mixture import GaussianMixtureDenoiser

_LOG_2PI = math.log(2.0 * math.pi)


class GaussianMixturePosterior:
    """A Gaussian mixture with full covariances: ``log_weights`` (K,), ``means`` (K, D), ``covariances`` (K, D, D)."""

    def __init__(self, log_weights, means, covariances, sample_shape, components=None, class_label=None):
        self.log_weights = log_weights.to(torch.float64)
        self.means = means.to(torch.float64)
        self.covariances = covariances.to(torch.float64)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        # which prior components these are (all, or one class's) and the prior label that selects them
        self.components = torch.arange(means.shape[0]) if components is None else components
        self.class_label = class_label

    @classmethod
    def from_problem(
        cls,
        prior: GaussianMixtureDenoiser,
        operator: LinearOperator,
        measurement: torch.Tensor,
        sigma_y: float = 0.0,
        class_label: int | None = None,
    ) -> "GaussianMixturePosterior":
        """p(x0 | y) for one measurement y (shape ``operator.output_shape`` or with a leading batch of 1).

        ``class_label`` restricts the prior to that class's components (None or the null label: the whole mixture).
        """
        if not float(sigma_y) >= 0:
            raise ValueError(f"sigma_y must be >= 0, got {sigma_y}")
        shape = tuple(prior.sample_shape)
        y = torch.as_tensor(measurement, dtype=torch.float64).reshape(-1)
        a = operator.matrix(shape).to(torch.float64)
        if a.shape[0] != y.numel():
            raise ValueError(f"measurement has {y.numel()} entries, the operator produces {a.shape[0]}")
        u, d, _ = torch.linalg.svd(a, full_matrices=False)
        rank = int((d > d.max() * a.shape[1] * torch.finfo(torch.float64).eps).sum())
        a_r, y_r = u[:, :rank].T @ a, u[:, :rank].T @ y

        mu = prior.means.to(torch.float64).cpu()
        s2 = prior.variances.to(torch.float64).cpu()
        log_w = prior.log_weights.to(torch.float64).cpu()
        components = torch.arange(mu.shape[0])
        if class_label is not None and int(class_label) != prior.null_class:
            keep = prior.component_classes.cpu() == int(class_label)
            if not bool(keep.any()):
                raise ValueError(f"class_label {class_label} owns no component of the prior")
            mu, s2, log_w, components = mu[keep], s2[keep], log_w[keep], components[keep]

        sa = s2.unsqueeze(2) * a_r.T.unsqueeze(0)  # S_k A_r^T, (K, D, r)
        g = a_r.unsqueeze(0) @ sa + float(sigma_y) ** 2 * torch.eye(rank, dtype=torch.float64)  # (K, r, r)
        chol = torch.linalg.cholesky(g)
        innov = y_r.unsqueeze(0) - mu @ a_r.T  # (K, r)
        white = torch.linalg.solve_triangular(chol, innov.unsqueeze(2), upper=False).squeeze(2)
        log_lik = -0.5 * (white.square().sum(1) + 2 * torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1) + rank * _LOG_2PI)
        gain = torch.cholesky_solve(sa.transpose(1, 2), chol).transpose(1, 2)  # S_k A_r^T G_k^{-1}, (K, D, r)
        means = mu + (gain @ innov.unsqueeze(2)).squeeze(2)
        covs = torch.diag_embed(s2) - gain @ sa.transpose(1, 2)
        covs = 0.5 * (covs + covs.transpose(1, 2))
        post_log_w = log_w + log_lik
        return cls(post_log_w - torch.logsumexp(post_log_w, 0), means, covs, shape, components, class_label)

    @property
    def weights(self) -> torch.Tensor:
        return torch.exp(self.log_weights)

    def mean(self) -> torch.Tensor:
        """E[x0 | y], flattened (D,)."""
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        """Cov[x0 | y] (D, D) by the law of total covariance."""
        w, m = self.weights, self.means
        centred = m - self.mean()
        return torch.einsum("k,kij->ij", w, self.covariances) + centred.T @ (w.unsqueeze(1) * centred)

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Exact samples, shape (N, *sample_shape), float64."""
        k = torch.multinomial(self.weights, num_samples, replacement=True, generator=generator)
        evals, evecs = torch.linalg.eigh(self.covariances)
        roots = evecs * evals.clamp_min(0).sqrt().unsqueeze(1)  # C = roots roots^T
        z = torch.randn(num_samples, self.means.shape[1], generator=generator, dtype=torch.float64)
        x = self.means[k] + (roots[k] @ z.unsqueeze(2)).squeeze(2)
        return x.reshape(num_samples, *self.sample_shape)


@dataclass
class PosteriorComparison:
    """How N samples x_n of a sampler compare with the exact posterior (all float64 scalars or (K,) tensors).

    ``mean_sq_error`` ||mean_n x_n - m||^2; ``mc_sq_error`` tr(C_hat) / N with C_hat the samples' covariance:
    the expected ``mean_sq_error`` of a sampler without bias and with that spread (so
    ``mean_sq_error - mc_sq_error`` is unbiased for ||bias||^2); ``mean_sq_error_se`` its Monte Carlo standard
    error: with mean_hat - m = b + e, e ~ N(0, C_hat / N) (central limit), Var ||b + e||^2 =
    4 b^T C_hat b / N + 2 tr(C_hat^2) / N^2, evaluated at b = mean_hat - m (which over-estimates it slightly);
    ``spread`` tr C of the posterior;
    ``weights`` mean_n r_k(x_n) (prior responsibilities) against ``true_weights`` w'_k; ``weight_tv`` their total
    variation distance; ``weight_mc`` 1/2 sum_k sqrt(w'_k (1 - w'_k) / N), the standard-error scale of it
    (each r_k lies in [0, 1] with mean w'_k, so its variance is at most w'_k (1 - w'_k)).
    """

    mean_sq_error: float
    mc_sq_error: float
    mean_sq_error_se: float
    spread: float
    weights: torch.Tensor
    true_weights: torch.Tensor
    weight_tv: float
    weight_mc: float
    num_samples: int


def compare_to_posterior(samples: torch.Tensor, posterior: GaussianMixturePosterior, prior: GaussianMixtureDenoiser):
    """A :class:`PosteriorComparison` of ``samples`` (N, *sample_shape) with ``posterior`` (a posterior of ``prior``)."""
    x = samples.to(torch.float64).reshape(samples.shape[0], -1)
    n = x.shape[0]
    if n < 2:
        raise ValueError("compare_to_posterior needs at least 2 samples")
    labels = None if posterior.class_label is None else torch.full((n,), int(posterior.class_label))
    resp = prior.responsibilities(samples.to(prior.means.dtype), class_labels=labels).to(torch.float64)
    weights = resp[:, posterior.components].mean(0)
    w = posterior.weights
    bias = x.mean(0) - posterior.mean()
    cov = torch.cov(x.T).reshape(x.shape[1], x.shape[1])
    return PosteriorComparison(
        mean_sq_error=float(bias.square().sum()),
        mc_sq_error=float(cov.trace()) / n,
        mean_sq_error_se=math.sqrt(4 * float(bias @ cov @ bias) / n + 2 * float((cov * cov).sum()) / n**2),
        spread=float(posterior.covariance().trace()),
        weights=weights,
        true_weights=w,
        weight_tv=0.5 * float((weights - w).abs().sum()),
        weight_mc=0.5 * float((w * (1 - w) / n).sqrt().sum()),
        num_samples=n,
    )


__all__ = ["GaussianMixturePosterior", "PosteriorComparison", "compare_to_posterior"]
