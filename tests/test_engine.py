"""The exact region engine: recording, affine maps by three routes, keys, errors and state safety."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo import InplaceResidualStream, zoo

import relu_regions as rr
from relu_regions.keys import count_true, pack_bits, region_keys

ZOO = zoo()
METHODS = ["reverse", "forward", "compose"]


def _inputs(shape, n=6, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=dtype)


def _model(name, dtype=torch.float32):
    m, shape = ZOO[name]
    return copy.deepcopy(m).to(dtype), shape


def _packed(model, x):
    with torch.no_grad(), rr.record(model) as rec:
        model(x)
    return rec.packed()


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("method", METHODS)
def test_map_reproduces_output_float32(name, method):
    m, shape = _model(name)
    x = _inputs(shape)
    am = rr.affine_map(m, x, method=method, check=False)
    with torch.no_grad():
        fx = m(x).reshape(len(x), -1)
    assert am.A.shape == (len(x), fx.shape[1], *shape) and am.d.shape == fx.shape
    err = (am(x) - fx).abs()
    assert (err <= 1e-4 * (1 + fx.abs())).all(), err.max()


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("method", METHODS)
def test_map_equals_jacobian_float64(name, method):
    m, shape = _model(name, torch.float64)
    x = _inputs(shape, dtype=torch.float64)
    am = rr.affine_map(m, x, method=method, check=False)
    with torch.no_grad():
        fx = m(x).reshape(len(x), -1)
    assert (am(x) - fx).abs().max() <= 1e-9
    # reference: plain autograd on the unmodified model, one sample at a time (vmap lacks a PReLU batching rule)
    jac = torch.stack([torch.autograd.functional.jacobian(lambda v: m(v.unsqueeze(0)).reshape(-1), xi) for xi in x])
    assert torch.allclose(am.A.reshape(jac.shape), jac, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("name", list(ZOO))
def test_methods_agree_and_target_selects_rows(name):
    m, shape = _model(name, torch.float64)
    x = _inputs(shape, dtype=torch.float64)
    maps = {meth: rr.affine_map(m, x, method=meth) for meth in METHODS}
    for meth in METHODS[1:]:
        assert torch.allclose(maps[meth].A, maps["reverse"].A, atol=1e-10)
        assert torch.allclose(maps[meth].d, maps["reverse"].d, atol=1e-10)
    k = maps["reverse"].A.shape[1]
    target = torch.arange(len(x)) % k
    for meth in METHODS:
        t = rr.affine_map(m, x, target=target, method=meth)
        rows = maps["reverse"].A[torch.arange(len(x)), target]
        assert t.A.shape[1] == 1 and torch.allclose(t.A[:, 0], rows, atol=1e-10)
        assert torch.allclose(t.d[:, 0], maps["reverse"].d[torch.arange(len(x)), target], atol=1e-10)


def test_target_lists_need_one_entry_per_sample():
    """As in Captum: a list is one target per sample (before, ``target=[2]`` was applied to every sample of a batch
    of 4); an int or a one-element tensor applies to all."""
    m, shape = _model("mlp3", torch.float64)
    x = _inputs(shape, n=4, dtype=torch.float64)
    with pytest.raises(ValueError, match="target is a list of 1 entries for a batch of 4"):
        rr.affine_map(m, x, target=[2])
    with pytest.raises(ValueError, match="target is a list of 1 entries for a batch of 4"):
        rr.contributions(m, x, target=[2])
    every = rr.affine_map(m, x, target=[2] * 4).A
    assert torch.equal(rr.affine_map(m, x, target=2).A, every)
    assert torch.equal(rr.affine_map(m, x, target=torch.tensor([2])).A, every)


@pytest.mark.parametrize("name", ["mlp3", "lenet", "residual", "mixed", "conv1d", "functional", "resnet", "branchy"])
def test_perturbation_inside_region_is_exact_and_crossing_breaks_it(name):
    m, shape = _model(name, torch.float64)
    x = _inputs(shape, n=3, dtype=torch.float64)
    am = rr.affine_map(m, x)
    base = _packed(m, x)
    g = torch.Generator().manual_seed(5)
    delta = torch.randn(x.shape, generator=g, dtype=torch.float64)
    small = None
    for scale in [1e-3, 1e-4, 1e-5, 1e-6, 1e-7]:
        if torch.equal(_packed(m, x + scale * delta), base):
            small = scale
            break
    assert small is not None, "no in-region perturbation found"
    with torch.no_grad():
        f_small = m(x + small * delta).reshape(len(x), -1)
    assert (am(x + small * delta) - f_small).abs().max() < 1e-9
    # grow the step until the pattern changes: there the region's map no longer gives f
    big = 0.1
    while torch.equal(_packed(m, x + big * delta), base) and big < 1e4:
        big *= 2
    moved = (_packed(m, x + big * delta) != base).any(1)
    assert moved.any()
    with torch.no_grad():
        f_big = m(x + big * delta).reshape(len(x), -1)
    err = (am(x + big * delta) - f_big).abs().amax(1)
    assert (err[moved] > 1e-6).any()


def test_record_outputs_bit_identical_and_hooks_removed():
    for name, (m, shape) in ZOO.items():
        x = _inputs(shape)
        with torch.no_grad():
            plain = m(x)
        n_hooks = sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in m.modules())
        with torch.no_grad(), rr.record(m) as rec:
            recorded = m(x)
        assert torch.equal(plain, recorded), name
        assert n_hooks == sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in m.modules())
        assert len(rec) == len(x) and rec.layer_names


def test_layer_names_functional_inplace_and_reused():
    m, shape = _model("functional")
    with rr.record(m) as rec:
        m(_inputs(shape))
    assert rec.layer_names == ["relu", "max_pool2d", "relu#1", "relu#2", "clamp"]
    m, shape = _model("reused")
    with rr.record(m) as rec:
        m(_inputs(shape))
    assert rec.layer_names == ["act", "act#1", "act#2"]
    m, shape = _model("mixed")
    with rr.record(m) as rec:
        m(_inputs(shape))
    assert [p.kind for p in rec.patterns()] == ["leaky_relu", "prelu", "clamp", "clamp"]
    assert [p.n_states for p in rec.patterns()] == [2, 2, 3, 3]


def test_inplace_relu_pattern_is_read_before_the_op():
    m, shape = _model("inplace")
    x = _inputs(shape, n=50)
    with torch.no_grad(), rr.record(m) as rec:
        m(x)
        pre = m.l1(x)
    state = rec.patterns("r1")[0].state
    assert torch.equal(state, pre > 0)
    assert 0 < state.float().mean() < 1


def test_boundary_units_are_counted():
    m = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2))
    x = torch.stack([torch.zeros(3), torch.tensor([1.0, -2.0, 0.5])])
    with rr.record(m, count_boundary=True) as rec:
        m(x)
    assert rec.n_boundary().tolist() == [4, 0]
    assert rec.on_boundary().tolist() == [True, False]
    # the affine map counts on demand, with the same result
    assert rr.affine_map(m, x).n_boundary.tolist() == [4, 0]
    # without counting (the default) asking for counts is an error, not zeros
    with rr.record(m) as rec:
        m(x)
    with pytest.raises(RuntimeError, match="count_boundary=True"):
        rec.n_boundary()
    # max-pool ties with a non-zero maximum count as boundary windows
    pool = nn.Sequential(nn.MaxPool2d(2))
    img = torch.tensor([[[[1.0, 1.0], [0.0, 0.5]]], [[[1.0, 0.0], [0.0, 0.5]]]])
    with rr.record(pool, count_boundary=True) as rec:
        pool(img)
    assert rec.n_boundary().tolist() == [1, 0]
    assert rr.affine_map(pool, img).n_boundary.tolist() == [1, 0]


def test_keys_are_injective_on_many_random_patterns():
    g = torch.Generator().manual_seed(0)
    n = 120_000
    for n_bits in (40, 200):
        bits = torch.rand(n, n_bits, generator=g) < 0.5
        bits[: n // 10] = bits[n // 2: n // 2 + n // 10]  # planted duplicates
        packed = pack_bits(bits)
        keys = region_keys(packed)
        n_patterns = torch.unique(bits, dim=0).shape[0]
        assert torch.unique(keys).numel() == n_patterns
        assert torch.equal(keys[: n // 10], keys[n // 2: n // 2 + n // 10])
    # exact packing: unpack and compare
    bits = torch.rand(7, 130, generator=g) < 0.5
    words = pack_bits(bits)
    unpacked = ((words.unsqueeze(-1) >> torch.arange(64)) & 1).reshape(7, -1)[:, :130].bool()
    assert words.shape == (7, 3) and torch.equal(unpacked, bits)


def test_per_layer_keys_and_selection():
    m, shape = _model("mlp3")
    x = _inputs(shape, n=400)
    with rr.record(m) as rec:
        m(x[:200])
        m(x[200:])
    names = rec.layer_names
    assert len(rec) == 400
    full = rec.region_ids()
    last = rec.region_ids(slice(-1, None))
    first = rec.region_ids(names[0])
    assert torch.equal(last, rec.region_ids([names[-1]]))
    # the full key refines each layer's key: equal full keys imply equal layer keys
    for k in torch.unique(full):
        sel = full == k
        assert torch.unique(first[sel]).numel() == 1
    states = rec.patterns(names[0])[0].state
    assert torch.unique(first).numel() == torch.unique(states, dim=0).shape[0]
    with pytest.raises(KeyError, match="unknown layer"):
        rec.region_ids("nope")


class _Gelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 2))

    def forward(self, x):
        return self.body(x)


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return (self.q(x) * self.k(x)).sum(-1, keepdim=True)


class _Reciprocal(nn.Module):
    def __init__(self, div=None):
        super().__init__()
        self.lin, self.div = nn.Linear(4, 2), div

    def forward(self, x):
        h = self.lin(x).relu() + 1
        return 2.0 / h if self.div is None else self.div(torch.ones_like(h), h)


class _Op(nn.Module):
    """Linear -> ``f`` -> Linear: an operation written inline in the forward."""

    def __init__(self, f):
        super().__init__()
        self.lin, self.out, self.f = nn.Linear(4, 6), nn.Linear(6, 2), f

    def forward(self, x):
        return self.out(self.f(self.lin(x)))


_C = torch.linspace(-1, 1, 6)


@pytest.mark.parametrize("model, where, op", [
    (_Gelu(), "body.1", "gelu"),
    # before the lists grew, these passed as if linear (no state recorded; distances past their kinks)
    (_Op(lambda h: h - h.median(1, keepdim=True).values), "<root>", "median"),
    (_Op(lambda h: h.cummax(1).values), "<root>", "cummax"),
    (_Op(lambda h: h.clone().sigmoid_()), "<root>", "sigmoid_"),
    (_Op(lambda h: torch.special.expit(h)), "<root>", "expit"),
    (_Op(lambda h: torch.fmod(h, 1.0)), "<root>", "fmod"),
    (_Op(lambda h: h // 1.0), "<root>", "__floordiv__"),
    (_Op(lambda h: torch.fmax(h, _C)), "<root>", "fmax"),
    (_Op(lambda h: torch.addcmul(h, h, h)), "<root>", "addcmul"),
    (_Op(lambda h: h.clone().mul_(h)), "<root>", "of two input-dependent tensors"),
    (_Op(lambda h: h + torch.linalg.vector_norm(h, dim=1, keepdim=True)), "<root>", "vector_norm"),
    (_Op(lambda h: h + (h > 0).float()), "<root>", "from torch.bool to torch.float32"),
    (_Op(lambda h: h + h.long()), "<root>", "from torch.float32 to torch.int64"),
    (_Op(lambda h: h + (h > 0).long().float()), "<root>", "from torch.bool to torch.int64"),
    (_Op(lambda h: torch.clamp(_C.expand_as(h), min=h)), "<root>", "does not record as a unit"),
    # steps of the input used as numbers, reads into Python, rows of the batch as units: recorded silently before
    (_Op(lambda h: h.relu() + (h > 0)), "<root>", "'add' on a torch.bool tensor computed from input-dependent"),
    (_Op(lambda h: h.relu() + (h > 0).sum(1, keepdim=True)), "<root>", "'add' on a torch.int64 tensor"),
    (_Op(lambda h: h.relu() + torch.logical_and(h > 0, h < 1)), "<root>", "'add' on a torch.bool tensor"),
    (_Op(lambda h: torch.cat([h.relu(), h < 1], 1)[:, :6]), "<root>", "'cat' on a torch.bool tensor"),
    (_Op(lambda h: h.relu() if h.sum() > 0 else -h.relu()), "<root>", "reads input-dependent values into Python "
                                                                       "('__bool__'"),
    (_Op(lambda h: h.relu() * float(h.mean())), "<root>", "('__float__'"),
    (_Op(lambda h: h.relu() * h.mean().item()), "<root>", "('item'"),
    (_Op(lambda h: torch.from_numpy(h.detach().numpy()).relu()), "<root>", "('numpy'"),
    (_Op(lambda h: torch.div(h, 0.5, rounding_mode="floor")), "<root>", "rounding_mode='floor'"),
    (_Op(lambda h: torch.stack([r.relu() for r in h])), "<root>", "whose first dimension is not the batch"),
    (_Op(lambda h: torch.ops.aten.relu(h)), "<root>", "calls the operator 'aten.relu' (torch.ops)"),
    (_Op(lambda h: h.relu() + torch.unique(h).sum()), "<root>", "'unique'"),
    (_Op(lambda h: h.relu() + 0.1 * torch.randn_like(h)), "<root>", "'randn_like' on input-dependent data: random"),
    # spellings a scan of ~1500 torch / F / special / Tensor callables found passing as linear (session 14)
    (_Op(lambda h: torch.selu(h)), "<root>", "selu"),
    (_Op(lambda h: h.hardshrink()), "<root>", "hardshrink"),
    (_Op(lambda h: torch.sigmoid_(h.clone())), "<root>", "sigmoid_"),
    (_Op(lambda h: torch.special.bessel_j0(h)), "<root>", "bessel_j0"),
    (_Op(lambda h: h.clone().gt_(0)), "<root>", "gt_"),
    (_Op(lambda h: torch.ldexp(h, h)), "<root>", "ldexp"),
    (_Op(lambda h: h.clone().multiply_(h)), "<root>", "of two input-dependent tensors"),
    (_Op(lambda h: h.clone().divide_(h)), "<root>", "division by an input-dependent tensor"),
    (_Op(lambda h: h * torch.linalg.pinv(h).T), "<root>", "pinv"),
    (_Op(lambda h: h + F.mse_loss(h, torch.zeros_like(h))), "<root>", "mse_loss"),
    (_Op(lambda h: torch.group_norm(h.unsqueeze(-1), 2)[..., 0]), "<root>", "group_norm"),
    (nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 2)), "1", "sigmoid"),
    (nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)), "1", "tanh"),
    (nn.Sequential(nn.Linear(4, 5), nn.Softmax(-1), nn.Linear(5, 2)), "1", "softmax"),
    (nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.ReLU(), nn.Linear(5, 2)), "1", "layer_norm"),
    (nn.Sequential(nn.Linear(4, 5), nn.SiLU(), nn.Linear(5, 2)), "1", "silu"),
    (_Attention(), "<root>", "of two input-dependent tensors"),
    (_Reciprocal(), "<root>", "division by an input-dependent tensor"),
    (_Reciprocal(torch.div), "<root>", "division by an input-dependent tensor"),
])
@pytest.mark.parametrize("method", METHODS)
def test_unsupported_modules_raise_naming_module_and_op(model, where, op, method):
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(rr.UnsupportedModuleError) as err:
        rr.affine_map(model, torch.randn(3, 4), method=method)
    assert f"'{where}'" in str(err.value) and op in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("gate, op, what", [
    (lambda h: torch.where(h > 0, h, 0.0), "where", "condition"),
    (lambda h: h.where(h > 0, 0.0), "where", "condition"),
    (lambda h: h.masked_fill(h < 0, 0.0), "masked_fill", "mask"),
    (lambda h: h * 1 + h[h > 2].sum(), "__getitem__", "index"),
    (lambda h: torch.cat([h, h[:, :1]], 1).gather(1, (h > 0).sum(1, keepdim=True)).expand(-1, 6), "gather",
     "index"),
])
def test_selections_by_the_input_itself_are_refused(gate, op, what):
    """``torch.where(h > 0, h, 0)`` is a ReLU the recording cannot see: its units were missing from every pattern
    (no units recorded, every boundary distance ``inf``). A condition, mask or index that depends on the input is
    refused naming the module and the call; a fixed one is fine, and ``strict=False`` takes the selection as fixed."""
    model = _Op(gate).eval()
    x = torch.randn(5, 4)
    def recorded():
        with rr.record(model):
            model(x)

    for call in (recorded, lambda: rr.affine_map(model, x), lambda: rr.boundary_distance(model, x)):
        with pytest.raises(rr.UnsupportedModuleError, match=f"'<root>' \\(_Op\\) calls '{op}' with a {what}"):
            with torch.no_grad():
                call()
    with torch.no_grad(), rr.record(model, strict=False) as rec:
        model(x)
    assert len(rec) == 5
    fixed = _Op(lambda h: torch.where(torch.arange(6) % 2 == 0, h, 0.0).relu()).eval()  # a fixed condition
    with torch.no_grad(), rr.record(fixed) as rec:
        out = fixed(x)
    assert [p.kind for p in rec.passes[0]] == ["relu"]
    am = rr.affine_map(fixed, x)
    assert torch.allclose(am(x), out, atol=1e-6)


@pytest.mark.parametrize("f, what", [
    (lambda h: h.relu() + (h > 0), "'add' on a torch.bool tensor"),
    (lambda h: h.relu() if h.sum() > 0 else -h.relu(), "('__bool__'"),
    (lambda h: h.relu() * h.mean().item(), "('item'"),
    (lambda h: torch.stack([r.relu() for r in h]), "whose first dimension is not the batch"),
], ids=["step-as-number", "branch", "item", "rows"])
def test_recordings_and_distances_refuse_what_affine_maps_caught_only_by_their_self_check(f, what):
    """Before these refusals, ``affine_map`` caught such forwards only through its check of A·x + d against f(x),
    while ``record`` (region keys, statistics) and ``boundary_distance`` went on without a word."""
    model = _Op(f).eval()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))

    def recorded():
        with rr.record(model):
            model(x)

    for call in (recorded, lambda: rr.boundary_distance(model, x)):
        with pytest.raises(rr.UnsupportedModuleError, match=re.escape(what)), torch.no_grad():
            call()


def test_steps_and_checks_that_the_output_does_not_use_are_recorded():
    """What the refusals of steps and reads into Python leave alone: an ``assert torch.isfinite(x).all()`` (the same
    for every finite input), a count of active units kept as a tensor (a step, not used as a number), and the argmax
    of a max-pool fed to ``max_unpool`` (the pool's recorded state). The map equals the Jacobian of torch.func and
    reproduces the output; ``strict=False`` takes a branch on the input as fixed (the branch taken here)."""

    class Checked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.out = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            assert torch.isfinite(x).all()
            h = self.lin(x)
            self.n_active = (h > 0).sum(1)
            v, idx = F.max_pool1d(h.unsqueeze(1), 2, return_indices=True)
            h = h.relu() + F.max_unpool1d(v, idx, 2, output_size=(6,)).squeeze(1)
            return self.out(h)

    model = Checked().eval()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), rr.record(model) as rec:
        out = model(x)
    assert [p.kind for p in rec.passes[0]] == ["maxpool", "relu"]
    assert torch.equal(model.n_active, (model.lin(x) > 0).sum(1))
    am = rr.affine_map(model, x)
    jac = torch.stack([torch.func.jacrev(lambda v: model(v[None])[0])(xi) for xi in x])
    assert torch.allclose(am.A, jac, atol=1e-6) and torch.allclose(am(x), out, atol=1e-6)
    branchy = _Op(lambda h: h.relu() if h.sum() > -1e9 else -h.relu()).eval()
    with torch.no_grad(), rr.record(branchy, strict=False) as rec:
        branchy(x)
    assert [p.kind for p in rec.passes[0]] == ["relu"]


def test_a_unit_on_rows_that_are_not_the_batch_is_refused_on_both_routes():
    """A ReLU module on a reshape that moves the batch (``(B, 6) -> (2B, 3)``): its states would be counted as
    2B samples' (the hook route recorded them so before). Refused on both routes, naming the module."""

    class Rows(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.act, self.out = nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)

        def forward(self, x):
            return self.out(self.act(self.lin(x).reshape(-1, 3)).reshape(-1, 6))

    model = Rows().eval()
    from relu_regions.hook_recording import HookPlan, hook_plan

    assert isinstance(hook_plan(model), HookPlan)
    for route in ("hooks", "mode"):
        with pytest.raises(rr.UnsupportedModuleError, match=r"'act' \(ReLU\) runs a piecewise-linear unit on a "
                                                            r"tensor of shape \(10, 3\).*batch \(5 samples\)"):
            with torch.no_grad(), rr.record(model, route=route):
                model(torch.randn(5, 4))
        assert "forward" not in model.act.__dict__


class _StraightThrough(torch.autograd.Function):
    """A ReLU whose backward passes the gradient unchanged (a straight-through estimator): not its derivative."""

    @staticmethod
    def forward(ctx, h):
        return h.clamp_min(0)

    @staticmethod
    def backward(ctx, g):
        return g


def _no_grad_half(h):
    with torch.no_grad():
        c = h * 0.5
    return h * 0.5 + c


# forwards that cut the derivative of the input: (the cut, the call named, whether forward-mode AD is cut too)
_CUTS = {"detach": (lambda h: F.relu(h * 0.5 + h.detach() * 0.5), "detach", True),
         "data": (lambda h: F.relu(h * 0.5 + h.data * 0.5), "Tensor.data", True),
         "no_grad": (lambda h: F.relu(_no_grad_half(h)), "mul", False),
         "custom Function": (_StraightThrough.apply, "clamp_min", False)}  # (forward mode: torch refuses, no jvp)


class _Cut(nn.Module):
    def __init__(self, cut=None):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(4, 8), nn.Linear(8, 6), nn.Linear(6, 3)
        self.cut = cut

    def forward(self, x):
        h = self.l1(x)
        h = self.cut(h) if self.cut is not None else F.relu(h)
        return self.l3(F.relu(self.l2(h)))


@pytest.mark.parametrize("kind", list(_CUTS))
def test_a_forward_that_cuts_the_derivative_is_refused_where_derivatives_are_read(kind):
    """``.detach()``, ``.data``, ``torch.no_grad()`` and a custom autograd.Function (a straight-through ReLU) between
    the input and a unit: the value is the plain network's, its derivative is not. Before, ``boundary_distance`` read
    the cut derivative and returned wrong distances without a word (``affine_map`` only failed its own check). Now
    every route that reads derivatives refuses, naming the call; the walker (no derivatives) gives the plain
    network's map, the Jacobian of torch.func; the model is left as it was, and no warning is raised."""
    cut, op, forward_cut = _CUTS[kind]
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = _Cut(cut).double().eval()
    plain = _Cut().double().eval()
    plain.load_state_dict(model.state_dict())
    snap = _snapshot(model)
    refused = re.escape(f"module '<root>' (_Cut) calls '{op}' on input-dependent data where")
    calls = [lambda: rr.affine_map(model, x, method="reverse"), lambda: rr.boundary_distance(model, x, route="reverse"),
             lambda: rr.preactivation_maps(model, x, method="reverse")]
    if forward_cut:
        calls += [lambda: rr.affine_map(model, x, method="forward"),
                  lambda: rr.boundary_distance(model, x, route="forward")]
    for call in calls:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no "hook raised an exception that was silenced"
            with pytest.raises(rr.UnsupportedModuleError, match=refused):
                call()
        assert _same(snap, _snapshot(model))
    if kind != "data":  # (the walker has no rule for reading .data)
        jac = torch.stack([torch.func.jacrev(lambda v: plain(v[None])[0])(xi) for xi in x])
        assert torch.allclose(rr.affine_map(model, x, method="compose").A, jac, atol=1e-10)
    if kind == "no_grad":  # forward-mode AD follows no_grad blocks: the exact distances
        want = rr.boundary_distance(plain, x, route="reverse").distance
        assert torch.allclose(rr.boundary_distance(model, x, route="forward").distance, want, atol=1e-10)


def test_a_unit_inside_torch_checkpoint_is_refused_in_reverse_replays_and_forward_routes_stay_exact():
    """Non-reentrant ``torch.utils.checkpoint``: autograd recomputes the checkpointed part in the backward pass,
    outside the replay, with the units' live patterns. Before, ``boundary_distance(route="reverse")`` returned
    distances of other regions without a word (0.0082 where the exact distance is 0.0053 on this seed) and
    ``affine_map(method="reverse")`` failed inside torch's checkpoint code. Now every reverse replay through a unit
    there is refused, naming the unit; the forward and compose routes, and ``method="auto"``, which falls back to
    forward mode, equal the same network without checkpointing; the model is left as it was."""
    from torch.utils.checkpoint import checkpoint

    class Ckpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 7), nn.ReLU())
            self.b = nn.Linear(7, 3)

        def forward(self, x):
            return self.b(checkpoint(self.a, x, use_reentrant=False))

    torch.manual_seed(0)
    model = Ckpt().double().eval()
    plain = nn.Sequential(model.a, model.b)
    x = torch.randn(4, 5, dtype=torch.float64)
    snap = _snapshot(model)
    refused = re.escape("module 'a.1' (ReLU) runs inside torch.utils.checkpoint")
    for call in (lambda: rr.affine_map(model, x, method="reverse"),
                 lambda: rr.boundary_distance(model, x, route="reverse"),
                 lambda: rr.preactivation_maps(model, x, method="reverse"),
                 lambda: rr.attributions.neuron_contributions(model, x, target=0)):
        with pytest.raises(rr.UnsupportedModuleError, match=refused):
            call()
        assert _same(snap, _snapshot(model))
    jac = torch.stack([torch.func.jacrev(lambda v: plain(v[None])[0])(xi) for xi in x])
    for method in ("forward", "compose"):
        assert torch.allclose(rr.affine_map(model, x, method=method).A, jac, atol=1e-10)
    # "auto" (reverse for 3 outputs <= 5 features, so also contributions' default) falls back to forward mode
    # (before: the refusal above); chunk_size=3 also runs the chunk after the fallback's
    for target in (None, 1):
        auto = rr.affine_map(model, x, target=target, chunk_size=3)
        assert auto.method == "forward"
        assert torch.allclose(auto.A, jac if target is None else jac[:, 1:2], atol=1e-10)
    assert _same(snap, _snapshot(model))
    want = rr.boundary_distance(plain, x, route="reverse").distance
    assert torch.allclose(rr.boundary_distance(model, x, route="forward").distance, want, atol=1e-10)
    assert _same(snap, _snapshot(model))


def _solvers():
    """name -> (solve(matrix, rhs) for (B, n, n) matrices and (B, n) right-hand sides, the op's name in errors)."""
    ones = lambda a: torch.ones(a.shape[:-1], dtype=a.dtype).unsqueeze(-1)  # noqa: E731

    def lu(a, b):
        lu_, piv = torch.linalg.lu_factor(a)
        return torch.linalg.lu_solve(lu_, piv, b.unsqueeze(-1)).squeeze(-1)

    return {
        "solve": (lambda a, b: torch.linalg.solve(a, b), "linalg_solve"),
        "solve_kw": (lambda a, b: torch.linalg.solve(A=a, B=b), "linalg_solve"),
        "solve_triangular": (lambda a, b: torch.linalg.solve_triangular(a.triu(), b.unsqueeze(-1), upper=True)
                             .squeeze(-1), "linalg_solve_triangular"),
        "lstsq": (lambda a, b: torch.linalg.lstsq(a, b.unsqueeze(-1)).solution.squeeze(-1), "linalg_lstsq"),
        "lu_solve": (lu, "linalg_lu_factor"),  # (the factorisation of an input-dependent matrix is refused first)
        "cholesky_solve": (lambda a, b: torch.cholesky_solve(b.unsqueeze(-1), a.tril() + 3 * torch.eye(
            a.shape[-1], dtype=a.dtype)).squeeze(-1), "cholesky_solve"),
        "Tensor.cholesky_solve": (lambda a, b: b.unsqueeze(-1).cholesky_solve(a.tril() + 3 * torch.eye(
            a.shape[-1], dtype=a.dtype)).squeeze(-1), "cholesky_solve"),
        "ones_rhs": (lambda a, b: torch.linalg.solve(a, ones(a).squeeze(-1)), "linalg_solve"),
    }


@pytest.mark.parametrize("name", list(_solvers()))
def test_a_solver_is_linear_in_its_right_hand_side_only(name):
    """A linear solve ``A⁻¹ b`` inside a forward: with a constant matrix and an input-dependent right-hand side it is
    linear, and the maps equal torch.func's Jacobian of the model; with an input-dependent matrix it is an inverse,
    refused naming the call. Before, such a matrix passed as linear: ``affine_map`` failed its own value check with
    a generic error and ``boundary_distance`` returned distances of a network that does not exist; ``lstsq`` with a
    constant matrix was refused as a derivative cut (its empty singular values carry no gradient, and the cut was
    marked on the solution too) and ``linalg.lu_solve`` as nonlinear."""
    solve, op = _solvers()[name]

    class Solved(nn.Module):
        def __init__(self, dependent: bool):
            super().__init__()
            self.l1, self.l2, self.dependent = nn.Linear(3, 3), nn.Linear(3, 2), dependent
            self.register_buffer("M", 2 * torch.eye(3) + 0.1 * torch.randn(3, 3, generator=torch.Generator()
                                                                          .manual_seed(0)))

        def forward(self, x):
            h = torch.relu(self.l1(x))
            m = torch.diag_embed(h + 2.0) + 0.1 * self.M if self.dependent else self.M.expand(len(h), 3, 3)
            return self.l2(solve(m, h))

    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64)
    dependent = Solved(True).double().eval()
    with pytest.raises(rr.UnsupportedModuleError, match=re.escape(f"calls '{op}'")):
        rr.affine_map(dependent, x, method="reverse")
    with pytest.raises(rr.UnsupportedModuleError, match=re.escape(f"calls '{op}'")):
        rr.boundary_distance(dependent, x, route="forward")
    if name == "ones_rhs":
        return  # (a right-hand side that does not depend on the input)
    model = Solved(False).double().eval()
    jac = torch.stack([torch.func.jacrev(lambda v: model(v[None])[0])(xi) for xi in x])
    for method in ("reverse", "forward"):
        assert torch.allclose(rr.affine_map(model, x, method=method).A, jac, atol=1e-10)


def test_lstsq_residuals_of_an_input_dependent_right_hand_side_are_refused():
    """``lstsq``'s residuals are squared norms of ``A·X − B``, quadratic in an input-dependent ``B``. Before, a
    forward that used them passed: ``affine_map`` failed its value check with a generic error, and
    ``boundary_distance`` returned distances (0.18, 0.10, 0.33 on this seed) of no real network. Refused now, naming
    them; the solution alone (driver 'gelsy', which computes no residuals) stays exact."""

    class Residuals(nn.Module):
        def __init__(self, driver: str, use: bool):
            super().__init__()
            self.l, self.driver, self.use = nn.Linear(4, 6), driver, use
            self.register_buffer("M", torch.randn(6, 3, generator=torch.Generator().manual_seed(0)))

        def forward(self, x):
            h = torch.relu(self.l(x))
            sol, res, _, _ = torch.linalg.lstsq(self.M.expand(len(h), 6, 3), h.unsqueeze(-1), driver=self.driver)
            return torch.cat([sol.squeeze(-1), res.reshape(len(h), -1)], 1) if self.use else sol.squeeze(-1)

    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64)
    model = Residuals("gelsd", True).double().eval()
    for call in (lambda: rr.boundary_distance(model, x), lambda: rr.affine_map(model, x, method="forward")):
        with pytest.raises(rr.UnsupportedModuleError, match="'linalg_lstsq' with residuals"):
            call()
    with pytest.raises(rr.UnsupportedModuleError, match="'linalg_lstsq' with residuals"):
        with rr.record(model):
            model(x)
    solution = Residuals("gelsy", False).double().eval()
    solution.load_state_dict(model.state_dict())
    jac = torch.stack([torch.func.jacrev(lambda v: solution(v[None])[0])(xi) for xi in x])
    assert torch.allclose(rr.affine_map(solution, x).A, jac, atol=1e-10)


def test_a_cut_that_reaches_no_unit_and_not_the_output_is_replayed():
    """A statistic the forward keeps through ``.detach()`` reaches no unit and not the output: replayed, with the
    plain network's maps and distances. A custom Function after the last unit (a scale whose backward is wrong)
    reaches the output: refused, naming its call."""

    class Kept(_Cut):
        def forward(self, x):
            h = F.relu(self.l1(x))
            self.mean = h.mean().detach()
            return self.l3(F.relu(self.l2(h)))

    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model, plain = Kept().double().eval(), _Cut().double().eval()
    plain.load_state_dict(model.state_dict())
    want = rr.boundary_distance(plain, x, route="forward")
    for route in ("reverse", "forward"):
        got = rr.boundary_distance(model, x, route=route)
        assert torch.allclose(got.distance, want.distance, atol=1e-10)
        assert torch.allclose(rr.affine_map(model, x, method=route).A, rr.affine_map(plain, x, method=route).A,
                              atol=1e-10)

    class Scaled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h):
            return 2 * h

        @staticmethod
        def backward(ctx, g):
            return 3 * g

    class Head(_Cut):
        def forward(self, x):
            return Scaled.apply(super().forward(x))

    head = Head().double().eval()
    with pytest.raises(rr.UnsupportedModuleError, match="calls 'mul'.*the model's output uses the result"):
        rr.affine_map(head, x, method="reverse")


def _fill_setitem(buf, a, b):
    buf[:, :3] = a
    buf[:, 3:] = b
    return buf


def _fill_copy(buf, a, b):
    buf[:, :3].copy_(a)
    buf[:, 3:].copy_(b)
    return buf


def _fill_early_views(buf, a, b):
    left, right = buf[:, :3], buf[:, 3:]  # views taken before anything is written, read after
    buf[:, :3] = a
    buf[:, 3:] = b
    return torch.cat([left, right], 1)


class _Filled(nn.Module):
    def __init__(self, fill=None):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(6, 2)
        self.fill = fill

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.fill is None:
            return self.out(F.relu(torch.cat([a, b], 1)))
        return self.out(F.relu(self.fill(torch.zeros(x.shape[0], 6, dtype=x.dtype), a, b)))


@pytest.mark.parametrize("fill", [_fill_setitem, _fill_copy, _fill_early_views])
def test_values_written_into_a_buffer_are_recorded(fill):
    """A buffer filled in place with input-dependent values (``buf[:, :3] = h``, ``buf[:, :3].copy_(h)``, views
    taken before the write) holds them whole. Before, the written buffer counted as a constant: its ReLU was missing
    from every pattern (one region for all inputs), every distance ``inf``, and ``affine_map`` failed its check.
    Now the patterns, maps and distances are those of the same network written with ``torch.cat``; the maps equal
    the Jacobian of torch.func."""
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    model, plain = _Filled(fill).double().eval(), _Filled().double().eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad(), rr.record(model) as rec:
        model(x)
    with torch.no_grad(), rr.record(plain) as ref:
        plain(x)
    assert [p.kind for p in rec.passes[0]] == ["relu"]
    assert torch.equal(rec.passes[0][0].state, ref.passes[0][0].state)
    am = rr.affine_map(model, x)
    jac = torch.stack([torch.func.jacrev(lambda v: plain(v[None])[0])(xi) for xi in x])
    assert torch.allclose(am.A, jac, atol=1e-10)
    for route in ("forward", "reverse"):
        got = rr.boundary_distance(model, x, route=route).distance
        assert torch.isfinite(got).all()
        assert torch.allclose(got, rr.boundary_distance(plain, x, route=route).distance, atol=1e-10)


class _Hidden(nn.Module):
    """A ReLU network whose input reaches the ReLU where the function mode cannot follow it."""

    def __init__(self, how):
        super().__init__()
        self.lin, self.out, self.how = nn.Linear(4, 6), nn.Linear(6, 2), how

    def forward(self, x=None, batch=None):
        if self.how == "dict":
            x = batch["x"]
        h = self.lin(x)
        if self.how == "invisible":  # as a C++ extension function called directly: no torch function dispatch
            with torch._C.DisableTorchFunction():
                h = h * 2.0
        return self.out(F.relu(h))


@pytest.mark.parametrize("how, call", [("invisible", lambda m, x: m(x)), ("keyword", lambda m, x: m(x=x)),
                                       ("dict", lambda m, x: m(batch={"x": x}))])
def test_an_output_that_does_not_depend_on_the_input_as_far_as_the_recording_sees_is_refused(how, call):
    """Before, the ReLU after an operation the mode does not see (or after an input it does not follow: a keyword
    argument, a dict) was missing from every pattern: one region for every input, without a word. Now the pass's
    output, not input-dependent to the mode, is refused; ``strict=False`` records what the mode saw."""
    model = _Hidden(how).eval()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(5))
    with pytest.raises(rr.UnsupportedModuleError, match=r"the output of module '<root>' \(_Hidden\) does not depend "
                                                          r"on the model's input as far as the recording sees"):
        with torch.no_grad(), rr.record(model, route="mode"):
            call(model, x)
    with torch.no_grad(), rr.record(model, route="mode", strict=False) as rec:
        call(model, x)
    assert rec.passes[0] == []
    plain = _Hidden("plain").eval()
    with torch.no_grad(), rr.record(plain, route="mode") as rec:
        plain(x)
    assert [p.kind for p in rec.passes[0]] == ["relu"]


def test_an_integer_input_converted_in_the_forward_is_recorded():
    """uint8 images made floating inside the forward: the input's own conversion is not a step of the input."""

    class Bytes(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))

        def forward(self, x):
            return self.net(x.float() / 255)

    model = Bytes().eval()
    x = torch.randint(0, 256, (5, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), rr.record(model) as rec:
        model(x)
    with torch.no_grad(), rr.record(model.net) as ref:
        model.net(x.float() / 255)
    assert rec.route == "mode" and torch.equal(rec.region_ids(), ref.region_ids())


def test_a_call_that_wraps_the_forward_is_not_recorded_as_the_models():
    """Lightning's DDP strategies set the module's forward to the training / validation step for one call, and the
    step calls the module again: the pass is the inner call, and the step's loss and metrics around it (softmax,
    argmax) are neither recorded nor refused. A step that runs the model twice gives two passes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    x = torch.randn(5, 4)

    def step(batch, twice=False):
        inputs, labels = batch
        out = model(inputs)
        if twice:
            model(inputs[:2])
        return ((out.softmax(1).argmax(1) == labels).float().mean(), F.cross_entropy(out, labels))

    def redirect(twice):  # as lightning's _ForwardRedirection: the step as the forward for one call, unpatched
        original = model.forward  # inside (the class's bound forward is left on the instance afterwards)

        def wrapped_forward(*args, **kwargs):
            model.forward = original
            return step(*args, **kwargs)

        model.forward = wrapped_forward
        model((x, torch.zeros(5, dtype=torch.long)), twice=twice)

    for route in ("mode", "hooks"):
        for twice in (False, True):
            with torch.no_grad(), rr.record(model, route=route) as rec:
                redirect(twice)
            with torch.no_grad(), rr.record(model) as ref:
                model(x)
                if twice:
                    model(x[:2])
            assert [len(p[0].state) for p in rec.passes] == ([5, 2] if twice else [5])
            assert torch.equal(rec.region_ids(), ref.region_ids())


def test_softmax_head_via_logits_at():
    body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    model = nn.Sequential(body, nn.Softmax(dim=1))
    x = torch.randn(5, 4)
    with pytest.raises(rr.UnsupportedModuleError, match="logits_at"):
        rr.affine_map(model, x)
    am = rr.affine_map(model, x, logits_at="0")
    ref = rr.affine_map(body, x)
    assert torch.allclose(am.A, ref.A) and torch.allclose(am.d, ref.d)
    with torch.no_grad(), rr.record(model, logits_at="0") as rec:
        probs = model(x)  # the user's forward still runs to the end
    assert torch.allclose(probs.sum(1), torch.ones(5)) and len(rec.layer_names) == 1
    with pytest.raises(ValueError, match="not a submodule"):
        rr.affine_map(model, x, logits_at="missing")


def _snapshot(model):
    return (copy.deepcopy(model.state_dict()), [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()],
            [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), "forward" in vars(m))
             for m in model.modules()])


def _same(a, b):
    sa, ta, ra, ha = a
    sb, tb, rb, hb = b
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa) and ta == tb and ra == rb and ha == hb


def test_model_state_restored_after_success_and_failure():
    m, shape = _model("bn_cnn")
    m.train()  # BatchNorm and Dropout in train mode: switched to eval for the call, restored after
    m.net[0].weight.requires_grad_(False)
    user_hook = m.net[2].register_forward_hook(lambda *a: None)
    snap = _snapshot(m)
    x = _inputs(shape)
    am = rr.affine_map(m, x)
    assert _same(snap, _snapshot(m))
    m.eval()
    with torch.no_grad():
        assert torch.allclose(am(x), m(x), atol=1e-5)
    m.train()
    with pytest.raises(ValueError, match="target"):
        rr.affine_map(m, x, target=99)
    assert _same(snap, _snapshot(m))

    class Boom(Exception):
        pass

    def explode(*args):
        raise Boom()

    h = m.net[5].register_forward_hook(explode)
    snap2 = _snapshot(m)
    with pytest.raises(Boom):
        rr.affine_map(m, x)
    assert _same(snap2, _snapshot(m))
    h.remove()
    user_hook.remove()


def test_batchnorm_in_train_mode_is_refused_while_recording():
    m, shape = _model("bn_cnn")
    m.train()
    with pytest.raises(rr.UnsupportedModuleError, match="batch statistics"):
        with rr.record(m):
            m(_inputs(shape))
    assert m.training


def test_torchscript_modules_are_refused_naming_the_module():
    """TorchScript runs its operations where neither the function mode nor the hooks see them: a scripted
    submodule's ReLUs were missing from the recorded pattern (every input in one region). Refused by name, on every
    entry point, with the model unchanged."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    x = torch.randn(5, 3)
    cases = [(nn.Sequential(torch.jit.script(net[:2]), net[2:]), "'0'"),
             (torch.jit.script(net), "'<root>'"),
             (torch.jit.trace(net, x), "'<root>'")]
    for model, where in cases:
        snap = _snapshot(model)
        for route in ("auto", "mode"):
            with pytest.raises(rr.UnsupportedModuleError, match=f"{where} is TorchScript"):
                with rr.record(model, route=route):
                    model(x)
        with pytest.raises(rr.UnsupportedModuleError, match=f"{where} is TorchScript"):
            rr.affine_map(model, x)
        with pytest.raises(rr.UnsupportedModuleError, match=f"{where} is TorchScript"):
            rr.boundary_distance(model, x)
        assert _same(snap, _snapshot(model))
    with torch.no_grad(), rr.record(net) as rec:  # the Python module it was made from
        net(x)
    assert [p.name for p in rec.passes[0]] == ["1", "3"]


def test_affine_map_inputs_validated():
    m, shape = _model("mlp1")
    with pytest.raises(ValueError, match="batched"):
        rr.affine_map(m, torch.randn(6))
    with pytest.raises(TypeError, match="floating"):
        rr.affine_map(m, torch.ones(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="method"):
        rr.affine_map(m, torch.randn(2, 6), method="magic")
    # preactivation_maps names a wrong method or norm order (before: a KeyError of the first layer's name, or
    # torch's TypeError from inside the norm) and checks x as affine_map does
    with pytest.raises(ValueError, match=r"method must be one of \('auto', 'forward', 'reverse'\), got 'compose'"):
        rr.preactivation_maps(m, torch.randn(2, 6), method="compose")
    for bad in ("l2", 0, -1.0, True):
        with pytest.raises(ValueError, match="reduce must be None or a norm order > 0"):
            rr.preactivation_maps(m, torch.randn(2, 6), reduce=bad)
    with pytest.raises(ValueError, match="batched"):
        rr.preactivation_maps(m, torch.randn(6))
    assert set(rr.preactivation_maps(m, torch.randn(2, 6), reduce=3)) == {"1"}  # any p-norm of order > 0
    # before: a float target was truncated (0.5 -> output 0), a function failed with an AttributeError, chunk_size=0
    # meant the default and -1 failed in a reshape, and inputs with nan / inf got maps of no region at all
    x = torch.randn(2, 6)
    for bad in (0.5, [0.0, 1.0], torch.tensor([True, False]), True):
        with pytest.raises(TypeError, match="target must be an int or integer output indices"):
            rr.affine_map(m, x, target=bad)
    for bad in ("a", {"a": 1}, [[1], [1, 2]]):  # (before: torch's "new(): invalid data type 'str'")
        with pytest.raises(TypeError, match="target must be an int, a .B,. integer tensor or a list of ints"):
            rr.affine_map(m, x, target=bad)
    assert torch.equal(rr.affine_map(m, x, target=torch.tensor([1, 0])).target, torch.tensor([1, 0]))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        rr.affine_map(lambda v: v, x)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="chunk_size must be None or a positive int"):
            rr.affine_map(m, x, chunk_size=bad)
        with pytest.raises(ValueError, match="chunk_size must be None or a positive int"):
            rr.boundary_distance(m, x, chunk_size=bad)
    for v in (float("nan"), float("inf"), -float("inf")):
        bad = x.clone()
        bad[1, 2] = v
        for call in (rr.affine_map, rr.preactivation_maps, rr.boundary_distance):
            with pytest.raises(ValueError, match=r"x holds 1 non-finite value\(s\)"):
                call(m, bad)
        with pytest.raises(ValueError, match=r"delta holds 1 non-finite value\(s\)"):
            rr.what_if(m, x, bad - x)
        with pytest.raises(ValueError, match=r"x1 holds 1 non-finite value\(s\)"):
            rr.line_walk(m, x[:1], bad[1:])


def test_chunking_and_to():
    m, shape = _model("lenet")
    x = _inputs(shape, n=9)
    whole = rr.affine_map(m, x)
    chunked = rr.affine_map(m, x, chunk_size=2)
    assert torch.equal(whole.region_ids, chunked.region_ids)
    assert torch.allclose(whole.A, chunked.A, atol=1e-6)
    moved = whole.to(dtype=torch.float64)
    assert moved.A.dtype == torch.float64 and moved.packed.dtype == torch.int64


def test_auto_method_choice():
    from relu_regions.affine import choose_method

    assert choose_method("auto", 10, 784) == "reverse"
    assert choose_method("auto", 10, 4) == "forward"
    m, shape = _model("mlp2")
    assert rr.affine_map(m, _inputs(shape)).method == "reverse"  # 4 outputs <= 6 inputs
    assert rr.affine_map(m, _inputs(shape), target=0).method == "reverse"


@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_preactivation_maps_match_autograd(method):
    m, shape = _model("lenet", torch.float64)
    x = _inputs(shape, n=2, dtype=torch.float64)
    maps = rr.preactivation_maps(m, x, method=method)
    hidden = {}

    def grab(name):
        def hook(mod, inp):
            hidden[name] = inp[0]
        return hook

    handles = [m.features[1].register_forward_pre_hook(grab("features.1")),
               m.head[1].register_forward_pre_hook(grab("head.1"))]
    try:
        for name in ("features.1", "head.1"):
            def pre(v, name=name):
                m(v.unsqueeze(0))
                return hidden[name].reshape(-1)

            jac = torch.func.vmap(torch.func.jacrev(pre))(x)
            lm = maps[name]
            assert torch.allclose(lm.jacobian.reshape(jac.shape), jac, atol=1e-10)
            with torch.no_grad():
                m(x)
            assert torch.allclose(lm.value, hidden[name])
    finally:
        for h in handles:
            h.remove()
    norms = rr.preactivation_maps(m, x, reduce=2.0, method=method)
    for name, lm in maps.items():
        ref = lm.jacobian.reshape(*lm.value.shape, -1).norm(dim=-1)
        assert torch.allclose(norms[name].norm, ref, atol=1e-10)


def test_compose_exposes_hidden_maps():
    from relu_regions.compose import compose_maps
    from relu_regions.recording import run_recorded

    m, shape = _model("mlp2", torch.float64)
    x = _inputs(shape, n=3, dtype=torch.float64)
    _, patterns = run_recorded(m, x)
    seen = {}
    compose_maps(m, patterns, x, observe=lambda p, c, lin: seen.__setitem__(p.name, lin))
    ref = rr.preactivation_maps(m, x, method="forward")
    for name, lin in seen.items():
        assert torch.allclose(lin.permute(1, 2, 0), ref[name].jacobian, atol=1e-12)


def test_functional_calls_are_recorded():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.l2(F.leaky_relu(self.l1(x), 0.2).clamp(max=0.5))

    m = Net()
    with rr.record(m) as rec:
        m(torch.randn(3, 4))
    assert [p.kind for p in rec.patterns()] == ["leaky_relu", "clamp"]
    am = rr.affine_map(m.double(), torch.randn(3, 4, dtype=torch.float64), method="compose")
    assert am.residual().max() < 1e-12
    # a PReLU spelled as a Tensor method is the same unit as F.prelu (before: passed as linear, no unit)
    w = torch.tensor([0.25])
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    spelled, plain = _Op(lambda h: h.prelu(w.to(h.dtype))).double(), _Op(lambda h: F.prelu(h, w.to(h.dtype))).double()
    plain.load_state_dict(spelled.state_dict())
    with torch.no_grad(), rr.record(spelled) as a:
        spelled(x)
    with torch.no_grad(), rr.record(plain) as b:
        plain(x)
    assert [p.kind for p in a.patterns()] == ["prelu"] and torch.equal(a.patterns()[0].state, b.patterns()[0].state)
    jac = torch.stack([torch.func.jacrev(lambda v: plain(v[None])[0])(xi) for xi in x])
    assert torch.allclose(rr.affine_map(spelled, x).A, jac, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    m, shape = _model("lenet")
    x = _inputs(shape)
    cpu = rr.affine_map(m, x)
    gpu = rr.affine_map(copy.deepcopy(m).cuda(), x.cuda())
    assert torch.allclose(gpu.A.cpu(), cpu.A, atol=1e-5) and torch.equal(gpu.region_ids.cpu(), cpu.region_ids)


@pytest.mark.parametrize("route", ["hooks", "mode"])
def test_affine_map_inside_an_open_recording_does_not_leak_into_it(route):
    m, shape = _model("lenet")
    x = _inputs(shape)
    with rr.record(m, route=route) as rec:
        with torch.no_grad():
            m(x)
        am = rr.affine_map(m, x)
        with torch.no_grad():
            m(x[:2])
    assert len(rec.passes) == 2 and len(rec) == len(x) + 2
    assert torch.equal(rec.region_ids()[: len(x)], am.region_ids)


def test_maxpool1d_ties_and_window_offsets():
    m = nn.MaxPool1d(3, 1)
    x = torch.tensor([[[1.0, 2.0, 2.0, 0.0, 5.0, 5.0, 1.0]]])
    with rr.record(m, count_boundary=True) as rec:
        m(x)
    assert rec.n_boundary().tolist() == [4]  # [1,2,2] [2,2,0] [0,5,5] [5,5,1] tie; [2,0,5] does not
    p = rec.patterns()[0]
    # key states are offsets inside each window: flat index minus the window's start
    assert p.int_state().tolist() == [[1, 0, 2, 1, 0]] and p.bits_per_unit == 2


@pytest.mark.parametrize("kw", [dict(kernel_size=2), dict(kernel_size=3, stride=1), dict(kernel_size=2, padding=1),
                                dict(kernel_size=3, stride=2, dilation=2)])
def test_maxpool_window_offsets_determine_the_argmax(kw):
    m = nn.MaxPool2d(**kw)
    x = torch.randn(6, 2, 11, 11, generator=torch.Generator().manual_seed(3))
    with rr.record(m) as rec:
        m(x)
    p = rec.patterns()[0]
    off = p.int_state()
    assert off.min() >= 0 and off.max() < p.key_states
    # same offsets <=> same argmax indices, sample by sample
    idx = p.state.reshape(6, -1)
    for a in range(6):
        for b in range(6):
            assert torch.equal(off[a], off[b]) == torch.equal(idx[a], idx[b])


@pytest.mark.parametrize("ks", [2, 3, (2, 3)])
def test_disjoint_pool_ties_match_a_brute_force_count(ks):
    g = torch.Generator().manual_seed(5)
    x = F.relu(torch.randint(-2, 3, (8, 3, 12, 12), generator=g).float())  # small integers: many ties, many zeros
    m = nn.MaxPool2d(ks)
    with rr.record(m, count_boundary=True) as rec:
        m(x)
    kh, kw = (ks, ks) if isinstance(ks, int) else ks
    win = x.unfold(2, kh, kh).unfold(3, kw, kw).reshape(8, 3, 12 // kh, 12 // kw, -1)
    top = win.amax(-1, keepdim=True)
    expected = (((win == top).sum(-1) > 1) & (top[..., 0] != 0)).reshape(8, -1).sum(1)
    assert expected.sum() > 0
    assert torch.equal(rec.n_boundary(), expected)


@pytest.mark.parametrize("b, n", [(1, 1), (7, 13), (255, 64), (256, 64), (600, 84), (250, 3456), (255, 1001),
                                  (1000, 3456)])
def test_count_true_equals_a_plain_column_sum(b, n):
    g = torch.Generator().manual_seed(b + n)
    bits = torch.rand(b, n, generator=g) < torch.rand(n, generator=g)  # columns from never to always true
    bits[:, 0] = True  # a full column: the largest count, b
    ref = bits.to(torch.int64).sum(0)
    assert torch.equal(count_true(bits).to(torch.int64), ref)
    assert torch.equal(count_true(bits[:, 1:]).to(torch.int64), ref[1:])  # unaligned, non-contiguous view


@pytest.mark.parametrize("n_states", [2, 3, 4, 13, 200, 300, 70000])
def test_state_bytes_are_exact_for_every_width(n_states):
    from relu_regions.keys import state_bytes

    g = torch.Generator().manual_seed(n_states)
    states = torch.randint(0, n_states, (64, 37), generator=g)
    bits = max(1, (n_states - 1).bit_length())
    by = state_bytes(states if n_states > 2 else states.bool(), bits)
    width = 1 if bits == 1 else 2 if bits <= 2 else 4 if bits <= 4 else 8 if bits <= 8 else 8 * -(-bits // 8)
    # unpack: little-endian bit stream of fixed-width fields
    stream = ((by.long().unsqueeze(-1) >> torch.arange(8)) & 1).reshape(64, -1)
    fields = stream[:, : 37 * width].reshape(64, 37, width)
    unpacked = (fields << torch.arange(width)).sum(-1)
    assert torch.equal(unpacked, states)


def _random_patterns(n, g, duplicates=True):
    """Three layers: 300 two-state units, 40 three-state units, 5 units of 70000 states (three bytes each)."""
    from relu_regions.units import LayerPattern

    states = [torch.rand(n, 300, generator=g) < 0.5, torch.randint(0, 3, (n, 40), generator=g, dtype=torch.int8),
              torch.randint(0, 70000, (n, 5), generator=g)]
    if duplicates:
        for s in states:
            s[: n // 10] = s[n // 2: n // 2 + n // 10]  # planted duplicates
    counts = (2, 3, 70000)
    pats = [LayerPattern(f"l{i}", "relu" if c == 2 else "clamp", s, c, torch.zeros(n, dtype=torch.int64))
            for i, (s, c) in enumerate(zip(states, counts))]
    return pats, torch.cat([s.reshape(n, -1).to(torch.int64) for s in states], 1)


def test_pattern_keys_separate_many_random_patterns_and_single_unit_changes():
    from relu_regions.keys import pattern_keys

    g = torch.Generator().manual_seed(1)
    n = 120_000
    pats, flat = _random_patterns(n, g)
    keys = pattern_keys(pats)
    assert torch.unique(keys).numel() == torch.unique(flat, dim=0).shape[0]
    assert torch.equal(keys[: n // 10], keys[n // 2: n // 2 + n // 10])
    # every pattern at Hamming distance one from a base pattern gets its own key
    base, _ = _random_patterns(1, g, duplicates=False)
    flips = base[0].state.repeat(300, 1)
    flips[torch.arange(300), torch.arange(300)] ^= True
    one = [type(base[0])("l0", "relu", torch.cat([base[0].state, flips]), 2, torch.zeros(301, dtype=torch.int64))]
    one += [type(p)(p.name, p.kind, p.state.repeat(301, 1), p.n_states, torch.zeros(301, dtype=torch.int64))
            for p in base[1:]]
    assert torch.unique(pattern_keys(one)).numel() == 301


def test_pattern_keys_follow_their_definition_in_python_integers():
    # key = sum_i byte_i * (sum_j R_ij m_j) mod 2**64, bytes signed, computed here without any tensor arithmetic;
    # a fourth layer of int64 states below 200 checks the narrowing of one-byte states (values of 128 and up)
    from relu_regions import keys as K
    from relu_regions.units import LayerPattern

    g = torch.Generator().manual_seed(3)
    pats, flat = _random_patterns(12, g, duplicates=False)
    narrow = torch.randint(0, 200, (12, 30), generator=g)
    narrow[0, :4] = torch.tensor([127, 128, 199, 255 % 200])
    pats.append(LayerPattern("l3", "clamp", narrow, 200, torch.zeros(12, dtype=torch.int64)))
    cpu = torch.device("cpu")
    r = K._projection(300 + 40 + 5 * 3 + 30, cpu).tolist()
    m = K._fold_weights(cpu).tolist()
    weights = [sum(rj * mj for rj, mj in zip(row, m)) for row in r]

    def signed(v: int, bits: int) -> int:
        v %= 1 << bits
        return v - (1 << bits) if v >= 1 << (bits - 1) else v

    expected = []
    for row, extra in zip(flat.tolist(), narrow.tolist()):
        units = row[:340] + [(v >> (8 * k)) & 255 for v in row[340:] for k in range(3)] + extra  # 3 low bytes each
        expected.append(signed(sum(signed(u, 8) * w for u, w in zip(units, weights)), 64))
    assert K.pattern_keys(pats).tolist() == expected


@pytest.mark.parametrize("b", [1, 7, 300])
def test_counts_beside_the_keys_equal_count_true(b, monkeypatch):
    # two-state layers counted from the keys' blocks: in place, after other layers' bytes (which can overflow
    # their lanes), split into chunks, over more than 255 rows, and when the patterns fit into one word
    from relu_regions import keys as K
    from relu_regions.units import LayerPattern

    g = torch.Generator().manual_seed(b)
    pats, _ = _random_patterns(b, g, duplicates=False)
    pats.insert(1, LayerPattern("p", "maxpool", torch.randint(0, 1 << 40, (b, 13), generator=g), 255,
                                torch.zeros(b, dtype=torch.int64)))
    pats.append(LayerPattern("last", "relu", torch.rand(b, 3, 7, generator=g) < 0.3, 2,
                             torch.zeros(b, dtype=torch.int64)))
    small = [LayerPattern("s", "relu", pats[0].state[:, :40], 2, torch.zeros(b, dtype=torch.int64))]
    for group, chunk in ((4096, K._CHUNK), (1, K._CHUNK), (4096, 64)):
        monkeypatch.setattr(K, "_GROUP", group)
        monkeypatch.setattr(K, "_CHUNK", chunk)
        for ps in (pats, small):
            keys, counts = K.pattern_keys_and_counts(ps)
            assert torch.equal(keys, K.pattern_keys(ps))
            two_state = [i for i, p in enumerate(ps) if p.state.dtype == torch.bool]
            assert sorted(counts) == two_state
            for i in two_state:
                ref = ps[i].flat_state().to(torch.int64).sum(0)
                assert counts[i].dtype == torch.int32 and torch.equal(counts[i].to(torch.int64), ref)
    empty = [type(p)(p.name, p.kind, p.state[:0], p.n_states, p.n_boundary[:0]) for p in pats]
    keys, counts = K.pattern_keys_and_counts(empty)
    assert keys.shape == (0,) and all(torch.equal(counts[i], torch.zeros(empty[i].n_units, dtype=torch.int32))
                                      for i in (0, len(pats) - 1)) and sorted(counts) == [0, len(pats) - 1]


def test_unit_counts_of_many_batches_add_up_to_column_sums(monkeypatch):
    # UnitCounts.total adds batches of different sizes (lane words up to 255 rows, int32 counts above), layers split
    # into chunks over several blocks, and plain mappings, into the column sums of all rows
    from relu_regions import keys as K
    from relu_regions.units import LayerPattern

    monkeypatch.setattr(K, "_CHUNK", 64)  # the 300-unit layer spans several blocks
    g = torch.Generator().manual_seed(11)
    batches, ref = [], None
    for b in (7, 250, 300, 7, 1):
        pats, _ = _random_patterns(b, g, duplicates=False)
        pats.append(LayerPattern("last", "relu", torch.rand(b, 3, 7, generator=g) < 0.3, 2,
                                 torch.zeros(b, dtype=torch.int64)))
        batches.append(K.pattern_keys_and_counts(pats)[1])
        sums = {i: pats[i].flat_state().to(torch.int64).sum(0) for i in (0, 3)}
        ref = sums if ref is None else {i: ref[i] + sums[i] for i in ref}
    batches.append({0: torch.ones(300, dtype=torch.int32)})
    ref[0] = ref[0] + 1
    total = K.UnitCounts.total(batches)
    assert sorted(total) == [0, 3] and all(total[i].dtype == torch.int64 and torch.equal(total[i], ref[i]) for i in ref)
    assert dict(batches[0].renamed({3: "last"})).keys() == {"last"}


def test_keys_do_not_depend_on_the_reused_block_buffers():
    # the products' blocks are kept per batch size and reused: keys of a batch are the same before and after other
    # batches of that size, and with the buffers dropped; non-contiguous states are read as they are
    from relu_regions import keys as K

    g = torch.Generator().manual_seed(5)
    a, _ = _random_patterns(40, g, duplicates=False)
    b, _ = _random_patterns(40, g, duplicates=False)
    first = K.pattern_keys(a)
    assert not torch.equal(K.pattern_keys(b), first)
    assert torch.equal(K.pattern_keys(a), first)
    for blk in K._layout(a).groups:
        blk._buffers.clear()
    assert torch.equal(K.pattern_keys(a), first)
    t = [type(p)(p.name, p.kind, p.state.t().contiguous().t(), p.n_states, p.n_boundary) for p in a]
    assert not t[0].state.is_contiguous() and torch.equal(K.pattern_keys(t), first)
    # blocks made under torch.inference_mode (Lightning's validation loop) are inference tensors: a later call
    # outside it gets its own (before: "Inplace update to inference tensor outside InferenceMode")
    for blk in K._layout(a).groups:
        blk._buffers.clear()
    with torch.inference_mode():
        assert torch.equal(K.pattern_keys(a), first)
    assert torch.equal(K.pattern_keys(a), first)


def test_pattern_keys_are_the_word_when_it_fits_and_do_not_depend_on_the_product_route(monkeypatch):
    from relu_regions import keys as K

    g = torch.Generator().manual_seed(2)
    pats, _ = _random_patterns(500, g)
    small = [type(pats[0])("s", "relu", pats[0].state[:, :60], 2, torch.zeros(500, dtype=torch.int64))]
    assert torch.equal(K.pattern_keys(small), K.pack_patterns(small)[:, 0])  # 60 units: the exact word
    chunk = K._CHUNK
    extreme = torch.full((3, chunk), -128, dtype=torch.int8)  # the largest sum a product may hold
    r = torch.full((chunk, 8), 127, dtype=torch.int8)
    for product in (torch._int_mm, lambda a, r: K._float32_product(a, K._float32_rows(r)), K._float64_product,
                    K._int8_product):  # every route, at the largest sum
        assert int(product(extreme, r)[0, 0]) == -128 * 127 * chunk
    # the float32 route's 0/1 columns in one product: their largest sum, and one column more than it takes at once
    for n in (K._EXACT_F32_BOOLS, K._EXACT_F32_BOOLS + 1):
        ones = torch.ones(2, n + 5, dtype=torch.int8)
        ones[:, n:] = -128  # then five one-byte states
        big = torch.full((n + 5, 8), 127, dtype=torch.int8)
        big[n:] = -127
        assert int(K._float32_product(ones, K._float32_rows(big), bools=n)[1, 7]) == 127 * n + 5 * 128 * 127
    assert K._cpu_route() in ("int_mm", "float32")
    # x86 without int8 dot products: float32, not measured (a busy machine turned the measurement around: MKL's two
    # threads stalled by other work took ~90 ms against ~18 ms for _int_mm's loop); elsewhere measured
    caps = dict(torch.cpu.get_capabilities(), architecture="x86_64", avx512_vnni=False, avx_vnni=False, amx_int8=False)
    with monkeypatch.context() as mp:
        mp.setattr(torch.cpu, "get_capabilities", lambda: caps)
        mp.setattr(K, "_float32_product", None)  # (measuring would call it)
        assert K._cpu_route.__wrapped__() == "float32"
    with monkeypatch.context() as mp:
        mp.setattr(torch.cpu, "get_capabilities", lambda: dict(caps, avx512_vnni=True))
        calls = []
        mp.setattr(torch, "_int_mm",
                   lambda a, r: calls.append(1) or a.new_zeros(a.shape[0], r.shape[1], dtype=torch.int32))
        assert K._cpu_route.__wrapped__() in ("int_mm", "float32") and len(calls) == 8  # (warm-up, 7 rounds)
    ref = K.pattern_keys(pats)
    # the CPU's two exact routes (the faster one is measured once per process) give the same keys
    for route in ("int_mm", "float32"):
        monkeypatch.setattr(K, "_cpu_route", lambda _r=route: _r)
        assert torch.equal(K.pattern_keys(pats), ref)
        monkeypatch.setattr(K, "_GROUP", 1)  # one product per layer instead of one for all three
        assert torch.equal(K.pattern_keys(pats), ref)
        monkeypatch.setattr(K, "_CHUNK", 7)  # many partial products: the same integer sums
        assert torch.equal(K.pattern_keys(pats), ref)
        monkeypatch.setattr(K, "_CHUNK", chunk)
        monkeypatch.setattr(K, "_GROUP", 4096)
    # the float64 product used off the CPU, also in column blocks of 8 units
    monkeypatch.setattr(K, "_int8_product", lambda a, r, *rest: K._float64_product(a, r))
    assert torch.equal(K.pattern_keys(pats), ref)
    monkeypatch.setattr(K, "_FLOAT_BLOCK", 5 * 500)
    assert torch.equal(K.pattern_keys(pats), ref)
    assert int(K._float64_product(extreme, r)[0, 0]) == -128 * 127 * chunk


def test_a_model_without_units_is_one_region():
    m = nn.Sequential(nn.Linear(3, 4), nn.Flatten(), nn.Linear(4, 2))
    with rr.record(m) as rec:
        m(torch.randn(5, 3))
        m(torch.randn(2, 3))
    assert rec.layer_names == [] and len(rec) == 7
    assert torch.equal(rec.region_ids(), torch.zeros(7, dtype=torch.int64)) and rec.packed().shape == (7, 1)
    stats = rr.evaluate(m, [(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))], n_classes=2, progress=False)
    assert stats.n_regions() == 1 and stats.n_samples == 4


@pytest.mark.parametrize("kernel", [2, 20])
def test_keys_partition_inputs_like_the_exact_packed_patterns(kernel):
    # one-byte and two-byte max-pool states (a 20x20 window spans 780 flat indices of a 40-wide plane)
    torch.manual_seed(kernel)
    m = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(kernel, stride=kernel // 2 or 1),
                      nn.Flatten(), nn.LazyLinear(4), nn.ReLU())
    x = torch.randn(300, 1, 40, 40)
    x[150:] = x[:150]  # duplicates: equal patterns
    x[150:225, :, :4] += 0.05 * torch.randn(75, 1, 4, 40)  # ... a third perturbed: their patterns change
    with torch.no_grad():
        m(x[:1])
        with rr.record(m) as rec:
            m(x)
    keys, packed = rec.region_ids(), rec.packed()
    assert rec.patterns()[1].bits_per_unit == (6 if kernel == 2 else 10)  # spans 42 and 780
    n_keys = torch.unique(keys).numel()
    n_patterns = torch.unique(packed, dim=0).shape[0]
    n_pairs = torch.unique(torch.cat([keys[:, None], packed], 1), dim=0).shape[0]
    assert n_keys == n_patterns == n_pairs and 150 < n_patterns < 300


@pytest.mark.parametrize("name", ["mlp2", "lenet", "functional", "conv1d", "mixed"])
def test_an_empty_batch_records_no_samples(name):
    m, shape = ZOO[name]
    for kw in ({}, {"route": "mode", "count_boundary": True}):
        with torch.no_grad(), rr.record(m, **kw) as rec:
            m(torch.zeros(0, *shape))
        assert len(rec) == 0 and rec.region_ids().shape == (0,) and rec.packed().shape[0] == 0
        stats = rr.RegionStats(4)
        stats.update_from_recording(rec, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
        assert stats.n_samples == 0 and stats.n_regions() == 0
        if kw:
            assert rec.n_boundary().shape == (0,)
    with pytest.raises(ValueError, match="no samples"):
        rr.affine_map(m, torch.zeros(0, *shape))


def test_functional_unit_in_a_module_called_twice_is_named_per_call():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return F.relu(self.lin(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return self.block(self.block(x))

    m = Net()
    n_hooks = sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in m.modules())
    with rr.record(m) as rec:
        # only the root carries hooks while recording: submodules run on torch's fast path
        assert all(not mod._forward_pre_hooks for mod in m.block.modules())
        m(torch.randn(3, 4))
    assert rec.layer_names == ["block/relu", "block/relu#1"]
    assert n_hooks == sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in m.modules())


@pytest.mark.parametrize("c_in, conf", [(4, dict()), (4, dict(padding=2)), (4, dict(padding=(1, 0), dilation=(2, 1))),
                                        (4, dict(groups=2)), (4, dict(groups=4, padding=1, dilation=2)),
                                        (1, dict()), (1, dict(padding=(2, 1), dilation=(1, 2)))])
def test_flipped_kernel_input_gradient_equals_autograd(c_in, conf):
    from relu_regions.input_grads import conv2d_with_fast_input_grad

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, c_in, 11, 9, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, c_in // conf.get("groups", 1), 3, 5, generator=g, dtype=torch.float64)
    b = torch.randn(8, generator=g, dtype=torch.float64)
    ref = F.conv2d(x, w, b, **conf)
    fast = conv2d_with_fast_input_grad((x, w, b), conf)
    assert torch.equal(fast, ref)
    cot = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (want,) = torch.autograd.grad(ref, x, cot)
    (got,) = torch.autograd.grad(fast, x, cot)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    # where the flipped convolution does not apply, the caller keeps torch's own call
    assert conv2d_with_fast_input_grad((x, w, b), {**conf, "stride": 2}) is None
    assert conv2d_with_fast_input_grad((x.detach(), w, b), conf) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("func, x_shape, w_shape, conf", [
    (F.linear, (5, 7), (3, 7), {}), (F.linear, (2, 4, 7), (3, 7), {}),
    (F.conv1d, (3, 4, 13), (6, 2, 3), dict(stride=2, padding=1, groups=2)),
    (F.conv2d, (3, 2, 9, 8), (4, 2, 3, 2), dict(padding=(1, 0), dilation=(2, 1))),
    (F.conv2d, (3, 4, 9, 8), (4, 1, 3, 3), dict(groups=4))])
@pytest.mark.parametrize("bias", ["positional", "keyword", None])
def test_affine_jvp_equals_forward_ad_bit_for_bit(func, x_shape, w_shape, conf, bias, dtype):
    import torch.autograd.forward_ad as fwAD

    from relu_regions.input_grads import affine_jvp

    g = torch.Generator().manual_seed(1)
    x, t = (torch.randn(x_shape, generator=g, dtype=dtype) for _ in range(2))
    w, b = torch.randn(w_shape, generator=g, dtype=dtype), torch.randn(w_shape[0], generator=g, dtype=dtype)
    args, kw = ((w, b), dict(conf)) if bias == "positional" else ((w,), dict(conf, bias=b) if bias else dict(conf))
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, t)
        want = fwAD.unpack_dual(func(dual, *args, **kw))
        got = fwAD.unpack_dual(affine_jvp(func, (dual, *args), kw))
        assert torch.equal(got.primal, want.primal) and torch.equal(got.tangent, want.tangent)
        assert affine_jvp(func, (x, *args), kw) is None  # no tangent: torch's own call
        assert affine_jvp(func, (dual, fwAD.make_dual(w, torch.ones_like(w)), *args[1:]), kw) is None
        assert affine_jvp(func, (), dict(kw, input=dual, weight=w)) is None


def test_forward_mode_replay_uses_explicit_tangents_and_matches_the_reverse_route(monkeypatch):
    import relu_regions.recording as recording

    calls = []  # the layers whose tangents were computed explicitly
    real = recording.affine_jvp

    def counted(func, args, kwargs):
        out = real(func, args, kwargs)
        if out is not None:
            calls.append(func)
        return out

    monkeypatch.setattr(recording, "affine_jvp", counted)
    torch.manual_seed(0)
    m = rr.models.LeNet().double().eval()
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    fwd = rr.affine_map(m, x, method="forward")
    assert calls.count(F.conv2d) == 2 and calls.count(F.linear) == 3  # every affine layer, tangents explicit
    rev = rr.affine_map(m, x, method="reverse")
    assert torch.allclose(fwd.A, rev.A, rtol=1e-10, atol=1e-12) and torch.allclose(fwd.d, rev.d, atol=1e-10)


def test_affine_map_pickles_and_counts_boundaries_lazily():
    import pickle

    m = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2))
    x = torch.stack([torch.zeros(3), torch.tensor([1.0, -2.0, 0.5])])
    am = rr.affine_map(m, x)
    assert am._n_boundary is None  # not counted until asked
    back = pickle.loads(pickle.dumps(am))
    assert back.n_boundary.tolist() == [4, 0] and torch.equal(back.A, am.A)
    assert am.to(torch.float64).n_boundary.tolist() == [4, 0]


def test_all_class_map_when_the_input_also_feeds_a_unit_directly():
    # the one-product shortcut for MLPs must not apply when the input reaches the output by another path too
    class TwoPaths(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x):
            return self.lin(x) + F.relu(x)[:, :3]

    m = TwoPaths().double().eval()
    x = torch.randn(7, 5, dtype=torch.float64)
    am = rr.affine_map(m, x, method="reverse")
    jac = torch.func.vmap(torch.func.jacrev(lambda v: m(v.unsqueeze(0)).squeeze(0)))(x)
    assert torch.allclose(am.A, jac, atol=1e-12)


@pytest.mark.parametrize("flatten", [False, True])
def test_all_class_map_of_an_mlp_stops_at_the_first_linear(flatten, monkeypatch):
    # the reverse route's MLP shortcut (rows stop at the first Linear's output, one product with its weight) is
    # what keeps the all-class map near a GEMM; a metadata read of the input inside the pass once disabled it
    from relu_regions import affine

    torch.manual_seed(0)
    layers = [nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)]
    m = nn.Sequential(*([nn.Flatten()] if flatten else []), *layers).double().eval()
    x = torch.randn(5, *((3, 4) if flatten else (12,)), dtype=torch.float64)
    taken = []
    real = affine._input_linear
    monkeypatch.setattr(affine, "_input_linear", lambda s, x: taken.append(real(s, x)) or taken[-1])
    am = rr.affine_map(m, x, method="reverse")
    assert taken and taken[0] is not None and taken[0][1] is layers[0].weight
    jac = torch.func.vmap(torch.func.jacrev(lambda v: m(v.unsqueeze(0)).squeeze(0)))(x)
    assert torch.allclose(am.A, jac, atol=1e-12)


@pytest.mark.parametrize("name", ["lenet", "functional"])
@pytest.mark.parametrize("context", ["inference_mode", "autocast"])
def test_every_route_gives_the_same_numbers_inside_inference_mode_and_autocast(name, context):
    """Evaluation code often runs under ``torch.inference_mode()`` or ``torch.autocast``. Under inference mode
    autograd and forward-mode AD are off: before, the reverse routes raised, and the forward routes dropped their
    tangents without a word (distances, what-if and line walks came out different). Under autocast (bfloat16 on
    the CPU) every number was a reduced-precision one. The entry points now run their own passes outside both and
    give the numbers they give outside them."""
    from relu_regions import geometry as G
    from relu_regions.attributions import neuron_contributions
    from relu_regions.integrations.captum import Re3

    dtype = torch.float32 if context == "autocast" else torch.float64  # (autocast leaves float64 alone)
    m, shape = _model(name, dtype)
    x = _inputs(shape, n=4, dtype=dtype)
    calls = {
        **{f"affine_map {meth}": (lambda meth=meth: rr.affine_map(m, x, method=meth).A) for meth in METHODS},
        **{f"preactivation_maps {meth}": (lambda meth=meth: torch.cat(
            [v.jacobian.flatten(1) for v in rr.preactivation_maps(m, x, method=meth).values()], 1))
           for meth in ("forward", "reverse")},
        **{f"boundary_distance {route}": (lambda route=route: rr.boundary_distance(m, x, route=route).distance)
           for route in ("auto", "forward", "reverse")},
        "what_if": lambda: rr.what_if(m, x, 1e-3 * torch.ones_like(x)).max_step,
        "line_walk": lambda: rr.line_walk(m, x[:1], x[:1] + 0.1 * (x[1:2] - x[:1])).breakpoints,
        "certified_radius": lambda: G.certified_radius(m, x),
        "neuron_contributions": lambda: torch.cat([c.flatten(1) for c in neuron_contributions(m, x, 0).values()], 1),
        "Re3": lambda: Re3(m).attribute(x, target=0),
    }
    for what, call in calls.items():
        want = call()
        with torch.inference_mode() if context == "inference_mode" else torch.autocast("cpu", dtype=torch.bfloat16):
            got = call()
        assert torch.equal(got, want), what


def _refused_ops():
    idx = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    return {
        "torch.max_pool2d": (lambda h: torch.max_pool2d(h.view(-1, 1, 2, 4), (2, 1)).flatten(1), "max_pool2d"),
        "torch.max_pool1d": (lambda h: torch.max_pool1d(h.unsqueeze(1), 2).flatten(1), "max_pool1d"),
        "scatter_reduce amax": (lambda h: torch.zeros(len(h), 4, dtype=h.dtype).scatter_reduce(
            1, idx.expand(len(h), 8), h, reduce="amax"), "reduce='amax'"),
        "inverse": (lambda h: torch.inverse(h.view(-1, 2, 2, 2) + 3 * torch.eye(2, dtype=h.dtype)).flatten(1),
                    "'inverse'"),
        "lp_pool1d": (lambda h: F.lp_pool1d(h.unsqueeze(1), 2, 2).flatten(1), "'lp_pool1d'"),
        "ger": (lambda h: torch.stack([torch.ger(r[:2], r[2:4]) for r in h]).flatten(1), "'ger' of two"),
        "torch.batch_norm training": (lambda h: torch.batch_norm(h, None, None, None, None, True, 0.1, 1e-5, False),
                                      "batch statistics"),
        "grid_sample grid": (lambda h: F.grid_sample(
            h.view(-1, 2, 2, 2), F.affine_grid(torch.cat([h[:, :4].view(-1, 2, 2), torch.zeros(len(h), 2, 1,
                                                                                                 dtype=h.dtype)], 2),
                                               (len(h), 2, 2, 2), align_corners=False),
            align_corners=False).flatten(1), "with a grid that depends on the input"),
    }


@pytest.mark.parametrize("name", list(_refused_ops()))
def test_selections_and_smooth_ops_under_other_spellings_are_refused(name):
    """Before, these passed ``record(strict=True)`` as linear: ``torch.max_pool2d`` (the spelling under
    ``F.max_pool2d``) gave one region id where ``torch.func`` finds 11-16 different Jacobians on 200 inputs, and
    ``affine_map`` failed only its own value check ("please report the model"). Their linear relatives stay
    exact: ``scatter_reduce(reduce="sum")`` and ``grid_sample`` on a constant grid."""
    op, msg = _refused_ops()[name]

    class Net(nn.Module):
        def __init__(self, op):
            super().__init__()
            self.l1, self.op, self.l2 = nn.Linear(8, 8), op, nn.LazyLinear(2)

        def forward(self, x):
            return self.l2(F.relu(self.op(self.l1(x))))

    torch.manual_seed(0)
    x = torch.randn(5, 8, dtype=torch.float64)
    model = Net(op).double().eval()
    model(x)
    with pytest.raises(rr.UnsupportedModuleError, match=re.escape(msg)):
        with rr.record(model):
            model(x)
    with pytest.raises(rr.UnsupportedModuleError, match=re.escape(msg)):
        rr.boundary_distance(model, x)


def test_linear_reductions_and_constant_grids_stay_exact():
    idx = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    grid = F.affine_grid(torch.tensor([[[0.9, 0.1, 0.0], [-0.2, 1.1, 0.1]]], dtype=torch.float64), (1, 2, 2, 2),
                         align_corners=False)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(8, 8), nn.Linear(12, 2)

        def forward(self, x):
            h = F.relu(self.l1(x))
            s = torch.zeros(len(h), 4, dtype=h.dtype).scatter_reduce(1, idx.expand(len(h), 8), h, reduce="sum")
            g = F.grid_sample(h.view(-1, 2, 2, 2), grid.expand(len(h), 2, 2, 2), align_corners=False)
            return self.l2(torch.cat([s, g.flatten(1)], 1))

    torch.manual_seed(0)
    model = Net().double().eval()
    x = torch.randn(4, 8, dtype=torch.float64)
    jac = torch.stack([torch.func.jacrev(lambda v: model(v[None])[0])(xi) for xi in x])
    # (reverse mode only: torch has no forward-mode derivative of grid_sample)
    assert torch.allclose(rr.affine_map(model, x, method="reverse").A, jac, atol=1e-10)


def _jacrev_preacts(model_fn, x, k):
    """Per-sample Jacobians (torch.func) and values of the k-th logged pre-activation of ``model_fn``."""
    def pre(v):
        log = []
        model_fn(v[None], log)
        return log[k][0]

    return (torch.stack([torch.func.jacrev(pre)(xi) for xi in x]),
            torch.stack([pre(xi) for xi in x]))


def test_reverse_preactivation_maps_read_the_unit_input_before_an_inplace_update():
    """Before: a residual stream updated in place after its ReLU read it (``h += block(relu(h))``) gave reverse-mode
    pre-activation maps of the updated tensor: boundary_distance(route="reverse" / "auto") returned 0 for every
    sample (exact: 0.01-0.05)."""
    torch.manual_seed(6)
    model = InplaceResidualStream(30, 8, 3).double().eval()
    run = model.forward
    x = torch.randn(4, 30, dtype=torch.float64)
    want = []
    for k in range(2):
        jac, val = _jacrev_preacts(run, x, k)
        want.append((val.abs() / jac.norm(dim=2)).min(1).values)
    want = torch.stack(want, 1).min(1).values
    for route in ("reverse", "auto", "forward"):
        torch.testing.assert_close(rr.boundary_distance(model, x, route=route).distance, want)
    maps = rr.preactivation_maps(model, x, method="reverse")
    for k, lm in enumerate(maps.values()):
        jac, val = _jacrev_preacts(run, x, k)
        torch.testing.assert_close(lm.value, val)
        torch.testing.assert_close(lm.jacobian, jac)


def test_user_backward_hooks_neither_change_nor_see_the_reverse_routes():
    """Before: a user's full backward hook scaling a Linear's input gradient (the forward unchanged) changed the
    reverse routes' distances silently (0.28 for an exact 0.19), and fired inside the library's backward passes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x = torch.randn(4, 10, dtype=torch.float64)
    fired = []

    def scale(mod, gin, gout):
        fired.append(1)
        return tuple(None if g is None else 2 * g for g in gin)

    def run(v, log):
        h = model[0](v)
        log.append(h)
        h = model[2](model[1](h))
        log.append(h)
        return model[4](model[3](h))

    want = []
    for k in range(2):
        jac, val = _jacrev_preacts(run, x, k)
        want.append((val.abs() / jac.norm(dim=2)).min(1).values)
    want = torch.stack(want, 1).min(1).values
    jac_out = torch.stack([torch.func.jacrev(lambda v: model(v[None])[0])(xi) for xi in x])
    handle = model[2].register_full_backward_hook(scale)
    glob = torch.nn.modules.module.register_module_full_backward_hook(lambda *a: fired.append(2))
    try:
        torch.testing.assert_close(rr.boundary_distance(model, x, route="reverse").distance, want)
        torch.testing.assert_close(rr.affine_map(model, x, method="reverse").A, jac_out)
        assert fired == []
        model(x.requires_grad_()).sum().backward()  # the user's hooks still work afterwards
        assert 1 in fired and 2 in fired
    finally:
        handle.remove()
        glob.remove()


def test_inference_mode_targets_and_stale_boundary_counts():
    """Before: a target taken under torch.inference_mode (an eval loop's argmax) failed the reverse route with
    "Inference tensors cannot be saved for backward"; AffineMap.n_boundary, counted lazily, counted the model as it
    was at first access (0 after a bias update, where the map's network had 5 units on a breakpoint)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    x = torch.randn(5, 6)
    with torch.inference_mode():
        y = model(x).argmax(1)
    amap = rr.affine_map(model, x, target=y, method="reverse")
    jac = torch.stack([torch.func.jacrev(lambda v: model(v[None])[0])(xi) for xi in x])
    torch.testing.assert_close(amap.A[:, 0], jac.detach()[torch.arange(5), y.tolist()])
    with torch.no_grad():
        model[0].bias.zero_()
    zero = torch.zeros(1, 6)
    amap = rr.affine_map(model, zero)
    assert int(amap.n_boundary) == 5  # every first-layer pre-activation is exactly 0 at x = 0 without a bias
    amap = rr.affine_map(model, zero)
    with torch.no_grad():
        model[0].bias.add_(1.0)
    with pytest.raises(RuntimeError, match="the model changed"):
        _ = amap.n_boundary


def test_constants_cast_like_an_input_dependent_tensor_stay_constants():
    """Before: ``self.pe.type_as(h)`` / ``self.pe.to(h)`` (a buffer cast to h's dtype and device) was taken for a
    derivative cut ("autograd does not follow it") by the reverse routes, and a product with such a constant for a
    product of two input-dependent tensors."""
    class Net(nn.Module):
        def __init__(self, how):
            super().__init__()
            self.l1, self.l2, self.how = nn.Linear(4, 6), nn.Linear(6, 2), how
            self.register_buffer("pe", torch.randn(6))
            self.register_buffer("scale", torch.rand(6) + 0.5)

        def forward(self, x):
            h = self.l1(x)
            cast = (lambda t: t.type_as(h)) if self.how == "type_as" else (lambda t: t.to(h))
            return self.l2(torch.relu(h * cast(self.scale) + cast(self.pe)))

    torch.manual_seed(3)
    x = torch.randn(3, 4)
    for how in ("type_as", "to"):
        model = Net(how).eval()
        jac = torch.stack([torch.func.jacrev(lambda v, m=model: m(v[None])[0])(xi) for xi in x]).detach()
        for method in ("auto", "reverse", "forward"):
            torch.testing.assert_close(rr.affine_map(model, x, method=method).A, jac)


def _brute_ties(x, windows_h, windows_w):
    """Windows (lists of row / column index lists) whose nonzero maximum appears more than once, per sample."""
    counts = []
    for xi in x:
        n = 0
        for plane in xi.reshape(-1, *xi.shape[-2:]):
            for rows in windows_h:
                for cols in windows_w:
                    vals = [float(plane[r, c]) for r in rows for c in cols]
                    top = max(vals)
                    n += top != 0 and vals.count(top) > 1
        counts.append(n)
    return counts


@pytest.mark.parametrize("pool", ["ceil", "ceil_pad", "ceil_disjoint", "adaptive", "adaptive1d"])
def test_max_pool_ties_are_counted_for_adaptive_and_ceil_mode_pools(pool):
    """Before: adaptive max-pools never counted ties, and a ceil_mode pool with a partial window counted none in the
    whole layer: n_boundary 0 on inputs that brute force finds on 3-8 tied windows (boundary_distance: 0)."""
    torch.manual_seed(0)
    x = torch.randint(0, 3, (3, 2, 7, 7)).double()  # small integers: many ties, some at 0

    def windows(n, k, s, p, o):
        return [[q for q in range(i * s - p, i * s - p + k) if 0 <= q < n] for i in range(o)]

    if pool.startswith("ceil"):
        k, s, p = {"ceil": (3, 2, 0), "ceil_pad": (3, 2, 1), "ceil_disjoint": (2, 2, 0)}[pool]
        layer = nn.MaxPool2d(k, s, padding=p, ceil_mode=True)
        o = layer(x).shape[-1]
        want = _brute_ties(x, windows(7, k, s, p, o), windows(7, k, s, p, o))
    elif pool == "adaptive":
        layer = nn.AdaptiveMaxPool2d((3, 2))
        want = _brute_ties(x, [list(range(i * 7 // 3, -(-(i + 1) * 7 // 3))) for i in range(3)],
                           [list(range(j * 7 // 2, -(-(j + 1) * 7 // 2))) for j in range(2)])
    else:
        layer = nn.AdaptiveMaxPool1d(3)
        x = x[:, :, 0]
        want = _brute_ties(x[:, :, None], [[0]], [list(range(i * 7 // 3, -(-(i + 1) * 7 // 3))) for i in range(3)])
    with rr.record(layer, count_boundary=True) as rec:
        layer(x)
    assert rec.n_boundary().tolist() == want and min(want) > 0


def test_a_clamp_with_min_above_max_is_refused():
    """Before: torch.clamp(h, min=0.3, max=0.1) (every element becomes 0.1: the network is constant) was recorded
    as a three-state unit with the states of min <= max: 8 regions on 50 inputs whose outputs are all equal."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 4)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return torch.clamp(self.lin(x), min=0.3, max=0.1).sum(1, keepdim=True)

    x, model = torch.randn(50, 3), Net()
    with torch.no_grad():
        assert model(x).unique().numel() == 1  # independent: the output is constant
    with pytest.raises(rr.UnsupportedModuleError, match=r"min 0.3 > max 0.1"):
        with rr.record(model):
            model(x)


@pytest.mark.parametrize("op, rewrite", [(torch.abs, "F.relu(h) + F.relu(-h)"),
                                         (lambda h: torch.maximum(h, 2 * h), "b + F.relu(a - b)"),
                                         (lambda h: h.topk(2, 1).values, "strict=False"),
                                         (nn.Hardsigmoid(), "F.relu6(h + 3) / 6"),
                                         (nn.Softshrink(0.3), "F.relu(h - lambd) - F.relu(-h - lambd)"),
                                         (nn.RReLU().eval(), "F.leaky_relu(h, (lower + upper) / 2)"),
                                         (nn.Threshold(0.2, 0.2), "F.relu(h - threshold) + threshold"),
                                         (nn.Hardshrink(), "discontinuous")])
def test_piecewise_linear_selections_without_units_are_refused_as_such(op, rewrite):
    """Before: abs / maximum / topk were refused as "not piecewise linear in the input" (false), with a hint about
    softmax heads; the message now says what they are and how to write them with recorded units."""
    model = nn.Sequential(nn.Linear(3, 4), _Lambda(op))
    with pytest.raises(rr.UnsupportedModuleError, match=re.escape(rewrite)) as e:
        with rr.record(model):
            model(torch.randn(2, 3))
    assert "piecewise linear, but not an operation" in str(e.value) and "logits_at" not in str(e.value)


def test_the_rewrites_of_unrecorded_activations_are_the_activations():
    """The rewrites the refusals above suggest compute the same function (checked on a grid through the kinks)."""
    h = torch.linspace(-5, 5, 2001, dtype=torch.float64)
    lambd, lower, upper = 0.3, 1 / 8, 1 / 3
    assert torch.equal(F.hardsigmoid(h), F.relu6(h + 3) / 6)
    assert torch.allclose(F.softshrink(h, lambd), F.relu(h - lambd) - F.relu(-h - lambd))
    assert torch.allclose(F.rrelu(h, lower, upper, training=False), F.leaky_relu(h, (lower + upper) / 2))
    assert torch.allclose(F.threshold(h, 0.2, 0.2), F.relu(h - 0.2) + 0.2)


class _Lambda(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(x)


def test_operations_without_forward_ad_fall_back_to_reverse_mode():
    """Before: with more outputs than input features, ``affine_map(method="auto")``, ``preactivation_maps``,
    ``boundary_distance`` and ``decision_distance`` chose forward mode and failed in PyTorch's "Trying to use forward
    AD with grid_sampler_2d ... please file an issue"; reverse mode is exact there. Explicit forward mode and the
    directional functions now say what to use instead."""
    grid = F.affine_grid(torch.tensor([[[0.9, 0.1, 0.0], [-0.2, 1.1, 0.1]]], dtype=torch.float64), (1, 2, 2, 2),
                         align_corners=False)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.l3 = nn.Linear(8, 8), nn.Linear(8, 12), nn.Linear(12, 20)

        def forward(self, x):
            g = F.grid_sample(F.relu(self.l1(x)).view(-1, 2, 2, 2), grid.expand(len(x), 2, 2, 2), align_corners=False)
            return self.l3(F.relu(self.l2(g.flatten(1))))

    torch.manual_seed(0)
    model = Net().double().eval()
    x = torch.randn(4, 8, dtype=torch.float64)
    jac = torch.stack([torch.func.jacrev(lambda v: model(v[None])[0])(xi) for xi in x])
    amap = rr.affine_map(model, x)  # 20 outputs > 8 features: "auto" tries forward mode first
    assert amap.method == "reverse" and torch.allclose(amap.A, jac, atol=1e-10)
    # the second hidden layer's pre-activation Jacobian, from torch.func on the model's own modules
    pre = rr.preactivation_maps(model, x)

    def hidden(v):
        g = F.grid_sample(F.relu(model.l1(v[None])).view(-1, 2, 2, 2), grid, align_corners=False)
        return model.l2(g.flatten(1))[0]

    want = torch.stack([torch.func.jacrev(hidden)(xi) for xi in x])
    assert torch.allclose(list(pre.values())[1].jacobian, want, atol=1e-10)
    bd, rv = rr.boundary_distance(model, x), rr.boundary_distance(model, x, route="reverse")
    assert torch.equal(bd.distance, rv.distance) and torch.isfinite(bd.distance).all()
    from relu_regions.errors import ForwardADMissingError

    for call in (lambda: rr.affine_map(model, x, method="forward"),
                 lambda: rr.boundary_distance(model, x, route="forward"),
                 lambda: rr.what_if(model, x, torch.ones_like(x) * 1e-3)):
        with pytest.raises(ForwardADMissingError, match="does not implement for 'grid_sampler_2d'"):
            call()


@pytest.mark.parametrize("slope", [-0.5, 0.0])
def test_an_inplace_leaky_relu_records_the_pattern_before_it_writes(slope):
    """Before: the state ``x > 0`` was read after an in-place leaky ReLU had overwritten x, so with a negative
    slope every unit was recorded active (1 region id where the same weights without inplace give 31), and with
    slope 0 every negative input counted as a boundary."""
    torch.manual_seed(0)

    def net(inplace):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 6), nn.LeakyReLU(slope, inplace=inplace), nn.Linear(6, 2)).double()

    x = torch.randn(64, 3, dtype=torch.float64)
    ids = []
    for inplace in (True, False):
        model = net(inplace)
        with rr.record(model, count_boundary=True) as rec:
            model(x)
        ids.append(rec.region_ids())
        assert int(rec.n_boundary().sum()) == 0
    assert torch.equal(ids[0], ids[1]) and len(ids[0].unique()) > 1


class _PerToken(nn.Module):
    """A Linear on (B, T, F) inputs with T == out_features (the bias broadcast on the wrong axis matched in shape)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(16, 2)

    def forward(self, x):
        return self.l2(F.relu(self.l1(x)).flatten(1))


class _SkipInList(nn.Module):
    """The input read again inside a list (torch.cat) and through a keyword (torch.add(..., other=x))."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 4), nn.Linear(8, 4)

    def forward(self, x):
        return torch.add(self.l2(torch.cat([F.relu(self.l1(x)), x], 1)), other=x)


class _Centred(nn.Module):
    """The input changed in place before the first layer (x.sub_), and a constant written into a copy of it."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.register_buffer("mean", torch.linspace(-0.5, 0.5, 4))

    def forward(self, x):
        x = x.sub_(self.mean)
        return self.l2(F.relu(self.l1(x)))


@pytest.mark.parametrize("net,shape", [(_PerToken, (4, 3)), (_SkipInList, (4,)), (_Centred, (4,))],
                         ids=["per-token-linear", "input-in-a-list", "inplace-input"])
def test_the_reverse_routes_zero_input_shortcuts_see_every_reader_and_write(net, shape):
    """The reverse route evaluates the frozen network at 0 and lets the layers that read the zero input return their
    bias. Before: a Linear on (B, T, F) got its bias on axis 1 (d wrong by 0.09 when T == out_features, a shape error
    otherwise); reads of the input inside a list or a keyword were not counted, so the all-class shortcut dropped
    the input's direct path (A wrong by 0.29); an in-place change of the input (x.sub_(mean)) left it "zero"
    (d wrong by 0.06). Compared with torch.func's Jacobian and f(x) − A·x from it, in float64."""
    torch.manual_seed(0)
    model = net().double().eval()
    x = torch.randn(3, *shape, dtype=torch.float64)
    f = lambda v: model(v.clone())  # noqa: E731 (the model writes into its input)
    jac = torch.stack([torch.func.jacrev(lambda v: f(v[None])[0])(xi) for xi in x])
    d = f(x) - torch.einsum("bkd,bd->bk", jac.reshape(3, jac.shape[1], -1), x.reshape(3, -1))
    for target in (None, 0):
        for method in ("reverse", "forward"):
            am = rr.affine_map(model, x.clone(), target=target, method=method, check=False)
            want_a, want_d = (jac, d) if target is None else (jac[:, :1], d[:, :1])
            assert torch.allclose(am.A, want_a, atol=1e-12) and torch.allclose(am.d, want_d, atol=1e-12)


def test_compose_refuses_writes_into_tensors():
    """``__setitem__`` returns None, so the graph walker let it pass like a shape query and kept the tensor's old
    linear part (its value check then failed with "please report the model")."""

    class Written(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = nn.Linear(4, 3)

        def forward(self, x):
            x = x.clone()
            x[:, 0] = 1.0
            return self.l1(x)

    x = torch.randn(2, 4, dtype=torch.float64)
    model = Written().double()
    with pytest.raises(rr.UnsupportedModuleError, match=re.escape("writes into a tensor ('__setitem__')")):
        rr.affine_map(model, x, method="compose")
    jac = torch.stack([torch.func.jacrev(lambda v: model(v[None])[0])(xi) for xi in x])
    assert torch.allclose(rr.affine_map(model, x, method="reverse").A, jac, atol=1e-12)


def test_a_forward_pre_hook_on_the_root_runs_inside_the_pass():
    """The recording's own pre-hook on the root now runs before the user's: before, a user pre-hook that clamps the
    input to [0, 1] ran before the pass opened, so the clamp was missing from every pattern (3 region ids on 300
    inputs where torch.func finds 21 different Jacobians) and a sigmoid there was not refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)).double().eval()
    handle = model.register_forward_pre_hook(lambda mod, args: (args[0].clamp(0.0, 1.0),))
    x = torch.randn(300, 3, dtype=torch.float64)
    with torch.no_grad(), rr.record(model) as rec:
        model(x)
    ids = rec.region_ids()
    jac = torch.stack([torch.func.jacrev(lambda v: model(v[None])[0])(xi) for xi in x])
    differ = (jac[:, None] - jac[None, :]).flatten(2).abs().amax(-1) > 1e-9
    assert not bool((differ & (ids[:, None] == ids[None, :])).any())
    for method in METHODS:
        assert torch.allclose(rr.affine_map(model, x[:8], method=method).A, jac[:8], atol=1e-12)
    handle.remove()
    model.register_forward_pre_hook(lambda mod, args: (torch.sigmoid(args[0]),))
    with pytest.raises(rr.UnsupportedModuleError, match="calls 'sigmoid'"):
        with rr.record(model):
            model(x)


def test_bfloat16_models_pass_the_value_check():
    """The value check's tolerance was 1e-3 relative for every dtype but float64; bfloat16 rounds at ~4e-3, so a
    plain bfloat16 ReLU MLP failed it on every method ("please report the model") although A equalled
    torch.func's Jacobian exactly. It is 4·eps for the half-precision dtypes now."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    model = model.to(torch.bfloat16).eval()
    x = torch.randn(16, 16).to(torch.bfloat16)
    jac = torch.stack([torch.func.jacrev(lambda v: model(v[None])[0])(xi) for xi in x])
    for method in METHODS:
        assert torch.allclose(rr.affine_map(model, x, method=method).A.float(), jac.float(), atol=1e-2)


def test_products_with_a_constant_operand_are_linear():
    """``tensordot`` / ``inner`` / ``kron`` / ``dot`` / ``cross`` with one constant operand are linear maps; they were
    refused as nonlinear. With two input-dependent operands they are products: refused."""
    w = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ops = {
        "tensordot": lambda h: torch.tensordot(h, w, dims=([1], [0])),
        "inner": lambda h: torch.inner(h, w.T),
        "kron": lambda h: torch.kron(h, torch.tensor([[1.0, -2.0]], dtype=h.dtype)),
        "cross": lambda h: torch.linalg.cross(h[:, :3], w[:3, :3].T[:1].expand(len(h), 3)),
        "dot": lambda h: torch.stack([torch.dot(r, w[:, 0]) for r in h])[:, None],
    }

    class Net(nn.Module):
        def __init__(self, op):
            super().__init__()
            self.l1, self.op, self.l2 = nn.Linear(3, 6), op, nn.LazyLinear(2)

        def forward(self, x):
            return self.l2(self.op(F.relu(self.l1(x))))

    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for name, op in ops.items():
        torch.manual_seed(0)
        model = Net(op).double().eval()
        model(x)
        jac = torch.stack([torch.func.jacrev(lambda v, m=model: m(v[None])[0])(xi) for xi in x])
        for method in ("reverse", "forward"):
            assert torch.allclose(rr.affine_map(model, x, method=method).A, jac, atol=1e-12), (name, method)

    class Square(nn.Module):
        def forward(self, x):
            h = F.relu(x)
            return torch.kron(h, h)

    with pytest.raises(rr.UnsupportedModuleError, match="'kron' of two input-dependent"):
        rr.affine_map(Square(), x)


def test_compose_follows_inplace_writes_through_views():
    """Before: ``method="compose"`` updated only the written view's linear part, not the tensor it views (nor a
    view taken before the write), so ``torch.relu_(h[:, :3])`` / ``h[:, :3].mul_(2)`` gave a wrong ``A`` silently
    (check=False) or "not piecewise linear ... please report the model". Now every route matches torch.func."""

    class Net(nn.Module):
        def __init__(self, how):
            super().__init__()
            self.l1, self.l2, self.how = nn.Linear(4, 6), nn.Linear(6, 3), how

        def forward(self, x):
            h = self.l1(x)
            if self.how == "relu_ on a view":
                torch.relu_(h[:, :3])
            elif self.how == "mul_ on a view":
                h[:, :3].mul_(2.0)
            elif self.how == "view taken before the write":
                v = h[:, 3:]
                h.mul_(-2.0)
                h = torch.cat([v, torch.relu(v)], 1)
            elif self.how == "constant written through a view":
                buf = torch.ones(x.shape[0], 6, dtype=x.dtype)
                buf[:, 1:4].add_(h[:, :3])
                h = buf
            elif self.how == "view of a transposed view":
                h.t()[1:4].mul_(-3.0)
            return self.l2(torch.relu(h))

    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    for how in ("relu_ on a view", "mul_ on a view", "view taken before the write", "constant written through a view",
                "view of a transposed view"):
        torch.manual_seed(0)
        model = Net(how).double().eval()
        jac = torch.stack([torch.func.jacrev(lambda v, m=model: copy.deepcopy(m)(v[None])[0])(xi) for xi in x])
        out = model(x.clone())
        amap = rr.affine_map(model, x, method="compose")
        assert torch.allclose(amap.A, jac, atol=1e-12), how
        assert torch.allclose(amap.output, out, atol=1e-12), how


def test_compose_constant_cast_like_input_and_input_dependent_weight():
    """Before: ``method="compose"`` assumed the first argument of a cast / linear layer is the input-dependent one:
    ``pe.type_as(h)`` / ``pe.to(h)`` (``h`` only gives the dtype) and ``F.linear`` / ``F.conv1d`` with a weight
    computed from the input raised a raw AttributeError ('NoneType' object has no attribute 'to'). Now the cast is
    a constant (A matches torch.func), and the weight is refused with a clear error that names the way out."""

    class Cast(nn.Module):
        def __init__(self, how):
            super().__init__()
            self.l1, self.l2, self.how = nn.Linear(4, 6), nn.Linear(6, 2), how
            self.register_buffer("pe", torch.randn(6, dtype=torch.float64))

        def forward(self, x):
            h = self.l1(x)
            return self.l2(torch.relu(h + (self.pe.type_as(h) if self.how == "type_as" else self.pe.to(h))))

    class Weight(nn.Module):
        def __init__(self, how):
            super().__init__()
            self.l1, self.how = nn.Linear(4, 4), how
            self.register_buffer("c", torch.randn(3, 4, dtype=torch.float64))

        def forward(self, x):
            h = torch.relu(self.l1(x))
            if self.how == "linear":
                return F.linear(self.c, h).t()  # (B, 3): row b is c @ h[b]
            return F.conv1d(self.c[:1, None], h[:, None, :3])[0]  # (B, 2): h[b, :3] slid over c[0]

    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for how in ("type_as", "to"):
        torch.manual_seed(0)
        model = Cast(how).double().eval()
        jac = torch.stack([torch.func.jacrev(lambda v, m=model: m(v[None])[0])(xi) for xi in x])
        assert torch.allclose(rr.affine_map(model, x, method="compose").A, jac, atol=1e-12), how
    for how, op in (("linear", "linear"), ("conv", "conv1d")):
        torch.manual_seed(0)
        model = Weight(how).double().eval()
        with pytest.raises(rr.UnsupportedModuleError,
                           match=rf"calls '{op}' with an input-dependent argument other than its input.*"
                                 r"use method='reverse' or 'forward'"):
            rr.affine_map(model, x, method="compose")
        jac = torch.stack([torch.func.jacrev(lambda v, m=model: m(v[None])[0])(xi) for xi in x])
        assert torch.allclose(rr.affine_map(model, x, method="reverse").A, jac, atol=1e-12), how


def test_compose_maps_documents_its_parameters():
    """Before: the numpy docstring of ``compose_maps`` left out ``strict`` and ``logits_at``."""
    import inspect

    from relu_regions.compose import compose_maps

    doc = inspect.cleandoc(compose_maps.__doc__)
    section = doc.split("Parameters\n----------\n")[1].split("\n\n")[0]
    documented = {n.strip() for line in section.splitlines() if line and not line[0].isspace()
                  for n in line.split(" : ")[0].split(",")}
    assert set(inspect.signature(compose_maps).parameters) <= documented


def test_check_bound_follows_cancelling_terms():
    """Before: the float32 check's bound was 1e-3·(1 + |f(x)|), so a plain ReLU MLP behind a standardisation of inputs
    around 1e4 (A·x and d each ~1e4·|A|, cancelling) failed with "not piecewise linear ... please report" although its
    map is right to ~1e-7. The bound now scales with the terms |A|·|x| + |d| summed; a wrong d is still caught."""
    from relu_regions.affine import _check

    class Standardize(nn.Module):
        def forward(self, x):
            return x - 1e4

    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(16, 256), nn.Linear(256, 3)
    nn.init.kaiming_normal_(lin1.weight)
    nn.init.kaiming_normal_(lin2.weight)
    net = nn.Sequential(Standardize(), lin1, nn.ReLU(), lin2).eval()
    x = 1e4 + torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    amap = rr.affine_map(net, x)  # raised before
    # independent: the masked product of the float32 pattern, in float64
    with torch.no_grad():
        mask = (lin1(x - 1e4) > 0).double()
    w1, w2 = lin1.weight.double(), lin2.weight.double()
    a_ref = torch.einsum("ki,bi,ij->bkj", w2, mask, w1)
    d_ref = torch.einsum("ki,bi,i->bk", w2, mask, lin1.bias.double() - 1e4 * w1.sum(1)) + lin2.bias.double()
    assert torch.allclose(amap.A.double(), a_ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(amap.d.double(), d_ref, rtol=1e-5, atol=1e-2)
    wrong = copy.copy(amap)
    wrong.d = amap.d + 0.05 * amap.d.abs().amax()  # far beyond float32 rounding of these terms
    with pytest.raises(RuntimeError, match="affine map check failed"):
        _check(wrong)


@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_preactivation_maps_in_sample_chunks(method):
    """Before: preactivation_maps had no chunking (64 images of 3x32x32 through a 16-channel conv allocated ~13 GB
    per activation in forward mode). Chunks of samples give the same maps as autograd per sample."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 4),
                      nn.ReLU()).double()
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    maps = rr.preactivation_maps(m, x, method=method, chunk_size=2)
    norms = rr.preactivation_maps(m, x, method=method, chunk_size=2, reduce=1.0)
    for name, sub in (("1", m[:1]), ("5", m[:5])):
        jac = torch.stack([torch.func.jacrev(lambda v, sub=sub: sub(v[None])[0])(xi) for xi in x])  # (before "1")
        if name == "5":  # the frozen masks of "1" per sample (the pool's argmax follows the masked map exactly)
            jac = torch.stack([torch.func.jacrev(
                lambda v, i=i: m[4](m[3](m[2](m[0](v[None]) * (m[0](x[i:i + 1]) > 0))))[0])(xi)
                for i, xi in enumerate(x)])
        assert torch.allclose(maps[name].jacobian, jac, atol=1e-12), name
        assert torch.allclose(norms[name].norm, jac.reshape(*maps[name].value.shape, -1).abs().sum(-1))
        with torch.no_grad():
            assert torch.allclose(maps[name].value, sub(x))
    with pytest.raises(ValueError, match="chunk_size"):
        rr.preactivation_maps(m, x, chunk_size=0)


def test_forward_default_chunk_follows_the_activation_sizes():
    """Before: forward mode's default chunk ignored the model's activations (2**24 // (D * 64) samples: 341 for
    3x16x16 inputs, whose 16-channel first conv then held 341 * 768 * 4096 floats, 4.3 GB; on 3x64x64 inputs
    ~63 GB). Now a chunk's widest activation stays below 2**26 elements, and the map is still autograd's."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 256, 3)).eval()
    x = torch.randn(25, 3, 16, 16)
    amap = rr.affine_map(m, x, method="forward")
    assert max(amap._sizes) * 768 * 4096 <= 1 << 26 and sum(amap._sizes) == 25
    for i in (0, 24):
        mask = (m[0](x[i:i + 1]) > 0).float()
        jac = torch.func.jacrev(lambda v, mask=mask: m[3](m[2](m[0](v[None]) * mask))[0])(x[i])
        assert torch.allclose(amap.A[i], jac, atol=1e-5)


def test_pool_window_entirely_in_padding_is_refused():
    """Before: a dilated max pool with a window that covers only padding (torch returns -inf and an argmax outside
    the plane) was recorded silently by record(), and affine_map / boundary_distance failed with torch's raw
    "index 4 is out of bounds". Now both recording routes refuse it naming the module; whether a window is all
    padding is checked against torch itself on a sweep of pool settings."""
    import random

    from relu_regions.units import _check_windows

    m = nn.Sequential(nn.Conv2d(1, 1, 1), nn.MaxPool2d(2, stride=1, padding=1, dilation=2), nn.Flatten()).eval()
    x = torch.randn(2, 1, 1, 3)
    with pytest.raises(rr.UnsupportedModuleError, match=r"module '1' \(MaxPool2d\).*pools only padding"):
        with rr.record(m):
            m(x)
    class Functional(nn.Module):
        def forward(self, v):
            return F.max_pool2d(v, 2, 1, 1, 2).flatten(1)

    for method in ("reverse", "compose"):
        with pytest.raises(rr.UnsupportedModuleError, match=r"\(Functional\).*pools only padding"):
            rr.affine_map(Functional(), x, method=method)
    rng = random.Random(0)
    for _ in range(3000):
        n, k, s, d = rng.randint(1, 9), rng.randint(1, 4), rng.randint(1, 4), rng.randint(1, 3)
        p, ceil = rng.randint(0, k // 2), rng.random() < 0.5
        try:
            out = F.max_pool2d(torch.randn(1, 1, 1, n), (1, k), (1, s), (0, p), (1, d), ceil_mode=ceil)
        except RuntimeError:  # torch refuses the setting itself
            continue
        refused = False
        try:
            _check_windows((1, n), 2, (1, k), (1, s), (0, p), (1, d), ceil)
        except rr.UnsupportedModuleError:
            refused = True
        assert refused == bool(torch.isinf(out).any()), (n, k, s, p, d, ceil)


@pytest.mark.parametrize("scale", [1e-20, 1e22])
@pytest.mark.parametrize("reduce", [2.0, 3.0])
def test_preactivation_norms_in_tiny_and_huge_input_units(scale, reduce):
    """Before: preactivation_maps(reduce=q) took torch.linalg.vector_norm of float32 gradients, whose squares under-
    or overflow for inputs in tiny or huge units (weights 1/scale): norms 0 or inf. Now they are the float64 norms."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3), nn.ReLU())
    with torch.no_grad():
        m[0].weight /= scale
    x = torch.randn(4, 6) * scale
    got = rr.preactivation_maps(m, x, reduce=reduce)
    m64 = copy.deepcopy(m).double()
    mask = (m64[:1](x.double()) > 0).double()  # (the hand-written map of the region, in float64)
    jac = torch.einsum("kj,bj,bji->bki", m64[2].weight, mask, m64[0].weight.expand(4, 5, 6))
    want = torch.linalg.vector_norm(jac, ord=reduce, dim=2)
    assert torch.allclose(got["3"].norm.double(), want, rtol=1e-5)
    want0 = torch.linalg.vector_norm(m64[0].weight.double(), ord=reduce, dim=1).expand(4, 5)
    assert torch.allclose(got["1"].norm.double(), want0, rtol=1e-5)


def test_pattern_keys_under_autocast_are_the_keys_outside_it():
    """Before: under torch.autocast the keys' float32 products ran in bfloat16: other keys for the same patterns
    than outside it (a Lightning "bf16-mixed" step's against an evaluate()), and rounded sums can merge patterns."""
    from relu_regions import keys as K

    g = torch.Generator().manual_seed(7)
    pats, _ = _random_patterns(300, g, duplicates=False)
    ref = K.pattern_keys(pats)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        keys, counts = K.pattern_keys_and_counts(pats)
        assert torch.is_autocast_enabled("cpu")  # (the caller's autocast is back after the call)
    assert torch.equal(keys, ref) and torch.unique(keys).numel() == 300
    net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)).eval()
    x = torch.randn(64, 20, generator=g)
    with rr.record(net) as rec:
        net(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = K.pattern_keys(rec.patterns())
    assert torch.equal(inside, K.pattern_keys(rec.patterns())) and torch.equal(inside, rec.region_ids())


def test_patterns_of_many_passes_equal_one_pass_of_the_whole_batch():
    """``Recording.patterns`` concatenates every layer once over all passes (it merged pass by pass: quadratic,
    32,000 LeNet samples in passes of 32 took 10.8 s against 0.3 s); the states, boundary counts and keys equal
    those of one pass over the whole batch, also with a layer selection and with a max-pool's index states."""
    from relu_regions.models import LeNet

    torch.manual_seed(0)
    m = LeNet().eval()
    x = torch.rand(150, 1, 28, 28)
    with torch.no_grad(), rr.record(m) as many:
        for i in range(0, 150, 7):  # 22 passes, the last one shorter
            m(x[i:i + 7])
    with torch.no_grad(), rr.record(m) as one:
        m(x)
    for sel in (None, slice(-2, None), 1):
        a, b = many.patterns(sel), one.patterns(sel)
        assert [p.name for p in a] == [p.name for p in b] and len(a) >= 1
        for p, q in zip(a, b):
            assert p.kind == q.kind and torch.equal(p.state, q.state) and torch.equal(p.n_boundary, q.n_boundary)
    assert torch.equal(many.region_ids(), one.region_ids()) and torch.equal(many.packed(), one.packed())
    assert {p.kind for p in many.patterns()} >= {"relu", "maxpool"}
