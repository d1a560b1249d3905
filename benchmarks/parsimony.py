"""Region-parsimony regulariser on MNIST: region count, boundary distance and accuracy with and without it.

For an MLP and a LeNet-style CNN, trains the same initialisation on the same data order for the same number of
epochs twice — cross-entropy only, and cross-entropy + ``lam * parsimony_penalty`` — then measures on held-out test
images: the number of distinct activation regions (all layers, 64-bit region keys), the median exact Euclidean
distance to the region boundary (:func:`relu_regions.geometry.boundary_distance`, all inequalities incl.
max-pool) on a probe subset, and test accuracy. Writes a Markdown table to ``benchmarks/results/parsimony.md``.

Usage: ``python benchmarks/parsimony.py [--quick] [--models mlp,lenet] [--out FILE]``. Needs MNIST under
../shared/data (see relu_regions.datasets).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import cpu_name

from relu_regions.datasets import load_mnist
from relu_regions.geometry import boundary_distance
from relu_regions.models import LeNet, mlp
from relu_regions.training import boundary_distances, evaluate, parsimony_penalty


def machine() -> str:
    return f"{torch.get_num_threads()}-thread CPU ({cpu_name()}), no GPU" if not torch.cuda.is_available() else \
        torch.cuda.get_device_name()


def make(kind: str, seed: int):
    torch.manual_seed(seed)
    if kind == "mlp":
        return torch.nn.Sequential(torch.nn.Flatten(), mlp(784, [128, 128], 10))
    return LeNet()


def train(kind, x, y, epochs, lam, gamma, l1, max_samples, seed, bs=100, lr=1e-3):
    model = make(kind, seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), bs):
            idx = perm[i:i + bs]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if lam:
                loss = loss + lam * parsimony_penalty(model, x[idx], gamma=gamma, l1=l1, max_samples=max_samples)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model, time.perf_counter() - t0


def measure(model, xt, yt, n_probe):
    loader = [(xt[i:i + 500], yt[i:i + 500]) for i in range(0, len(xt), 500)]
    stats = evaluate(model, loader, n_classes=10, progress=False)
    bd = boundary_distance(model, xt[:n_probe]).distance
    bd = bd[torch.isfinite(bd)]
    relu = boundary_distances(model, xt[:n_probe])  # ReLU hyperplanes only (max-pool switches left out)
    relu = relu[torch.isfinite(relu)]
    return {"regions": stats.n_regions(), "regions_share": stats.n_regions() / stats.n_samples,
            "median_dist": float(bd.median()), "median_relu": float(relu.median()),
            "on_boundary": float((bd == 0).double().mean()), "acc": stats.accuracy}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller subsets and fewer epochs")
    ap.add_argument("--models", default="mlp,lenet")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "parsimony.md"))
    args = ap.parse_args()
    n_train, n_test, n_probe = (4000, 1000, 100) if args.quick else (12000, 5000, 200)
    epochs = {"mlp": 3, "lenet": 2} if args.quick else {"mlp": 6, "lenet": 3}
    # (lam, gamma, l1, max_samples). The hinge sums over units (it counts hyperplanes within gamma), so lam must be
    # small: a quick sweep on 4000 images gave lam=0.02 -> -24 points accuracy; 1e-3..3e-3 is the useful range.
    settings = {"mlp": [(1e-3, 0.3, 0.0, 8), (3e-3, 0.3, 0.0, 8), (1e-3, 0.3, 1e-2, 8)],
                "lenet": [(3e-3, 0.3, 0.0, 2), (1e-4, 0.3, 0.0, 2)]}
    x, y = load_mnist("train", limit=n_train)
    xt, yt = load_mnist("test", limit=n_test)
    rows = []
    for kind in args.models.split(","):
        base, t_base = train(kind, x, y, epochs[kind], 0.0, 1.0, 0.0, None, seed=0)
        m = measure(base, xt, yt, n_probe)
        rows.append((kind, "cross-entropy", epochs[kind], t_base, m))
        print(kind, "baseline", f"{t_base:.0f}s", m, flush=True)
        for lam, gamma, l1, ms in settings[kind]:
            reg, t_reg = train(kind, x, y, epochs[kind], lam, gamma, l1, ms, seed=0)
            m = measure(reg, xt, yt, n_probe)
            label = f"+ {lam}·parsimony(γ={gamma}, l1={l1}, {ms} samples/step)"
            rows.append((kind, label, epochs[kind], t_reg, m))
            print(kind, label, f"{t_reg:.0f}s", m, flush=True)
    lines = [
        "# Region-parsimony regulariser on MNIST",
        "",
        f"Machine: {machine()}; shared with other jobs, so training times are indicative only.",
        f"Command: `{command(args)}`. Train: first {n_train} MNIST "
        f"training images; evaluation: first {n_test} test images; boundary distance on the first {n_probe}.",
        "Same seed, initialisation and batch order with and without the regulariser; Adam lr 1e-3, batch 100.",
        "",
        "| model | loss | epochs | train time (s) | regions on test | regions / samples | median boundary "
        "distance (L2) | share on a boundary | median ReLU-hyperplane distance (L2) | test accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, label, ep, t, m in rows:
        lines.append(f"| {kind} | {label} | {ep} | {t:.0f} | {m['regions']} | {m['regions_share']:.3f} | "
                     f"{m['median_dist']:.4g} | {m['on_boundary']:.2f} | {m['median_relu']:.4g} | "
                     f"{100 * m['acc']:.2f}% |")
    lines += ["", "Regions: distinct activation patterns of all layers among the test images (64-bit region keys: "
              "these patterns are longer than 64 bits, so keys are hashes; pair collision probability about "
              "2^-63, see `relu_regions.keys`). "
              "Boundary distance: exact Euclidean distance to the nearest inequality of the region "
              "(ReLU units and max-pool argmax comparisons), `relu_regions.geometry.boundary_distance`; it is 0 for "
              "inputs on a boundary (for LeNet: max-pool windows whose largest inputs tie -- equal positive values "
              "over the flat background in channels with a positive bias; tied zeros after a ReLU are no boundary, "
              "their units do not depend on the input there), so the share on a boundary is reported too. "
              "ReLU-hyperplane distance: "
              "`relu_regions.training.boundary_distances`, the nearest ReLU hyperplane only (equal to the full "
              "distance for the MLP; an upper bound for LeNet). The regulariser's hinge acts on ReLU hyperplanes.",
              ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


def command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run's table."""
    parts = ["python benchmarks/parsimony.py"] + (["--quick"] if args.quick else [])
    if args.models != "mlp,lenet":
        parts.append(f"--models {args.models}")
    default = Path(__file__).parent / "results" / "parsimony.md"
    if Path(args.out).resolve() != default.resolve():
        parts.append(f"--out {args.out}")
    return " ".join(parts)


if __name__ == "__main__":
    main()
