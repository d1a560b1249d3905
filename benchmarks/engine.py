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
from _common import cpu_name, emit, interleaved

import relu_regions as rr
from relu_regions.models import LeNet, mlp


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def sync_for(device: str):
    return torch.cuda.synchronize if device.startswith("cuda") else None


def recording_times(model, x, rounds: int, device: str) -> dict[str, float]:
    """Plain forward vs the same forward inside an open ``record`` context, alternating round by round; only the
    forwards are timed.

    Each variant runs six forwards per round. The first is timed on its own (``*_first``): it follows the previous
    variant's work, and for a recording also the opening of its context, whose Python work leaves the caches cold
    (on the MLP the first recorded forward costs ~+20%, the next ones ~+9%). The other five are the steady state of
    a loop that keeps a recording open (``rec`` and the target row), against the plain forward's five.
    """
    sync = sync_for(device) or (lambda: None)
    keys = ("plain", "rec", "rec_keys", "rec_boundary")
    times: dict[str, list[float]] = {k: [] for k in keys}
    first: dict[str, list[float]] = {k: [] for k in keys}

    def fwd():
        with torch.no_grad():
            model(x)

    def timed(after=lambda: None) -> tuple[float, float]:
        sync()
        t0 = time.perf_counter()
        fwd()
        after()
        sync()
        t1 = time.perf_counter()
        for _ in range(5):
            fwd()
            after()
        sync()
        return t1 - t0, (time.perf_counter() - t1) / 5

    for r in range(rounds + 1):
        one, five = timed()
        if r:
            first["plain"].append(one)
            times["plain"].append(five)
        for key, kw in (("rec", {}), ("rec_keys", {}), ("rec_boundary", {"count_boundary": True})):
            with rr.record(model, **kw) as rec:
                one, five = timed(lambda rec=rec, k=key: (rec.region_ids() if k == "rec_keys" else None, rec.clear()))
            if r:
                first[key].append(one)
                times[key].append(five)
    out = {k: statistics.median(v) for k, v in times.items()}
    # ratios paired round by round (each round's recording over the same round's plain forward): the machine's
    # drift between rounds cancels, which ratios of separate medians do not
    for k in keys[1:]:
        out[f"ratio_{k}"] = statistics.median(a / b for a, b in zip(times[k], times["plain"]))
        out[f"ratio_{k}_first"] = statistics.median(a / b for a, b in zip(first[k], first["plain"]))
    out["plain_first"] = statistics.median(first["plain"])
    out["rec_first"] = statistics.median(first["rec"])
    return out


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

    def jac():
        torch.func.vmap(torch.func.jacrev(lambda v: model(v.unsqueeze(0)).squeeze(0)))(x)

    rt = recording_times(model, x, 8 * repeats, device)
    sync, inner = sync_for(device), {"plain": 5, "fb": 3}
    # each ratio against the reference timed in the same rounds (a heavy neighbour slows a light call down)
    t = interleaved({"plain": plain, "fb": fwd_bwd,
                     "pred": lambda: rr.affine_map(model, x, target=pred, method="reverse", check=False)},
                    2 * repeats, sync, inner)
    t_all = interleaved({"plain": plain, "all": lambda: rr.affine_map(model, x, method="reverse", check=False)},
                        repeats, sync, inner)
    t_jac = interleaved({"plain": plain, "jac": jac}, repeats, sync, inner)
    t_plain, t_fb = t["plain"], t["fb"]
    r_all, r_jac = t_all["all"] / t_all["plain"], t_jac["jac"] / t_jac["plain"]
    rp = rt["plain"]
    rows = [
        (name, "plain forward", t_plain, 1.0, "", ""),
        (name, "plain forward (timed in the recording rounds below)", rp, 1.0, "", ""),
        (name, "forward under record (open context, region keys not computed)", rt["rec"], rt["ratio_rec"],
         "≤ 1.10× fwd", rt["ratio_rec"] <= 1.10),
        (name, "first forward after opening record (vs the first plain forward of a round)", rt["rec_first"],
         rt["ratio_rec_first"], "", ""),
        (name, "forward under record + `region_ids()`", rt["rec_keys"], rt["ratio_rec_keys"], "", ""),
        (name, "forward under record(count_boundary=True)", rt["rec_boundary"], rt["ratio_rec_boundary"], "", ""),
        (name, "plain forward+backward (one class)", t_fb, t_fb / t_plain, "", ""),
        (name, "affine_map predicted class, reverse", t["pred"], t["pred"] / t_fb, "≤ 2.5× fwd+bwd",
         t["pred"] / t_fb <= 2.5),
        (name, "affine_map all classes, reverse", t_all["all"], r_all, "≤ 12× fwd", r_all <= 12),
        (name, "torch.func vmap(jacrev), all classes", t_jac["jac"], r_jac, "", ""),
    ]
    xs, scale = (x[:16], x.shape[0] / 16) if x[0].numel() > 64 and x.shape[0] > 16 else (x, 1.0)
    note = "" if scale == 1 else f" (timed on 16 samples ×{scale:g})"
    for method in ("forward", "compose"):  # D-replica methods: timed on 16 samples, scaled to the batch
        tm = interleaved({"pred": lambda m=method: rr.affine_map(model, xs, target=pred[: len(xs)], method=m,
                                                                 check=False),
                          "all": lambda m=method: rr.affine_map(model, xs, method=m, check=False)},
                         max(2, repeats // 3), sync_for(device))
        rows.append((name, f"affine_map predicted class, {method}{note}", tm["pred"] * scale,
                     tm["pred"] * scale / t_fb, "", ""))
        rows.append((name, f"affine_map all classes, {method}{note}", tm["all"] * scale,
                     tm["all"] * scale / t_plain, "", ""))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="also write the table to this Markdown file")
    args = p.parse_args()
    torch.manual_seed(0)
    mlp_model, lenet = mlp(784, [256, 128], 10), LeNet()
    rows = bench("MLP 784-256-128-10", mlp_model, torch.rand(args.batch, 784), args.repeats, args.device)
    rows += bench("LeNet CNN (MNIST)", lenet, torch.rand(args.batch, 1, 28, 28), args.repeats, args.device)
    lines = [f"Machine: {machine(args.device)}; torch {torch.__version__}; device {args.device}; batch {args.batch}; "
             f"medians over interleaved rounds ({args.repeats} for the all-class maps, {8 * args.repeats} × 5 "
             "forwards for recording, after a first forward timed on its own; the forward/compose rows on 16 samples, "
             "scaled). Every ratio is against a reference timed in the same rounds as the measured call (recording: "
             "the median of each round's recorded over plain forward; predicted-class "
             "maps vs plain forward+backward; all-class maps and vmap(jacrev) vs plain forward), so the plain "
             "forward differs a little from row to row on this shared virtual machine.", "",
             "| model | what | ms / batch | ratio | target | met |", "|---|---|---:|---:|---|---|"]
    for model, what, t, ratio, target, met in rows:
        met_s = "" if met == "" else ("yes" if met else "**no**")
        lines.append(f"| {model} | {what} | {t * 1e3:.2f} | {ratio:.2f}× | {target} | {met_s} |")
    # recording has a fixed Python cost per torch call (the function mode), so its ratio falls with the batch
    lines += ["", "Recording overhead against the batch size (same machine, same run):", "",
              "| model | batch | plain forward (ms) | under record (ms) | ratio | first forward after opening: ratio "
              "| + region_ids (ms) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for label, m, shape in (("MLP 784-256-128-10", mlp_model, (784,)), ("LeNet CNN (MNIST)", lenet, (1, 28, 28))):
        for bsz in (64, 256, 1024):
            rt = recording_times(m.to(args.device).eval(), torch.rand(bsz, *shape, device=args.device),
                                 4 * args.repeats, args.device)
            lines.append(f"| {label} | {bsz} | {rt['plain'] * 1e3:.2f} | {rt['rec'] * 1e3:.2f} | "
                         f"{rt['ratio_rec']:.2f}× | {rt['ratio_rec_first']:.2f}× | {rt['rec_keys'] * 1e3:.2f} |")
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
