"""Insertion-curve evaluation of NEON cluster explanations (Kauffmann et al.) against baselines.

For each data set: standardise, fit k-means (K = number of classes), neuralize it, explain each sample's own
cluster with NEON (β = 1/E[f_c]), random, (x − x̄)², (∇f_c)² and integrated gradients (from the data mean), and
report the insertion AUC (insert features in relevance order into rows drawn from the data, track membership;
higher is better). Also: kernel k-means (Gaussian) with NEON on the tabular sets, and deep k-means on MNIST (k-means
on the penultimate layer of a small MLP trained for one epoch) explained through the region's exact affine map.

The AUCs are Monte-Carlo estimates (random fill rows, fixed seeds); conservation errors are exact measurements.

Usage: python benchmarks/neon_insertion.py [--quick] [--out benchmarks/results/neon_insertion.md]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from _common import cpu_name
from sklearn.cluster import KMeans

from relu_regions import clusters as C
from relu_regions.datasets import load_tabular

METHODS = ["neon", "random", "diff2", "grad2", "ig"]


def machine() -> str:
    import os

    return f"{cpu_name()}, {os.cpu_count()}-core CPU, {torch.get_num_threads()} torch threads, no GPU"


def markdown(df, index: bool = True, fmt: str = "{:.3f}") -> str:
    """A Markdown table without the optional ``tabulate`` dependency."""
    d = df.reset_index() if index else df
    cols = [str(c) for c in d.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in d.itertuples(index=False):
        cells = [fmt.format(v) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tabular(name: str, n_eval: int, n_fill: int, kernel: bool) -> list[dict]:
    ds = load_tabular(name)
    x = ds.X.astype(np.float64)
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1)
    k = len(ds.class_names)
    km = KMeans(k, n_init=10, random_state=0).fit(x)
    nk = C.neuralize_kmeans(km)
    xt = torch.as_tensor(x)
    sel = torch.randperm(len(xt), generator=torch.Generator().manual_seed(0))[:n_eval]
    xe = xt[sel]
    lab = nk.predict(xe)
    beta = C.default_beta(nk, xt)
    rows = []
    for m in METHODS:
        t = time.perf_counter()
        rel = C.baseline_relevance(nk, xe, m, reference=xt.mean(0), beta=beta)
        dt = time.perf_counter() - t
        res = C.insertion_curve(nk.predict, xe, rel, lab, xt, n_fill=n_fill)
        cons = C.neon(nk, xe, beta=beta).conservation_error().max().item() if m == "neon" else float("nan")
        rows.append({"data": name, "model": f"k-means K={k}", "D": x.shape[1], "n": len(xe), "method": m,
                     "auc": res.auc, "seconds": dt, "max abs(ΣR − f_c)": cons})
    if kernel:
        kk = C.KernelKMeans(k, max_support=40, random_state=0).fit(x)
        net = C.NeuralizedKernelKMeans.from_model(kk)
        agree = float((net.predict(xt) == kk.predict(xt)).double().mean())
        lab = net.predict(xe)
        kbeta = C.default_beta(net, xt)
        for m in ("neon", "random", "diff2", "grad2"):
            t = time.perf_counter()
            rel = C.baseline_relevance(net, xe, m, reference=xt.mean(0), beta=kbeta)
            dt = time.perf_counter() - t
            res = C.insertion_curve(net.predict, xe, rel, lab, xt, n_fill=n_fill)
            cons = C.neon(net, xe, beta=kbeta).conservation_error().max().item() if m == "neon" else float("nan")
            rows.append({"data": name, "model": f"kernel k-means K={k} (network = model on {agree:.0%})",
                         "D": x.shape[1], "n": len(xe), "method": m, "auc": res.auc, "seconds": dt,
                         "max abs(ΣR − f_c)": cons})
    return rows


def mnist_deep(n_train: int, n_eval: int, n_fill: int) -> list[dict]:
    from relu_regions.datasets import load_mnist
    from relu_regions.models import mlp

    try:
        x, y = load_mnist("train", limit=n_train)
    except Exception as e:  # data missing
        print(f"MNIST not available ({e}); skipping deep k-means")
        return []
    torch.manual_seed(0)
    x = x.reshape(len(x), -1).float()
    y = torch.as_tensor(y).long()
    net = mlp(784, [128, 32], 10)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(2):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            b = perm[i:i + 128]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[b]), y[b]).backward()
            opt.step()
    feat = net[:4]
    dk = C.DeepKMeans.fit(feat, x[:2000], 10)
    xe = x[2000:2000 + n_eval].double()
    featd = feat.double()
    dk = C.DeepKMeans(featd, dk.kmeans)
    lab = dk.predict(xe)
    ref = torch.zeros(784, dtype=torch.float64)
    rows = []
    fill = x[:2000].double()
    for m in METHODS:
        t = time.perf_counter()
        rel = C.baseline_relevance(dk, xe, m, reference=ref if m != "diff2" else fill.mean(0))
        dt = time.perf_counter() - t
        res = C.insertion_curve(dk.predict, xe, rel, lab, fill, n_fill=n_fill)
        cons = dk.neon(xe, reference=ref).conservation_error().max().item() if m == "neon" else float("nan")
        rows.append({"data": "mnist", "model": "deep k-means K=10 on MLP 784-128-32", "D": 784, "n": len(xe),
                     "method": m, "auc": res.auc, "seconds": dt, "max abs(ΣR − f_c)": cons})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-mnist", action="store_true")
    args = ap.parse_args()
    n_eval, n_fill = (60, 8) if args.quick else (200, 16)
    t0 = time.perf_counter()
    rows = []
    for name in ("iris", "wine", "seeds", "digits"):
        rows += tabular(name, n_eval, n_fill, kernel=name != "digits")
        print(f"{name} done ({time.perf_counter() - t0:.0f}s)")
    if not args.no_mnist:
        rows += mnist_deep(6000 if args.quick else 12000, 20 if args.quick else 50, 4 if args.quick else 8)
    import pandas as pd

    df = pd.DataFrame(rows)
    piv = df.pivot_table(index=["data", "model"], columns="method", values="auc", sort=False)
    piv = piv[[m for m in METHODS if m in piv.columns]]
    cons = df[df.method == "neon"][["data", "model", "max abs(ΣR − f_c)"]]
    text = [
        "# NEON insertion benchmark",
        "",
        f"Machine: {machine()}. Run: `python benchmarks/neon_insertion.py{' --quick' if args.quick else ''}`"
        f" ({time.perf_counter() - t0:.0f} s). Samples explained per data set: {n_eval} (MNIST fewer); fill rows per"
        f" insertion step: {n_fill}.",
        "",
        "Insertion AUC (estimate: random fill rows, fixed seeds; higher = features ranked first restore cluster",
        "membership faster). Methods: NEON (β = 1/E[f_c]), random order, (x − x̄)², (∇f_c)², integrated gradients",
        "from the data mean (MNIST: from the black image; its NEON reference is also the black image).",
        "`nan` = not run (IG is skipped for the kernel models to keep the run short).",
        "",
        markdown(piv),
        "",
        "Conservation of NEON (exact measurement, float64): max over explained samples of |Σ_i R_i − f_c(x)|.",
        "",
        markdown(cons, index=False, fmt="{:.2e}"),
        "",
    ]
    out = "\n".join(text)
    print(out)
    if args.out:
        Path(args.out).write_text(out)


if __name__ == "__main__":
    main()
