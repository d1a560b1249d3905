"""Re3 contributions: logit / probability level and per-neuron, against independent routes."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from relu_regions import contributions
from relu_regions.attributions import channel_contributions, neuron_contributions, same_region, top_units
from relu_regions.models import mlp


def _net(seed: int = 0, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(seed)
    m = mlp(5, [12, 10], 4).double().eval()
    for mod in m:
        if isinstance(mod, nn.Linear):
            if bias:
                nn.init.normal_(mod.bias, std=0.5)
            else:
                mod.bias = None
    return m


def _x(seed: int = 1, n: int = 6) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(n, 5, dtype=torch.float64)


def test_logit_contributions_complete_and_match_manual_offset():
    m, x = _net(), _x()
    c = contributions(m, x, target=2)
    with torch.no_grad():
        out = m(x)[:, 2]
    torch.testing.assert_close(c.values.sum(1) + c.offset, out, rtol=0, atol=1e-12)
    # independent offset: masks from the forward pass, biases pushed through the masked weights
    w1, b1, w2, b2, w3, b3 = m[0].weight, m[0].bias, m[2].weight, m[2].bias, m[4].weight, m[4].bias
    with torch.no_grad():
        d1 = (x @ w1.T + b1 > 0).double()
        d2 = ((torch.relu(x @ w1.T + b1)) @ w2.T + b2 > 0).double()
        off = ((d1 * b1) @ w2.T + b2) * d2 @ w3.T + b3
    torch.testing.assert_close(c.offset, off[:, 2], rtol=1e-12, atol=1e-12)
    assert c.level == "logit" and torch.equal(c.target, torch.full((6,), 2))


def test_default_target_is_prediction():
    m, x = _net(), _x()
    c = contributions(m, x)
    with torch.no_grad():
        assert torch.equal(c.target, m(x).argmax(1))


def test_probability_level_is_gradient_of_softmax_times_input():
    m, x = _net(), _x()
    tgt = torch.tensor([0, 1, 2, 3, 0, 1])
    c = contributions(m, x, target=tgt, level="probability")
    z = x.clone().requires_grad_(True)
    p = torch.softmax(m(z), 1)
    (g,) = torch.autograd.grad(p[torch.arange(6), tgt].sum(), z)
    torch.testing.assert_close(c.values, g * x, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(c.output, p.detach()[torch.arange(6), tgt], rtol=1e-12, atol=0)
    torch.testing.assert_close(c.values.sum(1) + c.offset, c.output, rtol=1e-12, atol=1e-14)


def test_probability_level_of_a_single_logit_is_the_sigmoids():
    # a binary classifier with one output (BCEWithLogitsLoss): before, a softmax over the one column gave p = 1 and
    # every contribution 0 for every input
    torch.manual_seed(0)
    m = mlp(5, [12, 10], 1).double().eval()
    x = _x()
    c = contributions(m, x, level="probability")
    z = x.clone().requires_grad_(True)
    p = torch.sigmoid(m(z))[:, 0]
    (g,) = torch.autograd.grad(p.sum(), z)
    assert torch.equal(c.target, torch.zeros(6, dtype=torch.long))
    torch.testing.assert_close(c.output, p.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(c.values, g * x, rtol=1e-10, atol=1e-14)
    assert (c.values.abs().sum(1) > 0).all() and (c.output < 1).all()
    with pytest.raises(ValueError):
        contributions(m, x, target=1, level="probability")  # the one output is index 0


def test_baseline_contributions_and_region_flag():
    m, x = _net(), _x()
    near = x * (1 - 1e-8)
    c = contributions(m, x, target=1, baseline=near)
    assert c.same_region.all()
    with torch.no_grad():
        gap = m(x)[:, 1] - m(near)[:, 1]
    torch.testing.assert_close(c.values.sum(1), gap, rtol=1e-5, atol=1e-13)
    far = contributions(m, x, target=1, baseline=-3 * x)
    assert not far.same_region.all()
    assert same_region(m, x, x).all()
    with pytest.raises(ValueError, match="baseline"):
        contributions(m, x, target=1, baseline=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="level"):
        contributions(m, x, target=1, level="logits")


def test_neuron_contributions_match_re3_algorithm_2():
    m, x = _net(), _x()
    t = torch.tensor([3, 2, 1, 0, 3, 2])
    nc = neuron_contributions(m, x, target=t)
    assert list(nc) == ["1", "3"]
    w1, b1, w2, b2, w3 = m[0].weight, m[0].bias, m[2].weight, m[2].bias, m[4].weight
    with torch.no_grad():
        z1 = x @ w1.T + b1
        h1 = torch.relu(z1)
        z2 = h1 @ w2.T + b2
        h2 = torch.relu(z2)
        w3t = w3[t]  # (B, 10)
        c2 = h2 * w3t  # Re3: c2 = H2 ⊙ W3[pred]
        c1 = h1 * (((z2 > 0).double() * w3t) @ w2)  # c1 = H1 ⊙ (W3[pred]·D2·W2)
    torch.testing.assert_close(nc["3"], c2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(nc["1"], c1, rtol=1e-12, atol=1e-14)
    only = neuron_contributions(m, x, target=t, layers=slice(-1, None))
    assert list(only) == ["3"]


def test_neuron_contributions_bias_free_cnn_sum_to_output_per_layer():
    torch.manual_seed(2)
    m = nn.Sequential(nn.Conv2d(1, 3, 3, bias=False), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                      nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.Flatten(),
                      nn.Linear(4 * 2 * 2, 3, bias=False)).double().eval()
    x = torch.rand(4, 1, 10, 10, dtype=torch.float64)
    nc = neuron_contributions(m, x, target=1)
    with torch.no_grad():
        out = m(x)[:, 1]
    assert nc["1"].shape == (4, 3, 8, 8) and nc["2"].shape == (4, 3, 8, 8) and nc["4"].shape == (4, 4, 2, 2)
    for name, c in nc.items():  # no biases: each layer's contributions carry the whole logit
        torch.testing.assert_close(c.flatten(1).sum(1), out, rtol=1e-10, atol=1e-12, msg=name)
    ch = channel_contributions(nc["4"])
    assert ch.shape == (4, 4)
    torch.testing.assert_close(ch.sum(1), out, rtol=1e-10, atol=1e-12)
    idx, val = top_units(nc["4"], k=2)
    assert idx.shape == (4, 2) and (val[:, 0] >= val[:, 1]).all()


def test_inplace_relu_gives_same_neuron_contributions():
    m = _net()
    m_in = mlp(5, [12, 10], 4).double().eval()
    m_in.load_state_dict(m.state_dict())
    m_in[1].inplace = True
    m_in[3].inplace = True
    x = _x()
    a = neuron_contributions(m, x, target=0)
    b = neuron_contributions(m_in, x, target=0)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_model_untouched():
    m = _net().train()
    m[0].weight.requires_grad_(False)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    contributions(m, _x(), target=0, level="probability")
    neuron_contributions(m, _x(), target=0)
    assert m.training and all(mod.training for mod in m)
    assert not m[0].weight.requires_grad and m[2].weight.requires_grad
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())


def test_zero_baseline_of_bias_free_cnn_lies_in_the_closed_region():
    """No biases: at x0 = 0 every pre-activation is exactly 0 and every max-pool window ties, so x0 lies on the edge
    of every region, where the region's map gives f(0) = 0. Before, the flag compared patterns and said False."""
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(1, 3, 3, bias=False), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                      nn.Linear(3 * 4 * 4, 3, bias=False)).double().eval()
    x = torch.randn(4, 1, 10, 10, dtype=torch.float64)
    zero = torch.zeros_like(x)
    c = contributions(m, x, target=2, baseline=0.0)
    assert c.same_region.all()
    assert same_region(m, x, zero, closed=True).all() and not same_region(m, x, zero).any()
    with torch.no_grad():
        gap = m(x)[:, 2] - m(zero)[:, 2]
    torch.testing.assert_close(c.values.flatten(1).sum(1), gap, rtol=0, atol=1e-12)
    assert not same_region(m, x, -x, closed=True).all()


def test_same_region_closed_admits_units_exactly_at_their_breakpoint():
    """Hand-made nets whose baselines sit exactly on a unit's breakpoint (with biases), or strictly beyond it."""
    relu = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)).double().eval()
    clamp = nn.Sequential(nn.Linear(2, 2), nn.Hardtanh(), nn.Linear(2, 1)).double().eval()
    with torch.no_grad():
        for m in (relu, clamp):
            m[0].weight.copy_(torch.eye(2))
            m[0].bias.copy_(torch.tensor([-1.0, 0.25]))
            m[2].weight.copy_(torch.tensor([[2.0, -3.0]]))
            m[2].bias.fill_(0.5)
    x = torch.tensor([[1.5, 0.0], [1.5, 0.0]], dtype=torch.float64)  # unit 0 at 0.5: active / linear
    for m, edge, beyond in ((relu, 1.0, 0.5), (clamp, 2.0, 2.5)):  # unit 0 at 0 / at hi = 1, and past it
        x0 = torch.tensor([[edge, 0.0], [beyond, 0.0]], dtype=torch.float64)
        c = contributions(m, x, target=0, baseline=x0)
        assert c.same_region.tolist() == [True, False]
        assert not same_region(m, x, x0).any()  # the patterns differ in both
        with torch.no_grad():  # the map of x's region at x0 is f(x0) exactly on the edge, not beyond it
            err = c.offset - m(x0)[:, 0]
        assert err[0] == 0 and err[1].abs() > 0.1


def test_non_finite_and_grad_baselines():
    m, x = _net(), _x()
    with pytest.raises(ValueError, match="baseline holds 30 non-finite"):
        contributions(m, x, target=1, baseline=float("nan"))
    inf = torch.zeros(5, dtype=torch.float64)
    inf[0] = float("inf")
    with pytest.raises(ValueError, match="baseline holds 6 non-finite"):
        contributions(m, x, target=1, baseline=inf)
    bl = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    c = contributions(m, x, target=1, baseline=bl)
    assert not c.values.requires_grad and not c.offset.requires_grad


# --- s17: inputs checked before the default target runs the model; inference mode --------------------------------


def test_neuron_contributions_and_same_region_refuse_non_finite_inputs():
    """Before: neuron_contributions returned NaN contributions and same_region(NaN, NaN) answered True (two NaN
    inputs "shared a region"), where contributions refused the same inputs."""
    m, x = _net(), _x()
    nan = torch.full_like(x, float("nan"))
    with pytest.raises(ValueError, match="x holds 30 non-finite"):
        neuron_contributions(m, nan)
    with pytest.raises(ValueError, match="x holds 30 non-finite"):
        same_region(m, nan, nan)
    other = x.clone()
    other[0, 0] = float("inf")
    with pytest.raises(ValueError, match="other holds 1 non-finite"):
        same_region(m, x, other)
    with pytest.raises(ValueError, match="other must have the shape of x"):
        same_region(m, x, x[:2])


def test_inputs_are_checked_before_the_default_target_runs_the_model():
    """Before: with the default target, an integer or empty x reached the model first and gave raw torch errors
    ("mat1 and mat2 must have the same dtype", "cannot reshape tensor of 0 elements")."""
    m = _net()
    calls = []
    m.register_forward_pre_hook(lambda mod, args: calls.append(1))
    for fn in (contributions, neuron_contributions):
        with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.int64"):
            fn(m, torch.randint(0, 3, (2, 5)))
        with pytest.raises(ValueError, match="x holds no samples"):
            fn(m, torch.zeros(0, 5, dtype=torch.float64))
    assert not calls  # refused before any forward pass


def test_default_target_inside_inference_mode():
    """Before: under torch.inference_mode the default target (argmax of the output) was an inference tensor, and
    the reverse route failed with "Inference tensors cannot be saved for backward"; neuron_contributions gave
    inference tensors back."""
    m, x = _net(), _x()
    w1, b1, w2, b2, w3 = m[0].weight, m[0].bias, m[2].weight, m[2].bias, m[4].weight
    with torch.no_grad():  # by hand: the region's masks, the target row of A, the units' gradients
        h1 = x @ w1.T + b1
        d1 = (h1 > 0).double()
        h2 = (h1 * d1) @ w2.T + b2
        d2 = (h2 > 0).double()
        t = m(x).argmax(1)
        g2 = w3[t] * d2  # ∂f_t/∂(unit output of layer 2), masked: the gradient at its input
        g1 = (g2 @ w2) * d1
        a_t = g1 @ w1
    with torch.inference_mode():
        for method in ("reverse", "forward"):
            c = contributions(m, x, method=method)
            torch.testing.assert_close(c.values, a_t * x, rtol=0, atol=1e-12)
            assert torch.equal(c.target, t) and not c.target.is_inference()
        p = contributions(m, x, level="probability")
        assert torch.equal(p.target, t)
        nc = neuron_contributions(m, x)
    torch.testing.assert_close(nc["1"], h1 * g1, rtol=0, atol=1e-12)
    torch.testing.assert_close(nc["3"], h2 * g2, rtol=0, atol=1e-12)
    assert not any(v.is_inference() for v in nc.values())
