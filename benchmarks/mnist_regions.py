"""Re3 Fig. 7 study: activation-region counts of MLPs vs. CNNs with an MLP head, three depths each.

The Re3 paper counts regions on the 10,000 MNIST test images (about 9,921–9,996 regions for the MLP on pixels,
3,227–6,623 for the CNN's MLP head). It analysed only the head of the CNN; here both the head-only and the
whole-network counts are reported (whole network = every ReLU and every max-pool argmax of the CNN).

Data: MNIST from the shared data directory (``relu_regions.datasets.load_mnist``); Fashion-MNIST in full when its
files (or torchvision's copy) are present, else the real 1,000/1,000 subset in ``shared/data/fashion-mnist-subset``
— the output says which one was used. Training is short (Adam, a few epochs on a training subset), so accuracies
are below the paper's; the region counts are exact for the trained weights (distinct bit-packed patterns, no
hashing).

Usage::

    python benchmarks/mnist_regions.py            # ~ a few minutes on a 2-core CPU
    python benchmarks/mnist_regions.py --quick    # smaller training subsets, ~1 minute
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn as nn
from _common import cpu_name

import relu_regions as rr
from relu_regions.cli import train_model
from relu_regions.datasets import describe_mnist_source, load_mnist
from relu_regions.models import mlp

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    name = cpu_name()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{name}, {torch.get_num_threads()} torch threads, {gpu}"


class CNN(nn.Module):
    """LeNet-style convolutional features (Conv-ReLU-MaxPool ×2) feeding an MLP head of the given depth."""

    def __init__(self, hidden: list[int], n_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.head = mlp(16 * 4 * 4, hidden, n_classes)

    def forward(self, x):
        return self.head(self.features(x))


class FlatMLP(nn.Module):
    """An MLP on flattened pixels (``net`` is the MLP)."""

    def __init__(self, hidden: list[int], n_classes: int = 10):
        super().__init__()
        self.net = mlp(28 * 28, hidden, n_classes)

    def forward(self, x):
        return self.net(x.flatten(1))


def count_regions(model: nn.Module, X: torch.Tensor, batch: int = 1000) -> dict[str, int | float]:
    """Exact region counts (whole network and head only) and accuracy inputs, recording in batches."""
    with torch.no_grad(), rr.record(model) as rec:
        logits = torch.cat([model(X[i:i + batch]) for i in range(0, len(X), batch)])
        names = rec.layer_names
        head = [n for n in names if n.startswith("head.")]
        whole = len(torch.unique(rec.packed(), dim=0))
        head_only = len(torch.unique(rec.packed(head), dim=0)) if head else whole
    return {"whole": whole, "head": head_only, "pred": logits.argmax(1)}


def run(kind: str, args, data: tuple, widths: int) -> list[dict]:
    Xtr, ytr, Xte, yte = data
    rows = []
    for depth in (1, 2, 3):
        torch.manual_seed(args.seed)
        hidden = [widths] * depth
        model = (FlatMLP if kind == "MLP" else CNN)(hidden)
        t0 = time.perf_counter()
        train_model(model, Xtr, ytr, epochs=args.epochs, lr=1e-3, batch_size=128, seed=args.seed,
                    progress=not args.no_progress, desc=f"{kind} depth {depth}")
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = count_regions(model.eval(), Xte)
        t_count = time.perf_counter() - t0
        acc = float((res["pred"] == yte).double().mean())
        rows.append({"model": kind, "hidden": "-".join(map(str, hidden)), "test accuracy": acc,
                     "regions (head only)": res["head"] if kind == "CNN" else "—",
                     "regions (whole network)": res["whole"], "test images": len(yte),
                     "train s": f"{t_train:.1f}", "count s": f"{t_count:.2f}"})
        print(rows[-1], flush=True)
    return rows


def table(rows: list[dict]) -> str:
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="5,000 training images, 1 epoch")
    p.add_argument("--train", type=int, default=20000, help="MNIST training images used (default 20000)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 2; 1 with --quick)")
    p.add_argument("--width", type=int, default=64, help="hidden width of every MLP layer (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "mnist_regions.md"))
    args = p.parse_args()
    if args.quick:
        args.train = min(args.train, 5000)
    args.epochs = args.epochs or (1 if args.quick else 2)
    torch.manual_seed(args.seed)
    t_all = time.perf_counter()
    sections = []
    # --- MNIST ---------------------------------------------------------------------------------------------------
    try:
        Xtr, ytr = load_mnist("train", limit=args.train)
        Xte, yte = load_mnist("test")
    except FileNotFoundError as e:
        print(f"MNIST not available, skipped: {str(e).splitlines()[0]}")
        sections.append(("MNIST", "not run: " + str(e).splitlines()[0], []))
    else:
        src = describe_mnist_source("mnist")
        print("MNIST:", src)
        rows = run("MLP", args, (Xtr, ytr, Xte, yte), args.width) + run("CNN", args, (Xtr, ytr, Xte, yte),
                                                                          args.width)
        sections.append(("MNIST", f"{src}; trained on the first {len(ytr)} training images for {args.epochs} "
                                  f"epoch(s); regions counted on all {len(yte)} test images.", rows))
    # --- Fashion-MNIST ---------------------------------------------------------------------------------------------
    try:
        Ftr, ftr = load_mnist("train", kind="fashion-mnist", limit=args.train)
        Fte, fte = load_mnist("test", kind="fashion-mnist")
    except FileNotFoundError as e:
        print(f"Fashion-MNIST not available, skipped: {str(e).splitlines()[0]}")
        sections.append(("Fashion-MNIST", "not run: " + str(e).splitlines()[0], []))
    else:
        src = describe_mnist_source("fashion-mnist")
        subset = len(fte) < 10000
        which = ("the real 1,000/1,000 SUBSET (the full set is not reachable here)" if subset
                 else "the full set")
        print("Fashion-MNIST:", src, "—", which)
        fargs = argparse.Namespace(**vars(args))
        if subset:  # a small training set: more epochs to learn something
            fargs.epochs = 3 if args.quick else 8
        rows = run("MLP", fargs, (Ftr, ftr, Fte, fte), args.width) + run("CNN", fargs, (Ftr, ftr, Fte, fte),
                                                                           args.width)
        sections.append(("Fashion-MNIST", f"{src}: {which}; trained on {len(ftr)} images for {fargs.epochs} "
                                          f"epochs; regions counted on all {len(fte)} test images.", rows))
    total = time.perf_counter() - t_all
    md = [f"# Activation regions of MLPs vs. CNN+MLP head (Re3 Fig. 7 study){' — quick run' if args.quick else ''}",
          "", f"Machine: {machine()}. torch {torch.__version__}. Total time {total:.0f} s. Seed {args.seed}.",
          "", "Command: `python benchmarks/mnist_regions.py" + (" --quick" if args.quick else "") + "`", "",
          "Region counts are exact (distinct bit-packed activation patterns; for the whole CNN they include the "
          "max-pool argmax of every window). 'head only' = the ReLUs of the MLP head, the granularity analysed in "
          "the Re3 paper (paper, MNIST: ~9,921–9,996 regions for the MLP, 3,227–6,623 for the CNN head; its "
          f"architectures and training differ from this short run: hidden width {args.width} here).", ""]
    for title, note, rows in sections:
        md += [f"## {title}", "", note, ""]
        if rows:
            md += [table(rows), ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md))
    print("\n".join(md))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
