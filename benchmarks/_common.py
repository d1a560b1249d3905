"""Small helpers shared by the benchmark scripts (run as ``python benchmarks/<name>.py``)."""

from __future__ import annotations

import platform
import statistics
import subprocess
import time
from collections.abc import Callable


def cpu_name() -> str:
    """The CPU as ``lscpu`` names it, with its family / model / stepping and the vector instructions PyTorch's
    kernels use on it (``platform.processor()`` where lscpu is missing).

    Virtual machines often report a generic model name ("Intel(R) Xeon(R) Processor") for different hardware; the
    model number and the kernels' instruction set tell them apart, and the ratios measured here depend on them
    (a faster convolution makes the same per-unit recording work a larger share of an epoch).
    """
    fields: dict[str, str] = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in out.splitlines()) if v}
    except (OSError, subprocess.SubprocessError):
        pass
    name = fields.get("Model name") or platform.processor() or "unknown CPU"
    ident = ", ".join(f"{k.lower()} {fields[k]}" for k in ("CPU family", "Model", "Stepping") if k in fields)
    try:
        import torch

        isa = f"PyTorch kernels: {torch.backends.cpu.get_cpu_capability()}"
    except (ImportError, AttributeError):
        isa = ""
    extra = "; ".join(x for x in (ident, isa) if x)
    return f"{name} ({extra})" if extra else name


def emit(text: str, out: str | None) -> None:
    """Print a result table and, when ``out`` is given, write it to that Markdown file."""
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, sync: Callable[[], None] | None = None,
                inner: dict[str, int] | None = None) -> dict[str, float]:
    """Median seconds per call of every function, measured in interleaved rounds (one call of each per round,
    after one warm-up round), so that drifts of a shared or throttled machine hit every variant alike and the
    ratios between them stay meaningful. ``inner[name]`` calls per timing for very short functions."""
    inner = inner or {}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds + 1):
        for k, f in fns.items():
            n = inner.get(k, 1)
            if sync:
                sync()
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            if sync:
                sync()
            if r:
                times[k].append((time.perf_counter() - t0) / n)
    return {k: statistics.median(v) for k, v in times.items()}
