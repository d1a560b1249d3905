"""Engine benchmark: recording overhead and the cost of exact affine maps, as ratios measured in one run.

Prints a Markdown table: plain forward; forward under ``record``; ``affine_map`` for the predicted class and for
all classes, per method; ``torch.func`` vmap(jacrev) for comparison — on an MLP (784-256-128-10) and a
LeNet-style MNIST CNN, random weights. Targets (issue 2): recording ≤ 1.10× a plain forward; predicted-class map
≤ 2.5× a plain forward+backward; all-class map ≤ 12× a plain forward.

Usage: ``python benchmarks/engine.py [--batch 256] [--repeats 10] [--device cpu|cuda] [--out FILE]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import cpu_name, emit

import relu_regions as rr
from relu_regions.models import LeNet, mlp


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def timeit(fn, repeats: int, device: str) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(name: str, model: torch.nn.Module, x: torch.Tensor, repeats: int, device: str) -> list[tuple]:
    model = model.to(device).eval()
    x = x.to(device)
    with torch.no_grad():
        pred = model(x).argmax(1)

    def plain():
        with torch.no_grad():
            model(x)

    def fwd_bwd():
        xx = x.clone().requires_grad_(True)
        torch.autograd.grad(model(xx).gather(1, pred[:, None]).sum(), xx)

    with rr.record(model) as rec:  # steady state: the context stays open over many batches

        def recorded():
            with torch.no_grad():
                model(x)
            rec.clear()

        t_rec = timeit(recorded, repeats, device)

    with rr.record(model, count_boundary=False) as rec2:

        def keys_only():
            with torch.no_grad():
                model(x)
            rec2.clear()

        t_keys = timeit(keys_only, repeats, device)

    def recorded_cold():
        with torch.no_grad(), rr.record(model):
            model(x)

    t_plain = timeit(plain, repeats, device)
    t_fb = timeit(fwd_bwd, repeats, device)
    rows = [
        (name, "plain forward", t_plain, 1.0, "", ""),
        (name, "forward under record (open context)", t_rec, t_rec / t_plain, "≤ 1.10× fwd", t_rec / t_plain <= 1.10),
        (name, "forward under record (enter+exit each batch)", timeit(recorded_cold, repeats, device),
         None, "", ""),
        (name, "forward under record, count_boundary=False", t_keys, t_keys / t_plain, "≤ 1.10× fwd",
         t_keys / t_plain <= 1.10),
        (name, "plain forward+backward (one class)", t_fb, t_fb / t_plain, "", ""),
    ]
    rows[2] = rows[2][:3] + (rows[2][2] / t_plain,) + rows[2][4:]
    for method in ("reverse", "forward", "compose"):
        if method != "reverse" and x[0].numel() > 64 and x.shape[0] > 16:
            xs = x[:16]  # D-replica methods: timed on 16 samples, scaled to the batch (stated in the table)
            scale = x.shape[0] / 16
        else:
            xs, scale = x, 1.0
        t_pred = timeit(lambda xs=xs, m=method: rr.affine_map(model, xs, target=pred[: len(xs)], method=m,
                                                              check=False), max(3, repeats // 3), device) * scale
        t_all = timeit(lambda xs=xs, m=method: rr.affine_map(model, xs, method=m, check=False),
                       max(3, repeats // 3), device) * scale
        note = "" if scale == 1 else f" (timed on 16 samples ×{scale:g})"
        rows.append((name, f"affine_map predicted class, {method}{note}", t_pred, t_pred / t_fb, "≤ 2.5× fwd+bwd"
                     if method == "reverse" else "", t_pred / t_fb <= 2.5 if method == "reverse" else ""))
        rows.append((name, f"affine_map all classes, {method}{note}", t_all, t_all / t_plain, "≤ 12× fwd"
                     if method == "reverse" else "", t_all / t_plain <= 12 if method == "reverse" else ""))

    def jac():
        torch.func.vmap(torch.func.jacrev(lambda v: model(v.unsqueeze(0)).squeeze(0)))(x)

    t_jac = timeit(jac, max(3, repeats // 3), device)
    rows.append((name, "torch.func vmap(jacrev), all classes", t_jac, t_jac / t_plain, "", ""))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="also write the table to this Markdown file")
    args = p.parse_args()
    torch.manual_seed(0)
    rows = bench("MLP 784-256-128-10", mlp(784, [256, 128], 10), torch.rand(args.batch, 784), args.repeats,
                 args.device)
    rows += bench("LeNet CNN (MNIST)", LeNet(), torch.rand(args.batch, 1, 28, 28), args.repeats, args.device)
    lines = [f"Machine: {machine(args.device)}; torch {torch.__version__}; device {args.device}; batch {args.batch}; "
             f"median of {args.repeats} runs (fewer for maps). Ratios: record vs plain forward; "
             "predicted-class maps vs plain forward+backward; all-class maps and vmap(jacrev) vs plain forward.", "",
             "| model | what | ms / batch | ratio | target | met |", "|---|---|---:|---:|---|---|"]
    for model, what, t, ratio, target, met in rows:
        met_s = "" if met == "" else ("yes" if met else "**no**")
        lines.append(f"| {model} | {what} | {t * 1e3:.2f} | {ratio:.2f}× | {target} | {met_s} |")
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
