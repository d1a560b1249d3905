"""Compare Re3 with the attribution methods people know, on the user's own model and inputs.

:func:`compare` runs Re3 and Captum's Saliency, InputXGradient, IntegratedGradients, DeepLift, LRP, GradientShap,
KernelShap and Lime on the same inputs and reports, per method (one row of a tidy table):

time
    Wall time per sample of one ``attribute`` call over the whole batch, measured in this run, and its ratio to
    Re3's (measured in the same run).
agreement with Re3 (global rankings)
    Global importance of feature j = mean over samples of ``|attr[:, j]|``. NDCG@k of the method's ranking with Re3's
    importances as relevance; Spearman ρ and Pearson r between the two importance vectors.
top vs bottom (paired t-test)
    Per sample, set the method's k most important features (by ``|attr|``) to the baseline and, separately, its k
    least important; the change ``|Δ target logit|`` of each is compared with a paired t-test over samples
    (one-sided: top changes more). ``t > 0`` with a small ``p`` means the ranking separates important from
    unimportant features.
stability
    The method is run again with ``n_seeds`` different torch seeds: mean per-sample Spearman ρ between runs, mean
    coefficient of variation of the global importances across runs, and the number of samples whose top-1 feature
    changes between runs. Deterministic methods (Re3 by construction) give 1.000 / 0.000 / 0.
faithfulness
    Deletion / insertion curves: features are set to the baseline (deletion) or inserted into the baseline
    (insertion) in decreasing attribution order, in ``n_steps`` equal fractions; the target probability (or logit,
    ``curve_output="logit"``) is tracked and its area under the curve over the fraction [0, 1] reported
    (trapezoid rule; deletion: lower is better, insertion: higher is better). Captum's ``infidelity`` with Gaussian
    perturbations of std ``noise_std`` (perturbations scaled for methods that multiply by inputs, as Captum's
    ``infidelity_perturb_func_decorator`` does): a Monte-Carlo *estimate* over ``infidelity_samples`` random
    perturbations per sample, which changes with ``seed``.

Not exact: the times (wall-clock measurements) and the infidelity (an estimate); the rows of the sampling methods
(GradientShap, KernelShap, Lime) describe one seeded draw of their attributions. :meth:`Comparison.to_markdown`
labels these columns (:data:`ESTIMATE_LABELS`). Every random draw is seeded from ``Settings.seed``, and the caller's
random generators (torch's CPU and initialised CUDA ones, numpy's and Python's global ones) are left as they were.

LRP: Captum's LRP has no rule for ``nn.Flatten`` (it raises); the harness runs LRP on a deep copy of the model in
which every ``nn.Flatten`` gets Captum's ``EpsilonRule`` (Captum's ``IdentityRule`` needs equal input and output
shapes; the ε-rule divides the relevance by the flattened values and multiplies it by the same values, so it passes
through unchanged up to ε = 1e-9). Every peer runs on a deep copy in eval mode, because Captum's LRP attaches
rules and reloads state dicts; the user's model is not touched. Optional peers (zennit) are skipped with a message
when not installed.
"""

from __future__ import annotations

import copy
import math
import random
import sys
import time
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from scipy import stats

from .errors import is_int_at_least
from .recording import library_call
from .state import preserved, random_state_kept

Tensor = torch.Tensor

ALL_METHODS = ("Re3", "Saliency", "InputXGradient", "IntegratedGradients", "DeepLift", "LRP", "GradientShap",
               "KernelShap", "Lime", "zennit")
DEFAULT_METHODS = ALL_METHODS[:-1]
DETERMINISTIC = {"Re3", "Saliency", "InputXGradient", "IntegratedGradients", "DeepLift", "LRP"}
MULTIPLIES_BY_INPUTS = {"Re3": True, "Saliency": False, "InputXGradient": True, "IntegratedGradients": True,
                        "DeepLift": True, "LRP": True, "GradientShap": True, "KernelShap": True, "Lime": True}
CURVE_OUTPUTS = ("probability", "logit")
STOCHASTIC = {"GradientShap", "KernelShap", "Lime"}
#: Header labels of the columns that are not exact functions of the data (used by :meth:`Comparison.to_markdown`).
ESTIMATE_LABELS = {"time_per_sample_s": "time_per_sample_s (measured)", "time_vs_re3": "time_vs_re3 (measured)",
                   "infidelity": "infidelity (MC estimate)"}


@dataclass
class Settings:
    """Options of the peers and metrics (defaults follow the Re3 paper's setup where it gives one)."""

    ig_steps: int = 50
    shap_samples: int = 200
    lime_samples: int = 200
    gradshap_samples: int = 20
    superpixel: int | None = None
    n_seeds: int = 3
    n_steps: int = 20
    ndcg_k: int = 10
    top_k: int | None = None
    curve_output: str = "probability"
    noise_std: float = 0.01
    infidelity_samples: int = 10
    perturbations_per_eval: int = 50
    seed: int = 0  # run r of a method is seeded with seed + r; the infidelity perturbations with seed


_COUNTS = ("ig_steps", "shap_samples", "lime_samples", "gradshap_samples", "n_seeds", "n_steps", "ndcg_k",
           "infidelity_samples", "perturbations_per_eval")


def _check_settings(s: Settings, n_features: int) -> None:
    """Raise a ValueError naming the first invalid option (before, a misspelt ``curve_output`` silently gave logit
    curves, ``n_steps=0`` an AUC of 0, ``top_k`` >= the number of features equal top and bottom sets, t = NaN)."""
    for name in _COUNTS:
        v = getattr(s, name)
        if not is_int_at_least(v, 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if s.superpixel is not None and not is_int_at_least(s.superpixel, 1):
        raise ValueError(f"superpixel must be None or a positive int (the square's side), got {s.superpixel!r}")
    if s.top_k is not None and not (is_int_at_least(s.top_k, 1) and s.top_k < n_features):
        raise ValueError(f"top_k must be None or an int from 1 to {n_features - 1} (fewer than the {n_features} "
                         f"input features, or the top and bottom sets coincide), got {s.top_k!r}")
    if not (is_int_at_least(s.seed, -2 ** 63) and s.seed + s.n_seeds < 2 ** 63):  # (torch's range of seeds)
        raise ValueError(f"seed must be an int from -2**63 to 2**63 - 1 - n_seeds, got {s.seed!r}")
    if s.curve_output not in CURVE_OUTPUTS:
        raise ValueError(f"curve_output must be one of {CURVE_OUTPUTS}, got {s.curve_output!r}")
    v = s.noise_std
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"noise_std must be a finite number > 0, got {v!r}")


def superpixel_mask(shape: Sequence[int], size: int) -> Tensor:
    """``(1, C, H, W)`` int64 mask of ``size × size`` squares (shared over channels) for KernelShap / Lime."""
    c, h, w = shape
    rows = torch.arange(h) // size
    cols = torch.arange(w) // size
    n_cols = (w + size - 1) // size
    grid = rows[:, None] * n_cols + cols[None, :]
    return grid.expand(c, h, w).unsqueeze(0).clone()


def _lrp_model(model: nn.Module, epsilon: float = 1e-9) -> nn.Module:
    """A deep copy of ``model`` ready for Captum's LRP: ε-rules (default Captum's 1e-9) on every layer type Captum
    supports, and on ``nn.Flatten``, which Captum has no rule for."""
    from captum.attr._core.lrp import SUPPORTED_LAYERS_WITH_RULES
    from captum.attr._utils.lrp_rules import EpsilonRule

    m = copy.deepcopy(model).eval()
    for mod in m.modules():
        # the ε-rule on a reshape divides the relevance by the flattened values and multiplies it by the same ones
        if isinstance(mod, nn.Flatten) or type(mod) in SUPPORTED_LAYERS_WITH_RULES:
            mod.rule = EpsilonRule(epsilon)
    return m


def _check_deeplift(m: nn.Module, x: Tensor) -> None:
    """Raise ``NotImplementedError`` unless every piecewise-linear unit call of ``m`` on ``x`` is a module
    whose type Captum's DeepLift overrides: it leaves ``F.relu`` / ``torch.relu`` / ``F.max_pool2d`` calls and
    modules it does not list (``nn.ReLU6``, ``nn.Hardtanh``, ``nn.PReLU``) to autograd, and then silently returns
    gradient × input for them instead of DeepLift's multipliers."""
    from captum.attr._core.deep_lift import SUPPORTED_NON_LINEAR

    from .recording import record

    seen: list[str] = []
    handles = [mod.register_forward_hook(lambda *a, _n=n: seen.append(_n))
               for n, mod in m.named_modules() if type(mod) in SUPPORTED_NON_LINEAR]
    try:
        with preserved(m, eval_mode=True), torch.no_grad(), record(m) as rec:  # (DeepLift runs on an eval copy)
            m(x)
    finally:
        for h in handles:
            h.remove()
    units = [p.name for p in rec.patterns()]
    if len(seen) < len(units):
        raise NotImplementedError(
            f"would be gradient × input: Captum's DeepLift overrides {len(seen)} of the model's {len(units)} unit "
            "calls (only nn.ReLU / LeakyReLU / MaxPool modules; not F.relu, ReLU6, Hardtanh, PReLU)")


def _peer(name: str, model: nn.Module, x: Tensor, target: Tensor, s: Settings, mask: Tensor | None) -> Tensor:
    """One attribution call of a peer method (on a deep copy of the model)."""
    import captum.attr as ca

    if name == "Re3":
        from .integrations.captum import Re3

        return Re3(model).attribute(x, target=target)
    if name == "zennit":
        raise ModuleNotFoundError("zennit")
    if name == "LRP":
        return ca.LRP(_lrp_model(model)).attribute(x.clone().requires_grad_(True), target=target).detach()
    m = copy.deepcopy(model).eval()
    xr = x.clone().requires_grad_(True)
    if name == "Saliency":
        out = ca.Saliency(m).attribute(xr, target=target)
    elif name == "InputXGradient":
        out = ca.InputXGradient(m).attribute(xr, target=target)
    elif name == "IntegratedGradients":
        out = ca.IntegratedGradients(m).attribute(xr, target=target, n_steps=s.ig_steps)
    elif name == "DeepLift":  # (_run_methods checked once that Captum overrides every unit: _check_deeplift)
        out = ca.DeepLift(m).attribute(xr, target=target)
    elif name == "GradientShap":
        bl = torch.cat([torch.zeros_like(x[:1]), x.mean(0, keepdim=True)])
        out = ca.GradientShap(m).attribute(xr, baselines=bl, target=target, n_samples=s.gradshap_samples)
    elif name == "KernelShap":
        out = ca.KernelShap(m).attribute(x, target=target, n_samples=s.shap_samples, feature_mask=mask,
                                         perturbations_per_eval=s.perturbations_per_eval)
    elif name == "Lime":
        out = ca.Lime(m).attribute(x, target=target, n_samples=s.lime_samples, feature_mask=mask,
                                   perturbations_per_eval=s.perturbations_per_eval)
    else:
        raise ValueError(f"unknown method {name!r}; known: {ALL_METHODS}")
    return out.detach()


# --- metrics (pure functions over tensors / arrays) -----------------------------------------------------------


def global_importance(attr: Tensor) -> np.ndarray:
    """Mean ``|attr|`` over samples, per feature: ``(D,)``."""
    return attr.detach().reshape(attr.shape[0], -1).abs().mean(0).double().cpu().numpy()


def ndcg(reference: np.ndarray, scores: np.ndarray, k: int) -> float:
    """NDCG@k of the ranking by ``scores`` with ``reference`` (non-negative) as graded relevance."""
    k = min(k, len(reference))
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    order = np.argsort(-scores, kind="stable")[:k]
    ideal = np.sort(reference)[::-1][:k]
    idcg = float((ideal * disc).sum())
    return float((reference[order] * disc).sum() / idcg) if idcg > 0 else float("nan")


def _corr(a: np.ndarray, b: np.ndarray, kind: str) -> float:
    if np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    f = stats.spearmanr if kind == "spearman" else stats.pearsonr
    return float(f(a, b)[0])


def _forward_target(model: nn.Module, x: Tensor, target: Tensor, output: str = "logit") -> Tensor:
    with torch.no_grad():
        out = model(x).reshape(x.shape[0], -1)
        if output == "probability":
            # one output is a binary classifier's logit: its probability is the sigmoid (a softmax over one
            # column is 1 for every input)
            out = torch.sigmoid(out) if out.shape[1] == 1 else torch.softmax(out, 1)
        return out.gather(1, target[:, None])[:, 0]


def top_bottom_test(model: nn.Module, x: Tensor, attr: Tensor, target: Tensor, k: int,
                    baseline: float = 0.0) -> tuple[float, float, float, float]:
    """Paired t-test of ``|Δ target logit|`` after removing each sample's top-k vs bottom-k features (by |attr|).

    Returns (t, one-sided p, mean |Δ| top, mean |Δ| bottom).
    """
    b = x.shape[0]
    flat = x.reshape(b, -1)
    n = flat.shape[1]
    # k = 0 made the bottom set every feature (order[:, -0:]); k >= n the two sets equal (t = NaN, said nothing)
    if not (is_int_at_least(k, 1) and k < n):
        raise ValueError(f"k must be an int from 1 to {n - 1} (fewer than the {n} input features, or the top and "
                         f"bottom sets coincide), got {k!r}")
    if attr.shape != x.shape:
        raise ValueError(f"attr must have the shape of x {tuple(x.shape)}, got {tuple(attr.shape)}")
    order = attr.reshape(b, -1).abs().argsort(dim=1, descending=True, stable=True)
    base = _forward_target(model, x, target)
    deltas = []
    for idx in (order[:, :k], order[:, -k:]):
        z = flat.clone()
        z.scatter_(1, idx, baseline)
        deltas.append((_forward_target(model, z.reshape(x.shape), target) - base).abs().double().cpu().numpy())
    top, bottom = deltas
    if np.allclose(top, bottom):
        return float("nan"), float("nan"), float(top.mean()), float(bottom.mean())
    t, p = stats.ttest_rel(top, bottom, alternative="greater")
    return float(t), float(p), float(top.mean()), float(bottom.mean())


def deletion_insertion(model: nn.Module, x: Tensor, attr: Tensor, target: Tensor, n_steps: int = 20,
                       baseline: float = 0.0, output: str = "probability") -> tuple[np.ndarray, np.ndarray,
                                                                                     np.ndarray]:
    """Mean deletion and insertion curves over samples at fractions ``0, 1/n, ..., 1`` of the features.

    ``output`` is ``"probability"`` (softmax of the output; the sigmoid of a single output, a binary logit) or
    ``"logit"``.

    Returns (fractions, deletion, insertion), each ``(n_steps + 1,)``.
    """
    if output not in CURVE_OUTPUTS:  # anything else silently gave logits
        raise ValueError(f"output must be one of {CURVE_OUTPUTS}, got {output!r}")
    if not is_int_at_least(n_steps, 1):
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
    b = x.shape[0]
    flat = x.reshape(b, -1)
    n = flat.shape[1]
    order = attr.reshape(b, -1).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=x.device).expand(b, n))
    fr = np.linspace(0, 1, n_steps + 1)
    dele, ins = [], []
    for f in fr:
        m = rank < int(round(f * n))  # the first f·n features in attribution order
        dele.append(_forward_target(model, torch.where(m, baseline, flat).reshape(x.shape), target, output))
        ins.append(_forward_target(model, torch.where(m, flat, baseline).reshape(x.shape), target, output))
    return fr, torch.stack(dele).mean(1).double().cpu().numpy(), torch.stack(ins).mean(1).double().cpu().numpy()


def auc(fr: np.ndarray, curve: np.ndarray) -> float:
    """Area under a curve over fractions in [0, 1] (trapezoid rule)."""
    return float(np.sum((curve[1:] + curve[:-1]) * np.diff(fr)) / 2)


def stability(runs: Sequence[Tensor]) -> tuple[float, float, int]:
    """(mean per-sample Spearman ρ between runs, mean CV of global importances, samples whose top-1 changes)."""
    flat = [r.reshape(r.shape[0], -1).double().cpu().numpy() for r in runs]
    b = flat[0].shape[0]
    rhos = []
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            for s in range(b):
                a, c = flat[i][s], flat[j][s]
                if np.array_equal(a, c):
                    rhos.append(1.0)
                elif np.std(a) > 0 and np.std(c) > 0:
                    rhos.append(float(stats.spearmanr(a, c)[0]))
    imp = np.stack([np.abs(f).mean(0) for f in flat])
    mean = imp.mean(0)
    ok = mean > 0
    sd = np.where(imp.max(0) == imp.min(0), 0.0, imp.std(0))  # identical runs: exactly 0, not rounding noise
    cv = float((sd[ok] / mean[ok]).mean()) if ok.any() else 0.0
    top1 = np.stack([np.abs(f).argmax(1) for f in flat])
    changes = int((top1 != top1[0]).any(0).sum())
    return (float(np.mean(rhos)) if rhos else float("nan")), cv, changes


def _seed_all(seed: int) -> None:
    """Seed every generator the harness and Captum draw from: torch's CPU one (and the CUDA ones once CUDA is
    initialised), numpy's (Captum's GradientShap draws its interpolation points there) and Python's."""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # (torch.manual_seed would queue a seed for an uninitialised CUDA, applied at the caller's first CUDA use)
        torch.cuda.manual_seed_all(seed)
    np.random.seed(seed % 2 ** 32)  # (numpy takes seeds in [0, 2**32))
    random.seed(seed)


def _infidelity(model: nn.Module, x: Tensor, attr: Tensor, target: Tensor, mult: bool, s: Settings) -> float:
    from captum.metrics import infidelity, infidelity_perturb_func_decorator

    @infidelity_perturb_func_decorator(multiply_by_inputs=mult)
    def perturb(inputs):
        return inputs - s.noise_std * torch.randn_like(inputs)

    _seed_all(s.seed)
    with torch.no_grad():
        v = infidelity(model, perturb, x, attr, target=target, n_perturb_samples=s.infidelity_samples)
    return float(v.mean())


# --- the harness ---------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """Result of :func:`compare`.

    Attributes
    ----------
    table : DataFrame
        One row per method (columns documented in the module docstring).
    curves : DataFrame
        Long format: method, curve ("deletion"/"insertion"), fraction, value.
    attributions : dict
        Method name -> attributions of the first run ``(B, *input_shape)``.
    skipped : dict
        Method name -> reason.
    settings : Settings
    """

    table: pd.DataFrame
    curves: pd.DataFrame
    attributions: dict[str, Tensor]
    skipped: dict[str, str] = field(default_factory=dict)
    settings: Settings = field(default_factory=Settings)

    def to_markdown(self, columns: Sequence[str] | None = None, digits: int = 3) -> str:
        """The table as GitHub Markdown (no extra dependency), a note on the columns that are not exact (their
        headers say "measured" / "MC estimate", see :data:`ESTIMATE_LABELS`) and a line per skipped method."""
        df = self.table if columns is None else self.table[list(columns)]
        note = self.estimate_note(list(df.columns))
        return (to_markdown(df.rename(columns=ESTIMATE_LABELS), digits) + (f"\n\n*{note}*" if note else "")
                + "".join(f"\n\n*{k} skipped: {v}*" for k, v in self.skipped.items()))

    def estimate_note(self, columns: Sequence[str] | None = None) -> str:
        """One sentence saying which of ``columns`` (default all) and rows are measurements or estimates."""
        cols = list(self.table.columns if columns is None else columns)
        s = self.settings
        parts = []
        if "time_per_sample_s" in cols or "time_vs_re3" in cols:
            parts.append("times are wall-clock measurements of this run")
        if "infidelity" in cols:
            parts.append(f"infidelity is Captum's Monte-Carlo estimate over {s.infidelity_samples} random Gaussian"
                         f" perturbation(s) (std {s.noise_std}) per sample, seed {s.seed}: another seed gives"
                         " another value")
        methods = [m for m in self.table.get("method", []) if m in STOCHASTIC]
        if methods:
            parts.append(f"the rows of {', '.join(methods)} (sampling methods) describe one seeded draw of their"
                         " attributions")
        return ("Not exact: " + "; ".join(parts) + ".") if parts else ""

    def to_csv(self, path: str) -> None:
        """Save the table as CSV."""
        self.table.to_csv(path, index=False)

    def plot(self, path: str | None = None, ax: Any = None):
        """See :func:`plot_comparison`."""
        return plot_comparison(self, path, ax=ax)


def to_markdown(df: pd.DataFrame, digits: int = 3) -> str:
    """A DataFrame as a GitHub Markdown table."""

    def fmt(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            if math.isnan(v):
                return "–"
            if v != 0 and (abs(v) >= 1e4 or abs(v) < 10 ** -digits):
                return f"{v:.{digits - 1}e}"
            return f"{v:.{digits}f}"
        return str(v)

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(fmt(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join([head, sep, *rows])


@library_call
def compare(model: nn.Module, inputs: Tensor, target: Any = None, methods: Sequence[str] | None = None, *,
            settings: Settings | None = None, progress: bool = True, **options: Any) -> Comparison:
    """Run Re3 and peer attribution methods on the same inputs; time them and measure agreement and faithfulness.

    Parameters
    ----------
    model : nn.Module
        A piecewise-linear classifier (left exactly as it was).
    inputs : Tensor
        ``(B, *input_shape)``; for images ``(B, C, H, W)``.
    target : int, sequence, Tensor or None
        Class per sample; default the predicted class.
    methods : sequence of str, optional
        Subset of :data:`ALL_METHODS` (Re3 is always included as the reference); default all Captum ones.
    settings : Settings, optional
        Metric and peer options; keyword ``options`` override single fields (e.g. ``n_seeds=2``). Invalid values
        raise a ValueError naming the option.
    progress : bool
        Progress bar over methods.

    Returns
    -------
    Comparison
    """
    s = settings or Settings()
    for k, v in options.items():
        if not hasattr(s, k):
            raise TypeError(f"unknown option {k!r}; options are the fields of Settings")
        setattr(s, k, v)
    names = list(methods) if methods is not None else list(DEFAULT_METHODS)
    unknown = [n for n in names if n not in ALL_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {ALL_METHODS}")
    if "Re3" in names:
        names.remove("Re3")
    names.insert(0, "Re3")
    x = inputs.detach()
    _check_settings(s, int(x[0].numel()))
    with preserved(model, eval_mode=True):
        ref = copy.deepcopy(model).eval()  # the metrics' forward passes run on a copy too
    with torch.no_grad():
        out = ref(x).reshape(x.shape[0], -1)
    if target is None:
        tgt = out.argmax(1)
    else:
        from .affine import resolve_target

        tgt = resolve_target(target, x.shape[0], out.shape[1], x.device)
    n_feat = int(x[0].numel())
    k = s.top_k or max(1, round(0.1 * n_feat))
    mask = None
    if x.dim() == 4 and s.superpixel is not None:
        mask = superpixel_mask(x.shape[1:], s.superpixel).to(x.device)

    it: Any = names
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(names, desc="compare", unit="method")
    # every draw is seeded (Settings.seed); the caller's generators are put back afterwards (before, the global torch
    # generator was left reseeded, and GradientShap drew from numpy's unseeded global generator)
    with random_state_kept():
        rows, curves, attrs, skipped = _run_methods(model, ref, x, tgt, s, mask, k, it)
    return Comparison(pd.DataFrame(rows), pd.DataFrame(curves), attrs, skipped, s)


def _run_methods(model: nn.Module, ref: nn.Module, x: Tensor, tgt: Tensor, s: Settings, mask: Tensor | None,
                 k: int, it: Any) -> tuple[list, list, dict, dict]:
    """The rows, curves, attributions and skipped methods of :func:`compare` (which keeps the caller's RNG)."""
    rows, curves, attrs, skipped = [], [], {}, {}
    ref_imp = None
    t_re3 = None
    for name in it:
        try:
            _seed_all(s.seed)
            with preserved(model):
                if name == "DeepLift":  # once, before the warm-up and outside the timed call
                    _check_deeplift(model, x[:1])
                _peer(name, model, x[:1], tgt[:1], s, mask)  # warm-up (lazy imports, allocator), not timed
                _seed_all(s.seed)
                t0 = time.perf_counter()
                a = _peer(name, model, x, tgt, s, mask)
                dt = (time.perf_counter() - t0) / x.shape[0]
        except (ModuleNotFoundError, ImportError) as e:
            if name == "Re3":
                raise
            skipped[name] = f"not installed ({e.name or e})"
            continue
        except (TypeError, RuntimeError, NotImplementedError) as e:
            if name == "Re3":
                raise
            skipped[name] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        a = a.detach().to(x.dtype)
        attrs[name] = a
        imp = global_importance(a)
        if name == "Re3":
            ref_imp, t_re3 = imp, dt
        runs = [a]
        if name not in DETERMINISTIC:
            with preserved(model):
                for r in range(1, s.n_seeds):
                    _seed_all(s.seed + r)
                    runs.append(_peer(name, model, x, tgt, s, mask).detach().to(x.dtype))
        else:  # deterministic: one more run checks it (cheap for all but huge models)
            with preserved(model):
                _seed_all(s.seed + 1)
                runs.append(_peer(name, model, x, tgt, s, mask).detach().to(x.dtype))
        rho, cv, top1 = stability(runs)
        tt, pp, d_top, d_bot = top_bottom_test(ref, x, a, tgt, k)
        fr, dele, ins = deletion_insertion(ref, x, a, tgt, s.n_steps, output=s.curve_output)
        for f, dv, iv in zip(fr, dele, ins):
            curves.append({"method": name, "curve": "deletion", "fraction": f, "value": dv})
            curves.append({"method": name, "curve": "insertion", "fraction": f, "value": iv})
        try:
            infid = _infidelity(ref, x, a, tgt, MULTIPLIES_BY_INPUTS.get(name, True), s)
        except Exception as e:  # a metric failure must not hide the other numbers
            infid = float("nan")
            skipped[f"{name} infidelity"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append({
            "method": name, "time_per_sample_s": dt, "time_vs_re3": dt / t_re3,
            "ndcg@k": ndcg(ref_imp, imp, s.ndcg_k), "spearman": _corr(ref_imp, imp, "spearman"),
            "pearson": _corr(ref_imp, imp, "pearson"),
            "t_top_vs_bottom": tt, "p_top_vs_bottom": pp, "dlogit_top": d_top, "dlogit_bottom": d_bot,
            "stab_spearman": rho, "stab_cv": cv, "top1_changes": top1, "n_runs": len(runs),
            "deletion_auc": auc(fr, dele), "insertion_auc": auc(fr, ins), "infidelity": infid,
        })
    return rows, curves, attrs, skipped


def plot_comparison(result: Comparison, path: str | None = None, ax: Any = None):
    """Three panels: time relative to Re3 (log scale), agreement with Re3, and the deletion / insertion curves.

    Parameters
    ----------
    result : Comparison
    path : str, optional
        Also save the figure there.
    ax : sequence of three matplotlib Axes, optional
        Draw on these (of one figure); default a new pyplot figure.

    Returns
    -------
    matplotlib.figure.Figure
    """
    t = result.table
    if ax is None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    else:
        if len(ax) != 3:
            raise ValueError(f"ax must be three Axes (time, agreement, curves), got {len(ax)}")
        fig = ax[0].figure
    ax[0].barh(t["method"], t["time_vs_re3"])
    ax[0].set_xscale("log")
    ax[0].set_xlabel("time per sample / Re3's (log)")
    w = 0.27
    y = np.arange(len(t))
    for i, col in enumerate(["ndcg@k", "spearman", "pearson"]):
        ax[1].barh(y + (i - 1) * w, t[col].fillna(0), height=w, label=col)
    ax[1].set_yticks(y, t["method"])
    ax[1].set_xlabel("agreement with Re3 (global ranking)")
    ax[1].legend(fontsize=8)
    c = result.curves
    for m in t["method"]:
        for kind, ls in (("deletion", "-"), ("insertion", "--")):
            sub = c[(c["method"] == m) & (c["curve"] == kind)]
            ax[2].plot(sub["fraction"], sub["value"], ls, label=f"{m} {kind}")
    ax[2].set_xlabel("fraction of features removed / inserted")
    ax[2].set_ylabel(f"target {result.settings.curve_output}")
    ax[2].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


class _CallableModule(types.ModuleType):
    """``relu_regions.compare`` is both this module and the function: once the submodule is imported, Python binds
    the package attribute to the module, so the module forwards calls to :func:`compare`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Comparison:
        return compare(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["ALL_METHODS", "ESTIMATE_LABELS", "Comparison", "Settings", "auc", "compare", "deletion_insertion",
           "global_importance", "ndcg", "plot_comparison", "stability", "superpixel_mask", "to_markdown",
           "top_bottom_test"]
