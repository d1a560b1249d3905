"""Plain-loop helpers (evaluate, track), exact boundary distances and the region-parsimony regulariser.

Independent routes: hidden pre-activations of an MLP computed by hand from its weights, Jacobians from torch.func,
region membership checked by stepping just inside / just outside the predicted distance.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from zoo import InplaceResidualStream, zoo

from relu_regions.models import mlp
from relu_regions.regions import RegionStats
from relu_regions.training import boundary_distances, evaluate, parsimony_penalty, track


def _data(n=60, d=4, k=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, k, (n,), generator=g)
    return x, y


def _model(d=4, hidden=(6, 5), k=3, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return mlp(d, list(hidden), k).to(dtype)


def _hand_preacts(model: nn.Sequential, x):
    """Pre-activations of every ReLU layer, by hand from the weights."""
    out, h = [], x
    for m in model:
        if isinstance(m, nn.Linear):
            h = h @ m.weight.T + m.bias
        elif isinstance(m, nn.ReLU):
            out.append(h)
            h = torch.relu(h)
    return out


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()],
            [(len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in vars(m)) for m in model.modules()])


def _same(a, b):
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1:] == b[1:]


def _loader(x, y, bs=16, as_dict=False):
    ds = torch.utils.data.TensorDataset(x, y)
    if not as_dict:
        return torch.utils.data.DataLoader(ds, batch_size=bs)
    return torch.utils.data.DataLoader(ds, batch_size=bs, collate_fn=lambda items: {
        "features": torch.stack([i[0] for i in items]), "target": torch.stack([i[1] for i in items])})


def test_evaluate_matches_hand_computed_patterns():
    model, (x, y) = _model(), _data()
    model.train()
    before = _snapshot(model)
    stats = evaluate(model, _loader(x, y), progress=False)
    _same(before, _snapshot(model))
    pre = _hand_preacts(model, x)
    patterns = {tuple(torch.cat([p[i] > 0 for p in pre]).tolist()) for i in range(len(x))}
    assert stats.n_regions() == len(patterns)
    assert stats.n_samples == len(x)
    with torch.no_grad():
        pred = model(x).argmax(1)
    assert stats.accuracy == pytest.approx(float((pred == y).float().mean()))
    # merging the halves gives the same as the whole (DDP relies on this)
    a = evaluate(model, _loader(x[:32], y[:32]), n_classes=3)
    b = evaluate(model, _loader(x[32:], y[32:]), n_classes=3)
    a.merge(b)
    assert a.n_regions() == stats.n_regions() and a.coverage(3) == stats.coverage(3)
    assert a.mean_purity() == stats.mean_purity()


def test_evaluate_dict_batches_label_key_and_errors():
    model, (x, y) = _model(), _data()
    s1 = evaluate(model, _loader(x, y), progress=True)
    s2 = evaluate(model, _loader(x, y, as_dict=True))  # finds "features" / "target"
    assert s1.n_regions() == s2.n_regions() and s1.accuracy == s2.accuracy
    s3 = evaluate(model, [(x[:30], {"cls": y[:30]}), (x[30:], {"cls": y[30:]})],
                  get_labels=lambda b: b[1]["cls"], n_classes=3)
    assert s3.n_regions() == s1.n_regions()
    with pytest.raises(TypeError, match="cannot find the labels"):
        evaluate(model, [{"features": x, "what": y}])
    with pytest.raises(KeyError, match="label_key='lbl'"):
        evaluate(model, _loader(x, y, as_dict=True), label_key="lbl")
    with pytest.raises(TypeError, match="cannot find the inputs"):
        evaluate(model, [{"pixels": x, "y": y}])


def test_hand_written_loop_with_track_equals_evaluate_and_restores_model():
    model, (x, y) = _model(), _data()
    before = _snapshot(model)
    stats = RegionStats(3, granularities={"last": -1})
    with torch.no_grad(), track(model, stats) as tracker:
        for xb, yb in _loader(x, y):
            logits = model(xb)
            _ = model(xb)  # a second forward in the same step: the last pass is kept
            tracker.update(yb)
            assert logits.shape == (len(xb), 3)
    _same(before, _snapshot(model))
    ref = evaluate(model, _loader(x, y), granularities={"last": -1})
    assert stats.n_regions() == ref.n_regions() and stats.n_regions("last") == ref.n_regions("last")
    last = {tuple((_hand_preacts(model, x)[-1][i] > 0).tolist()) for i in range(len(x))}
    assert stats.n_regions("last") == len(last)
    # an exception inside the block still removes every hook
    with pytest.raises(RuntimeError, match="boom"), track(model, RegionStats(3)):
        model(x)
        raise RuntimeError("boom")
    _same(before, _snapshot(model))
    with pytest.raises(ValueError, match="labels hold"), track(model, RegionStats(3)) as t:
        model(x)
        t.update(y[:5])


def test_a_session_opened_inside_a_track_block_is_not_taken_for_the_batch():
    # affine_map inside the block runs the model on its own inputs (replicas of the batch): the tracker keeps the
    # batch's input and output, and its update counts the batch's predictions
    import relu_regions as rr

    model, (x, y) = _model(), _data()
    ref = RegionStats(3)
    with torch.no_grad(), track(model, ref) as t:
        model(x)
        t.update(y)
    stats = RegionStats(3)
    with track(model, stats) as t:
        with torch.no_grad():
            out = model(x)
        amap = rr.affine_map(model, x)  # all outputs: the reverse route runs the model on replicas of x
        assert t.rec.active and torch.equal(t.last_input, x) and torch.equal(t.last_output, out)
        t.update(y)
    assert torch.allclose(amap.output, out, atol=1e-5)
    assert torch.equal(stats.region_keys(), ref.region_keys()) and stats.accuracy == ref.accuracy
    assert torch.equal(stats.class_histograms(which="pred"), ref.class_histograms(which="pred"))


def test_evaluate_contributions_match_jacobians():
    model, (x, y) = _model(dtype=torch.float64), _data(dtype=torch.float64)
    stats = evaluate(model, _loader(x, y), contributions=True)
    jac = torch.func.vmap(torch.func.jacrev(model))(x)  # (N, K, D), independent of the engine
    contrib = jac * x[:, None, :]
    keys = stats.region_keys()
    ref = RegionStats(3)
    with torch.no_grad(), track(model, ref) as t:
        model(x)
        t.update(y)
    assert torch.equal(ref.region_keys().sort().values, keys.sort().values)
    # per-region mean contributions from an independent Jacobian
    with torch.no_grad(), track(model, RegionStats(3)) as t:
        model(x)
        ids = t.rec.region_ids()
    mean = torch.stack([contrib[ids == k].mean(0) for k in keys])
    torch.testing.assert_close(stats.mean_contributions().reshape(mean.shape), mean)


def test_boundary_distances_exact():
    model, (x, _) = _model(dtype=torch.float64), _data(n=12, dtype=torch.float64)
    before = _snapshot(model)
    d = boundary_distances(model, x)
    _same(before, _snapshot(model))
    # independent: hand pre-activations, torch.func Jacobians of each layer's pre-activation
    pre = torch.cat(_hand_preacts(model, x), 1)
    jac = torch.func.vmap(torch.func.jacrev(lambda v: torch.cat(_hand_preacts(model, v[None]), 1)[0]))(x)
    dist = pre.abs() / jac.norm(dim=2)
    torch.testing.assert_close(d, dist.amin(1))
    # step just inside / just past the nearest hyperplane: same region / a different region
    j = dist.argmin(1)
    idx = torch.arange(len(x))
    g = jac[idx, j]
    direction = -torch.sign(pre[idx, j])[:, None] * g / g.norm(dim=1, keepdim=True)
    pat = (pre > 0)
    inside = torch.cat(_hand_preacts(model, x + 0.999 * d[:, None] * direction), 1) > 0
    outside = torch.cat(_hand_preacts(model, x + 1.001 * d[:, None] * direction), 1) > 0
    assert torch.equal(inside, pat)
    assert (outside != pat).any(1).all()


def _reference_penalty(model, x, gamma, l1):
    pre_fn = lambda v: torch.cat(_hand_preacts(model, v[None]), 1)[0]  # noqa: E731
    pre = torch.cat(_hand_preacts(model, x), 1)
    jac = torch.func.vmap(torch.func.jacrev(pre_fn))(x)
    dist = pre.abs() / jac.norm(dim=2)
    return torch.relu(1 - dist / gamma).sum(1).mean() + l1 * torch.relu(pre).sum(1).mean()


def test_parsimony_penalty_value_and_gradient_match_independent_route():
    model, (x, _) = _model(dtype=torch.float64), _data(n=10, dtype=torch.float64)
    model.train()
    before = _snapshot(model)
    parts = parsimony_penalty(model, x, gamma=0.5, l1=0.1, max_samples=None, return_parts=True)
    _same(before, _snapshot(model))
    ref = _reference_penalty(model, x, 0.5, 0.1)
    assert ref.item() > 0
    torch.testing.assert_close(parts["total"], ref)
    params = list(model.parameters())[:4]  # the output layer has no units: no gradient
    g1 = torch.autograd.grad(parts["total"], params)
    g2 = torch.autograd.grad(ref, params)
    for a, b in zip(g1, g2):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(parts["min_distance"], boundary_distances(model, x))
    # k closest only: never more than the full hinge, and only the first max_samples samples are used
    assert parsimony_penalty(model, x, gamma=0.5, k=2, max_samples=None) <= parts["hinge"] + 1e-12
    torch.testing.assert_close(parsimony_penalty(model, x, gamma=0.5, max_samples=4),
                               _reference_penalty(model, x[:4], 0.5, 0.0))
    with pytest.raises(ValueError, match="gamma"):
        parsimony_penalty(model, x, gamma=0)


def test_parsimony_penalty_is_invariant_to_rescaled_hidden_units():
    # the same function with half of the first layer's units scaled by 1e-13 (their outgoing weights by 1e13): the
    # same regions and distances. An absolute cut-off on the gradient norm (1e-12) dropped those units.
    model, (x, _) = _model(dtype=torch.float64), _data(n=10, dtype=torch.float64)
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    scaled = copy.deepcopy(model)
    s_first = next(m for m in scaled.modules() if isinstance(m, nn.Linear))
    s_second = [m for m in scaled.modules() if isinstance(m, nn.Linear)][1]
    half = first.out_features // 2
    with torch.no_grad():
        s_first.weight[:half] *= 1e-13
        s_first.bias[:half] *= 1e-13
        s_second.weight[:, :half] *= 1e13
        torch.testing.assert_close(scaled(x), model(x))
    ref = _reference_penalty(model, x, 0.5, 0.0)
    parts = parsimony_penalty(scaled, x, gamma=0.5, max_samples=None, return_parts=True)
    torch.testing.assert_close(parts["hinge"], ref)
    torch.testing.assert_close(parts["min_distance"], boundary_distances(model, x))


def test_parsimony_penalty_descends_and_moves_boundaries_away():
    model, (x, _) = _model(seed=1), _data(n=32, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    d0 = boundary_distances(model, x).median()
    p0 = parsimony_penalty(model, x, gamma=1.0, max_samples=None).item()
    for _ in range(30):
        opt.zero_grad()
        parsimony_penalty(model, x, gamma=1.0, max_samples=None).backward()
        opt.step()
    assert parsimony_penalty(model, x, gamma=1.0, max_samples=None).item() < p0
    assert boundary_distances(model, x).median() > d0


@pytest.mark.parametrize("name", list(zoo()))
def test_evaluate_counts_the_distinct_recorded_patterns_of_every_zoo_model(name):
    """``evaluate``'s region count (64-bit keys, batch by batch) equals the number of distinct exact packed patterns
    of one recording of all inputs, and its accuracy the model's own; the model is left as it was."""
    import relu_regions as rr

    model, shape = zoo()[name]
    g = torch.Generator().manual_seed(13)
    x = torch.randn(48, *shape, generator=g)
    x[24:] = x[:24] + 1e-4 * torch.randn(24, *shape, generator=g)  # near copies: some regions shared
    with torch.no_grad():
        k = model(x[:1]).reshape(1, -1).shape[1]
    y = torch.randint(0, max(k, 2), (48,), generator=g)
    before = _snapshot(model)
    stats = evaluate(model, _loader(x, y, bs=10), n_classes=max(k, 2), progress=False)
    _same(before, _snapshot(model))
    with torch.no_grad(), rr.record(model) as rec:
        out = model(x)
    assert stats.n_samples == 48
    assert stats.n_regions() == len(torch.unique(rec.packed(), dim=0)) < 48
    assert stats.accuracy == pytest.approx(float((out.reshape(48, -1).argmax(1) == y).float().mean()))


@pytest.mark.parametrize("name", list(zoo()))
def test_parsimony_penalty_of_every_zoo_model_matches_the_geometry_and_central_differences(name):
    """On every zoo model (float64): the penalty's nearest hyperplane equals ``boundary_distance`` restricted to the
    ReLU-like and clamp units (another route: forward-mode tangents through the frozen network, not the penalty's
    ``[x, 0, e_1, ...]`` replay), and its derivative along a random direction of the parameters equals a central
    difference of the penalty itself (steps of 1e-6 that keep every activation pattern, so the penalty is smooth
    there); the model is left as it was."""
    import relu_regions as rr

    model, shape = zoo()[name]
    model = model.double()
    x = torch.randn(3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(21))
    before = _snapshot(model)
    parts = parsimony_penalty(model, x, gamma=10.0, l1=0.1, max_samples=None, return_parts=True)
    _same(before, _snapshot(model))
    want = rr.boundary_distance(model, x, kinds=("relu", "leaky_relu", "prelu", "clamp"), route="forward").distance
    torch.testing.assert_close(parts["min_distance"], want, rtol=1e-9, atol=1e-12)
    assert parts["hinge"].item() > 0  # gamma far above the distances: every unit's hinge term is live

    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(5)
    v = [torch.randn(p.shape, dtype=p.dtype, generator=g) for p in params]
    grads = torch.autograd.grad(parts["total"], params, allow_unused=True)
    slope = sum((gi * vi).sum() for gi, vi in zip(grads, v) if gi is not None)
    with torch.no_grad(), rr.record(model) as rec:
        model(x)
    pattern = rec.packed()

    def at(eps: float) -> tuple[float, torch.Tensor]:
        with torch.no_grad():
            for p, vi in zip(params, v):
                p.add_(eps * vi)
        try:
            with torch.no_grad(), rr.record(model) as r:
                model(x)
            return parsimony_penalty(model, x, gamma=10.0, l1=0.1, max_samples=None).item(), r.packed()
        finally:
            with torch.no_grad():
                for p, vi in zip(params, v):
                    p.sub_(eps * vi)

    eps = 1e-6
    (up, p_up), (down, p_down) = at(eps), at(-eps)
    assert torch.equal(p_up, pattern) and torch.equal(p_down, pattern)
    assert (up - down) / (2 * eps) == pytest.approx(slope.item(), rel=1e-5, abs=1e-7)


def test_a_rejected_tracker_update_leaves_the_stats_and_the_recording_as_they_were():
    """RegionTracker.update cleared the recording, counted the update and added the unit counts before the stats
    checked the labels: after a rejected batch the next good one mixed in its unit counts."""
    model, (x, y) = _model(), _data(n=10)
    stats = RegionStats(3)
    with torch.no_grad(), track(model, stats) as tracker:
        model(x)
        for bad in (y + 3, y.float(), y[:4]):
            with pytest.raises((ValueError, TypeError)):
                tracker.update(bad)
            assert stats.n_samples == 0 and stats.unit_samples == {} and stats.unit_active == {}
            assert tracker.n_updates == 0 and len(tracker.rec) == 10
        with pytest.raises(ValueError, match="contributions"):
            tracker.update(y, contributions=torch.ones(4, 3, 4))
        assert stats.n_samples == 0 and tracker.n_updates == 0 and len(tracker.rec) == 10
        tracker.update(y)  # the same batch, now accepted
    ref = evaluate(model, [(x, y)])
    assert stats.n_samples == 10 and tracker.n_updates == 1 and len(tracker.rec) == 0
    hand = (_hand_preacts(model, x)[0] > 0).double().mean(0)  # independent: the first layer's active share
    torch.testing.assert_close(stats.activation_frequencies()["1"], hand)
    assert torch.equal(stats.region_keys(), ref.region_keys()) and stats.accuracy == ref.accuracy


def test_empty_batches_in_evaluate_and_track_add_nothing():
    """evaluate on a loader with an empty batch failed in torch's reshape (predictions of 0 samples)."""
    model, (x, y) = _model(), _data(n=20)
    ref = evaluate(model, [(x[:10], y[:10]), (x[10:], y[10:])])
    for loader in ([(x[:10], y[:10]), (x[:0], y[:0]), (x[10:], y[10:])], [(x[:0], y[:0]), (x, y)]):
        s = evaluate(model, loader)
        assert s.n_samples == 20 and s.n_classes == 3 and _same_stats(s, ref)
    with pytest.raises(ValueError, match="no batches"):
        evaluate(model, [(x[:0], y[:0])])
    stats = RegionStats(3)
    with torch.no_grad(), track(model, stats) as tracker:
        model(x[:0])
        tracker.update(y[:0])
        assert stats.n_samples == 0 and stats.unit_samples == {} and not stats.tables
        model(x[:10])
        tracker.update(y[:10])
        model(x[10:])
        tracker.update(y[10:])
    assert _same_stats(stats, ref) and stats.unit_samples == ref.unit_samples


def _same_stats(a, b):
    """Same regions with the same true and predicted histograms (rows may be in another order)."""
    def by_key(s):
        return dict(zip(s.region_keys().tolist(), zip(s.class_histograms().tolist(),
                                                      s.class_histograms(which="pred").tolist())))
    return a.n_samples == b.n_samples and by_key(a) == by_key(b)


def test_parsimony_l1_term_is_the_positive_part_of_the_preactivations():
    # (documentation fix, behaviour pinned: for LeakyReLU units the term is relu(z), not |leaky(z)|)
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64)
    for act in (nn.ReLU(), nn.LeakyReLU(0.5)):
        model = nn.Sequential(nn.Linear(3, 7), act, nn.Linear(7, 2)).double()
        got = parsimony_penalty(model, x, l1=1.0, return_parts=True, max_samples=None)["l1"]
        z = x @ model[0].weight.T + model[0].bias  # independent: the pre-activations by hand
        torch.testing.assert_close(got, torch.relu(z).sum(1).mean())


def test_tqdm_is_a_core_dependency():
    """evaluate shows a tqdm bar by default for loaders of more than 20 batches, but tqdm was only in the optional
    extras: a plain install failed there with ModuleNotFoundError."""
    import configparser
    import re
    from pathlib import Path

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    names = [re.split(r"[<>=!~ ;\[]", line.strip())[0] for line in cfg["options"]["install_requires"].splitlines()]
    assert "tqdm" in names and "torch" in names


def test_parsimony_penalty_checks_its_options():
    """Before: ``gamma=nan`` gave a NaN loss and ``max_samples=0`` an IndexError."""
    model = mlp(3, [5], 2)
    x = torch.randn(4, 3)
    for kw, msg in (({"gamma": float("nan")}, "gamma must be a finite number > 0"),
                    ({"gamma": 0.0}, "gamma must be a finite number > 0"),
                    ({"l1": -1.0}, "l1 must be a finite number >= 0"),
                    ({"max_samples": 0}, "max_samples must be None or a positive int"),
                    ({"k": 0}, "k must be None or a positive int")):
        with pytest.raises(ValueError, match=msg):
            parsimony_penalty(model, x, **kw)
    with pytest.raises(ValueError, match="non-empty"):
        parsimony_penalty(model, x[:0])


def test_evaluate_keep_inputs_keeps_every_batchs_inputs():
    """Before: evaluate(..., keep_inputs=True) never passed the batches' inputs on: mean_inputs() raised and the
    binary cluster table had no x_ columns; keep_contributions=True failed with 'got multiple values'."""
    import pandas as pd

    model, (x, y) = _model(k=2), _data(n=40, k=2)
    before = _snapshot(model)
    stats = evaluate(model, _loader(x, y, bs=16), keep_inputs=True, progress=False)
    _same(before, _snapshot(model))
    # independent: samples grouped by their hand-computed pattern, mean input per group (pandas)
    pre = _hand_preacts(model, x)
    pat = ["".join("1" if v else "0" for v in torch.cat([p[i] > 0 for p in pre]).tolist()) for i in range(len(x))]
    df = pd.DataFrame(x.double().numpy()).assign(pattern=pat)
    hand = sorted((len(g), *(round(v, 5) for v in g.drop(columns="pattern").mean())) for _, g in df.groupby("pattern"))
    ours = sorted((int(n), *(round(v, 5) for v in m.tolist())) for n, m in zip(stats.sizes(), stats.mean_inputs()))
    assert ours == hand
    assert [c for c in stats.summary()["clusters"].columns if c.startswith("x_")] == ["x_0", "x_1", "x_2", "x_3"]
    # the other RegionStats options: keep_contributions goes with contributions=, unknown ones are named at once
    both = evaluate(model, _loader(x, y), contributions=True, keep_contributions=True, keep_inputs=True)
    assert both.keep_contributions and torch.equal(both.mean_inputs(), stats.mean_inputs())
    with pytest.raises(ValueError, match="keep_contributions is set by contributions="):
        evaluate(model, _loader(x, y), keep_contributions=True)
    with pytest.raises(TypeError, match=r"\['keep_input'\]"):
        evaluate(model, _loader(x, y), keep_input=True)
    with pytest.raises(ValueError, match=r"\['keep_inputs'\] only configure new RegionStats"):
        evaluate(model, _loader(x, y), stats=RegionStats(2), keep_inputs=True)
    _same(before, _snapshot(model))


def test_track_refuses_stats_whose_granularity_holds_keys_given_by_hand():
    """Before: a granularity first given to update() by name (affine-map keys, say) was filled with full-pattern keys
    by the tracker's later batches. Refused now, before the recording or the stats change."""
    model, (x, y) = _model(), _data(n=10)
    stats = RegionStats(3).update({"full": torch.arange(10), "maps": torch.zeros(10, dtype=torch.long)}, y, y)
    before = stats.state_dict()
    with torch.no_grad(), track(model, stats) as tracker:
        model(x + 1)
        model(x)
        with pytest.raises(ValueError, match=r"granularities \['maps'\] hold keys passed to update\(\)"):
            tracker.update(y)
        assert len(tracker.rec.passes) == 2 and tracker.n_updates == 0
    assert stats.n_samples == 10 and stats.state_dict().keys() == before.keys()
    assert stats.n_regions("maps") == 1 and stats.n_regions() == 10


def test_evaluate_max_batches_must_be_none_or_a_positive_int():
    """Before: max_batches=1.5 ran 2 batches, and 0 / -1 said 'the data loader yielded no batches' of a loader with
    four."""
    model, (x, y) = _model(), _data(n=40)
    before = _snapshot(model)
    for bad in (1.5, 0, -1, True):
        with pytest.raises(ValueError, match=f"max_batches must be None .* or a positive int, got {bad!r}"):
            evaluate(model, _loader(x, y, bs=10), max_batches=bad)
        _same(before, _snapshot(model))
    assert evaluate(model, _loader(x, y, bs=10), max_batches=2).n_samples == 20  # two batches of ten
    assert evaluate(model, _loader(x, y, bs=10), max_batches=None).n_samples == 40


def test_parsimony_penalty_reads_unit_inputs_before_inplace_updates_and_keeps_backward_hooks():
    """Before: an in-place residual update after a ReLU read its input (h += block(relu(h))) changed the values the
    penalty's distances were read from (min_distance off); and the user's backward hooks must still see the
    penalty's backward (a training loss), while the library's own analyses switch them off."""
    torch.manual_seed(6)
    model = InplaceResidualStream(5, 6, 2).double()
    run = model.forward
    x = torch.randn(4, 5, dtype=torch.float64)
    want = torch.full((4,), float("inf"), dtype=torch.float64)
    for k in range(2):  # exact distances of each layer's units: |z| / ||dz/dx||, torch.func on the model's own code
        def pre(v, k=k):
            log = []
            run(v[None], log)
            return log[k][0]

        for i in range(4):
            jac = torch.func.jacrev(pre)(x[i])
            want[i] = min(want[i], (pre(x[i]).abs() / jac.norm(dim=1)).min())
    fired = []
    handle = model.blocks[0].register_full_backward_hook(lambda *a: fired.append(1))
    try:
        parts = parsimony_penalty(model, x, gamma=0.5, max_samples=None, return_parts=True)
        torch.testing.assert_close(parts["min_distance"], want.detach())
        parts["total"].backward()
    finally:
        handle.remove()
    assert fired and parts["hinge"] > 0


def _hand_forward(model: nn.Sequential, x):
    """Hidden patterns (samples, all units) and logits of an MLP, by hand from its weights."""
    h, pats = x, []
    for m in model:
        if isinstance(m, nn.Linear):
            h = h @ m.weight.T + m.bias
        elif isinstance(m, nn.ReLU):
            pats.append(h > 0)
            h = torch.relu(h)
    return torch.cat(pats, 1), h


def _hand_regions(pats, y_true, y_pred):
    """region pattern -> (true class counts, predicted class counts), by dict counting."""
    out = {}
    for p, t, q in zip(pats.tolist(), y_true.tolist(), y_pred.tolist()):
        true, pred = out.setdefault(tuple(p), ([0, 0, 0], [0, 0, 0]))
        true[t] += 1
        pred[q] += 1
    return sorted(out.values())


def _lib_regions(stats):
    return sorted(zip(stats.class_histograms().tolist(), stats.class_histograms(which="pred").tolist()))


def test_parsimony_penalty_k_keeps_the_k_largest_terms_per_sample_over_all_layers():
    """Before: k=... kept the k largest hinge terms of each layer separately (L·k terms per sample for L layers),
    not the k closest hyperplanes of the sample as documented."""
    model, (x, _) = _model(dtype=torch.float64), _data(n=10, dtype=torch.float64)
    gamma, k = 2.0, 3
    # independent: every unit's distance from hand pre-activations and torch.func Jacobians, top-k per sample
    pre_fn = lambda v: torch.cat(_hand_preacts(model, v[None]), 1)[0]  # noqa: E731
    pre = torch.cat(_hand_preacts(model, x), 1)
    jac = torch.func.vmap(torch.func.jacrev(pre_fn))(x)
    terms = torch.relu(1 - pre.abs() / jac.norm(dim=2) / gamma)
    ref = terms.topk(k, dim=1).values.sum(1).mean()
    per_layer = terms[:, :6].topk(k, 1).values.sum(1).mean() + terms[:, 6:].topk(k, 1).values.sum(1).mean()
    assert not torch.isclose(ref, per_layer)  # (the old value, per layer, differs here)
    got = parsimony_penalty(model, x, gamma=gamma, k=k, max_samples=None)
    torch.testing.assert_close(got, ref)
    params = list(model.parameters())[:4]
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(a, b)
    # k above the number of units: every term
    torch.testing.assert_close(parsimony_penalty(model, x, gamma=gamma, k=50, max_samples=None), terms.sum(1).mean())


def test_track_update_takes_the_regions_and_predictions_of_the_pass_on_inputs():
    """Before: update(y, inputs=xb) after model(xb) and model(xb + 0.5) counted the augmented copy's regions and
    predictions (the last pass), and with keep_inputs summed the batch's inputs into the copy's regions."""
    import pandas as pd

    model, (x, y) = _model(), _data(n=32)
    stats = RegionStats(3, keep_inputs=True)
    before = _snapshot(model)
    with torch.no_grad(), track(model, stats) as tracker:
        for xb, yb in _loader(x, y, bs=8):
            model(xb)  # the batch's pass
            model(xb + 0.5)  # e.g. a consistency term on an augmented copy
            tracker.update(yb, inputs=xb)
    _same(before, _snapshot(model))
    with torch.no_grad():
        pats, logits = _hand_forward(model, x)
        pats_aug, logits_aug = _hand_forward(model, x + 0.5)
    want = _hand_regions(pats, y, logits.argmax(1))
    assert want != _hand_regions(pats_aug, y, logits_aug.argmax(1))  # (the copy's stats differ)
    assert _lib_regions(stats) == want
    # mean input per region (pandas groupby on the hand patterns)
    df = pd.DataFrame(x.double().numpy()).assign(p=["".join(map(str, r)) for r in pats.int().tolist()])
    hand = sorted((len(g), *(round(v, 5) for v in g.drop(columns="p").mean())) for _, g in df.groupby("p"))
    ours = sorted((int(n), *(round(v, 5) for v in m.tolist())) for n, m in zip(stats.sizes(), stats.mean_inputs()))
    assert ours == hand


class _DictOut(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return {"logits": self.net(x)}


def test_labels_of_the_wrong_shape_and_a_batch_run_in_chunks():
    """Before: one-hot (B, C) labels were read as B·C labels ("the model ran on inputs that do not match the
    labels"), and a batch run in two chunks (or two batches before one update) failed with "y_pred has 4 entries for
    8 keys" although no y_pred was passed: only the last pass's output was taken as predictions."""
    model, (x, y) = _model(), _data(n=16)
    one_hot = torch.nn.functional.one_hot(y, 3)
    with pytest.raises(ValueError, match=r"labels must hold one class index per sample.*got shape \(16, 3\)"):
        evaluate(model, [(x, one_hot)])
    with torch.no_grad():
        pats, logits = _hand_forward(model, x)
    want = _hand_regions(pats, y, logits.argmax(1))
    stats = RegionStats(3)
    with torch.no_grad(), track(model, stats) as tracker:
        model(x[:8])
        with pytest.raises(ValueError, match=r"y_true must hold one class index per sample.*\(8, 3\)"):
            tracker.update(one_hot[:8])
        with pytest.raises(ValueError, match=r"y_pred must hold one class index"):
            tracker.update(y[:8], y_pred=one_hot[:8])
        assert len(tracker.rec) == 8 and stats.n_samples == 0
        tracker.update(y[:8, None])  # (B, 1) labels are fine
        torch.cat([model(c) for c in x[8:].split(4)])  # a batch run in two chunks
        tracker.update(y[8:])
    assert _lib_regions(stats) == want
    stats = RegionStats(3)
    with torch.no_grad(), track(model, stats) as tracker:
        model(x[:8])
        model(x[8:])  # two batches before one update
        tracker.update(y)
    assert _lib_regions(stats) == want
    # outputs that are not tensors: say so, and how to go on
    wrapped = _DictOut(model)
    stats = RegionStats(3)
    with torch.no_grad(), track(wrapped, stats) as tracker:
        outs = [wrapped(c)["logits"] for c in x.split(8)]
        with pytest.raises(ValueError, match=r"the model ran 2 times since the last update .* pass y_pred="):
            tracker.update(y)
        tracker.update(y, y_pred=torch.cat(outs).argmax(1))
    assert _lib_regions(stats) == want


def test_evaluate_max_batches_fetches_no_extra_batch():
    """Before: evaluate(max_batches=n) fetched batch n + 1 and dropped it: two calls on one iterator skipped a batch
    between them."""
    model, (x, y) = _model(), _data(n=48)
    fetched = []

    def stream():
        for i in range(6):
            fetched.append(i)
            yield x[8 * i:8 * i + 8], y[8 * i:8 * i + 8]

    it = stream()
    evaluate(model, it, max_batches=2, progress=False)
    second = evaluate(model, it, max_batches=2, progress=True)
    assert fetched == [0, 1, 2, 3]
    with torch.no_grad():
        pats, logits = _hand_forward(model, x[16:32])
    assert _lib_regions(second) == _hand_regions(pats, y[16:32], logits.argmax(1))


def test_evaluate_refuses_options_that_stats_would_ignore():
    """Before: evaluate(stats=st, layers=/granularities=/n_classes=) ignored them silently: the user asked for one
    layer's regions and got every layer's."""
    model, (x, y) = _model(), _data(n=20)
    before = _snapshot(model)
    for kw, msg in (({"layers": "1"}, r"\['layers'\] only configure new RegionStats"),
                    ({"granularities": {"first": "1"}}, r"\['granularities'\] only configure new RegionStats"),
                    ({"n_classes": 7}, r"n_classes=7 disagrees with the stats you pass \(n_classes=3\)")):
        stats = RegionStats(3)
        with pytest.raises(ValueError, match=msg):
            evaluate(model, [(x, y)], stats=stats, **kw)
        assert stats.n_samples == 0
    _same(before, _snapshot(model))
    stats = evaluate(model, [(x, y)], stats=RegionStats(3), n_classes=3)  # the stats' own n_classes: fine
    with torch.no_grad():
        pats, logits = _hand_forward(model, x)
    assert _lib_regions(stats) == _hand_regions(pats, y, logits.argmax(1))
    # without stats=, layers= is used: the first layer's regions (hand patterns of its 6 units)
    first = evaluate(model, [(x, y)], layers="1")
    assert first.n_regions() == len({tuple(p) for p in pats[:, :6].tolist()}) < len({tuple(p) for p in pats.tolist()})


def test_parsimony_penalty_and_evaluate_refuse_non_finite_inputs():
    """Before: a NaN input gave a NaN penalty (and NaN in every gradient after backward), and evaluate counted the NaN
    sample in the region of an all-inactive pattern."""
    model, (x, y) = _model(dtype=torch.float64), _data(n=8, dtype=torch.float64)
    bad = x.clone()
    bad[5, 1] = float("nan")
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"^x holds 1 non-finite value\(s\) \(nan or inf\)"):
        parsimony_penalty(model, bad, max_samples=None)
    with pytest.raises(ValueError, match=r"^x\[:6\] holds 1 non-finite value"):
        parsimony_penalty(model, bad, max_samples=6)
    _same(before, _snapshot(model))
    # samples beyond max_samples are not used: no error, the value of the first ones (hand reference)
    torch.testing.assert_close(parsimony_penalty(model, bad, gamma=0.5, max_samples=4),
                               _reference_penalty(model, x[:4], 0.5, 0.0))
    inf = x.clone()
    inf[6, 0] = float("inf")
    stats = RegionStats(3)
    with pytest.raises(ValueError, match=r"the input of batch 1 holds 1 non-finite value"):
        evaluate(model, [(x[:4], y[:4]), (inf[4:], y[4:])], stats=stats)
    inf[5, 2] = float("-inf")
    with pytest.raises(ValueError, match=r"the input of batch 1 holds 2 non-finite value"):
        evaluate(model, [(x[:4], y[:4]), (inf[4:], y[4:])])
    _same(before, _snapshot(model))
    assert stats.n_samples == 4  # the first batch only


def test_dense_outputs_are_refused_not_read_as_classes():
    """Before: a segmentation output (B, 2, 4, 4) was flattened into 32 "classes" (n_classes=32, accuracy 0)
    without an error, in evaluate and in track's predictions; (B, K, 1, 1) and (B, 1, K) logits stay fine."""
    from relu_regions.training import predictions

    torch.manual_seed(0)
    x = torch.randn(12, 1, 4, 4)
    y = torch.arange(12) % 2
    seg = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 1))
    before = _snapshot(seg)
    with pytest.raises(ValueError, match=r"model's output has shape \(B, 2, 4, 4\).*need a \(B, K\) output"):
        evaluate(seg, _loader(x, y), progress=False)
    _same(before, _snapshot(seg))
    with pytest.raises(ValueError, match=r"logits_at='2' has shape \(B, 2, 4, 4\)"):
        evaluate(nn.Sequential(*seg, nn.Flatten()), _loader(x, y), logits_at="2", progress=False)
    with pytest.raises(ValueError, match=r"flatten the output in a wrapper"):
        predictions(torch.zeros(3, 2, 4, 4))
    stats = RegionStats(2)
    with torch.no_grad(), track(seg, stats) as tracker:
        seg(x)
        with pytest.raises(ValueError, match=r"\(B, 2, 4, 4\)"):
            tracker.update(y)
    fcn = nn.Sequential(*seg, nn.AdaptiveAvgPool2d(1))  # (B, 2, 1, 1): a fully convolutional classifier
    st = evaluate(fcn, _loader(x, y), progress=False)
    with torch.no_grad():
        pred = fcn(x)[:, :, 0, 0].argmax(1)
    assert st.n_classes == 2 and st.accuracy == pytest.approx(float((pred == y).double().mean()))
    assert predictions(torch.tensor([[[0.0, 2.0, 1.0]]])).tolist() == [1]  # (B, 1, K)


def test_the_last_pass_of_the_batch_size_labels_dtype_dict_outputs_and_contributions_with_stats():
    """Before: (1) a step that fed the model a new tensor and then ran it on a part of it (8 then 3 samples) was
    refused ("11 samples were recorded"), though the docs take the last pass of the batch's size; (2) float 0./1.
    labels failed only when the stats added the batches up, naming `y_true`; (3) evaluate on a dict output with
    n_classes= or stats= said "pass y_pred=", which it has not; (4) evaluate(stats=..., contributions=...) computed
    maps it dropped, or kept none the stats asked for, silently."""
    torch.manual_seed(0)
    net = mlp(4, [6], 3).eval()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    stats = RegionStats(3)
    with track(net, stats) as tr:
        fed = x * 1.0  # a new tensor: not the batch's own
        net(fed)
        net(fed[:3])
        tr.update(y, inputs=x)
    with torch.no_grad():
        hidden = (net[0](x) > 0)
    want = len({tuple(h.tolist()) for h in hidden})  # the 8-sample pass's regions, counted by hand
    assert stats.n_samples == 8 and stats.n_regions() == want
    assert stats.n_correct == int((net(x).argmax(1) == y).sum())
    with pytest.raises(TypeError, match=r"labels must hold class indices.*float32.*\.long\(\)"):
        evaluate(net, [(x, y.float())])

    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, v):
            return {"logits": self.net(v)}

    for kw in ({"n_classes": 3}, {"stats": RegionStats(3)}):
        with pytest.raises(ValueError, match="no model output was captured.*logits_at="):
            evaluate(DictOut(), [(x, y)], **kw)
    for kw in ({"stats": RegionStats(3), "contributions": True},
               {"stats": RegionStats(3, keep_contributions=True)}):
        with pytest.raises(ValueError, match="disagrees with the stats you pass"):
            evaluate(net, [(x, y)], **kw)


class _BatchCentred(nn.Module):
    """A forward that mixes the samples of a batch (a hand-written, unscaled batch centring before the ReLU)."""

    def __init__(self):
        super().__init__()
        self.l, self.o = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = self.l(x)
        return self.o(torch.relu(h - h.mean(0, keepdim=True)))


def test_forwards_that_mix_the_batch_are_refused_by_every_distance_route():
    """Per-sample distances are not defined for such a forward, and the replicas the routes run ([x, 0, e_1, ...],
    D copies of x with tangents) mix other rows in: parsimony_penalty, boundary_distances, preactivation_maps and
    geometry.boundary_distance returned numbers unlike the per-sample ones (boundary_distances [0.218, 0.687, ...]
    against [0.215, 0.784, ...] from jacrev of one sample's pre-activation, the rest of the batch held fixed), while
    affine_map refused the model. Now they all refuse; a model whose
    inputs carry a large offset (rounding ~1e4·eps in every unit) is not refused and its distances are right."""
    import relu_regions as rr

    torch.manual_seed(0)
    m, x = _BatchCentred(), torch.randn(6, 4)
    with pytest.raises(RuntimeError, match="not piecewise linear"):
        rr.affine_map(m, x)
    with pytest.raises(RuntimeError, match="mixes the samples of a batch"):
        parsimony_penalty(m, x, max_samples=None)
    for call in (lambda: boundary_distances(m, x), lambda: rr.preactivation_maps(m, x, method="forward"),
                 lambda: rr.preactivation_maps(m, x, method="reverse", reduce=2),
                 lambda: rr.boundary_distance(m, x), lambda: rr.boundary_distance(m, x, route="reverse")):
        with pytest.raises(RuntimeError, match="pre-activation check failed at layer 'relu'.*mixes the samples"):
            call()

    # clamp units after the mixing (Hardtanh): the forward route checked only ReLU-like units and gave numbers
    m.act = nn.Hardtanh(-0.3, 0.4)
    m.forward = lambda v: m.o(m.act(m.l(v) - m.l(v).mean(0, keepdim=True)))
    for call in (lambda: rr.boundary_distance(m, x), lambda: rr.boundary_distance(m, x, route="forward"),
                 lambda: rr.geometry.region_inequalities(m, x)):
        with pytest.raises(RuntimeError, match="pre-activation check failed at layer 'act'"):
            call()

    # no false alarm: inputs around 1e4, removed in the forward (float32 rounding ~1e4·eps in every unit)
    class Offset(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp(4, [16, 16], 3)

        def forward(self, v):
            return self.net(v - 1e4)

    net, xo = Offset(), 1e4 + torch.randn(32, 4)
    d = boundary_distances(net, xo)
    d64 = boundary_distances(copy.deepcopy(net).double(), xo.double())
    assert torch.allclose(d.double(), d64, rtol=1e-2)
    for route in ("forward", "reverse"):
        assert torch.allclose(rr.boundary_distance(net, xo, route=route).distance.double(), d64, rtol=1e-2)
    assert parsimony_penalty(net, xo, max_samples=None).isfinite()


def test_the_readme_without_lightning_block_runs_as_written():
    """README's "Without Lightning" snippet, executed with a model and a loader bound to its names: evaluate and the
    hand-written track loop count the same regions, and the penalty term is a differentiable scalar."""
    import re
    from pathlib import Path

    import torch.nn.functional as F

    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"## Without Lightning\n\n```python\n(.*?)```", text, re.S).group(1)
    torch.manual_seed(0)
    model = mlp(4, [8, 8], 10).eval()
    data = [(torch.randn(16, 4), torch.randint(0, 10, (16,))) for _ in range(3)]
    scope = {"model": model, "val_loader": data, "F": F, "torch": torch, "print": lambda *a: None}
    exec(compile(block, "README.md", "exec"), scope)
    one = evaluate(model, data)
    assert scope["stats"].n_regions() == one.n_regions() and scope["stats"].n_samples == one.n_samples == 48
    assert scope["loss"].dim() == 0 and scope["loss"].requires_grad
