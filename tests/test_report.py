"""The HTML / Markdown report: self-contained, exact numbers checked by independent routes, atomic writes."""

from __future__ import annotations

import base64
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn as nn

matplotlib.use("Agg")

from relu_regions import report as rep  # noqa: E402
from relu_regions.models import SmallCNN, mlp  # noqa: E402


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs: list[str] = []
        self.urls: list[tuple[str, str, str]] = []
        self.scripts_with_src: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "script" and a.get("src"):
            self.scripts_with_src.append(a["src"])
        if tag == "link":
            self.links.append(a.get("href", ""))
        for k, v in attrs:
            if k in ("src", "href", "data", "poster", "srcset") and v and not v.startswith(("data:", "#")):
                self.urls.append((tag, k, v))


def _tabular(seed=0, n=120, d=5, k=3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    w = torch.randn(d, k, generator=g)
    y = (X @ w).argmax(1)
    return X, y


@pytest.fixture(scope="module")
def mlp_report():
    torch.manual_seed(0)
    X, y = _tabular()
    model = mlp(5, [8, 6], 3)
    report = rep.build_report(model, X, y, feature_names=[f"f{i}" for i in range(5)], class_names=["a", "b", "c"],
                              meta={"data": "synthetic"}, quick=True)
    return model, X, y, report


def test_accuracy_and_region_counts_match_independent_computation(mlp_report):
    model, X, y, report = mlp_report
    with torch.no_grad():
        h1 = model[0](X)
        h2 = model[2](h1.relu())
        pred = model[4](h2.relu()).argmax(1)
    assert report.results["accuracy"] == pytest.approx(float((pred == y).double().mean()), abs=0)
    # region = sign pattern of all hidden pre-activations, counted with numpy (no relu_regions code)
    full = np.unique(np.concatenate([(h1 > 0).numpy(), (h2 > 0).numpy()], 1), axis=0).shape[0]
    first = np.unique((h1 > 0).numpy(), axis=0).shape[0]
    regions = report.results["regions"]
    assert regions["full network"] == full
    assert regions["layer 1"] == first
    rows = report.section("Activation regions").tables[0][1]
    full_row = next(r for r in rows if r["granularity"] == "full network")
    assert full_row["regions"] == full
    # purity: sample-weighted majority share, recomputed with a dict
    pattern = [tuple(r) for r in np.concatenate([(h1 > 0).numpy(), (h2 > 0).numpy()], 1)]
    groups: dict = {}
    for p, label in zip(pattern, y.tolist()):
        groups.setdefault(p, []).append(label)
    purity = sum(max(np.bincount(v)) for v in groups.values()) / len(y)
    assert full_row["purity"] == pytest.approx(purity, abs=1e-4)


def test_re3_contributions_match_torch_func_jacobian():
    torch.manual_seed(1)
    model = mlp(4, [7, 5], 3).double()
    X = torch.randn(10, 4, dtype=torch.float64)
    target = torch.arange(10) % 3
    contrib, bias, residual, _ = rep.re3_contributions(model, X, target)
    jac = torch.stack([torch.func.jacrev(model)(X[i])[target[i]] for i in range(10)])
    torch.testing.assert_close(contrib, jac * X, rtol=1e-10, atol=1e-12)
    assert residual < 1e-10
    # the bias is the frozen network at 0: check through a perturbation that stays in the region
    with torch.no_grad():
        out = model(X).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(bias, out - (jac * X).sum(1), rtol=1e-9, atol=1e-10)


def test_html_is_self_contained(mlp_report, tmp_path):
    *_, report = mlp_report
    out = report.write(tmp_path / "r")
    page = (out / "index.html").read_text(encoding="utf-8")
    parser = _Collect()
    parser.feed(page)
    assert parser.imgs, "the report has no figure"
    for src in parser.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert parser.urls == []
    assert parser.scripts_with_src == [] and parser.links == []
    assert "http://" not in page.split("<script")[0] and "https://" not in page.split("<script")[0]
    # markdown: every linked figure exists
    md = (out / "summary.md").read_text(encoding="utf-8")
    linked = [line.split("](", 1)[1].rstrip(")") for line in md.splitlines() if line.startswith("![")]
    assert linked and all((out / f).is_file() for f in linked)
    assert "accuracy" in md.lower()


def test_tabular_report_has_bars_and_image_report_has_heatmaps():
    torch.manual_seed(0)
    X, y = _tabular()
    r = rep.build_report(mlp(5, [6], 3), X, y, quick=True, include=["re3"])
    names = [f.name for f in r.section("Re3 contributions (exact)").figures]
    assert names == ["re3_class_bars"]
    Xi = torch.rand(30, 1, 8, 8)
    yi = torch.arange(30) % 10
    r2 = rep.build_report(SmallCNN(), Xi, yi, quick=True, include=["re3"])
    names2 = [f.name for f in r2.section("Re3 contributions (exact)").figures]
    assert "re3_class_heatmaps" in names2
    assert r2.results["re3_residual"] < 1e-3
    # SmallCNN has a `head` submodule: head-only regions are reported next to whole-network ones
    assert "head only" in r2.results["regions"]
    assert r2.results["regions"]["head only"] <= r2.results["regions"]["full network"]


def test_model_state_is_preserved():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Dropout(0.1), nn.Linear(6, 3))
    model.train()
    model[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    X, y = _tabular()
    rep.build_report(model, X, y, quick=True, include=["re3", "validity"])
    assert model.training and all(m.training for m in model.modules())
    assert not model[0].weight.requires_grad and model[3].weight.requires_grad
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_missing_piece_gives_not_available(monkeypatch):
    def boom(module, attr=None):
        raise ImportError(f"relu_regions.{module} is missing (test)")

    monkeypatch.setattr(rep, "_optional", boom)
    X, y = _tabular()
    r = rep.build_report(mlp(5, [6], 3), X, y, quick=True, include=["compare", "validity", "regionstats"])
    missing = [s for s in r.sections if not s.available]
    assert {s.title for s in missing} >= {"Attribution comparison", "Validity and boundary distances"}
    assert all("missing" in s.reason or s.reason == "not requested" for s in missing)
    with pytest.raises(ValueError, match="unknown section"):
        rep.build_report(mlp(5, [6], 3), X, y, include=["nope"])
    with pytest.raises(TypeError, match="y must hold integer class labels"):  # before: truncated to classes
        rep.build_report(mlp(5, [6], 3), X, y.double() + 0.5, include=[])
    html_page = r.to_html()
    assert "not available: relu_regions." in html_page
    assert "*not available: relu_regions." in r.to_markdown()


def test_write_is_atomic_and_refuses_foreign_directories(tmp_path, monkeypatch):
    X, y = _tabular()
    r = rep.build_report(mlp(5, [6], 3), X, y, quick=True, include=[])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        r.write(foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]

    out = r.write(tmp_path / "rep")
    first = (out / "index.html").read_text()

    def fail(self, figure_dir="figures"):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(rep.Report, "to_markdown", fail)
    with pytest.raises(RuntimeError):
        r.write(out)
    assert (out / "index.html").read_text() == first  # the previous report is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "rep"]  # no temp leftovers
    with pytest.raises(RuntimeError):
        r.write(tmp_path / "new")
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_renders_in_headless_chromium(mlp_report, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no chromium installed (apt-get install -y chromium) — HTML was still parsed above")
    *_, report = mlp_report
    out = report.write(tmp_path / "r")
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",  # no network: any fetch would fail
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1100,1600",
           (out / "index.html").as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=90)
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert img.shape == (1600, 1100)
    assert img.std() > 5  # something was drawn (text, tables, figures), not a blank page
    Path(out / "screenshot.png").write_bytes(shot.read_bytes())


def test_optional_sections_when_their_modules_are_present(mlp_report):
    *_, report = mlp_report
    pytest.importorskip("captum")
    for module, title in (("compare", "Attribution comparison"), ("geometry", "Validity and boundary distances"),
                          ("plots", "One sample's path through the regions (Sankey)"),
                          ("regions", "Region statistics (RegionStats)")):
        try:
            __import__(f"relu_regions.{module}")
        except ImportError:
            continue
        sec = report.section(title)
        assert sec.available, f"{title}: {sec.reason}"
    if "compare" in report.results:
        rows = {r["method"]: r for r in report.results["compare"]}
        # known identity: in a ReLU network grad = A[t], so InputXGradient equals Re3 (zero baseline) exactly
        assert rows["InputXGradient"]["spearman"] == pytest.approx(1.0)
        assert rows["Re3"]["time_vs_re3"] == pytest.approx(1.0)
    if "validity" in report.results:
        exact = report.results["validity"][0]
        assert exact["distance"] == "exact" and exact["eps90"] <= exact["eps50"]


def test_report_numbers_agree_and_the_callers_state_is_kept():
    """Before: the region table's top-1 coverage took, per class, the region with most samples of that class, while
    its docstring and the overview (RegionStats.coverage) take the largest region assigned to the class (0.5217 vs
    0.4783 on the QA example: regions of 10 (6 of class 0), 8 (7 of class 0) and 5 (class 1) samples); the
    validity median was torch's lower median (2.0 for the distances 1, 2, 3, 4); the comparison section reseeded the
    caller's global generator; class / feature name lists of the wrong length failed late or dropped a section; a
    "|" in a column header broke the Markdown table."""
    from relu_regions.units import LayerPattern

    inv = torch.tensor([0] * 10 + [1] * 8 + [2] * 5)
    y = torch.tensor([0] * 6 + [1] * 4 + [0] * 7 + [1] + [1] * 5)
    state = torch.nn.functional.one_hot(inv, 3).bool()
    pattern = LayerPattern("relu", "relu", state, 2, torch.zeros(len(inv), dtype=torch.long), {})
    rows, _ = rep.region_table([pattern], y, y)
    assert rows[0]["top-1 coverage"] == round(11 / 23, 4)
    X, yt = _tabular()
    model = mlp(5, [6], 3)
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    r = rep.build_report(model, X, yt, quick=True, include=["compare"], class_names=["a|b", "c", "d"])
    assert torch.equal(torch.rand(3), want)
    assert "a\\|b" in r.to_markdown()
    with pytest.raises(ValueError, match="class_names has 2 names for the model's 3 outputs"):
        rep.build_report(model, X, yt, include=[], class_names=["a", "b"])
    with pytest.raises(ValueError, match="feature_names has 3 names for 5 input features"):
        rep.build_report(model, X, yt, include=[], feature_names=["a", "b", "c"])


def test_validity_median_is_the_median():
    net = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.ReLU(), torch.nn.Linear(1, 2)).eval()
    with torch.no_grad():  # one ReLU at x = 0: the exact distance of x is |x|
        net[0].weight.fill_(1.0)
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        net[2].bias.zero_()
    X = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    r = rep.build_report(net, X, torch.zeros(4, dtype=torch.long), include=["validity"], validity_samples=4)
    assert r.results["validity"][0]["median"] == 2.5  # (torch.median: 2.0)


def test_sankey_reads_logits_at():
    """Before: the Sankey section ignored logits_at, so a model ending in softmax lost the section ("not
    available": the softmax is not piecewise linear) although the rest of the report used the logits."""
    pytest.importorskip("relu_regions.plots")
    torch.manual_seed(0)
    X, y = _tabular()
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3), nn.Softmax(dim=1))
    r = rep.build_report(net, X, y, quick=True, include=["sankey"], logits_at="2")
    sec = r.section("One sample's path through the regions (Sankey)")
    assert sec.available, sec.reason
    from relu_regions import plots

    i = r.results["sankey_sample"]
    flows = plots.pathway_flows(net, X[i:i + 1], logits_at="2")
    with torch.no_grad():
        assert flows["nodes"][-1] == f"class {int(net[:3](X[i:i + 1]).argmax())}"
    # input -> unit flows: |W1[u, i] * x_i| of the active first-layer units (independent of the library's maps)
    w, z = net[0].weight, net[0](X[i])
    names = flows["nodes"]
    for a, b, v in zip(flows["source"], flows["target"], flows["value"]):
        if names[a].startswith("x") and names[b].startswith("unit"):
            u, f = int(names[b].split()[1]), int(names[a][1:])
            assert z[u] > 0 and v == pytest.approx(float((w[u, f] * X[i, f]).abs()), rel=1e-5)


def test_boundary_samples_are_counted():
    """Before: the 'boundary samples' column was always 0: the patterns were recorded without count_boundary=True,
    so the table summed the recorder's placeholder zeros."""
    torch.manual_seed(0)
    # ReLU: with a zero bias, the zero input puts every pre-activation exactly at the breakpoint
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        net[0].bias.zero_()
    X = torch.cat([torch.zeros(3, 2), torch.randn(5, 2)])
    with torch.no_grad():
        want = int((net[0](X) == 0).any(1).sum())  # by hand: pre-activations exactly 0
    assert want == 3
    r = rep.build_report(net, X, torch.zeros(8, dtype=torch.long), include=[])
    rows = {row["granularity"]: row for row in r.section("Activation regions").tables[0][1]}
    assert rows["full network"]["boundary samples"] == want
    # max pool: tied maxima in a 2x2 window count when the maximum is nonzero (a flat nonzero patch), not at 0
    pool = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 2)).eval()
    Xp = torch.rand(6, 1, 4, 4)
    Xp[0] = 0.5  # every window tied at 0.5
    Xp[1, :, :2, :2] = 0.0  # one window tied at 0: not a boundary
    Xp[2, :, 2:, 2:] = 0.25  # one tied window
    w = torch.nn.functional.unfold(Xp, 2, stride=2)  # (N, 4, windows), independent of the recorder
    mx = w.max(1, keepdim=True).values
    tied = (((w == mx).sum(1) > 1) & (mx[:, 0] != 0)).any(1)
    assert tied.tolist() == [True, False, True, False, False, False]
    r = rep.build_report(pool, Xp, torch.zeros(6, dtype=torch.long), include=[])
    rows = {row["granularity"]: row for row in r.section("Activation regions").tables[0][1]}
    assert rows["full network"]["boundary samples"] == int(tied.sum())


def test_confusion_regions_use_the_re3_purity_definition(mlp_report):
    """Before: 'confusion regions' counted regions with any misclassification or more than one predicted class,
    while RegionStats (and the same report's RegionStats section) count regions whose purity is below 0.7."""
    import pandas as pd

    from relu_regions.units import LayerPattern

    # region 0: 7 of 10 in class 0 (purity 0.7, two predicted classes); region 1: 2 of 3 (0.67); region 2: pure,
    # one sample misclassified
    inv = torch.tensor([0] * 10 + [1] * 3 + [2] * 5)
    y = torch.tensor([0] * 7 + [1] * 3 + [0, 0, 1] + [1] * 5)
    pred = y.clone()
    pred[-1] = 0
    state = torch.nn.functional.one_hot(inv, 3).bool()
    pattern = LayerPattern("relu", "relu", state, 2, torch.zeros(len(inv), dtype=torch.long), {})
    rows, _ = rep.region_table([pattern], y, pred)
    table = pd.crosstab(inv.numpy(), y.numpy())
    purity = table.max(axis=1) / table.sum(axis=1)
    assert rows[0]["confusion regions"] == int((purity < 0.7).sum()) == 1
    *_, report = mlp_report
    assert "purity (share of their majority true class) is below 0.7" in " ".join(
        report.section("Activation regions").text)


def test_negative_labels_are_refused():
    """Before: a label -1 was accepted (only the largest label was checked): it indexed the last class in the region
    table, counted as an error in the accuracy, and the RegionStats section silently became 'not available'."""
    X, y = _tabular(n=20)
    y = y.clone()
    y[4] = -1
    with pytest.raises(ValueError, match=r"y must hold class indices 0\.\.K-1 .*found -1 at sample 4"):
        rep.build_report(mlp(5, [6], 3), X, y, include=[])


def test_report_keeps_the_callers_matplotlib_backend():
    """Before: build_report switched the process's matplotlib backend to Agg for good (an interactive session lost
    its interactive figures)."""
    import matplotlib.pyplot as plt

    X, y = _tabular(n=24, d=3, k=2)
    before = plt.get_fignums()
    matplotlib.use("svg")  # a backend the caller chose (not Agg; needs no display)
    try:  # (the RegionStats section draws with relu_regions.plots)
        r = rep.build_report(mlp(3, [4], 2), X, y, quick=True, include=["regionstats"])
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use("Agg")
    assert plt.get_fignums() == before  # no pyplot figure left behind either
    pngs = [f.png for s in r.sections for f in s.figures]
    assert len(pngs) >= 3 and all(p[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_comparison_labels_what_is_not_exact(mlp_report):
    """Before: the comparison presented Captum's Monte-Carlo infidelity as if exact (header 'infidelity', text
    "Captum's metric") under a footer saying every number is exact unless labelled an estimate."""
    pytest.importorskip("captum")
    *_, report = mlp_report
    sec = report.section("Attribution comparison")
    assert sec.available, sec.reason
    table = sec.tables[0][1]
    assert {"infidelity (MC estimate)", "time_per_sample_s (measured)", "time_vs_re3 (measured)"} <= set(table.columns)
    assert "infidelity" not in table.columns
    text = " ".join(sec.text)
    assert "infidelity is Captum's Monte-Carlo estimate over 2 random Gaussian perturbation(s)" in text
    assert "times are wall-clock measurements" in text
    assert "infidelity (MC estimate)" in report.to_markdown() and "infidelity (MC estimate)" in report.to_html()
    # (that the value does change with the seed is checked against Captum itself in test_compare.py)


def test_validity_text_says_why_the_re3_estimate_is_missing(monkeypatch):
    """Before: when boundary_distance(method="re3") failed (a DenseNet's concatenated inputs), its row was dropped
    but the text still announced "the Re3 paper's per-layer estimate for comparison", and the reason stayed in
    results["re3_distance_error"], shown nowhere."""
    from relu_regions import geometry

    X, y = _tabular(n=16)
    model = mlp(5, [6], 3)
    ok = rep.build_report(model, X, y, include=["validity"], validity_samples=8)
    sec = ok.section("Validity and boundary distances")
    assert "per-layer estimate for comparison" in sec.text[0]
    assert [r["distance"] for r in ok.results["validity"]] == ["exact", "Re3 paper (per-layer)"]
    real = geometry.boundary_distance

    def no_re3(*args, **kwargs):
        if kwargs.get("method") == "re3":
            raise RuntimeError("the producing Conv of 'l2.relu1' is ambiguous (test)")
        return real(*args, **kwargs)

    monkeypatch.setattr(geometry, "boundary_distance", no_re3)
    r = rep.build_report(model, X, y, include=["validity"], validity_samples=8)
    sec = r.section("Validity and boundary distances")
    assert [row["distance"] for row in r.results["validity"]] == ["exact"]
    assert "for comparison" not in sec.text[0]
    assert "estimate is not available for this model" in sec.text[0]
    assert "RuntimeError: the producing Conv of 'l2.relu1' is ambiguous (test)" in sec.text[0]
    assert "ambiguous (test)" in r.to_markdown() and "ambiguous (test)" in r.to_html()


def test_dense_outputs_are_refused_not_read_as_classes():
    """Before: a segmentation output (B, 2, 4, 4) was flattened into 32 "classes" (accuracy 0, region tables of
    meaningless labels) without an error; (B, K, 1, 1) logits of a fully convolutional classifier stay fine."""
    torch.manual_seed(0)
    X = torch.randn(12, 1, 4, 4)
    seg = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 1))
    with pytest.raises(ValueError, match=r"model's output has shape \(B, 2, 4, 4\).*need a \(B, K\) output"):
        rep.build_report(seg, X, torch.zeros(12, dtype=torch.long), include=[])
    fcn = nn.Sequential(*seg, nn.AdaptiveAvgPool2d(1))  # (B, 2, 1, 1)
    y = torch.arange(12) % 2
    r = rep.build_report(fcn, X, y, include=[])
    with torch.no_grad():
        pred = fcn(X)[:, :, 0, 0].argmax(1)
    assert r.results["n_classes"] == 2
    assert r.results["accuracy"] == pytest.approx(float((pred == y).double().mean()))


def test_plain_sequential_cnn_has_a_head_only_granularity():
    """Before: the docstring promised a 'head only' granularity for a plain nn.Sequential CNN, but only name
    prefixes (head., classifier., ...) were tried: layers named '1', '4', '8' never had one. Now the trailing layers
    with vector units after the last spatial one; counted here from forward hooks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 2 * 2, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    X = torch.randn(40, 1, 14, 14)
    r = rep.build_report(model, X, torch.arange(40) % 3, include=[])
    assert r.results["layers"] == ["1", "2", "4", "5", "8"]
    seen = []
    h = model[8].register_forward_hook(lambda m, i, o: seen.append(o > 0))
    with torch.no_grad():
        model(X)
    h.remove()
    assert r.results["regions"]["head only"] == torch.unique(seen[0], dim=0).shape[0]
    # a convolution after the last max pool is not part of the head; an MLP has no separate head; names alone
    # (no shapes) cannot tell
    shapes = {"1": (4, 12, 12), "2": (4, 6, 6), "4": (4, 4, 4), "7": (6,), "9": (5,)}
    assert rep.granularities(list(shapes), shapes)["head only"] == ["7", "9"]
    assert "head only" not in rep.granularities(["1", "3"], {"1": (6,), "3": (5,)})
    assert "head only" not in rep.granularities(list(shapes))


def test_sankey_section_uses_the_units_own_activation():
    """Before: the Sankey section read a ReLU6 first layer as a ReLU: a unit saturated at 6 flowed its
    pre-activation into the class. The unit→class flows are the activations read with a forward hook."""
    pytest.importorskip("relu_regions.plots")
    torch.manual_seed(0)
    X, y = _tabular(n=16)
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU6(), nn.Linear(6, 3))
    with torch.no_grad():
        net[0].weight.mul_(20)  # saturates units of every sample
    r = rep.build_report(net, X, y, quick=True, include=["sankey"])
    sec = r.section("One sample's path through the regions (Sankey)")
    assert sec.available, sec.reason
    i = r.results["sankey_sample"]
    seen = {}
    h = net[1].register_forward_hook(lambda m, inp, o: seen.__setitem__("a", o.detach()[0]))
    with torch.no_grad():
        net(X[i:i + 1])
    h.remove()
    assert bool((seen["a"] == 6).any())  # a saturated unit: the case that was wrong
    rows = [row for row in sec.tables[0][1] if row["to"].startswith("class")]
    assert rows
    for row in rows:
        assert row["flow"] == pytest.approx(round(float(seen["a"][int(row["from"].split()[1])]), 4), abs=1e-4)


def test_a_single_logit_model_is_refused_and_the_suggested_two_score_head_reads_its_sign():
    """A binary classifier with one logit: argmax always gave class 0 (data labelled 0 only read as 100% accurate).
    The report refuses it and says to append nn.Linear(1, 2) with weight [[0], [1]]; with that head its accuracy is
    the logit-sign accuracy computed by hand."""
    torch.manual_seed(0)
    net = mlp(5, [6], 1)
    X, y = torch.randn(40, 5), torch.zeros(40, dtype=torch.long)
    with pytest.raises(ValueError, match=r"single output .* append nn.Linear\(1, 2\) with weight \[\[0.\], \[1.\]\]"):
        rep.build_report(net, X, y, quick=True, include=[])
    head = nn.Linear(1, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.0], [1.0]]))
        head.bias.zero_()
    r = rep.build_report(nn.Sequential(net, head), X, y, quick=True, include=[])
    with torch.no_grad():
        by_hand = float(((net(X)[:, 0] > 0).long() == y).double().mean())
    assert r.results["accuracy"] == by_hand and by_hand < 1.0
