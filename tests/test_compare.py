"""The comparison harness: metrics as pure functions, the tidy table, Re3's stability by construction."""

from __future__ import annotations

import copy

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

matplotlib.use("Agg")
pytest.importorskip("captum")

from relu_regions.compare import (  # noqa: E402
    auc,
    compare,
    deletion_insertion,
    ndcg,
    plot_comparison,
    stability,
    superpixel_mask,
    to_markdown,
    top_bottom_test,
)
from relu_regions.models import SmallCNN, mlp  # noqa: E402


@pytest.fixture(scope="module")
def tabular():
    torch.manual_seed(0)
    m = mlp(6, [16, 16], 3).eval()
    x = torch.randn(12, 6)
    return m, x


def test_ndcg_and_auc_by_definition():
    rel = np.array([3.0, 2.0, 1.0, 0.0])
    assert ndcg(rel, rel, k=4) == pytest.approx(1.0)
    rev = ndcg(rel, -rel, k=4)  # ranking 0, 1, 2, 3 (by relevance) reversed
    dcg = 0 / np.log2(2) + 1 / np.log2(3) + 2 / np.log2(4) + 3 / np.log2(5)
    idcg = 3 / np.log2(2) + 2 / np.log2(3) + 1 / np.log2(4)
    assert rev == pytest.approx(dcg / idcg)
    fr = np.linspace(0, 1, 5)
    assert auc(fr, fr) == pytest.approx(0.5)


def test_stability_of_identical_and_changed_runs():
    a = torch.randn(5, 8)
    assert stability([a, a.clone(), a.clone()]) == (1.0, 0.0, 0)
    b = a.clone()
    b[torch.arange(5), (a.abs().argmax(1) + 1) % 8] += 100  # a new top-1 feature in every sample
    rho, cv, top1 = stability([a, b])
    assert rho < 1 and cv > 0 and top1 == 5


def test_deletion_insertion_endpoints(tabular):
    m, x = tabular
    attr = torch.randn_like(x)
    tgt = torch.zeros(len(x), dtype=torch.long)
    fr, dele, ins = deletion_insertion(m, x, attr, tgt, n_steps=6)
    with torch.no_grad():
        p_x = torch.softmax(m(x), 1)[:, 0].mean().item()
        p_0 = torch.softmax(m(torch.zeros_like(x)), 1)[:, 0].mean().item()
    assert fr[0] == 0 and fr[-1] == 1 and len(dele) == 7
    assert dele[0] == pytest.approx(p_x) and dele[-1] == pytest.approx(p_0)
    assert ins[0] == pytest.approx(p_0) and ins[-1] == pytest.approx(p_x)


def test_top_bottom_test_separates_true_importance():
    m = nn.Linear(6, 2, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[5.0, 4.0, 3.0, 0.01, 0.02, 0.03], [0.0] * 6]))
    x = torch.rand(20, 6) + 0.5
    good = m.weight[0].expand_as(x) * x
    t, p, top, bottom = top_bottom_test(m, x, good, torch.zeros(20, dtype=torch.long), k=2)
    assert t > 0 and p < 1e-6 and top > bottom


def test_compare_table_and_re3_stability(tabular, tmp_path):
    m, x = tabular
    state = copy.deepcopy(m.state_dict())
    res = compare(m, x, target=1, methods=["InputXGradient", "IntegratedGradients", "LRP", "KernelShap", "zennit"],
                  progress=False, n_seeds=2, shap_samples=30, infidelity_samples=3, ig_steps=8)
    t = res.table
    assert list(t["method"]) == ["Re3", "InputXGradient", "IntegratedGradients", "LRP", "KernelShap"]
    re3 = t.set_index("method").loc["Re3"]
    assert (re3["stab_spearman"], re3["stab_cv"], re3["top1_changes"]) == (1.0, 0.0, 0)  # by construction
    assert re3["time_vs_re3"] == 1.0
    ixg = t.set_index("method").loc["InputXGradient"]
    assert ixg["spearman"] == pytest.approx(1.0) and ixg["ndcg@k"] == pytest.approx(1.0)
    assert (t["time_per_sample_s"] > 0).all() and np.isfinite(t["infidelity"]).all()
    assert "zennit" in res.skipped and "not installed" in res.skipped["zennit"]
    md = res.to_markdown()
    assert md.startswith("| method |") and "| Re3 |" in md and "zennit skipped" in md
    path = tmp_path / "cmp.csv"
    res.to_csv(path)
    assert list(pd.read_csv(path)["method"]) == list(t["method"])
    fig = plot_comparison(res, str(tmp_path / "cmp.png"))
    assert fig is not None and (tmp_path / "cmp.png").exists()
    assert set(res.curves["curve"]) == {"deletion", "insertion"}
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    with pytest.raises(ValueError, match="unknown method"):
        compare(m, x, methods=["SHAPley"], progress=False)
    with pytest.raises(TypeError, match="unknown option"):
        compare(m, x, methods=[], progress=False, n_seedz=2)


def test_compare_cnn_with_flatten_runs_lrp_and_lime():
    torch.manual_seed(3)
    m = SmallCNN().eval()
    x = torch.rand(3, 1, 8, 8)
    res = compare(m, x, methods=["LRP", "Lime", "GradientShap"], progress=False, n_seeds=2, lime_samples=20,
                  superpixel=2, infidelity_samples=2, n_steps=4)
    t = res.table.set_index("method")
    assert "LRP" in t.index, res.skipped  # nn.Flatten handled
    # LRP-ε == Re3 on ReLU nets up to ε: the values agree (Pearson 1); the ranks may swap two importances tied in
    # Re3 (two pixels at 0.00053154 here, which ε separates by ~1e-8), so Spearman only to 1e-3
    assert t.loc["LRP", "pearson"] == pytest.approx(1.0, abs=1e-6)
    assert t.loc["LRP", "spearman"] == pytest.approx(1.0, abs=1e-3)
    assert not any(hasattr(mod, "rule") for mod in m.modules())


def test_deeplift_runs_only_where_captum_overrides_every_unit():
    # Captum's DeepLift overrides nn.ReLU modules only: with F.relu in forward it returned gradient × input under
    # the name DeepLift. Independent route: DeepLift's rescale rule (baseline 0) by hand.
    import torch.nn.functional as F

    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.l3 = seq[0], seq[2], seq[4]

        def forward(self, x):
            return self.l3(F.relu(self.l2(F.relu(self.l1(x)))))

    x = torch.randn(12, 4, dtype=torch.float64)
    t = seq(x).argmax(1)
    with torch.no_grad():  # rescale multipliers (relu(z) − relu(z0)) / (z − z0), chained through the weights
        z1, z10 = seq[0](x), seq[0](torch.zeros_like(x))
        z2, z20 = seq[2](torch.relu(z1)), seq[2](torch.relu(z10))
        g = seq[4].weight[t] * (torch.relu(z2) - torch.relu(z20)) / (z2 - z20)
        g = (g @ seq[2].weight) * (torch.relu(z1) - torch.relu(z10)) / (z1 - z10)
        by_hand = (g @ seq[0].weight) * x
    res = compare(seq, x, methods=["DeepLift"], progress=False, n_seeds=1, infidelity_samples=2)
    torch.testing.assert_close(res.attributions["DeepLift"].double(), by_hand, rtol=1e-9, atol=1e-12)
    res = compare(Functional().eval(), x, methods=["DeepLift"], progress=False, n_seeds=1, infidelity_samples=2)
    assert "DeepLift" not in res.attributions and "gradient × input" in res.skipped["DeepLift"]
    assert not any(mod._forward_hooks for mod in seq.modules())


def test_curves_of_a_single_logit_track_its_sigmoid():
    # one output is a binary logit: the curves follow sigmoid(logit) (before: a softmax over one column, 1 for every
    # input, so every method's deletion and insertion AUC read 1.0)
    from relu_regions.compare import deletion_insertion

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1)).double().eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    attr = torch.randn(4, 6, dtype=torch.float64)
    tgt = torch.zeros(4, dtype=torch.long)
    fr, dele, ins = deletion_insertion(m, x, attr, tgt, 3, output="probability")
    # by hand: delete the k most important features (set to the baseline 0), track sigmoid of the logit
    order = attr.argsort(1, descending=True)
    for j, f in enumerate(fr):
        k = int(round(float(f) * 6))
        z = x.clone()
        for b in range(4):
            z[b, order[b, :k]] = 0
        with torch.no_grad():
            want = torch.sigmoid(m(z)[:, 0])
        assert dele[j] == pytest.approx(float(want.mean()), rel=1e-12)
    assert float(np.ptp(dele)) > 0.01
    res = compare(m, x, methods=["Saliency"], progress=False, n_seeds=1, infidelity_samples=2, n_steps=3)
    assert (res.table["deletion_auc"] < 1).all()


def test_package_level_compare_is_callable(tabular):
    import relu_regions

    m, x = tabular
    res = relu_regions.compare(m, x, methods=["Saliency"], progress=False, n_steps=2, infidelity_samples=1)
    assert list(res.table["method"]) == ["Re3", "Saliency"]


def test_superpixel_mask():
    mask = superpixel_mask((1, 28, 28), 7)
    assert mask.shape == (1, 1, 28, 28) and mask.unique().numel() == 16
    assert (mask[0, 0, :7, :7] == 0).all() and (mask[0, 0, 27, 27] == 15).all()


def test_to_markdown_formats():
    df = pd.DataFrame({"a": ["x"], "b": [float("nan")], "c": [1234567.0], "d": [0.5]})
    md = to_markdown(df)
    assert md.splitlines()[2] == "| x | – | 1.23e+06 | 0.500 |"


@pytest.mark.parametrize("option, value, message", [
    ("curve_output", "probabilities", r"curve_output must be one of \('probability', 'logit'\), got 'probabilities'"),
    ("n_steps", 0, "n_steps must be a positive int, got 0"),
    ("top_k", 6, "top_k must be None or an int from 1 to 5 .*got 6"),
    ("ndcg_k", 0, "ndcg_k must be a positive int, got 0"),
    ("n_seeds", 1.5, "n_seeds must be a positive int"),
    ("noise_std", -1.0, "noise_std must be a finite number > 0"),
    ("superpixel", 0, "superpixel must be None or a positive int"),
])
def test_compare_refuses_invalid_settings(tabular, option, value, message):
    """Before, a misspelt curve_output silently gave logit curves, n_steps=0 an AUC of 0, top_k >= the number of
    features the same top and bottom sets (t = NaN) and ndcg_k=0 NaN."""
    m, x = tabular
    with pytest.raises(ValueError, match=message):
        compare(m, x, methods=["Saliency"], progress=False, **{option: value})


def test_curve_and_test_functions_refuse_invalid_arguments(tabular):
    m, x = tabular
    attr = torch.randn_like(x)
    tgt = torch.zeros(len(x), dtype=torch.long)
    with pytest.raises(ValueError, match=r"output must be one of \('probability', 'logit'\), got 'probabilities'"):
        deletion_insertion(m, x, attr, tgt, output="probabilities")
    with pytest.raises(ValueError, match="n_steps must be a positive int"):
        deletion_insertion(m, x, attr, tgt, n_steps=0)
    n = x[0].numel()
    for k in (0, n, n + 3):  # before: k >= n removed every feature twice and gave t = p = NaN without a word
        with pytest.raises(ValueError, match=f"k must be an int from 1 to {n - 1}"):
            top_bottom_test(m, x, attr, tgt, k=k)
    with pytest.raises(ValueError, match="attr must have the shape of x"):
        top_bottom_test(m, x, attr[:, :-1], tgt, k=1)
    # the logit curve is the target logit itself (independent: the model's output at x and at the baseline 0)
    _, dele, ins = deletion_insertion(m, x, attr, tgt, n_steps=2, output="logit")
    with torch.no_grad():
        assert dele[0] == pytest.approx(m(x)[:, 0].mean().item())
        assert ins[0] == pytest.approx(m(torch.zeros_like(x))[:, 0].mean().item())


def test_compare_keeps_the_callers_random_generators(tabular, monkeypatch):
    """Before: compare() reseeded torch's global generator (torch.manual_seed(0), (1), ...) and left it so; and
    GradientShap drew its interpolation points from numpy's global generator, unseeded: two calls differed."""
    import random

    import relu_regions.compare as cmp

    m, x = tabular
    opts = {"progress": False, "n_seeds": 2, "n_steps": 2, "infidelity_samples": 1, "gradshap_samples": 3}
    torch.manual_seed(1234)
    np.random.seed(5)
    random.seed(7)
    # the caller's next draws, taken on copies of the states
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    want = torch.rand(3), np.random.rand(3), random.random()
    torch.set_rng_state(states[0])
    np.random.set_state(states[1])
    random.setstate(states[2])
    first = compare(m, x, methods=["GradientShap"], **opts)
    assert torch.equal(torch.rand(3), want[0]) and np.array_equal(np.random.rand(3), want[1])
    assert random.random() == want[2]
    # the results are still seeded: a second call (other caller states) gives the same attributions
    second = compare(m, x, methods=["GradientShap"], **opts)
    assert torch.equal(first.attributions["GradientShap"], second.attributions["GradientShap"])
    # also after an exception in the middle of the work
    real = cmp._peer

    def failing(name, *args):
        real(name, *args)  # draws from the generators, then fails
        raise ValueError("simulated failure")

    monkeypatch.setattr(cmp, "_peer", failing)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    with pytest.raises(ValueError, match="simulated failure"):
        compare(m, x, methods=["GradientShap"], **opts)
    assert torch.equal(torch.get_rng_state(), before[0]) and np.array_equal(np.random.get_state()[1], before[1])
    assert random.getstate() == before[2]


def test_infidelity_is_a_seeded_estimate_and_labelled_so(tabular):
    """Before: to_markdown (and the CLI's table) showed Captum's Monte-Carlo infidelity and the wall-clock times
    under plain headers, as if exact."""
    from captum.metrics import infidelity, infidelity_perturb_func_decorator

    m, x = tabular
    target = torch.arange(len(x)) % 3
    values = {}
    for seed in (3, 4):
        res = compare(m, x, target=target, methods=[], progress=False, n_steps=2, infidelity_samples=2, seed=seed)
        values[seed] = float(res.table.set_index("method").loc["Re3", "infidelity"])
    # independent route: Captum's infidelity of A[t] ⊙ x (torch.func) with the same seeded perturbations
    attr = torch.stack([torch.func.jacrev(m)(x[i])[target[i]] for i in range(len(x))]).detach() * x

    @infidelity_perturb_func_decorator(multiply_by_inputs=True)
    def perturb(inputs):
        return inputs - 0.01 * torch.randn_like(inputs)

    with torch.random.fork_rng(devices=[]):
        for seed in (3, 4):
            torch.manual_seed(seed)
            with torch.no_grad():
                direct = float(infidelity(m, perturb, x, attr, target=target, n_perturb_samples=2).mean())
            assert values[seed] == pytest.approx(direct, rel=1e-3, abs=1e-12)
    assert values[3] != values[4]  # an estimate: another seed, another value
    md = res.to_markdown()
    header = md.splitlines()[0]
    assert "| infidelity (MC estimate) |" in header and "| time_per_sample_s (measured) |" in header
    assert "Not exact: times are wall-clock measurements of this run; infidelity is Captum's Monte-Carlo estimate " \
           "over 2 random Gaussian perturbation(s) (std 0.01) per sample, seed 4" in md
    assert list(res.table.columns[:2]) == ["method", "time_per_sample_s"]  # the data keeps its column names
    with pytest.raises(ValueError, match="seed must be an int from -2\\*\\*63"):
        compare(m, x, methods=[], progress=False, seed=1.5)
