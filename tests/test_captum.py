"""Re3 as a Captum attribution: identities with Captum's own methods, interface behaviour, model untouched."""

from __future__ import annotations

import copy
import warnings

import matplotlib
import numpy as np
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
    with pytest.raises(ValueError, match="tuple target needs one int index per output dimension"):
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


class _Masked(nn.Module):
    """``f(x, mask) = l2(relu(l1(x * mask)))``: a per-sample side input, Captum's usual additional_forward_args."""

    def __init__(self, n_out: int):
        super().__init__()
        self.l1, self.l2 = nn.Linear(5, 8), nn.Linear(8, n_out)

    def forward(self, x, mask):
        return self.l2(torch.relu(self.l1(x * mask)))


@pytest.mark.parametrize("b, method", [(6, "reverse"), (300, "reverse"), (6, "forward"), (600, "forward"),
                                       (6, "compose"), (6, "auto")])
def test_per_sample_forward_args_equal_input_x_gradient(b, method):
    """Tensors of additional_forward_args whose first dimension is the batch are per-sample (Captum's convention):
    each chunk of the batch (reverse: 256 samples, forward: 512) and each replica of it (forward route) gets their
    rows. Before, every internal call got the whole batch's tensors: a size error."""
    torch.manual_seed(11)
    m = _Masked(3).double().eval()
    x = torch.randn(b, 5, dtype=torch.float64)
    mask = (torch.rand(b, 5) > 0.5).double()
    tgt = torch.arange(b) % 3
    attr, delta = Re3(m, method=method).attribute(x, target=tgt, additional_forward_args=(mask,),
                                                  return_convergence_delta=True)
    ref = InputXGradient(m).attribute(x.clone().requires_grad_(), target=tgt, additional_forward_args=(mask,))
    assert _rel(attr, ref.detach()) <= 1e-9
    with torch.no_grad():
        out = m(x, mask)[torch.arange(b), tgt]
    torch.testing.assert_close(attr.sum(1) + delta, out, rtol=0, atol=1e-10)


def test_per_sample_forward_args_with_baselines_tuples_and_no_target():
    torch.manual_seed(12)
    m = _Masked(3).double().eval()
    x = torch.randn(6, 5, dtype=torch.float64)
    mask = (torch.rand(6, 5) > 0.5).double()
    x0 = x * (1 - 1e-9)  # in the region of x: the split is f(x) − f(x0)
    re3 = Re3(m)
    attr, delta = re3.attribute(x, baselines=x0, target=2, additional_forward_args=(mask,),
                                return_convergence_delta=True)
    z = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(m(z, mask)[:, 2].sum(), z)
    torch.testing.assert_close(attr, g * (x - x0), rtol=1e-9, atol=1e-15)
    with torch.no_grad():
        torch.testing.assert_close(delta, m(x0, mask)[:, 2], rtol=1e-9, atol=1e-12)
    assert re3.same_region_.all()
    # one output per sample, target=None: the probe of the output size ran x[:1] with all B rows of the mask
    s = _Masked(1).double().eval()
    ref = InputXGradient(s).attribute(x.clone().requires_grad_(), additional_forward_args=(mask,)).detach()
    assert _rel(Re3(s).attribute(x, additional_forward_args=(mask,)), ref) <= 1e-9
    # a tuple of inputs with a per-sample argument
    two = Re3(lambda u, v, k: m(torch.cat([u, v], 1), k)).attribute((x[:, :2], x[:, 2:]), target=1,
                                                                     additional_forward_args=(mask,))
    ref = InputXGradient(m).attribute(x.clone().requires_grad_(), target=1, additional_forward_args=(mask,)).detach()
    assert _rel(torch.cat(two, 1), ref) <= 1e-9


def test_per_sample_forward_arg_with_one_sample_chunks():
    """An image-sized input with 1000 classes makes the reverse route's chunk one sample. Before, the model ran on
    one sample with the whole (B, 1) scale: its output broadcast to B rows and target 5 read sample 0's row for
    every sample, silently (sample 1's attributions came out halved)."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc = nn.Conv2d(3, 4, 3, stride=4), nn.Linear(4 * 16 * 16, 1000)

        def forward(self, x, scale):
            return self.fc(torch.relu(self.c(x)).flatten(1)) * scale

    torch.manual_seed(13)
    m = Scaled().double().eval()
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    scale = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    attr, delta = Re3(m).attribute(x, target=5, additional_forward_args=(scale,), return_convergence_delta=True)
    ref = InputXGradient(m).attribute(x.clone().requires_grad_(), target=5, additional_forward_args=(scale,))
    assert _rel(attr, ref.detach()) <= 1e-9
    with torch.no_grad():
        torch.testing.assert_close(attr.sum((1, 2, 3)) + delta, m(x, scale)[:, 5], rtol=0, atol=1e-10)


def test_zero_baseline_of_bias_free_net_lies_in_the_closed_region():
    """The zero baseline of a bias-free network has every pre-activation exactly 0: on the edge of every region,
    whose map gives f(0) = 0 there. Before, the flag said False and a warning claimed the split was not
    f(x) − f(x0)."""
    m = _bias_free_mlp()
    torch.manual_seed(14)
    x = torch.randn(8, 6, dtype=torch.float64)
    re3 = Re3(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attr, delta = re3.attribute(x, baselines=0.0, target=1, return_convergence_delta=True)
    assert re3.same_region_.all()
    with torch.no_grad():
        gap = m(x)[:, 1] - m(torch.zeros_like(x))[:, 1]
    torch.testing.assert_close(attr.sum(1), gap, rtol=0, atol=1e-12)
    with pytest.warns(UserWarning, match="another activation region"):  # a baseline strictly elsewhere still warns
        re3.attribute(x, baselines=-x, target=1)
    assert not re3.same_region_.all()


def test_target_list_needs_one_entry_per_sample():
    """As Captum ("Target list length does not match output!"): a one-element list was broadcast to the batch."""
    m = _biased_mlp(15, 5, [8], 3)
    x = torch.randn(4, 5, dtype=torch.float64)
    with pytest.raises(AssertionError, match="Target list length"):
        InputXGradient(m).attribute(x.clone().requires_grad_(), target=[2])
    with pytest.raises(ValueError, match="target is a list of 1 entries for a batch of 4"):
        Re3(m).attribute(x, target=[2])
    one = Re3(m).attribute(x, target=2)  # an int (or a one-element tensor, as in Captum) is every sample's target
    assert torch.equal(Re3(m).attribute(x, target=torch.tensor([2])), one)
    assert torch.equal(Re3(m).attribute(x, target=[2] * 4), one)


def test_non_finite_baselines_refused():
    m = _biased_mlp(16, 5, [8], 3)
    x = torch.randn(4, 5, dtype=torch.float64)
    for bl in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"^baselines holds 20 non-finite"):
            Re3(m).attribute(x, baselines=bl, target=1)
    bad = torch.zeros(5, dtype=torch.float64)
    bad[2] = float("nan")
    with pytest.raises(ValueError, match=r"^baselines\[1\] holds 4 non-finite"):
        Re3(lambda u, v: m(torch.cat([u, v], 1))).attribute((x[:, :2], x[:, 2:]), baselines=(0.0, bad[2:]),
                                                            target=1)


def test_errors_name_the_arguments_as_passed():
    m = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3), nn.Softmax(1)).double().eval()
    x = torch.randn(4, 5, dtype=torch.float64)
    # a module path needs the module: a plain callable gave "not a submodule; known paths: " (an empty list)
    with pytest.raises(ValueError, match="logits_at='2' is a module path, so forward_func must be an nn.Module"):
        Re3(lambda z: m(z), logits_at="2")
    torch.testing.assert_close(Re3(m.forward, logits_at="2").attribute(x, target=1),
                               Re3(m, logits_at="2").attribute(x, target=1), rtol=0, atol=0)
    # Re3 checked the joined flat tensor and called it "x"
    f = Re3(lambda *a: m[:3](a[0]))
    with pytest.raises(TypeError, match=r"^inputs must be a floating-point tensor, got torch.int64"):
        f.attribute(x.long(), target=1)
    with pytest.raises(TypeError, match=r"^inputs\[1\] must be a floating-point tensor"):
        f.attribute((x, x.long()), target=1)
    with pytest.raises(ValueError, match=r"^inputs\[1\] holds 20 non-finite"):
        f.attribute((x, x * float("nan")), target=1)


def test_one_dimensional_inputs_and_grad_baselines():
    class OneFeature(nn.Module):
        def __init__(self):
            super().__init__()
            self.l, self.o = nn.Linear(1, 6), nn.Linear(6, 3)

        def forward(self, a):
            return self.o(torch.relu(self.l(a[:, None])))

    torch.manual_seed(17)
    m = OneFeature().double().eval()
    a = torch.randn(4, dtype=torch.float64)
    ours = Re3(m).attribute(a, target=1)  # B samples of one feature, as InputXGradient takes them (was refused)
    ref = InputXGradient(m).attribute(a.clone().requires_grad_(), target=1).detach()
    assert ours.shape == (4,) and _rel(ours, ref) <= 1e-12
    # a baseline that requires grad is detached like the inputs (the attributions carried a graph into it)
    m2 = _biased_mlp(18, 5, [4], 2)
    bl = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    attr, delta = Re3(m2).attribute(torch.randn(3, 5, dtype=torch.float64), baselines=bl, target=0,
                                    return_convergence_delta=True)
    assert not attr.requires_grad and not delta.requires_grad


# --- s17: targets made in inference mode, targets of >2-D outputs, baseline messages --------------------------------


def test_inference_mode_calls_and_targets():
    """Before: a target made under torch.inference_mode (an eval loop's argmax) failed in the reverse route with
    "Inference tensors cannot be saved for backward"; also with per-sample additional_forward_args."""
    torch.manual_seed(21)
    plain = _biased_mlp(21, 5, [8], 3)
    m = _Masked(3).double().eval()
    x = torch.randn(5, 5, dtype=torch.float64)
    mask = (torch.rand(5, 5) > 0.3).double()
    with torch.inference_mode():
        tgt = plain(x).argmax(1)
        tgt_masked = m(x, mask).argmax(1)
    ref = InputXGradient(plain).attribute(x.clone().requires_grad_(), target=tgt.clone()).detach()
    ref_masked = InputXGradient(m).attribute(x.clone().requires_grad_(), target=tgt_masked.clone(),
                                             additional_forward_args=(mask,)).detach()
    with torch.inference_mode():
        for method in ("reverse", "forward"):
            assert _rel(Re3(plain, method=method).attribute(x, target=tgt), ref) <= 1e-12
            ours = Re3(m, method=method).attribute(x, target=tgt_masked, additional_forward_args=(mask,))
            assert _rel(ours, ref_masked) <= 1e-12


class _Grid(nn.Module):
    """A ``(B, *shape)`` output."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = shape
        self.l = nn.Linear(3, int(torch.Size(shape).numel()))

    def forward(self, x):
        return torch.relu(self.l(x)).reshape(-1, *self.shape)


def test_targets_of_outputs_with_more_than_two_dims():
    """Before: Re3(target=1) on a (B, 2, 3) output silently explained the flattened index (out[:, 0, 1]) where
    Captum refuses the call (its int target selects out[:, 1], a whole row)."""
    torch.manual_seed(22)
    x = torch.rand(2, 3, dtype=torch.float64)
    m = _Grid((2, 3)).double().eval()
    for target in (1, [0, 1], torch.tensor([1, 0])):
        with pytest.raises(ValueError, match=r"needs a \(B, K\) output, but the explained output has shape "
                                             r"\(B, 2, 3\)"):
            Re3(m).attribute(x, target=target)
    with pytest.raises(AssertionError):  # Captum's own refusal of the same call
        InputXGradient(m).attribute(x.clone().requires_grad_(), target=1)
    # trailing dims of size 1 leave one entry per index: taken, as Captum takes it
    m1 = _Grid((3, 1)).double().eval()
    ref = InputXGradient(m1).attribute(x.clone().requires_grad_(), target=2).detach()
    assert _rel(Re3(m1).attribute(x, target=2), ref) <= 1e-12


def test_a_single_baselines_tensor_is_named_as_passed():
    """Before: a mis-shaped single baselines tensor was reported as "baselines[0] ... input 0", names the user
    never wrote."""
    m = nn.Linear(3, 2).double()
    x = torch.rand(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^baselines of shape \(4,\) does not match inputs of shape \(2, 3\)"):
        Re3(m).attribute(x, target=0, baselines=torch.zeros(4))
    f = Re3(lambda u, v: m(torch.cat([u, v], 1)))
    with pytest.raises(ValueError, match=r"^baselines\[1\] of shape \(4,\) does not match inputs\[1\] of shape "
                                         r"\(2, 1\)"):
        f.attribute((x[:, :2], x[:, 2:]), target=0, baselines=(0.0, torch.zeros(4)))


def test_captum_target_forms_negative_tuple_and_internal_batch_size():
    """Before: target=-1 and tuple targets (which Captum takes as output[:, -1] / output[(slice(None), *t)]) and
    IntegratedGradients' internal_batch_size were refused."""
    torch.manual_seed(23)
    x = torch.rand(4, 3, dtype=torch.float64)
    grid = _Grid((2, 3)).double().eval()
    for t in ((1, 2), (-1, 0), (0, -3)):
        ref = InputXGradient(grid).attribute(x.clone().requires_grad_(), target=t).detach()
        assert _rel(Re3(grid).attribute(x, target=t), ref) <= 1e-12
    m = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4)).double().eval()
    for t in (-1, -4, (2,), (-2,)):
        ref = InputXGradient(m).attribute(x.clone().requires_grad_(), target=t).detach()
        assert _rel(Re3(m).attribute(x, target=t), ref) <= 1e-12
    with pytest.raises(ValueError, match=r"target indices must lie in \[0, 4\)"):
        Re3(m).attribute(x, target=-5)
    with pytest.raises(ValueError, match=r"target=\(4,\) lies outside"):
        Re3(m).attribute(x, target=(4,))
    with pytest.raises(ValueError, match="one int index per output dimension"):
        Re3(grid).attribute(x, target=(1,))
    whole, delta = Re3(m).attribute(x, target=1, return_convergence_delta=True)
    for size in (1, 3):
        a, d = Re3(m).attribute(x, target=1, return_convergence_delta=True, internal_batch_size=size)
        assert torch.equal(a, whole) and torch.equal(d, delta)
    with pytest.raises(ValueError, match="internal_batch_size must be a positive int"):
        Re3(m).attribute(x, target=1, internal_batch_size=0)


def test_float64_inputs_to_a_float32_model():
    """Before: a float32 model that casts its inputs (x.float(), for numpy data) failed the exactness check with
    float64 inputs ("not piecewise linear ... please report"): the tolerance followed the inputs' dtype."""

    class Cast(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))

        def forward(self, x):
            return self.net(x.float())

    torch.manual_seed(24)
    m = Cast().eval()
    x = torch.randn(64, 6, dtype=torch.float64) * 30
    ours = Re3(m).attribute(x, target=1)
    ref64 = copy.deepcopy(m.net).double()
    jac = torch.func.vmap(torch.func.jacrev(lambda v: ref64(v[None])[0]))(x)[:, 1]  # float64 route
    assert ours.dtype == torch.float64 and _rel(ours, jac * x) <= 1e-5
    # a tuple of a float32 and a float64 input is joined as float64: the same
    f = Re3(lambda u, v: m(torch.cat([u.double(), v], 1)))
    a, b = f.attribute((x[:, :2].float(), x[:, 2:]), target=1)
    assert _rel(torch.cat([a.double(), b], 1), jac * x) <= 1e-5


def test_compute_convergence_delta_is_the_delta_attribute_returns():
    """Before: compute_convergence_delta (inherited) gave Captum's completeness error, attribute's delta the region's
    value at the baseline: two meanings on one object. Now both give the latter, and Captum's completeness error is
    f(x0)[t] − delta (checked against IntegratedGradients' with x0 in x's region)."""
    torch.manual_seed(25)
    m = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).double().eval()
    x = torch.rand(5, 4, dtype=torch.float64) + 0.5
    x0 = x * 0.999  # (nearly surely in x's region: checked below)
    re3 = Re3(m)
    a, delta = re3.attribute(x, baselines=x0, target=2, return_convergence_delta=True)
    assert bool(re3.same_region_.all())
    assert torch.allclose(re3.compute_convergence_delta(a, x0, x, target=2), delta, rtol=0, atol=1e-12)
    with torch.no_grad():
        fx, fx0 = m(x)[:, 2], m(x0)[:, 2]
    assert torch.allclose(a.sum(1) + delta, fx, rtol=0, atol=1e-12)  # Re3's definition
    ig, ig_delta = IntegratedGradients(m).attribute(x, baselines=x0, target=2, return_convergence_delta=True)
    assert torch.allclose(fx0 - delta, ig_delta, rtol=0, atol=1e-9)  # Captum's completeness error, both ~0
    # tuples of inputs with additional arguments
    g = Re3(lambda u, v, s: m(torch.cat([u, v], 1)) * s)
    parts, d2 = g.attribute((x[:, :1], x[:, 1:]), target=0, additional_forward_args=(2.0,),
                            return_convergence_delta=True)
    assert torch.allclose(g.compute_convergence_delta(parts, None, (x[:, :1], x[:, 1:]), target=0,
                                                      additional_forward_args=(2.0,)), d2, rtol=0, atol=1e-12)


def test_engine_options_and_messages_through_re3():
    """Before: errors raised through Re3 said "pass strict=False" / "pass check=False", which Re3 did not take, and
    named its private wrapper ('_Joined')."""
    torch.manual_seed(26)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2)).train()
    x = torch.rand(3, 4)
    with pytest.raises(Exception, match=r"module '<root>' \(the forward_func given to Re3, its inputs joined\) "
                                        r"calls 'dropout'.*strict=False"):
        Re3(lambda t: net(t)).attribute(x, target=0)
    a = Re3(lambda t: net(t), strict=False, check=False).attribute(x, target=0)
    assert a.shape == x.shape and torch.isfinite(a).all()
    with warnings.catch_warnings():  # (dropout draws differ per pass: the baseline's region check may warn)
        warnings.simplefilter("ignore")
        a = Re3(lambda t: net(t), strict=False, check=False).attribute(x, target=0, baselines=0.1)
    assert a.shape == x.shape
    assert net.training  # the user's flag as it was


def test_region_warning_points_at_the_callers_line():
    m = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).double().eval()
    x = torch.rand(4, 3, dtype=torch.float64) + 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Re3(m).attribute(x, baselines=-x, target=0)
    files = {w.filename for w in caught if "another activation region" in str(w.message)}
    assert files == {__file__}


def test_chw_to_hwc_takes_low_precision_tensors():
    img = torch.rand(3, 5, 4)
    for dt in (torch.bfloat16, torch.float16):
        out = chw_to_hwc(img.to(dt))
        assert out.shape == (5, 4, 3) and out.dtype == np.float32
        assert np.array_equal(out, img.to(dt).float().permute(1, 2, 0).numpy())
