"""The hook-only recording route against the function mode: same patterns, same errors, the model unchanged."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo import zoo

import relu_regions as rr
from relu_regions.hook_recording import ForwardPatch, HookPlan, hook_plan

ZOO = zoo()
# the zoo models whose units are all nn.ReLU / nn.MaxPool modules: these must take the hook route
HOOKED = {"mlp1", "mlp2", "mlp3", "flatten_mlp", "lenet", "bn_cnn", "residual", "inplace", "reused", "resnet"}


def _inputs(shape, n=7, seed=3):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def _patterns(model, x, route, **kw):
    with torch.no_grad(), rr.record(model, route=route, **kw) as rec:
        out = model(x)
        out2 = model(x[:3])  # a second pass: names restart per pass
    return out, out2, rec


def _hooked_like_the_mode(model, x, route="hooks", **kw):
    """Record on both routes; assert the hook route ran, outputs are bit-identical and patterns equal."""
    out_m, _, a = _patterns(model, x, "mode", **kw)
    out_h, _, b = _patterns(model, x, route, **kw)
    assert b.route == "hooks" and torch.equal(out_m, out_h)
    _assert_same(a, b)
    return a


def _hook_counts(model):
    """Per module: forward hooks, forward pre-hooks, and whether a forward is set on the instance (the hook route's
    patches)."""
    return [(len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in vars(m)) for m in model.modules()]


def _assert_same(a, b):
    assert a.layer_names == b.layer_names
    for pa, pb in zip(a.passes, b.passes, strict=True):
        for p, q in zip(pa, pb, strict=True):
            assert (p.name, p.kind, p.n_states, p.params) == (q.name, q.kind, q.n_states, q.params)
            assert p.state.dtype == q.state.dtype and torch.equal(p.state, q.state), p.name
    assert torch.equal(a.region_ids(), b.region_ids())
    for name in a.layer_names:
        assert torch.equal(a.packed(name), b.packed(name))


@pytest.mark.parametrize("name", list(ZOO))
def test_hook_route_records_what_the_function_mode_records(name):
    model, shape = ZOO[name]
    x = _inputs(shape)
    out_m, out2_m, by_mode = _patterns(model, x, "mode")
    out_a, out2_a, by_auto = _patterns(model, x, "auto")
    assert by_mode.route == "mode"
    assert by_auto.route == ("hooks" if name in HOOKED else "mode"), hook_plan(model)
    assert torch.equal(out_m, out_a) and torch.equal(out2_m, out2_a)  # outputs bit-identical on both routes
    _assert_same(by_mode, by_auto)


def test_hook_route_on_a_trained_lenet_sized_batch():
    model, shape = ZOO["lenet"]
    x = _inputs(shape, n=64, seed=0)
    _hooked_like_the_mode(model, x)


def test_maxpool_that_returns_indices_itself_and_maxpool1d():
    class Unpool(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3, padding=1)
            self.act = nn.ReLU()
            self.pool = nn.MaxPool2d(2, return_indices=True)
            self.pool1 = nn.MaxPool1d(3, stride=2, padding=1, ceil_mode=True)
            self.out = nn.Linear(3 * 3, 2)

        def forward(self, x):
            v, i = self.pool(self.act(self.conv(x)))
            return self.out(self.pool1(v.flatten(2)).flatten(1))

    model = Unpool().eval()
    _hooked_like_the_mode(model, _inputs((1, 4, 4)))
    assert model.pool.return_indices and not model.pool1.return_indices


@pytest.mark.parametrize("nested", [False, True], ids=["alone", "inside another recording"])
def test_the_hook_route_leaves_a_pools_attributes_alone_during_its_call(nested):
    """A max-pool gives its argmax without its ``return_indices`` being switched on for the call (other code reading
    the module meanwhile sees it as it is), also through the patches of an outer recording; a tensor subclass sees
    the flag at the moment the pool runs."""
    model, shape = copy.deepcopy(ZOO["lenet"])
    pools = [model.features[2], model.features[5]]
    seen = []

    class Spy(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if "max_pool" in getattr(func, "__name__", ""):
                seen.append(tuple(m.return_indices for m in pools))
            return super().__torch_function__(func, types, args, kwargs or {})

    x = _inputs(shape)
    with torch.no_grad(), contextlib.ExitStack() as stack:
        outer = stack.enter_context(rr.record(model, route="hooks")) if nested else None
        with rr.record(model, route="hooks") as rec:
            out = model(x.as_subclass(Spy))
    assert rec.route == "hooks" and seen == [(False, False)] * 2
    assert outer is None or len(outer) == 0  # suspended while the inner one ran
    with torch.no_grad(), rr.record(model, route="mode") as ref:
        assert torch.equal(model(x), out.as_subclass(torch.Tensor))
    assert torch.equal(rec.region_ids(), ref.region_ids())
    assert [p.state.as_subclass(torch.Tensor).tolist() for p in rec.passes[0] if p.kind == "maxpool"] == \
        [p.state.tolist() for p in ref.passes[0] if p.kind == "maxpool"]


class _ShapeReads(nn.Module):
    """Common CNN idioms the fx check must accept: reshapes by the input's own size, functional dropout / pad /
    linear with a parameter, a slice by a constant."""

    def __init__(self):
        super().__init__()
        self.c, self.r, self.pool = nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2)
        self.w = nn.Parameter(torch.randn(3, 2 * 4 * 4))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.pool(self.r(F.pad(self.c(x), (1, 1, 1, 1))))
        h = F.dropout(h, 0.1, self.training)
        a = F.linear(h.view(h.shape[0], -1), self.w)
        b = F.linear(h.view(h.size(0), -1), self.w)
        return self.act(a - 0.5 * b)[:, :2]


def test_common_idioms_take_the_hook_route_and_match_the_mode():
    _hooked_like_the_mode(_ShapeReads().eval(), _inputs((1, 8, 8)), route="auto")

    class IndexByValue(_ShapeReads):
        def forward(self, x):
            h = self.r(self.c(x)).flatten(1)
            return h[:, h.size(1) - 1]  # an index computed from the input (its size): the mode decides

    assert "index" in hook_plan(IndexByValue())


def test_functional_units_and_other_activations_keep_the_function_mode():
    for name in ("functional", "mixed", "conv1d"):
        model, shape = ZOO[name]
        plan = hook_plan(model)
        assert isinstance(plan, str), name
        with pytest.raises(ValueError, match="route='hooks' cannot record"):
            with rr.record(model, route="hooks"):
                pass
    assert "relu" in hook_plan(ZOO["functional"][0])
    assert "LeakyReLU" in hook_plan(ZOO["conv1d"][0])
    with pytest.raises(ValueError, match="count_boundary"):
        with rr.record(ZOO["mlp1"][0], route="hooks", count_boundary=True):
            pass
    with rr.record(ZOO["mlp1"][0], count_boundary=True) as rec:  # auto: the mode counts boundaries
        ZOO["mlp1"][0](_inputs((6,)))
    assert rec.route == "mode" and rec.n_boundary().shape == (7,)
    with pytest.raises(ValueError, match="route must be"):
        with rr.record(ZOO["mlp1"][0], route="fx"):
            pass


@pytest.mark.parametrize("model, op", [
    (nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.ReLU(), nn.Linear(5, 2)), "gelu"),
    (nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Softmax(-1), nn.Linear(5, 2)), "softmax"),
    (nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.ReLU(), nn.Linear(5, 2)), "layer_norm"),
])
def test_unsupported_operations_still_raise_on_the_default_route(model, op):
    with pytest.raises(rr.UnsupportedModuleError, match=op):
        with rr.record(model):
            model(torch.randn(3, 4))


def test_product_of_two_input_dependent_tensors_is_not_hooked():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU()

        def forward(self, x):
            return self.act(self.a(x)) * self.b(x)

    gate = Gate()
    assert "two input-dependent" in hook_plan(gate)
    with pytest.raises(rr.UnsupportedModuleError, match="two input-dependent"):
        with rr.record(gate):
            gate(torch.randn(2, 4))


def test_division_by_the_input_is_not_hooked_division_by_a_constant_is():
    class Div(nn.Module):
        def __init__(self, reciprocal):
            super().__init__()
            self.lin, self.act, self.reciprocal = nn.Linear(4, 3), nn.ReLU(), reciprocal

        def forward(self, x):
            h = self.act(self.lin(x)) + 1
            return 1.0 / h if self.reciprocal else h / 4.0

    reciprocal = Div(True)
    assert "divisor" in hook_plan(reciprocal)
    with pytest.raises(rr.UnsupportedModuleError, match="division by an input-dependent tensor"):
        with rr.record(reciprocal):
            reciprocal(torch.randn(2, 4))
    model = Div(False)
    with rr.record(model) as rec:
        model(torch.randn(2, 4))
    assert rec.route == "hooks" and rec.layer_names == ["act"]


def test_batchnorm_in_train_mode_raises_the_same_error_on_both_routes():
    model, shape = copy.deepcopy(ZOO["bn_cnn"])
    model.train()
    for m in model.modules():  # (a dropout in training mode is refused too: see the test below)
        if isinstance(m, nn.Dropout):
            m.eval()
    assert isinstance(hook_plan(model), HookPlan)
    messages = []
    for route in ("mode", "hooks"):
        with pytest.raises(rr.UnsupportedModuleError, match="batch statistics") as err:
            with rr.record(model, route=route):
                model(_inputs(shape))
        messages.append(str(err.value))
    assert messages[0] == messages[1] and "'net.1'" in messages[0]
    assert model.training


def test_dropout_in_training_mode_is_refused_and_eval_mode_is_recorded():
    """A dropout in training mode draws another mask on every pass: the region ``record`` kept was not one of the
    model's (it took it silently on both routes). The plan sends such a model to the function mode, which refuses the
    call naming it; in eval mode both routes record it (a functional dropout with training=False too). The library's
    own passes (affine_map, distances) switch the model to eval mode for the call, as before."""

    class Drop(nn.Module):
        def __init__(self, functional):
            super().__init__()
            self.lin, self.act, self.drop, self.out = nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 2)
            self.functional = functional

        def forward(self, x):
            h = self.act(self.lin(x))
            h = F.dropout(h, 0.5, self.training) if self.functional else self.drop(h)
            return self.out(self.act(h))

    x = _inputs((4,))
    for functional in (False, True):
        model = Drop(functional).train()
        assert "training mode (random)" in hook_plan(model)
        with pytest.raises(rr.UnsupportedModuleError, match=r"calls 'dropout' on input-dependent data: random"):
            with torch.no_grad(), rr.record(model):
                model(x)
        assert model.training and "forward" not in model.act.__dict__
        model.eval()
        assert isinstance(hook_plan(model), HookPlan)
        for route in ("hooks", "mode"):
            with torch.no_grad(), rr.record(model, route=route) as rec:
                model(x)
            assert [p.kind for p in rec.passes[0]] == ["relu", "relu"]


def test_logits_at_stops_both_routes_at_the_same_layer():
    body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    model = nn.Sequential(body, nn.Softmax(dim=1))
    for logits_at in ("0", "0.2"):
        a = _hooked_like_the_mode(model, torch.randn(5, 4), logits_at=logits_at)
    assert a.layer_names == ["0.1"]


def test_the_plan_follows_changes_of_the_model():
    model = copy.deepcopy(ZOO["mlp2"][0])
    x = _inputs((6,))
    with rr.record(model) as rec:
        model(x)
    assert rec.route == "hooks"
    model[1] = nn.GELU()  # a module swapped after the first recording
    with pytest.raises(rr.UnsupportedModuleError, match="gelu"):
        with rr.record(model):
            model(x)
    model[1] = nn.ReLU()
    model.forward = lambda v: F.relu(nn.Sequential.forward(model, v))  # an instance-level forward
    with rr.record(model) as rec:
        model(x)
    assert rec.route == "mode" and rec.layer_names[-1] == "relu"


def test_model_unchanged_after_a_failure_inside_the_hooked_forward():
    model, shape = copy.deepcopy(ZOO["lenet"])
    x = _inputs(shape)
    hooks = _hook_counts(model)

    class Boom(Exception):
        pass

    def explode(module, inputs):
        raise Boom()

    with pytest.raises(Boom):
        with rr.record(model, route="hooks"):
            # registered inside (one attached before would send the recording to the function mode); it runs after
            # the first pool has asked for its indices
            h = model.features[4].register_forward_pre_hook(explode)
            model(x)
    h.remove()
    assert not model.features[2].return_indices and not model.features[5].return_indices
    assert hooks == _hook_counts(model)
    with torch.no_grad():
        assert model(x).shape == (7, 5)  # the pools return plain tensors again



@pytest.mark.parametrize("route", ["hooks", "mode"])
@pytest.mark.parametrize("fail", [False, True], ids=["ok", "raised"])
def test_changes_made_by_the_users_code_inside_record_stay(route, fail):
    """``record`` removes exactly the hooks it added: what the user's own code changes inside the block (a hook it
    registers, requires_grad, train/eval) is still there after the block, also when the block raised."""
    model, shape = copy.deepcopy(ZOO["lenet"])
    x = _inputs(shape)
    model.eval()
    before = _hook_counts(model)
    seen = []

    class Boom(Exception):
        pass

    try:
        with rr.record(model, route=route) as rec:
            with torch.no_grad():
                model(x)
            kept = model.features[1].register_forward_hook(lambda m, a, o: seen.append(o.shape[0]))
            gone = model.features[4].register_forward_pre_hook(lambda m, a: None)
            gone.remove()  # registered and removed inside: not put back
            model.features[0].weight.requires_grad_(False)
            model.head.train()
            if fail:
                raise Boom()
    except Boom:
        pass
    assert rec.route == route and len(rec) == x.shape[0]
    after = _hook_counts(model)
    expected = list(before)
    i = [n for n, _ in model.named_modules()].index("features.1")
    expected[i] = (before[i][0] + 1, before[i][1], False)
    assert after == expected  # the recording's own hooks are gone, the user's one is not
    assert not model.features[0].weight.requires_grad and model.head.training and not model.features.training
    assert not model.features[2].return_indices and not model.features[5].return_indices
    with torch.no_grad():
        model(x)
    assert seen == [x.shape[0]]
    kept.remove()


def test_the_users_own_hooks_send_auto_to_the_mode_and_later_ones_see_plain_outputs():
    """A forward hook of the user's runs code on the input's path that only the function mode sees: "auto" takes the
    mode, "hooks" refuses naming the module. A hook registered inside an open hook-route recording runs after the
    library's: a max-pool hook gets the pooled tensor (not the (values, indices) pair the recording asks the pool
    for), and a hook that changes a ReLU's output does not change the recorded state (read from the ReLU itself)."""
    model, shape = copy.deepcopy(ZOO["lenet"])
    x = _inputs(shape)
    with torch.no_grad():
        plain, pooled = model(x), model.features[:3](x)
    seen: list = []
    h = model.features[2].register_forward_hook(lambda m, a, o: seen.append(o))
    with torch.no_grad(), rr.record(model) as rec:
        assert torch.equal(model(x), plain)
    assert rec.route == "mode" and len(seen) == 1 and torch.equal(seen[0], pooled)
    with pytest.raises(ValueError, match="features.2' has a forward hook"):
        with rr.record(model, route="hooks"):
            pass
    h.remove()
    with rr.record(model) as rec:
        pass
    assert rec.route == "hooks"  # nothing of the user's attached any more

    model, _ = copy.deepcopy(ZOO["lenet"])
    seen.clear()
    with torch.no_grad(), rr.record(model) as rec:
        h1 = model.features[2].register_forward_hook(lambda m, a, o: seen.append(o))
        h2 = model.features[1].register_forward_hook(lambda m, a, o: torch.where(o > 0.5, o, 0))
        out = model(x)
        pre = model.features[0](x)
    h1.remove()
    h2.remove()
    assert rec.route == "hooks"
    assert len(seen) == 1 and isinstance(seen[0], torch.Tensor)
    with torch.no_grad():
        sparse = model.features[2](torch.where(torch.relu(pre) > 0.5, torch.relu(pre), 0))
        assert torch.equal(seen[0], sparse) and torch.equal(out, model.head(model.features[3:](sparse)))
    relu = [p for p in rec.passes[0] if p.name == "features.1"][0]
    assert torch.equal(relu.state, pre > 0)  # the ReLU's own pattern, not the hook-changed output's


def test_patches_of_nested_recordings_stack_and_come_off_in_any_order():
    """The hook route sets instance-level forwards (ForwardPatch), not hooks. Nested recordings of one model stack
    them; however the blocks are left (also out of order, by hand), the model ends with no instance forward, and
    every recording saw the passes run while it was open and not suspended by an inner one."""
    model, shape = copy.deepcopy(ZOO["lenet"])
    x = _inputs(shape)
    before = _hook_counts(model)
    with torch.no_grad():
        ref, ref3, ref2 = model(x), model(x[:3]), model(x[:2])  # outputs are bit-identical per batch size
        outer = rr.record(model)
        rec_o = outer.__enter__()
        model(x)
        inner = rr.record(model)
        rec_i = inner.__enter__()
        assert rec_o.route == rec_i.route == "hooks" and isinstance(vars(model.features[1])["forward"], ForwardPatch)
        assert torch.equal(model(x[:3]), ref3)
        outer.__exit__(None, None, None)  # out of order: the outer patches stay below the inner ones, inert
        assert torch.equal(model(x[:2]), ref2)
        inner.__exit__(None, None, None)
        assert torch.equal(model(x), ref)
    assert _hook_counts(model) == before
    assert len(rec_o) == 7 and [len(p[0].state) for p in rec_i.passes] == [3, 2]
    with torch.no_grad(), rr.record(model) as alone:  # the inner recording's pools, seen through the outer patch
        model(x[:3])
        model(x[:2])
    assert torch.equal(alone.region_ids(), rec_i.region_ids())
    with torch.no_grad(), rr.record(model) as again:
        model(x)
    assert torch.equal(again.region_ids(), rec_o.region_ids())


def test_a_copy_made_inside_a_recording_runs_its_own_weights_and_a_users_forward_stays():
    model, shape = copy.deepcopy(ZOO["mlp2"])
    x = _inputs(shape)
    with torch.no_grad(), rr.record(model) as rec:
        twin = copy.deepcopy(model)  # copies the patches too: inert ones, that call the copy, not the original
        twin[0].weight.mul_(-1)
        assert not torch.equal(twin(x), model(x))
        custom = model[1].forward
        model[1].forward = lambda v: custom(v) * 2  # the user's own instance forward, set on top of the patch
    assert rec.route == "hooks" and len(rec) == 7  # the copy is another model: not recorded
    with torch.no_grad():
        assert torch.equal(twin(x), twin[2:](torch.relu(twin[0](x)))) and "forward" not in vars(model)
    assert "forward" in vars(model[1])  # the user's forward stays; the patch below it passes calls through
    with torch.no_grad():
        h = torch.relu(model[0](x))
        assert torch.equal(model[1](model[0](x)), 2 * h)
    with torch.no_grad(), rr.record(model) as rec:
        model(x)
    assert rec.route == "mode"  # an instance forward of the user's: the trace does not show it
    with torch.no_grad(), rr.record(twin) as rec:
        twin(x)
    assert rec.route == "hooks" and len(rec) == 7  # the copy's inert patches are no instance forward of its own
    assert not any("forward" in vars(m) for m in twin.modules())  # ... and are unlinked by its first recording


def test_patched_forwards_show_the_modules_own_signature():
    import inspect

    model, shape = copy.deepcopy(ZOO["lenet"])
    before = {n: inspect.signature(m.forward) for n, m in model.named_modules()}
    with rr.record(model) as rec:
        assert isinstance(vars(model)["forward"], ForwardPatch)
        assert {n: inspect.signature(m.forward) for n, m in model.named_modules()} == before
    assert rec.route == "hooks"


def test_preserved_puts_back_instance_forwards():
    from relu_regions.state import preserved

    model, _ = copy.deepcopy(ZOO["mlp2"])
    mine = model[1].forward
    model[1].forward = mine
    with preserved(model):
        del vars(model[1])["forward"]
        model[0].forward = lambda v: v
    assert vars(model[1])["forward"] is mine and "forward" not in vars(model[0])


def test_unit_params_follow_a_pool_changed_between_recordings():
    """The hook route keeps each unit module's params per call (shape and pooling geometry) across recordings: a
    max-pool whose kernel changes, or a new input size, must get fresh params (the same as the function mode's)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(2, 3)).eval()
    for kernel, size in ((2, 12), (3, 12), (3, 15), (2, 12)):
        model[2].kernel_size = model[2].stride = kernel
        _hooked_like_the_mode(model, _inputs((1, size, size)))


def test_the_hook_plan_follows_a_dropouts_p():
    """Before: a training-mode model first recorded with Dropout(p=0) kept its cached hook plan after p was raised
    (a warm-up schedule), and recorded random passes without a word (two recordings of one input, two patterns)."""
    import relu_regions as rr

    torch.manual_seed(0)
    x = torch.randn(5, 4)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.0), torch.nn.ReLU(),
                            torch.nn.Linear(8, 2)).train()
    with torch.no_grad(), rr.record(m) as rec:
        m(x)
    assert rec.route == "hooks"
    m[1].p = 0.5
    with pytest.raises(rr.UnsupportedModuleError, match="random"):
        with torch.no_grad(), rr.record(m):
            m(x)


@pytest.mark.parametrize("route", ["auto", "mode"])
@pytest.mark.parametrize("where", [4, 2])
def test_a_forward_that_raised_leaves_no_pass(route, where):
    """Before: a batch whose forward raised inside record() (a loop that skips it) kept its pass: 12 keys for 8
    outputs, the later batch's keys at the failed batch's rows; failing between the units, every accessor raised
    "layer ... is missing from recorded pass 1"."""
    class MaybeFail(nn.Module):
        fail = False

        def forward(self, x):
            if self.fail:
                raise RuntimeError("simulated")
            return x

    torch.manual_seed(0)
    layers = [nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2)]
    layers.insert(where, MaybeFail())
    model = nn.Sequential(*layers).eval()
    batches = [torch.randn(4, 4) for _ in range(3)]
    with torch.no_grad(), rr.record(model, route=route) as rec:
        for i, xb in enumerate(batches):
            model[where].fail = i == 1
            with contextlib.suppress(RuntimeError):
                model(xb)
    model[where].fail = False
    # independent: masks of the two ReLUs read by plain forward hooks, one bit string per sample
    masks = []
    handles = [model[j].register_forward_hook(lambda m, i, o: masks.append(o > 0))
               for j, m in enumerate(model) if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        for xb in (batches[0], batches[2]):
            model(xb)
    for h in handles:
        h.remove()
    want = torch.cat([torch.cat(masks[0:2], 1), torch.cat(masks[2:4], 1)])
    keys = rec.region_ids()
    assert len(rec) == len(keys) == 8
    same = want[:, None, :].eq(want[None, :, :]).all(2)
    assert torch.equal(keys[:, None] == keys[None, :], same)
    assert torch.equal(rec.packed(), torch.cat([rr.affine_map(model, b).packed for b in (batches[0], batches[2])]))


def test_a_copy_made_inside_a_recording_pickles_and_is_not_recorded_on_either_route():
    """Before: on the function-mode route a copy made inside the block (keep the best model) kept the session's
    root hooks: called after the block it raised "the output ... does not depend on the model's input", and neither
    route's copy pickled (local closures)."""
    import io

    from relu_regions.regions import RegionStats
    from relu_regions.training import track

    torch.manual_seed(0)
    x = torch.randn(3, 4)
    seq = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    for model, route in ((_FunctionalNet(), "mode"), (seq, "hooks")):
        stats = RegionStats(n_classes=2)
        with track(model, stats) as t:
            model(x)
            best = copy.deepcopy(model)
            with torch.no_grad():
                best(x)  # not recorded: another model
            t.update(torch.zeros(3, dtype=torch.long))
            buf = io.BytesIO()
            torch.save(best, buf)
        assert t.rec.route == route and stats.n_samples == 3
        with torch.no_grad():
            want = model(x)
            assert torch.equal(best(x), want)
            buf.seek(0)
            assert torch.equal(torch.load(buf, weights_only=False)(x), want)
        with torch.no_grad(), rr.record(best) as rec:
            best(x)
        assert len(rec) == 3


class _FunctionalNet(nn.Module):  # functional ReLU: the function mode (module level: the test pickles it)
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))
