"""The comparison families (Real NVP, Glow, NSF, MAF, CNF; monoflow_core.families, docs/families.md).

Each family: inverse of forward, log-determinant against the float64 autograd Jacobian of the 2-D map, a density
that integrates to one, sizes counted without building, checkpoints (flow and training run, bit-identical
resumption), the shape-only build of the loader and its refusal of oversized configurations; the command line on
one family; and the one-line message when zuko is missing (simulated by hiding it from the import system).
"""

from __future__ import annotations

import json
import math
import struct
import sys

import pytest
import torch
from cli_helpers import assert_user_error, run

from monoflow_core import Flow, FlowConfig, build_flow
from monoflow_core import resources as res
from monoflow_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from monoflow_core.checkpoint.header import _ST_NAMES, _Entry
from monoflow_core.checkpoint.plan import _flow_plan
from monoflow_core.evaluation import solver_diagnostics
from monoflow_core.families import COMPARISON_FAMILIES, MissingDependencyError
from monoflow_core.families.build import ComparisonFlow
from monoflow_core.families.layers import ContinuousFlow
from monoflow_core.families.size import family_size, family_state_numbers
from monoflow_core.flow import standard_normal_log_prob
from monoflow_core.presets import load_preset
from monoflow_core.training import TrainConfig, Trainer

pytest.importorskip("zuko")
torch.set_num_threads(1)

per_family = pytest.mark.parametrize("family", COMPARISON_FAMILIES)

#: ODE tolerance of the CNF in the float64 checks (the preset trains at 1e-5).
CNF_TOL = 1e-8


def small_config(family: str, **changes) -> FlowConfig:
    """A small flow of the family: 3 blocks (Real NVP: both halves, then the first again) of width 16; a CNF has
    one block (stacking them composes maps, as the other families do; each costs an ODE solve)."""
    settings = {"family": family, "blocks": 1 if family == "cnf" else 3, "hidden": [16, 16], "tol": CNF_TOL, **changes}
    return FlowConfig(**settings)


def prepared(family: str, seed: int = 0, **changes) -> Flow:
    """A float64 flow of the family in eval mode, its ActNorms (Glow) initialised on a first batch."""
    torch.manual_seed(seed)
    flow = build_flow(small_config(family, **changes)).to(torch.float64).train()
    with torch.no_grad():
        flow.log_prob(1.5 * torch.randn(64, 2, dtype=torch.float64))
    return flow.eval()


def points(n: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(n, 2, generator=g, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------------------
# the maps
# --------------------------------------------------------------------------------------------------------------


@per_family
def test_inverse_of_forward(family):
    flow = prepared(family)
    x = points()
    with torch.no_grad():
        z, logdet = flow(x)
        back = flow.inverse(z)
    assert torch.isfinite(z).all() and torch.isfinite(logdet).all()
    assert float((z - x).abs().max()) > 1e-2  # a map that moves the points
    # Closed-form inverses to rounding; the CNF integrates its ODE backwards, to its tolerance.
    tol = 1e-6 if family == "cnf" else 1e-12
    assert float((back - x).abs().max()) < tol


@per_family
def test_logdet_matches_the_brute_force_jacobian(family):
    """``log|det J|`` of the whole 2-D map against the float64 Jacobian by autograd, sample by sample. The CNF's
    exact trace agrees to its integration error; Hutchinson's estimate would miss by O(1) per sample."""
    flow = prepared(family)
    x = points(16)
    _, logdet = flow(x)
    # Samples are independent: the Jacobian of the batch sum holds each sample's own 2x2 Jacobian.
    jac = torch.autograd.functional.jacobian(lambda u: flow(u)[0].sum(0), x).permute(1, 0, 2)
    brute = torch.linalg.slogdet(jac).logabsdet
    assert float(brute.std()) > 1e-3  # a non-volume-preserving map
    tol = 1e-4 if family == "cnf" else 1e-10
    assert torch.allclose(logdet.detach(), brute, atol=tol, rtol=0), (logdet.detach() - brute).abs().max()
    assert flow.logdet_is_exact


@per_family
def test_log_prob_is_the_change_of_variables_and_integrates_to_one(family):
    flow = prepared(family, hidden=[8])
    x = points(8)
    with torch.no_grad():
        z, logdet = flow(x)
        assert torch.allclose(flow.log_prob(x), standard_normal_log_prob(z) + logdet, atol=1e-12, rtol=0)
        # The density on a grid over [-8, 8]^2 (mass outside it is below 1e-6 for these near-Gaussian maps).
        n, half = 121, 8.0
        axis = torch.linspace(-half, half, n, dtype=torch.float64)
        grid = torch.cartesian_prod(axis, axis)
        flow.set_solver_options(tol=1e-6)  # (the CNF: 15k points at a coarser tolerance, still far below 1e-3)
        density = flow.log_prob(grid).exp().reshape(n, n)
    total = float(torch.trapezoid(torch.trapezoid(density, axis, dim=1), axis, dim=0))
    assert abs(total - 1.0) < 5e-3, total


@per_family
def test_samples_come_from_the_inverse(family):
    flow = prepared(family)
    g = torch.Generator().manual_seed(3)
    samples = flow.sample(64, generator=g)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, 2, generator=g, dtype=torch.float64)
    with torch.no_grad():
        z, _ = flow(samples)
    assert samples.shape == (64, 2) and torch.isfinite(samples).all()
    assert float((z - base).abs().max()) < (1e-6 if family == "cnf" else 1e-12)
    assert flow.sample(0).shape == (0, 2)


@per_family
def test_no_solver_diagnostics_and_the_family_is_recorded(family):
    flow = prepared(family)
    assert type(flow) is ComparisonFlow and flow.family == family and flow.config.family == family
    assert flow.solver_stats() == [] and flow.implicit_blocks() == [] and solver_diagnostics(flow) == []
    assert not flow.fast_path


def test_the_cnf_takes_its_ode_tolerance_from_tol_and_computes_exact_traces():
    flow = prepared("cnf")
    layers = [m for m in flow.layers if isinstance(m, ContinuousFlow)]
    assert len(layers) == 1 and {m.tol for m in layers} == {CNF_TOL}
    assert all(m._transform(torch.float64).exact for m in layers)
    assert layers[0]._transform(torch.float32).rtol == pytest.approx(10 * torch.finfo(torch.float32).eps)
    flow.set_solver_options(tol=1e-4)
    assert {m.tol for m in layers} == {1e-4} and flow.config.tol == 1e-4
    # A looser tolerance gives a less accurate round trip: the tolerance reaches the solver.
    x = points(8)
    with torch.no_grad():
        loose = float((flow.inverse(flow(x)[0]) - x).abs().max())
    flow.set_solver_options(tol=CNF_TOL)
    with torch.no_grad():
        tight = float((flow.inverse(flow(x)[0]) - x).abs().max())
    assert tight < loose


# --------------------------------------------------------------------------------------------------------------
# configuration and sizes
# --------------------------------------------------------------------------------------------------------------


def test_the_default_family_is_the_paper_s():
    config = FlowConfig()
    assert config.family == "implicit" and config.to_dict()["family"] == "implicit"
    flow = build_flow(config)
    assert type(flow) is Flow and len(flow.implicit_blocks()) == 10
    assert FlowConfig.from_dict({k: v for k, v in config.to_dict().items() if k not in ("family", "bins")}) == config


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"family": "flowpp"}, ["family", "'realnvp'", "'cnf'"]),
        ({"family": 3}, ["family"]),
        ({"family": "nsf", "bins": 1}, ["bins", ">= 2"]),
        ({"family": "maf", "dim": 1}, ["family", "dim >= 2"]),
        ({"family": "glow", "image_shape": [1, 8, 8]}, ["family", "image"]),
    ],
)
def test_bad_family_settings_are_refused(changes, words):
    with pytest.raises(ValueError) as info:
        FlowConfig(**changes)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_family_names_are_case_insensitive():
    assert FlowConfig(family="RealNVP").family == "realnvp"


@per_family
@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_sizes_are_counted_without_building(family, blocks):
    for config in (small_config(family, blocks=blocks), small_config(family, blocks=blocks, hidden=[5, 7, 3], dim=3)):
        flow = build_flow(config)
        built = (
            sum(p.numel() for p in flow.parameters()),
            sum(b.numel() for b in flow.buffers()),
            len(list(flow.modules())),
        )
        assert family_size(config) == built
        size = res.model_size(config)
        assert (size.parameters, size.buffers, size.modules) == built
        assert family_state_numbers(config) == sum(t.numel() for t in flow.state_dict().values())


@per_family
def test_presets_state_their_source_and_size(family):
    preset = load_preset(f"toy-{family}")
    config = preset.model_config()
    assert config.family == family and config.dim == 2
    params = family_size(config)[0]
    monotone = sum(p.numel() for p in build_flow(load_preset("paper-toy-monotone").model_config()).parameters())
    assert 0.9 * monotone <= params <= 1.1 * monotone  # comparable in size with the paper's toy model
    assert f"{params:,} parameters" in preset.description
    year = {"realnvp": "2017", "glow": "2018", "nsf": "2019", "maf": "2017", "cnf": "2019"}[family]
    assert year in preset.description and "arXiv:" in preset.description


# --------------------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------------------


@per_family
def test_checkpoint_round_trip(family, tmp_path):
    flow = prepared(family).to(torch.float32)
    path = save_checkpoint(tmp_path / "flow.safetensors", flow)
    loaded = load_checkpoint(path).flow
    assert type(loaded) is ComparisonFlow and loaded.config == flow.config and loaded.family == family
    for key, value in flow.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    x = points(16).float()
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(x), flow.log_prob(x))


@per_family
def test_the_shape_only_build_gives_the_real_names_and_shapes(family, tmp_path):
    config = small_config(family)
    real = build_flow(config)
    table = {k: _Entry(_ST_NAMES[v.dtype], tuple(v.shape)) for k, v in real.state_dict().items()}
    plan = _flow_plan(tmp_path / "x", config, torch.float32, table)
    assert plan.tensors == table
    assert plan.parameters == [n for n, _ in real.named_parameters()]


def _edit_model_config(path, **changes):
    """Rewrite a checkpoint's stored model configuration (a crafted file)."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    config = json.loads(header["__metadata__"]["model_config"])
    config.update(changes)
    header["__metadata__"]["model_config"] = json.dumps(config)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])


@pytest.mark.parametrize(
    ("changes", "word"),
    [({"hidden": [10**7, 10**7]}, "holds"), ({"bins": 10**9}, "holds"), ({"blocks": 10**9}, "blocks")],
)
def test_an_oversized_family_configuration_is_refused_before_building(changes, word, tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "nsf.safetensors", prepared("nsf").float())
    _edit_model_config(path, **changes)
    from monoflow_core.families import build as family_build

    monkeypatch.setattr(family_build, "_BUILDERS", {})  # any build would fail with a KeyError
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and word in str(info.value)


@per_family
def test_a_training_run_resumes_bit_for_bit(family, tmp_path):
    model = load_preset(f"toy-{family}").model_config(blocks=2, hidden=[8, 8])
    train = TrainConfig(
        data="8gaussians",
        batch_size=32,
        eval_every=0,
        test_size=200,
        eval_size=100,
        concat_learnable_from=None,
        lipschitz_iterations=0,
    )
    straight = Trainer(model, train)
    straight.run(4)
    first = Trainer(model, train)
    first.run(2)
    resumed = Trainer.from_checkpoint(first.save_checkpoint(tmp_path / "run.safetensors"))
    assert type(resumed.flow) is ComparisonFlow and resumed.step_count == 2
    resumed.run(2)
    for (key, a), b in zip(straight.flow.state_dict().items(), resumed.flow.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    assert all(m.solver_iterations_mean == 0 and m.exact for m in resumed.history)


def test_training_lowers_the_nll():
    model = load_preset("toy-realnvp").model_config()
    trainer = Trainer(
        model,
        TrainConfig(
            data="8gaussians",
            batch_size=256,
            lr=3e-3,
            eval_every=0,
            test_size=2000,
            concat_learnable_from=None,
            lipschitz_iterations=0,
        ),
    )
    before = trainer.evaluate().nll_nats
    trainer.run(150)
    after = trainer.evaluate().nll_nats
    assert math.isfinite(after) and after < before - 0.5, (before, after)


# --------------------------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------------------------


def test_cli_trains_evaluates_samples_and_draws_a_family(tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run(
        [
            "train",
            "--data",
            "8gaussians",
            "--preset",
            "toy-glow",
            "--blocks",
            "2",
            "--iterations",
            "6",
            "--batch-size",
            "64",
            "--test-size",
            "300",
            "--eval-every",
            "3",
            "--no-progress",
            "--out",
            out,
        ]
    )
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["family"] == "glow" and config["model"]["blocks"] == 2
    ckpt = out / "checkpoint.safetensors"
    code, stdout, err = run(["eval", ckpt, "--test-size", "300", "--json"])
    assert code == 0, err
    result = json.loads(stdout)
    assert math.isfinite(result["nll_nats"]) and result["exact"], result
    code, _, err = run(["sample", ckpt, "--n", "50", "--out", tmp_path / "s.npy"])
    assert code == 0, err
    import numpy as np

    samples = np.load(tmp_path / "s.npy")
    assert samples.shape == (50, 2) and np.isfinite(samples).all()
    code, _, err = run(["density", ckpt, "--resolution", "40", "--extent", "6", "--out", tmp_path / "d.npy"])
    assert code == 0, err
    grid = np.load(tmp_path / "d.npy")
    assert grid.shape == (40, 40) and np.isfinite(grid).all()
    mass = np.exp(grid).sum() * (12 / 40) ** 2  # the density over [-6, 6]^2: close to all of the mass
    assert 0.8 < mass < 1.2, mass


# --------------------------------------------------------------------------------------------------------------
# without zuko
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_zuko(monkeypatch):
    """zuko hidden from the import system, as on a machine without it (``import zuko`` raises ImportError)."""
    for name in [m for m in sys.modules if m == "zuko" or m.startswith("zuko.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "zuko", None)


def test_without_zuko_building_a_family_says_how_to_install_it(no_zuko):
    config = FlowConfig(family="realnvp")  # configurations validate without zuko
    with pytest.raises(MissingDependencyError) as info:
        build_flow(config)
    message = str(info.value)
    assert "\n" not in message and "zuko" in message and "pip install 'monoflow[compare]'" in message
    assert "'realnvp'" in message
    assert isinstance(info.value, ImportError) and isinstance(info.value, ValueError)
    assert type(build_flow(FlowConfig(blocks=1))) is Flow  # the paper's flows need nothing more


def test_without_zuko_the_command_line_prints_one_line(no_zuko, tmp_path):
    code, _, err = run(
        [
            "train",
            "--data",
            "8gaussians",
            "--preset",
            "toy-maf",
            "--iterations",
            "1",
            "--no-progress",
            "--out",
            tmp_path / "run",
        ]
    )
    assert_user_error(code, err, "family 'maf'", "zuko", "pip install 'monoflow[compare]'")


def test_without_zuko_a_family_checkpoint_is_refused_with_the_message(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "maf.safetensors", prepared("maf").float())
    for name in [m for m in sys.modules if m == "zuko" or m.startswith("zuko.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "zuko", None)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "pip install 'monoflow[compare]'" in str(info.value)
