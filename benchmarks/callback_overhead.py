"""Overhead of RegionMonitor on validation epochs of the MNIST LeNet (target: at most 15% extra time).

Runs ``Trainer.validate`` over MNIST test images with no callback, with ``RegionMonitor(probe_size=0)`` (region
statistics only) and with the default probe of 64 images (adds the exact boundary distance at epoch end), in
interleaved repeats, and reports median epoch times and their ratios measured in this one run. Writes
``benchmarks/results/callback_overhead.md``.

Usage: ``python benchmarks/callback_overhead.py [--quick] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import cpu_name

warnings.filterwarnings("ignore")

import lightning.pytorch as pl  # noqa: E402

from relu_regions.datasets import load_mnist  # noqa: E402
from relu_regions.integrations.lightning import RegionMonitor  # noqa: E402
from relu_regions.models import LeNet  # noqa: E402


class LitCNN(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = LeNet()

    def forward(self, x):
        return self.net(x)

    def validation_step(self, batch, i):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))


NOTES = "<!-- notes: kept by re-runs -->"


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU {cpu_name()}, {torch.get_num_threads()} threads, no GPU"


def epoch_time(model, loader, callbacks, device) -> float:
    t = pl.Trainer(accelerator=device, devices=1, logger=False, enable_progress_bar=False,
                   enable_checkpointing=False, enable_model_summary=False, callbacks=callbacks)
    t0 = time.perf_counter()
    t.validate(model, loader, verbose=False)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "callback_overhead.md"))
    args = ap.parse_args()
    n, repeats, bs = (4000, 3, 250) if args.quick else (10000, 5, 250)
    x, y = load_mnist("test", limit=n)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=bs)
    model = LitCNN()
    variants = {"no callback": lambda: [],
                "RegionMonitor(probe_size=0)": lambda: [RegionMonitor(10, probe_size=0)],
                "RegionMonitor() (probe 16, boundary distance)": lambda: [RegionMonitor(10)]}
    times = {k: [] for k in variants}
    epoch_time(model, loader, [], args.device)  # warm-up
    monitor = None
    for _ in range(repeats):
        for k, make in variants.items():
            cbs = make()
            times[k].append(epoch_time(model, loader, cbs, args.device))
            if cbs:
                monitor = cbs[0]
    base = statistics.median(times["no callback"])
    lines = ["# RegionMonitor overhead on validation epochs (MNIST LeNet)", "",
             f"Machine: {machine(args.device)}; device `{args.device}`. The CPU is shared with other jobs, so "
             "absolute times are noisy; ratios come from interleaved repeats in one run.",
             f"Command: `python benchmarks/callback_overhead.py{' --quick' if args.quick else ''}`. One validation "
             f"epoch = {n} MNIST test images, batch {bs}, untrained LeNet (timing does not depend on the weights); "
             f"median of {repeats} repeats.", "",
             "| variant | median epoch time (s) | all repeats (s) | ratio to no callback |", "|---|---|---|---|"]
    for k, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| {k} | {med:.3f} | {', '.join(f'{t:.2f}' for t in ts)} | {med / base:.3f} |")
    if monitor is not None and "val" in monitor.stats:
        lines += ["", f"Regions seen in the epoch (all layers): {monitor.stats['val'].n_regions()} of "
                      f"{monitor.stats['val'].n_samples} images."]
    lines.append("")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # hand-written analysis below the marker survives a re-run (it says when it was measured)
    old = out.read_text() if out.exists() else ""
    notes = old[old.index(NOTES):] if NOTES in old else ""
    out.write_text("\n".join(lines) + ("\n" + notes if notes else ""))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
