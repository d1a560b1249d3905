"""Overhead of RegionMonitor on validation epochs of MNIST CNNs (target: at most 15% extra time).

Runs ``Trainer.validate`` over MNIST test images with no callback, with ``RegionMonitor(probe_size=0)`` (region
statistics only) and with the default probe of 16 images (adds the exact boundary distance at epoch end), in
interleaved repeats, and reports median epoch times and their paired ratios measured in this one run, for two CNNs: the
project's LeNet (``relu_regions.models.LeNet``, ~0.3 M multiply-adds per image: the callback's per-unit work is
large beside its forward) and the CNN of PyTorch's MNIST example (``pytorch/examples``, mnist/main.py: two 3x3
convolutions with 32 and 64 channels, max-pool, dropout, 9216-128-10; ~12 M multiply-adds per image). Writes
``benchmarks/results/callback_overhead.md``.

Usage: ``python benchmarks/callback_overhead.py [--quick] [--device cpu|cuda] [--models lenet,examples]``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from _common import cpu_name

warnings.filterwarnings("ignore")

import lightning.pytorch as pl  # noqa: E402

from relu_regions.datasets import load_mnist  # noqa: E402
from relu_regions.integrations.lightning import RegionMonitor  # noqa: E402
from relu_regions.models import LeNet  # noqa: E402


class ExamplesNet(nn.Module):
    """The CNN of PyTorch's MNIST example (pytorch/examples, mnist/main.py), forward as written there: functional
    ReLU and max-pool, ``torch.flatten``, and a ``log_softmax`` head (so the monitor explains ``fc2``'s output:
    ``logits_at="net.fc2"``)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, 1), nn.Conv2d(32, 64, 3, 1)
        self.dropout1, self.dropout2 = nn.Dropout(0.25), nn.Dropout(0.5)
        self.fc1, self.fc2 = nn.Linear(9216, 128), nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = torch.flatten(self.dropout1(F.max_pool2d(x, 2)), 1)
        x = self.fc2(self.dropout2(F.relu(self.fc1(x))))
        return F.log_softmax(x, dim=1)


# name -> (title, network, RegionMonitor keywords, repeats: the LeNet's ~0.5 s epochs need more to beat the noise)
MODELS = {"lenet": ("LeNet (relu_regions.models)", LeNet, {}, 45),
          "examples": ("PyTorch examples MNIST CNN (mnist/main.py)", ExamplesNet, {"logits_at": "net.fc2"}, 15)}


class LitCNN(pl.LightningModule):
    def __init__(self, net: type[nn.Module] = LeNet):
        super().__init__()
        torch.manual_seed(0)
        self.net = net()

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


def measure(net: type[nn.Module], kw: dict, loader, repeats: int, device: str) -> tuple[dict[str, list[float]], object]:
    model = LitCNN(net)
    variants = {"no callback": lambda: [],
                "RegionMonitor(probe_size=0)": lambda: [RegionMonitor(10, probe_size=0, **kw)],
                "RegionMonitor() (probe 16, boundary distance)": lambda: [RegionMonitor(10, **kw)]}
    times: dict[str, list[float]] = {k: [] for k in variants}
    epoch_time(model, loader, [], device)  # warm-up
    monitor = None
    names = list(variants)
    for r in range(repeats):
        # each round starts with another variant (no variant always follows the same one) and collects garbage
        # first (the previous round's trainers), so neither order nor the collector favours a variant
        for k in names[r % len(names):] + names[: r % len(names)]:
            cbs = variants[k]()
            gc.collect()
            times[k].append(epoch_time(model, loader, cbs, device))
            if cbs:
                monitor = cbs[0]
    return times, monitor


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="lenet,examples", help=f"comma-separated, from {sorted(MODELS)}")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "callback_overhead.md"))
    args = ap.parse_args()
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {sorted(MODELS)}")
    n, bs = (4000, 250) if args.quick else (10000, 250)
    x, y = load_mnist("test", limit=n)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=bs)
    lines = ["# RegionMonitor overhead on validation epochs (MNIST CNNs)", "",
             f"Machine: {machine(args.device)}; device `{args.device}`. The CPU is shared with other jobs, so "
             "absolute times are noisy; ratios come from interleaved repeats in one run.",
             f"Command: `python benchmarks/callback_overhead.py{' --quick' if args.quick else ''}`. One validation "
             f"epoch = {n} MNIST test images, batch {bs}, untrained networks (timing does not depend on the weights); "
             "interleaved rounds (each round runs every variant once, starting with the next variant each round, "
             "each epoch after a garbage collection). Ratio: the median over rounds of the variant's "
             "time over the same round's time without the callback (paired, so drift of the machine between rounds "
             "cancels); their quartiles show the spread between rounds. Target: at most 1.15x the epoch without the "
             "callback.", ""]
    for name in names:
        title, net, kw, repeats = MODELS[name]
        repeats = 3 if args.quick else repeats
        times, monitor = measure(net, kw, loader, repeats, args.device)
        base = times["no callback"]
        lines += [f"## {title}" + (f" — `RegionMonitor(10, {', '.join(f'{k}={v!r}' for k, v in kw.items())})`"
                                     if kw else ""), "",
                  f"{repeats} rounds.", "",
                  "| variant | median epoch time (s) | all rounds (s) | ratio to no callback (median of paired) "
                  "| quartiles of the paired ratios |",
                  "|---|---|---|---|---|"]
        for k, ts in times.items():
            ratios = [t / b for t, b in zip(ts, base)]
            q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
            lines.append(f"| {k} | {statistics.median(ts):.3f} | {', '.join(f'{t:.2f}' for t in ts)} | "
                         f"{statistics.median(ratios):.3f} | {q1:.3f}–{q3:.3f} |")
        if monitor is not None and "val" in monitor.stats:
            lines += ["", f"Regions seen in the epoch (all layers): {monitor.stats['val'].n_regions()} of "
                          f"{monitor.stats['val'].n_samples} images."]
        lines.append("")
        print("\n".join(lines[-8:]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # hand-written analysis below the marker survives a re-run (it says when it was measured)
    old = out.read_text() if out.exists() else ""
    notes = old[old.index(NOTES):] if NOTES in old else ""
    out.write_text("\n".join(lines) + ("\n" + notes if notes else ""))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
