"""The controls' numeric ranges agree with the core's validators: every value a box offers is accepted, and at every
end the box shares with the core, one step further is refused."""

from __future__ import annotations

import pytest

from monoflow_core.bounds import INTERVALS, MINIMUM, Interval
from monoflow_core.config import FlowConfig, TrainConfig
from monoflow_studio.controls import ControlsPanel, core_range
from monoflow_studio.run_spec import RunSpec

# (box, configuration, step beyond an end, the ends the box shares with the core's range). Where the core sets no
# limit (counts have no maximum) or the studio offers less (learning rates from 1e-6, tolerances from the solvers'
# default), the box's end only has to be accepted.
CASES = [
    ("lipschitz", FlowConfig, 0.001, ("low", "high")),
    ("tol", FlowConfig, 0.001, ("high",)),
    ("lr", TrainConfig, None, ()),
    ("blocks", FlowConfig, 1, ("low",)),
    ("fc_blocks", FlowConfig, 1, ("low",)),
    ("depth", FlowConfig, 1, ("low",)),
    ("growth", FlowConfig, 1, ("low",)),
    ("max_iter", FlowConfig, 1, ("low",)),
    ("batch_size", TrainConfig, 1, ("low",)),
    ("seed", TrainConfig, 1, ("low",)),
    ("eval_every", TrainConfig, 1, ("low",)),
    ("eval_size", TrainConfig, 1, ("low",)),
]


def _accepted(config: type, field: str, value: float) -> bool:
    try:
        config(**{field: value})
    except ValueError:
        return False
    return True


@pytest.fixture
def panel(qtbot):
    panel = ControlsPanel(RunSpec.default())
    qtbot.addWidget(panel)
    return panel


def _ends(box) -> tuple[float, float]:
    low, high = box.minimum(), box.maximum()
    if isinstance(box.value(), int):
        return int(low), int(high)
    return float(low), float(high)


@pytest.mark.parametrize(("name", "config", "step", "shared"), CASES, ids=[c[0] for c in CASES])
def test_each_box_offers_exactly_what_the_core_accepts_at_its_shared_ends(panel, name, config, step, shared):
    low, high = _ends(panel.widget(name))
    assert _accepted(config, name, low), f"{name}: the box offers {low}, the core refuses it"
    assert _accepted(config, name, high), f"{name}: the box offers {high}, the core refuses it"
    if "low" in shared:
        assert not _accepted(config, name, round(low - step, 12)), f"{name}: the core accepts below the box's {low}"
    if "high" in shared:
        assert not _accepted(config, name, round(high + step, 12)), f"{name}: the core accepts above the box's {high}"


def test_the_boxes_and_the_validators_read_one_table(qtbot, monkeypatch):
    # Narrow the core's ranges: the validators and a new panel both follow (no copy of the limits in the studio).
    spec = RunSpec.default()
    spec.model = spec.model.replace(lipschitz=0.4)  # inside the narrowed range (the panel's spec is validated)
    monkeypatch.setitem(INTERVALS, "lipschitz", Interval(0.0, 0.5, low_open=True, high_open=True))
    monkeypatch.setitem(MINIMUM, "growth", 4)
    panel = ControlsPanel(spec)
    qtbot.addWidget(panel)
    assert panel.lipschitz.maximum() == pytest.approx(0.499)
    assert panel.growth.minimum() == 4
    assert not _accepted(FlowConfig, "lipschitz", 0.5) and _accepted(FlowConfig, "lipschitz", 0.499)
    with pytest.raises(ValueError, match="growth"):
        FlowConfig(lipschitz=0.4, growth=3)
    assert FlowConfig(lipschitz=0.4, growth=4).growth == 4


def test_a_studio_limit_outside_the_core_range_is_refused():
    assert core_range("lr", 1e-3, (1e-6, 1.0)) == (1e-6, 1.0)
    with pytest.raises(ValueError, match="leaves the core"):
        core_range("lr", 1e-3, (0.0, 1.0))  # the core refuses lr = 0
    with pytest.raises(ValueError, match="unbounded"):
        core_range("lr", 1e-3)  # the core gives no upper end for a learning rate
