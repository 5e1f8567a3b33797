"""Shipped example models: written weights-only, listed from their headers, opened like any checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from monoflow_core import FlowConfig
from monoflow_core.assets import ASSETS_DIR_ENV
from monoflow_core.checkpoint import load_checkpoint
from monoflow_core.data import TOY_DATASETS
from monoflow_core.examples import find_example, list_examples, write_example
from monoflow_core.training import TrainConfig, Trainer


@pytest.fixture
def example_assets(tmp_path, monkeypatch):
    """An assets folder holding one freshly trained example (and no presets: examples need none)."""
    monkeypatch.setenv(ASSETS_DIR_ENV, str(tmp_path))
    trainer = Trainer(FlowConfig(blocks=1, growth=8), TrainConfig(batch_size=32, eval_every=0, test_size=100))
    trainer.run(3)
    (tmp_path / "models").mkdir()
    example = write_example(
        tmp_path / "models" / "moons-monotone.safetensors",
        trainer.flow,
        data="moons",
        model="monotone",
        preset="paper-toy-monotone",
        iterations=3,
        test_nll_nats=3.25,
    )
    return trainer, example


def test_written_example_is_weights_only_and_listed(example_assets):
    trainer, example = example_assets
    assert [e.name for e in list_examples()] == ["moons-monotone"]
    assert find_example("moons-monotone") == example
    assert example.title == "moons: Monotone (3.250 nats)"
    ckpt = load_checkpoint(example.path)
    assert ckpt.trainer_state is None, "no optimizer or RNG state ships"
    x = torch.randn(16, 2)
    torch.testing.assert_close(ckpt.flow.log_prob(x), trainer.flow.log_prob(x), rtol=0, atol=0)
    with pytest.raises(KeyError, match="moons-monotone"):
        find_example("no-such-example")


def test_an_empty_assets_folder_lists_no_examples(tmp_path, monkeypatch):
    monkeypatch.setenv(ASSETS_DIR_ENV, str(tmp_path))
    assert list_examples() == []
    with pytest.raises(KeyError, match="none ship"):
        find_example("moons-monotone")


@pytest.mark.parametrize("example", list_examples(), ids=lambda e: e.name)
def test_every_shipped_example_opens_and_evaluates(example):
    assert example.data in TOY_DATASETS and example.model in ("monotone", "idensenet")
    assert example.iterations == 50_000 and math.isfinite(example.test_nll_nats)
    assert example.path.stat().st_size < 100_000, "weights only"
    flow = load_checkpoint(example.path).flow
    assert torch.isfinite(flow.log_prob(torch.randn(64, 2))).all()
