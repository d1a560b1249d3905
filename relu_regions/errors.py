"""Errors raised by relu-regions."""

from __future__ import annotations


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


BATCH_STATISTICS = "batch_norm in training mode (batch statistics)"


def is_int_at_least(value: object, least: int) -> bool:
    """Whether an option meant as a count or size is a Python int (not a bool) of at least ``least``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def not_piecewise_linear(where: str, what: str, hint: str = "") -> UnsupportedModuleError:
    """The error for ``where`` (a module description) calling ``what``; one wording for every recording route."""
    return UnsupportedModuleError(f"{where} calls {what}, which is not piecewise linear in the input.{hint}")


class PatternMismatchError(ReluRegionsError, RuntimeError):
    """A replayed forward pass did not follow the recorded sequence of piecewise-linear operations."""
