"""The studio trains the comparison families (docs/families.md): from the preset menu to a trained density, with the
transport view over their layers and no solver diagnostics (they have no implicit blocks)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import WAIT_MS

from monoflow_studio.run_spec import RunSpec, toy_presets
from monoflow_studio.session import PAUSED

pytest.importorskip("zuko")

FAMILY_PRESETS = ["toy-cnf", "toy-glow", "toy-maf", "toy-nsf", "toy-realnvp"]
QUICK_FAMILY_PRESETS = ["quick-cnf", "quick-glow", "quick-maf", "quick-nsf", "quick-realnvp"]


def small_spec(preset: str) -> RunSpec:
    spec = RunSpec.from_preset(preset)
    spec.model = spec.model.replace(blocks=2, hidden=[16, 16])
    spec.training = spec.training.replace(batch_size=128, test_size=2000)
    return spec


def test_the_preset_menu_offers_every_family(window):
    names = {p.name for p in toy_presets()}  # (also the list compare mode offers)
    assert set(FAMILY_PRESETS + QUICK_FAMILY_PRESETS) <= names
    assert set(FAMILY_PRESETS + QUICK_FAMILY_PRESETS) <= {a.text() for a in window.preset_actions}
    for name in QUICK_FAMILY_PRESETS:  # each quick variant is its family's, smaller than the full preset
        quick, full = RunSpec.from_preset(name), RunSpec.from_preset(name.replace("quick-", "toy-"))
        assert quick.model.family == full.model.family
        assert quick.model.blocks * sum(quick.model.hidden) < full.model.blocks * sum(full.model.hidden)
    assert RunSpec.from_preset("toy-realnvp").describe_model() == "Real NVP: 8 affine couplings, MLP 24x24"
    assert RunSpec.from_preset("toy-nsf").describe_model().endswith("8 bins")


@pytest.mark.parametrize("preset", ["toy-glow", "toy-cnf"])
def test_a_family_trains_with_transport_and_empty_solver_diagnostics(preset, make_window, qtbot):
    window = make_window(small_spec(preset))
    first = window.density.current_image()
    window.transport_dock.show()
    window.transport_dock.raise_()
    window.train_action.trigger()
    qtbot.waitUntil(lambda: window.step >= 4, timeout=WAIT_MS)
    shown = window.density.frames_shown
    qtbot.waitUntil(lambda: window.density.frames_shown > shown, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: window.transport._frame is not None and window.transport._frame.step > 0, timeout=WAIT_MS)
    window.train_action.trigger()
    qtbot.waitUntil(lambda: window.state == PAUSED, timeout=WAIT_MS)
    image = window.density.current_image()
    assert image is not None and np.isfinite(image).all() and not np.allclose(image, first)
    family = window.session.submit(lambda t: (t.flow.family, len(t.flow.layers))).result(timeout=10)
    assert family[0] == preset.removeprefix("toy-")
    assert window.transport.stage_slider.maximum() == family[1]
    assert window.solver_view.rows == []
    assert "No implicit blocks" in window.solver_view.summary.text()


def test_the_view_process_draws_a_family_as_the_studio_does():
    """The studio's child process rebuilds the flow from its configuration and state: a family too."""
    import torch

    import monoflow_core as mc
    from monoflow_studio.view_process import ViewProcess, compute_density, flow_message

    torch.manual_seed(0)
    flow = mc.build_flow(small_spec("toy-maf").model).eval()
    args = {"extent": 3.0, "resolution": 16, "n_samples": 100, "chunk": 100}
    test = torch.randn(50, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    here = compute_density(flow, test_points=test, **args)
    process = ViewProcess()
    try:
        there = process.compute(flow_message(flow), lambda: False, test_points=test.numpy(), **args)
    finally:
        process.close()
    assert here is not None and there is not None
    np.testing.assert_allclose(there.log_density, here.log_density, rtol=0, atol=1e-5)
    np.testing.assert_allclose(there.samples, here.samples, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("preset", "shown"),
    [
        ("toy-realnvp", set()),
        ("toy-cnf", {"tol"}),
        (
            "paper-toy-monotone",
            {"formulation", "activation", "lipschitz", "depth", "growth", "solver", "tol", "max_iter"},
        ),
    ],
)
def test_controls_show_only_the_fields_of_the_runs_family(preset, shown, qtbot):
    from monoflow_studio.controls import IMPLICIT_ONLY, ControlsPanel

    panel = ControlsPanel(RunSpec.from_preset(preset))
    qtbot.addWidget(panel)
    panel.show()
    visible = {name for name in IMPLICIT_ONLY if panel.widget(name).isVisibleTo(panel)}
    assert visible == shown
    assert ("Comparison flow" in panel.note.text()) == (preset != "paper-toy-monotone")
    panel.set_spec(RunSpec.from_preset("paper-toy-monotone"))  # switching back shows them all again
    assert all(panel.widget(name).isVisibleTo(panel) for name in IMPLICIT_ONLY)
