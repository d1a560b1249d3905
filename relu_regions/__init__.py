"""relu-regions: exact, deterministic explanations of piecewise-linear PyTorch networks.

Inside the activation region that contains an input x, a ReLU network *is* an affine map f(x) = A·x + d.
:func:`record` captures the region with hooks during normal inference; :func:`affine_map` computes A and d exactly.
"""

from __future__ import annotations

import importlib
from typing import Any

from .affine import AffineMap, LayerMap, affine_map, preactivation_maps
from .errors import PatternMismatchError, ReluRegionsError, UnsupportedModuleError
from .recording import Recording, record
from .units import LayerPattern

__version__ = "0.1.0"

# Heavier parts load on first use, so `import relu_regions` needs only torch and numpy.
_LAZY = {
    "RegionStats": ("regions", "RegionStats"),
    "contributions": ("attributions", "contributions"),
    "compare": ("compare", "compare"),
    "evaluate": ("training", "evaluate"),
    "track": ("training", "track"),
    "parsimony_penalty": ("training", "parsimony_penalty"),
    "what_if": ("geometry", "what_if"),
    "line_walk": ("geometry", "line_walk"),
    "boundary_distance": ("geometry", "boundary_distance"),
}
_SUBMODULES = {"geometry", "plots", "clusters", "causal", "datasets", "models", "regions", "attributions",
               "training", "integrations", "compose", "keys", "units", "report", "cli"}

__all__ = ["AffineMap", "LayerMap", "LayerPattern", "PatternMismatchError", "Recording", "ReluRegionsError",
           "UnsupportedModuleError", "affine_map", "preactivation_maps", "record", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'relu_regions' has no attribute '{name}'")
