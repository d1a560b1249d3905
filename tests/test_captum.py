"""Re3 as a Captum attribution: identities with Captum's own methods, interface behaviour, model untouched."""

from __future__ import annotations

import copy
import warnings

import matplotlib
import pytest
import torch
import torch.nn as nn

matplotlib.use("Agg")
captum = pytest.importorskip("captum")

from captum.attr import (  # noqa: E402
    LRP,
    DeepLift,
    InputXGradient,
    IntegratedGradients,
    NoiseTunnel,
)
from captum.metrics import infidelity, infidelity_perturb_func_decorator, sensitivity_max  # noqa: E402
from zoo import zoo  # noqa: E402

from relu_regions import record  # noqa: E402
from relu_regions.compare import _lrp_model  # noqa: E402
from relu_regions.integrations.captum import Re3, chw_to_hwc, visualize  # noqa: E402
from relu_regions.models import LeNet, mlp  # noqa: E402


def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()],
            [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
            [sorted(vars(m).keys()) for m in model.modules()])


def _same(a, b) -> bool:
    return (a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[1:] == b[1:])


@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    return LeNet().double().eval()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.rand(6, 1, 28, 28, dtype=torch.float64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def test_equals_input_x_gradient_lenet(lenet, images):
    tgt = torch.tensor([0, 1, 2, 3, 4, 5])
    ours = Re3(lenet).attribute(images, target=tgt)
    ref = InputXGradient(lenet).attribute(images.clone().requires_grad_(True), target=tgt)
    assert ours.shape == images.shape
    assert _rel(ours, ref.detach()) <= 1e-6


def test_equals_input_x_gradient_float32_mlp():
    torch.manual_seed(2)
    m = mlp(7, [16, 16], 4).eval()
    x = torch.randn(10, 7)
    ours = Re3(m).attribute(x, target=2)
    ref = InputXGradient(m).attribute(x.clone().requires_grad_(True), target=2).detach()
    assert _rel(ours, ref) <= 1e-6


def test_delta_is_offset_and_completes_output(lenet, images):
    with torch.no_grad():  # Captum users call attribute under no_grad
        attr, delta = Re3(lenet).attribute(images, target=7, return_convergence_delta=True)
        out = lenet(images)[:, 7]
    assert delta.shape == (images.shape[0],)
    torch.testing.assert_close(attr.sum((1, 2, 3)) + delta, out, rtol=0, atol=1e-10)
    # independent: the offset is the map at 0, which is f(0) whenever 0 shares the region of x. Scaled inputs
    # s·x (s > 0) never do here, so check against the frozen net the other way: delta changes with the region only
    attr2, delta2 = Re3(lenet).attribute(images * (1 + 1e-9), target=7, return_convergence_delta=True)
    with record(lenet) as rec:
        lenet(images)
        lenet(images * (1 + 1e-9))
    ids = rec.region_ids()
    same = ids[: len(images)] == ids[len(images):]
    assert same.any()
    torch.testing.assert_close(delta2[same], delta[same], rtol=0, atol=1e-12)


def test_equals_lrp_epsilon_and_lrp_delta_is_our_offset(lenet, images):
    """LRP-ε (ε → 0) on a ReLU net is gradient × input, and Captum's LRP delta (output − Σ relevance) is the
    relevance absorbed by the biases: our region offset d."""
    before = _snapshot(lenet)
    with pytest.raises(TypeError):  # Captum's LRP has no rule for nn.Flatten
        LRP(copy.deepcopy(lenet)).attribute(images.clone().requires_grad_(True), target=3)
    lrp_model = _lrp_model(lenet, epsilon=1e-15)  # a copy with ε-rules everywhere, also on Flatten (ε → 0)
    rel, lrp_delta = LRP(lrp_model).attribute(images.clone().requires_grad_(True), target=3,
                                              return_convergence_delta=True)
    attr, delta = Re3(lenet).attribute(images, target=3, return_convergence_delta=True)
    assert _rel(attr, rel.detach()) <= 1e-6
    torch.testing.assert_close(lrp_delta.detach(), delta, rtol=1e-6, atol=1e-8)
    assert _same(before, _snapshot(lenet))
    assert not hasattr(lenet.features[0], "rule")


def _bias_free_mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 12, bias=False), nn.ReLU(), nn.Linear(12, 12, bias=False), nn.ReLU(),
                         nn.Linear(12, 3, bias=False)).double().eval()


def test_bias_free_equals_ig_and_deeplift():
    m = _bias_free_mlp()
    torch.manual_seed(4)
    x = torch.randn(8, 6, dtype=torch.float64)
    ours, delta = Re3(m).attribute(x, target=1, return_convergence_delta=True)
    ig = IntegratedGradients(m).attribute(x, target=1, n_steps=16)
    dl = DeepLift(m).attribute(x.clone().requires_grad_(True), target=1).detach()
    assert _rel(ours, ig) <= 1e-6
    assert _rel(ours, dl) <= 1e-6
    assert delta.abs().max() <= 1e-12  # no biases: the region's offset is 0


def _biased_mlp(seed, n_in, hidden, n_out):
    """A float64 MLP in eval mode with large biases (N(0, 0.25)), seeded by ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    m = mlp(n_in, hidden, n_out).double().eval()
    for mod in m:
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.bias, std=0.5)
    return m


def test_with_biases_ig_and_deeplift_differ():
    m = _biased_mlp(5, 6, [12, 12], 3)
    x = torch.randn(8, 6, dtype=torch.float64)
    ours, delta = Re3(m).attribute(x, target=1, return_convergence_delta=True)
    ig = IntegratedGradients(m).attribute(x, target=1, n_steps=64)
    dl = DeepLift(m).attribute(x.clone().requires_grad_(True), target=1).detach()
    assert _rel(ours, ig) > 1e-3
    assert _rel(ours, dl) > 1e-3
    assert delta.abs().max() > 1e-3
    # both peers are complete w.r.t. the baseline instead: Σ IG = f(x) − f(0) (up to the Riemann error)
    with torch.no_grad():
        gap = m(x)[:, 1] - m(torch.zeros_like(x))[:, 1]
    torch.testing.assert_close(ig.sum(1), gap, rtol=0, atol=1e-2)


def test_multiply_by_inputs_false_is_gradient():
    torch.manual_seed(6)
    m = mlp(5, [8], 3).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    re3 = Re3(m, multiply_by_inputs=False)
    assert re3.multiplies_by_inputs is False and Re3(m).multiplies_by_inputs is True
    assert re3.has_convergence_delta()
    a = re3.attribute(x, target=[0, 1, 2, 0])
    z = x.clone().requires_grad_(True)
    out = m(z)
    (g,) = torch.autograd.grad(out[torch.arange(4), torch.tensor([0, 1, 2, 0])].sum(), z)
    torch.testing.assert_close(a, g, rtol=1e-12, atol=1e-12)


def test_baselines_and_region_flag():
    torch.manual_seed(7)
    m = mlp(4, [10], 3).double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    near = x * (1 - 1e-7)
    with record(m) as rec:
        m(x)
        m(near)
    ids = rec.region_ids()
    in_region = ids[:5] == ids[5:]
    assert in_region.all()
    re3 = Re3(m)
    attr, delta = re3.attribute(x, baselines=near, target=2, return_convergence_delta=True)
    assert re3.same_region_.all()
    with torch.no_grad():
        gap = m(x)[:, 2] - m(near)[:, 2]
    torch.testing.assert_close(attr.sum(1), gap, rtol=1e-6, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(delta, m(near)[:, 2], rtol=1e-9, atol=1e-12)
    far = -5 * x
    with pytest.warns(UserWarning, match="another activation region"):
        re3.attribute(x, baselines=far, target=2)
    assert not re3.same_region_.all()
    with pytest.raises(ValueError, match="baselines"):
        re3.attribute(x, baselines=torch.zeros(3, 3), target=2)


def test_tuple_inputs_and_additional_args():
    torch.manual_seed(8)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 6)
            self.b = nn.Conv1d(1, 2, 2)
            self.head = nn.Sequential(nn.ReLU(), nn.Linear(6 + 2 * 4, 3))

        def forward(self, u, v, scale=1.0):
            return self.head(torch.cat([self.a(u), self.b(v).flatten(1)], 1)) * scale

    m = Two().double().eval()
    u, v = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, 5, dtype=torch.float64)
    ours = Re3(m).attribute((u, v), target=1, additional_forward_args=(2.0,))
    ref = InputXGradient(m).attribute((u.clone().requires_grad_(), v.clone().requires_grad_()), target=1,
                                      additional_forward_args=(2.0,))
    assert isinstance(ours, tuple) and len(ours) == 2
    for o, r in zip(ours, ref):
        assert o.shape == r.shape
        assert _rel(o, r.detach()) <= 1e-6
    one = Re3(m.a).attribute((u,), target=0)
    assert isinstance(one, tuple) and one[0].shape == u.shape


def test_noise_tunnel_infidelity_sensitivity(lenet, images):
    re3 = Re3(lenet)
    assert hasattr(re3.attribute, "__wrapped__")
    torch.manual_seed(0)
    nt = NoiseTunnel(re3).attribute(images[:2], target=1, nt_samples=3, stdevs=0.05)
    assert nt.shape == images[:2].shape and torch.isfinite(nt).all()
    nt_d = NoiseTunnel(re3).attribute(images[:2], target=1, nt_samples=3, stdevs=0.05, return_convergence_delta=True)
    assert torch.isfinite(nt_d[1]).all()
    attr = re3.attribute(images[:2], target=1)

    def perturb(inputs):
        noise = 0.01 * torch.randn_like(inputs)
        return noise, inputs - noise

    inf = infidelity(lenet, perturb, images[:2], attr, target=1, n_perturb_samples=3)
    sens = sensitivity_max(re3.attribute, images[:2], target=1, n_perturb_samples=2)
    assert torch.isfinite(inf).all() and torch.isfinite(sens).all()


def test_infidelity_in_region_is_zero_for_re3_not_for_ig():
    m = _biased_mlp(9, 5, [16, 16], 3)
    x = torch.randn(6, 5, dtype=torch.float64) + 0.5
    eps = 1e-5
    gen = torch.Generator().manual_seed(0)
    noises = [eps * torch.randn(x.shape, generator=gen, dtype=x.dtype) for _ in range(8)]
    # the perturbations must stay in the region of x: verify with the recorded patterns
    with record(m) as rec:
        m(x)
        for n in noises:
            m(x - n)
    ids = rec.region_ids().reshape(len(noises) + 1, -1)
    assert (ids == ids[0]).all()
    it = iter(noises * 10)

    @infidelity_perturb_func_decorator(multiply_by_inputs=True)
    def perturb(inputs):
        n = next(it)
        return inputs - n.repeat_interleave(inputs.shape[0] // x.shape[0], 0)

    re3_attr = Re3(m).attribute(x, target=0)
    ig_attr = IntegratedGradients(m).attribute(x, target=0, n_steps=50)
    inf_re3 = infidelity(m, perturb, x, re3_attr, target=0, n_perturb_samples=1)
    inf_ig = infidelity(m, perturb, x, ig_attr, target=0, n_perturb_samples=1)
    assert inf_re3.max() < 1e-20
    assert inf_ig.mean() > 1e3 * max(float(inf_re3.mean()), 1e-30)


def test_model_untouched_also_after_errors(lenet, images):
    m = copy.deepcopy(lenet).train()
    m.features[0].weight.requires_grad_(False)
    h = m.head.register_forward_hook(lambda *a: None)
    before = _snapshot(m)
    Re3(m).attribute(images[:2], target=0)
    assert _same(before, _snapshot(m))
    with pytest.raises(ValueError, match="target"):
        Re3(m).attribute(images[:2], target=12)
    with pytest.raises(ValueError, match="target=None"):
        Re3(m).attribute(images[:2])
    with pytest.raises(NotImplementedError):
        Re3(m).attribute(images[:2], target=(0, 1))
    with pytest.raises(TypeError, match="inputs"):
        Re3(m).attribute([images[:2]], target=0)
    assert _same(before, _snapshot(m))
    h.remove()


def test_scalar_output_no_target():
    torch.manual_seed(10)
    m = mlp(4, [8], 1).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    a = Re3(m).attribute(x)
    ref = InputXGradient(m).attribute(x.clone().requires_grad_(), target=0).detach()
    assert _rel(a, ref) <= 1e-6


def test_visualisation_helper(lenet, images):
    attr = Re3(lenet).attribute(images[:1], target=0)
    hwc = chw_to_hwc(attr[0])
    assert hwc.shape == (28, 28, 1)
    assert chw_to_hwc(attr).shape == (28, 28, 1)
    with pytest.raises(ValueError):
        chw_to_hwc(images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig, ax = visualize(attr[0], images[0], method="blended_heat_map", sign="all")
    assert fig is not None
    # a misspelt option is named (before, a method was silently replaced by a heat map without an image, and a sign
    # failed with a KeyError inside Captum)
    with pytest.raises(ValueError, match="method must be one of .*'heat_map'.*got 'heatmap'"):
        visualize(attr[0], method="heatmap")
    with pytest.raises(ValueError, match="sign must be one of .*'absolute_value'.*got 'abs'"):
        visualize(attr[0], images[0], sign="abs")


@pytest.mark.parametrize("name", list(zoo()))
def test_equals_input_x_gradient_on_every_zoo_model(name):
    """Captum's InputXGradient (autograd through the unmodified model) as the peer, on the engine's whole zoo:
    BatchNorm, residual and inplace adds, inplace ReLUs, three-state units, grouped / transposed convolutions and
    every kind of max-pool. The model is left as it was."""
    model, shape = zoo()[name]
    model = copy.deepcopy(model).double()
    x = torch.randn(5, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        k = model(x).reshape(len(x), -1).shape[1]
    tgt = torch.arange(len(x)) % k
    snap = _snapshot(model)
    ours = Re3(model).attribute(x, target=tgt)
    assert _same(snap, _snapshot(model))
    ref = InputXGradient(model).attribute(x.clone().requires_grad_(True), target=tgt).detach()
    assert ours.shape == x.shape and _rel(ours, ref) <= 1e-9
