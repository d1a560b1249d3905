"""A self-contained analysis report of a piecewise-linear classifier: HTML page + Markdown summary.

:func:`build_report` runs the analysis (predictions, activation regions, exact Re3 contributions, and — when the
corresponding modules are installed — the attribution comparison, validity curve, boundary distances and a Sankey
diagram) and returns a :class:`Report`; :meth:`Report.write` writes ``index.html``, ``summary.md`` and
``figures/*.png`` into a directory *atomically* (everything goes to a temporary sibling directory that is moved
into place only when complete, so a failure never leaves a half-written report).

The HTML embeds every figure as a base64 PNG and references no external URL, so it renders offline. An
interactive Sankey diagram is embedded as inline plotly JSON together with plotly's JavaScript bundle (shipped
inside the ``plotly`` package, so still offline); without plotly a static rendering is used.

Every section that depends on an optional piece (``relu_regions.regions``, ``.attributions``, ``.compare``,
``.geometry``, ``.plots``) degrades to a line "not available: <reason>" instead of failing the report.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .recording import record
from .state import preserved
from .training import _check_class_scores

Tensor = torch.Tensor

__all__ = ["OPTIONAL_SECTIONS", "REPORT_MARKER", "Figure", "Report", "Section", "build_report", "write_atomically"]

#: Optional report sections (see ``build_report(include=...)``).
OPTIONAL_SECTIONS = ("regionstats", "re3", "compare", "validity", "sankey")

#: File written into every report directory; :meth:`Report.write` only replaces directories that carry it.
REPORT_MARKER = ".relu_regions_report"

# a region is confused when the share of its majority true class is below this (Re3; RegionStats' default)
_CONFUSED_PURITY = 0.7


# --------------------------------------------------------------------------------------------------------------
# Report containers
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Figure:
    """A PNG figure (``png`` bytes) with a caption; ``name`` is its file name stem under ``figures/``."""

    name: str
    png: bytes
    caption: str = ""


@dataclass
class Section:
    """One report section.

    Attributes
    ----------
    title : str
    text : list of str
        Paragraphs (plain text; escaped in HTML).
    tables : list of (caption, pandas.DataFrame-like or list of dict rows)
    figures : list of Figure
    html_fragments : list of str
        Trusted inline HTML (e.g. an interactive plotly figure), added to the HTML page only.
    available : bool
        False when a required optional piece is missing; ``reason`` then says why.
    """

    title: str
    text: list[str] = field(default_factory=list)
    tables: list[tuple[str, Any]] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    html_fragments: list[str] = field(default_factory=list)
    available: bool = True
    reason: str = ""

    @classmethod
    def missing(cls, title: str, reason: str) -> Section:
        """A section whose content could not be produced."""
        return cls(title=title, available=False, reason=reason)


@dataclass
class Report:
    """The analysis report; render with :meth:`to_html` / :meth:`to_markdown`, save with :meth:`write`.

    Attributes
    ----------
    title : str
    meta : dict
        Key facts shown at the top (model, data, accuracy, timing, ...).
    sections : list of Section
    results : dict
        Machine-readable numbers (accuracy, region counts, ...) for tests and scripts.
    """

    title: str
    meta: dict[str, Any]
    sections: list[Section]
    results: dict[str, Any] = field(default_factory=dict)

    def section(self, title: str) -> Section:
        """The section with this title (KeyError if absent)."""
        for s in self.sections:
            if s.title == title:
                return s
        raise KeyError(f"no section {title!r}; sections are {[s.title for s in self.sections]}")

    # -- rendering ---------------------------------------------------------------------------------------------

    def to_markdown(self, figure_dir: str = "figures") -> str:
        """Markdown summary; figures are linked as ``figure_dir/<name>.png``."""
        lines = [f"# {self.title}", ""]
        for k, v in self.meta.items():
            lines.append(f"- **{k}**: {v}")
        lines.append("")
        for s in self.sections:
            lines += [f"## {s.title}", ""]
            if not s.available:
                lines += [f"*not available: {s.reason}*", ""]
                continue
            for p in s.text:
                lines += [p, ""]
            for caption, table in s.tables:
                if caption:
                    lines += [f"**{caption}**", ""]
                lines += [_table_markdown(table), ""]
            for f in s.figures:
                lines += [f"![{f.caption or f.name}]({figure_dir}/{f.name}.png)", ""]
                if f.caption:
                    lines += [f"*{f.caption}*", ""]
        return "\n".join(lines).rstrip() + "\n"

    def to_html(self) -> str:
        """A self-contained HTML page: figures as base64 PNG, no external URL."""
        esc = html.escape
        body = [f"<h1>{esc(self.title)}</h1>", "<table class='meta'>"]
        for k, v in self.meta.items():
            body.append(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>")
        body.append("</table>")
        body.append("<nav><ol>" + "".join(f"<li><a href='#s{i}'>{esc(s.title)}</a></li>"
                                          for i, s in enumerate(self.sections)) + "</ol></nav>")
        for i, s in enumerate(self.sections):
            body.append(f"<section id='s{i}'><h2>{esc(s.title)}</h2>")
            if not s.available:
                body.append(f"<p class='na'>not available: {esc(s.reason)}</p></section>")
                continue
            for p in s.text:
                body.append(f"<p>{esc(p)}</p>")
            for caption, table in s.tables:
                body.append(_table_html(table, caption))
            for f in s.figures:
                b64 = base64.b64encode(f.png).decode("ascii")
                body.append(f"<figure><img alt='{esc(f.caption or f.name)}' src='data:image/png;base64,{b64}'>"
                            f"<figcaption>{esc(f.caption)}</figcaption></figure>")
            body.extend(s.html_fragments)
            body.append("</section>")
        return _PAGE.format(title=esc(self.title), body="\n".join(body))

    def write(self, out_dir: str | os.PathLike[str], overwrite: bool = True) -> Path:
        """Write ``index.html``, ``summary.md`` and ``figures/*.png`` into ``out_dir`` atomically.

        An existing ``out_dir`` is replaced only if it is empty or a previous report (it holds the marker file
        ``.relu_regions_report``) and ``overwrite`` is true; otherwise ``FileExistsError``.
        """

        def fill(tmp: Path) -> None:
            figdir = tmp / "figures"
            figdir.mkdir()
            for s in self.sections:
                for f in s.figures:
                    (figdir / f"{f.name}.png").write_bytes(f.png)
            (tmp / "index.html").write_text(self.to_html(), encoding="utf-8")
            (tmp / "summary.md").write_text(self.to_markdown(), encoding="utf-8")
            (tmp / REPORT_MARKER).write_text("written by relu-regions\n", encoding="utf-8")

        return write_atomically(out_dir, fill, overwrite=overwrite)


SINGLE_LOGIT = ("the model has a single output (a binary classifier's logit?); the report needs one score per class: "
                "append nn.Linear(1, 2) with weight [[0.], [1.]] and bias 0 (its argmax is logit > 0)")


def check_out_dir(out_dir: str | os.PathLike[str], overwrite: bool = True) -> Path:
    """The absolute destination of :func:`write_atomically` after its checks (raises as it would, writes nothing):
    for callers that check ``--out`` before a long analysis."""
    out = Path(out_dir).expanduser().absolute()
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"--out {out} exists and is not a directory")
        contents = list(out.iterdir())
        if contents and not (out / REPORT_MARKER).exists():
            raise FileExistsError(f"--out {out} exists and is not a relu-regions report directory; "
                                  "choose another --out or remove it")
        if contents and not overwrite:
            raise FileExistsError(f"--out {out} already holds a report")
    parent = out.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"the parent directory of --out does not exist: {parent}")
    return out


def write_atomically(out_dir: str | os.PathLike[str], fill: Callable[[Path], None], overwrite: bool = True) -> Path:
    """Create ``out_dir`` by filling a temporary sibling directory and renaming it into place.

    Parameters
    ----------
    out_dir : path
        Destination directory. If it exists it must be empty or hold :data:`REPORT_MARKER`.
    fill : callable
        Writes the content into the temporary directory it is given.
    overwrite : bool
        Replace an existing report directory.

    Returns
    -------
    pathlib.Path
        The absolute destination path.
    """
    out = check_out_dir(out_dir, overwrite)
    parent = out.parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # (mkdtemp makes it 0700: the report stays private whatever the umask says)
        fill(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.rename(out, old / "report")
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old / "report", out)  # put the previous report back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------------------------------------------
# Rendering helpers
# --------------------------------------------------------------------------------------------------------------

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }}
h1 {{ font-size: 1.6em; }} h2 {{ border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }}
table {{ border-collapse: collapse; margin: .8em 0; font-size: .92em; display: block; overflow-x: auto;
         max-width: 100%; }}
th, td {{ border: 1px solid #ccc; padding: .25em .6em; text-align: right; }}
th {{ background: #f3f3f3; }} table.meta th, table.meta td {{ text-align: left; }}
caption {{ caption-side: top; font-weight: 600; text-align: left; padding-bottom: .3em; }}
img {{ max-width: 100%; height: auto; }} figure {{ margin: 1em 0; }} figcaption {{ color: #555; font-size: .9em; }}
.na {{ color: #a33; font-style: italic; }} nav ol {{ columns: 2; }}
</style></head>
<body>
{body}
<footer><p style="color:#888;font-size:.85em">Generated by relu-regions. Every number is exact for the stated
data unless labelled an estimate. This page needs no network access.</p></footer>
</body></html>
"""


def _rows(table: Any) -> tuple[list[str], list[list[Any]]]:
    if hasattr(table, "to_dict") and hasattr(table, "columns"):  # pandas DataFrame
        df = table.reset_index() if getattr(table.index, "name", None) is not None else table
        return [str(c) for c in df.columns], df.values.tolist()
    if isinstance(table, list) and table and isinstance(table[0], dict):
        cols = list(table[0].keys())
        return cols, [[r.get(c, "") for c in cols] for r in table]
    raise TypeError(f"cannot render a table from {type(table).__name__}")


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "–"
        return f"{v:.4g}"
    return str(v)


def _table_markdown(table: Any) -> str:
    cols, rows = _rows(table)
    out = ["| " + " | ".join(str(c).replace("|", "\\|") for c in cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(v).replace("|", "\\|") for v in r) + " |" for r in rows]
    return "\n".join(out)


def _table_html(table: Any, caption: str = "") -> str:
    cols, rows = _rows(table)
    esc = html.escape
    parts = ["<table>"]
    if caption:
        parts.append(f"<caption>{esc(caption)}</caption>")
    parts.append("<tr>" + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>")
    for r in rows:
        parts.append("<tr>" + "".join(f"<td>{esc(_fmt(v))}</td>" for v in r) + "</tr>")
    parts.append("</table>")
    return "".join(parts)


_RENDER = {"dpi": 110}  # build_report(quick=True) lowers it for smoke tests


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_RENDER["dpi"], bbox_inches="tight")
    if getattr(fig.canvas, "manager", None) is not None:  # a pyplot figure: take it off pyplot's list
        import matplotlib.pyplot as plt

        plt.close(fig)
    return buf.getvalue()


def _subplots(nrows: int = 1, ncols: int = 1, **kwargs):
    """``(figure, axes)`` drawn by Agg directly, without pyplot: the caller's backend (an interactive one, say) and
    pyplot's figure list stay as they were (before, the report switched the process to Agg for good)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=kwargs.pop("figsize", None))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def _as_figure(obj: Any, name: str, caption: str) -> Figure | None:
    """Turn what a plotting function returned (matplotlib Figure / Axes / plotly Figure) into a PNG Figure."""
    if obj is None:
        return None
    fig = obj
    if hasattr(obj, "get_figure") and not hasattr(obj, "savefig"):  # an Axes
        fig = obj.get_figure()
    if isinstance(obj, (tuple, list)) and obj and hasattr(obj[0], "savefig"):
        fig = obj[0]
    if hasattr(fig, "savefig"):
        return Figure(name, _png(fig), caption)
    return None


def _reason(e: BaseException) -> str:
    if isinstance(e, ImportError):
        return f"{e} (the module providing it is not installed or not built yet)"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:300]


def _optional(module: str, attr: str | None = None):
    """Import ``relu_regions.<module>`` (and an attribute) or raise ImportError with a readable message."""
    import importlib

    try:
        mod = importlib.import_module(f"relu_regions.{module}")
    except ImportError as e:
        raise ImportError(f"relu_regions.{module} is missing ({e})") from e
    if attr is None:
        return mod
    if not hasattr(mod, attr):
        raise ImportError(f"relu_regions.{module}.{attr} is missing")
    return getattr(mod, attr)


# --------------------------------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------------------------------


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def _bar(it, desc: str, progress: bool, total: int | None = None):
    if not progress:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, leave=False)


def predict_and_record(model: nn.Module, X: Tensor, batch_size: int = 512, progress: bool = False,
                       logits_at: str | None = None) -> tuple[Tensor, list]:
    """Logits of ``model`` on ``X`` (eval mode, no grad) and the recorded per-layer patterns of all samples.

    The patterns carry the exact number of units on a breakpoint per sample (``LayerPattern.n_boundary``).

    Returns
    -------
    logits : Tensor ``(N, K)``
    patterns : list of LayerPattern over all N samples, in execution order
    """
    outs = []
    # count_boundary: the region table's 'boundary samples' needs the real counts (without it the recorder fills in
    # zeros); it costs one more pass over each unit input, small next to the rest of the report
    with preserved(model, eval_mode=True), torch.no_grad(), \
            record(model, logits_at=logits_at, count_boundary=True) as rec:
        n = X.shape[0]
        for sl in _bar(list(_batches(n, batch_size)), "recording", progress):
            out = model(X[sl])
            if isinstance(out, (tuple, list)):
                out = out[0]
            # (before: a dense (N, 2, H, W) output was read as 2·H·W classes, accuracy 0, without an error)
            _check_class_scores(out)
            outs.append(out.reshape(out.shape[0], -1))
        patterns = rec.patterns() if rec.passes and rec.layer_names else []
    return torch.cat(outs), patterns


def _unique_rows(packed: Tensor) -> tuple[Tensor, Tensor]:
    """Exact region ids from bit-packed patterns (no hashing): (inverse index (N,), counts (R,))."""
    _, inv, counts = torch.unique(packed, dim=0, return_inverse=True, return_counts=True)
    return inv, counts


def granularities(layer_names: Sequence[str],
                  unit_shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, list[str]]:
    """Default granularities: the whole network, every single layer, and the MLP head when the model has one.

    Parameters
    ----------
    layer_names : sequence of str
        Recorded layer names, in execution order.
    unit_shapes : mapping of str to shape, optional
        Each layer's unit shape (``LayerPattern.unit_shape``; :func:`build_report` passes them). Without it, a head
        is found by name only.

    A head is recognised by layer names under a ``head.`` / ``classifier.`` / ``fc`` / ``mlp`` submodule (e.g.
    LeNet's ``head``), or, when ``unit_shapes`` is given and no name matches (a plain ``nn.Sequential``: layers
    ``"1"``, ``"4"``, ...), as the trailing layers whose units form a vector (one-dimensional unit shape) after a
    layer with spatial units (a convolution's ReLU, a max pool): the MLP on a CNN's flattened features.
    """
    names = list(layer_names)
    out: dict[str, list[str]] = {"full network": names}
    head = [n for n in names if n.split(".")[0] in ("head", "classifier", "fc", "mlp")]
    if not head and unit_shapes is not None:
        # (before: only the name prefixes were tried, so a plain nn.Sequential CNN never got its head)
        spatial = [i for i, n in enumerate(names) if len(tuple(unit_shapes.get(n, ()))) > 1]
        if spatial:
            head = names[spatial[-1] + 1:]
    if head and len(head) < len(names):
        out["head only"] = head
    for n in names:
        out[f"layer {n}"] = [n]
    return out


def region_table(patterns: list, y_true: Tensor, y_pred: Tensor,
                 groups: dict[str, list[str]] | None = None) -> tuple[list[dict[str, Any]], dict[str, Tensor]]:
    """Region statistics per granularity, computed exactly from the recorded patterns.

    Columns: regions (distinct activation patterns), samples per region, singletons (share of samples alone in
    their region), top-1 coverage (share of samples lying in the largest region of their true class, regions
    assigned to their majority true class), purity (sample-weighted majority-label share), confusion regions
    (regions whose purity, the share of their majority true class, is below 0.7: Re3's definition, the one of
    :meth:`relu_regions.RegionStats.confused`) and boundary samples (samples with a unit exactly on a breakpoint;
    needs patterns recorded with ``count_boundary=True``).

    Returns
    -------
    rows : list of dict (one per granularity)
    inverse : dict granularity -> (N,) exact region index per sample
    """
    from .keys import pack_patterns
    from .units import boundary_counts

    by_name = {p.name: p for p in patterns}
    groups = groups or granularities(list(by_name), {p.name: p.unit_shape for p in patterns})
    n = int(y_true.shape[0])
    n_classes = int(max(int(y_true.max()), int(y_pred.max())) + 1)
    rows, inverse = [], {}
    for gname, layers in groups.items():
        pats = [by_name[name] for name in layers]
        packed = pack_patterns(pats)
        inv, counts = _unique_rows(packed)
        r = int(counts.numel())
        hist = torch.zeros(r, n_classes, dtype=torch.long)
        hist.index_put_((inv.cpu(), y_true.cpu()), torch.ones(n, dtype=torch.long), accumulate=True)
        majority = hist.argmax(1)
        # Re3's confused region, as RegionStats.confused computes it (one definition in one report; before, any
        # misclassification or a second predicted class counted here)
        size = hist.sum(1)
        confused = hist.amax(1).double() / size.clamp(min=1).double() < _CONFUSED_PURITY
        # top-1 coverage: for each class, its largest region among those with that majority class (equal sizes:
        # more samples of the class first), as RegionStats.coverage (the region with most samples of the class
        # was taken before: another number than the overview's for the same data)
        covered = 0
        for c in range(n_classes):
            mine = (majority == c).nonzero().flatten()
            if mine.numel():
                best = mine[(size[mine] * (n + 1) + hist[mine, c]).argmax()]
                covered += int(hist[best, c])
        nb = boundary_counts(pats, n)
        rows.append({
            "granularity": gname,
            "layers": len(layers),
            "regions": r,
            "samples/region": round(n / r, 3),
            "singleton share": round(float((counts == 1).sum()) / n, 4),
            "top-1 coverage": round(covered / n, 4),
            "purity": round(float(hist.max(1).values.sum()) / n, 4),
            "confusion regions": int(confused.sum()),
            "boundary samples": int((nb > 0).sum()),
        })
        inverse[gname] = inv
    return rows, inverse


def re3_contributions(model: nn.Module, X: Tensor, target: Tensor, batch_size: int = 256, progress: bool = False,
                      logits_at: str | None = None) -> tuple[Tensor, Tensor, float, str]:
    """Exact per-feature contributions ``A[target] ⊙ x`` of each sample's region, the bias ``d``, and the check.

    Uses :func:`relu_regions.attributions.contributions` when available, otherwise the engine's
    :func:`relu_regions.affine_map` directly.

    Returns
    -------
    contrib : Tensor ``(N, *input_shape)``
    bias : Tensor ``(N,)`` the region offset ``d`` for the target
    residual : float
        max |sum(contrib) + d − f(x)_target| over samples (independent check; ~1e-6 in float32)
    source : str
        Which implementation produced the numbers.
    """
    from .affine import affine_map

    try:
        contributions = _optional("attributions", "contributions")
    except ImportError:
        contributions = None
    parts, biases, res = [], [], 0.0
    for sl in _bar(list(_batches(X.shape[0], batch_size)), "Re3 contributions", progress):
        if contributions is not None:
            c_ = contributions(model, X[sl], target=target[sl], level="logit", logits_at=logits_at)
            c, bias, out = c_.values, c_.offset, c_.output
        else:
            amap = affine_map(model, X[sl], target=target[sl], logits_at=logits_at)
            c = amap.A[:, 0] * X[sl].to(amap.A.dtype)
            bias, out = amap.d[:, 0], amap.output[:, 0]
        parts.append(c.detach())
        biases.append(bias.detach())
        total = c.reshape(c.shape[0], -1).sum(1) + bias
        res = max(res, float((total - out).abs().max()))
    source = ("relu_regions.attributions.contributions (logit level, zero baseline)" if contributions is not None
              else "engine affine_map: A[target] ⊙ x")
    return torch.cat(parts), torch.cat(biases), res, source


def _image_like(X: Tensor) -> bool:
    return X.dim() == 4 or (X.dim() == 3 and X.shape[1] > 1 and X.shape[2] > 1)


def _heatmap_figure(maps: Tensor, titles: Sequence[str], name: str, caption: str, signed: bool = True) -> Figure:
    k = maps.shape[0]
    cols = min(5, k)
    rows = math.ceil(k / cols)
    fig, axes = _subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= k:
            continue
        m = maps[i].numpy()
        v = float(np.abs(m).max()) or 1.0
        im = ax.imshow(m, cmap="RdBu_r", vmin=-v, vmax=v) if signed else ax.imshow(m, cmap="Greys")
        ax.set_title(titles[i], fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return Figure(name, _png(fig), caption)


def _bars_figure(values: Tensor, class_names: Sequence[str], feature_names: Sequence[str], name: str,
                 caption: str) -> Figure:
    k, d = values.shape
    fig, ax = _subplots(figsize=(max(6, 0.5 * d + 2), 3.5))
    width = 0.8 / k
    xs = np.arange(d)
    for c in range(k):
        ax.bar(xs + c * width - 0.4 + width / 2, values[c].numpy(), width, label=str(class_names[c]))
    ax.set_xticks(xs)
    ax.set_xticklabels(feature_names, rotation=45, ha="right", fontsize=8)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_ylabel("mean contribution to the class logit")
    ax.legend(fontsize=8, ncol=min(k, 5))
    fig.tight_layout()
    return Figure(name, _png(fig), caption)


def _region_size_figure(inverse: dict[str, Tensor], name: str) -> Figure:
    fig, ax = _subplots(figsize=(6.5, 3.5))
    for gname, inv in inverse.items():
        if gname.startswith("layer "):
            continue
        counts = torch.bincount(inv).sort(descending=True).values.numpy()
        ax.plot(np.arange(1, len(counts) + 1), counts, marker=".", lw=1, label=f"{gname} ({len(counts)} regions)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("region rank")
    ax.set_ylabel("samples in region")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return Figure(name, _png(fig), "Region sizes, largest first (exact counts on the analysed data).")


def build_report(model: nn.Module, X: Tensor, y: Tensor, *, title: str = "relu-regions report",
                 class_names: Sequence[str] | None = None, feature_names: Sequence[str] | None = None,
                 meta: dict[str, Any] | None = None, n_explain: int | None = None,
                 compare_samples: int = 16, validity_samples: int = 32, seed: int = 0,
                 logits_at: str | None = None, progress: bool = False, quick: bool = False,
                 include: Sequence[str] | None = None) -> Report:
    """Analyse ``model`` on ``(X, y)`` and assemble the report.

    Parameters
    ----------
    model : nn.Module
        A piecewise-linear classifier returning logits ``(N, K)``. Its state (parameters, flags, hooks) is left
        exactly as it was.
    X, y : Tensor
        Inputs ``(N, *input_shape)`` (float) and integer labels ``(N,)``.
    title : str
    class_names, feature_names : sequence of str, optional
        Names for the plots (tabular data: feature names label the bars).
    meta : dict, optional
        Extra key facts for the header (data source, training summary, ...).
    n_explain : int, optional
        Number of samples for the exact Re3 contributions (default all; ``quick`` uses at most 200).
    compare_samples, validity_samples : int
        Samples used by the (more expensive) attribution comparison and validity/distance sections.
    seed : int
        Seed for every random choice (sample subsets, baselines of stochastic attribution methods).
    logits_at : str, optional
        Module path of the logits when the model ends in a softmax/sigmoid (see :func:`relu_regions.record`).
    progress : bool
        Show tqdm progress bars.
    quick : bool
        Smaller subsets everywhere (for tests).
    include : sequence of str, optional
        Optional sections to build, from :data:`OPTIONAL_SECTIONS` (default all): ``"regionstats"``, ``"re3"``,
        ``"compare"``, ``"validity"``, ``"sankey"``. Sections left out are listed as "not available: not
        requested".

    Returns
    -------
    Report
    """
    dpi = _RENDER["dpi"]
    _RENDER["dpi"] = 60 if quick else dpi
    try:
        return _build_report(model, X, y, title=title, class_names=class_names, feature_names=feature_names,
                             meta=meta, n_explain=n_explain, compare_samples=compare_samples,
                             validity_samples=validity_samples, seed=seed, logits_at=logits_at, progress=progress,
                             quick=quick, include=include)
    finally:
        _RENDER["dpi"] = dpi


def _build_report(model, X, y, *, title, class_names, feature_names, meta, n_explain, compare_samples,
                  validity_samples, seed, logits_at, progress, quick, include) -> Report:
    t0 = time.perf_counter()
    if not isinstance(X, Tensor) or not X.is_floating_point():
        raise TypeError("X must be a floating-point tensor")
    y = torch.as_tensor(y).reshape(-1)
    if y.is_complex() or y.dtype == torch.bool or (y.is_floating_point() and not bool((y == y.round()).all())):
        # (.long() would truncate 1.9 to class 1; whole-number floats, as a label column read as float, are fine)
        raise TypeError(f"y must hold integer class labels, got {y.dtype} values such as {y[:3].tolist()}")
    y = y.long()
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} samples but y has {y.shape[0]} labels")
    if y.numel() and int(y.min()) < 0:
        # (a label -1 indexed the last class in the region table and counted as an error in the accuracy)
        raise ValueError(f"y must hold class indices 0..K-1 (K: the model's outputs); found {int(y.min())} at "
                         f"sample {int(y.argmin())}: drop or relabel such samples first")
    gen = torch.Generator().manual_seed(seed)
    wanted = set(OPTIONAL_SECTIONS if include is None else include)
    unknown = wanted - set(OPTIONAL_SECTIONS)
    if unknown:
        raise ValueError(f"unknown section(s) {sorted(unknown)}; choose from {OPTIONAL_SECTIONS}")
    if quick:
        compare_samples, validity_samples = min(compare_samples, 8), min(validity_samples, 8)

    logits, patterns = predict_and_record(model, X, progress=progress, logits_at=logits_at)
    k = logits.shape[1]
    if k == 1:  # (argmax over one logit is always class 0: labels 0 only read as 100% accurate)
        raise ValueError(SINGLE_LOGIT)
    y_pred = logits.argmax(1).cpu()
    if int(y.max()) >= k:
        raise ValueError(f"y: labels go up to {int(y.max())} but the model has only {k} outputs")
    if class_names is not None and len(class_names) != k:
        raise ValueError(f"class_names has {len(class_names)} names for the model's {k} outputs")
    if feature_names is not None and X.dim() == 2 and len(feature_names) != X.shape[1]:
        raise ValueError(f"feature_names has {len(feature_names)} names for {X.shape[1]} input features")
    names = list(class_names) if class_names is not None else [str(c) for c in range(k)]
    acc = float((y_pred == y.cpu()).double().mean())
    results: dict[str, Any] = {"accuracy": acc, "n_samples": int(X.shape[0]), "n_classes": k,
                               "layers": [p.name for p in patterns]}
    header = {"samples analysed": int(X.shape[0]), "input shape": tuple(X.shape[1:]), "classes": k,
              "accuracy": f"{acc:.4f} ({int((y_pred == y.cpu()).sum())}/{X.shape[0]}, exact)",
              "piecewise-linear layers": ", ".join(p.name for p in patterns) or "none (affine model)"}
    header.update(meta or {})
    sections: list[Section] = []

    # -- accuracy per class ----------------------------------------------------------------------------------
    per_class = []
    for c in range(k):
        m = y.cpu() == c
        if int(m.sum()):
            per_class.append({"class": names[c], "samples": int(m.sum()),
                              "accuracy": round(float((y_pred[m] == c).double().mean()), 4)})
    sections.append(Section("Accuracy", text=[f"Accuracy on the analysed data: {acc:.4f} (exact count)."],
                            tables=[("per class", per_class)]))

    # -- regions ---------------------------------------------------------------------------------------------
    if patterns:
        groups = granularities([p.name for p in patterns], {p.name: p.unit_shape for p in patterns})
        rows, inverse = region_table(patterns, y.cpu(), y_pred, groups)
        results["regions"] = {r["granularity"]: r["regions"] for r in rows}
        sec = Section("Activation regions", text=[
            "Each sample's activation region is identified exactly by its bit-packed activation pattern (no hashing)."
            " 'head only' counts regions of the MLP head alone (as in the Re3 paper's CNN study). 'purity' here is"
            " sample-weighted (the share of samples whose true class is their region's majority class; the"
            " RegionStats section's 'mean_purity' is the unweighted mean over regions). 'confusion regions'"
            f" are regions whose purity (share of their majority true class) is below {_CONFUSED_PURITY}, Re3's"
            " definition, the one RegionStats uses. 'boundary samples'"
            " lie exactly on a breakpoint of some unit (pre-activation exactly 0, or tied maxima in a max-pool window"
            " with a nonzero maximum — common on flat image backgrounds, where a convolution with a positive bias"
            " gives equal values); there the map of the region selected by the"
            " convention (active iff > 0, first maximum) is used."],
            tables=[("regions per granularity", rows)])
        sec.figures.append(_region_size_figure(inverse, "region_sizes"))
        sections.append(sec)
        try:
            if "regionstats" not in wanted:
                raise NotImplementedError("not requested")
            overview, figs, notes = _regionstats_section_parts(model, patterns, groups, y.cpu(), y_pred, k, X, names,
                                                               feature_names, progress, logits_at)
            sections.append(Section("Region statistics (RegionStats)", text=[
                "From relu_regions.RegionStats (64-bit region keys: the packed pattern itself when it fits into 64"
                " bits, else a hash, collision probability about n²/2⁶⁴ for n regions; 'mean_purity' is the"
                " unweighted mean over regions, 'confused_share' the share of regions with purity below 0.7, coverage"
                " as in Re3: samples of each class in that class's top-1 / top-C regions).", *notes],
                tables=[("overview", overview)], figures=figs))
        except (ImportError, NotImplementedError, AttributeError, TypeError, ValueError, RuntimeError) as e:
            sections.append(Section.missing("Region statistics (RegionStats)", _reason(e)))
    else:
        inverse = {}
        sections.append(Section("Activation regions", text=["The model has no piecewise-linear unit: it is affine,"
                                                             " one region."]))

    # -- Re3 contributions -----------------------------------------------------------------------------------
    n_exp = X.shape[0] if n_explain is None else min(n_explain, X.shape[0])
    if quick:
        n_exp = min(n_exp, 200)
    idx = torch.randperm(X.shape[0], generator=gen)[:n_exp].sort().values
    re3 = _safe("Re3 contributions (exact)", lambda: _re3_section(model, X[idx], y[idx], names, feature_names,
                                                                  progress, logits_at, results), "re3" in wanted)
    sections.append(re3)

    # -- attribution comparison, validity, Sankey --------------------------------------------------------------
    sub = torch.randperm(X.shape[0], generator=gen)
    cs, vs = sub[:compare_samples], sub[:validity_samples]
    if logits_at is None:  # the Captum peers explain the model's output, which must be the logits
        sections.append(_safe("Attribution comparison", lambda: _compare_section(
            model, X[cs], y_pred[cs].to(X.device), seed, results, quick=quick, progress=progress),
            "compare" in wanted))
    else:
        sections.append(Section.missing("Attribution comparison", "the Captum peers need a model that outputs its"
                                                                  " logits (logits_at is set)"))
    sections.append(_safe("Validity and boundary distances", lambda: _validity_section(
        model, X[vs], y_pred[vs], seed, results, logits_at=logits_at, kinds={p.name: p.kind for p in patterns}),
        "validity" in wanted))
    sections.append(_safe("One sample's path through the regions (Sankey)", lambda: _sankey_section(
        model, X, y_pred, int(sub[0]), names, results, feature_names, logits_at), "sankey" in wanted))

    results["seconds"] = time.perf_counter() - t0
    header["analysis time"] = f"{results['seconds']:.1f} s"
    return Report(title=title, meta=header, sections=sections, results=results)


def _safe(title: str, fn: Callable[[], Section], wanted: bool = True) -> Section:
    """Build an optional section; a missing or failing optional piece yields 'not available: <reason>'."""
    if not wanted:
        return Section.missing(title, "not requested")
    try:
        sec = fn()
    except (ImportError, NotImplementedError, AttributeError, TypeError, ValueError, RuntimeError) as e:
        return Section.missing(title, _reason(e))
    sec.title = title
    return sec


def _regionstats_section_parts(model, patterns, groups, y_true, y_pred, k, X, names, feature_names, progress,
                               logits_at):
    """RegionStats (relu_regions.regions) overview table and the region plots (relu_regions.plots)."""
    RegionStats = _optional("regions", "RegionStats")
    from .keys import pattern_keys

    by_name = {p.name: p for p in patterns}
    keys = {}
    for gname, layers in groups.items():
        pats = [by_name[n] for n in layers]
        keys["full" if gname == "full network" else gname] = pattern_keys(pats)
    tabular = not _image_like(X[0:1]) and X[0].numel() <= 64
    st = RegionStats(k, granularities={g: groups[g if g != "full" else "full network"] for g in keys if g != "full"},
                     keep_contributions=tabular)
    contributions = None
    if tabular:  # per-region mean contributions A_r[c] ⊙ x for every class c (small inputs only)
        from .affine import affine_map

        parts = []
        for sl in _bar(list(_batches(X.shape[0], 256)), "contributions (all classes)", progress):
            amap = affine_map(model, X[sl], logits_at=logits_at)
            parts.append((amap.A * X[sl].unsqueeze(1).to(amap.A.dtype)).detach())
        contributions = torch.cat(parts)
    st.update(keys, y_true, y_pred, contributions=contributions)
    overview = st.summary()["overview"]
    figs: list[Figure] = []
    notes: list[str] = []
    try:
        plots = _optional("plots")
        # (the plots draw on the report's own Agg axes: pyplot would use, or switch, the caller's backend)
        figs.append(_as_figure(plots.region_sizes(st, class_names=names, ax=_subplots(figsize=(7, 4))[1]),
                               "regionstats_sizes",
                               "Largest regions (full network), stacked by true class (Re3 Fig. 2a)."))
        if "head only" in keys:
            figs.append(_as_figure(plots.region_sizes(st, "head only", class_names=names,
                                                      ax=_subplots(figsize=(7, 4))[1]), "regionstats_sizes_head",
                                   "Largest regions of the MLP head alone, stacked by true class."))
        if tabular:
            for c in range(min(k, 3)):
                figs.append(_as_figure(plots.importance_heatmap(st, cls=c, feature_names=feature_names,
                                                                ax=_subplots(figsize=(8, 5))[1]),
                                       f"region_importance_class{c}",
                                       f"Mean contribution to class {names[c]} per region (Re3 Fig. 2b)."))
    except ImportError as e:
        notes.append(f"region plots not available: {_reason(e)}")
    except Exception as e:  # a sibling module's bug must not break the report
        notes.append(f"region plots not available: {_reason(e)}")
    return overview, [f for f in figs if f is not None], notes


def _re3_section(model, X, y, names, feature_names, progress, logits_at, results) -> Section:
    contrib, bias, residual, source = re3_contributions(model, X, y, progress=progress, logits_at=logits_at)
    results["re3_residual"] = residual
    results["re3_samples"] = int(X.shape[0])
    k = len(names)
    classes = [c for c in range(k) if int((y == c).sum())]
    means = torch.stack([contrib[y == c].mean(0) for c in classes]).float().cpu()
    sec = Section("", text=[
        f"Contribution of each input feature to the logit of the true class, exactly A[c] ⊙ x in the sample's own "
        f"region ({source}); the contributions plus the region bias d reproduce the logit: max |Σ contributions"
        f" + d − logit| = {residual:.3g} over {X.shape[0]} samples (float rounding)."])
    if _image_like(X[0:1]) and X.dim() == 4:
        maps = means.sum(1) if means.dim() == 4 else means  # sum over channels
        sec.figures.append(_heatmap_figure(maps, [f"class {names[c]}" for c in classes], "re3_class_heatmaps",
                                           "Mean Re3 contribution map per true class (red: towards the class)."))
        inputs = torch.stack([X[y == c].mean(0) for c in classes]).float().cpu()
        sec.figures.append(_heatmap_figure(inputs.sum(1), [f"class {names[c]}" for c in classes], "class_means",
                                           "Mean input per class, for reference.", signed=False))
    else:
        flat = means.reshape(means.shape[0], -1)
        fnames = list(feature_names) if feature_names is not None else [f"x{i}" for i in range(flat.shape[1])]
        if flat.shape[1] > 40:  # too many bars: keep the 40 largest mean |contribution|
            top = flat.abs().mean(0).topk(40).indices.sort().values
            flat, fnames = flat[:, top], [fnames[i] for i in top.tolist()]
        sec.figures.append(_bars_figure(flat, [names[c] for c in classes], fnames, "re3_class_bars",
                                        "Mean Re3 contribution per feature and true class."))
        sec.tables.append(("mean contribution per feature (rows) and class (columns)",
                           [{"feature": f, **{names[c]: round(float(flat[i, j]), 4) for i, c in enumerate(classes)}}
                            for j, f in enumerate(fnames)]))
    return sec


_COMPARE_COLUMNS = ["method", "time_per_sample_s", "time_vs_re3", "ndcg@k", "spearman", "t_top_vs_bottom",
                    "p_top_vs_bottom", "stab_spearman", "top1_changes", "deletion_auc", "insertion_auc", "infidelity"]


def _compare_section(model, X, target, seed, results, quick=False, progress=False) -> Section:
    compare = _optional("compare", "compare")
    if quick:
        methods = ["InputXGradient", "IntegratedGradients"]
        opts = {"n_seeds": 2, "ig_steps": 8, "n_steps": 5, "infidelity_samples": 2}
    else:
        methods = ["Saliency", "InputXGradient", "IntegratedGradients", "DeepLift", "LRP", "GradientShap",
                   "KernelShap"]
        opts = {"n_seeds": 2}
    if X.dim() == 4 and X[0].numel() > 256:
        opts["superpixel"] = 4  # KernelShap on superpixels for large images, as usual
    # (compare seeds every draw from `seed` and leaves the caller's generators as they were)
    result = compare(model, X, target=target, methods=methods, progress=progress, seed=seed, **opts)
    table = result.table
    cols = [c for c in _COMPARE_COLUMNS if c in table.columns]
    results["compare"] = table[cols].to_dict("records")
    labels = _optional("compare", "ESTIMATE_LABELS")
    sec = Section("", text=[
        f"Re3 (exact) against Captum methods on {X.shape[0]} samples, explaining the predicted class "
        "(relu_regions.compare). ndcg@k / spearman: agreement of global feature rankings with Re3; t_top_vs_bottom:"
        " paired t of |Δ logit| when removing each method's top-k vs bottom-k features; stab_spearman / top1_changes:"
        " run-to-run stability over seeds; deletion (lower better) / insertion (higher better) AUCs of the target"
        " probability; infidelity: Captum's metric.",
        # (the footer says every number is exact unless labelled an estimate)
        result.estimate_note(cols)],
        tables=[("attribution comparison (columns marked 'measured' / 'MC estimate' are not exact)",
                 table[cols].rename(columns=labels))])
    for name, why in result.skipped.items():
        sec.text.append(f"{name} skipped: {why}")
    try:
        fig = _as_figure(result.plot(ax=_subplots(1, 3, figsize=(15, 4))[1]), "attribution_comparison",
                         "Time relative to Re3, agreement with Re3, and deletion/insertion curves.")
        if fig is not None:
            sec.figures.append(fig)
    except Exception as e:  # the plot is optional
        sec.text.append(f"comparison plot not available: {_reason(e)}")
    return sec


def _validity_section(model, X, target, seed, results, logits_at=None, kinds=None) -> Section:
    geometry = _optional("geometry")
    bd = geometry.boundary_distance(model, X, p=2, method="exact", logits_at=logits_at)
    exact = bd.distance
    rows, dists = [], {"exact": exact}
    notes = []
    pool = [n for n in bd.layer_names if (kinds or {}).get(n) == "maxpool"]
    if pool:
        relu_layers = [n for n in bd.layer_names if n not in pool]
        on_tie = int((torch.stack([bd.per_layer[n] for n in pool]).min(0).values == 0).sum())
        if relu_layers:
            dists["exact, unit inequalities only"] = torch.stack([bd.per_layer[n] for n in relu_layers]).min(0).values
        notes.append(f"{on_tie} of {X.shape[0]} samples lie exactly on a max-pool tie (equal maxima in a window,"
                     " typical for a constant image background): their exact distance is 0, since an arbitrarily"
                     " small perturbation switches the argmax. 'unit inequalities only' ignores the max-pool"
                     " argmax comparisons (distance to the nearest ReLU/clamp hyperplane).")
    re3_error = None
    try:
        dists["Re3 paper (per-layer)"] = geometry.boundary_distance(model, X, p=2, method="re3",
                                                                   logits_at=logits_at).distance
    except (NotImplementedError, ValueError, RuntimeError, TypeError) as e:
        re3_error = results["re3_distance_error"] = _reason(e)
    for name, d in dists.items():
        eps = geometry.validity_epsilons(d)
        fin = d[torch.isfinite(d)]
        rows.append({"distance": name, "samples": int(d.numel()),
                     # (torch.median is the lower of the two middle values of an even count)
                     "median": float(fin.double().quantile(0.5)) if fin.numel() else float("nan"),
                     "min": float(fin.min()) if fin.numel() else float("nan"), **eps})
    results["validity"] = rows
    if re3_error is not None:  # (before: the text announced the estimate whose row was missing, not why)
        re3 = (". The Re3 paper's per-layer estimate is not available for this model "
               f"(boundary_distance(method='re3') failed: {re3_error})")
    else:
        re3 = ", and the Re3 paper's per-layer estimate for comparison"
    sec = Section("", text=[
        f"Exact l2 distance from each of {X.shape[0]} samples to the boundary of its activation region "
        "(relu_regions.geometry.boundary_distance: min over the region's inequalities of margin / gradient norm)"
        f"{re3}. The validity curve is the share of explanations"
        " that stay exact under every perturbation of norm ε; ε90/ε75/ε50 are exact order statistics.", *notes],
        tables=[("boundary distances (l2) and validity radii", rows)])
    try:
        plots = _optional("plots")
        fig = _as_figure(plots.validity(dists, ax=_subplots(1, 2, figsize=(10, 4))[1]), "validity",
                         "Validity curve (left) and distance violins (right).")
    except ImportError:
        fig = _validity_fallback(geometry, dists)
    if fig is not None:
        sec.figures.append(fig)
    return sec


def _validity_fallback(geometry, dists) -> Figure:
    fig, (a1, a2) = _subplots(1, 2, figsize=(10, 4))
    for name, d in dists.items():
        e, v = geometry.validity_curve(d)
        a1.plot(e.numpy(), v.numpy(), label=name)
    a1.set_xlabel("ε")
    a1.set_ylabel("share valid")
    a1.legend(fontsize=8)
    data = [d[torch.isfinite(d)].double().cpu().numpy() for d in dists.values()]
    a2.violinplot(data, showmedians=True)
    a2.set_xticks(range(1, len(dists) + 1))
    a2.set_xticklabels(list(dists))
    a2.set_ylabel("distance to region boundary")
    fig.tight_layout()
    return Figure("validity", _png(fig), "Validity curve (left) and distance violins (right).")


def _plotly_inline(fig) -> str:
    """The plotly figure as an inline HTML fragment with plotly.js embedded (no CDN, works offline)."""
    return fig.to_html(full_html=False, include_plotlyjs=True, config={"displaylogo": False})


def _sankey_static(flows: dict[str, Any], title: str) -> Figure:
    """A static rendering of the pathway flows (input features → units → class) with matplotlib."""
    from matplotlib.patches import PathPatch
    from matplotlib.path import Path as MPath

    nodes = flows["nodes"]
    n = len(nodes)
    col = np.zeros(n, dtype=int)
    for s_, t_ in zip(flows["source"], flows["target"]):
        col[t_] = max(col[t_], col[s_] + 1)
    ncol = col.max() + 1
    ys = np.zeros(n)
    for c in range(ncol):
        idx = np.flatnonzero(col == c)
        ys[idx] = np.linspace(0, 1, len(idx) + 2)[1:-1][::-1]
    fig, ax = _subplots(figsize=(9, 5))
    vmax = max(flows["value"]) if flows["value"] else 1.0
    for s_, t_, v in zip(flows["source"], flows["target"], flows["value"]):
        x0, x1 = col[s_] / max(ncol - 1, 1), col[t_] / max(ncol - 1, 1)
        verts = [(x0, ys[s_]), ((x0 + x1) / 2, ys[s_]), ((x0 + x1) / 2, ys[t_]), (x1, ys[t_])]
        path = MPath(verts, [MPath.MOVETO, MPath.CURVE4, MPath.CURVE4, MPath.CURVE4])
        ax.add_patch(PathPatch(path, fc="none", ec="tab:blue", alpha=0.45, lw=0.5 + 10 * v / vmax))
    for i, name in enumerate(nodes):
        x = col[i] / max(ncol - 1, 1)
        ax.plot([x], [ys[i]], "s", color="k", ms=5)
        ax.annotate(name, (x, ys[i]), xytext=(4 if col[i] < ncol - 1 else -4, 3), textcoords="offset points",
                    ha="left" if col[i] < ncol - 1 else "right", fontsize=8)
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(0, 1)
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    return Figure("sankey", _png(fig), "Static rendering of the same flows (line width ∝ flow).")


def _sankey_section(model, X, y_pred, i, names, results, feature_names=None, logits_at=None) -> Section:
    plots = _optional("plots")
    x = X[i:i + 1]
    target = int(y_pred[i])
    flat_names = list(feature_names) if feature_names is not None and len(feature_names) == x[0].numel() else None
    if flat_names is None and X.dim() == 4:
        _, c, h, w = X.shape
        flat_names = [f"px({r},{q})" if c == 1 else f"c{ch}({r},{q})" for ch in range(c) for r in range(h)
                      for q in range(w)]
    flows = plots.pathway_flows(model, x, target=target, feature_names=flat_names, logits_at=logits_at)
    results["sankey_sample"] = i
    title = f"sample {i}: predicted {names[target] if target < len(names) else target}"
    sec = Section("", text=[
        f"Decision pathway of {title}: the input features feeding the units of the first piecewise-linear layer"
        " with the largest outputs, and those units feeding the predicted class (relu_regions.plots.pathway_flows;"
        " input→unit flows are exact |∂a/∂x · x| in the sample's region, a being a unit's output as its kind"
        " computes it (ReLU, ReLU6/Hardtanh/clamp with their bounds, leaky ReLU/PReLU slopes, max-pool maxima);"
        " unit→class flows are the sizes |a| of those outputs, summed per channel for convolutions)."])
    try:
        import plotly  # noqa: F401

        fig = plots.sankey(model, x, target=target, feature_names=flat_names, logits_at=logits_at)
        fig.update_layout(title=title, height=420, margin={"l": 10, "r": 10, "t": 40, "b": 10})
        sec.html_fragments.append(_plotly_inline(fig))
    except ImportError:
        sec.text.append("plotly is not installed: only the static rendering is shown.")
    sec.figures.append(_sankey_static(flows, title))
    top = sorted(zip(flows["source"], flows["target"], flows["value"]), key=lambda t: -t[2])[:10]
    sec.tables.append(("largest flows", [{"from": flows["nodes"][a], "to": flows["nodes"][b], "flow": round(v, 4)}
                                         for a, b, v in top]))
    return sec
