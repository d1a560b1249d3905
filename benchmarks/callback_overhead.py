"""Overhead of RegionMonitor on validation epochs of MNIST CNNs (target: at most 15% extra time).

Runs ``Trainer.validate`` over MNIST test images with no callback, with ``RegionMonitor(probe_size=0)`` (region
statistics only) and with the default probe of 16 images (adds the exact boundary distance at epoch end), in
interleaved repeats, and reports median epoch times and their paired ratios measured in this one run, for two CNNs: the
project's LeNet (``relu_regions.models.LeNet``, ~0.3 M multiply-adds per image: the callback's per-unit work is
large beside its forward) and the CNN of PyTorch's MNIST example (``pytorch/examples``, mnist/main.py: two 3x3
convolutions with 32 and 64 channels, max-pool, dropout, 9216-128-10; ~12 M multiply-adds per image). Writes
``benchmarks/results/callback_overhead.md``.

The rounds of each network are split over several processes run one after the other (``--processes``, default
3): on a shared machine a process's conditions (where its memory lies, its neighbours) shift the ratio it measures by
a few points, which no number of rounds inside one process averages out. The table pools the paired ratios of all
processes, with a bootstrap confidence interval of their median, and lists each process's own median.

Each network is measured twice on the CPU, under two settings of glibc's ``malloc`` (environment variables of the
worker processes, the same for every variant): its defaults, which return freed memory to the system and map large
blocks afresh, so that a later batch's tensors may be paged in again (minor page faults, ~1 µs each; how many depends
on the process's allocation history: 0 to ~1.3 million per example-CNN epoch, with or without the callback), and
with ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set high, so that freed memory is reused (what
PyTorch's CPU tuning advice gets from jemalloc or tcmalloc). The table gives each variant's median page faults per
epoch.

Usage: ``python benchmarks/callback_overhead.py [--quick] [--device cpu|cuda] [--models lenet,examples]
[--processes K] [--allocators default,no-trim]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
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


# name -> (title, network, RegionMonitor keywords, rounds in all: the LeNet's ~0.5 s epochs need more to beat the noise)
MODELS = {"lenet": ("LeNet (relu_regions.models)", LeNet, {}, 60),
          "examples": ("PyTorch examples MNIST CNN (mnist/main.py)", ExamplesNet, {"logits_at": "net.fc2"}, 15)}
# glibc malloc settings of the worker processes: name -> (description, environment)
ALLOCATORS = {
    "default": ("glibc malloc, default settings", {}),
    "no-trim": ("glibc malloc with `MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=17179869184` (freed "
                "memory is kept and reused, no large blocks mapped afresh)",
                {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "17179869184"}),
}
VARIANTS = ("no callback", "RegionMonitor(probe_size=0)", "RegionMonitor() (probe 16, boundary distance)")


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


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def epoch_time(model, loader, callbacks, device, faults: list | None = None) -> float:
    t = pl.Trainer(accelerator=device, devices=1, logger=False, enable_progress_bar=False,
                   enable_checkpointing=False, enable_model_summary=False, callbacks=callbacks)
    f0 = minor_faults()
    t0 = time.perf_counter()
    t.validate(model, loader, verbose=False)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if faults is not None:
        faults.append(minor_faults() - f0)
    return dt


def measure(net: type[nn.Module], kw: dict, loader, repeats: int, device: str) -> tuple[dict, dict, dict, object]:
    model = LitCNN(net)
    variants = dict(zip(VARIANTS, (lambda: [], lambda: [RegionMonitor(10, probe_size=0, **kw)],
                                   lambda: [RegionMonitor(10, **kw)])))
    times: dict[str, list[float]] = {k: [] for k in variants}
    faults: dict[str, list[int]] = {k: [] for k in variants}
    # untimed warm-up epochs, one per variant (the monitor's first epoch in a process traces the model with
    # torch.fx and builds its plans, once): kept apart as "first"
    first = {k: epoch_time(model, loader, variants[k](), device) for k in variants}
    monitor = None
    names = list(variants)
    for r in range(repeats):
        # each round starts with another variant (no variant always follows the same one) and collects garbage
        # first (the previous round's trainers), so neither order nor the collector favours a variant
        for k in names[r % len(names):] + names[: r % len(names)]:
            cbs = variants[k]()
            gc.collect()
            times[k].append(epoch_time(model, loader, cbs, device, faults[k]))
            if cbs:
                monitor = cbs[0]
    return times, faults, first, monitor


def loader_for(quick: bool) -> tuple[torch.utils.data.DataLoader, int, int]:
    n, bs = (4000, 250) if quick else (10000, 250)
    x, y = load_mnist("test", limit=n)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=bs), n, bs


def worker(args) -> None:
    """One process's rounds of one network: prints ``{"times": {variant: [s, ...]}, "faults": {variant: [n, ...]},
    "first": {variant: s}, "regions": [seen, of]}``."""
    title, net, kw, _ = MODELS[args.worker]
    loader, _, _ = loader_for(args.quick)
    times, faults, first, monitor = measure(net, kw, loader, args.rounds, args.device)
    stats = monitor.stats.get("val") if monitor is not None else None
    regions = [stats.n_regions(), stats.n_samples] if stats is not None else None
    print("RESULT " + json.dumps({"times": times, "faults": faults, "first": first, "regions": regions}), flush=True)


def run_worker(name: str, rounds: int, args, allocator: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--rounds", str(rounds), "--device", args.device]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | ALLOCATORS[allocator][1]
    out = subprocess.run(cmd + (["--quick"] if args.quick else []), capture_output=True, text=True, check=True,
                         env=env)
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _faults(counts: list[int]) -> str:
    return f"{statistics.median(counts):,.0f}; {min(counts):,}-{max(counts):,}"


def median_ci(values: list[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the median (percentile method, fixed seed)."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n_boot))
    return meds[int(0.025 * n_boot)], meds[int(0.975 * n_boot) - 1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="lenet,examples", help=f"comma-separated, from {sorted(MODELS)}")
    ap.add_argument("--processes", type=int, default=3, help="processes, one after the other, per network")
    ap.add_argument("--allocators", default="default,no-trim",
                    help=f"comma-separated malloc settings of the worker processes, from {sorted(ALLOCATORS)}")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "callback_overhead.md"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {sorted(MODELS)}")
    allocators = [a for a in args.allocators.split(",") if a]
    if not allocators or any(a not in ALLOCATORS for a in allocators):
        ap.error(f"--allocators: choose from {sorted(ALLOCATORS)}")
    k = max(1, args.processes)
    _, n, bs = loader_for(args.quick)
    lines = ["# RegionMonitor overhead on validation epochs (MNIST CNNs)", "",
             f"Machine: {machine(args.device)}; device `{args.device}`. The CPU is shared with other jobs, so "
             "absolute times are noisy; ratios come from interleaved repeats.",
             f"Command: `python benchmarks/callback_overhead.py{' --quick' if args.quick else ''}"
             f"{f' --processes {k}' if k != 3 else ''}"
             f"{f' --allocators {args.allocators}' if allocators != list(ALLOCATORS) else ''}`. One validation "
             f"epoch = `Trainer.validate` over {n} MNIST test images, batch {bs}, untrained networks (timing does "
             "not depend on the weights). Interleaved "
             "rounds after one untimed epoch of each variant: each round runs every variant once, starting with the "
             "next variant each round, each epoch after a garbage collection; the rounds are split over "
             f"{k} processes run one after the other. Ratio: "
             "the variant's time over the same round's time without the callback (paired, so drift of the machine "
             "between rounds cancels); the table gives the median of all processes' paired ratios, a 95% bootstrap "
             "interval of that median, their quartiles, and each process's own median. Each network runs under "
             "each malloc setting in turn (see the script's docstring); page faults: minor faults of the worker "
             "process during the epoch (`getrusage`). Target: at most 1.15x the epoch without the callback.", ""]
    for name, allocator in [(m, a) for m in names for a in allocators]:
        title, net, kw, rounds = MODELS[name]
        rounds = 3 if args.quick else rounds
        per = [rounds // k + (i < rounds % k) for i in range(k)]
        runs = [run_worker(name, r, args, allocator) for r in per if r]
        times = {v: [t for run in runs for t in run["times"][v]] for v in VARIANTS}
        ratios_by_run = {v: [[t / b for t, b in zip(run["times"][v], run["times"][VARIANTS[0]])] for run in runs]
                         for v in VARIANTS}
        lines += [f"## {title}" + (f" — `RegionMonitor(10, {', '.join(f'{a}={b!r}' for a, b in kw.items())})`"
                                     if kw else "") + f"; {ALLOCATORS[allocator][0]}", "",
                  f"{rounds} rounds in {len(runs)} processes ({', '.join(map(str, [r for r in per if r]))}).", "",
                  "| variant | median epoch time (s) | ratio to no callback (median of paired) | 95% interval of "
                  "the median | quartiles of the paired ratios | median per process | page faults per epoch (median; "
                  "min-max) | all rounds (s) |",
                  "|---|---|---|---|---|---|---|---|"]
        for v in VARIANTS:
            ratios = [r for rr in ratios_by_run[v] for r in rr]
            q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
            lo, hi = median_ci(ratios)
            lines.append(f"| {v} | {statistics.median(times[v]):.3f} | {statistics.median(ratios):.3f} | "
                         f"{lo:.3f}–{hi:.3f} | {q1:.3f}–{q3:.3f} | "
                         f"{', '.join(f'{statistics.median(rr):.3f}' for rr in ratios_by_run[v])} | "
                         f"{_faults([f for run in runs for f in run['faults'][v]])} | "
                         f"{' / '.join(', '.join(f'{t:.2f}' for t in run['times'][v]) for run in runs)} |")
        firsts = {v: ", ".join(f"{run['first'][v]:.2f}" for run in runs) for v in VARIANTS}
        lines += ["", "Untimed first epochs of each process (warm-up, in this order; the monitor's first epoch in a "
                      "process traces the model and builds its plans once): "
                  + "; ".join(f"{v}: {firsts[v]} s" for v in VARIANTS) + "."]
        seen = runs[-1]["regions"]
        if seen:
            lines += ["", f"Regions seen in the epoch (all layers): {seen[0]} of {seen[1]} images."]
        lines.append("")
        print("\n".join(lines[-10:]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # hand-written analysis below the marker survives a re-run (it says when it was measured)
    old = out.read_text() if out.exists() else ""
    notes = old[old.index(NOTES):] if NOTES in old else ""
    out.write_text("\n".join(lines) + ("\n" + notes if notes else ""))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
