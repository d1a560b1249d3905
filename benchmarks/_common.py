"""Small helpers shared by the benchmark scripts (run as ``python benchmarks/<name>.py``)."""

from __future__ import annotations

import platform
import subprocess


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
