"""Interventions, ACE, unit clusters and lesions: analytic effects and exact model restoration."""

from __future__ import annotations

import copy

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

from relu_regions import causal  # noqa: E402
from relu_regions.models import mlp  # noqa: E402


def _hand_net() -> nn.Sequential:
    # h0 = relu(x0 + x1), h1 = relu(x0 − 0.5), h2 = relu(x2); body y = 2 h0 − h1 (the skip adds 3 x2)
    lin1 = nn.Linear(3, 3)
    lin2 = nn.Linear(3, 1)
    with torch.no_grad():
        lin1.weight.copy_(torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
        lin1.bias.copy_(torch.tensor([0.0, -0.5, 0.0]))
        lin2.weight.copy_(torch.tensor([[2.0, -1.0, 0.0]]))
        lin2.bias.zero_()
    return nn.Sequential(lin1, nn.ReLU(), lin2).double()


class _Skip(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _hand_net()

    def forward(self, x):
        return self.body(x) + 3 * x[:, 2:3]


def _data() -> torch.Tensor:
    # x1 ∈ {−1, +1} balanced, x2 ∈ {0, 1} balanced, x0 arbitrary (overwritten by the intervention)
    g = torch.Generator().manual_seed(0)
    x1 = torch.tensor([-1.0, 1.0]).repeat(20)
    x2 = torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(10)
    x0 = torch.randn(40, generator=g)
    return torch.stack([x0, x1, x2], 1).double()


def test_ace_linear_model_exact():
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    data = torch.randn(100, 5, dtype=torch.float64)
    alphas = torch.linspace(-2, 2, 5, dtype=torch.float64)
    res = causal.ace(model, data, "input", 2, alphas, n_samples=30)
    expected = (alphas - alphas.mean())[:, None] * model.weight[:, 2].detach()[None]
    np.testing.assert_allclose(res.effect["output"].numpy(), expected.numpy(), atol=1e-12)
    assert res.n_samples == 30


def test_ace_hand_relu_net_hidden_and_output():
    model = _Skip()
    data = _data()
    alphas = torch.tensor([-2.0, -0.5, 0.0, 0.7, 2.0], dtype=torch.float64)
    res = causal.ace(model, data, "input", 0, alphas, observe=["body.1"], n_samples=None)
    # E over balanced x1 ∈ {−1, 1}: E[relu(α + x1)] = (relu(α − 1) + relu(α + 1)) / 2
    e_h0 = (torch.relu(alphas - 1) + torch.relu(alphas + 1)) / 2
    e_h1 = torch.relu(alphas - 0.5)
    e_h2 = torch.full_like(alphas, 0.5)  # relu(x2), unaffected
    exp_hidden = torch.stack([e_h0, e_h1, e_h2], 1)
    np.testing.assert_allclose(res.expectation["body.1"].numpy(), exp_hidden.numpy(), atol=1e-12)
    np.testing.assert_allclose(res.effect["body.1"].numpy(), (exp_hidden - exp_hidden.mean(0)).numpy(), atol=1e-12)
    e_y = 2 * e_h0 - e_h1 + 3 * 0.5
    np.testing.assert_allclose(res.effect["output"][:, 0].numpy(), (e_y - e_y.mean()).numpy(), atol=1e-12)


def test_intervention_on_hidden_unit():
    model = _Skip()
    data = _data()
    alphas = [0.0, 1.0, 3.0]
    res = causal.ace(model, data, "body.1", 0, alphas, n_samples=None)
    a = torch.tensor(alphas, dtype=torch.float64)
    np.testing.assert_allclose(res.effect["output"][:, 0].numpy(), (2 * (a - a.mean())).numpy(), atol=1e-12)
    assert res.heatmaps("output", (1,)).shape == (3, 1)


def test_unit_masks_and_bad_indices():
    # a bool mask selects its units (before: .long() turned it into units 0 and 1); negative and fractional
    # indices are refused (before: -1 silently meant the last unit, 2.7 unit 2)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    with causal.lesion(model, "1", torch.tensor([False, True, False, True])) as m:
        masked = m(x)
    h = model[1](model[0](x)).clone()
    h[:, [1, 3]] = 0
    torch.testing.assert_close(masked, model[2](h), rtol=0, atol=0)
    for bad, err, msg in (([-1], ValueError, "negative"), ([2.7], TypeError, "integer indices or a bool mask"),
                          (torch.ones(3, dtype=torch.bool), ValueError, "mask of 3 entries; site '1' has 4"),
                          (torch.zeros(4, dtype=torch.bool), ValueError, "selects no unit")):
        with pytest.raises(err, match=msg):
            with causal.lesion(model, "1", bad) as m:
                m(x)
        assert len(model[1]._forward_hooks) == 0


def test_bad_site_and_units():
    model = _Skip()
    with pytest.raises(ValueError, match="not a module path"):
        causal.ace(model, _data(), "body.9", 0, [0.0, 1.0])
    with pytest.raises(ValueError, match="out of range"):
        causal.ace(model, _data(), "input", 7, [0.0, 1.0])
    assert len(model.body._forward_hooks) == 0 and len(model._forward_pre_hooks) == 0
    # before: range()'s "arg 3 must not be zero", and scikit-learn's error for a k-means of 0 clusters
    for bad in (0, -2, 2.5):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            causal.collect(model, _data(), ["body"], batch_size=bad)
    assert len(model.body._forward_hooks) == 0 and len(model._forward_pre_hooks) == 0
    with pytest.raises(ValueError, match="n_clusters, a positive int; got 0"):
        causal.cluster_units(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), "kmeans", n_clusters=0)


def _snapshot(model: nn.Module):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = [(n, dict(m._forward_hooks), dict(m._forward_pre_hooks), vars(m).get("forward"))
             for n, m in model.named_modules()]
    flags = [(n, m.training) for n, m in model.named_modules()]
    grads = [(n, p.requires_grad) for n, p in model.named_parameters()]
    return state, hooks, flags, grads


def _assert_same(model: nn.Module, snap):
    state, hooks, flags, grads = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(now[k], state[k])
    assert [(n, dict(m._forward_hooks), dict(m._forward_pre_hooks), vars(m).get("forward"))
            for n, m in model.named_modules()] == hooks
    assert [(n, m.training) for n, m in model.named_modules()] == flags
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == grads


def test_lesion_restores_model_also_after_exception():
    torch.manual_seed(0)
    model = mlp(4, [8, 6], 3)
    model.train()
    model[0].weight.requires_grad_(False)
    user = model[1].register_forward_hook(lambda m, a, o: None)
    x = torch.randn(10, 4)
    snap = _snapshot(model)
    ref = model(x).detach()
    with causal.lesion(model, "1", [0, 1, 2]):
        lesioned = model(x)
        hidden = {}
        h = model[1].register_forward_hook(lambda m, a, o: hidden.setdefault("h", o))
        model(x)
        h.remove()
        assert (hidden["h"][:, :3] == 0).all()
    assert not torch.equal(lesioned, ref)
    _assert_same(model, snap)
    assert torch.equal(model(x), ref)
    with pytest.raises(RuntimeError, match="boom"):
        with causal.lesion(model, "3", [1]):
            raise RuntimeError("boom")
    _assert_same(model, snap)
    with pytest.raises(ValueError):
        causal.lesion_table(model, x, "3", {"a": [0]}, target=None, metric="accuracy")
    _assert_same(model, snap)
    causal.lesion_table(model, x, "3", {"a": [0]}, target=torch.zeros(10, dtype=torch.long))
    _assert_same(model, snap)
    user.remove()


def test_lesion_table_matches_manual_zeroing():
    torch.manual_seed(1)
    model = mlp(4, [8], 3).double()
    x = torch.randn(50, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (50,))
    table = causal.lesion_table(model, x, "1", {"first": [0, 1], "last": [7]}, target=y)
    # independent route: a copy of the model with the corresponding output-layer columns zeroed
    manual = mlp(4, [8], 3).double()
    manual.load_state_dict(model.state_dict())
    with torch.no_grad():
        manual[2].weight[:, [0, 1]] = 0
    acc = float((manual(x).argmax(1) == y).double().mean())
    assert table.loc[table.lesion == "first", "metric"].item() == pytest.approx(acc, abs=1e-12)
    assert table.loc[0, "lesion"] == "none"
    assert table.loc[0, "metric"] == pytest.approx(float((model(x).argmax(1) == y).double().mean()))


def test_cluster_units_recovers_planted_structure():
    rng = np.random.default_rng(0)
    signals = rng.normal(size=(3, 200))
    truth = np.repeat([0, 1, 2], 6)
    rows = []
    for g in truth:
        scale = rng.uniform(0.5, 3.0)
        s = scale * signals[g] + 0.15 * rng.normal(size=200)
        rows.append(np.exp(s) if rng.random() < 0.5 else s)  # monotone transforms: Spearman is unchanged
    rows.append(np.zeros(200))  # a dead unit
    p = np.array(rows)
    aff = causal.cluster_units(p, "affinity")
    km = causal.cluster_units(p, "kmeans", n_clusters=3)
    assert aff.labels[-1] == -1 and km.labels[-1] == -1
    assert adjusted_rand_score(truth, aff.labels[:-1]) == 1.0
    assert adjusted_rand_score(truth, km.labels[:-1]) == 1.0
    table = causal.cluster_importance(aff, np.r_[np.repeat([1.0, 5.0, 2.0], 6), 0.0])
    assert table.loc[0, "n_units"] == 6 and table.loc[0, "importance"] == pytest.approx(5.0)
    cross = causal.cluster_intersection(aff, km)
    assert (cross.values > 0).sum() == 4  # three matched clusters and the dead unit


def test_profiles_and_plots_on_small_decoder():
    torch.manual_seed(0)
    dec = mlp(3, [16], 16)
    data = torch.randn(64, 3)
    act = causal.activation_profiles(dec, data, "1")
    assert act.shape == (16, 64)
    prof = causal.ace_profiles(dec, data, "input", [0, 1], [-1.0, 0.0, 1.0], "1", n_samples=32)
    assert prof.shape == (16, 6)
    # with a progress bar over the units: the same profiles (one ace per unit, its effect rows as columns)
    shown = causal.ace_profiles(dec, data, "input", (u for u in [0, 1]), [-1.0, 0.0, 1.0], "1", n_samples=32,
                                progress=True)
    assert torch.equal(shown, prof)
    assert torch.equal(prof[:, 3:], causal.ace(dec, data, "input", 1, [-1.0, 0.0, 1.0], ["1"], 32).effect["1"].T)
    cl = causal.cluster_units(prof, "affinity")
    res = causal.ace(dec, data, "input", 0, [-1.0, 0.0, 1.0], n_samples=32)
    fig = res.plot("output", (4, 4))
    fig2 = causal.lesion_grid(dec, data[:3], "1", cl, image_shape=(4, 4))
    assert len(fig2.axes) == 3 * (1 + len(cl.groups()))
    import matplotlib.pyplot as plt

    plt.close(fig)
    plt.close(fig2)


def test_lesion_keeps_what_the_users_code_changes_inside_the_block():
    torch.manual_seed(0)
    model = mlp(4, [8, 6], 3).eval()
    x = torch.randn(10, 4)
    seen = []
    with causal.lesion(model, "1", [0, 1]):
        kept = model[3].register_forward_hook(lambda m, a, o: seen.append(o.clone()))
        model[2].weight.requires_grad_(False)
        model[4].train()
    assert len(model[1]._forward_hooks) == 0  # the lesion's own hook is gone
    assert len(model[3]._forward_hooks) == 1 and not model[2].weight.requires_grad and model[4].training
    with torch.no_grad():
        model(x)
    assert len(seen) == 1 and (seen[0] >= 0).all()
    kept.remove()


def test_collect_copies_outputs_and_refuses_ambiguous_layers():
    """Before: ``collect`` kept a view of each layer's output, which a later in-place ReLU rewrote (pre-activations
    came back clamped at 0, and ACEs on them were wrong); a module named ``output`` was merged with the model's
    output, one string of layers was read letter by letter (``"11"`` observed module ``"1"``), and a module that
    runs twice per forward gave 2N rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    x = torch.randn(6, 3)
    pre = causal.collect(model, x, ["0"])["0"]
    torch.testing.assert_close(pre, model[0](x).detach(), rtol=0, atol=0)
    assert bool((pre < 0).any())
    res = causal.ace(model, x, "input", 0, [0.0, 1.0], observe=["0"], n_samples=None)
    for i, a in enumerate((0.0, 1.0)):
        xa = x.clone()
        xa[:, 0] = a
        torch.testing.assert_close(res.expectation["0"][i], model[0](xa).detach().double().mean(0))

    deep = nn.Sequential(*[nn.Linear(3, 3) for _ in range(12)])
    one = causal.collect(deep, x, "11")
    assert set(one) == {"11", "output"}
    torch.testing.assert_close(one["11"], one["output"], rtol=0, atol=0)  # module 11 is the last

    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.output, self.act = nn.Linear(3, 3), nn.ReLU()

        def forward(self, x):
            return self.act(self.output(x)) + self.act(x)  # `act` runs twice

    with pytest.raises(ValueError, match="'output' is the key of the model's output"):
        causal.collect(Named(), x, ["output"])
    with pytest.raises(ValueError, match="module 'act' ran 2 times in one forward"):
        causal.collect(Named(), x, ["act"])
    with pytest.raises(ValueError, match="non-empty batch"):
        causal.collect(model, x[:0], ["0"])


def test_per_sample_values_lesion_metrics_and_unit_counts():
    """``value`` per sample is an (N, 1) / (N, units) tensor; a 1-D value is per unit (before: guessed from its
    length, so with N == units it was read per unit). ``lesion_table``'s metrics compare one label / target per
    sample (before: (N, 1) labels broadcast to an (N, N) comparison: accuracy 0.39 for a perfect classifier) and
    count the units a bool mask selects (before: the mask's length)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 3))
    x = torch.randn(2, 3)
    with causal.intervene(model, "1", [0, 1], torch.tensor([[10.0], [20.0]])) as m:
        out = m(x)
    torch.testing.assert_close(out, model[2](torch.tensor([[10.0, 10.0], [20.0, 20.0]])))
    with pytest.raises(ValueError, match="value holds 3 values for 2 unit"):
        with causal.intervene(model, "1", [0, 1], torch.tensor([1.0, 2.0, 3.0])) as m:
            m(torch.randn(3, 3))

    x = torch.randn(8, 3)
    with torch.no_grad():
        y = model(x).argmax(1)
    table = causal.lesion_table(model, x, "1", {"mask": torch.tensor([True, False]), "list": [0]},
                                target=y[:, None])
    assert table.metric[0] == 1.0 and table.units.tolist() == [0, 1, 1]
    reg = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    xd = x.double()
    with torch.no_grad():
        target = reg(xd)[:, 0] + 1.0  # every residual exactly 1 (an (N,) target for an (N, 1) output)
    assert causal.lesion_table(reg, xd, "1", {"a": [0]}, target=target, metric="mse").metric[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one label per sample"):
        causal.lesion_table(model, x, "1", {"a": [0]}, target=y[:4])


def test_ace_and_clustering_inputs_are_checked_first():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(6, 3)
    for unit, err in (([2], TypeError), (True, TypeError), (-1, ValueError)):
        with pytest.raises(err, match="unit"):
            causal.ace(model, x, "1", unit, [0.0, 1.0])
    assert causal.ace(model, x, "1", np.int64(2), [0.0, 1.0]).unit == 2
    with pytest.raises(ValueError, match="n_samples must be None or a positive int, got 2.5"):
        causal.ace(model, x, "1", 0, [0.0, 1.0], n_samples=2.5)
    profiles = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    profiles[2, 3] = float("nan")  # before: unit 2 was labelled -1, "dead"
    with pytest.raises(ValueError, match="1 non-finite value"):
        causal.cluster_units(profiles)
    clusters = causal.cluster_units(profiles.nan_to_num(), "kmeans", n_clusters=2)
    for scores in (np.arange(20.0), np.ones((5, 3)), np.ones(4)):  # before: accepted, or numpy's IndexError
        with pytest.raises(ValueError, match="one score per clustered unit"):
            causal.cluster_importance(clusters, scores)


def _undocumented(func) -> list[str]:
    """Parameters of ``func``'s signature missing from its numpy docstring's Parameters section."""
    import inspect

    doc = inspect.cleandoc(func.__doc__)
    section = doc.split("Parameters\n----------\n")[1].split("\n\n")[0]
    documented = {n.strip() for line in section.splitlines() if line and not line[0].isspace()
                  for n in line.split(" : ")[0].split(",")}
    return [p for p in inspect.signature(func).parameters if p not in documented]


def test_docstrings_document_every_parameter():
    """Before: the numpy docstrings left parameters out: ace (seed, batch_size, progress), cluster_units
    (n_clusters, preference, random_state), lesion_table (model, data, site, batch_size)."""
    for func in (causal.ace, causal.cluster_units, causal.lesion_table, causal.intervene):
        assert _undocumented(func) == [], func.__qualname__


def test_lesion_table_single_logit_accuracy_is_the_sign_of_the_logit():
    """Before: for a one-logit binary classifier ((N, 1) output) the accuracy took the argmax over one column,
    always class 0: the "accuracy" was the share of label 0 (0.3 here for a true 0.9) and changed_argmax was 0."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1)).double()
    x = torch.randn(30, 5, dtype=torch.float64)
    with torch.no_grad():
        logit = net(x)[:, 0]
        h = net[1](net[0](x)).clone()
        h[:, [4, 5, 6, 7]] = 0
        lesioned = net[2](h)[:, 0]  # independent route: the lesion by hand
    y = (logit > 0).long()
    y[:3] = 1 - y[:3]
    table = causal.lesion_table(net, x, "1", {"g": [4, 5, 6, 7]}, target=y)
    assert table.metric[0] == pytest.approx(27 / 30)
    assert table.metric[1] == pytest.approx(float(((lesioned > 0).long() == y).double().mean()))
    assert table.changed_argmax[1] == pytest.approx(float(((lesioned > 0) != (logit > 0)).double().mean()))
    assert table.changed_argmax[1] > 0
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\) \(a single output is read as a binary logit"):
        causal.lesion_table(net, x, "1", {"g": [0]}, target=y + 1)


def test_lesion_table_refuses_labels_it_cannot_compare():
    """Before: float labels (0.3 off, or probabilities), labels >= the number of outputs and negative labels gave an
    accuracy of 0.0 silently."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(30, 5)
    with torch.no_grad():
        pred = net(x).argmax(1)
    snap = _snapshot(net)
    for bad in (pred.float() + 0.3, torch.rand(30), pred.bool()):
        with pytest.raises(TypeError, match="needs target to hold class indices \\(an integer tensor\\)"):
            causal.lesion_table(net, x, "1", {"g": [0, 1]}, target=bad)
    for bad, got in ((pred + 3, "3..5"), (pred - 3, "-3..-1")):
        with pytest.raises(ValueError, match=rf"class indices in \[0, 3\) \(the model has 3 outputs\); got {got}"):
            causal.lesion_table(net, x, "1", {"g": [0, 1]}, target=bad)
    _assert_same(net, snap)
    assert causal.lesion_table(net, x, "1", {"g": [0, 1]}, target=pred.numpy()).metric[0] == 1.0


def test_lesion_table_mse_target_is_one_reference_per_sample():
    """Before: only the element count was compared, so a transposed (K, N) target was reshaped into (N, K) and gave
    a wrong MSE (0.081 for a true 0.01)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    x = torch.randn(30, 5, dtype=torch.float64)
    with torch.no_grad():
        ref = net(x) + 0.1
    with pytest.raises(ValueError, match=r"shape \(N=30, \.\.\.\) with 4 values per sample.*got \(4, 30\)"):
        causal.lesion_table(net, x, "1", {"g": [0]}, target=ref.T, metric="mse")
    # an autoencoder-style target of another per-sample shape (2 x 2 images for 4 outputs) still works
    table = causal.lesion_table(net, x, "1", {"g": [0]}, target=ref.reshape(30, 1, 2, 2), metric="mse")
    assert table.metric[0] == pytest.approx(0.01, abs=1e-12)


class _Reuse(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.act, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.act(self.l2(self.act(self.l1(x)))))  # `act` runs twice


def test_intervention_refuses_a_module_that_runs_twice_per_forward():
    """Before: intervene / ace / lesion / lesion_table on a reused nn.ReLU set the unit at both calls, so the ACE
    was that of a double intervention (-0.396 on output 1 where do() at either call gives -0.073 or -0.361)."""
    torch.manual_seed(0)
    model = _Reuse()
    x = torch.randn(20, 4)
    snap = _snapshot(model)
    msg = "module 'act' ran more than once in one forward"
    with pytest.raises(ValueError, match=msg):
        causal.ace(model, x, "act", 0, [0.0, 2.0])
    with pytest.raises(ValueError, match=msg):
        causal.lesion_table(model, x, "act", {"g": [0]}, target=torch.zeros(20, dtype=torch.long))
    with pytest.raises(ValueError, match=msg):
        with causal.intervene(model, "act", [0], 1.0) as m:
            m(x)
    _assert_same(model, snap)
    # the module called on its own (outside a forward of the model) is intervened on at each call
    with causal.intervene(model, "act", [0], 5.0):
        out = model.act(-torch.ones(3, 4))
        again = model.act(-torch.ones(3, 4))
    assert torch.equal(out, again) and (out[:, 0] == 5.0).all() and (out[:, 1:] == 0).all()
    _assert_same(model, snap)
    model(x)  # the model runs again after the refusal


class _Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.o = nn.Embedding(5, 3), nn.Linear(9, 2)

    def forward(self, x):
        return self.o(self.e(x).flatten(1))


def test_ace_at_an_integer_site_refuses_values_it_would_truncate():
    """Before: do(x_0 = 1.7) on token ids was do(x_0 = 1) (the cast truncated it) while ACEResult.alphas said 1.7;
    NaN / inf alphas made every effect NaN (the baseline is the mean over the grid)."""
    torch.manual_seed(0)
    model = _Tokens()
    x = torch.randint(0, 5, (12, 3))
    with pytest.raises(ValueError, match=r"alphas value 1\.7 cannot be set at site 'input', which holds "
                                         r"torch\.int64 values \(it would become 1\)"):
        causal.ace(model, x, "input", 0, [1.0, 1.7], n_samples=None)
    with pytest.raises(ValueError, match="value 300 cannot be set at site 'input'"):
        with causal.intervene(model, "input", [0], 300) as m:
            m(x.to(torch.uint8))
    res = causal.ace(model, x, "input", 0, [1.0, 3.0], n_samples=None)  # integral values are taken

    def by_hand(a):
        xa = x.clone()
        xa[:, 0] = a
        with torch.no_grad():
            return model(xa).double().mean(0)

    torch.testing.assert_close(res.expectation["output"], torch.stack([by_hand(1), by_hand(3)]))
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alphas holds 1 non-finite value"):
            causal.ace(net, torch.randn(10, 5), "input", 0, [0.0, 1.0, bad])


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.act, self.out = nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)

    def forward(self, x):
        h = self.act(self.lin(x))
        return self.out(h), h  # (logits, aux)


def test_tuple_output_models_are_read_through_their_first_element():
    """Before: collect / ace / lesion_table / activation_profiles on a model returning (logits, aux) failed with
    "'tuple' object has no attribute 'detach'"."""
    torch.manual_seed(0)
    model = _Pair().double()
    x = torch.randn(10, 4, dtype=torch.float64)
    with torch.no_grad():
        logits, hidden = model.out(model.act(model.lin(x))), model.act(model.lin(x))
    torch.testing.assert_close(causal.collect(model, x, ["act"])["output"], logits)
    torch.testing.assert_close(causal.activation_profiles(model, x, "act"), hidden.T)
    res = causal.ace(model, x, "act", 0, [0.0, 1.0], n_samples=None)
    w = model.out.weight[:, 0].detach()
    torch.testing.assert_close(res.effect["output"], torch.stack([-w / 2, w / 2]))  # linear after the site
    y = logits.argmax(1)
    assert causal.lesion_table(model, x, "act", {"g": [0]}, target=y).metric[0] == 1.0


def test_misleading_errors_name_the_argument():
    """Before: observe=["input"] said "site 'input' is not a module path ... choose 'input'"; a list of groups gave
    "'list' object has no attribute 'items'"; site="input" on model(input=x) gave "tuple index out of range"."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    x = torch.randn(8, 6)
    with pytest.raises(ValueError, match="observe holds 'input', which is not a module path.*not a layer to observe"):
        causal.ace(net, x, "1", 0, [0.0, 1.0], observe=["input"])
    with pytest.raises(TypeError, match=r"groups must be a mapping .* got list; .* dict\(enumerate\(groups\)\)"):
        causal.lesion_table(net, x, "1", [[0, 1], [2]], target=torch.zeros(8, dtype=torch.long))
    with causal.intervene(net, "input", [0], 2.0):
        by_keyword = net(input=x)
    xi = x.clone()
    xi[:, 0] = 2.0
    torch.testing.assert_close(by_keyword, net[2](net[1](net[0](xi))))
    assert len(net._forward_pre_hooks) == 0


def test_intervention_at_an_inplace_site_reaches_the_tensor_the_forward_reads():
    """Before: at an nn.ReLU(inplace=True) whose return value the forward does not use (self.act(h); fc(h)), do()
    set the units in a copy: every intervention, lesion and ACE had no effect (0 change, ACE 0). Checked against
    the forward with the units set by hand."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.act, self.fc = nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 2)

        def forward(self, v):
            h = self.lin(v)
            self.act(h)
            return self.fc(h)

    torch.manual_seed(0)
    m, x = Net().eval(), torch.randn(6, 4)
    with torch.no_grad():
        h = torch.relu(m.lin(x))
        h[:, [0, 2]] = 1.5
        want = m.fc(h)
        with causal.intervene(m, "act", [0, 2], 1.5):
            got = m(x)
    assert torch.allclose(got, want)
    xg = x.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="in-place module on a tensor that requires grad"):
        with causal.intervene(m, "act", [0], 1.0):
            m(xg)


class _Residual(nn.Module):
    """y = fc(relu(h) + skip(h)), h = lin(x): the skip path an nn.Identity that hands its input back."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(31)
        self.lin, self.skip, self.relu, self.fc = nn.Linear(3, 4), nn.Identity(), nn.ReLU(), nn.Linear(4, 2)

    def forward(self, x):
        h = self.lin(x)
        return self.fc(self.relu(h) + self.skip(h))


def test_interventions_at_modules_that_hand_their_input_back_leave_the_input_alone():
    """Before: do() at an nn.Identity / eval Dropout / 2-D Flatten wrote the value into the module's input (taken for
    an in-place ReLU), so a skip path saw it too (ACE off by up to 0.16), and lesion_table / ace at an input Dropout
    zeroed columns of the caller's data (later groups measured with earlier ones still zeroed). Checked against a
    hand-written hook that returns a new tensor and against edited weights."""
    m = _Residual().double().eval()
    x = torch.randn(50, 3, dtype=torch.float64)
    with torch.no_grad():
        h = m.lin(x)
        for unit, alpha in ((1, 2.5), (3, -1.0)):
            hs = h.clone()
            hs[:, unit] = alpha
            ref = m.fc(torch.relu(h) + hs)  # only the skip path's value is set
            with causal.intervene(m, "skip", [unit], alpha) as mm:
                assert torch.allclose(mm(x), ref, rtol=0, atol=1e-12)
    res = causal.ace(m, x, "skip", 1, [0.0, 2.0], n_samples=None)
    with torch.no_grad():
        outs = []
        for a in (0.0, 2.0):
            hs = h.clone()
            hs[:, 1] = a
            outs.append(m.fc(torch.relu(h) + hs).mean(0))
    expect = torch.stack(outs)
    assert torch.allclose(res.expectation["output"], expect, rtol=0, atol=1e-12)
    # an input Dropout (eval: hands x back): the caller's data is not changed, each group's row is its own
    net = nn.Sequential(nn.Dropout(0.2), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double().eval()
    data = torch.randn(40, 4, dtype=torch.float64)
    before = data.clone()
    y = net(data).argmax(1)
    table = causal.lesion_table(net, data, "0", {"a": [0], "b": [1, 2]}, target=y)
    assert torch.equal(data, before)
    for name, cols in (("a", [0]), ("b", [1, 2])):
        edited = copy.deepcopy(net)
        with torch.no_grad():
            edited[1].weight[:, cols] = 0
            want = (edited(data) - net(data)).abs().mean().item()
        got = float(table.set_index("lesion").loc[name, "mean_abs_output_change"])
        assert abs(got - want) < 1e-12, (name, got, want)
    causal.ace(net, data, "0", 2, [1.5, -0.5], n_samples=None)
    assert torch.equal(data, before)
    # a real in-place ReLU still gets the value written into the tensor the forward goes on with
    inplace = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).double().eval()
    with torch.no_grad():
        hh = inplace[0](x).clamp_min(0)
        hh[:, 2] = 0.75
        with causal.intervene(inplace, "1", [2], 0.75) as mm:
            assert torch.allclose(mm(x), inplace[2](hh), rtol=0, atol=1e-12)
