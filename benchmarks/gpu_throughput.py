"""Throughput of recording, Re3 attributions and exact boundary distances for the LeNet-style CNN on MNIST.

Written for a GPU (H100/H200 class): on a CUDA machine it measures samples/second on the full MNIST test set
(10,000 images) and the same run's ratios to Captum's IntegratedGradients and KernelShap. It also runs on a CPU,
where it prints CPU numbers (on subsets for the expensive stages, extrapolation never used: every rate is
samples measured / seconds measured) and says that GPU numbers are missing.

The model is LeNet (``relu_regions.models.LeNet``) trained for one short epoch so that the activation patterns are
those of a working classifier (throughput barely depends on the weights).

Usage::

    python benchmarks/gpu_throughput.py            # CPU: a few minutes; GPU: full test set everywhere
    python benchmarks/gpu_throughput.py --quick    # small subsets (smoke test)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import cpu_name

import relu_regions as rr
from relu_regions.cli import train_model
from relu_regions.datasets import describe_mnist_source, load_mnist
from relu_regions.models import LeNet

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int = 1) -> float:
    """Best wall time of ``repeat`` runs (after one warm-up call on a small batch is done by the caller)."""
    best = float("inf")
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small subsets (smoke test)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--n", type=int, default=None, help="images for recording and Re3 (default: all 10,000)")
    p.add_argument("--n-distance", type=int, default=None,
                   help="images for exact boundary distances (default: all on GPU, 200 on CPU)")
    p.add_argument("--n-ig", type=int, default=None, help="images for Captum IG (default: all on GPU, 500 on CPU)")
    p.add_argument("--n-shap", type=int, default=None,
                   help="images for Captum KernelShap (default: 500 on GPU, 20 on CPU)")
    p.add_argument("--out", default=None, help="Markdown output (default results/gpu_throughput_<device>.md)")
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    if not gpu:
        print("NOTE: no GPU in this run — GPU numbers are MISSING; the numbers below are CPU numbers.", flush=True)
    torch.manual_seed(0)
    try:
        Xtr, ytr = load_mnist("train", limit=5000)
        Xte, yte = load_mnist("test")
    except FileNotFoundError as e:
        raise SystemExit(f"MNIST not available: {str(e).splitlines()[0]}") from e
    model = LeNet()
    train_model(model, Xtr, ytr, epochs=1, lr=2e-3, batch_size=128, seed=0, progress=False)
    model = model.to(device).eval()
    X, y = Xte.to(device), yte.to(device)

    def pick(v, gpu_default, cpu_default, quick_default):
        if v is not None:
            return min(v, len(X))
        return min(len(X), quick_default if args.quick else (gpu_default if gpu else cpu_default))

    n_rec = pick(args.n, 10000, 10000, 1000)
    n_re3 = pick(args.n, 10000, 2000, 200)
    n_dist = pick(args.n_distance, 10000, 200, 20)
    n_ig = pick(args.n_ig, 10000, 500, 50)
    n_shap = pick(args.n_shap, 500, 20, 4)
    batch = 1000 if gpu else 500
    rows = []

    def add(stage, n, seconds, note=""):
        rows.append({"stage": stage, "images": n, "seconds": seconds, "images/s": n / seconds, "note": note})
        print(f"{stage:42s} {n:6d} images  {seconds:8.2f} s  {n / seconds:10.1f} images/s  {note}", flush=True)

    with torch.no_grad():
        model(X[:8])
        pred = torch.cat([model(X[i:i + batch]).argmax(1) for i in range(0, len(X), batch)])
    acc = float((pred == y).double().mean())
    print(f"LeNet test accuracy after one short epoch: {acc:.4f}", flush=True)

    def record_all():
        with torch.no_grad(), rr.record(model) as rec:
            for i in range(0, n_rec, batch):
                model(X[i:min(n_rec, i + batch)])
            rec.region_ids()

    record_all()  # warm-up
    add("forward only (reference)", n_rec, timed(lambda: [model(X[i:min(n_rec, i + batch)]) for i in
                                                          range(0, n_rec, batch)], device, 3))
    add("recording (patterns + region ids)", n_rec, timed(record_all, device, 3))

    def re3():
        rr.affine_map(model, X[:n_re3], target=pred[:n_re3], chunk_size=batch)

    rr.affine_map(model, X[:8], target=pred[:8])
    t_re3 = timed(re3, device)
    add("Re3 attributions (exact, target = predicted)", n_re3, t_re3)

    from relu_regions.geometry import boundary_distance

    boundary_distance(model, X[:2])
    add("exact boundary distances (l2)", n_dist, timed(lambda: boundary_distance(model, X[:n_dist]), device))

    try:
        from captum.attr import IntegratedGradients, KernelShap
    except ImportError:
        print("captum is not installed: peer timings skipped")
    else:
        ig = IntegratedGradients(model)

        def run_ig():
            for i in range(0, n_ig, 100):
                ig.attribute(X[i:min(n_ig, i + 100)], target=pred[i:min(n_ig, i + 100)], n_steps=50,
                             internal_batch_size=5000)

        ig.attribute(X[:2], target=pred[:2], n_steps=50)
        add("Captum IntegratedGradients (50 steps)", n_ig, timed(run_ig, device))
        ks = KernelShap(model)
        rows_, cols_ = torch.meshgrid(torch.arange(28) // 4, torch.arange(28) // 4, indexing="ij")
        mask = (rows_ * 7 + cols_).reshape(1, 1, 28, 28).to(device)  # 49 superpixels of 4x4

        def run_shap():
            for i in range(n_shap):
                ks.attribute(X[i:i + 1], target=int(pred[i]), n_samples=200, feature_mask=mask,
                             perturbations_per_eval=200)

        add("Captum KernelShap (200 samples, 4x4 superpixels)", n_shap, timed(run_shap, device))
    re3_rate = n_re3 / t_re3
    for r in rows:
        r["vs Re3"] = r["images/s"] / re3_rate
    dev_name = torch.cuda.get_device_name(0) if gpu else cpu_name()
    md = [f"# Throughput on MNIST test images, LeNet — {device.type.upper()}{' (quick)' if args.quick else ''}", "",
          f"Device: {dev_name}; torch {torch.__version__}, {torch.get_num_threads()} threads. "
          f"Data: {describe_mnist_source('mnist')}. LeNet trained 1 epoch on 5,000 images: test accuracy "
          f"{acc:.4f}.", ""]
    if not gpu:
        md += ["**GPU numbers are missing: no GPU was available for this run.** Run "
               "`python benchmarks/gpu_throughput.py` on a CUDA machine to fill them in "
               "(results/gpu_throughput_cuda.md).", ""]
    md += ["Every rate is images measured / seconds measured in this run (best of 3 for the cheap stages, one run "
           "otherwise); 'vs Re3' is the rate relative to the exact Re3 attributions of the same run (> 1 = faster).",
           "", "| stage | images | seconds | images/s | vs Re3 | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['stage']} | {r['images']} | {r['seconds']:.2f} | {r['images/s']:.1f} | {r['vs Re3']:.3g} | "
                  f"{r['note']} |")
    out = Path(args.out) if args.out else RESULTS / f"gpu_throughput_{device.type}{'_quick' if args.quick else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
