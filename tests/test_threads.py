"""Threads, nesting and abandoned recordings: every result equals the same call made alone, and the model is left
as it was. The overlaps are forced with events inside user hooks (no timing luck)."""

from __future__ import annotations

import gc
import threading

import pytest
import torch
import torch.nn as nn

import relu_regions as rr
from relu_regions import geometry
from relu_regions.models import he_init, mlp


def _net(seed: int, d: int = 4) -> nn.Sequential:
    return he_init(mlp(d, [32, 32], 3), seed).eval()


def _attached(m: nn.Module) -> list:
    return [(n, dict(mm._forward_hooks), dict(mm._forward_pre_hooks), dict(mm._forward_hooks_always_called),
             mm.__dict__.get("forward")) for n, mm in m.named_modules()]


def _run(*targets):
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads)


def test_a_recording_ignores_other_threads_calls_and_entry_points():
    # before: thread B's affine_map (another model) paused thread A's open recording (a pass lost, no error), and
    # a route="mode" recording caught another thread's plain forward of the same model
    m_a, m_b = _net(1), _net(2)
    torch.manual_seed(0)
    xa, xa2, xb = torch.randn(16, 4), torch.randn(16, 4), torch.randn(8, 4)
    with rr.record(m_a) as alone:
        m_a(xa)
        m_a(xa2)
    inside, done = threading.Event(), threading.Event()
    h = m_b[0].register_forward_hook(lambda *a: (inside.set(), done.wait(10)) and None)
    got = {}
    try:
        for route in ("hooks", "mode"):
            inside.clear()
            done.clear()
            with rr.record(m_a, route=route) as rec:
                m_a(xa)
                t = threading.Thread(target=lambda: got.setdefault("A", rr.affine_map(m_b, xb)))
                t.start()
                assert inside.wait(10)  # thread B is inside affine_map(m_b)
                m_a(xa2)
                other = threading.Thread(target=lambda r=route: got.setdefault(r, m_a(xb)))  # a plain forward of m_a
                other.start()
                other.join(10)
                done.set()
                t.join(10)
            assert len(rec.passes) == 2 and torch.equal(rec.region_ids(), alone.region_ids()), route
            torch.testing.assert_close(got[route], m_a(xb), rtol=0, atol=0)
    finally:
        done.set()
        h.remove()
    ref = rr.affine_map(m_b, xb)
    assert torch.equal(got["A"].A, ref.A) and torch.equal(got["A"].d, ref.d)


def test_entry_points_of_two_threads_run_one_after_the_other():
    # before: two overlapping affine_map calls on one model left a closed session's hooks on it for good (every
    # later plain forward raised), and overlapping calls on two models left torch.compile's process-wide stance at
    # "force_eager"
    import torch._dynamo.eval_frame as ef

    m = _net(1, 6)
    torch.manual_seed(0)
    x1, x2 = torch.randn(8, 6), torch.randn(8, 6)
    before, stance, out = _attached(m), ef._stance.stance, m(x1)
    entered, overlap = threading.Event(), []

    def hook(mod, inp):
        if threading.current_thread().name == "A" and not entered.is_set():
            entered.set()
            overlap.append(second_inside.wait(0.5))  # B cannot get in while A's call runs

    second_inside = threading.Event()

    def hook_b(mod, inp):
        if threading.current_thread().name == "B":
            second_inside.set()

    handles = [m[0].register_forward_pre_hook(hook), m[0].register_forward_pre_hook(hook_b)]
    res = {}

    def a():
        res["A"] = rr.affine_map(m, x1)

    def b():
        entered.wait(10)
        res["B"] = rr.affine_map(m, x2)

    ta, tb = threading.Thread(target=a, name="A"), threading.Thread(target=b, name="B")
    ta.start()
    tb.start()
    ta.join(20)
    tb.join(20)
    for h in handles:
        h.remove()
    assert overlap == [False] and second_inside.is_set()
    assert _attached(m) == before and ef._stance.stance == stance
    torch.testing.assert_close(m(x1), out, rtol=0, atol=0)
    for key, x in (("A", x1), ("B", x2)):
        ref = rr.affine_map(m, x)
        assert torch.equal(res[key].A, ref.A) and torch.equal(res[key].d, ref.d)


def test_entry_points_called_from_a_hook_inside_a_recorded_pass():
    # before: affine_map / contributions / line_walk called from a forward hook of a recorded model failed ("calls
    # 'abs' on input-dependent data": their own checks ran under the recording), and with strict=False the library's
    # clamps were added to the recorded pattern as units
    m = _net(3)
    x = torch.randn(8, 4)
    with rr.record(m) as alone:
        m(x)
    seen = {}

    def hook(mod, inp, out):
        if seen.get("busy"):  # (the entry points run the model: not again from there)
            return
        seen["busy"] = True
        z = inp[0]
        seen["A"] = rr.affine_map(m, z).A
        seen["c"] = rr.contributions(m, z, target=0).values
        seen["walk"] = geometry.line_walk(m, z[0], z[1]).breakpoints
        seen["box"] = geometry.boundary_distance_in_box(m, z[:2], (-3.0, 3.0)).distance
        seen["pen"] = rr.parsimony_penalty(m, z, gamma=0.5).detach()
        seen["busy"] = False

    for strict in (True, False):
        h = m[0].register_forward_hook(hook)
        try:
            with rr.record(m, route="mode", strict=strict) as rec:
                m(x)
        finally:
            h.remove()
        assert rec.layer_names == alone.layer_names and torch.equal(rec.region_ids(), alone.region_ids())
        assert torch.equal(seen["A"], rr.affine_map(m, x).A)
        assert torch.equal(seen["c"], rr.contributions(m, x, target=0).values)
        assert torch.equal(seen["walk"], geometry.line_walk(m, x[0], x[1]).breakpoints)
        assert torch.equal(seen["box"], geometry.boundary_distance_in_box(m, x[:2], (-3.0, 3.0)).distance)
        assert torch.equal(seen["pen"], rr.parsimony_penalty(m, x, gamma=0.5).detach())


def test_nested_recordings_of_unrelated_models_both_record():
    # a teacher and a student: before, the inner block paused the outer one ("nothing recorded")
    teacher, student = _net(1), _net(2)
    x = torch.randn(10, 4)
    with rr.record(teacher) as t_alone:
        teacher(x)
    with rr.record(student) as s_alone:
        student(x)
    with rr.record(teacher) as rt, rr.record(student) as rs:
        teacher(x)
        student(x)
    assert torch.equal(rt.region_ids(), t_alone.region_ids())
    assert torch.equal(rs.region_ids(), s_alone.region_ids())
    # one model, or a model and its submodule: only the innermost block records, as documented
    wrapped = nn.Sequential(teacher, nn.ReLU())
    for inner_model in (teacher, wrapped):
        with rr.record(teacher) as outer, rr.record(inner_model) as inner:
            wrapped(x)
        assert not outer.passes and len(inner.passes) == 1


def test_an_abandoned_generator_holding_a_recording_leaves_the_model_alone():
    # a generator that yields inside `with record(m)`, abandoned in a reference cycle: the garbage collector closes
    # it later. torch's hook handles reach the hook dicts through weak references, which the collector clears
    # first: the recording's hooks stayed on the model, and every later plain forward raised
    m = _net(1, 6)
    x = torch.randn(8, 6)
    before, ref = _attached(m), m(x)

    def region_keys(batches):
        with rr.record(m, route="mode") as rec:
            for b in batches:
                rec.clear()
                m(b)
                yield rec.region_ids()

    def consume():
        stream = region_keys([x, x])  # (a local: the traceback's frame keeps it)
        for _ in stream:
            raise ValueError("bad batch")

    gc.collect()
    gc.disable()  # the cycle is collected below, not at a random allocation
    try:
        try:
            consume()
        except ValueError as e:
            e.context = {"error": e}  # traceback -> frame -> generator, kept in a cycle
            del e
        assert _attached(m) != before  # the generator's recording is still open
        gc.collect()
    finally:
        gc.enable()
    assert _attached(m) == before
    torch.testing.assert_close(m(x), ref, rtol=0, atol=0)


@pytest.mark.parametrize("route", ["hooks", "mode"])
def test_preserved_does_not_bring_back_a_recording_closed_during_a_call(route):
    # a recording open when an entry point starts and closed while it runs (a generator collected then, another
    # thread): the entry point's exit put the closed recording's hooks / patches back on the model
    from relu_regions.state import preserved

    m = _net(4)
    x = torch.randn(6, 4)
    before, ref = _attached(m), m(x)
    cm = rr.record(m, route=route)
    cm.__enter__()
    with preserved(m, eval_mode=True):
        cm.__exit__(None, None, None)
    assert _attached(m) == before
    torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
