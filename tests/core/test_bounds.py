"""The configurations' ranges (monoflow_core.bounds) are what the validators enforce, at every end."""

from __future__ import annotations

import dataclasses
import math

import pytest

from monoflow_core import FlowConfig, build_flow
from monoflow_core.bounds import INTERVALS, MINIMUM, Interval, check_in
from monoflow_core.config import TrainConfig

FLOW_FIELDS = {f.name for f in dataclasses.fields(FlowConfig)}
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
LIST_FIELDS = {"hidden": lambda v: [v], "blocks_per_scale": lambda v: [v], "lr_milestones": lambda v: [v]}


def _config(name: str):
    assert (name in FLOW_FIELDS) != (name in TRAIN_FIELDS), name
    return FlowConfig if name in FLOW_FIELDS else TrainConfig


def test_an_interval_holds_its_closed_ends_only():
    unit = Interval(0.0, 1.0, low_open=True, high_open=True)
    assert 0.5 in unit and 0.0 not in unit and 1.0 not in unit
    half = Interval(0.0, 0.5, high_open=True)
    assert 0.0 in half and 0.5 not in half and -1e-12 not in half
    positive = Interval(0.0, low_open=True)
    assert 1e300 in positive and math.inf in positive and 0.0 not in positive
    assert math.nan not in unit and True not in unit and "0.5" not in unit


def test_rules_and_inner_ends_read_as_the_interval():
    assert Interval(0.0, 1.0, low_open=True, high_open=True).rule() == "lie in (0, 1)"
    assert Interval(0.0, 1.0, low_open=True).rule() == "lie in (0, 1]"
    assert Interval(0.0, low_open=True).rule() == "be > 0"
    assert Interval(0.0).rule() == "be >= 0"
    assert Interval(0.0, 1.0, low_open=True, high_open=True).inside(0.001) == pytest.approx((0.001, 0.999))
    assert Interval(0.0, 1.0).inside(0.001) == (0.0, 1.0)
    assert Interval(0.0, low_open=True).inside(0.5) == (0.5, None)
    with pytest.raises(ValueError, match=r"^tol: must lie in \(0, 1\), got 1\.0$"):
        check_in("tol", 1.0, INTERVALS["tol"])


@pytest.mark.parametrize("name", sorted(MINIMUM))
def test_every_integer_minimum_is_the_validators(name):
    config, wrap = _config(name), LIST_FIELDS.get(name, lambda v: v)
    if name == "image_shape":
        wrap = lambda v: [v, 8, 8]  # noqa: E731
    below = MINIMUM[name] - 1
    with pytest.raises(ValueError, match=rf"^{name}: must be an integer >= {MINIMUM[name]}"):
        config(**{name: wrap(below)})
    config(**{name: wrap(MINIMUM[name])})


@pytest.mark.parametrize("name", sorted(INTERVALS))
def test_every_interval_is_the_validators_at_its_ends(name):
    interval, config = INTERVALS[name], _config(name)

    def value(v: float):
        return (v, 0.5) if name == "betas" else v

    for end, is_open in ((interval.low, interval.low_open), (interval.high, interval.high_open)):
        if end is None:
            continue
        if is_open:
            with pytest.raises(ValueError, match=rf"^{name}: (each )?must "):
                config(**{name: value(end)})
        else:
            config(**{name: value(end)})
    low, high = interval.inside(1e-3)
    for inner in (low, high):
        if inner is not None:
            config(**{name: value(inner)})


def test_a_running_model_takes_the_configurations_tolerance_range():
    flow = build_flow(FlowConfig(blocks=1))
    for tol in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"^tol: must lie in \(0, 1\)"):
            flow.set_solver_options(tol=tol)
        with pytest.raises(ValueError, match=r"^tol: must lie in \(0, 1\)"):
            FlowConfig(tol=tol)
    flow.set_solver_options(tol=0.999)
    assert flow.config is not None and flow.config.tol == 0.999
