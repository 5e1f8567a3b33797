"""Bad inputs to the library get a clear error naming what was expected, before any kernel runs.

Covers the flows' entry points (``forward``, ``inverse``, ``log_prob``, ``sample`` of the vector flow and the
multiscale image flow, and the image flow's ``log_prob_bound`` / ``bpd``), the power-series estimator's roulette
parameter and the nesting depth of preset files.
"""

import json
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from monoflow_core import FlowConfig, build_flow
from monoflow_core.logdet import MAX_MEAN_EXTRA_TERMS, EstimatorSettings, power_series_logdet
from monoflow_core.multiscale import MultiscaleFlow
from monoflow_core.presets import MAX_PRESET_DEPTH, list_presets, load_preset

torch.set_num_threads(1)


class CountOps(TorchDispatchMode):
    """Counts the tensor operators dispatched while active (the input checks must run none)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def flow():
    torch.manual_seed(0)
    return build_flow(FlowConfig(blocks=2, growth=8)).eval()


@pytest.fixture(scope="module")
def image_flow():
    torch.manual_seed(0)
    config = FlowConfig(
        image_shape=[1, 4, 4],
        blocks_per_scale=[1],
        fc_blocks=0,
        depth=1,
        growth=2,
        levels=5,
        spectral_norm="exact",
        logdet="exact",
    )
    model = build_flow(config).to(torch.float64).eval()
    assert isinstance(model, MultiscaleFlow)
    return model


def call(flow, method, x):
    with torch.no_grad():
        return getattr(flow, method)(x)


# -- the vector flow ----------------------------------------------------------------------------------------

ENTRY_POINTS = ("forward", "inverse", "log_prob")


@pytest.mark.parametrize("method", ENTRY_POINTS)
@pytest.mark.parametrize(
    ("make", "error", "got"),
    [
        (lambda: torch.zeros(4, 2, dtype=torch.float64), TypeError, "got float64"),
        (lambda: torch.zeros(4, 2, dtype=torch.float16), TypeError, "got float16"),
        (lambda: torch.zeros(4, 2, dtype=torch.bfloat16), TypeError, "got bfloat16"),
        (lambda: torch.zeros(4, 2, dtype=torch.int64), TypeError, "got int64"),
        (lambda: torch.zeros(4, 2, dtype=torch.complex64), TypeError, "got complex64"),
        (lambda: [[0.0, 1.0], [1.0, 2.0]], TypeError, "got list"),
        (lambda: np.zeros((4, 2), dtype=np.float32), TypeError, "got ndarray"),
        (lambda: None, TypeError, "got NoneType"),
        (lambda: torch.zeros(2), ValueError, r"got shape \(2,\)"),
        (lambda: torch.zeros(()), ValueError, r"got shape \(\)"),
        (lambda: torch.zeros(4, 3), ValueError, r"got shape \(4, 3\)"),
        (lambda: torch.zeros(4, 2, 1), ValueError, r"got shape \(4, 2, 1\)"),
        (lambda: torch.zeros(4, 2, device="meta"), ValueError, "got a tensor on meta"),
    ],
)
def test_flow_entry_points_reject_bad_inputs_naming_what_they_expected(flow, method, make, error, got):
    x = make()
    expected = rf"^Flow\.{method}: expected a torch\.Tensor of dtype float32 on cpu with shape \(N, 2\), {got}"
    with CountOps() as ops, pytest.raises(error, match=expected):
        call(flow, method, x)
    assert ops.ops == []  # refused before any kernel ran


def test_the_check_itself_runs_no_tensor_operator(flow):
    x = torch.randn(5, 2)
    with CountOps() as ops:
        flow._check(x, "forward")
    assert ops.ops == []
    with CountOps() as ops:  # (and the counter does see a real pass)
        call(flow, "log_prob", x)
    assert ops.ops


def test_good_inputs_still_pass(flow):
    x = torch.randn(6, 2)
    logp = call(flow, "log_prob", x)
    assert logp.shape == (6,) and torch.isfinite(logp).all()
    torch.testing.assert_close(call(flow, "inverse", call(flow, "forward", x)[0]), x, rtol=0, atol=1e-4)
    empty = call(flow, "log_prob", torch.zeros(0, 2))
    assert empty.shape == (0,)


def test_a_float64_flow_names_float64_and_how_to_convert():
    flow64 = build_flow(FlowConfig(blocks=1, growth=4)).to(torch.float64)
    hint = r"dtype float64 .*got float32 \(convert the input with x\.to\(torch\.float64\)"
    with pytest.raises(TypeError, match=hint):
        flow64.log_prob(torch.zeros(3, 2))
    assert flow64.log_prob(torch.zeros(3, 2, dtype=torch.float64)).dtype == torch.float64


def test_a_half_precision_flow_is_refused_clearly():
    half = build_flow(FlowConfig(blocks=1, growth=4)).half()
    with pytest.raises(TypeError, match=r"Flow\.log_prob: the flow's dtype float16 is not supported"):
        half.log_prob(torch.zeros(3, 2, dtype=torch.float16))
    with pytest.raises(TypeError, match="float16 is not supported"):
        half.sample(3)


@pytest.mark.parametrize(
    ("n", "error", "match"),
    [
        (-1, ValueError, "n must be >= 0, got -1"),
        (2.5, TypeError, "n must be an integer, got float"),
        (2.0, TypeError, "n must be an integer, got float"),
        (True, TypeError, "n must be an integer, got bool"),
        ("3", TypeError, "n must be an integer, got str"),
        (None, TypeError, "n must be an integer, got NoneType"),
        (10**20, ValueError, "n = 10{20} samples of 2 values exceed the largest tensor"),
        (2**62, ValueError, ".* exceed the largest tensor"),  # fits int64, but not its bytes
    ],
)
def test_sample_rejects_bad_n(flow, n, error, match):
    with pytest.raises(error, match=r"^Flow\.sample: " + match):
        flow.sample(n)


@pytest.mark.parametrize(
    ("temperature", "error"),
    [
        (0.0, ValueError),
        (-1.0, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        ("1", TypeError),
        (True, TypeError),
    ],
)
def test_sample_rejects_bad_temperatures(flow, temperature, error):
    with pytest.raises(error, match="temperature"):
        flow.sample(2, temperature=temperature)


def test_sample_takes_any_integer_n(flow):
    assert flow.sample(0).shape == (0, 2)
    assert flow.sample(np.int64(3)).shape == (3, 2)
    assert flow.sample(2, temperature=np.float32(0.5)).shape == (2, 2)


# -- the multiscale image flow ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "make", "error", "match"),
    [
        ("forward", lambda: torch.rand(2, 1, 4, 4), TypeError, r"dtype float64 .*\(N, 1, 4, 4\), got float32"),
        ("forward", lambda: torch.rand(2, 16, dtype=torch.float64), ValueError, r"got shape \(2, 16\)"),
        ("log_prob", lambda: torch.rand(2, 1, 4, 4).tolist(), TypeError, "got list"),
        (
            "inverse",
            lambda: torch.randn(2, 17, dtype=torch.float64),
            ValueError,
            r"shape \(N, 16\) or \(N, 1, 4, 4\) \(16 dimensions per sample\), got shape \(2, 17\)",
        ),
        ("inverse", lambda: torch.randn(2, 4, 2, 2, dtype=torch.float64), ValueError, r"got shape \(2, 4, 2, 2\)"),
        ("inverse", lambda: torch.randn(2, 16, dtype=torch.bfloat16), TypeError, "got bfloat16"),
        ("inverse", lambda: torch.randn(2, 16, dtype=torch.float64, device="meta"), ValueError, "on meta"),
    ],
)
def test_image_flow_entry_points_reject_bad_inputs(image_flow, method, make, error, match):
    x = make()
    with CountOps() as ops, pytest.raises(error, match=rf"^MultiscaleFlow\.{method}: .*{match}"):
        call(image_flow, method, x)
    assert ops.ops == []


def test_image_flow_inverse_takes_both_layouts_and_samples(image_flow):
    z = torch.randn(3, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(image_flow.inverse(z), image_flow.inverse(z.reshape(3, 1, 4, 4)))
    assert image_flow.sample_images(2).shape == (2, 1, 4, 4)
    with pytest.raises(TypeError, match=r"^MultiscaleFlow\.sample: n must be an integer"):
        image_flow.sample_images(1.5)


@pytest.mark.parametrize("method", ["log_prob_bound", "bpd"])
@pytest.mark.parametrize(
    ("x", "noise", "error", "match"),
    [
        ([[0, 1]], None, TypeError, "got list"),
        (torch.zeros(2, 1, 4, 4, dtype=torch.bool), None, TypeError, "got bool"),
        (torch.zeros(2, 16, dtype=torch.int64), None, ValueError, r"got shape \(2, 16\)"),
        (torch.zeros(2, 1, 4, 4, dtype=torch.int64, device="meta"), None, ValueError, "on meta"),
        (
            torch.zeros(2, 1, 4, 4, dtype=torch.int64),
            torch.zeros(2, 1, 4, 4, dtype=torch.int64),
            TypeError,
            "noise must be a floating",
        ),
        (torch.zeros(2, 1, 4, 4, dtype=torch.int64), torch.zeros(3, 1, 4, 4), ValueError, "with the shape of x"),
    ],
)
def test_image_likelihoods_reject_bad_images_and_noise(image_flow, method, x, noise, error, match):
    with CountOps() as ops, pytest.raises(error, match=rf"^MultiscaleFlow\.{method}: .*{match}"):
        getattr(image_flow, method)(x, noise=noise)
    assert ops.ops == []


def test_image_likelihoods_take_integer_or_float_levels(image_flow):
    x = torch.randint(0, 5, (2, 1, 4, 4))
    noise = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        a = image_flow.bpd(x, noise=noise)
        b = image_flow.bpd(x.to(torch.float32), noise=noise)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b)


# -- the power-series estimator's roulette ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("roulette", "param"),
    [
        ("poisson", 1e6),
        ("poisson", 1e300),
        ("poisson", math.inf),
        ("poisson", math.nan),
        ("poisson", 0.0),
        ("poisson", -2.0),
        ("poisson", MAX_MEAN_EXTRA_TERMS * 1.01),
        ("poisson", "2"),
        ("geometric", 1e-300),
        ("geometric", 1e-4),
        ("geometric", 0.0),
        ("geometric", 1.0),
        ("geometric", math.nan),
    ],
)
def test_roulette_parameter_out_of_range_is_a_clear_error(roulette, param):
    with pytest.raises(ValueError, match=r"^roulette_param: "):
        EstimatorSettings(roulette=roulette, roulette_param=param)


def poisson_tail_reference(lam: float, m: int) -> float:
    """P(N >= m), N ~ Poisson(lam), as the regularised lower incomplete gamma function P(m, lam)."""
    return float(
        torch.special.gammainc(torch.tensor(float(m), dtype=torch.float64), torch.tensor(lam, dtype=torch.float64))
    )


@pytest.mark.parametrize("lam", [0.5, 2.0, 200.0, MAX_MEAN_EXTRA_TERMS])
def test_poisson_roulette_with_a_large_lambda_draws_and_weighs_without_overflow(lam):
    settings = EstimatorSettings(roulette="poisson", roulette_param=lam)
    for m in (1, 2, max(1, int(lam)), int(lam) + 1, int(1.5 * lam) + 3):
        # (torch's gammainc itself is good to about 1e-10 here; the tail is computed to about 1e-13)
        assert settings.tail_probability(m) == pytest.approx(poisson_tail_reference(lam, m), rel=1e-8)
    far = settings.tail_probability(int(20 * lam) + 200)  # beyond float range: floored, so weights stay finite
    assert 0.0 < far <= 1e-250
    n = settings.draw_extra_terms(torch.Generator().manual_seed(0))
    assert isinstance(n, int) and 0 <= n < lam + 10 * math.sqrt(lam) + 10


def test_power_series_estimate_with_a_large_poisson_lambda_is_finite_and_close():
    # A linear G with J = 0.3 * I: the residual block's log-det is n log(1.3) exactly.
    n = 3
    jac = 0.3 * torch.eye(n, dtype=torch.float64)
    settings = EstimatorSettings(roulette="poisson", roulette_param=200.0, n_exact_terms_eval=2, n_probes=4)
    est = power_series_logdet(
        lambda u, _graph: u @ jac,
        torch.Size((5, n)),
        "residual",
        settings,
        training=False,
        dtype=torch.float64,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(1),
    )
    assert est.shape == (5,) and torch.isfinite(est).all()
    # Hutchinson's probes average |v|^2 / n; with 200-odd terms the series itself is converged.
    truth = n * math.log(1.3)
    assert float(est.mean()) == pytest.approx(truth, rel=0.5)


# -- presets ------------------------------------------------------------------------------------------------


def nested_preset(tmp_path, depth: int):
    value = "[" * depth + "1" + "]" * depth
    path = tmp_path / f"deep{depth}.json"
    path.write_text(f'{{"name": "deep", "model": {{"blocks": {value}}}, "training": {{}}}}')
    return path


@pytest.mark.parametrize("depth", [100_000, 3_000, MAX_PRESET_DEPTH])
def test_a_deeply_nested_preset_is_a_clear_error_naming_the_file(tmp_path, depth):
    path = nested_preset(tmp_path, depth)
    with pytest.raises(ValueError, match=rf"^preset: {path} nests objects and arrays more than {MAX_PRESET_DEPTH}"):
        load_preset(path)


def test_nesting_within_the_bound_loads_and_the_error_says_where(tmp_path):
    # The document, "model" and "blocks" take three levels: MAX_PRESET_DEPTH - 2 lists still fit.
    load_preset(nested_preset(tmp_path, MAX_PRESET_DEPTH - 2))
    path = tmp_path / "where.json"
    deep = {"c": 1}
    for _ in range(MAX_PRESET_DEPTH):
        deep = {"c": deep}
    path.write_text(json.dumps({"model": {"a": [0, deep]}, "training": {}}))
    with pytest.raises(ValueError, match=r"\(at model\.a\[1\]\.c\.c"):
        load_preset(path)


def test_shipped_presets_are_well_within_the_nesting_bound():
    assert len(list_presets()) > 0
