"""Spectrally normalised convolutions and the convolutional i-DenseNet G: norms, adjoints, Jacobians, gradients."""

import pytest
import torch
import torch.nn.functional as F

from monoflow_core.nn import ConvDenseNetG, DenseNetG, SpectralConv2d, SpectralLinear, spectral_layers, update_lipschitz
from monoflow_core.nn.conv import EXACT_CONV_MAX_NUMEL, conv_operator_matrix

DT = torch.float64


def dense_norm(weight, shape):
    """Spectral norm of the convolution operator, from its dense matrix."""
    return float(torch.linalg.matrix_norm(conv_operator_matrix(weight.detach(), shape), ord=2))


def sig(layer):
    return float(layer.sigma().detach())


def scaled_layer(c_in, c_out, k, shape, coeff, mode, scale=10.0, seed=0):
    torch.manual_seed(seed)
    layer = SpectralConv2d(c_in, c_out, k, shape, coeff=coeff, mode=mode).double()
    with torch.no_grad():
        layer.weight.mul_(scale)  # far above the bound, so the normalisation is active
    return layer


def per_sample_jacobian(fn, x):
    """Autograd reference: J[b] = d fn(x)[b] / d x[b] over flattened events, from the full batch Jacobian."""
    b = x.shape[0]
    full = torch.autograd.functional.jacobian(fn, x, vectorize=True)
    full = full.reshape(b, -1, b, x[0].numel())
    return torch.stack([full[i, :, i] for i in range(b)])


# --- SpectralConv2d ------------------------------------------------------------------------------------------------


def test_operator_matrix_applies_the_convolution():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3, dtype=DT)
    x = torch.randn(2, 3, 5, 4, dtype=DT)
    m = conv_operator_matrix(w, (5, 4))
    assert m.shape == (4 * 20, 3 * 20)
    assert torch.allclose(x.flatten(1) @ m.t(), F.conv2d(x, w, padding=1).flatten(1), atol=1e-12)


@pytest.mark.parametrize(("c_in", "c_out", "k"), [(3, 5, 3), (6, 2, 3), (4, 4, 1)])
def test_exact_mode_bounds_the_operator_norm(c_in, c_out, k):
    layer = scaled_layer(c_in, c_out, k, (4, 5), coeff=0.7, mode="exact")
    assert layer.mode == "exact"
    # sigma is the norm of the whole operator (not of the reshaped kernel), from either Gram side.
    assert sig(layer) == pytest.approx(dense_norm(layer.weight, (4, 5)), rel=1e-10)
    norm = dense_norm(layer.normalized_weight(), (4, 5))
    assert norm <= 0.7 + 1e-6
    assert norm == pytest.approx(0.7, rel=1e-8)


def test_small_kernel_is_left_alone():
    layer = SpectralConv2d(2, 2, 3, (3, 3), coeff=0.9, mode="exact").double()
    with torch.no_grad():
        layer.weight.mul_(1e-3)
    assert torch.equal(layer.normalized_weight(), layer.weight)


def spectral_gap(layer):
    """s2 / s1 of the layer's operator: power iteration's error shrinks like (s2 / s1)^(2 k)."""
    s = torch.linalg.svdvals(conv_operator_matrix(layer.weight.detach(), layer.input_shape))
    return float(s[1] / s[0])


def test_power_mode_converges_to_the_operator_norm():
    # Random kernels on small images often have near-degenerate top singular values (s2 / s1 > 0.99 for most
    # seeds at this size), where 200 iterations leave up to ~1e-3 of error; this seed has a clear gap.
    layer = scaled_layer(3, 5, 3, (4, 5), coeff=0.7, mode="power", seed=3)
    assert spectral_gap(layer) < 0.95
    exact = dense_norm(layer.weight, (4, 5))
    assert layer.power_iteration(1) == 1
    assert sig(layer) <= exact * (1 + 1e-12)  # power iteration converges from below
    assert layer.power_iteration(200) == 200
    assert sig(layer) == pytest.approx(exact, rel=1e-3)
    assert dense_norm(layer.normalized_weight(), (4, 5)) <= 0.7 * (1 + 1e-3)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_transpose_convolution_is_the_adjoint(k):
    torch.manual_seed(k)
    w = torch.randn(4, 3, k, k, dtype=DT)
    a = torch.randn(1, 3, 5, 6, dtype=DT)
    b = torch.randn(1, 4, 5, 6, dtype=DT)
    lhs = torch.sum(F.conv2d(a, w, padding=k // 2) * b)
    rhs = torch.sum(a * F.conv_transpose2d(b, w, padding=k // 2))
    assert float(lhs) == pytest.approx(float(rhs), rel=1e-12)


def test_tolerance_stops_power_iteration_early():
    layer = scaled_layer(3, 5, 3, (4, 5), coeff=0.7, mode="power", seed=3)
    first = layer.power_iteration(1000, tol=1e-8)
    assert 1 <= first < 1000
    assert sig(layer) == pytest.approx(dense_norm(layer.weight, (4, 5)), rel=1e-6)
    # Converged vectors stop after (at most) a couple of iterations.
    assert layer.power_iteration(1000, tol=1e-6) <= 2
    assert layer.power_iteration(7) == 7


def test_spectral_linear_power_iteration_honours_tol():
    torch.manual_seed(3)
    layer = SpectralLinear(30, 30, coeff=1.0, mode="power").double()
    exact = float(torch.linalg.matrix_norm(layer.weight.detach(), ord=2))
    assert layer.power_iteration(5) == 5
    done = layer.power_iteration(2000, tol=1e-10)
    assert done < 2000
    assert sig(layer) == pytest.approx(exact, rel=1e-6)


def test_forward_is_conv2d_with_the_normalised_weight():
    layer = scaled_layer(2, 3, 3, (4, 4), coeff=0.8, mode="exact")
    x = torch.randn(5, 2, 4, 4, dtype=DT)
    expected = F.conv2d(x, layer.normalized_weight(), layer.bias, padding=1)
    assert torch.allclose(layer(x), expected, atol=1e-14)
    with pytest.raises(ValueError, match=r"\(batch, 2, 4, 4\)"):
        layer(torch.randn(5, 2, 5, 4, dtype=DT))


@pytest.mark.parametrize("mode", ["exact", "power"])
def test_gradient_flows_through_sigma(mode):
    layer = scaled_layer(2, 3, 3, (3, 3), coeff=0.5, mode=mode, scale=5.0)
    if mode == "power":
        layer.power_iteration(50)
    assert sig(layer) > 0.5  # the clamp is active, so sigma shapes the output
    x = torch.randn(2, 2, 3, 3, dtype=DT)

    def apply(w):
        return torch.func.functional_call(layer, {"weight": w}, (x,))

    assert torch.autograd.gradcheck(apply, (layer.weight.detach().clone().requires_grad_(),))


def test_modes_input_shape_and_checkpointed_vectors():
    small = SpectralConv2d(2, 4, 3, (4, 4))  # 64 x 32 operator
    big = SpectralConv2d(16, 16, 3, (8, 8))
    assert small.operator_numel <= EXACT_CONV_MAX_NUMEL and small.mode == "exact"
    assert big.operator_numel > EXACT_CONV_MAX_NUMEL and big.mode == "power"
    assert big.u.shape == (16, 8, 8) and big.v.shape == (16, 8, 8)
    state = big.state_dict()
    assert {"weight", "bias", "u", "v"} <= set(state)
    big.set_input_shape(2, 3)
    assert big.input_shape == (2, 3) and big.mode == "exact"
    assert big.u.shape == (16, 2, 3) and "u" in big.state_dict()
    assert big(torch.randn(1, 16, 2, 3)).shape == (1, 16, 2, 3)
    with pytest.raises(ValueError, match="odd"):
        SpectralConv2d(1, 1, 2, (4, 4))
    with pytest.raises(ValueError, match="mode"):
        SpectralConv2d(1, 1, 3, (4, 4), mode="svd")


def test_update_lipschitz_reaches_conv_layers():
    torch.manual_seed(3)
    power = SpectralConv2d(2, 3, 3, (4, 4), mode="power")
    exact = SpectralConv2d(2, 3, 3, (4, 4), mode="exact")
    model = torch.nn.ModuleList([power, exact, SpectralLinear(3, 3, mode="power")])
    assert list(spectral_layers(model)) == [power, exact, model[2]]
    before = {name: buf.clone() for name, buf in model.named_buffers()}
    update_lipschitz(model, 3)
    assert not torch.equal(power.u, before["0.u"]) and not torch.equal(power.v, before["0.v"])
    assert torch.equal(exact.u, before["1.u"]) and torch.equal(exact.v, before["1.v"])
    assert not torch.equal(model[2].u, before["2.u"])
    update_lipschitz(model, 3, include_exact=True)
    assert not torch.equal(exact.u, before["1.u"])
    update_lipschitz(model, 2000, tol=1e-9)
    assert sig(power) == pytest.approx(dense_norm(power.weight, (4, 4)), rel=1e-4)


# --- ConvDenseNetG -------------------------------------------------------------------------------------------------


def make_g(activation="cpila", mode="exact", c=2, shape=(4, 4), seed=0, **kw):
    torch.manual_seed(seed)
    g = ConvDenseNetG(c, shape, depth=3, growth=8, activation=activation, spectral_mode=mode, **kw).double()
    with torch.no_grad():
        g.concat_k.uniform_(-1.0, 2.0)  # unequal etas, so the folded concatenation factors are exercised
    return g


def test_conv_densenet_structure():
    g = ConvDenseNetG(3, (4, 4), depth=3, growth=8)
    assert g.in_features == 48 and g.in_channels == 3 and g.input_shape == (4, 4)
    assert [layer.in_channels for layer in g.layers] + [g.final.in_channels] == [3, 11, 19, 27]
    assert [layer.out_channels for layer in g.layers] + [g.final.out_channels] == [4, 4, 4, 3]
    assert torch.allclose(torch.linalg.vector_norm(g.mix_coefficients(), dim=1), torch.full((3,), 0.98))
    assert g.lipschitz_bound() == pytest.approx(0.9 * 0.98**3)
    g.set_concat_learnable(False)
    assert not g.concat_k.requires_grad
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(g(x), g.evaluate(x, g.prepare()))
    assert g(x).shape == (2, 3, 4, 4)
    for bad in (torch.randn(2, 3, 4, 5), torch.randn(2, 47), torch.randn(3, 4, 4)):
        with pytest.raises(ValueError, match=r"\(batch, 3, 4, 4\)"):
            g(bad)


@pytest.mark.parametrize("activation", ["cpila", "clipswish", "lipswish"])
def test_tangent_jacobian_matches_autograd(activation):
    g = make_g(activation)
    x = torch.randn(3, 2, 4, 4, dtype=DT)
    prepared = g.prepare()
    value, jac = g.evaluate_with_jacobian(x, prepared)
    assert value.shape == (3, 2, 4, 4) and jac.shape == (3, 32, 32)
    assert torch.allclose(value, g.evaluate(x, prepared), atol=1e-14)
    ref = per_sample_jacobian(lambda z: g.evaluate(z, prepared), x)
    assert torch.allclose(jac, ref, atol=1e-13)
    # Chunks of tangent directions and flattened events give the same answer.
    flat_value, chunked = g.evaluate_with_jacobian(x.flatten(1), prepared, chunk=5)
    assert flat_value.shape == (3, 32)
    assert torch.allclose(flat_value, value.flatten(1), atol=1e-14)
    assert torch.allclose(chunked, ref, atol=1e-13)
    # flattened events are (C, H, W)-ordered in evaluate too, as in evaluate_with_jacobian
    assert torch.allclose(g.evaluate(x.flatten(1), prepared), value.flatten(1), atol=1e-14)


def test_one_by_one_final_kernel_and_power_mode():
    g = make_g(mode="power", c=3, shape=(2, 3), final_kernel=1)
    update_lipschitz(g, 20)
    x = torch.randn(2, 3, 2, 3, dtype=DT)
    prepared = g.prepare()
    value, jac = g.evaluate_with_jacobian(x, prepared, chunk=4)
    assert torch.allclose(value, g.evaluate(x, prepared), atol=1e-14)
    assert torch.allclose(jac, per_sample_jacobian(lambda z: g.evaluate(z, prepared), x), atol=1e-13)


def test_lipschitz_bound_holds_empirically():
    torch.manual_seed(1)
    g = ConvDenseNetG(2, (4, 4), depth=3, growth=8, spectral_mode="exact").double()
    bound = g.lipschitz_bound()
    opt = torch.optim.Adam(g.parameters(), lr=0.1)
    for step in range(10):
        # Ascend the Jacobian norm, so that the network presses against its bound.
        x = torch.randn(4, 2, 4, 4, dtype=DT) * 2
        _, jac = g.evaluate_with_jacobian(x, g.prepare())
        norms = torch.linalg.matrix_norm(jac, ord=2)
        assert float(norms.detach().max()) <= bound + 1e-9, f"step {step}"
        opt.zero_grad()
        (-norms.sum()).backward()
        opt.step()
    with torch.no_grad():
        prepared = g.prepare()
        for weight in prepared.weights:
            assert dense_norm(weight, (4, 4)) <= 0.9 + 1e-9
        x = torch.randn(32, 2, 4, 4, dtype=DT) * 2
        norms = torch.linalg.matrix_norm(g.evaluate_with_jacobian(x, prepared)[1], ord=2)
        assert float(norms.max()) <= bound + 1e-9
        assert float(norms.max()) > 0.6 * bound  # the check is not vacuous
        a = torch.randn(256, 2, 4, 4, dtype=DT) * 2
        b = a + torch.randn_like(a) * torch.rand(256, 1, 1, 1, dtype=DT)
        ratio = (g(a) - g(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    assert float(ratio.max()) <= bound + 1e-9


@pytest.mark.parametrize("mode", ["exact", "power"])
def test_logdet_gradient_matches_autograd_jacobian(mode):
    g = make_g("clipswish", mode=mode, seed=2)
    with torch.no_grad():
        for conv in spectral_layers(g):
            conv.weight.mul_(5)  # make the sigma path of the normalisation active
    update_lipschitz(g, 10)
    params = [p for p in g.parameters() if p.requires_grad]
    x = torch.randn(2, 2, 4, 4, dtype=DT)
    eye = torch.eye(32, dtype=DT)

    def loss_tangent():
        value, jac = g.evaluate_with_jacobian(x, g.prepare())
        return torch.linalg.slogdet(eye + jac)[1].sum() + value.square().sum()

    def loss_autograd():
        prepared = g.prepare()
        value = g.evaluate(x, prepared)
        jac = torch.stack(
            [
                torch.autograd.functional.jacobian(
                    lambda z: g.evaluate(z.unsqueeze(0), prepared)[0], x[i], create_graph=True
                ).reshape(32, 32)
                for i in range(x.shape[0])
            ]
        )
        return torch.linalg.slogdet(eye + jac)[1].sum() + value.square().sum()

    mine = torch.autograd.grad(loss_tangent(), params)
    ref = torch.autograd.grad(loss_autograd(), params)
    for p, a, b in zip(params, mine, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11), p.shape


def test_matches_dense_densenet_on_one_pixel():
    """On 1x1 images with 1x1 kernels, the convolutional G is the fully connected DenseNetG."""
    torch.manual_seed(0)
    conv = ConvDenseNetG(3, (1, 1), depth=2, growth=8, kernel_size=1, final_kernel=1, spectral_mode="exact").double()
    dense = DenseNetG(3, depth=2, growth=8, spectral_mode="exact").double()
    with torch.no_grad():
        for c, d in zip([*conv.layers, conv.final], [*dense.layers, dense.final], strict=True):
            d.weight.copy_(c.weight[:, :, 0, 0])
            d.bias.copy_(c.bias)
        conv.concat_k.uniform_(-1.0, 2.0)
        dense.concat_k.copy_(conv.concat_k)
    x = torch.randn(5, 3, dtype=DT)
    value, jac = conv.evaluate_with_jacobian(x, conv.prepare())
    ref_value, ref_jac = dense.evaluate_with_jacobian(x, dense.prepare())
    assert torch.allclose(value, ref_value, atol=1e-14)
    assert torch.allclose(jac, ref_jac, atol=1e-14)
