"""Errors raised by relu-regions."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator


class ReluRegionsError(Exception):
    """Base class of all relu-regions errors."""


class UnsupportedModuleError(ReluRegionsError, ValueError):
    """An operation on the path to the explained output is not piecewise linear.

    A ValueError, not a TypeError: Python turns TypeErrors raised inside binary operators into NotImplemented.

    The message names the module path and the operation. A final softmax or sigmoid head is the common case:
    pass ``logits_at="<module path>"`` to explain the logits produced by that module instead.
    """


class CheckpointedReverseError(UnsupportedModuleError):
    """A reverse-mode replay reached a unit inside ``torch.utils.checkpoint`` (whose backward recomputes that part
    of the forward outside the replay). Forward-mode routes are exact there: ``method="auto"`` falls back to them."""


class ForwardADMissingError(UnsupportedModuleError):
    """An operation of the model has no forward-mode AD rule in PyTorch (``grid_sample``, for one). Reverse-mode
    routes are exact there: the ``"auto"`` choices of :func:`~relu_regions.affine_map`,
    :func:`~relu_regions.preactivation_maps` and :func:`~relu_regions.geometry.boundary_distance` fall back to
    them."""


@contextlib.contextmanager
def forward_mode(what: str, instead: str) -> Iterator[None]:
    """Turn PyTorch's "Trying to use forward AD with <op> ..." (a NotImplementedError, with a request to file an
    issue) into a :class:`ForwardADMissingError` that says what needed forward mode and what to use instead."""
    try:
        yield
    except NotImplementedError as e:
        found = re.search(r"forward AD with (\w+)", str(e))
        if found is None:
            raise
        raise ForwardADMissingError(f"{what} uses forward-mode AD, which PyTorch does not implement for "
                                    f"'{found.group(1)}' (called by this model); {instead}") from e


BATCH_STATISTICS = "batch_norm in training mode (batch statistics)"


def is_int_at_least(value: object, least: int) -> bool:
    """Whether an option meant as a count or size is a Python int (not a bool) of at least ``least``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def is_integer_tensor(t: object) -> bool:
    """Whether ``t`` is a tensor of integer indices: not floating (``.long()`` would truncate 2.7 to 2), complex or
    bool (a mask, or a comparison used as labels)."""
    import torch

    return isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def check_finite(t: object, name: str, why: str = "") -> None:
    """Raise a ``ValueError`` naming ``name`` (and ``why``, after a colon) if the tensor ``t`` holds NaN or inf (one
    host synchronisation)."""
    import torch

    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ValueError(f"{name} holds {bad} non-finite value(s) (nan or inf){': ' + why if why else ''}")


def not_piecewise_linear(where: str, what: str, hint: str = "") -> UnsupportedModuleError:
    """The error for ``where`` (a module description) calling ``what``; one wording for every recording route."""
    return UnsupportedModuleError(f"{where} calls {what}, which is not piecewise linear in the input.{hint}")


class PatternMismatchError(ReluRegionsError, RuntimeError):
    """A replayed forward pass did not follow the recorded sequence of piecewise-linear operations."""
