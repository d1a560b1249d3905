import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

import relu_regions as rr  # noqa: E402
from relu_regions import geometry as G  # noqa: E402
from relu_regions import plots  # noqa: E402
from relu_regions.models import SmallCNN, mlp  # noqa: E402
from relu_regions.regions import RegionStats  # noqa: E402


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    model = mlp(4, [6, 3], 2)
    x = torch.randn(120, 4)
    y = (x[:, 0] > 0).long()
    amap = rr.affine_map(model, x)
    s = RegionStats(2, keep_inputs=True, keep_contributions=True)
    s.update(amap.region_ids, y, amap.output.argmax(1), inputs=x, contributions=amap.A * x[:, None], weights=amap.A)
    return model, x, s


def test_static_plots(fitted):
    import matplotlib.pyplot as plt

    model, x, s = fitted
    f1 = plots.region_sizes(s, top=5)
    heights = sum(p.get_height() for p in f1.axes[0].patches)
    assert heights == pytest.approx(float(s.sizes().sort(descending=True).values[:5].sum()))
    f2 = plots.importance_heatmap(s, cls=1, feature_names=list("abcd"))
    assert f2.axes[0].images[0].get_array().shape == (min(20, s.n_regions()), 4)
    d = G.boundary_distance(model, x).distance
    f3 = plots.validity({"mlp": d})
    ydata = f3.axes[0].lines[0].get_ydata()
    assert ydata[0] == 1.0 and ydata[-1] <= 1.0 / len(d) + 1e-12
    f4 = plots.cluster_importance(s, feature_names=list("abcd"), top=2)
    assert len(f4.axes[0].patches) == 2 * 4
    plt.close("all")


def test_static_plots_refuse_a_class_they_do_not_have(fitted):
    """Before: ``importance_heatmap(cls=5)`` of a 2-class model drew class 1 under the title "class 5"."""
    import matplotlib.pyplot as plt

    _, _, s = fitted
    plt.close("all")
    for cls in (2, 5, -1, 1.0):
        with pytest.raises(ValueError, match=r"cls must be a class index in \[0, 2\)"):
            plots.importance_heatmap(s, cls=cls)
    with pytest.raises(ValueError, match="class_names has 3 names for 2 classes"):
        plots.region_sizes(s, class_names=["a", "b", "c"])
    assert not plt.get_fignums()  # refused before a figure was made
    plt.close("all")


def test_sankey_mlp_and_cnn(fitted):
    model, x, _ = fitted
    flows = plots.pathway_flows(model, x[:1], feature_names=list("abcd"))
    assert flows["nodes"][-1].startswith("class")
    assert all(v > 0 for v in flows["value"])
    fig = plots.sankey(model, x[:1])
    assert fig.data[0].type == "sankey"
    cnn = SmallCNN()
    fl = plots.pathway_flows(cnn, torch.rand(1, 1, 8, 8), top=4)
    assert any(n.startswith("channel") for n in fl["nodes"])
    with pytest.raises(ValueError, match="one sample"):
        plots.pathway_flows(model, x[:2])


def test_int_options_are_checked(fitted):
    """Before: ``region_sizes(top=-1)`` drew every region but the last, ``top=0`` an empty plot, and
    ``cluster_importance(output=k)`` past the last output failed with numpy's bare IndexError after making a figure;
    ``pathway_flows(target=k)`` named any k as the class."""
    import matplotlib.pyplot as plt
    import numpy as np

    model, x, s = fitted
    plt.close("all")
    for top in (0, -1, 2.5, True, "3"):
        for draw in (plots.region_sizes, plots.importance_heatmap, plots.cluster_importance):
            with pytest.raises(ValueError, match="top must be a positive int"):
                draw(s, top=top)
        with pytest.raises(ValueError, match="top must be a positive int"):
            plots.pathway_flows(model, x[:1], top=top)
    for output in (2, -3, 1.0, None):
        with pytest.raises(ValueError, match=r"output must be an output index in \[-2, 2\)"):
            plots.cluster_importance(s, output=output)
    for target in (2, -1, 0.0):
        with pytest.raises(ValueError, match=r"target must be a class index in \[0, 2\) or None"):
            plots.pathway_flows(model, x[:1], target=target)
    assert not plt.get_fignums()  # refused before a figure was made
    # valid values still draw, numpy ints included; the bars of output -1 are the largest region's mean weights of
    # the last output, recomputed from the affine maps
    amap = rr.affine_map(model, x)
    ids, counts = torch.unique(amap.region_ids, return_counts=True)
    assert (counts == counts.max()).sum() == 1
    biggest = amap.region_ids == ids[counts.argmax()]
    fig = plots.cluster_importance(s, top=np.int64(1), output=-1)
    heights = [p.get_height() for p in fig.axes[0].patches]
    np.testing.assert_allclose(heights, amap.A[biggest, -1].mean(0).detach().numpy(), rtol=1e-5, atol=1e-7)
    assert plots.pathway_flows(model, x[:1], target=torch.tensor(1))["nodes"][-1] == "class 1"
    plt.close("all")


def _flows_by_unit(flows):
    """{unit node: (unit→class value, {input node: input→unit value})} of pathway_flows' links."""
    nodes, last = flows["nodes"], len(flows["nodes"]) - 1
    out = {}
    for s, t, v in zip(flows["source"], flows["target"], flows["value"]):
        if t == last:
            out.setdefault(nodes[s], [0.0, {}])[0] = v
    for s, t, v in zip(flows["source"], flows["target"], flows["value"]):
        if t != last:
            out[nodes[t]][1][nodes[s]] = v
    return out


@pytest.mark.parametrize("act", ["relu6", "hardtanh", "leaky", "prelu", "pool_first"])
def test_pathway_flows_use_the_units_own_activation(act):
    """Before: every first-layer kind was read as a ReLU (``clamp(z, min=0)``, active iff z > 0): a ReLU6 channel
    saturated at 6 counted its pre-activation z, a Hardtanh unit at its lower bound counted 0, a max-pool first layer
    counted the ReLU of its inputs. Checked against the activation read with a forward hook and its Jacobian by
    autograd through the first layers."""
    import torch.nn as nn

    torch.manual_seed(1)
    unit = {"relu6": nn.ReLU6(), "hardtanh": nn.Hardtanh(-1.0, 2.0), "leaky": nn.LeakyReLU(0.2),
            "prelu": nn.PReLU(3, init=0.3), "pool_first": nn.MaxPool2d(2)}[act]
    head = [nn.ReLU()] if act == "pool_first" else []
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), unit, *head, nn.Flatten(),
                          nn.Linear(3 * (16 if act == "pool_first" else 64), 4)).eval()
    x = 10 * torch.randn(1, 2, 8, 8)
    seen = {}
    h = unit.register_forward_hook(lambda m, i, o: seen.__setitem__("a", o.detach().clone()))
    with torch.no_grad():
        model(x)
    h.remove()
    a = seen["a"][0]  # (C, H', W')
    if act in ("relu6", "hardtanh"):  # the cases the old reading got wrong: saturated units
        assert bool((a == unit.max_val).any()) and (act == "relu6" or bool((a == -1).any()))
    jac = torch.autograd.functional.jacobian(lambda t: model[:2](t), x)[0].reshape(*a.shape, -1)
    flows = plots.pathway_flows(model, x, top=3)
    got = _flows_by_unit(flows)
    expected = a.abs().flatten(1).sum(1)
    assert list(got) == [f"channel {int(k)}" for k in expected.argsort(descending=True)[:3]]
    link = (jac * x.reshape(-1)).abs().flatten(1, 2).sum(1)  # (C, inputs): |∂a/∂x_i · x_i| summed over positions
    for name, (v, ins) in got.items():
        k = int(name.split()[1])
        assert v == pytest.approx(float(expected[k]), rel=1e-5)
        for feat, w in ins.items():
            assert w == pytest.approx(float(link[k, int(feat[1:])]), rel=1e-4, abs=1e-6)
    assert model.training is False and all(not m._forward_hooks for m in model.modules())


def test_pathway_flows_name_a_single_logits_decision():
    # one output is a binary logit: class 1 where it is > 0 (before: argmax over one column, always "class 0")
    import torch.nn as nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).eval()
    x = torch.randn(64, 3)
    with torch.no_grad():
        logit = m(x)[:, 0]
    pos, neg = int((logit > 0).nonzero()[0]), int((logit <= 0).nonzero()[0])
    for i, want in ((pos, 1), (neg, 0)):
        fl = plots.pathway_flows(m, x[i:i + 1])
        assert fl["class"] == want and fl["nodes"][-1] == f"class {want}"
    assert plots.pathway_flows(m, x[neg:neg + 1], target=1)["nodes"][-1] == "class 1"
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        plots.pathway_flows(m, x[:1], target=2)


def test_pathway_flows_refuse_what_they_cannot_read():
    """Before: an affine model died in ``next(iter({}))`` (StopIteration); a functional prelu was read as a ReLU."""
    import torch.nn as nn
    import torch.nn.functional as F

    class FunctionalPReLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.w, self.out = nn.Linear(3, 4), nn.Parameter(torch.full((1,), 0.25)), nn.Linear(4, 2)

        def forward(self, x):
            return self.out(F.prelu(self.lin(x), self.w))

    with pytest.raises(NotImplementedError, match="functional prelu.*use nn.PReLU"):
        plots.pathway_flows(FunctionalPReLU(), torch.randn(1, 3))
    with pytest.raises(ValueError, match="needs a piecewise-linear unit"):
        plots.pathway_flows(nn.Linear(3, 2), torch.randn(1, 3))
