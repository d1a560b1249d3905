"""Keeping the user's model exactly as it was: training flags, requires_grad, hooks, instance forwards."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import numpy as np
import torch
import torch.nn as nn

from .hook_recording import ForwardPatch, is_ours

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
               "_state_dict_hooks", "_load_state_dict_pre_hooks")


# Entry points run one at a time in a process: they switch the model's flags, attach hooks and set process-wide state
# (torch.compile's stance, the global backward hooks) for their duration, which a second thread's call on the same
# model would see and restore out of order. Re-entrant: an entry point may call others.
_ENTRY = threading.RLock()


@contextmanager
def autocast_off(device_types: tuple[str, ...] = ("cpu", "cuda")) -> Iterator[None]:
    """Switch ``torch.autocast`` off for the block where it is on: the library's arithmetic is exact, or is the
    network's, only in the tensors' own dtypes."""
    with ExitStack() as stack:
        for device in device_types:
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


@contextmanager
def preserved(model: nn.Module, eval_mode: bool = False, backward_hooks: bool = False):
    """Restore every module's training flag, every parameter's requires_grad, every hook dict and instance-level
    ``forward`` on exit.

    For blocks that run only this package's code (one call of an entry point). Context managers whose block runs
    the user's code (``record``, ``intervene``) must not use it: it would also undo what the user changed there.

    Parameters
    ----------
    model : nn.Module
        The user's model.
    eval_mode : bool
        Switch the whole model to eval mode inside the block (BatchNorm uses running statistics, Dropout is the
        identity, so the network is piecewise linear); the previous per-module flags come back on exit, also
        after an exception.
    backward_hooks : bool
        Keep the model's module backward hooks (and global ones) working inside the block. By default they are
        off there: the package's own backward passes through a replay of the model must neither be changed by a
        user's gradient hook (gradient scaling, guided backprop) nor fire it.

    The block also runs outside ``torch.inference_mode`` (the package's routes need autograd or dual tensors; a
    caller inside inference mode, e.g. an evaluation loop, gets ordinary tensors back) and outside ``torch.autocast``
    (the maps and distances are those of the network in its own dtype, not of a reduced-precision run of it), with
    the thread's open recordings paused (an entry point called from a hook inside a recorded pass is not part of
    the pass), and holding a process-wide lock: calls from several threads run one after the other.

    On exit, hooks and patched forwards of this library's recordings that closed meanwhile stay removed (a
    recording opened before the block, in another thread or a generator, may close during it).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from .recording import sessions_paused

    with _ENTRY, sessions_paused():
        yield from _preserved(model, eval_mode, backward_hooks)


def _preserved(model: nn.Module, eval_mode: bool, backward_hooks: bool) -> Iterator[nn.Module]:
    modules = list(model.modules())
    training = [m.training for m in modules]
    # from the module list already at hand (a shared parameter may appear twice: restoring it twice is harmless)
    grads = [(p, p.requires_grad) for m in modules for p in m._parameters.values() if p is not None]
    # most hook dicts are empty: keep a copy only of the others (this runs once per call of every entry point)
    hooks = [(m, name, dict(d) if d else None) for m in modules for name in _HOOK_DICTS
             if (d := getattr(m, name, None)) is not None]
    forwards = [(m, m.__dict__.get("forward")) for m in modules]  # instance-level forwards (the hook route's)
    from torch.nn.modules import module as torch_module

    global_backward = None
    try:
        if not backward_hooks:  # (the saved copies above bring the modules' own back on exit)
            for m in modules:
                if m._backward_hooks or m._backward_pre_hooks:
                    m._backward_hooks.clear()
                    m._backward_pre_hooks.clear()
            if torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks:
                global_backward = (dict(torch_module._global_backward_hooks),
                                   dict(torch_module._global_backward_pre_hooks))
                torch_module._global_backward_hooks.clear()
                torch_module._global_backward_pre_hooks.clear()
        if eval_mode:
            model.eval()
        with torch.inference_mode(False), autocast_off():
            yield model
    finally:
        if global_backward is not None:
            torch_module._global_backward_hooks.update(global_backward[0])
            torch_module._global_backward_pre_hooks.update(global_backward[1])
        for m, flag in zip(modules, training):
            if m.training is not flag:  # Module.__setattr__ costs ~10 µs: only where a flag changed
                m.training = flag
        for p, flag in grads:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        for m, name, saved in hooks:
            current = getattr(m, name)
            if saved is None:
                if current:
                    current.clear()
            elif current.keys() != saved.keys():
                # what the block added goes; what it removed comes back, except a recording's hooks, which their
                # own handle removed when that recording closed (brought back, they would record into nothing)
                if name == "_forward_hooks_always_called":  # (flags, not hooks: kept with their hook, restored above)
                    keep = {k: v for k, v in saved.items() if k in current or k in m._forward_hooks}
                else:
                    keep = {k: v for k, v in saved.items() if k in current or not is_ours(v)}
                current.clear()
                current.update(keep)
        for m, f in forwards:
            while isinstance(f, ForwardPatch) and not f.live:  # a recording's patch, removed meanwhile
                f = f.prev
            if m.__dict__.get("forward") is not f:
                if f is None:
                    del m.__dict__["forward"]
                else:
                    m.__dict__["forward"] = f


@contextmanager
def random_state_kept() -> Iterator[None]:
    """Leave the global random generators as they were before the block, also after an exception: torch's CPU one
    and those of the CUDA devices once CUDA is initialised, Python's ``random`` and NumPy's (what the package's own
    draws, a data set's augmentation or Captum's sampling methods draw from)."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    py, npy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=cuda, device_type="cuda"):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
