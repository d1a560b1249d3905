"""Region keys: exact bit-packing of activation patterns and 64-bit keys, computed on the patterns' device.

``pack_bits`` packs per-unit states into int64 words of 64 bits each (bit i of the pattern is bit i % 64 of
word i // 64, through a byte view: exact, and cheap on any device). ``region_keys`` turns packed words into one
int64 key per sample: the word itself when the pattern fits into 64 bits (exact and injective), otherwise a 64-bit mix
(splitmix64-style finaliser, wrapping int64 arithmetic) whose collision probability for n distinct patterns is
about n² / 2^65 — below 1e-9 for a million regions. ``packed`` bits remain available for exact comparison.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor

WORD_BITS = 64


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)
_GOLDEN = _signed(0x9E3779B97F4A7C15)


def _shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: Tensor) -> Tensor:
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def states_to_bits(states: Tensor, bits_per_unit: int) -> Tensor:
    """``(B, n)`` integer states -> ``(B, n * bits_per_unit)`` bool bits (least significant first)."""
    if bits_per_unit == 1:
        return states.to(torch.bool)
    shifts = torch.arange(bits_per_unit, device=states.device)
    return ((states.unsqueeze(-1) >> shifts) & 1).to(torch.bool).reshape(states.shape[0], -1)


def pack_bits(bits: Tensor) -> Tensor:
    """Pack ``(B, n)`` bool bits into ``(B, ceil(n / 64))`` int64 words, exactly."""
    b, n = bits.shape
    n_words = max(1, -(-n // WORD_BITS))
    padded = torch.zeros(b, n_words * WORD_BITS, dtype=torch.uint8, device=bits.device)
    padded[:, :n] = bits
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=bits.device)
    by = (padded.view(b, n_words * 8, 8) * weights).sum(-1, dtype=torch.uint8)
    return by.view(b, n_words * 8).view(torch.int64)


def region_keys(words: Tensor) -> Tensor:
    """One int64 key per row of packed words (exact when there is a single word).

    Every word is mixed with its position, the mixed words are summed (wrapping) and mixed again: one vectorised
    pass over all words, no Python loop.
    """
    if words.shape[1] == 1:
        return words[:, 0].clone()
    salt = (torch.arange(1, words.shape[1] + 1, dtype=torch.int64, device=words.device) * _GOLDEN)
    return _mix(_mix(words ^ salt).sum(1) + words.shape[1])


def pack_patterns(patterns: Sequence) -> Tensor:
    """Pack several layers' patterns into one row of words per sample.

    ``patterns`` are :class:`~relu_regions.units.LayerPattern` objects (anything with ``int_state()`` and
    ``bits_per_unit``), in a fixed order.
    """
    bits = torch.cat([states_to_bits(p.int_state(), p.bits_per_unit) for p in patterns], dim=1)
    return pack_bits(bits)
