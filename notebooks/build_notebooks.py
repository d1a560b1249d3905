"""Generate the example notebooks from the cell sources below (``python notebooks/build_notebooks.py``).

The notebooks are stored without outputs; ``tests/test_notebooks.py`` executes every one of them, so they cannot
rot. Edit the cells here and rebuild rather than editing the .ipynb files by hand.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """\
%matplotlib inline
import warnings
import numpy as np
import torch
import matplotlib.pyplot as plt
import relu_regions as rr
warnings.filterwarnings("ignore", category=DeprecationWarning)
torch.manual_seed(0)
torch.set_num_threads(max(1, min(4, torch.get_num_threads())))"""

DIGITS = """\
from relu_regions.cli import digits_data, train_model
from relu_regions.models import SmallCNN

train, test = digits_data(seed=0)           # scikit-learn's 8x8 digits as (N, 1, 8, 8) images in [0, 1]
model = SmallCNN()
losses = train_model(model, train.X, train.y, epochs=6, lr=5e-3, batch_size=128, seed=0, progress=False)
with torch.no_grad():
    acc = (model(test.X).argmax(1) == test.y).double().mean().item()
print(f"held-out accuracy {acc:.4f} on {len(test.y)} images (exact count)")"""

NOTEBOOKS: dict[str, list[tuple[str, str]]] = {}

NOTEBOOKS["quickstart"] = [
    ("md", """\
# Quickstart: exact explanations of a tabular MLP (Iris)

Inside the activation region that contains an input `x`, a ReLU network *is* an affine map `f(x) = A·x + d`.
relu-regions records the region during normal inference and computes `A` and `d` exactly. This notebook trains a
small MLP on Iris (ships with scikit-learn) and walks through regions, exact contributions, boundary distances,
what-if questions and the HTML report."""),
    ("code", SETUP),
    ("code", """\
from relu_regions.datasets import load_tabular, standardize, stratified_split
from relu_regions.models import mlp

ds = load_tabular("iris")
tr, te = stratified_split(ds.X, ds.y, test_size=0.3, seed=0)
Xtr, Xte = standardize(ds.X[tr], ds.X[te])
Xtr, Xte = torch.tensor(Xtr), torch.tensor(Xte)
ytr, yte = torch.tensor(ds.y[tr]), torch.tensor(ds.y[te])

model = mlp(4, [16, 16], 3)
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for epoch in range(300):
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(Xtr), ytr)
    loss.backward()
    opt.step()
model.eval()
with torch.no_grad():
    print("test accuracy", (model(Xte).argmax(1) == yte).double().mean().item())"""),
    ("md", "## Regions: record the activation pattern of every ReLU while the model runs"),
    ("code", """\
with rr.record(model) as rec:
    logits = model(Xte)
keys = rec.region_ids()                 # (N,) region key per sample
print(rec)
print("distinct regions on the test set:", len(torch.unique(rec.packed(), dim=0)),
      "for", len(yte), "samples")"""),
    ("md", "## The exact affine map of one region — checked against the model itself"),
    ("code", """\
amap = rr.affine_map(model, Xte[:5])
print(amap)
with torch.no_grad():
    print("max |A·x + d − f(x)| =", (amap(Xte[:5]) - model(Xte[:5])).abs().max().item())
# a small step that stays in the region is predicted exactly by the same map
step = 1e-3 * torch.randn_like(Xte[:5])
same = rr.attributions.same_region(model, Xte[:5], Xte[:5] + step)
with torch.no_grad():
    err = (amap(Xte[:5] + step) - model(Xte[:5] + step)).abs().amax(1)
print("same region:", same.tolist(), " error of the map at the moved points:", err.tolist())"""),
    ("md", "## Re3 contributions: `A[c] ⊙ x` sums with the region offset `d[c]` to the logit, exactly"),
    ("code", """\
c = rr.contributions(model, Xte[:1])
print("class", int(c.target), "logit", float(c.output), "= sum of contributions + offset:",
      float(c.values.sum() + c.offset))
plt.figure(figsize=(5, 2.5))
plt.bar(ds.feature_names, c.values[0].numpy())
plt.xticks(rotation=20); plt.ylabel("contribution to the logit"); plt.tight_layout()"""),
    ("md", "## Region statistics over a data set"),
    ("code", """\
from relu_regions.training import evaluate

loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(Xte, yte), batch_size=16)
stats = evaluate(model, loader, n_classes=3, granularities={"last layer": -1}, progress=False)
stats.summary()["overview"]"""),
    ("md", "## How far can the input move before the explanation changes? Exact boundary distances, what-if"),
    ("code", """\
bd = rr.boundary_distance(model, Xte[:10])
print("exact l2 distance to the region boundary:", [round(float(v), 4) for v in bd.distance])
delta = torch.zeros_like(Xte[:3]); delta[:, 2] = 0.05           # petal length + 0.05 (standardized)
w = rr.what_if(model, Xte[:3], delta)
print("certified (stays in the region):", w.certified.tolist())
with torch.no_grad():
    print("prediction by the map:", w.prediction.argmax(1).tolist(),
          " model at x+δ:", model(Xte[:3] + delta).argmax(1).tolist())"""),
    ("md", "## The whole analysis as a self-contained HTML report"),
    ("code", """\
import tempfile
from pathlib import Path
from relu_regions.report import build_report

report = build_report(model, Xte, yte, feature_names=ds.feature_names, class_names=ds.class_names,
                      title="Iris MLP", quick=True)
out = report.write(Path(tempfile.mkdtemp()) / "iris_report")
print("written:", out / "index.html")
print(report.to_markdown()[:600])"""),
]

NOTEBOOKS["mnist_cnn"] = [
    ("md", """\
# A CNN on MNIST: regions, Re3 vs. IG / LRP / SHAP, validity

Uses the MNIST files in the shared data directory (`relu_regions.datasets.load_mnist`); when they are missing, it
says so and uses scikit-learn's 8×8 digits instead. Small subsets keep it well under a minute on a CPU."""),
    ("code", SETUP),
    ("code", """\
from relu_regions.cli import train_model
from relu_regions.datasets import describe_mnist_source, load_mnist
from relu_regions.models import LeNet, SmallCNN

try:
    Xtr, ytr = load_mnist("train", limit=2000)
    Xte, yte = load_mnist("test", limit=500)
    print("data:", describe_mnist_source("mnist"))
    model = LeNet()
except FileNotFoundError as e:
    print("MNIST not found here; using scikit-learn's 8x8 digits instead.", str(e).splitlines()[0])
    from relu_regions.cli import digits_data
    train, test = digits_data(0)
    Xtr, ytr, Xte, yte = train.X, train.y, test.X, test.y
    model = SmallCNN()
train_model(model, Xtr, ytr, epochs=2, lr=2e-3, seed=0, progress=False)
with torch.no_grad():
    print("test accuracy", (model(Xte).argmax(1) == yte).double().mean().item(), "on", len(yte), "images")"""),
    ("md", "## Regions of the whole network vs. the MLP head alone (the Re3 paper analysed only the head)"),
    ("code", """\
with rr.record(model) as rec:
    model(Xte)
print("layers:", rec.layer_names)
head = [n for n in rec.layer_names if n.startswith("head.")]
print("regions, whole network:", len(torch.unique(rec.packed(), dim=0)))
print("regions, head only:    ", len(torch.unique(rec.packed(head), dim=0)))"""),
    ("md", "## Re3 heatmaps (exact) per class"),
    ("code", """\
c = rr.contributions(model, Xte, target=yte)
fig, axes = plt.subplots(1, 10, figsize=(14, 1.8))
for k, ax in enumerate(axes):
    m = c.values[yte == k].mean(0)[0]
    v = float(m.abs().max())
    ax.imshow(m, cmap="RdBu_r", vmin=-v, vmax=v); ax.set_title(str(k)); ax.axis("off")
print("max |Σ contributions + d − logit| =",
      float((c.values.flatten(1).sum(1) + c.offset - c.output).abs().max()))"""),
    ("md", """\
## Re3 against Integrated Gradients, LRP and KernelShap
Timings are measured in this run; agreement is with Re3's exact contributions (see `relu_regions.compare`)."""),
    ("code", """\
from relu_regions.compare import compare

res = compare(model, Xte[:4], methods=["IntegratedGradients", "LRP", "KernelShap"], progress=False,
              n_seeds=2, ig_steps=16, shap_samples=60, superpixel=4, n_steps=5, infidelity_samples=2)
res.table[["method", "time_per_sample_s", "time_vs_re3", "ndcg@k", "spearman", "deletion_auc", "insertion_auc",
           "stab_spearman"]]"""),
    ("md", "## Validity: how far each explanation stays exact (exact distances vs. the Re3 paper's estimate)"),
    ("code", """\
from relu_regions import geometry, plots

x = Xte[:8]
exact = geometry.boundary_distance(model, x, method="exact")
re3 = geometry.boundary_distance(model, x, method="re3")
print("samples exactly on a max-pool tie (distance 0):", int((exact.distance == 0).sum()))
plots.validity({"exact": exact.distance, "Re3 paper": re3.distance});"""),
]

NOTEBOOKS["captum_users"] = [
    ("md", """\
# For Captum users: Re3 as a drop-in attribution method

`relu_regions.integrations.captum.Re3` has Captum's `attribute` interface. Its attributions are exact for
piecewise-linear networks: `attributions.sum() + delta == f(x)[target]` with the convergence delta being the
region's offset. Swap it in wherever you use `IntegratedGradients`, wrap it in `NoiseTunnel`, and score it with
Captum's metrics."""),
    ("code", SETUP),
    ("code", DIGITS),
    ("code", """\
from captum.attr import IntegratedGradients, NoiseTunnel, Saliency
from relu_regions.integrations.captum import Re3

x, target = test.X[:8], test.y[:8]
methods = {"Re3": Re3(model), "IntegratedGradients": IntegratedGradients(model), "Saliency": Saliency(model)}
attrs = {name: m.attribute(x, target=target) for name, m in methods.items()}
re3_attr, delta = Re3(model).attribute(x, target=target, return_convergence_delta=True)
with torch.no_grad():
    logit = model(x).gather(1, target[:, None])[:, 0]
err = (re3_attr.flatten(1).sum(1) + delta - logit).abs().max()
print("Re3: max |Σ attributions + delta − logit| =", float(err))"""),
    ("code", """\
fig, axes = plt.subplots(len(attrs), 6, figsize=(9, 1.6 * len(attrs)))
for r, (name, a) in enumerate(attrs.items()):
    for j in range(6):
        m = a[j, 0].detach(); v = float(m.abs().max()) or 1.0
        axes[r, j].imshow(m, cmap="RdBu_r", vmin=-v, vmax=v); axes[r, j].axis("off")
    axes[r, 0].set_title(name, fontsize=8, loc="left")"""),
    ("md", "## NoiseTunnel (SmoothGrad) around Re3"),
    ("code", """\
nt = NoiseTunnel(Re3(model))
smooth = nt.attribute(x, target=target, nt_type="smoothgrad", nt_samples=4, stdevs=0.05)
print("SmoothGrad-Re3 shape", tuple(smooth.shape))"""),
    ("md", "## Captum metrics: infidelity and sensitivity"),
    ("code", """\
from captum.metrics import infidelity, sensitivity_max

def perturb(inputs):
    noise = 0.01 * torch.randn_like(inputs)
    return noise, inputs - noise

torch.manual_seed(0)
for name, m in methods.items():
    a = m.attribute(x, target=target)
    inf = infidelity(model, perturb, x, a, target=target, n_perturb_samples=4).mean().item()
    sens = sensitivity_max(m.attribute, x, target=target, n_perturb_samples=2).mean().item()
    print(f"{name:20s} infidelity {inf:.3g}   sensitivity_max {sens:.3g}")"""),
]

NOTEBOOKS["lightning_training"] = [
    ("md", """\
# Lightning: watch the activation regions while training

`RegionMonitor` records the region of every validation sample during the normal validation loop and logs the
region count, purity, coverage and a boundary distance per epoch. Here: SmallCNN on 8×8 digits, a few epochs."""),
    ("code", SETUP),
    ("code", """\
import lightning.pytorch as pl
import torch.nn.functional as F
from relu_regions.cli import digits_data
from relu_regions.integrations.lightning import RegionMonitor
from relu_regions.models import SmallCNN

train, test = digits_data(0)

class Lit(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = SmallCNN()
    def forward(self, x):
        return self.net(x)
    def training_step(self, batch, i):
        x, y = batch
        return F.cross_entropy(self(x), y)
    def validation_step(self, batch, i):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)

dl = lambda d, shuffle: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(d.X, d.y), batch_size=64,
                                                    shuffle=shuffle, generator=torch.Generator().manual_seed(0))
monitor = RegionMonitor(10, module="net", probe_size=16, granularities={"head": slice(-1, None)})
trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor])
trainer.fit(Lit(), dl(train, True), dl(test, False))"""),
    ("code", """\
import pandas as pd
hist = pd.DataFrame([h for h in monitor.history if h["stage"] == "val"])
hist[[c for c in hist.columns if c in ("epoch", "n_regions", "mean_purity", "topC_coverage",
                                       "boundary_distance_median")]]"""),
    ("code", "monitor.plot_history();"),
]

NOTEBOOKS["clusters_and_neurons"] = [
    ("md", """\
# Clusters and neurons: NEON, average causal effects, unit clusters, lesions

1. **NEON** explains k-means cluster assignments exactly (the neuralized k-means is a piecewise-linear network).
2. **ACE** measures the average causal effect of intervening on one input on hidden units and outputs.
3. **Unit clusters** group hidden units with similar behaviour; **lesions** zero a cluster and measure the damage."""),
    ("code", SETUP),
    ("code", """\
from sklearn.cluster import KMeans
from relu_regions.clusters import neon, neuralize_kmeans
from relu_regions.datasets import load_tabular

wine = load_tabular("wine")
Xw = torch.tensor((wine.X - wine.X.mean(0)) / wine.X.std(0), dtype=torch.float64)
km = KMeans(3, n_init=4, random_state=0).fit(Xw.numpy())
nk = neuralize_kmeans(km)
res = neon(nk, Xw)
print("assignments agree with scikit-learn:", bool((res.cluster.numpy() == km.predict(Xw.numpy())).all()))
print("conservation max |Σ R_i − f_c| =", float((res.relevance.sum(1) - res.score).abs().max()))
for c in range(3):
    r = res.relevance[res.cluster == c].mean(0)
    top = r.argsort(descending=True)[:3].tolist()
    print(f"cluster {c}: most relevant features", [wine.feature_names[i] for i in top])"""),
    ("md", "## A small MLP on the 8×8 digits: ACE of one pixel on the hidden layer and on the output"),
    ("code", """\
from relu_regions import causal
from relu_regions.cli import train_model
from relu_regions.datasets import load_tabular
from relu_regions.models import mlp

digits = load_tabular("digits")
X = torch.tensor(digits.X / 16.0, dtype=torch.float32)
y = torch.tensor(digits.y)
net = mlp(64, [32], 10)
train_model(net, X, y, epochs=10, seed=0, progress=False)
res = causal.ace(net, X, site="input", unit=36, alphas=[0.0, 0.5, 1.0], observe=["1"], n_samples=300)
print("ACE of pixel 36 on the 10 logits (rows: α):")
print(res.effect["output"].numpy().round(3))"""),
    ("md", "## Cluster the hidden units by their activation profiles, then lesion each cluster"),
    ("code", """\
profiles = causal.activation_profiles(net, X[:500], "1")
clusters = causal.cluster_units(profiles, method="kmeans", n_clusters=4)
print("units per cluster:", {c: len(u) for c, u in clusters.groups().items()})
causal.lesion_table(net, X, "1", clusters, target=y)"""),
]


def build(out_dir: Path = HERE) -> list[Path]:
    """Write every notebook into ``out_dir``; returns the paths."""
    paths = []
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.metadata["language_info"] = {"name": "python"}
        nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells]
        path = out_dir / f"{name}.ipynb"
        nbformat.validate(nb)
        nbformat.write(nb, path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in build():
        print("wrote", p)
