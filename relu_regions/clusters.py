"""Explaining cluster assignments: neuralized k-means and NEON (neuralization-propagation).

Following Kauffmann et al., "From Clustering to Cluster Explanations via Neural Networks": a k-means model is
rewritten *exactly* as a small network whose output ``f_c(x)`` is positive iff ``x`` is assigned to cluster ``c``,

    h_ck(x) = ‖x − μ_k‖² − ‖x − μ_c‖² = w_ckᵀx + b_ck,   w_ck = 2(μ_c − μ_k),  b_ck = ‖μ_k‖² − ‖μ_c‖²
    f_c(x)  = min_{k≠c} h_ck(x)                    (hard; or the soft-min with stiffness β)

and explained by NEON: min-take-most pooling ``R_k = softmin_β(h)_k · f_c`` over competitors, then the midpoint
rule ``R_i = Σ_k (x_i − m_ki) w_cki / h_ck · R_k`` with ``m_k = (μ_c + μ_k)/2``. Because ``(x − m_k)ᵀw_ck = h_ck``
exactly, ``Σ_i R_i = f_c`` (conservation) holds as an algebraic identity, not by construction of a remainder.

Also here:

- :class:`KernelKMeans` (Gaussian kernel) and :class:`NeuralizedKernelKMeans`: the kernel model's log-density
  ratio written as linear layer → soft-min pooling over the competitor's support vectors → soft-max pooling over
  the cluster's own support vectors (log-mean-exp with weights ``1/|C|``) → min over competitors. Exact.
- :class:`DeepKMeans`: k-means on a ReLU network's hidden representation; the cluster score is affine in the
  input inside the input's activation region (the engine's :func:`~relu_regions.affine_map`), and NEON relevance
  is propagated to the input through that exact map.
- :func:`insertion_curve`: the paper's evaluation (insert the most relevant features first, fill the rest from
  the data, track cluster membership) with the baselines random, (x − x̃)², (∇f)² and integrated gradients.
- :func:`group_regions`: a parsimonious partition of a data set's activation regions into a user-chosen number of
  groups (k-means on per-region mean representations), with NEON explanations of each group's membership.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .errors import check_finite, is_int_at_least, is_integer_tensor

Tensor = torch.Tensor

__all__ = [
    "DeepKMeans",
    "InsertionResult",
    "KernelKMeans",
    "NeonResult",
    "NeuralizedKMeans",
    "NeuralizedKernelKMeans",
    "RegionGroups",
    "baseline_relevance",
    "default_beta",
    "group_regions",
    "insertion_curve",
    "neon",
    "neuralize_kmeans",
]


def _tensor(x: Any, dtype: torch.dtype | None = None, device: torch.device | None = None) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    if not t.is_floating_point():
        t = t.to(torch.float64)
    return t.to(dtype=dtype or t.dtype, device=device)


def _check_2d(x: Tensor, n_features: int, name: str = "x") -> None:
    if x.dim() != 2 or x.shape[1] != n_features:
        raise ValueError(f"{name} must have shape (N, {n_features}); got {tuple(x.shape)}")
    check_finite(x, name)


def _positive_finite(v: Any) -> bool:
    """Whether ``v`` is a real number (not a bool) in (0, inf)."""
    return not isinstance(v, bool) and isinstance(v, (numbers.Real, np.floating)) and 0 < float(v) < math.inf


def _beta(beta: Any) -> float:
    """A stiffness given by the user: a positive finite number (``β → 0`` and ``β → ∞`` are limits the soft-min's
    formula does not reach: NaN)."""
    if not _positive_finite(beta):
        raise ValueError(f"beta must be a positive finite number (None: 1 / E[f_c] over x), got {beta!r}")
    return float(beta)


def _softmin_pool(h: Tensor, beta: float | None, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Min over the last axis (hard when beta is None, else −β⁻¹ log Σ exp(−βh)) and the pooling weights.

    ``mask`` (broadcastable, bool) marks the entries that take part. Weights are the soft-min distribution
    ``softmax(−βh)``; for the hard min (β = None) they are one-hot on the argmin (min-take-all).
    """
    if mask is not None:
        h = h.masked_fill(~mask, float("inf"))
    if beta is None:
        val, idx = h.min(-1)
        w = torch.zeros_like(h).scatter_(-1, idx.unsqueeze(-1), 1.0)
        return val, w
    val = -torch.logsumexp(-beta * h, -1) / beta
    return val, torch.softmax(-beta * h, -1)


# --- k-means ---------------------------------------------------------------------------------------------------


@dataclass
class NeonResult:
    """A NEON explanation of cluster membership.

    Attributes
    ----------
    relevance : Tensor
        ``(N, *input_shape)``; ``relevance.sum() == score`` per sample up to rounding (conservation).
    score : Tensor
        ``(N,)`` the explained cluster score ``f_c(x)`` (positive iff x belongs to c for the hard score).
    cluster : Tensor
        ``(N,)`` the explained cluster ``c``.
    competitor_relevance : Tensor
        ``(N, K)`` the share ``R_k`` of each competitor cluster (0 at ``k == c``); sums to ``score``.
    hidden_relevance : Tensor or None
        For :class:`DeepKMeans`: ``(N, F)`` NEON relevance of the hidden features.
    """

    relevance: Tensor
    score: Tensor
    cluster: Tensor
    competitor_relevance: Tensor
    hidden_relevance: Tensor | None = None

    def conservation_error(self) -> Tensor:
        """``(N,)`` |Σ_i R_i − f_c|."""
        return (self.relevance.reshape(len(self.score), -1).sum(1) - self.score).abs()


@dataclass
class NeuralizedKMeans:
    """A k-means model rewritten as a network: a linear layer ``h_ck = w_ckᵀx + b_ck`` and min-pooling.

    Parameters
    ----------
    centroids : Tensor
        ``(K, D)`` cluster centres (``KMeans.cluster_centers_``). Computations run in the input's dtype/device.
    """

    centroids: Tensor

    def __post_init__(self):
        self.centroids = _tensor(self.centroids)
        if self.centroids.dim() != 2 or self.centroids.shape[0] < 2:
            raise ValueError(f"centroids must have shape (K >= 2, D); got {tuple(self.centroids.shape)}")

    @property
    def n_clusters(self) -> int:
        return self.centroids.shape[0]

    @property
    def n_features(self) -> int:
        return self.centroids.shape[1]

    def weights(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """``W`` ``(K, K, D)`` with ``W[c, k] = 2(μ_c − μ_k)`` and ``b`` ``(K, K)`` with ``‖μ_k‖² − ‖μ_c‖²``."""
        mu = self.centroids.to(dtype=dtype or self.centroids.dtype, device=device)
        sq = (mu * mu).sum(1)
        return 2 * (mu[:, None, :] - mu[None, :, :]), sq[None, :] - sq[:, None]

    def competitors(self, x: Tensor) -> Tensor:
        """``(N, K, K)`` the linear layer: ``h[n, c, k] = w_ckᵀx_n + b_ck`` (``h[n, c, c] = 0``)."""
        x = _tensor(x)
        _check_2d(x, self.n_features)
        w, b = self.weights(x.dtype, x.device)
        return torch.einsum("ckd,nd->nck", w, x) + b

    def logits(self, x: Tensor, beta: float | None = None) -> Tensor:
        """``(N, K)`` cluster scores ``f_c(x) = min_{k≠c} h_ck(x)`` (hard) or the soft-min with stiffness β."""
        h = self.competitors(x)
        eye = torch.eye(self.n_clusters, dtype=torch.bool, device=h.device)
        return _softmin_pool(h, None if beta is None else _beta(beta), ~eye)[0]

    def predict(self, x: Tensor) -> Tensor:
        """``(N,)`` the cluster with positive hard score (= nearest centroid)."""
        return self.logits(x).argmax(1)

    def module(self) -> nn.Module:
        """The hard neuralized model as a piecewise-linear ``nn.Module`` (Linear, then min = −maxpool(−·)).

        Its output is ``(N, K)`` cluster scores; the engine (:func:`~relu_regions.affine_map`) can explain it.
        """
        return _KMeansNet(self.centroids)


class _KMeansNet(nn.Module):
    def __init__(self, centroids: Tensor):
        super().__init__()
        k, d = centroids.shape
        w, b = NeuralizedKMeans(centroids).weights()
        keep = ~torch.eye(k, dtype=torch.bool)
        self.k = k
        # skip_init: nn.Linear's random initialisation would draw from (and so change) the caller's global torch RNG,
        # only to be overwritten below
        self.linear = nn.utils.skip_init(nn.Linear, d, k * (k - 1), dtype=centroids.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(w[keep])  # (K(K-1), D), rows ordered by c then k
            self.linear.bias.copy_(b[keep])
        self.pool = nn.MaxPool1d(k - 1)

    def forward(self, x):
        h = self.linear(x).reshape(x.shape[0], self.k, self.k - 1)
        return -self.pool(-h).squeeze(-1)  # min over competitors, as a max-pool the engine records


def neuralize_kmeans(kmeans: Any) -> NeuralizedKMeans:
    """Build the neuralized model from a fitted ``sklearn.cluster.KMeans`` (or a ``(K, D)`` centroid array).

    Raises
    ------
    ValueError
        If ``kmeans`` is not fitted or has fewer than two clusters.
    """
    if isinstance(kmeans, KernelKMeans):
        raise TypeError("neuralize_kmeans takes a (linear) k-means; for a KernelKMeans use "
                        "NeuralizedKernelKMeans.from_model(kmeans)")
    if hasattr(kmeans, "cluster_centers_"):
        return NeuralizedKMeans(torch.as_tensor(np.asarray(kmeans.cluster_centers_, dtype=np.float64)))
    if hasattr(kmeans, "fit") and not hasattr(kmeans, "cluster_centers_"):
        raise ValueError("kmeans is not fitted: call kmeans.fit(X) first (no attribute cluster_centers_)")
    return NeuralizedKMeans(_tensor(kmeans))


def default_beta(model: NeuralizedKMeans | NeuralizedKernelKMeans, x: Tensor) -> float:
    """The default stiffness ``β = 1 / E[f_c(x)]`` over the data, ``c`` the assigned cluster (hard scores)."""
    f = model.logits(_tensor(x))
    mean = f.amax(1).mean().item()
    if not mean > 0:
        raise ValueError("E[f_c] is not positive on this data; pass beta explicitly")
    return 1.0 / mean


def _cluster_ids(c: Any, n: int, device: torch.device | None = None) -> Tensor:
    """``(n,)`` int64 clusters from an int (every sample) or one integer index per sample."""
    t = torch.as_tensor(c, device=device).reshape(-1)
    if not is_integer_tensor(t):  # .long() would read 1.7 as cluster 1, a bool mask as clusters 0 / 1
        raise TypeError(f"cluster must be an int or integer cluster indices (one per sample), not {t.dtype}")
    t = t.long()
    if t.numel() == 1:
        t = t.expand(n).clone()
    if t.numel() != n:
        raise ValueError(f"cluster must be an int or one cluster index per sample ({n}); got {t.numel()}")
    return t


def _cluster_arg(c: Any, f: Tensor) -> Tensor:
    if c is None:
        return f.argmax(1)
    t = _cluster_ids(c, f.shape[0], f.device)
    if (t < 0).any() or (t >= f.shape[1]).any():
        raise ValueError(f"cluster must be an int or one index per sample in [0, {f.shape[1]}); got {c!r}")
    return t


def _safe_div(a: Tensor, b: Tensor) -> Tensor:
    # Exactly-zero denominators only occur on exact ties (x on a cluster boundary); their share is dropped.
    return torch.where(b != 0, a / torch.where(b != 0, b, torch.ones_like(b)), torch.zeros_like(a))


def _warn_ties(tied: Tensor, where: str, what: str = "relevance") -> None:
    """Warn about the samples (``tied``, ``(N,)`` bool) whose competitor share met an exact tie (``h = 0``)."""
    if bool(tied.any()):
        warnings.warn(
            f"{where}: {int(tied.sum())} of {len(tied)} samples lie exactly on the bisector of the explained cluster "
            "and a competitor (an exact tie, h = 0, while that competitor's share R_k is not 0): the midpoint rule "
            f"has no root there, so that share stays unassigned and {what} no longer sums to the score (see "
            "NeonResult.conservation_error())", UserWarning, stacklevel=3)


def neon(model: NeuralizedKMeans | NeuralizedKernelKMeans | DeepKMeans, x: Tensor, cluster: Any = None,
         beta: float | None = None) -> NeonResult:
    """NEON relevance of each input feature for membership in ``cluster``.

    Parameters
    ----------
    model : NeuralizedKMeans, NeuralizedKernelKMeans or DeepKMeans
        A neuralized model (:func:`neuralize_kmeans`, :meth:`NeuralizedKernelKMeans.from_model`); a
        :class:`DeepKMeans` is explained by its own :meth:`DeepKMeans.neon` (zero reference).
    x : Tensor
        ``(N, D)`` samples.
    cluster : int, sequence or None
        Cluster to explain per sample; default the assigned one.
    beta : float, optional
        Stiffness of the min-take-most pooling over competitors; default ``1 / E[f_c]`` over ``x``.

    Returns
    -------
    NeonResult
        The explained score is the hard ``f_c(x)`` (its sign is membership); ``Σ_i R_i = f_c``, except for a
        sample lying exactly on the bisector of ``c`` and a competitor ``k`` (``h_ck = 0``; for a cluster it is
        not assigned to): the midpoint rule has no root there, ``R_k`` stays unassigned and a ``UserWarning``
        says so (as :meth:`DeepKMeans.neon` does where a competitor does not depend on the input).
    """
    if isinstance(model, NeuralizedKernelKMeans):
        return model.neon(x, cluster, beta)
    if isinstance(model, DeepKMeans):
        return model.neon(x, cluster, beta)
    if not isinstance(model, NeuralizedKMeans):
        if isinstance(model, KernelKMeans):
            hint = "NeuralizedKernelKMeans.from_model(model)"
        elif hasattr(model, "cluster_centers_"):
            hint = "neuralize_kmeans(model)"
        else:
            hint = "neuralize_kmeans(fitted_kmeans) or NeuralizedKernelKMeans.from_model(kernel_kmeans)"
        raise TypeError(f"neon explains a NeuralizedKMeans, NeuralizedKernelKMeans or DeepKMeans, got "
                        f"{type(model).__name__}: pass {hint}")
    res, tied = _linear_neon(model, x, cluster, beta)
    _warn_ties(tied, "neon")
    return res


def _linear_neon(model: NeuralizedKMeans, x: Any, cluster: Any, beta: float | None) -> tuple[NeonResult, Tensor]:
    """NEON for a neuralized k-means, and the ``(N,)`` samples whose share of a competitor met an exact tie."""
    x = _tensor(x)
    _check_2d(x, model.n_features)
    beta = default_beta(model, x) if beta is None else _beta(beta)
    h = model.competitors(x)  # (N, K, K)
    n, k = x.shape[0], model.n_clusters
    c = _cluster_arg(cluster, model.logits(x))
    hc = h[torch.arange(n), c]  # (N, K)
    mask = torch.ones(n, k, dtype=torch.bool, device=x.device)
    mask[torch.arange(n), c] = False
    f, _ = _softmin_pool(hc, None, mask)
    _, p = _softmin_pool(hc, beta, mask)
    rk = p * f[:, None]  # min-take-most: (N, K), zero at c
    coef = _safe_div(rk, hc)  # R_k / h_k
    tied = ((hc == 0) & mask & (rk != 0)).any(1)  # _safe_div dropped their R_k
    mu = model.centroids.to(x.dtype).to(x.device)
    # midpoint rule: Σ_k coef_k (x − (μ_c+μ_k)/2) ⊙ 2(μ_c − μ_k) = Σ_k coef_k (2x⊙(μ_c−μ_k) − μ_c² + μ_k²)
    mc = mu[c]  # (N, D)
    s = coef.sum(1, keepdim=True)
    rel = s * (2 * x * mc - mc * mc) + coef @ (mu * mu) - 2 * x * (coef @ mu)
    return NeonResult(rel, f, c, rk), tied


# --- kernel k-means --------------------------------------------------------------------------------------------


def _row_chunks(n: int, per_row: int, budget: int = 1 << 22) -> list[slice]:
    """Row slices whose ``(rows, per_row)`` temporaries stay below ``budget`` elements (one slice when all fit)."""
    step = max(1, budget // max(1, per_row))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _sqdist(x: Tensor, u: Tensor, budget: int = 1 << 22) -> Tensor:
    """``(N, M)`` squared distances, each summed from its own differences (no ``‖x‖² + ‖u‖² − 2x·u`` cancellation),
    in row chunks whose ``(rows, M, D)`` differences stay below ``budget`` elements: all at once, 1,000 rows against
    1,000 supports of 256 features took 2 GB, a fit on N MNIST rows O(N²·784)."""
    out = torch.empty(x.shape[0], u.shape[0], dtype=torch.promote_types(x.dtype, u.dtype), device=x.device)
    for r in _row_chunks(x.shape[0], u.shape[0] * x.shape[1], budget):
        out[r] = ((x[r, None, :] - u[None, :, :]) ** 2).sum(-1)
    return out


class KernelKMeans:
    """Kernel k-means with a Gaussian kernel ``k(x, u) = exp(−γ‖x − u‖²)``, scikit-learn style.

    A sample belongs to the cluster with the largest mean kernel similarity to its members (support vectors),
    ``c = argmax_k (1/|C_k|) Σ_{u∈C_k} k(x, u)``. This is the kernel k-means assignment with the cluster's
    self-similarity term ``(1/|C_k|²) Σ k(u, u')`` dropped, which is the form that neuralizes exactly (as in
    Kauffmann et al.); fitting iterates this rule to a fixed point from a k-means initialisation.

    Parameters
    ----------
    n_clusters : int
    gamma : float, optional
        Kernel width, a positive finite number; default ``1 / median(‖x − x'‖²)`` over the pairs of training
        rows, over the pairs of distinct rows where duplicates make that median 0 (Boolean or categorical data).
    max_iter : int
        Most iterations of the assignment rule. When they run out before a fixed point, a
        ``sklearn.exceptions.ConvergenceWarning`` (a ``UserWarning``) says so.
    max_support : int, optional
        Keep at most this many (>= 1) support vectors per cluster (a random subset, fixed by ``random_state``);
        the model is then defined by these supports.
    random_state : int

    Attributes
    ----------
    support_ : list of Tensor
        ``(|C_k|, D)`` support vectors of each cluster: the members of the last iteration's clusters.
    labels_ : Tensor
        ``(N,)`` the fitted model's own predictions on the training data. At a fixed point (without
        ``max_support``) they are the clusters ``support_`` was taken from; when ``max_iter`` runs out first (the
        warning) or supports are subsampled, they can differ from them.
    gamma_ : float
        The kernel width used.
    """

    def __init__(self, n_clusters: int, gamma: float | None = None, max_iter: int = 100,
                 max_support: int | None = None, random_state: int = 0):
        if not is_int_at_least(n_clusters, 2):
            raise ValueError(f"n_clusters must be an int >= 2, got {n_clusters!r}")
        if not is_int_at_least(max_iter, 1):
            raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
        if max_support is not None and not is_int_at_least(max_support, 1):
            # (0 left every cluster empty: NaN similarities; -1 dropped one support vector per cluster)
            raise ValueError(f"max_support must be None or a positive int, got {max_support!r}")
        if gamma is not None and not _positive_finite(gamma):
            # (a negative gamma is the kernel exp(+|γ| d²), which no longer decays with distance)
            raise ValueError(f"gamma must be None (the median heuristic) or a positive finite number, got {gamma!r}")
        self.n_clusters = n_clusters
        self.gamma = gamma
        self.max_iter = max_iter
        self.max_support = max_support
        self.random_state = random_state

    def fit(self, X: Any) -> KernelKMeans:
        """Fit on ``X`` ``(N, D)`` (finite values); returns ``self``."""
        from sklearn.cluster import KMeans
        from sklearn.exceptions import ConvergenceWarning

        x = _tensor(X, torch.float64).cpu()
        if x.dim() != 2:
            raise ValueError(f"X must have shape (N, D); got {tuple(x.shape)}")
        check_finite(x, "X")
        if self.gamma is None:
            d = torch.pdist(x) ** 2
            med = float(d.median()) if len(d) else 0.0
            if not med > 0:  # more than half of the pairs are duplicate rows: the median of the distinct ones
                d = d[d > 0]
                if len(d) == 0:
                    raise ValueError("X has no two distinct rows: there is nothing to cluster (and no distance "
                                     "for the median heuristic of gamma)")
                med = float(d.median())
            self.gamma_ = 1.0 / med
        else:
            self.gamma_ = float(self.gamma)
        labels = torch.as_tensor(KMeans(self.n_clusters, n_init=10, random_state=self.random_state).fit_predict(
            x.numpy()))
        for _ in range(self.max_iter):
            self.support_ = [x[labels == k] for k in range(self.n_clusters)]
            if any(len(s) == 0 for s in self.support_):
                raise RuntimeError("a kernel k-means cluster became empty; try another gamma or n_clusters")
            new = self.predict(x)
            if torch.equal(new, labels):
                break
            moved, labels = int((new != labels).sum()), new
        else:
            warnings.warn(f"KernelKMeans.fit reached max_iter={self.max_iter} before a fixed point: {moved} sample(s) "
                          "changed cluster in the last iteration, so labels_ (the model's predictions) differ from "
                          "the clusters the supports were taken from; raise max_iter", ConvergenceWarning,
                          stacklevel=2)
        gen = torch.Generator().manual_seed(self.random_state)
        if self.max_support is not None:
            self.support_ = [s[torch.randperm(len(s), generator=gen)[: self.max_support]] for s in self.support_]
        self.labels_ = self.predict(x)
        return self

    def log_similarity(self, X: Any) -> Tensor:
        """``(N, K)`` ``γ⁻¹ log((1/|C_k|) Σ_u exp(−γ‖x − u‖²))`` computed directly from distances."""
        if not hasattr(self, "support_"):
            raise RuntimeError("KernelKMeans is not fitted: call fit(X) first")
        x = _tensor(X, torch.float64)
        _check_2d(x, self.support_[0].shape[1], "X")  # (a NaN row was assigned cluster 0 silently)
        g = self.gamma_
        cols = [(torch.logsumexp(-g * _sqdist(x, s), 1) - np.log(len(s))) / g for s in self.support_]
        return torch.stack(cols, 1)

    def predict(self, X: Any) -> Tensor:
        """``(N,)`` the cluster of largest mean kernel similarity for each row of ``X`` ``(N, D)``."""
        return self.log_similarity(X).argmax(1)

    def fit_predict(self, X: Any) -> Tensor:
        return self.fit(X).labels_


@dataclass
class NeuralizedKernelKMeans:
    """Kernel k-means as a network of a linear layer and log-mean-exp pooling layers (exact).

    For clusters c, k with support vectors ``u_i ∈ C_c``, ``u_j ∈ C_k``:

        h_ij(x)  = ‖x − u_j‖² − ‖x − u_i‖² = 2(u_i − u_j)ᵀx + ‖u_j‖² − ‖u_i‖²        (linear)
        g_ik(x)  = −γ⁻¹ log (1/|C_k|) Σ_j exp(−γ h_ij)                            (soft-min pooling over j)
        f_ck(x)  =  γ⁻¹ log (1/|C_c|) Σ_i exp( γ g_ik)                            (soft-max pooling over i)
        f_c(x)   = min_{k≠c} f_ck(x)

    and ``f_ck = γ⁻¹(log s_c − log s_k)`` with ``s`` the mean kernel similarity, so ``f_c > 0`` iff the kernel
    model assigns ``c``.
    """

    support: list[Tensor]
    gamma: float

    @classmethod
    def from_model(cls, model: KernelKMeans) -> NeuralizedKernelKMeans:
        if not hasattr(model, "support_"):
            raise ValueError("the kernel k-means model is not fitted: call fit(X) first")
        return cls([s.clone() for s in model.support_], model.gamma_)

    @property
    def n_clusters(self) -> int:
        return len(self.support)

    @property
    def n_features(self) -> int:
        return self.support[0].shape[1]

    def _affine(self, x: Tensor) -> list[Tensor]:
        # a_i = 2u_iᵀx − ‖u_i‖², so h_ij = a_i − a_j (the linear layer, factorised to keep memory at N·|C|)
        out = []
        for s in self.support:
            s = s.to(x.dtype).to(x.device)
            out.append(2 * x @ s.T - (s * s).sum(1))
        return out

    def pairwise(self, x: Tensor) -> Tensor:
        """``(N, K, K)`` the pooled scores ``f_ck`` (diagonal set to 0)."""
        x = _tensor(x)
        _check_2d(x, self.n_features)
        a = self._affine(x)
        g = self.gamma
        n, k = x.shape[0], self.n_clusters
        f = torch.zeros(n, k, k, dtype=x.dtype, device=x.device)
        for c in range(k):
            for j in range(k):
                if j == c:
                    continue
                for r in _row_chunks(n, a[c].shape[1] * a[j].shape[1]):
                    h = a[c][r, :, None] - a[j][r, None, :]  # (rows, |C_c|, |C_j|)
                    gi = -(torch.logsumexp(-g * h, 2) - np.log(h.shape[2])) / g
                    f[r, c, j] = (torch.logsumexp(g * gi, 1) - np.log(h.shape[1])) / g
        return f

    def logits(self, x: Tensor, beta: float | None = None) -> Tensor:
        """``(N, K)`` hard (or soft-min, β) cluster scores."""
        f = self.pairwise(x)
        eye = torch.eye(self.n_clusters, dtype=torch.bool, device=f.device)
        return _softmin_pool(f, None if beta is None else _beta(beta), ~eye)[0]

    def predict(self, x: Tensor) -> Tensor:
        return self.logits(x).argmax(1)

    def neon(self, x: Tensor, cluster: Any = None, beta: float | None = None) -> NeonResult:
        """NEON: min-take-most over competitors, max-take-most over own supports (γ), min-take-most over the
        competitor's supports (γ), then the midpoint rule ``m_ij = (u_i + u_j)/2``. Exactly conservative, except
        for a sample equidistant to a support vector of ``c`` and one of a competitor (``h_ij = 0``): their share
        stays unassigned and a ``UserWarning`` says so."""
        x = _tensor(x)
        _check_2d(x, self.n_features)
        beta = default_beta(self, x) if beta is None else _beta(beta)
        fck = self.pairwise(x)
        n, k = x.shape[0], self.n_clusters
        c = _cluster_arg(cluster, self.logits(x))
        fc_row = fck[torch.arange(n), c]
        mask = torch.ones(n, k, dtype=torch.bool, device=x.device)
        mask[torch.arange(n), c] = False
        f, _ = _softmin_pool(fc_row, None, mask)
        _, p = _softmin_pool(fc_row, beta, mask)
        rk = p * f[:, None]
        a = self._affine(x)
        sup = [s.to(x.dtype).to(x.device) for s in self.support]
        rel = torch.zeros_like(x)
        tied = torch.zeros(n, dtype=torch.bool, device=x.device)
        for cc in range(k):
            members = (c == cc).nonzero().flatten()
            for j in range(k):
                if j == cc:
                    continue
                for r in _row_chunks(len(members), a[cc].shape[1] * a[j].shape[1]):
                    self._neon_part(x, members[r], cc, j, a, sup, rk, rel, tied)
        _warn_ties(tied, "NeuralizedKernelKMeans.neon")
        return NeonResult(rel, f, c, rk)

    def _neon_part(self, x: Tensor, rows: Tensor, cc: int, j: int, a: list[Tensor], sup: list[Tensor], rk: Tensor,
                   rel: Tensor, tied: Tensor) -> None:
        """Add the relevance of competitor ``j`` for samples ``rows`` of cluster ``cc`` into ``rel`` / ``tied``."""
        g = self.gamma
        xr = x[rows]
        h = a[cc][rows][:, :, None] - a[j][rows][:, None, :]  # (n, I, J)
        gi = -(torch.logsumexp(-g * h, 2) - np.log(h.shape[2])) / g
        pi = torch.softmax(g * gi, 1)  # max-take-most over own supports i
        pj = torch.softmax(-g * h, 2)  # min-take-most over competitor supports j
        rij = rk[rows, j][:, None, None] * pi[:, :, None] * pj
        coef = _safe_div(rij, h)
        tied[rows] |= ((h == 0) & (rij != 0)).flatten(1).any(1)  # shares _safe_div dropped
        ri, qj = coef.sum(2), coef.sum(1)  # (n, I), (n, J)
        ui, uj = sup[cc], sup[j]
        # Σ_ij coef_ij (x − (u_i+u_j)/2) ⊙ 2(u_i − u_j)
        rel[rows] += 2 * xr * (ri @ ui - qj @ uj) - ri @ (ui * ui) + qj @ (uj * uj)


# --- deep k-means ----------------------------------------------------------------------------------------------


class DeepKMeans:
    """k-means on a piecewise-linear network's representation ``z = g(x)``, explained in the input.

    Inside the activation region of ``x`` the network is affine, ``g(x') = J x' + e`` (exact, from
    :func:`~relu_regions.affine_map`), so each competitor ``h_ck(g(x'))`` is affine in ``x'`` with gradient
    ``v_k = Jᵀ w_ck``. NEON's min-take-most pooling gives ``R_k``; each ``R_k`` is then distributed over input
    features with the frozen-region rule ``R_i = Σ_k (x_i − r_i) v_ki / (h_k(x) − h̄_k(r)) · R_k``, where ``r``
    is a reference input and ``h̄_k(r)`` the region's affine competitor evaluated at ``r`` — i.e. the midpoint
    rule with the root point taken on the segment from ``x`` to ``r`` where the region's affine competitor
    vanishes. It is exactly conservative. Where the denominator vanishes, the share falls back to the
    projection root (``R_i ∝ v_ki²``), also conservative -- unless ``v_k = 0``: in a region where the competitor
    does not depend on the input (every hidden unit off, say) no input feature moves it, its ``R_k`` stays
    unassigned, :meth:`NeonResult.conservation_error` shows it, and :meth:`neon` warns.

    Parameters
    ----------
    feature_model : nn.Module
        Piecewise-linear map from inputs to the clustered representation ``(N, F)``.
    kmeans : NeuralizedKMeans or fitted sklearn KMeans
        Clusters in the representation.
    """

    def __init__(self, feature_model: nn.Module, kmeans: Any):
        self.feature_model = feature_model
        self.kmeans = kmeans if isinstance(kmeans, NeuralizedKMeans) else neuralize_kmeans(kmeans)

    @classmethod
    def fit(cls, feature_model: nn.Module, x: Tensor, n_clusters: int, random_state: int = 0) -> DeepKMeans:
        """Fit scikit-learn k-means on ``feature_model(x)`` and wrap it."""
        from sklearn.cluster import KMeans

        z = cls._features(feature_model, x)
        km = KMeans(n_clusters, n_init=10, random_state=random_state).fit(z.double().numpy())
        return cls(feature_model, km)

    @staticmethod
    def _features(model: nn.Module, x: Tensor) -> Tensor:
        from .state import preserved

        with preserved(model, eval_mode=True), torch.no_grad():
            z = model(x)
        return z.reshape(z.shape[0], -1).detach().cpu()

    def features(self, x: Tensor) -> Tensor:
        return self._features(self.feature_model, x)

    def logits(self, x: Tensor, beta: float | None = None) -> Tensor:
        return self.kmeans.logits(self.features(x).double(), beta)

    def predict(self, x: Tensor) -> Tensor:
        return self.logits(x).argmax(1)

    def differentiable_logits(self, x: Tensor, beta: float | None = None) -> Tensor:
        """Hard (or soft) scores with autograd through the network (for gradient baselines); eval mode."""
        from .state import preserved

        with preserved(self.feature_model, eval_mode=True):
            z = self.feature_model(x)
        return self.kmeans.logits(z.reshape(z.shape[0], -1).double(), beta)

    def neon(self, x: Tensor, cluster: Any = None, beta: float | None = None, reference: Tensor | None = None,
             chunk_size: int | None = None) -> NeonResult:
        """NEON relevance in the input (``(N, *input_shape)``) and of the hidden features (``hidden_relevance``).

        Parameters
        ----------
        x : Tensor
            ``(N, *input_shape)`` inputs of ``feature_model``.
        cluster : int, sequence or None
            Cluster to explain: one for every sample, or one index per sample; default each sample's assigned one.
        beta : float, optional
            Stiffness of the min-take-most pooling over competitors; default ``1 / E[f_c]`` over ``x``.
        reference : Tensor, optional
            ``(*input_shape)`` or ``(N, *input_shape)`` reference input ``r``; default zeros.
        chunk_size : int, optional
            Samples per chunk of the exact affine map of ``feature_model`` (``affine_map``'s ``chunk_size``); bounds
            memory. Default depends on the sizes.
        """
        from .affine import affine_map

        amap = affine_map(self.feature_model, x, chunk_size=chunk_size)
        dt = torch.float64
        n = x.shape[0]
        jac = amap.A.reshape(n, amap.A.shape[1], -1).to(dt).cpu()  # (N, F, D)
        off = amap.d.to(dt).cpu()
        z = amap.output.to(dt).cpu()
        xf = x.reshape(n, -1).to(dt).cpu()
        if reference is None:
            ref = torch.zeros_like(xf)
        else:
            ref = _tensor(reference, dt).cpu()
            d = xf.shape[1]
            # one reference (of d values), or one per sample: a reshape alone would pair wrong shapes up silently
            if not (ref.numel() == d or (ref.dim() > 0 and ref.shape[0] == n and ref.numel() == n * d)):
                raise ValueError(f"reference must have the input shape {tuple(x.shape[1:])} (one reference) or "
                                 f"{tuple(x.shape)} (one per sample); got {tuple(ref.shape)}")
            ref = ref.reshape(-1, d).expand_as(xf)
        hidden, tied = _linear_neon(self.kmeans, z, cluster, beta)
        _warn_ties(tied, "DeepKMeans.neon", "hidden_relevance")
        c, rk = hidden.cluster, hidden.competitor_relevance
        w, b = self.kmeans.weights(dt)
        wc, bc = w[c], b[c]  # (N, K, F), (N, K)
        v = torch.einsum("nkf,nfd->nkd", wc, jac)  # competitor gradients in the input
        hx = torch.einsum("nkf,nf->nk", wc, z) + bc
        zr = torch.einsum("nfd,nd->nf", jac, ref) + off  # frozen region map at the reference
        hr = torch.einsum("nkf,nf->nk", wc, zr) + bc
        denom = hx - hr
        seg = (xf - ref)[:, None, :] * v  # (N, K, D), sums over D to hx − hr exactly
        v2 = v * v
        proj = _safe_div(v2, v2.sum(2, keepdim=True))
        share = torch.where((denom != 0)[:, :, None], _safe_div(seg, denom[:, :, None]), proj)
        rel = torch.einsum("nkd,nk->nd", share, rk)
        flat = ((v2.sum(2) == 0) & (rk != 0)).any(1)
        if bool(flat.any()):
            warnings.warn(
                f"DeepKMeans.neon: {int(flat.sum())} of {n} samples lie in regions where a competitor's score does not "
                "depend on the input (zero gradient, e.g. every hidden unit off): its relevance R_k cannot go to any "
                "input feature and stays unassigned (see NeonResult.conservation_error()); hidden_relevance keeps it",
                UserWarning, stacklevel=2)
        return NeonResult(rel.reshape(x.shape).to(x.dtype), hidden.score, c, rk, hidden.relevance)


# --- evaluation ------------------------------------------------------------------------------------------------


@dataclass
class InsertionResult:
    """Insertion curve: ``curve[t]`` = mean membership when the ``t`` most relevant features come from ``x``.

    Attributes
    ----------
    fractions : Tensor
        ``(D+1,)`` ``t / D``.
    curve : Tensor
        ``(D+1,)`` mean over samples and fills of ``[assigned cluster == c]``.
    auc : float
        Area under the curve (trapezoid over ``t / D``); higher is better.
    per_sample_auc : Tensor
        ``(N,)``.
    """

    fractions: Tensor
    curve: Tensor
    auc: float
    per_sample_auc: Tensor


def insertion_curve(predict: Callable[[Tensor], Tensor], x: Tensor, relevance: Tensor, cluster: Tensor,
                    fill: Tensor, n_fill: int = 16, seed: int = 0, chunk: int = 4096) -> InsertionResult:
    """The insertion evaluation of "From Clustering to Cluster Explanations".

    For each sample, features are inserted in decreasing relevance into ``n_fill`` rows drawn from ``fill`` (the
    data), and cluster membership of the composites is tracked.

    Parameters
    ----------
    predict : callable
        ``(M, D) -> (M,)`` cluster assignments.
    x, relevance : Tensor
        ``(N, D)``.
    cluster : Tensor
        ``(N,)`` the cluster each sample is explained for.
    fill : Tensor
        ``(M, D)`` data the non-inserted features are taken from.
    n_fill : int
        Rows of ``fill`` drawn (with replacement) per sample; the curve averages membership over them.
    seed : int
        Seed of the draw of those rows (a private generator: the global random state is left alone).
    chunk : int
        Most composites passed to ``predict`` in one call; bounds memory.
    """
    x, relevance, fill = _tensor(x), _tensor(relevance), _tensor(fill)
    if x.dim() != 2 or len(x) == 0:
        raise ValueError(f"x must be a non-empty (N, D) batch; got shape {tuple(x.shape)}")
    if relevance.shape != x.shape:
        raise ValueError(f"relevance shape {tuple(relevance.shape)} differs from x shape {tuple(x.shape)}")
    n, d = x.shape
    if fill.dim() != 2 or fill.shape[1] != d or len(fill) == 0:
        raise ValueError(f"fill must be a non-empty (M, {d}) batch of data rows; got shape {tuple(fill.shape)}")
    for name, value in (("n_fill", n_fill), ("chunk", chunk)):
        if not is_int_at_least(value, 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    gen = torch.Generator().manual_seed(seed)
    cluster = _cluster_ids(cluster, n)  # (an int: one cluster for every sample, as neon takes it)
    order = relevance.argsort(1, descending=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(d).expand(n, d).contiguous())
    steps = torch.arange(d + 1)
    member = torch.zeros(n, d + 1, dtype=torch.float64)
    per_batch = max(1, chunk // ((d + 1) * n_fill))  # samples whose composites go through predict together
    for s0 in range(0, n, per_batch):
        idx = torch.arange(s0, min(n, s0 + per_batch))
        rows = fill[torch.randint(len(fill), (len(idx), n_fill), generator=gen)].to(x.dtype)  # (b, F, D)
        mask = ranks[idx][:, None, :] < steps[None, :, None]  # (b, D+1, D): first t features by relevance
        comp = torch.where(mask[:, :, None, :], x[idx][:, None, None, :], rows[:, None, :, :]).reshape(-1, d)
        pred = torch.cat([torch.as_tensor(predict(comp[s:s + chunk])).reshape(-1)
                          for s in range(0, len(comp), chunk)])
        hit = pred.reshape(len(idx), d + 1, n_fill) == cluster[idx][:, None, None]
        member[idx] = hit.double().mean(2)
    fr = steps.double() / d
    per = torch.trapezoid(member, fr, dim=1)
    curve = member.mean(0)
    return InsertionResult(fr, curve, float(per.mean()), per)


def baseline_relevance(model: NeuralizedKMeans | NeuralizedKernelKMeans | DeepKMeans, x: Tensor, method: str,
                       cluster: Any = None, reference: Tensor | None = None, beta: float | None = None,
                       steps: int = 32, seed: int = 0) -> Tensor:
    """Relevance by one of the methods compared in the insertion benchmark.

    ``"neon"``; ``"random"``; ``"diff2"``: ``(x − x̃)²`` with ``x̃`` the reference (e.g. the data mean; zeros if
    omitted); ``"grad2"``: ``(∂f_c/∂x)²`` of the hard score; ``"ig"``:
    integrated gradients of the hard score from the reference (``steps`` Riemann midpoints).
    """
    x = _tensor(x)
    c = _cluster_arg(cluster, model.logits(x))
    ref = torch.zeros_like(x) if reference is None else _tensor(reference, x.dtype).reshape(-1, *x.shape[1:])
    ref = ref.expand_as(x)
    if method == "neon":
        if isinstance(model, DeepKMeans):
            return model.neon(x, c, beta, reference=reference).relevance
        return neon(model, x, c, beta).relevance
    score = model.differentiable_logits if isinstance(model, DeepKMeans) else model.logits
    if method == "random":
        return torch.rand(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(x.dtype)
    if method == "diff2":
        return (x - ref) ** 2

    def grad(z):
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            f = score(z).gather(1, c[:, None]).sum()
            (g,) = torch.autograd.grad(f, z)
        return g

    if method == "grad2":
        return grad(x) ** 2
    if method == "ig":
        total = torch.zeros_like(x)
        for s in range(steps):
            t = (s + 0.5) / steps
            total += grad(ref + t * (x - ref))
        return (x - ref) * total / steps
    raise ValueError(f"method must be one of neon, random, diff2, grad2, ig; got {method!r}")


# --- regions ---------------------------------------------------------------------------------------------------


@dataclass
class RegionGroups:
    """A data set's activation regions grouped into a few groups, with NEON explanations of membership.

    Attributes
    ----------
    region_ids : Tensor
        ``(N,)`` region key of each sample.
    regions : Tensor
        ``(R,)`` distinct region keys; ``counts`` ``(R,)`` samples per region.
    region_group : Tensor
        ``(R,)`` group of each region (k-means on per-region mean representations, weighted by counts).
    groups : Tensor
        ``(N,)`` group of each sample's region.
    deep : DeepKMeans
        The groups' centroids on the representation, for :meth:`explain`.
    """

    region_ids: Tensor
    regions: Tensor
    counts: Tensor
    region_group: Tensor
    groups: Tensor
    deep: DeepKMeans
    extra: dict = field(default_factory=dict)

    @property
    def n_groups(self) -> int:
        return self.deep.kmeans.n_clusters

    def explain(self, x: Tensor, group: Any = None, **kw) -> NeonResult:
        """NEON relevance (in the input) of membership in ``group``.

        The default explains, for each sample, the group whose centroid is nearest to the sample's own
        representation (what NEON's neuralized k-means assigns it to). That is not always :attr:`groups`' entry for
        the sample, the group of its region (they differ for the share ``1 − agreement(x)`` of samples); pass
        ``group=rg.groups`` (for the samples the groups were built on) to explain the regions' groups.
        """
        return self.deep.neon(x, group, **kw)

    def agreement(self, x: Tensor) -> float:
        """Share of samples whose own representation is nearest to their region's group centroid."""
        ids, _ = _region_ids_of(self.deep, x, self.extra)
        idx = torch.searchsorted(self.regions, ids)
        idx = idx.clamp(max=len(self.regions) - 1)
        known = self.regions[idx] == ids
        grp = torch.where(known, self.region_group[idx], torch.full_like(ids, -1))
        return float((self.deep.predict(x) == grp).double().mean())

    def summary(self):
        import pandas as pd

        rows = []
        for g in range(self.n_groups):
            sel = self.region_group == g
            rows.append({"group": g, "regions": int(sel.sum()), "samples": int(self.counts[sel].sum())})
        return pd.DataFrame(rows)


def _region_ids_of(deep: DeepKMeans, x: Tensor, extra: dict) -> tuple[Tensor, Tensor]:
    from .recording import record
    from .state import preserved

    model = extra["model"]
    with preserved(model, eval_mode=True), torch.no_grad(), record(model) as rec:
        out = model(x)
    return rec.region_ids(extra.get("layers")).cpu(), out


def group_regions(model: nn.Module, feature_model: nn.Module, x: Tensor, n_groups: int, layers: Any = None,
                  random_state: int = 0) -> RegionGroups:
    """Group the activation regions visited by ``x`` into ``n_groups`` groups and make them explainable.

    Each region is summarised by the mean of ``feature_model`` (e.g. the penultimate representation) over its
    samples; k-means (weighted by region sizes) groups these summaries — a parsimonious partition of the
    regions. :meth:`RegionGroups.explain` gives NEON explanations of a sample's membership in a group.

    Parameters
    ----------
    model : nn.Module
        The network whose regions are grouped (``layers`` selects which piecewise-linear calls define them).
    feature_model : nn.Module
        Piecewise-linear map from the input to the representation the groups live in.
    x : Tensor
        ``(N, *input_shape)`` inputs of both ``model`` and ``feature_model``; the regions grouped are those they visit.
    n_groups : int
        Number of groups (>= 2, and at most the number of distinct regions ``x`` visits).
    layers : str, sequence of str, slice, int or None
        The recorded piecewise-linear calls whose joint pattern defines a region (as in ``Recording.region_ids``);
        default all of them.
    random_state : int
        Seed of scikit-learn's k-means on the region summaries.
    """
    from sklearn.cluster import KMeans

    if n_groups < 2:
        raise ValueError(f"n_groups must be >= 2, got {n_groups}")
    extra = {"model": model, "layers": layers}
    ids, _ = _region_ids_of(None, x, extra)  # type: ignore[arg-type]
    z = DeepKMeans._features(feature_model, x).double()
    regions, inv, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    if len(regions) < n_groups:
        raise ValueError(f"x visits only {len(regions)} regions; n_groups={n_groups} is too many")
    means = torch.zeros(len(regions), z.shape[1], dtype=z.dtype).index_add_(0, inv, z) / counts[:, None]
    km = KMeans(n_groups, n_init=10, random_state=random_state).fit(means.numpy(), sample_weight=counts.numpy())
    region_group = torch.as_tensor(km.labels_).long()
    return RegionGroups(ids, regions, counts, region_group, region_group[inv], DeepKMeans(feature_model, km), extra)
