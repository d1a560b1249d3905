"""Neuralized k-means, kernel k-means, deep k-means and NEON: exactness against independent routes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

import relu_regions
from relu_regions import clusters as C
from relu_regions.datasets import load_tabular
from relu_regions.models import mlp


@pytest.fixture(scope="module")
def wine():
    ds = load_tabular("wine")
    x = ds.X.astype(np.float64)
    return (x - x.mean(0)) / x.std(0)


@pytest.fixture(scope="module")
def wine_km(wine):
    return KMeans(3, n_init=10, random_state=0).fit(wine)


def _fc_from_distances(centroids: np.ndarray, x: np.ndarray, c: np.ndarray) -> np.ndarray:
    # independent route: squared distances, min over competitors of d_k − d_c
    d2 = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)
    k = centroids.shape[0]
    return np.array([min(d2[i, j] - d2[i, c[i]] for j in range(k) if j != c[i]) for i in range(len(x))])


@pytest.mark.parametrize("name,k", [("wine", 3), ("iris", 3), ("digits", 10)])
def test_hard_score_positive_exactly_for_kmeans_cluster(name, k):
    x = load_tabular(name).X.astype(np.float64)
    km = KMeans(k, n_init=4, random_state=1).fit(x)
    nk = C.neuralize_kmeans(km)
    f = nk.logits(torch.as_tensor(x))
    lab = torch.as_tensor(km.predict(x))
    own = f.gather(1, lab[:, None]).squeeze(1)
    assert (own > 0).all()
    others = f.clone()
    others[torch.arange(len(x)), lab] = float("-inf")
    assert (others.amax(1) < 0).all()


def test_soft_min_bounds_hard_min(wine, wine_km):
    nk = C.neuralize_kmeans(wine_km)
    x = torch.as_tensor(wine)
    hard, soft = nk.logits(x), nk.logits(x, beta=0.5)
    # soft-min ≤ hard min ≤ soft-min + log(K−1)/β
    assert (soft <= hard + 1e-12).all()
    assert (hard <= soft + np.log(2) / 0.5 + 1e-12).all()


def test_neon_conservation_matches_independent_score(wine, wine_km):
    nk = C.neuralize_kmeans(wine_km)
    x = torch.as_tensor(wine)
    r = C.neon(nk, x)
    fc = _fc_from_distances(wine_km.cluster_centers_, wine, r.cluster.numpy())
    np.testing.assert_allclose(r.relevance.sum(1).numpy(), fc, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(r.competitor_relevance.sum(1).numpy(), fc, rtol=1e-10, atol=1e-10)
    # explaining a foreign cluster: its (negative) score is conserved too
    other = (r.cluster + 1) % 3
    r2 = C.neon(nk, x, other, beta=1.0)
    fc2 = _fc_from_distances(wine_km.cluster_centers_, wine, other.numpy())
    assert (fc2 < 0).all()
    np.testing.assert_allclose(r2.relevance.sum(1).numpy(), fc2, rtol=1e-10, atol=1e-10)


def test_neon_single_competitor_is_midpoint_rule():
    # two clusters: R_i = (x_i − m_i) w_i exactly, checked coordinate-wise by hand
    mu = np.array([[1.0, 2.0, 0.0], [-1.0, 0.5, 3.0]])
    nk = C.NeuralizedKMeans(torch.as_tensor(mu))
    x = torch.tensor([[0.7, 1.1, 0.2]], dtype=torch.float64)
    r = C.neon(nk, x)
    assert r.cluster.item() == 0
    expected = (x[0].numpy() - (mu[0] + mu[1]) / 2) * 2 * (mu[0] - mu[1])
    np.testing.assert_allclose(r.relevance[0].numpy(), expected, rtol=1e-12)


def test_default_beta_and_errors(wine, wine_km):
    nk = C.neuralize_kmeans(wine_km)
    x = torch.as_tensor(wine)
    beta = C.default_beta(nk, x)
    assert beta == pytest.approx(1 / nk.logits(x).amax(1).mean().item())
    with pytest.raises(ValueError, match="not fitted"):
        C.neuralize_kmeans(KMeans(3))
    with pytest.raises(ValueError, match=r"shape \(N, 13\)"):
        nk.logits(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="cluster"):
        C.neon(nk, x, cluster=7)


def test_module_is_engine_explainable(wine, wine_km):
    nk = C.neuralize_kmeans(wine_km)
    x = torch.as_tensor(wine)
    net = nk.module()
    amap = relu_regions.affine_map(net, x, method="forward")
    np.testing.assert_allclose(amap.output.numpy(), nk.logits(x).numpy(), atol=1e-10)
    # the region's gradient of f_c is w_ck* for the argmin competitor
    w, _ = nk.weights()
    h = nk.competitors(x)
    c = nk.predict(x)
    hc = h[torch.arange(len(x)), c]
    hc[torch.arange(len(x)), c] = float("inf")
    kstar = hc.argmin(1)
    g = amap.A[torch.arange(len(x)), c]
    np.testing.assert_allclose(g.numpy(), w[c, kstar].numpy(), atol=1e-10)


def test_kernel_kmeans_network_reproduces_assignments(wine):
    kk = C.KernelKMeans(3, max_support=30, random_state=0).fit(wine)
    net = C.NeuralizedKernelKMeans.from_model(kk)
    x = torch.as_tensor(wine)
    pred_model = kk.predict(wine)
    f = net.logits(x)
    assert torch.equal(f.argmax(1), pred_model)
    assert (f.gather(1, pred_model[:, None]) > 0).all()
    # the pooled score equals the log-similarity ratio computed directly
    ls = kk.log_similarity(wine)
    pw = net.pairwise(x)
    np.testing.assert_allclose(pw[:, 0, 1].numpy(), (ls[:, 0] - ls[:, 1]).numpy(), rtol=1e-8, atol=1e-8)


def test_kernel_neon_conservation(wine):
    kk = C.KernelKMeans(3, max_support=15, random_state=0).fit(wine)
    net = C.NeuralizedKernelKMeans.from_model(kk)
    x = torch.as_tensor(wine[::4])
    r = C.neon(net, x)
    ls = kk.log_similarity(x).numpy()
    c = r.cluster.numpy()
    fc = np.array([min(ls[i, c[i]] - ls[i, j] for j in range(3) if j != c[i]) for i in range(len(x))])
    np.testing.assert_allclose(r.relevance.sum(1).numpy(), fc, rtol=1e-8, atol=1e-8)
    # in row chunks of one sample (the (N, I, J) tensors bounded; 905 MB for 200 samples before): the same values
    whole_f = net.pairwise(x)
    real = C._row_chunks
    try:
        C._row_chunks = lambda n, per_row: [slice(i, i + 1) for i in range(n)]
        ones = C.neon(net, x)
        assert torch.equal(net.pairwise(x), whole_f)
    finally:
        C._row_chunks = real
    assert torch.allclose(ones.relevance, r.relevance, rtol=1e-12, atol=1e-12)
    assert C._row_chunks(10, 3, budget=7) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8), slice(8, 10)]


def test_deep_kmeans_conservation_and_region_map():
    torch.manual_seed(0)
    net = mlp(10, [16, 8], 3).double()
    x = torch.randn(60, 10, dtype=torch.float64)
    feat = net[:4]
    dk = C.DeepKMeans.fit(feat, x, 3)
    r = dk.neon(x, reference=x.mean(0))
    z = feat(x).detach().numpy()
    fc = _fc_from_distances(dk.kmeans.centroids.numpy(), z, r.cluster.numpy())
    np.testing.assert_allclose(r.relevance.sum(1).numpy(), fc, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(r.hidden_relevance.sum(1).numpy(), fc, rtol=1e-9, atol=1e-9)
    assert (r.score > 0).all()


def test_insertion_curve_orders_methods(wine, wine_km):
    nk = C.neuralize_kmeans(wine_km)
    x = torch.as_tensor(wine)
    lab = nk.predict(x)
    auc = {}
    for m in ("neon", "random"):
        rel = C.baseline_relevance(nk, x, m, reference=x.mean(0))
        res = C.insertion_curve(nk.predict, x, rel, lab, x, n_fill=8)
        assert res.curve[-1] == 1.0  # all features inserted: x itself
        auc[m] = res.auc
    assert auc["neon"] > auc["random"] + 0.05


def test_group_regions_explains_groups():
    torch.manual_seed(0)
    net = mlp(6, [12, 8], 3).double()
    x = torch.randn(80, 6, dtype=torch.float64)
    g = C.group_regions(net, net[:4], x, 3)
    assert g.regions.numel() == len(torch.unique(g.region_ids))
    assert int(g.counts.sum()) == 80
    assert set(g.groups.tolist()) <= {0, 1, 2}
    assert g.summary()["samples"].sum() == 80
    e = g.explain(x[:10])
    assert e.conservation_error().max() < 1e-9
    with pytest.raises(ValueError, match="n_groups"):
        C.group_regions(net, net[:4], x, 1)


def test_bad_arguments_get_clear_errors(wine, wine_km):
    """Before: beta <= 0, inf or NaN gave NaN relevances; cluster=1.7 meant cluster 1 and a bool tensor the
    indices 0 / 1; NaN inputs failed as "E[f_c] is not positive"; insertion_curve divided by n_fill=0, returned a
    NaN AUC for no samples and refused an int cluster; a KernelKMeans given to neuralize_kmeans was "not fitted"."""
    nk = C.neuralize_kmeans(wine_km)
    x = torch.as_tensor(wine[:4])
    for beta in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="beta must be a positive finite number"):
            C.neon(nk, x, beta=beta)
        with pytest.raises(ValueError, match="beta must be a positive finite number"):
            nk.logits(x, beta=beta)
    for cluster in (1.7, torch.tensor([True, False, True, False])):
        with pytest.raises(TypeError, match="cluster must be an int or integer cluster indices"):
            C.neon(nk, x, cluster=cluster)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="x holds 1 non-finite value"):
        C.neon(nk, bad)
    rel = C.neon(nk, x, cluster=0).relevance
    fill = torch.as_tensor(wine)
    one = C.insertion_curve(nk.predict, x, rel, 0, fill, n_fill=4)
    each = C.insertion_curve(nk.predict, x, rel, torch.zeros(4, dtype=torch.long), fill, n_fill=4)
    assert one.auc == each.auc
    for kw, msg in (({"n_fill": 0}, "n_fill must be a positive int"), ({"fill": fill[:, :3]}, "fill must be"),
                    ({"x": x[:0], "relevance": rel[:0]}, "x must be a non-empty")):
        args = {"x": x, "relevance": rel, "fill": fill, **kw}
        with pytest.raises(ValueError, match=msg):
            C.insertion_curve(nk.predict, args["x"], args["relevance"], 0, args["fill"], n_fill=kw.get("n_fill", 4))
    with pytest.raises(ValueError, match="max_iter must be a positive int"):
        C.KernelKMeans(3, max_iter=0)
    kk = C.KernelKMeans(2, max_support=10).fit(wine[:30])
    with pytest.raises(TypeError, match="NeuralizedKernelKMeans.from_model"):
        C.neuralize_kmeans(kk)


def test_deep_kmeans_warns_where_relevance_cannot_be_conserved():
    """Where the competitors do not depend on the input (every hidden unit off), no input feature can take their
    relevance: before, it was dropped without a word (Σ R_i = 0 against f_c = 0.0036 on this seed, while the
    docstring said "exactly conservative"). Now a warning names the samples, and the others conserve exactly."""
    torch.manual_seed(0)
    fm = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).double()
    with torch.no_grad():
        fm[0].bias.copy_(torch.tensor([-5.0, 0.0, 0.0]))
    x = torch.randn(40, 4, dtype=torch.float64) * 0.5
    x[:5] = -x[:5].abs() * torch.sign(fm[0].weight[1:].sum(0))
    flat = (fm[1](fm[0](x)) == 0).all(1)
    assert int(flat.sum()) >= 5
    dk = C.DeepKMeans.fit(fm, x, 3)
    with pytest.warns(UserWarning, match=f"{int(flat.sum())} of 40 samples lie in regions where a competitor"):
        r = dk.neon(x, beta=0.5)
    err = r.conservation_error()
    assert float(err[~flat].max()) < 1e-12 and torch.allclose(err[flat], r.score[flat].abs())


def _undocumented(func) -> list[str]:
    """Parameters of ``func``'s signature missing from its numpy docstring's Parameters section."""
    import inspect

    doc = inspect.cleandoc(func.__doc__)
    section = doc.split("Parameters\n----------\n")[1].split("\n\n")[0]
    documented = {n.strip() for line in section.splitlines() if line and not line[0].isspace()
                  for n in line.split(" : ")[0].split(",")}
    return [p for p in inspect.signature(func).parameters if p not in documented and p != "self"]


def test_docstrings_document_every_parameter():
    """Before: the numpy docstrings left parameters out: DeepKMeans.neon (x, cluster, chunk_size), group_regions
    (x, n_groups, layers, random_state), insertion_curve (n_fill, seed, chunk)."""
    for func in (C.DeepKMeans.neon, C.group_regions, C.insertion_curve, C.neon):
        assert _undocumented(func) == [], func.__qualname__


def _three_blobs() -> np.ndarray:
    rng = np.random.default_rng(1)
    return np.concatenate([rng.normal(m, 0.6, (8, 3)) for m in ([0, 0, 0], [3, 0, 1], [0, 3, 0])])


def test_kernel_kmeans_checks_parameters_and_inputs():
    """Before: max_support=0 fitted empty supports (NaN similarities, every label 0), -1 dropped a support vector
    per cluster, gamma=-1 fitted the growing kernel exp(+d²), gamma=0 said "a cluster became empty"; predict
    assigned a NaN row to cluster 0 and met a wrong feature count with torch's broadcasting error."""
    for kw in ({"max_support": 0}, {"max_support": -1}, {"max_support": 2.5}):
        with pytest.raises(ValueError, match="max_support must be None or a positive int"):
            C.KernelKMeans(3, **kw)
    for gamma in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="gamma must be None .* or a positive finite number"):
            C.KernelKMeans(3, gamma=gamma)
    x = _three_blobs()
    kk = C.KernelKMeans(3, random_state=0).fit(x)
    with pytest.raises(ValueError, match="X holds 3 non-finite value"):
        kk.predict(np.r_[x[:2], [[np.nan] * 3]])
    with pytest.raises(ValueError, match=r"X must have shape \(N, 3\); got \(24, 2\)"):
        kk.log_similarity(x[:, :2])
    with pytest.raises(ValueError, match="X holds 3 non-finite value"):
        C.KernelKMeans(3).fit(np.r_[x, [[np.nan] * 3]])
    # the model's rule, computed independently from its supports: the largest mean Gaussian similarity
    sims = np.stack([np.exp(-kk.gamma_ * ((x[:, None] - s.numpy()[None]) ** 2).sum(-1)).mean(1)
                     for s in kk.support_], 1)
    np.testing.assert_array_equal(kk.predict(x).numpy(), sims.argmax(1))


def test_kernel_kmeans_default_gamma_on_duplicate_rows():
    """Before: with more than half of the pairs duplicate rows (Boolean data) the median squared distance is 0 and
    the default gamma raised a bare ZeroDivisionError. Now the median over the distinct pairs is used."""
    from scipy.spatial.distance import pdist

    x = np.r_[np.tile([0.0, 1, 0, 1], (22, 1)), np.tile([1.0, 0, 1, 1], (4, 1)), np.tile([1.0, 1, 1, 0], (4, 1))]
    d = pdist(x, "sqeuclidean")
    assert np.median(d) == 0
    kk = C.KernelKMeans(3).fit(x)
    assert kk.gamma_ == pytest.approx(1 / np.median(d[d > 0]))
    assert sorted(np.bincount(kk.labels_.numpy()).tolist()) == [4, 4, 22]
    with pytest.raises(ValueError, match="X has no two distinct rows"):
        C.KernelKMeans(2).fit(np.ones((10, 3)))


def test_kernel_kmeans_warns_when_max_iter_runs_out():
    """Before: fit returned silently when max_iter ran out before a fixed point, its labels_ (the model's
    predictions) differing from the clusters the supports were taken from."""
    from sklearn.exceptions import ConvergenceWarning

    y = np.random.default_rng(3).normal(size=(60, 2))
    with pytest.warns(ConvergenceWarning, match="reached max_iter=1 before a fixed point"):
        kk = C.KernelKMeans(4, max_iter=1, random_state=0).fit(y)
    members = np.concatenate([np.full(len(s), k) for k, s in enumerate(kk.support_)])
    assert sorted(np.bincount(members).tolist()) != sorted(np.bincount(kk.labels_.numpy()).tolist())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        done = C.KernelKMeans(4, random_state=0).fit(y)
    # at the fixed point the supports are exactly the clusters of labels_
    for k, s in enumerate(done.support_):
        np.testing.assert_array_equal(s.numpy(), y[done.labels_.numpy() == k])


def test_module_leaves_the_global_rng_alone():
    """Before: NeuralizedKMeans.module() built an nn.Linear whose default initialisation drew from the global torch
    RNG (then overwritten), changing the caller's random stream."""
    nk = C.neuralize_kmeans(np.array([[0.0, 0, 1], [2, 0, 0], [0, 2, 0]]))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    net = nk.module()
    assert torch.equal(torch.rand(3), expected)
    x = torch.tensor([[0.5, 0.2, 0.1], [1.9, 0.3, 0.0]], dtype=torch.float64)
    d2 = ((x[:, None] - nk.centroids[None]) ** 2).sum(-1)  # hard scores from distances, by hand
    fc = torch.stack([torch.stack([min(d2[n, k] - d2[n, c] for k in range(3) if k != c) for c in range(3)])
                      for n in range(2)])
    torch.testing.assert_close(net(x), fc)


def test_neon_warns_where_an_exact_tie_drops_a_share():
    """Before: explaining cluster 1 for x = (0.5, 0.5), on the bisector of centroids 1 and 2 (h_12 = 0), dropped
    R_2 = f_1 / (1 + e²) silently, although the docstring said sum R = f_c. Same for the kernel model."""
    nk = C.neuralize_kmeans(torch.tensor([[0.0, 0], [2, 0], [0, 2]], dtype=torch.float64))
    x = torch.tensor([[0.5, 0.5], [0.5, 0.2]], dtype=torch.float64)
    with pytest.warns(UserWarning, match="neon: 1 of 2 samples lie exactly on the bisector"):
        r = C.neon(nk, x, cluster=1, beta=1.0)
    # by hand: h_10 = 0.5 − 2.5 = −2, h_12 = 0, f_1 = −2; soft-min weight of competitor 2 is 1 / (1 + e²)
    assert r.score[0].item() == pytest.approx(-2.0)
    assert r.conservation_error()[0].item() == pytest.approx(2 / (1 + np.e ** 2), rel=1e-12)
    assert r.conservation_error()[1].item() < 1e-12
    # kernel: x = (1, 0) is equidistant to the support (0, 0) of cluster 0 and (2, 0) of cluster 1
    net = C.NeuralizedKernelKMeans([torch.tensor([[0.0, 0], [10, 0]]), torch.tensor([[2.0, 0]]),
                                    torch.tensor([[0.0, 50]])], 1.0)
    with pytest.warns(UserWarning, match="NeuralizedKernelKMeans.neon: 1 of 1 samples lie exactly on the bisector"):
        rk = net.neon(torch.tensor([[1.0, 0]], dtype=torch.float64), cluster=0, beta=1.0)
    assert rk.conservation_error().item() > 1e-3


def test_neon_and_deep_neon_errors_name_the_argument(wine, wine_km):
    """Before: neon(DeepKMeans) and neon(sklearn KMeans) failed with "object has no attribute 'n_features'";
    DeepKMeans.neon's reference of a wrong shape gave torch's expand / reshape errors."""
    with pytest.raises(TypeError, match=r"got KMeans: pass neuralize_kmeans\(model\)"):
        C.neon(wine_km, torch.as_tensor(wine[:3]))
    kk = C.KernelKMeans(2, max_support=10).fit(wine[:30])
    with pytest.raises(TypeError, match=r"NeuralizedKernelKMeans.from_model\(model\)"):
        C.neon(kk, torch.as_tensor(wine[:3]))
    torch.manual_seed(0)
    net = mlp(6, [10], 3).double()
    x = torch.randn(40, 6, dtype=torch.float64)
    dk = C.DeepKMeans.fit(net, x, 3)
    r = C.neon(dk, x[:5], beta=1.0)  # a DeepKMeans is explained by its own neon
    z = net(x[:5]).detach().numpy()
    fc = _fc_from_distances(dk.kmeans.centroids.numpy(), z, r.cluster.numpy())
    np.testing.assert_allclose(r.relevance.sum(1).numpy(), fc, rtol=1e-9, atol=1e-9)
    for ref in (torch.zeros(2, 6), torch.zeros(5)):
        with pytest.raises(ValueError, match=r"reference must have the input shape \(6,\).* or \(4, 6\)"):
            dk.neon(x[:4], beta=1.0, reference=ref)


def test_kernel_distances_in_row_chunks_equal_the_whole_computation():
    """``_sqdist`` works in row chunks (the (N, M, D) differences all at once took 2 GB for 1,000 x 1,000 rows of
    256 features): the same values bit for bit at any chunk size, and close to scipy's cdist."""
    from scipy.spatial.distance import cdist

    from relu_regions.clusters import _sqdist

    g = torch.Generator().manual_seed(0)
    x, u = torch.randn(37, 5, generator=g, dtype=torch.float64), torch.randn(11, 5, generator=g, dtype=torch.float64)
    whole = ((x[:, None, :] - u[None, :, :]) ** 2).sum(-1)
    for budget in (1, 55, 56, 10**9):  # one row per chunk, one row, two rows, everything
        assert torch.equal(_sqdist(x, u, budget=budget), whole)
    assert torch.allclose(whole, torch.from_numpy(cdist(x.numpy(), u.numpy(), "sqeuclidean")), rtol=1e-12)
