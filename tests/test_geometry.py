import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo import zoo

import relu_regions as rr
from relu_regions import geometry as G
from relu_regions.models import SmallCNN, he_init, mlp

INF = float("inf")


def _packed(model, x):
    with rr.record(model) as rec:
        model(x)
    return rec.packed()


def _unit_dirs(shape, p, g):
    u = torch.randn(shape, generator=g, dtype=torch.float64)
    if p == 1:  # sparse-ish directions too: the l1 ball's corners
        u = u * (torch.rand(shape, generator=g, dtype=torch.float64) < 0.3)
        u[..., 0] += 1e-3
    if p == INF:
        u = torch.sign(u)  # the l_inf ball's corners
    flat = u.reshape(shape[0], -1)
    return (flat / torch.linalg.vector_norm(flat, ord=p, dim=1, keepdim=True)).reshape(shape)


@pytest.fixture(scope="module")
def deep():
    torch.manual_seed(0)
    return he_init(mlp(6, [16, 16, 12], 3)).double()


@pytest.mark.parametrize("p", [2, INF, 1])
def test_points_inside_radius_stay_in_region(deep, p):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, dtype=torch.float64, generator=g)
    r = G.boundary_distance(deep, x, p=p).distance
    assert torch.isfinite(r).all() and (r > 0).all()
    base = _packed(deep, x)
    for _ in range(10):
        u = _unit_dirs(x.shape, p, g)
        assert torch.equal(_packed(deep, x + 0.999 * r[:, None] * u), base)


@pytest.mark.parametrize("p", [2, INF, 1])
def test_cnn_with_maxpool_inside_radius_and_routes_agree(p):
    torch.manual_seed(0)
    net = SmallCNN().double()
    net.features[1] = nn.LeakyReLU(0.1)  # ReLU-like margins of both signs, by their own slope
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64, generator=g)
    fw = G.boundary_distance(net, x, p=p, route="forward")
    rv = G.boundary_distance(net, x, p=p, route="reverse")
    assert fw.layer_names == rv.layer_names and len(fw.layer_names) == 4
    for name in fw.layer_names:  # every layer, not only the nearest one
        assert torch.allclose(fw.per_layer[name], rv.per_layer[name], rtol=1e-9), name
    assert torch.allclose(fw.distance, rv.distance, rtol=1e-9)
    assert (fw.layer == rv.layer).all()
    if p != 2:
        return
    base = _packed(net, x)
    for _ in range(5):
        u = _unit_dirs(x.shape, 2, g)
        assert torch.equal(_packed(net, x + 0.999 * fw.distance.view(-1, 1, 1, 1) * u), base)
    # pooling comparisons can be the nearest inequality: a maxpool layer is among the layers
    assert any("2" in n for n in fw.layer_names)


def test_just_past_nearest_hyperplane_leaves(deep):
    """Step along the nearest unit's own gradient (computed independently by autograd) past its hyperplane."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 6, dtype=torch.float64, generator=g)
    bd = G.boundary_distance(deep, x, p=2)
    base = _packed(deep, x)
    linears = {"1": deep[0], "3": deep[2], "5": deep[4]}  # ReLU module path -> the Linear before it
    for i in range(x.shape[0]):
        name, unit = bd.nearest(i)
        xi = x[i:i + 1].clone().requires_grad_(True)
        store = {}
        h = linears[name].register_forward_hook(lambda m, a, o, s=store: s.__setitem__("z", o))
        deep(xi)
        h.remove()
        z = store["z"][0, unit]
        (grad,) = torch.autograd.grad(z, xi)
        assert float(z.detach().abs() / grad.norm()) == pytest.approx(float(bd.distance[i]), rel=1e-9)
        step = -(z.detach() / grad.norm() ** 2) * grad
        assert torch.equal(_packed(deep, x[i:i + 1] + 0.999 * step), base[i:i + 1])
        assert not torch.equal(_packed(deep, x[i:i + 1] + 1.001 * step), base[i:i + 1])


@pytest.mark.parametrize("p", [2, INF, 1])
def test_re3_exact_for_one_hidden_layer(p):
    torch.manual_seed(4)
    net = mlp(5, [9], 2).double()
    x = torch.randn(50, 5, dtype=torch.float64)
    a = G.boundary_distance(net, x, p=p)
    r = G.boundary_distance(net, x, p=p, method="re3")
    assert torch.allclose(a.distance, r.distance, rtol=1e-12)
    assert torch.equal(a.unit, r.unit)


def test_re3_overestimates_for_deeper_nets(deep):
    x = torch.randn(300, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    a = G.boundary_distance(deep, x).distance
    r = G.boundary_distance(deep, x, method="re3").distance
    over = r > a * (1 + 1e-9)
    assert 0 < int(over.sum()) < 300
    # an overestimate is wrong: a point inside the re3 "radius" leaves the region
    i = int(over.nonzero()[0])
    bd = G.boundary_distance(deep, x[i:i + 1])
    name, unit = bd.nearest(0)
    assert name != "1"  # the first layer is exact, so the violated unit is deeper


def test_decision_distance_and_certified_radius(deep):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(40, 6, dtype=torch.float64, generator=g)
    rad = G.certified_radius(deep, x)
    pred = deep(x).argmax(1)
    for _ in range(10):
        u = _unit_dirs(x.shape, 2, g)
        assert torch.equal(deep(x + 0.999 * rad[:, None] * u).argmax(1), pred)
    # where the decision boundary is nearer than the region boundary, crossing it just past flips the prediction
    dd = G.decision_distance(deep, x)
    bd = G.boundary_distance(deep, x).distance
    amap = rr.affine_map(deep, x)
    flipped = 0
    for i in (dd < bd).nonzero().flatten().tolist():
        c = int(pred[i])
        a = amap.A[i]
        gaps = (amap.output[i, c] - amap.output[i]) / (a[c] - a).norm(dim=1)
        gaps[c] = INF
        k = int(gaps.argmin())
        w = (a[k] - a[c]) / (a[k] - a[c]).norm()
        assert deep(x[i:i + 1] + 0.999 * dd[i] * w).argmax(1).item() == c
        assert deep(x[i:i + 1] + 1.001 * dd[i] * w).argmax(1).item() == k
        flipped += 1
    assert flipped > 0


def test_what_if_agrees_with_rerecording(deep):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(200, 6, dtype=torch.float64, generator=g)
    scale = torch.logspace(-3, 0.5, 200, dtype=torch.float64)[:, None]
    delta = torch.randn(200, 6, dtype=torch.float64, generator=g) * scale
    w = G.what_if(deep, x, delta)
    same = (_packed(deep, x + delta) == _packed(deep, x)).all(1)
    clear = (w.max_step - 1).abs() > 1e-6
    assert torch.equal(w.certified[clear], same[clear])
    assert 0 < int(w.certified.sum()) < 200
    assert torch.allclose(w.prediction[w.certified], deep(x + delta)[w.certified], atol=1e-10)
    assert not torch.allclose(w.prediction[~w.certified], deep(x + delta)[~w.certified], atol=1e-6)
    # the largest step is tight
    fin = torch.isfinite(w.max_step)
    s = w.max_step[:, None]
    base = _packed(deep, x)
    assert (_packed(deep, x + 0.999 * s * delta) == base).all(1)[fin].all()
    assert not (_packed(deep, x + 1.001 * s * delta) == base).all(1)[fin].any()


def test_what_if_through_maxpool():
    torch.manual_seed(8)
    net = SmallCNN().double()
    x = torch.rand(20, 1, 8, 8, dtype=torch.float64)
    delta = torch.randn_like(x) * torch.logspace(-4, -1, 20, dtype=torch.float64).view(-1, 1, 1, 1)
    w = G.what_if(net, x, delta)
    same = (_packed(net, x + delta) == _packed(net, x)).all(1)
    clear = (w.max_step - 1).abs() > 1e-6
    assert torch.equal(w.certified[clear], same[clear])


@pytest.mark.parametrize("model_fn", [lambda: mlp(2, [8, 8], 2), lambda: SmallCNN()])
def test_line_walk_agrees_with_dense_sampling(model_fn):
    torch.manual_seed(9)
    net = model_fn()
    shape = (1, 2) if isinstance(net, nn.Sequential) else (1, 1, 8, 8)
    x0 = torch.randn(shape) * 2
    x1 = x0 + torch.randn(shape) * (2 if len(shape) == 2 else 0.05)
    walk = G.line_walk(net, x0, x1)
    assert walk.breakpoints[0] == 0 and walk.breakpoints[-1] == 1
    assert (walk.breakpoints.diff() > 0).all()
    ts = torch.linspace(0, 1, 3001, dtype=torch.float64)
    net64 = net.double()
    xs = x0.double() + ts.view(-1, *[1] * (len(shape) - 1)) * (x1 - x0).double()
    packed = _packed(net64, xs)
    changes = int((packed[1:] != packed[:-1]).any(1).sum())
    assert walk.n_regions >= changes + 1 >= 2
    for j in range(0, 3001, 7):
        t = float(ts[j])
        near = (walk.breakpoints - t).abs().min()
        if near < 1e-9:
            continue
        assert torch.equal(packed[j], walk.packed[walk.region_at(t)])


def test_validity_functions_refuse_bad_input():
    """Before: a level outside (0, 1] or no distances at all ended in an IndexError, and a NaN distance counted as
    "invalid at every epsilon" (a curve at 0.5 for one NaN of two)."""
    d = torch.arange(1, 11, dtype=torch.float64)
    for levels in ((2.0,), (0.0,), (-0.5,)):
        with pytest.raises(ValueError, match=r"levels are shares of the explanations, in \(0, 1\]"):
            G.validity_epsilons(d, levels)
    with pytest.raises(ValueError, match="distances is empty"):
        G.validity_epsilons(torch.zeros(0))
    for bad in (torch.tensor([float("nan"), 1.0]), torch.tensor([-1.0, 1.0])):
        with pytest.raises(ValueError, match="1 NaN or negative value"):
            G.validity_curve(bad)
        with pytest.raises(ValueError, match="1 NaN or negative value"):
            G.validity_epsilons(bad)
    with pytest.raises(ValueError, match="n .* must be a positive int, got 0"):
        G.validity_curve(d, n=0)
    inf = torch.tensor([1.0, float("inf")])  # a region no unit bounds: a distance, valid at every epsilon
    assert G.validity_epsilons(inf, (0.5, 1.0)) == {"eps50": float("inf"), "eps100": 1.0}


def test_validity_epsilons_exact():
    d = torch.arange(1, 11, dtype=torch.float64)  # 1..10
    eps = G.validity_epsilons(d)
    assert eps == {"eps90": 2.0, "eps75": 3.0, "eps50": 6.0} or eps == {"eps90": 2.0, "eps75": 3.0, "eps50": 5.0}
    e, v = G.validity_curve(d, torch.tensor([0.0, 2.0, 2.5, 10.0]))
    assert v.tolist() == [1.0, 0.9, 0.8, 0.1]
    for k, lv in (("eps90", 0.9), ("eps75", 0.75), ("eps50", 0.5)):
        assert float((d >= eps[k]).double().mean()) >= lv
        assert float((d >= eps[k] + 1e-9).double().mean()) < lv


def test_model_untouched_and_bad_input():
    net = mlp(3, [4], 2)
    net.train()
    net[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 3)
    G.boundary_distance(net, x)
    G.what_if(net, x, torch.randn(4, 3))
    G.line_walk(net, x[:1], x[1:2])
    assert net.training and net[0].training and not net[0].weight.requires_grad and net[2].weight.requires_grad
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not net._forward_hooks and not net[0]._forward_hooks
    with pytest.raises(ValueError, match="p must be"):
        G.boundary_distance(net, x, p=3)
    with pytest.raises(ValueError, match="delta"):
        G.what_if(net, x, torch.randn(3, 3))
    with pytest.raises(ValueError, match="batched"):
        G.boundary_distance(net, x[0])


# --- structured route (plain chains of standard modules) --------------------------------------------------------


def _lenet64():
    from relu_regions.models import LeNet

    torch.manual_seed(10)
    return LeNet().double()


def test_structured_route_equals_forward_route_on_lenet():
    net = _lenet64()
    g = torch.Generator().manual_seed(11)
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64, generator=g)
    x[1, :, :8] = 0.0  # a flat band: pooling ties (distance 0 at the first pool) in sample 1
    fw = G.boundary_distance(net, x, route="forward")
    st = G.boundary_distance(net, x, route="structured")
    auto = G.boundary_distance(net, x)
    assert fw.layer_names == st.layer_names == ["features.1", "features.2", "features.4", "features.5", "head.1",
                                                "head.3"]
    for n in fw.layer_names:
        assert torch.allclose(fw.per_layer[n], st.per_layer[n], rtol=1e-10, atol=0), n
    assert torch.equal(fw.layer, st.layer) and torch.equal(fw.unit, st.unit)
    assert torch.equal(auto.distance, st.distance)
    assert float(st.distance[1]) == 0.0 and st.nearest(1)[0] == "features.2"


@pytest.mark.parametrize("p", [2, INF, 1])
def test_structured_route_equals_forward_route_with_padding(p):
    torch.manual_seed(12)
    net = SmallCNN().double()  # conv padding=1 before the first pool, pool then padded conv
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    fw = G.boundary_distance(net, x, p=p, route="forward")
    st = G.boundary_distance(net, x, p=p, route="structured", chunk_size=4)
    for n in fw.layer_names:
        assert torch.allclose(fw.per_layer[n], st.per_layer[n], rtol=1e-10, atol=0), n
    assert torch.equal(fw.unit, st.unit)


def test_structured_route_leaky_and_pool_padding():
    """LeakyReLU before a padded, overlapping max-pool: the non-tiling window path."""
    torch.manual_seed(14)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.LeakyReLU(0.1), nn.MaxPool2d(3, stride=2, padding=1), nn.Flatten(),
                        nn.Linear(3 * 9, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    x = torch.randn(4, 2, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    for p in (2, 1):
        fw = G.boundary_distance(net, x, p=p, route="forward")
        st = G.boundary_distance(net, x, p=p, route="structured")
        assert torch.allclose(fw.distance, st.distance, rtol=1e-10, atol=0)
        assert torch.equal(fw.unit, st.unit)
    # a model that is not a chain (functional op in forward) falls back, or refuses the structured route
    class NotChain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, z):
            return self.b(torch.relu(self.a(z)) * 2)

    with pytest.raises(ValueError, match="plain chain"):
        G.boundary_distance(NotChain(), torch.randn(2, 3), route="structured")
    assert torch.isfinite(G.boundary_distance(NotChain().double(), torch.randn(2, 3, dtype=torch.float64))
                          .distance).all()


def test_layer_and_kind_selection():
    torch.manual_seed(16)
    net = SmallCNN().double()
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(17))
    x[:, :, 1:7, 1:7] = 0.25  # a flat patch: first-pool ties (for channels active there)
    full = G.boundary_distance(net, x)
    relu = G.boundary_distance(net, x, kinds=("relu",))
    assert (full.distance == 0).all() and (relu.distance > 0).all()
    relu_names = ["features.1", "features.4", "head.1"]
    assert relu.layer_names == relu_names
    assert torch.equal(relu.distance, torch.stack([full.per_layer[n] for n in relu_names]).amin(0))
    one = G.boundary_distance(net, x, layers="features.4")
    assert one.layer_names == ["features.4"] and torch.equal(one.distance, full.per_layer["features.4"])
    sl = G.boundary_distance(net, x, layers=slice(-1, None), route="forward")
    assert sl.layer_names == ["head.1"] and torch.allclose(sl.distance, full.per_layer["head.1"], rtol=1e-10)
    with pytest.raises(ValueError, match="kinds"):
        G.boundary_distance(net, x, kinds=("sigmoid",))
    with pytest.raises(KeyError, match="unknown layer"):
        G.boundary_distance(net, x, layers="nope")


# --- input-domain box and largest inscribed ball ---------------------------------------------------------------


def _triangle_net():
    """2-D input, ReLU units z1 = x, z2 = y, z3 = 1 - x - y: around (0.1, 0.1) the region is the triangle
    (0,0), (1,0), (0,1) — every unit active."""
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        net[0].bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    return net


def test_inscribed_ball_of_a_triangle():
    net = _triangle_net()
    x = torch.tensor([[0.1, 0.1], [0.5, 0.2]], dtype=torch.float64)
    r2 = (2 - math.sqrt(2)) / 2  # inradius of the right triangle with legs 1
    ball = G.inscribed_ball(net, x, p=2)
    assert torch.allclose(ball.radius, torch.full((2,), r2, dtype=torch.float64), rtol=1e-7)
    assert torch.allclose(ball.center, torch.full((2, 2), r2, dtype=torch.float64), rtol=1e-6)
    # l_inf ball (a square): c - r >= 0 and 2c + 2r <= 1 -> r = 1/4; l_1 ball (a diamond): 2c + r <= 1 -> r = 1/3
    assert torch.allclose(G.inscribed_ball(net, x, p=INF).radius, torch.full((2,), 0.25, dtype=torch.float64))
    assert torch.allclose(G.inscribed_ball(net, x, p=1).radius, torch.full((2,), 1 / 3, dtype=torch.float64))
    # with a box [0, 0.4]^2 the ball lives in the region ∩ box: here the box's inscribed ball, radius 0.2
    boxed = G.inscribed_ball(net, x[:1], p=2, box=(0.0, 0.4))
    assert torch.allclose(boxed.radius, torch.tensor([0.2], dtype=torch.float64), rtol=1e-7)
    # unbounded region (z3 inactive side), no box: radius inf
    far = G.inscribed_ball(net, torch.tensor([[2.0, 2.0]], dtype=torch.float64))
    assert torch.isinf(far.radius).all()


def test_inscribed_ball_stays_in_region_random_mlp():
    torch.manual_seed(20)
    net = mlp(2, [6, 6], 2).double()
    g = torch.Generator().manual_seed(21)
    x = torch.randn(4, 2, dtype=torch.float64, generator=g)
    ball = G.inscribed_ball(net, x, box=(-4.0, 4.0))
    base = _packed(net, x)
    assert (ball.radius > 0).all() and torch.isfinite(ball.radius).all()
    assert torch.equal(_packed(net, ball.center), base)
    for _ in range(20):
        u = _unit_dirs(x.shape, 2, g)
        assert torch.equal(_packed(net, ball.center + 0.999 * ball.radius[:, None] * u), base)
    # the ball is at least as large as the ball around x itself
    assert (ball.radius >= G.boundary_distance(net, x).distance * (1 - 1e-7)).all()


def test_box_distance_triangle():
    net = _triangle_net()
    x = torch.tensor([[0.1, 0.1]], dtype=torch.float64)
    plain = G.boundary_distance(net, x).distance
    assert float(plain) == pytest.approx(0.1)
    # box [0.05, 1]^2: the legs x = 0, y = 0 are outside the box, the hypotenuse is reached at (0.5, 0.5)
    bd = G.boundary_distance_in_box(net, x, (0.05, 1.0))
    assert float(bd.distance) == pytest.approx(0.8 / math.sqrt(2), rel=1e-12)
    assert float(bd.unrestricted) == pytest.approx(0.1) and not bool(bd.nearest_in_box[0])
    assert bd.layer_names == ["1"] and int(bd.unit[0]) == 2
    assert float(G.boundary_distance_in_box(net, x, (0.05, 1.0), p=INF).distance) == pytest.approx(0.4)
    assert float(G.boundary_distance_in_box(net, x, (0.05, 1.0), p=1).distance) == pytest.approx(0.8)
    # a box the hypotenuse does not meet: nothing can fail inside it
    assert torch.isinf(G.boundary_distance_in_box(net, x, (0.05, 0.4)).distance).all()
    # a huge box changes nothing
    big = G.boundary_distance_in_box(net, x, (-1e3, 1e3))
    assert torch.allclose(big.distance, plain) and bool(big.nearest_in_box[0])
    with pytest.raises(ValueError, match="inside the box"):
        G.boundary_distance_in_box(net, x, (0.2, 1.0))


@pytest.mark.parametrize("p", [2, INF, 1])
def test_box_distance_matches_independent_solvers(p):
    """Against scipy HiGHS LPs per hyperplane for p = inf / 1; for p = 2 (no LP): every box point closer than the
    distance stays in the region (the exact value for p = 2 is checked on the triangle)."""
    import numpy as np
    from scipy.optimize import linprog

    torch.manual_seed(22)
    net = mlp(4, [8, 6], 2).double()
    g = torch.Generator().manual_seed(23)
    x = torch.rand(5, 4, dtype=torch.float64, generator=g)
    lo, hi = 0.0, 1.0
    bd = G.boundary_distance_in_box(net, x, (lo, hi), p=p)
    ineq = G.region_inequalities(net, x)
    plain = G.boundary_distance(net, x, p=p).distance
    assert torch.allclose(bd.unrestricted, plain, rtol=1e-10)
    assert (bd.distance >= plain * (1 - 1e-12)).all()
    for i in range(5):
        best = math.inf
        for j in range(ineq.margin.shape[1]):
            a = ineq.grad[i, j].numpy()
            s = float(ineq.margin[i, j])
            if not np.any(a):
                continue
            xi = x[i].numpy()
            if p == 2:
                continue  # checked below by optimality of the returned distance
            # variables (u, t): minimise the l_p norm of u subject to a·u <= -s and the box
            n = 4
            if p == INF:  # min r, -r <= u <= r
                c = np.r_[np.zeros(n), 1.0]
                a_ub = np.vstack([np.r_[a, 0.0], np.hstack([np.eye(n), -np.ones((n, 1))]),
                                  np.hstack([-np.eye(n), -np.ones((n, 1))])])
                b_ub = np.r_[-s, np.zeros(2 * n)]
                bounds = [(lo - xi[k], hi - xi[k]) for k in range(n)] + [(0, None)]
            else:  # u = u+ - u-, min sum
                c = np.ones(2 * n)
                a_ub = np.r_[a, -a][None, :]
                b_ub = np.array([-s])
                bounds = [(0, hi - xi[k]) for k in range(n)] + [(0, xi[k] - lo) for k in range(n)]
            res = linprog(c, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
            if res.status == 0:
                best = min(best, res.fun)
        if p != 2:
            assert float(bd.distance[i]) == pytest.approx(best, rel=1e-7, abs=1e-12)
    if p == 2:
        # inside the reported radius every box point stays in the region; just past it along the optimum, one leaves
        base = _packed(net, x)
        for _ in range(30):
            u = _unit_dirs(x.shape, 2, g)
            y = (x + 0.999 * torch.where(torch.isfinite(bd.distance), bd.distance, 10.0)[:, None] * u).clamp(lo, hi)
            inside = ((y - x).norm(dim=1) < bd.distance) | torch.isinf(bd.distance)
            assert (_packed(net, y) == base).all(1)[inside].all()


class _ExampleLike(nn.Module):
    """PyTorch's MNIST example CNN in miniature, forward written the same way (functional units, flatten in the
    forward, log-softmax head), with the flatten and activation spelled in the other common ways on request."""

    def __init__(self, flatten: str = "torch.flatten", act: str = "F.relu"):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 6, 3)
        self.dropout = nn.Dropout(0.25)
        self.fc1, self.fc2 = nn.Linear(54, 7), nn.Linear(7, 3)
        self.flatten, self.act = flatten, act

    def _act(self, x):
        if self.act == "F.relu":
            return F.relu(x)
        if self.act == "Tensor.relu":
            return x.relu()
        return F.leaky_relu(x, 0.2)

    def forward(self, x):
        x = self._act(self.conv2(self._act(self.conv1(x))))
        x = self.dropout(F.max_pool2d(x, 2))
        if self.flatten == "torch.flatten":
            x = torch.flatten(x, 1)
        elif self.flatten == "view":
            x = x.view(x.size(0), -1)
        elif self.flatten == "reshape":
            x = x.reshape(x.shape[0], -1)
        else:
            x = x.flatten(1)
        x = self.fc2(self._act(self.fc1(x)))
        return F.log_softmax(x, dim=1)


@pytest.mark.parametrize("flatten, act, p", [("torch.flatten", "F.relu", 2), ("view", "Tensor.relu", INF),
                                             ("reshape", "F.leaky_relu", 1), ("method", "F.relu", 2)])
def test_structured_route_reads_functional_chains_up_to_logits_at(flatten, act, p, monkeypatch):
    torch.manual_seed(20)
    net = _ExampleLike(flatten, act).double()
    x = torch.rand(5, 1, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(21))
    x[0, :, :5] = 0.0  # a flat band: pooling ties in sample 0
    calls = []
    real = G._fast_chunk
    monkeypatch.setattr(G, "_fast_chunk", lambda *a: calls.append(1) or real(*a))
    auto = G.boundary_distance(net, x, p=p, logits_at="fc2")
    assert calls  # "auto" took the structured route
    fw = G.boundary_distance(net, x, p=p, logits_at="fc2", route="forward")
    assert auto.layer_names == fw.layer_names and len(fw.layer_names) == 4
    for n in fw.layer_names:
        assert torch.allclose(auto.per_layer[n], fw.per_layer[n], rtol=1e-10, atol=0), n
    assert torch.equal(auto.unit, fw.unit) and torch.equal(auto.layer, fw.layer)
    # without logits_at the log-softmax head is not piecewise linear: the clear error, not a wrong route
    with pytest.raises(rr.UnsupportedModuleError):
        G.boundary_distance(net, x, p=p)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(x + F.relu(self.a(x)))


class _BatchFromTheStart(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 2, 3), nn.Linear(2 * 4 * 4, 2)

    def forward(self, x):
        n = x.size(0)  # read from the input, not from the flattened tensor's own size
        return self.fc(F.relu(self.conv(x)).view(n, -1))


@pytest.mark.parametrize("make, shape", [(_Residual, (3, 4)), (_BatchFromTheStart, (3, 1, 6, 6))])
def test_not_a_chain_is_refused_by_the_structured_route_and_auto_falls_back(make, shape):
    torch.manual_seed(22)
    net = make().double()
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(23))
    with pytest.raises(ValueError, match="plain chain"):
        G.boundary_distance(net, x, route="structured")
    auto = G.boundary_distance(net, x)
    rv = G.boundary_distance(net, x, route="reverse")
    assert torch.allclose(auto.distance, rv.distance, rtol=1e-10)


# --- colouring: one tangent per colour class in the convolutional prefix ------------------------------------------


def _strided_cnn():
    """Stride, dilation, padding (also 'same'), LeakyReLU, a padded max-pool and an average pool before the head,
    on a non-square two-channel input."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2), nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding="same"), nn.LeakyReLU(0.1),
        nn.MaxPool2d(2, stride=2, padding=1), nn.AvgPool2d(2), nn.Dropout(0.3), nn.Flatten(),
        nn.Linear(4 * 4 * 3, 6), nn.ReLU(), nn.Linear(6, 3))


def _conv1d_net():
    return nn.Sequential(
        nn.Conv1d(1, 3, 5, stride=2, padding=2), nn.ReLU(), nn.AvgPool1d(2),
        nn.Conv1d(3, 2, 3, dilation=2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 12, 5), nn.ReLU(), nn.Linear(5, 2))


# colours by hand: receptive fields 5 -> 9 -> 11 -> 15 (2 channels x 15 x 15); 5 -> 7 -> 7 + 2 * 2 * 4 = 23
@pytest.mark.parametrize("make, shape, colours", [(_strided_cnn, (2, 30, 26), 2 * 15 * 15),
                                                  (_conv1d_net, (1, 64), 23)])
@pytest.mark.parametrize("p", [2, INF, 1])
def test_colouring_gives_the_forward_routes_distances(make, shape, colours, p, monkeypatch):
    torch.manual_seed(30)
    net = make().double().eval()
    x = torch.randn(5, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(31))
    x[1, :, :4] = 0.5  # a flat band: pooling ties
    unpacked = []
    real = G._unpack_colours
    monkeypatch.setattr(G, "_unpack_colours", lambda *a: unpacked.append(a[0].shape[1]) or real(*a))
    st = G.boundary_distance(net, x, p=p, route="structured", chunk_size=3)
    assert unpacked == [colours, colours]  # two chunks, the packed tangents had one row per colour
    fw = G.boundary_distance(net, x, p=p, route="forward")
    assert st.layer_names == fw.layer_names
    for n in fw.layer_names:
        assert torch.allclose(st.per_layer[n], fw.per_layer[n], rtol=1e-10, atol=0), n
    assert torch.equal(st.unit, fw.unit) and torch.equal(st.layer, fw.layer)


def test_colouring_of_pytorchs_mnist_cnn_and_a_selection_inside_the_prefix(monkeypatch):
    """The example CNN's 6x6 windows behind its max-pool: 36 colours instead of 784 input features; a selection
    that ends inside the convolutional prefix needs no unpacking."""
    torch.manual_seed(32)
    net = _ExampleLike().double()
    net.conv1, net.conv2, net.fc1 = nn.Conv2d(1, 3, 3), nn.Conv2d(3, 4, 3), nn.Linear(4 * 12 * 12, 7)
    net.double().eval()  # (the plan is checked against the run: dropout must be off, as boundary_distance does)
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(33))
    out1, pats = G.run_recorded(net, x[:1], strict=True, logits_at="fc2")
    plan = G._chain_plan(net, x[:1], True, "fc2", out1, pats)
    byname = {pp.name: pp for pp in pats}
    col = G._colouring(plan, byname, (1, 28, 28), len(plan) - 1, x.dtype, x.device)
    assert col.basis.shape == (36, 1, 28, 28) and col.period == (6, 6) and col.n_units == 3
    assert torch.equal(col.basis.sum(0), torch.ones(1, 28, 28))  # every feature in exactly one colour
    unpacked = []
    real = G._unpack_colours
    monkeypatch.setattr(G, "_unpack_colours", lambda *a: unpacked.append(1) or real(*a))
    sel = ["relu", "relu#1"]
    st = G.boundary_distance(net, x, logits_at="fc2", layers=sel)
    assert not unpacked
    fw = G.boundary_distance(net, x, logits_at="fc2", layers=sel, route="forward")
    for n in sel:
        assert torch.allclose(st.per_layer[n], fw.per_layer[n], rtol=1e-10, atol=0), n
    full = G.boundary_distance(net, x, logits_at="fc2")
    assert unpacked
    rv = G.boundary_distance(net, x, logits_at="fc2", route="reverse")
    for n in rv.layer_names:
        assert torch.allclose(full.per_layer[n], rv.per_layer[n], rtol=1e-10, atol=0), n


def test_the_chain_is_traced_once_per_model_structure(monkeypatch):
    import relu_regions.hook_recording as H

    torch.manual_seed(34)
    net = SmallCNN().double().eval()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(35))
    traces = []
    real = H.fx_graph
    monkeypatch.setattr(H, "fx_graph", lambda m: traces.append(1) or real(m))
    first = G.boundary_distance(net, x)
    assert len(traces) == 2  # the chain's trace, and the hook route's plan (the recorded runs take the hook route)
    assert torch.equal(G.boundary_distance(net, x).distance, first.distance) and len(traces) == 2
    net.head[0] = nn.Linear(256, 32).double()  # another module object: traced again, and its weights are used
    again = G.boundary_distance(net, x)
    assert len(traces) == 4 and not torch.equal(again.per_layer["head.1"], first.per_layer["head.1"])
    assert torch.allclose(again.distance, G.boundary_distance(net, x, route="forward").distance, rtol=1e-10)


# --- per_layer=False: inputs proven to sit on their region's boundary skip the full computation --------------------


@pytest.mark.parametrize("route", ["structured", "forward", "reverse"])
def test_distance_only_equals_the_full_computation_and_skips_proven_inputs(route, monkeypatch):
    net = _lenet64()
    g = torch.Generator().manual_seed(36)
    x = torch.rand(5, 1, 28, 28, dtype=torch.float64, generator=g)
    x[[1, 3], :, :10] = 0.0  # flat bands: max-pool ties of active units (a real kink: distance 0)
    full = G.boundary_distance(net, x, route=route)
    assert (full.distance[[1, 3]] == 0).all() and (full.distance[[0, 2, 4]] > 0).all()
    computed = []
    for name, at in (("_fast_chunk", 2), ("_exact_chunk", 1)):  # where the chunk's inputs are
        real = getattr(G, name)
        monkeypatch.setattr(G, name, lambda *a, _real=real, _at=at: computed.append(a[_at].shape[0]) or _real(*a))
    fast = G.boundary_distance(net, x, route=route, per_layer=False)
    assert computed == [3]  # samples 0, 2, 4 only
    # (a batch of 3 instead of 5 may sum in another order: the distances, ~4e-5 from pre-activations that cancel
    # terms of ~1, then differ in their ~12th digit; 5e-12 relative on an AMD EPYC build machine)
    assert torch.allclose(fast.distance, full.distance, rtol=1e-10, atol=0) and fast.per_layer == {}
    assert torch.equal(fast.distance == 0, full.distance == 0)
    assert torch.equal(fast.layer, full.layer) and torch.equal(fast.unit, full.unit)
    assert fast.layer_names == full.layer_names


def test_proof_pass_stops_once_every_input_is_proven(monkeypatch, recwarn):
    """When every input is proven on its boundary by some layer, the forward-mode proof pass ends after that layer
    (StopReplay): the same distances and proving inequalities as the full computation, fewer layers' margins,
    no warning, and the model keeps no hook or patch."""
    net = _lenet64()
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(43))
    x[:, :, :10] = 0.0  # every input has flat bands: first max-pool ties
    full = G.boundary_distance(net, x)
    assert (full.distance == 0).all()
    seen = []
    real = G.margins
    monkeypatch.setattr(G, "margins", lambda p, *a, **k: seen.append(p.name) or real(p, *a, **k))
    fast = G.boundary_distance(net, x, per_layer=False)
    assert torch.equal(fast.distance, full.distance)
    assert torch.equal(fast.layer, full.layer) and torch.equal(fast.unit, full.unit)
    assert set(seen) <= {"features.1", "features.2"} and "features.2" in seen  # stopped at the first max-pool
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
    assert all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__
               for m in net.modules())


def test_an_observer_can_end_a_replay_early():
    """run_frozen returns None when its observer raises StopReplay, without a pattern-mismatch error; a replay
    that ends early for any other reason still raises one."""
    from relu_regions.recording import PatternMismatchError, StopReplay, run_frozen

    net = _lenet64()
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(44))
    with torch.no_grad():
        out, pats = G.run_recorded(net, x)
    calls = []

    def stop_at_second(p, t):
        calls.append(p.name)
        if len(calls) == 2:
            raise StopReplay

    with torch.no_grad():
        assert run_frozen(net, x, pats, observe=stop_at_second) is None
        assert calls == [pats[0].name, pats[1].name]
        assert torch.equal(run_frozen(net, x, pats), out)  # the next replay is whole
        with pytest.raises(PatternMismatchError, match="ran 6 piecewise-linear operations, the recording has 7"):
            run_frozen(net, x, pats + pats[-1:])


def test_zero_margins_without_a_gradient_prove_nothing():
    """Every max-pool window ties at 0 behind a ReLU that is off everywhere: those margins are 0 but never bind
    (their gradient is 0), so the distance is the ReLUs' and the shortcut must not report 0."""
    torch.manual_seed(37)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 16, 3)).double()
    with torch.no_grad():
        net[0].bias.fill_(-20.0)
    x = torch.rand(4, 1, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(38))
    full = G.boundary_distance(net, x)
    fast = G.boundary_distance(net, x, per_layer=False)
    assert (full.distance > 0).all() and torch.isfinite(full.distance).all()
    assert torch.equal(fast.distance, full.distance) and torch.equal(fast.unit, full.unit)
    assert not G._on_boundary(net, x, {"1", "2"}, ["1", "2"], None, True)[0].any()


def test_distance_only_in_chunks():
    """More inputs than one proof pass takes (its margins are bounded in memory): chunked, same answers."""
    torch.manual_seed(39)
    net = SmallCNN().double().eval()
    x = torch.rand(3400, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(40))
    x[::3, :, :3] = 0.0
    with torch.no_grad():
        _, pats = G.run_recorded(net, x[:1], strict=True)
    assert 3400 > (1 << 22) // sum(int(torch.Size(p.in_shape).numel()) for p in pats)  # more than one chunk
    fast = G.boundary_distance(net, x, per_layer=False)
    full = G.boundary_distance(net, x)
    assert torch.equal(fast.distance == 0, full.distance == 0) and (full.distance[::3] == 0).all()
    assert torch.allclose(fast.distance, full.distance, rtol=1e-12, atol=0)
    assert torch.equal(fast.layer, full.layer) and torch.equal(fast.unit, full.unit)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("make, shape", [(_lenet64, (1, 28, 28)), (lambda: _strided_cnn().double(), (2, 30, 26))])
def test_structured_route_and_boundary_proofs_on_cuda_match_cpu(make, shape):
    import copy

    torch.manual_seed(41)
    net = make().eval()
    x = torch.rand(6, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(42))
    x[::2, :, :10] = 0.0
    for per_layer in (True, False):
        cpu = G.boundary_distance(net, x, per_layer=per_layer)
        gpu = G.boundary_distance(copy.deepcopy(net).cuda(), x.cuda(), per_layer=per_layer)
        assert torch.allclose(gpu.distance.cpu(), cpu.distance, rtol=1e-10, atol=0)
        assert torch.equal(gpu.layer.cpu(), cpu.layer) and torch.equal(gpu.unit.cpu(), cpu.unit)


def test_a_compiled_model_gives_the_plain_models_distances_and_what_ifs():
    """``torch.compile``'d code drops forward-mode tangents silently (every distance of the forward route came out
    ``inf``): the library's own passes run compiled modules eagerly, and the user's next call compiles as usual,
    also after an error inside the library."""
    compiled = []

    def backend(gm, example_inputs):  # counts compilations; runs the graph as traced
        compiled.append(gm)
        return gm.forward

    torch.manual_seed(0)
    net = he_init(mlp(3, [8, 6], 3)).eval()
    cnet = torch.compile(net, backend=backend)
    x = torch.randn(9, 3, generator=torch.Generator().manual_seed(2))
    delta = 1e-3 * torch.randn(9, 3, generator=torch.Generator().manual_seed(3))
    for kw in ({}, {"route": "forward"}, {"per_layer": False}):
        ref, got = G.boundary_distance(net, x, **kw), G.boundary_distance(cnet, x, **kw)
        assert torch.isfinite(ref.distance).all() and torch.allclose(got.distance, ref.distance)
        assert torch.equal(got.layer, ref.layer) and torch.equal(got.unit, ref.unit)
    ref, got = G.what_if(net, x, delta), G.what_if(cnet, x, delta)
    assert torch.allclose(got.prediction, ref.prediction) and torch.equal(got.certified, ref.certified)
    assert torch.allclose(got.max_step, ref.max_step)
    assert compiled == []  # nothing of the library's ran compiled
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):  # raised inside the eager pass
        G.boundary_distance(cnet, torch.randn(2, 5))
    with torch.no_grad():
        assert torch.equal(cnet(x), net(x))
    assert len(compiled) == 1  # the stance is the user's again
    with torch.no_grad(), rr.record(cnet) as rec:  # the user's compiled call, recorded as it runs
        cnet(x)
    with torch.no_grad(), rr.record(net) as ref:
        net(x)
    assert rec.route == "mode" and torch.equal(rec.region_ids(), ref.region_ids())


@pytest.mark.parametrize("name", list(zoo()))
def test_every_zoo_model_gets_one_distance_from_every_route_and_its_ball_stays_in_the_region(name):
    """The engine's zoo (BatchNorm, residual adds in place, grouped / depthwise / transposed convolutions,
    upsampling, pixel shuffles, padded / dilated / ceil-mode / adaptive max-pools, three-state units): the forward
    and reverse routes (and "auto", the structured route where the model is a chain) give the same distances, layer
    by layer, and points 0.999 r away in random directions keep the recorded pattern (re-recorded)."""
    import copy

    model, shape = zoo()[name]
    model = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, *shape, dtype=torch.float64, generator=g)
    got = {route: G.boundary_distance(model, x, route=route) for route in ("forward", "reverse", "auto")}
    for route in ("reverse", "auto"):
        assert got[route].layer_names == got["forward"].layer_names
        for layer in got["forward"].layer_names:
            assert torch.allclose(got[route].per_layer[layer], got["forward"].per_layer[layer], rtol=1e-9,
                                  atol=1e-12), (route, layer)
    r = got["forward"].distance
    assert torch.isfinite(r).all()
    base = _packed(model, x)
    for _ in range(5):
        u = _unit_dirs(x.shape, 2, g)
        assert torch.equal(_packed(model, x + 0.999 * r.view(-1, *[1] * len(shape)) * u), base)
    # and the nearest inequality is that far: its margin over the norm of its gradient, the gradient from central
    # differences of re-recorded margins (steps of r / 4 along each input feature stay inside the region, where the
    # margins are affine)
    from relu_regions.recording import run_recorded

    d_in = x[0].numel()
    for i in range(len(x)):
        if r[i] == 0:  # on a boundary (a tie): nothing to step
            continue
        name, unit = got["forward"].nearest(i)
        h = float(r[i]) / 4
        steps = torch.cat([torch.zeros(1, d_in, dtype=x.dtype), h * torch.eye(d_in, dtype=x.dtype),
                           -h * torch.eye(d_in, dtype=x.dtype)])
        xs = x[i].reshape(1, -1) + steps
        seen = {}
        with torch.no_grad():
            run_recorded(model, xs.reshape(-1, *shape),
                         observe=lambda pat, t, seen=seen: seen.setdefault(pat.name, (pat, t)))
        pat, t = seen[name]
        m = G.margins(pat, t)[:, unit]
        grad = (m[1:d_in + 1] - m[d_in + 1:]) / (2 * h)
        assert float(m[0].abs() / grad.norm()) == pytest.approx(float(r[i]), rel=1e-6), (i, name, unit)


def test_inplace_relus_give_the_distances_and_maps_of_the_same_network_without_inplace():
    """``nn.ReLU(inplace=True)`` overwrites its input, the pre-activations every observer of a unit reads. Before,
    the forward and reverse routes read the overwritten values (inactive units dropped: distances too large, and
    points closer than them left the region), the structured route read zeros (every distance 0), and
    ``preactivation_maps`` returned the activations as pre-activations. A chain starting with an inplace ReLU also
    wrote into the caller's input."""
    torch.manual_seed(3)

    def net(inplace):
        return nn.Sequential(nn.ReLU(inplace=inplace), nn.Conv2d(1, 3, 3), nn.ReLU(inplace=inplace), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(27, 8), nn.ReLU(inplace=inplace), nn.Linear(8, 3)).double()

    plain, inplace = net(False), net(True)
    inplace.load_state_dict(plain.state_dict())
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x_before = x.clone()
    for route in ("forward", "reverse", "structured"):
        want = G.boundary_distance(plain, x, route=route)
        got = G.boundary_distance(inplace, x, route=route)
        assert torch.equal(x, x_before)
        for layer in want.layer_names:
            assert torch.allclose(got.per_layer[layer], want.per_layer[layer], rtol=1e-12, atol=0), (route, layer)
    for method in ("forward", "reverse"):
        want, got = (rr.preactivation_maps(m, x, method=method) for m in (plain, inplace))
        for layer in want:
            for field in ("value", "offset", "jacobian"):
                assert torch.allclose(getattr(got[layer], field), getattr(want[layer], field), atol=1e-12), \
                    (method, layer, field)
    # the graph walker's hidden maps (its observer gets each unit's value at 0 and linear part)
    from relu_regions.compose import compose_maps
    from relu_regions.recording import run_recorded

    hidden = []
    for m in (plain, inplace):
        seen = {}
        _, patterns = run_recorded(m, x)
        compose_maps(m, patterns, x, observe=lambda p, c, lin, seen=seen: seen.__setitem__(p.name, (c, lin)))
        hidden.append(seen)
    assert list(hidden[0]) == list(hidden[1]) and len(hidden[0]) == 4
    for layer, (c, lin) in hidden[0].items():
        assert lin is not None and torch.equal(hidden[1][layer][0], c) and torch.equal(hidden[1][layer][1], lin)


@pytest.mark.parametrize("name", list(zoo()))
def test_what_if_on_every_zoo_model_is_tight_and_exact(name):
    """``what_if``'s largest step along δ is where the pattern changes (re-recorded at 0.999 and 1.001 times it),
    and its certified predictions are the model's own outputs at x + δ."""
    import copy

    model, shape = zoo()[name]
    model = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(6, *shape, dtype=torch.float64, generator=g)
    delta = torch.randn(x.shape, dtype=torch.float64, generator=g) * torch.logspace(-6, 0, 6, dtype=torch.float64) \
        .view(-1, *[1] * len(shape))
    w = G.what_if(model, x, delta)
    with torch.no_grad():
        at = model(x + delta).reshape(len(x), -1)
    assert torch.allclose(w.prediction[w.certified], at[w.certified], atol=1e-10)
    s = w.max_step.view(-1, *[1] * len(shape))
    move = torch.isfinite(w.max_step) & (w.max_step > 0)
    assert move.sum() >= 4 and w.certified.any()
    base = _packed(model, x)
    assert (_packed(model, x + 0.999 * torch.where(torch.isfinite(s), s, 0) * delta) == base).all(1)[move].all()
    assert not (_packed(model, x + 1.001 * torch.where(torch.isfinite(s), s, 0) * delta) == base).all(1)[move].any()


@pytest.mark.parametrize("name", list(zoo()))
def test_line_walk_on_every_zoo_model_agrees_with_dense_sampling(name):
    """The regions ``line_walk`` reports along a segment are the re-recorded patterns of dense samples on it."""
    import copy

    model, shape = zoo()[name]
    model = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(9)
    x0 = torch.randn(1, *shape, dtype=torch.float64, generator=g)
    x1 = x0 + 2.0 * torch.randn(1, *shape, dtype=torch.float64, generator=g)
    walk = G.line_walk(model, x0, x1)
    assert walk.breakpoints[0] == 0 and walk.breakpoints[-1] == 1 and (walk.breakpoints.diff() > 0).all()
    ts = torch.linspace(0, 1, 801, dtype=torch.float64)
    packed = _packed(model, x0 + ts.view(-1, *[1] * len(shape)) * (x1 - x0))
    changes = int((packed[1:] != packed[:-1]).any(1).sum())
    assert walk.n_regions >= changes + 1 >= 2
    for j in range(801):
        t = float(ts[j])
        if (walk.breakpoints - t).abs().min() < 1e-9:
            continue
        assert torch.equal(packed[j], walk.packed[walk.region_at(t)]), t


@pytest.mark.parametrize("name", ["mixed", "resnet", "lenet"])
def test_box_numbers_margins_as_boundary_distance_does_in_any_batch(name):
    """(layer, unit) of the nearest inequality: the same in a batch and alone, and the same as boundary_distance's
    for a box too large to bind. Before, region_inequalities dropped the columns no sample of the batch had (a
    clamp's bound where every sample saturates it, max-pool padding), which renumbered the others."""
    import copy

    model, shape = zoo()[name]
    model = copy.deepcopy(model).double()
    x = torch.randn(8, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    box = (-1e6, 1e6)
    full = G.boundary_distance_in_box(model, x, box)
    ref = G.boundary_distance(model, x)
    assert torch.equal(full.layer >= 0, ref.layer >= 0)
    for i in range(len(x)):
        alone = G.boundary_distance_in_box(model, x[i:i + 1], box)
        assert (int(alone.layer[0]), int(alone.unit[0])) == (int(full.layer[i]), int(full.unit[i]))
        if ref.layer[i] >= 0:
            assert (full.layer_names[int(full.layer[i])], int(full.unit[i])) == ref.nearest(i)
            assert float(full.distance[i]) == pytest.approx(float(ref.distance[i]), rel=1e-9)
    ineq = G.region_inequalities(model, x)
    assert G.region_inequalities(model, x[:1]).margin.shape[1] == ineq.margin.shape[1]


@pytest.mark.parametrize("name", list(zoo()))
def test_region_inequalities_of_every_zoo_model_describe_its_region(name):
    """A point x + δ satisfies every inequality of x's region (margins plus gradients times δ) exactly when its
    re-recorded pattern is x's, for steps from deep inside to far outside (points within 1e-9 of a face aside)."""
    import copy

    model, shape = zoo()[name]
    model = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, *shape, dtype=torch.float64, generator=g)
    ineq = G.region_inequalities(model, x)
    assert (ineq.margin >= 0).all()
    base = _packed(model, x)
    scales = torch.logspace(-5, 0, 30, dtype=torch.float64)
    inside_seen = outside_seen = 0
    for i in range(len(x)):
        delta = torch.randn(len(scales), *shape, dtype=torch.float64, generator=g) * scales.view(-1, *[1] * len(shape))
        # ties of inactive units inside a max-pool window (margin 0, gradient 0) hold everywhere: never binding
        binds = (ineq.margin[i] != 0) | (ineq.grad[i] != 0).any(1)
        slack = ineq.margin[i, binds] + delta.reshape(len(scales), -1) @ ineq.grad[i, binds].T  # (steps, M)
        predicted = (slack >= 0).all(1)
        actual = (_packed(model, x[i] + delta) == base[i]).all(1)
        finite = ineq.margin[i][torch.isfinite(ineq.margin[i])]  # (+inf: margins this sample lacks)
        clear = slack.abs().amin(1) > 1e-9 * (1 + finite.abs().amax())
        assert torch.equal(predicted[clear], actual[clear]), (i, predicted, actual)
        inside_seen += int((predicted & clear).sum())
        outside_seen += int((~predicted & clear).sum())
    assert inside_seen > 0 and outside_seen > 0


@pytest.mark.parametrize("name", list(zoo()))
@pytest.mark.parametrize("p", [2, INF])
def test_certified_radius_of_every_zoo_model_holds(name, p):
    """No point 0.999 r away (random directions; the l_inf ball's corners) changes the model's prediction."""
    import copy

    model, shape = zoo()[name]
    model = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(12)
    x = torch.randn(4, *shape, dtype=torch.float64, generator=g)
    r = G.certified_radius(model, x, p=p)
    assert torch.isfinite(r).all()
    with torch.no_grad():
        pred = model(x).reshape(len(x), -1).argmax(1)
        for _ in range(10):
            u = _unit_dirs(x.shape, p, g)
            moved = model(x + 0.999 * r.view(-1, *[1] * len(shape)) * u).reshape(len(x), -1).argmax(1)
            assert torch.equal(moved, pred)


def test_a_clamp_bound_of_some_samples_only_stays_for_them():
    """A Hardtanh unit's upper bound is a constraint of its linear samples, not of its saturated ones (+inf there).
    Before, a column that was +inf for any sample of the batch was dropped for all: x = 0.5 batched with x = 3 got
    the box distance 1.5 and the inscribed radius 3 instead of 0.5 and 1 (alone: 0.5 and 1)."""

    class OneClamp(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(2, 1, bias=False)
            with torch.no_grad():
                self.l.weight.copy_(torch.tensor([[1.0, 0.0]]))

        def forward(self, x):
            return F.hardtanh(self.l(x))

    model = OneClamp().double()
    alone = torch.tensor([[0.5, 0.0]], dtype=torch.float64)
    both = torch.tensor([[0.5, 0.0], [3.0, 0.0]], dtype=torch.float64)
    box = (-5.0, 5.0)
    assert G.boundary_distance_in_box(model, alone, box).distance.tolist() == [0.5]
    assert G.boundary_distance_in_box(model, both, box).distance.tolist() == [0.5, 2.0]
    assert G.inscribed_ball(model, both, box=box).radius[0].item() == pytest.approx(1.0)
    ineq = G.region_inequalities(model, both)
    assert ineq.margin[0].tolist() == [1.5, 0.5] and ineq.margin[1, 1].item() == math.inf
    assert ineq.grad[1, 1].abs().sum() == 0


def test_line_walk_and_certified_radius_guard_their_results():
    """Before: a walk stopped at max_regions looked complete (no flag, no warning); a NaN x0 gave one region; a
    float32 walk could repeat one breakpoint (0.8168 ... 7 times in a QA repro) instead of saying it cannot resolve
    it; certified_radius passed method="re3" / layers= on to boundary_distance, returning radii (1.0 where the
    exact one is 0.5) that a perturbation of norm 0.6 crossed."""
    torch.manual_seed(0)
    model = mlp(2, [16, 16], 3).double()
    x0, x1 = torch.tensor([[-3.0, -2.0]], dtype=torch.float64), torch.tensor([[3.0, 2.5]], dtype=torch.float64)
    full = G.line_walk(model, x0, x1)
    assert full.complete and full.n_regions > 3
    with pytest.warns(UserWarning, match="line_walk stopped at max_regions=3"):
        part = G.line_walk(model, x0, x1, max_regions=3)
    assert not part.complete and torch.equal(part.breakpoints[:3], full.breakpoints[:3])
    with pytest.raises(ValueError, match="x0 holds 1 non-finite"):
        G.line_walk(model, torch.tensor([[float("nan"), 0.0]], dtype=torch.float64), x1)
    with pytest.raises(ValueError, match="max_regions must be a positive int"):
        G.line_walk(model, x0, x1, max_regions=0)
    for kw in ({"method": "re3"}, {"layers": 0}, {"kinds": ["relu"]}):
        with pytest.raises(TypeError, match="unexpected keyword"):
            G.certified_radius(model, x0, **kw)


def test_box_and_validity_inputs_are_checked():
    """Before: a NaN bound passed (NaN distances, or a scipy error from inscribed_ball), a box of the wrong shape
    failed in torch's expand; levels 0.9 and 0.904 wrote one key "eps90" (the second overwrote the first)."""
    model = mlp(2, [4], 2).double()
    x = torch.zeros(1, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="box: lo holds NaN"):
        G.boundary_distance_in_box(model, x, (float("nan"), 1.0))
    with pytest.raises(ValueError, match=r"box: hi of shape \(3,\) does not broadcast"):
        G.boundary_distance_in_box(model, x, (-1.0, torch.ones(3, dtype=torch.float64)))
    d = torch.arange(1, 201, dtype=torch.float64)
    eps = G.validity_epsilons(d, (0.9, 0.904, 0.995))
    assert eps == {"eps90": 21.0, "eps90.4": 20.0, "eps99.5": 2.0}
    with pytest.raises(ValueError, match="distances is empty"):
        G.validity_curve(torch.zeros(0))


def test_structured_route_with_hooks_and_fields_longer_than_the_input():
    """Two silent errors of the structured route (the one route="auto" takes for plain CNN chains): a forward hook
    that scales a conv's output passed its bit-for-bit check (which runs the modules) while the tangents were pushed
    with the weights only (distances up to 100x too small); and with a receptive field longer than an input
    dimension (8x16 input, padded convs) the colouring held one colour twice and lost input features (distances off
    by ~3% for the ReLU after the first Linear). Both now match the forward route (itself checked against
    torch.func elsewhere)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(4 * 2 * 4, 5), nn.ReLU(), nn.Linear(5, 2)).double().eval()
    x = torch.randn(3, 1, 8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = G.boundary_distance(net, x, route="forward").per_layer["8"]
    assert torch.allclose(G.boundary_distance(net, x, route="structured").per_layer["8"], want, rtol=1e-9)
    handle = net[3].register_forward_hook(lambda m, i, o: o * 0.01)
    want = G.boundary_distance(net, x, route="forward").distance
    assert torch.allclose(G.boundary_distance(net, x).distance, want, rtol=1e-9)
    with pytest.raises(ValueError, match="without forward \\(pre-\\)hooks of its own"):
        G.boundary_distance(net, x, route="structured")
    handle.remove()
    flat = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2 * 3 * 7, 2)).double()
    for route in ("forward", "reverse"):  # no inequality at all (before: an IndexError with per_layer=False)
        assert G.boundary_distance(flat, x, route=route, per_layer=False).distance.tolist() == [math.inf] * 3


# --- s17: expanded inputs, float64 copies, mixed dtypes, re3 on padded convs, argument checks, docstrings --------


def _one_hidden(seed: int = 0, dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 3)).to(dtype).eval()


def _by_hand(net: nn.Sequential, x: torch.Tensor):
    """First-layer pre-activations, active masks and each sample's region map ``A`` of a Linear-ReLU-Linear net,
    written out from its weights."""
    w1, b1, w2 = net[0].weight.detach(), net[0].bias.detach(), net[2].weight.detach()
    z = x @ w1.T + b1
    mask = (z > 0).to(x.dtype)
    a = torch.einsum("kh,bh,hd->bkd", w2, mask, w1)
    return z, mask, a


def test_expanded_inputs_work_in_the_directional_routes():
    """Before: one sample broadcast to a batch with ``expand`` (stride 0) made what_if, certified_radius and
    boundary_distance(per_layer=False) fail in fwAD.make_dual ("more than one element of the written-to tensor
    refers to a single memory location")."""
    net = _one_hidden()
    x = torch.randn(1, 4, dtype=torch.float64).expand(3, 4)
    delta = torch.full((1, 4), 0.01, dtype=torch.float64).expand(3, 4)  # an expanded change too
    z, mask, a = _by_hand(net, x)
    w1 = net[0].weight.detach()
    region = (z.abs() / torch.linalg.vector_norm(w1, dim=1)).min(1).values  # first-layer units: exact
    bd = G.boundary_distance(net, x, per_layer=False).distance
    torch.testing.assert_close(bd, region, rtol=1e-12, atol=0)
    out = net(x).detach()
    c = out.argmax(1)
    ar = torch.arange(3)
    gap = out[ar, c][:, None] - out
    nrm = torch.linalg.vector_norm(a[ar, c][:, None] - a, dim=2)
    dd = torch.where(gap > 0, gap / nrm, torch.full_like(gap, INF)).min(1).values
    torch.testing.assert_close(G.certified_radius(net, x), torch.minimum(region, dd), rtol=1e-12, atol=0)
    w = G.what_if(net, x, delta)
    torch.testing.assert_close(w.prediction, net(x + delta).detach(), rtol=0, atol=1e-12)
    rate = delta @ w1.T  # pre-activations' rate along delta; the first unit that reaches 0 ends the ray
    steps = torch.where(rate * z < 0, -z / rate, torch.full_like(z, INF)).min(1).values
    torch.testing.assert_close(w.max_step, steps, rtol=1e-12, atol=0)


def _crossings(net: nn.Sequential, x0: torch.Tensor, x1: torch.Tensor) -> int:
    """Regions on the segment of a one-hidden-layer net: one more than the units whose pre-activation changes sign
    strictly inside it (a hand computation; the segments below have no ties)."""
    z0 = (x0 @ net[0].weight.double().T + net[0].bias.double())[0]
    z1 = (x1 @ net[0].weight.double().T + net[0].bias.double())[0]
    return int(((z0 * z1) < 0).sum()) + 1


class _Locked(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _one_hidden(dtype=torch.float32)
        import threading

        self.lock = threading.Lock()  # deepcopy cannot pickle a lock

    def forward(self, x):
        with self.lock:
            return self.net(x)


class _Alt(nn.Sequential):
    def scaled(self, x):
        return 2 * super().forward(x)


def test_line_walk_float64_copy_is_refused_clearly_where_a_copy_cannot_stand_in():
    """Before: line_walk(float64=True) deep-copied the model: a member that cannot be copied gave pickle's raw
    "cannot pickle '_thread.lock' object", and an instance-level forward wrapper (still calling the float32
    original) a raw "mat1 and mat2 must have the same dtype"."""
    import functools

    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))
    locked = _Locked().eval()
    with pytest.raises(TypeError, match=r"cannot be deep-copied .*pass float64=False"):
        G.line_walk(locked, x[:1], x[1:2])
    assert G.line_walk(locked, x[:1], x[1:2], float64=False).n_regions == _crossings(locked.net, x[:1].double(),
                                                                                     x[1:2].double())
    wrapped = _one_hidden(dtype=torch.float32)
    orig = wrapped.forward

    @functools.wraps(orig)
    def logged(*args, **kw):
        return orig(*args, **kw)

    wrapped.forward = logged
    with pytest.raises(ValueError, match=r"instance-level forward .*pass float64=False"):
        G.line_walk(wrapped, x[:1], x[1:2])
    assert wrapped.forward is logged  # the model as it was
    assert G.line_walk(wrapped, x[:1], x[1:2], float64=False).n_regions == _crossings(wrapped, x[:1].double(),
                                                                                      x[1:2].double())
    # an instance-level forward that is a method of the model is rebound by the copy: walked in float64
    alt = _Alt(*_one_hidden(dtype=torch.float32))
    alt.forward = alt.scaled
    assert G.line_walk(alt, x[:1], x[1:2]).n_regions == _crossings(alt, x[:1].double(), x[1:2].double())
    # so is a compiled module's (the copy makes its own)
    net = _one_hidden(dtype=torch.float32)
    compiled = torch.compile(net, backend=lambda gm, example_inputs: gm.forward)
    assert G.line_walk(compiled, x[:1], x[1:2]).n_regions == _crossings(net, x[:1].double(), x[1:2].double())


class _Back(nn.Module):
    """float64 first layer and ReLU, float32 head; the forward casts."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(4, 7).double()
        self.l2 = nn.Linear(7, 3)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x.double())).float())


def test_models_with_layers_of_two_dtypes():
    """Before: boundary_distance(per_layer=False) and certified_radius failed in index_copy ("self and source
    expected to have the same dtype": the result was allocated in x's float32, the margins were float64), and
    line_walk(float64=True) with a raw "mat1 and mat2 must have the same dtype"."""
    m = _Back().eval()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    w1, b1 = m.l1.weight.detach(), m.l1.bias.detach()
    z = x.double() @ w1.T + b1
    region = (z.abs() / torch.linalg.vector_norm(w1, dim=1)).min(1).values  # the only ReLU layer: exact
    bd = G.boundary_distance(m, x, per_layer=False).distance
    assert bd.dtype == G.boundary_distance(m, x).distance.dtype
    torch.testing.assert_close(bd.double(), region, rtol=1e-12, atol=0)
    cr = G.certified_radius(m, x)
    assert torch.isfinite(cr).all() and (cr <= bd).all() and (cr > 0).all()
    with pytest.raises(RuntimeError, match=r"float64 copy of the model.*Pass float64=False"):
        G.line_walk(m, x[:1], x[1:2])
    walk = G.line_walk(m, x[:1], x[1:2], float64=False)
    z0, z1 = z[0], z[1]
    assert walk.n_regions == int(((z0 * z1) < 0).sum()) + 1


def test_re3_distance_on_convs_is_exact_without_padding_and_underestimates_padded_borders():
    """Before: the docstrings called method="re3" exact for every first-layer unit fed by a Conv; a padded
    Conv's border units see a cropped kernel (smaller norm), so re3 underestimates their distance. The docs say so
    now; this pins both cases against an independent Jacobian (torch.func.jacrev of the conv alone)."""
    from torch.func import jacrev

    torch.manual_seed(0)
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    for pad, exact in ((0, True), (1, False)):
        conv = nn.Conv2d(1, 2, 3, padding=pad).double()
        model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.LazyLinear(3).double()).double()
        model(x)
        re3 = G.boundary_distance(model, x, method="re3").distance
        ref = []
        for i in range(3):
            z = conv(x[i:i + 1]).detach().reshape(-1)
            jac = jacrev(lambda u, conv=conv: conv(u).reshape(-1))(x[i:i + 1]).reshape(z.numel(), -1)
            ref.append((z.abs() / torch.linalg.vector_norm(jac, dim=1)).min())
        ref = torch.stack(ref).detach()
        if exact:
            torch.testing.assert_close(re3, ref, rtol=1e-12, atol=0)
        else:
            assert (re3 <= ref * (1 + 1e-12)).all() and (re3 < ref * (1 - 1e-6)).any()
    assert "padded Conv" in G.boundary_distance.__doc__ and "padded Conv" in G.__doc__


def test_validity_epsilons_levels_are_checked():
    """Before: levels=0.9 gave a raw TypeError ("'float' object is not iterable") and levels=(True,) was taken
    as the level 1.0."""
    d = torch.tensor([0.1, 0.2, 0.3, 0.4])
    # ⌈0.9·4⌉ = 4: the 4th largest distance; ⌈0.5·4⌉ = 2: the 2nd largest
    assert G.validity_epsilons(d, 0.9) == {"eps90": pytest.approx(0.1)}
    import numpy as np

    assert G.validity_epsilons(d, np.array([0.5])) == {"eps50": pytest.approx(0.3)}
    for bad in ((True,), [0.5, False]):
        with pytest.raises(ValueError, match="levels are shares"):
            G.validity_epsilons(d, bad)
    for bad in (True, "0.9", None):
        with pytest.raises((TypeError, ValueError), match="levels"):
            G.validity_epsilons(d, bad)


def test_a_bool_is_not_a_norm_order():
    """Before: p=True was taken as the l1 norm (dual_norm did float(p))."""
    net = _one_hidden()
    x = torch.randn(2, 4, dtype=torch.float64)
    for call in (lambda p: G.boundary_distance(net, x, p=p), lambda p: G.decision_distance(net, x, p=p),
                 lambda p: G.certified_radius(net, x, p=p),
                 lambda p: G.boundary_distance_in_box(net, x, (-5.0, 5.0), p=p)):
        for p in (True, False, "2"):
            with pytest.raises(ValueError, match="p must be 1, 2 or inf"):
                call(p)


def _documented(fn) -> set[str]:
    """Names listed in a numpy docstring's Parameters section ("a : type" or "a, b, c")."""
    import inspect
    import re

    doc = inspect.cleandoc(fn.__doc__)
    section = doc.split("Parameters\n----------\n", 1)[1].split("\n\n", 1)[0] if "\n----------\n" in doc else ""
    names: set[str] = set()
    for line in section.splitlines():
        if line and not line.startswith(" "):
            names.update(n.strip() for n in re.split(r"\s:\s|\s:$", line)[0].split(","))
    return names


def test_boundary_distance_docstrings_list_every_parameter():
    """Before: boundary_distance did not document logits_at and strict, boundary_distance_in_box model and x."""
    import inspect

    for fn in (G.boundary_distance, G.boundary_distance_in_box):
        assert set(inspect.signature(fn).parameters) <= _documented(fn), fn.__name__


# --- s18: float32 line walks, norms in tiny / huge units, scale-free inscribed balls ----------------------------


def _relu_masks(net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Every ReLU's active mask of a plain Sequential, from its own forward (no library code)."""
    h, bits = x, []
    with torch.no_grad():
        for m in net:
            h = m(h)
            if isinstance(m, nn.ReLU):
                bits.append(h > 0)
    return torch.cat(bits, 1)


def test_line_walk_in_float32_lists_each_region_once():
    """Before: line_walk(float64=False) listed the same region twice in a row, split by a spurious breakpoint ~1e-7
    after the real one (45 regions, 8 of them repeats, where the float32 model crosses 37): float64-sized
    tolerances on float32 steps. Checked against a dense scan of the float32 model's own forward."""
    net = he_init(mlp(8, [32, 32], 3), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(1, 8, generator=g), torch.randn(1, 8, generator=g)
    walk = G.line_walk(net, x0, x1, float64=False)
    ts = torch.linspace(0, 1, 200001, dtype=torch.float64)
    pat = _relu_masks(net, (x0.double() + ts[:, None] * (x1 - x0).double()).float())
    change = (pat[1:] != pat[:-1]).any(1)
    assert walk.n_regions == int(change.sum()) + 1 == 37
    assert not (walk.region_ids[1:] == walk.region_ids[:-1]).any()
    assert (walk.breakpoints.diff() > 0).all()
    # every breakpoint within a grid step (5e-6) and float32 rounding of the scan's
    torch.testing.assert_close(walk.breakpoints[1:-1], ts[1:][change], rtol=0, atol=7e-6)


def _units_net(s: float) -> tuple[nn.Sequential, torch.Tensor]:
    """A float32 Linear-ReLU-Linear net for inputs measured in units of ``s`` (its first layer undoes them)."""
    net = _one_hidden(dtype=torch.float32)
    with torch.no_grad():
        net[0].weight /= s
    return net, torch.randn(5, 4, generator=torch.Generator().manual_seed(0)) * s


@pytest.mark.parametrize("s", [1e-20, 1e23])
def test_distances_in_tiny_and_huge_input_units(s):
    """Before: l2 norms were sqrt(sum(g**2)) (torch.linalg.vector_norm as well), and in float32 the squares of
    ordinary gradient entries (~1e20, ~1e-23) over- or underflow: boundary_distance, decision_distance and
    certified_radius came out 0 or inf (or 5x off), boundary_distance_in_box too. The truth by hand, in float64."""
    net, x = _units_net(s)
    z, mask, a = _by_hand(copy.deepcopy(net).double(), x.double())
    w1 = net[0].weight.detach().double()
    region = (z.abs() / torch.linalg.vector_norm(w1, dim=1)).min(1).values  # one hidden layer: exact
    out = z.clamp(min=0) @ net[2].weight.detach().double().T + net[2].bias.detach().double()
    c, ar = out.argmax(1), torch.arange(5)
    gap = out[ar, c][:, None] - out
    dd = torch.where(gap > 0, gap / torch.linalg.vector_norm(a[ar, c][:, None] - a, dim=2),
                     torch.full_like(gap, INF)).min(1).values
    assert torch.isfinite(region).all() and (region > 0).all()

    def close(got, want):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)

    for route in ("structured", "forward", "reverse"):
        close(G.boundary_distance(net, x, route=route).distance, region)
    close(G.boundary_distance(net, x, method="re3").distance, region)
    close(G.decision_distance(net, x), dd)
    close(G.certified_radius(net, x), torch.minimum(region, dd))
    box = G.boundary_distance_in_box(net, x, (-1e3 * s, 1e3 * s))  # a box far away: it never binds
    close(box.distance, region)
    close(box.unrestricted, region)


def test_box_distance_knows_its_nearest_point_in_float32():
    """Before: nearest_in_box compared the in-box and the ordinary distance with a float64-sized tolerance
    (1e-9): in float32 the two formulas differ by a rounding, and ~30% of inputs were reported as having their
    nearest boundary point outside a box that is far from every boundary point."""
    net = he_init(mlp(4, [16, 16], 3), seed=0).eval()
    x = torch.randn(100, 4, generator=torch.Generator().manual_seed(0))
    for p in (2, INF):
        box = G.boundary_distance_in_box(net, x, (-1e3, 1e3), p=p)
        assert box.nearest_in_box.all()
        torch.testing.assert_close(box.distance, box.unrestricted, rtol=1e-6, atol=0)


def test_inscribed_ball_is_scale_free_and_stays_in_the_region():
    """Before: the LP was posed in raw units and HiGHS's tolerances are absolute (~1e-7): at inputs of size
    1e-7 the radius was off by up to 68% and the ball stuck out of the region. A bias-free net is positively
    homogeneous (the region of s·x is s times that of x), and the ball is checked against the region's
    hyperplanes written out by hand."""
    net = he_init(mlp(6, [24, 24], 3), seed=0).double().eval()
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.bias.zero_()
    lins = [m for m in net if isinstance(m, nn.Linear)]
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def room(center, xi, lo, hi):
        """Smallest distance from ``center`` to xi's region's hyperplanes (masked products) and the box."""
        a, h, rows, signs = torch.eye(6, dtype=torch.float64), xi, [], []
        for lin in lins[:-1]:
            a, z = lin.weight.detach() @ a, lin.weight.detach() @ h
            rows.append(a)
            signs.append(z > 0)
            a, h = a * (z > 0)[:, None], torch.relu(z)
        rows, signs = torch.cat(rows), torch.cat(signs)
        nrm = rows.norm(dim=1)
        zc = torch.where(signs, rows @ center, -(rows @ center))[nrm > 0] / nrm[nrm > 0]
        return min(zc.min().item(), (center - lo).min().item(), (hi - center).min().item())

    ref = G.inscribed_ball(net, x, box=(-3.0, 3.0)).radius
    for s in (1e-7, 1.0, 1e6):
        ball = G.inscribed_ball(net, x * s, box=(-3.0 * s, 3.0 * s))
        torch.testing.assert_close(ball.radius / s, ref, rtol=1e-7, atol=0)
        for i in range(4):
            r = ball.radius[i].item()
            assert room(ball.center[i], x[i] * s, -3.0 * s, 3.0 * s) >= r * (1 - 1e-9)
    assert "1e-9" not in G.inscribed_ball.__doc__


def test_re3_distance_refuses_units_fed_by_a_concatenation():
    """Before: method='re3' took the last Linear / Conv that ran as a unit's producer; for a DenseNet's ReLU on
    torch.cat(features) that is the previous layer's conv (4 rows for 12 channels): a raw torch expand error (and
    silently another layer's kernel when the widths agreed). Now a clear error naming the layer; a conv -> max-pool ->
    relu order keeps the conv's kernel, checked against the hand formula |z| / ||w||."""
    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv0, self.conv1 = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1)
            self.relu = nn.ReLU()
            self.fc = nn.Linear(5 * 16, 2)

        def forward(self, x):
            a = self.conv0(x)
            b = self.conv1(a)
            return self.fc(self.relu(torch.cat([a, b], 1)).flatten(1))

    torch.manual_seed(0)
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"re3.*layer 'relu'.*channels.*'conv1'.*method='exact'"):
        rr.boundary_distance(Dense(), x, method="re3")
    m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2)).double()
    x = torch.randn(2, 1, 10, 10, dtype=torch.float64)
    got = rr.boundary_distance(m, x, method="re3", layers="2").distance
    with torch.no_grad():
        z = m[1](m[0](x))
    want = (z.abs() / m[0].weight.flatten(1).norm(dim=1)[None, :, None, None]).flatten(1).amin(1)
    assert torch.allclose(got, want)


def test_inscribed_ball_of_a_float32_region_with_lines_is_inside_it():
    """A first layer narrower than the input (6 -> 3) leaves directions that no inequality sees: the region
    contains lines. In float32 the deeper inequalities' gradients were tilted slightly (rounding) into them, and
    the LP followed the tilt ~1e8 away: radius 0.883 where the float64 LP by hand gives 0.244, a center of another
    pattern. Now the inequalities come from a float64 copy: the ball is inside the region (its center and points
    on its sphere have x's pattern, computed by hand in float64 from the weights), at least as large as x's own
    distance ball, and the user's float32 model is untouched. Infinite box bounds are no faces (linprog refused
    them)."""
    from relu_regions.geometry import inscribed_ball

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(1, 6)
    w1, b1, w2, b2 = (t.detach().double() for t in (net[0].weight, net[0].bias, net[2].weight, net[2].bias))

    def pattern(v):  # by hand, float64
        z1 = w1 @ v + b1
        return torch.cat([z1 > 0, w2 @ (z1 * (z1 > 0)) + b2 > 0])

    before = copy.deepcopy(net.state_dict())
    ball = inscribed_ball(net, x)
    r, c = float(ball.radius[0]), ball.center[0].double()
    assert ball.radius.dtype == torch.float32 and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert 0 < r < math.inf and torch.equal(pattern(c), pattern(x[0].double()))
    u = torch.randn(200, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    u = u / u.norm(dim=1, keepdim=True)
    assert all(torch.equal(pattern(c + 0.999 * r * d), pattern(x[0].double())) for d in u)
    own = float(rr.boundary_distance(net.double(), x.double()).distance[0])
    net.float()
    assert r >= own * (1 - 1e-6)
    # infinite bounds: an all-infinite box is no box; one bounded coordinate of width 0.02 around x (x's own
    # distance ball is wider) gives radius 0.01
    assert float(inscribed_ball(net, x, box=(-math.inf, math.inf)).radius[0]) == pytest.approx(r, rel=1e-9)
    lo, hi = torch.full((6,), -math.inf), torch.full((6,), math.inf)
    lo[0], hi[0] = float(x[0, 0]) - 0.01, float(x[0, 0]) + 0.01
    assert own > 0.01 and float(inscribed_ball(net, x, box=(lo, hi)).radius[0]) == pytest.approx(0.01, rel=1e-6)


def test_validity_curve_counts_equal_the_comparison_of_every_pair():
    """validity_curve counts by binary search in the sorted distances (the (n, N) comparison matrix held 1.6 GB for
    a million distances): the same shares as the plain comparison, with ties, zeros, inf and eps on the values."""
    g = torch.Generator().manual_seed(0)
    d = torch.cat([torch.rand(500, generator=g, dtype=torch.float64).round(decimals=2), torch.zeros(7),
                   torch.full((5,), math.inf)])
    for eps in (None, torch.tensor([0.0, 0.5, 0.25, 1.0, 2.0, math.inf]), d[:50]):
        e, v = G.validity_curve(d, eps)
        assert torch.equal(v, (d[None, :] >= e[:, None]).to(torch.float64).mean(1))
