"""Region keys: exact packing of activation patterns and 64-bit keys, computed on the patterns' device.

``pack_patterns`` packs every layer's unit states into bytes (two-state units 8 per byte, wider states 4, 2 or 1
per byte at 2, 4 or 8 bits each; every layer starts on a byte) and the bytes of all layers into int64 words: exact
and injective, with vectorised passes over the states only (``pack_bits`` is the same for plain bool bits: bit i
is bit i % 64 of word i // 64). ``packed`` words remain available for exact comparison.

``pattern_keys`` gives one int64 key per sample, the key every part of the library uses: the packed word itself
when the pattern fits into 64 bits (exact and injective); otherwise a hash. The hash reads every unit's state as a
byte (or two, for very wide max-pool windows) and projects the bytes with a fixed random int8 matrix ``R`` of
nonzero entries (8 columns; an exact integer product: on the CPU ``torch._int_mm`` or float32 products -- the
0/1 states in one product, other states in blocks of 1024 units -- whichever is faster there (x86 without int8
dot-product instructions: float32; else measured once per process), float64 elsewhere -- the same integers on every
device), then folds the 8 sums ``c`` into 64 bits linearly: ``key = Σ_j c_j·m_j mod 2⁶⁴`` with fixed random
64-bit ``m`` (``fold_columns``).

Collisions. Two patterns whose byte rows differ by ``δ ≠ 0`` collide when ``e = δ·R`` is zero (each column with
probability at most 1/254 over the draw of ``R``, so ≤ 254⁻⁸ ≈ 2⁻⁶⁴) or when ``Σ_j e_j·m_j ≡ 0 mod 2⁶⁴``
(probability ``2^(v-64)`` over ``m``, ``v`` the fewest trailing zero bits among the nonzero ``e_j``). Half of
``R``'s 254 values are odd and they spread evenly over residues mod small powers of two, so each ``e_j`` has ``k``
more trailing zeros than ``δ`` has with probability about 2⁻ᵏ, all 8 with about 2⁻⁸ᵏ. A pair that differs in a
two-state unit (``δ_i = ±1``) thus collides with probability about 2⁻⁶³, and n distinct patterns with about
n² / 2⁶⁴ -- below 1e-7 for a million regions; patterns that differ only in max-pool states by multiples of 2ᵗ
(t ≤ 7) with about 2^(t-63). The projection replaced packing + mixing ~200 words per sample because a product over
the unpacked states is one BLAS-like call per layer (LeNet, batch 250, 2-core CPU: ~0.6 ms against ~1.5 ms); the
linear fold replaced a splitmix64-style finaliser of ~26 small tensor operations (~4% of a LeNet validation epoch
under ``RegionMonitor``) by three.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from .state import autocast_off

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


_GATHER = 0x0102040810204080  # w * _GATHER >> 56 collects the low bit of each of w's 8 bytes, in order


def _bool_bytes(bits: Tensor) -> Tensor:
    """``(B, n)`` bool -> ``(B, ceil(n / 8))`` uint8, bit j of byte i = bit 8i + j.

    Eight bool bytes read as one int64 are folded into one byte by a multiplication (the partial products land
    on distinct bits of the top byte, so nothing carries): a few passes over n / 8 words, no reduction over a
    dimension of size 8.
    """
    b, n = bits.shape
    if b == 0:
        return torch.zeros(0, -(-n // 8), dtype=torch.uint8, device=bits.device)
    eight = _bool_words(bits)
    return (eight * _GATHER).view(torch.uint8).view(b, -1, 8)[..., 7]  # the top byte, little-endian


def _bool_words(bits: Tensor) -> Tensor:
    """``(B, n)`` bool (B > 0) -> ``(B, max(1, ceil(n / 8)))`` int64: eight bools (bytes 0/1) per word, zero
    padded."""
    b, n = bits.shape
    n8 = max(8, -(-n // 8) * 8)
    if n8 != n or not bits.is_contiguous() or bits.storage_offset() % 8:
        padded = torch.zeros(b, n8, dtype=torch.bool, device=bits.device)
        padded[:, :n] = bits
        bits = padded
    return bits.view(torch.uint8).view(b, -1, 8).view(torch.int64).view(b, -1)


def count_true(bits: Tensor) -> Tensor:
    """Column sums of a ``(B, n)`` bool tensor: ``(n,)`` int32, exactly.

    Eight bools read as one int64 are eight byte lanes; summing such words over at most 255 rows cannot carry
    from one lane into the next, so one int64 sum per chunk of 255 rows counts eight columns at once (measured
    on the 2-core build machine, 250 x 3456: 21 µs against 370 µs for a uint8 -> int32 sum over the rows).
    """
    b, n = bits.shape
    if b == 0:
        return torch.zeros(n, dtype=torch.int32, device=bits.device)
    if b * n <= 65536:  # small: a plain sum is cheaper than the word view's copies
        return bits.sum(0, dtype=torch.int32)
    return _lane_counts(_bool_words(bits), n)


def _lane_sums(words: Tensor, n: int) -> tuple[Tensor, bool]:
    """Counts of the first ``n`` byte columns of ``(B, W)`` int64 words (B > 0, any strides) whose bytes are bools,
    left as cheap as the batch allows: up to 255 rows the ``(W,)`` int64 lane sums themselves (``True``: the counts
    are their bytes; one operation), else ``(n,)`` int32 counts (``False``). Bytes past ``n`` may hold anything (a
    carry only moves up, to later bytes)."""
    if words.shape[0] <= 255:  # no byte lane can overflow
        return words.sum(0), True
    return _lane_counts(words, n), False


def _lane_counts(words: Tensor, n: int) -> Tensor:
    """``(n,)`` int32 column sums of the first ``n`` byte columns of ``(B, W)`` int64 words (as ``_lane_sums``)."""
    b = words.shape[0]
    if b <= 255:  # one chunk (a batch of the usual size): four ops
        return words.sum(0).view(torch.uint8)[:n].to(torch.int32)
    total = torch.zeros(words.shape[1] * 8, dtype=torch.int32, device=words.device)
    for start in range(0, b, 255):
        total += words[start:start + 255].sum(0).view(torch.uint8)  # (8W,) byte counts, column order
    return total[:n]


def _to_words(by: Tensor) -> Tensor:
    """``(B, n)`` uint8 -> ``(B, ceil(n / 8))`` int64 words (zero padded)."""
    b, n = by.shape
    n_words = max(1, -(-n // 8))
    if n != n_words * 8 or not by.is_contiguous() or by.storage_offset() % 8:
        padded = torch.zeros(b, n_words * 8, dtype=torch.uint8, device=by.device)
        padded[:, :n] = by
        by = padded
    return by.view(torch.int64)


def pack_bits(bits: Tensor) -> Tensor:
    """Pack ``(B, n)`` bool bits into ``(B, ceil(n / 64))`` int64 words, exactly (bit i is bit i % 64 of word
    i // 64)."""
    return _to_words(_bool_bytes(bits))


def state_bytes(states: Tensor, bits_per_unit: int) -> Tensor:
    """``(B, n)`` integer states of ``bits_per_unit`` bits -> ``(B, m)`` uint8, exactly and injectively.

    One bit: 8 units per byte. Up to 2 / 4 / 8 bits: 4 / 2 / 1 units per byte (shifts of small strided slices,
    never one tensor element per bit). Wider states: their low ``ceil(bits / 8)`` bytes.
    """
    b, n = states.shape
    if b == 0:
        return torch.zeros(0, _packed_bytes(n, bits_per_unit), dtype=torch.uint8, device=states.device)
    if bits_per_unit == 1:
        return _bool_bytes(states.to(torch.bool))
    if bits_per_unit > 8:
        return _low_bytes(states, -(-bits_per_unit // 8)).view(torch.uint8)
    width = _width(bits_per_unit)
    per = 8 // width
    s = states.to(torch.uint8)
    if per == 1:
        return s
    if n % per:
        s = torch.cat([s, s.new_zeros(b, per - n % per)], 1)
    s = s.view(b, -1, per)
    out = s[..., 0].clone()
    for j in range(1, per):
        out |= s[..., j] << (width * j)
    return out


def region_keys(words: Tensor) -> Tensor:
    """One int64 key per row of packed words (exact when there is a single word).

    Every word is mixed with its position, the mixed words are summed (wrapping) and mixed again: one vectorised
    pass over all words, no Python loop.
    """
    if words.shape[1] == 1:
        return words[:, 0].clone()
    return _mix(_mix(words ^ _salt(words.shape[1], words.device)).sum(1) + words.shape[1])


@functools.lru_cache(maxsize=64)
def _salt(n: int, device: torch.device) -> Tensor:
    """Per-position salts (constants, cached by size and device)."""
    return torch.arange(1, n + 1, dtype=torch.int64, device=device) * _GOLDEN


def pack_patterns(patterns: Sequence) -> Tensor:
    """Pack several layers' patterns into one row of words per sample.

    ``patterns`` are :class:`~relu_regions.units.LayerPattern` objects (anything with ``int_state()`` and
    ``bits_per_unit``), in a fixed order.
    """
    parts = [state_bytes(p.int_state(), p.bits_per_unit) for p in patterns]
    return _to_words(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))


_COLUMNS = 8
_CHUNK = 131072  # units per product: |sum| <= 131072 * 128 * 127 < 2**31, so int32 sums are exact
_FLOAT_BLOCK = 1 << 23  # states converted to float64 at a time off the CPU (64 MB)
_GROUP = 4096  # consecutive layers narrower than this together are projected in one product


@functools.lru_cache(maxsize=16)
def _projection(n: int, device: torch.device) -> Tensor:
    """``(n, 8)`` int8 in ±[1, 127], fixed by ``n`` (the same on every device and in every process)."""
    g = torch.Generator().manual_seed(0x5EED0000 + n)
    v = torch.randint(-126, 128, (n, _COLUMNS), generator=g, dtype=torch.int16)
    v[v <= 0] -= 1  # -127..-1 and 1..127: 254 nonzero values
    return v.to(torch.int8).to(device)


def _int8_product(a: Tensor, r: Tensor, bools: int = 0, rt: Tensor | None = None) -> Tensor:
    """``a @ r`` for int8 matrices, exactly (sums stay below 2^31, see ``_CHUNK``): int32 on the CPU, int64
    elsewhere. ``bools``: how many leading columns of ``a`` hold only 0 and 1; ``rt``: ``_float32_rows(r)``, when
    the caller keeps it."""
    if a.device.type == "cpu":
        if _cpu_route() == "int_mm":
            return torch._int_mm(a, r)
        return _float32_product(a, _float32_rows(r) if rt is None else rt, bools)
    return _float64_product(a, r)


def _float64_product(a: Tensor, r: Tensor) -> Tensor:
    """``a @ r`` for int8 matrices through float64, exactly, as int64."""
    # float64 holds these integer sums exactly (CUDA's int8 product has shape constraints this avoids); in column
    # blocks, so that the float64 copy of the states stays below _FLOAT_BLOCK elements
    step = max(8, _FLOAT_BLOCK // max(1, a.shape[0]))
    out = None
    for start in range(0, a.shape[1], step):
        part = (a[:, start:start + step].to(torch.float64) @ r[start:start + step].to(torch.float64)).to(torch.int64)
        out = part if out is None else out + part
    return out if out is not None else torch.zeros(a.shape[0], r.shape[1], dtype=torch.int64, device=a.device)


_EXACT_F32 = 1024  # int8 products are below 2**14 in magnitude: sums of 1024 stay below 2**24, exact in float32
_EXACT_F32_BOOLS = 131072  # 0/1 times |r| <= 127: sums of 131072 stay below 2**24


def _float32_rows(r: Tensor) -> Tensor:
    """``(n, 8)`` int8 -> ``(8, n)`` float32, contiguous: the layout in which the CPU's float32 product with 8
    output columns is fast (``a @ r`` with ``r`` row-major: 2-3x slower, LeNet batch of 250 on an AVX2 EPYC)."""
    return r.t().to(torch.float32).contiguous()


def _float32_product(a: Tensor, rt: Tensor, bools: int = 0) -> Tensor:
    """``a @ rt.T`` for ``(B, n)`` int8 ``a`` and ``rt = _float32_rows(r)``, as int32, exactly: float32 products
    whose partial sums are integers below 2**24 in any order of summation -- the first ``bools`` columns (0/1) in
    pieces of up to 131072, the rest in blocks of 1024."""
    b, n = a.shape
    out = None
    for start in range(0, bools, _EXACT_F32_BOOLS):
        stop = min(bools, start + _EXACT_F32_BOOLS)
        part = torch.mm(a[:, start:stop].to(torch.float32), rt[:, start:stop].t()).to(torch.int32)
        out = part if out is None else out + part
    full = bools + (n - bools) // _EXACT_F32 * _EXACT_F32
    if full > bools:
        blocks = a[:, bools:full].to(torch.float32).view(b, -1, _EXACT_F32).permute(1, 2, 0)  # (k, 1024, B)
        rows = rt[:, bools:full].reshape(rt.shape[0], -1, _EXACT_F32).transpose(0, 1)  # (k, 8, 1024)
        part = torch.bmm(rows, blocks).to(torch.int32).sum(0, dtype=torch.int32).t()
        out = part if out is None else out + part
    if full < n:
        part = torch.mm(a[:, full:].to(torch.float32), rt[:, full:].t()).to(torch.int32)
        out = part if out is None else out + part
    return out if out is not None else torch.zeros(b, rt.shape[0], dtype=torch.int32, device=a.device)


_INT8_DOT = ("avx512_vnni", "avx_vnni", "amx_int8")  # x86 instructions oneDNN's int8 products need


@functools.lru_cache(maxsize=1)
def _cpu_route() -> str:
    """``"int_mm"`` or ``"float32"``: the faster exact int8 product on this CPU, decided once per process (the same
    integers either way): float32 on x86 CPUs without int8 dot-product instructions, else measured.
    ``torch._int_mm`` is fast where oneDNN has int8 kernels (AVX-512 VNNI: ~0.6 ms for a LeNet batch of 250), a
    plain loop elsewhere (AVX2, an AMD EPYC build machine: 6.2 ms against about 1 ms for the float32 products, 1.7x
    instead of 1.27x the validation epoch under RegionMonitor)."""
    if not hasattr(torch, "_int_mm"):  # (torch < 2.2)
        return "float32"
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    if caps.get("architecture") == "x86_64" and not any(caps.get(k) for k in _INT8_DOT):
        # no int8 dot-product instructions: _int_mm is the plain loop. Decided without a measurement, which a
        # busy machine can turn around (with other work on both cores, MKL's two threads stall each other: the
        # float32 products took ~90 ms against ~18 ms for the loop, for the life of the process)
        return "float32"
    g = torch.Generator().manual_seed(0)
    with torch._C.DisableTorchFunction(), torch.inference_mode():
        # a block as the keys' products see it: two-state columns first, then one-byte states
        a = torch.cat([torch.randint(0, 2, (256, 3072), generator=g, dtype=torch.int8),
                       torch.randint(-128, 128, (256, 1024), generator=g, dtype=torch.int16).to(torch.int8)], 1)
        r = torch.randint(-127, 128, (4096, _COLUMNS), generator=g, dtype=torch.int16).to(torch.int8)
        rt = _float32_rows(r)
        routes = {"int_mm": lambda: torch._int_mm(a, r), "float32": lambda: _float32_product(a, rt, 3072)}
        best = dict.fromkeys(routes, float("inf"))
        for f in routes.values():
            f()  # warm-up
        # alternating rounds, the fastest of each: a busy machine slows both more alike than 3 rounds of one, then 3
        # of the other
        for _ in range(7):
            for name, f in routes.items():
                t0 = time.perf_counter()
                f()
                best[name] = min(best[name], time.perf_counter() - t0)
    # int_mm only when clearly faster: float32 products are never far off where int8 kernels exist
    return "int_mm" if best["int_mm"] < 0.8 * best["float32"] else "float32"


@functools.lru_cache(maxsize=16)
def _fold_weights(device: torch.device) -> Tensor:
    """``(8,)`` int64, uniform over all 64-bit values, fixed (the same on every device and in every process)."""
    g = torch.Generator().manual_seed(0x5EED0F01D)
    halves = torch.randint(0, 1 << 32, (2, _COLUMNS), generator=g, dtype=torch.int64)
    return ((halves[0] << 32) | halves[1]).to(device)


def fold_columns(acc: Tensor) -> Tensor:
    """``(B, 8)`` integer column sums -> ``(B,)`` int64 keys ``Σ_j acc_j·m_j mod 2⁶⁴`` (wrapping int64 arithmetic;
    see the module docstring for the collision bound)."""
    return (acc * _fold_weights(acc.device)).sum(1)  # int32 * int64 promotes to int64 (one operation fewer)


def _low_bytes(flat: Tensor, nbytes: int) -> Tensor:
    """``(B, m)`` integer states -> ``(B, m * nbytes)`` int8: each unit's ``nbytes`` low bytes.

    A max-pool unit's state is its flat argmax index, whose low bytes are enough: the indices of one window differ
    by less than its span (``key_states``), so they stay distinct modulo 256 (65536) when the span fits a byte
    (two) -- the same information as the offset from the window's corner, without subtracting the corner. States
    of one byte need no call here: ``pattern_keys`` narrows them on their way into a product's block."""
    b, n = flat.shape
    return flat.to(torch.int64).contiguous().view(torch.uint8).view(b, n, 8)[..., :nbytes].reshape(b, -1) \
        .view(torch.int8)


def _width(bits_per_unit: int) -> int:
    """Bits ``state_bytes`` gives a unit of at most 8 bits: 1, 2, 4 or 8 (units never straddle a byte)."""
    return 1 if bits_per_unit == 1 else 2 if bits_per_unit <= 2 else 4 if bits_per_unit <= 4 else 8


def _packed_bytes(n: int, bits_per_unit: int) -> int:
    """Bytes ``state_bytes`` uses for ``n`` units of ``bits_per_unit`` bits."""
    if bits_per_unit > 8:
        return n * -(-bits_per_unit // 8)
    return -(-n * _width(bits_per_unit) // 8)


class _Layout:
    """What the keys of one structure of patterns need, worked out once: each layer's byte width and the column
    blocks of the products with their slices of the projection (per-call Python work was half of a LeNet batch's
    key time)."""

    def __init__(self, patterns: Sequence, device: torch.device, group: int, chunk: int):
        self.one_word = sum(_packed_bytes(p.n_units, p.bits_per_unit) for p in patterns) <= WORD_BITS // 8
        bits = [p.bits_per_unit for p in patterns]
        self.nbytes = [-(-k // 8) if k > 8 else 0 for k in bits]
        widths = [p.n_units * max(1, nb) for p, nb in zip(patterns, self.nbytes)]
        self.n = sum(widths)
        r = _projection(self.n, device)
        # column blocks of at most `chunk` units; small layers share one product (each product has a fixed cost of
        # ~40 µs on the CPU, a small copy much less)
        groups: list[list[tuple[int, slice | None]]] = [[]]
        width = 0
        for i, w in enumerate(widths):
            for start in range(0, w, chunk):
                cols = min(chunk, w - start)
                if groups[-1] and width + cols > group:
                    groups.append([])
                    width = 0
                groups[-1].append((i, None if cols == w else slice(start, start + cols)))
                width += cols
        starts = [sum(widths[:i]) for i in range(len(widths))]
        two_state = [p.state.dtype == torch.bool for p in patterns]
        # the shape a whole layer's state is copied in as (None: as (B, columns), for wide or split states)
        shapes = [tuple(p.state.shape[1:]) if nb == 0 else None for p, nb in zip(patterns, self.nbytes)]
        self.groups = [_Block(g, widths, starts, two_state, shapes, r) for g in groups]
        self.wide = self.n > chunk  # the sum over all units may pass 2^31: add in int64


class _Block:
    """One product of ``pattern_keys``: its parts (layer index, column slice or None for the whole layer), where
    each part sits in the block, and the block's rows of the projection.

    A single whole two-state layer is read in place (``view``). Otherwise the parts are copied into a block of
    int8 columns (its width padded to whole int64 words), two-state layers first, so that one sum over the words
    counts every two-state unit of the block (``count_true``'s lanes): the other layers' bytes come after them,
    and a byte lane that overflows carries only into later bytes. Pad columns meet zero rows of the projection,
    whatever they hold.

    The block and its views (one per part, in the part's own shape, so that a state is copied in without a
    reshape) are kept per batch size and thread (``buffers``): a LeNet batch's keys are ~20 small tensor
    operations, and on the 2-core build machine each costs ~5-7 µs however small.
    """

    def __init__(self, parts: list, widths: list[int], starts: list[int], two_state: list[bool],
                 shapes: list[tuple | None], r: Tensor):
        def width(i: int, sl: slice | None) -> int:
            return widths[i] if sl is None else sl.stop - sl.start

        self.view = len(parts) == 1 and parts[0][1] is None and two_state[parts[0][0]]
        ordered = [q for q in parts if two_state[q[0]]] + [q for q in parts if not two_state[q[0]]]
        self.parts, at = [], 0  # (layer, slice, first column, width), in block order
        self.n_two_state = 0
        for i, sl in ordered:
            w = width(i, sl)
            self.parts.append((i, sl, at, w))
            at += w
            if two_state[i]:
                self.n_two_state = at
        self.shapes = [shapes[i] if sl is None else None for i, sl, _, _ in self.parts]
        self.width = at if self.view else -(-at // 8) * 8
        self.rows = torch.zeros(self.width, r.shape[1], dtype=r.dtype, device=r.device)
        for i, sl, at, w in self.parts:
            first = starts[i] + (0 if sl is None else sl.start)
            self.rows[at:at + w] = r[first:first + w]
        self.rows_t = _float32_rows(self.rows) if r.device.type == "cpu" else None
        self._buffers: dict[tuple, tuple] = {}

    def buffers(self, b: int, device: torch.device) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """The ``(b, width)`` int8 block, each part's view into it, and the int64 words that hold the two-state
        columns (None without any); reused by later calls of the same batch size in this thread (and CUDA
        stream): every call overwrites all parts before reading the block."""
        # (and per inference mode: a block made under torch.inference_mode, as in Lightning's validation loop, is an
        # inference tensor, which may not be written outside it, e.g. by a later evaluate())
        key = (b, threading.get_ident(), torch.is_inference_mode_enabled(),
               torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None)
        buf = self._buffers.get(key)
        if buf is None:
            if len(self._buffers) >= 8:  # a few batch sizes and threads at a time
                self._buffers.clear()
            block = torch.zeros(b, self.width, dtype=torch.int8, device=device)
            views = [block[:, at:at + w] if shape is None else block[:, at:at + w].view(b, *shape)
                     for (_, _, at, w), shape in zip(self.parts, self.shapes)]
            words = block.view(torch.int64)[:, : -(-self.n_two_state // 8)] if self.n_two_state else None
            buf = self._buffers[key] = (block, views, words)
        return buf


class UnitCounts(Mapping):
    """Active counts of the two-state (bool) units of one batch, by layer: ``counts[k]`` is ``(n_units,)`` int32.

    Kept as the key computation leaves them -- per block of the products, the int64 lane sums (eight byte counters
    per word, exact for batches of up to 255 rows) or int32 column counts -- and cut into layers on access.
    :meth:`total` adds many batches with a few operations per block, instead of a few per batch and layer.
    """

    __slots__ = ("_parts", "_spans")

    def __init__(self, parts: list[tuple[Tensor, bool]], spans: dict[Any, tuple[tuple[int, int, int], ...]]):
        self._parts = parts  # (tensor, whether it holds lane words)
        self._spans = spans  # key -> its pieces: (part, first column, width), in unit order

    @staticmethod
    def _columns(t: Tensor, lanes: bool) -> Tensor:
        return t.view(torch.uint8) if lanes else t

    def __getitem__(self, key: Any) -> Tensor:
        pieces = [self._columns(*self._parts[k])[at:at + w] for k, at, w in self._spans[key]]
        return (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).to(torch.int32)

    def __iter__(self) -> Iterator:
        return iter(self._spans)

    def __len__(self) -> int:
        return len(self._spans)

    def renamed(self, names: Mapping[Any, Any]) -> UnitCounts:
        """The counts of the keys in ``names``, under their new names."""
        return UnitCounts(self._parts, {names[k]: v for k, v in self._spans.items() if k in names})

    @staticmethod
    def total(batches: Sequence[Mapping[Any, Tensor]]) -> dict[Any, Tensor]:
        """``{key: (n_units,) int64}``: the counts of several batches (``UnitCounts`` or plain mappings) added."""
        out: dict[Any, Tensor] = {}

        def add(key: Any, t: Tensor) -> None:
            out[key] = t if key not in out else out[key] + t

        groups: dict[tuple, list[UnitCounts]] = {}
        for c in batches:
            if isinstance(c, UnitCounts):
                sig = (tuple(c._spans.items()),
                       tuple((tuple(t.shape), t.dtype, t.device, lanes) for t, lanes in c._parts))
                groups.setdefault(sig, []).append(c)
            else:
                for key, t in c.items():
                    add(key, t.to(torch.int64))
        for same in groups.values():
            first = same[0]
            sums = [UnitCounts._columns(torch.stack([c._parts[k][0] for c in same]), lanes).sum(0, dtype=torch.int64)
                    for k, (_, lanes) in enumerate(first._parts)]
            for key, pieces in first._spans.items():
                cols = [sums[k][at:at + w] for k, at, w in pieces]
                add(key, cols[0] if len(cols) == 1 else torch.cat(cols))
        return out


def _whole(counts: dict[int, Tensor]) -> UnitCounts:
    """Per-layer count tensors as :class:`UnitCounts`."""
    keys = list(counts)
    return UnitCounts([(counts[k], False) for k in keys],
                      {k: ((j, 0, counts[k].shape[0]),) for j, k in enumerate(keys)})


_LAYOUTS: dict[tuple, _Layout] = {}


def _layout(patterns: Sequence) -> _Layout:
    state = patterns[0].state
    sig = (state.device, _GROUP, _CHUNK) + tuple(
        (p.kind, p.n_states, p.state.dtype, p.state.shape[1:], p.params.get("geometry"), p.params.get("in_shape"))
        for p in patterns)
    lay = _LAYOUTS.get(sig)
    if lay is None:
        if len(_LAYOUTS) >= 64:  # a bounded cache of constants
            _LAYOUTS.clear()
        lay = _LAYOUTS[sig] = _Layout(patterns, state.device, _GROUP, _CHUNK)
    return lay


def pattern_keys(patterns: Sequence) -> Tensor:
    """``(B,)`` int64 region keys of several layers' patterns (see the module docstring): the packed word when the
    patterns fit into 64 bits, else a hash with collision probability about n² / 2⁶⁴ for n distinct patterns.

    ``patterns`` are :class:`~relu_regions.units.LayerPattern` objects, in a fixed order; equal patterns give
    equal keys on every device.
    """
    return _keys(patterns, counts=False)[0]


def pattern_keys_and_counts(patterns: Sequence) -> tuple[Tensor, UnitCounts]:
    """:func:`pattern_keys`, and the ``(n_units,)`` int32 active counts (:func:`count_true`) of every two-state
    (bool) pattern, by its index in ``patterns`` (a :class:`UnitCounts` mapping): counted from the blocks the keys
    are projected from (one sum per block instead of one per layer)."""
    return _keys(patterns, counts=True)


def _keys(patterns: Sequence, counts: bool) -> tuple[Tensor, UnitCounts]:
    # the products are exact in float32 / float64 only: under autocast they ran in bfloat16 / float16 (other keys
    # than outside it for the same patterns, e.g. a Lightning "bf16-mixed" step's against an evaluate())
    with autocast_off((patterns[0].state.device.type,)):
        return _exact_keys(patterns, counts)


def _exact_keys(patterns: Sequence, counts: bool) -> tuple[Tensor, UnitCounts]:
    b = patterns[0].state.shape[0]
    device = patterns[0].state.device
    if b == 0:
        return torch.zeros(0, dtype=torch.int64, device=device), _whole({
            i: torch.zeros(p.n_units, dtype=torch.int32, device=device)
            for i, p in enumerate(patterns) if counts and p.state.dtype == torch.bool})
    lay = _layout(patterns)
    if lay.one_word:  # one word: the key is the pattern itself
        return region_keys(pack_patterns(patterns)), _whole({
            i: count_true(p.flat_state()) for i, p in enumerate(patterns) if counts and p.state.dtype == torch.bool})
    acc = None
    parts: list[tuple[Tensor, bool]] = []
    spans: dict[int, tuple] = {}
    for blk in lay.groups:
        if blk.view:
            i = blk.parts[0][0]
            flat = patterns[i].state.reshape(b, -1)
            if not flat.is_contiguous() or flat.storage_offset() % 8:
                flat = flat.contiguous()
            block = flat.view(torch.int8)
            if counts:
                n = flat.shape[1]  # whole words: the bools read in place as int64 lanes (count_true's trick)
                parts.append(_lane_sums(flat.view(torch.int64), n) if n % 8 == 0 else (count_true(flat), False))
                spans[i] = spans.get(i, ()) + ((len(parts) - 1, 0, n),)
        else:  # one copy per part: bool -> 0/1, integers -> their low byte (a C cast); pad columns stay as they are
            block, views, words = blk.buffers(b, device)
            for (i, sl, _, _), view in zip(blk.parts, views):
                nb = lay.nbytes[i]
                if nb:  # wide states: their low bytes
                    src = _low_bytes(patterns[i].state.reshape(b, -1), nb)
                    view.copy_(src if sl is None else src[:, sl])
                else:
                    view.copy_(patterns[i].state if sl is None else patterns[i].state.reshape(b, -1)[:, sl])
            if counts and words is not None:
                parts.append(_lane_sums(words, blk.n_two_state))
                for i, _, at, w in blk.parts:
                    if at < blk.n_two_state:
                        spans[i] = spans.get(i, ()) + ((len(parts) - 1, at, w),)
        term = _int8_product(block, blk.rows, blk.n_two_state, blk.rows_t)
        if lay.wide:
            term = term.to(torch.int64)
        acc = term if acc is None else acc + term
    return fold_columns(acc), UnitCounts(parts, spans)
