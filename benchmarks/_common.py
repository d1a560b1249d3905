"""Small helpers shared by the benchmark scripts (run as ``python benchmarks/<name>.py``)."""

from __future__ import annotations

import platform
import statistics
import subprocess
import time
from collections.abc import Callable


def cpu_name() -> str:
    """The CPU model as ``lscpu`` names it (``platform.processor()`` where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    except (OSError, subprocess.SubprocessError):
        name = ""
    return name or platform.processor() or "unknown CPU"


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
