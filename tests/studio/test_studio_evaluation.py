"""One checkpoint, one figure: ``monoflow eval``, ``Trainer.evaluate`` and the studio's test agree.

All three go through :mod:`monoflow_core.evaluation_policy` (dtype, evaluation copy, image test); the studio's
runs off the training thread in slices, which must not change the figure.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from monoflow_core import cli
from monoflow_core.presets import load_preset
from monoflow_core.training import Trainer
from monoflow_studio.session import evaluate_images

IMAGES = 32


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    torch.set_num_threads(1)
    preset = load_preset("digits-cpu")
    model = preset.model_config(blocks_per_scale=[1, 1], fc_blocks=0, depth=1, growth=8, logdet="hybrid")
    train = preset.train_config(
        iterations=2,
        batch_size=8,
        eval_every=0,
        eval_size=IMAGES,
        checkpoint_every=0,
        concat_learnable_from=None,
        warmup_iterations=1,
    )
    trainer = Trainer(model, train)
    trainer.run(2)
    return trainer.save_checkpoint(tmp_path_factory.mktemp("eval") / "digits.safetensors")


def test_cli_trainer_and_studio_report_the_same_bits_per_dim(digits_checkpoint, capsys):
    trainer = Trainer.from_checkpoint(digits_checkpoint)
    core = trainer.evaluate(fixed=True)

    assert cli.main(["eval", str(digits_checkpoint), "--json", "--test-size", str(IMAGES)]) == 0
    printed = json.loads(capsys.readouterr().out)

    cfg = trainer.train_config
    studio = evaluate_images(
        copy.deepcopy(trainer.eval_flow),
        trainer.evaluation_images().images[:IMAGES],
        step=trainer.step_count,
        seed=cfg.test_seed,
        split=cfg.eval_split,
        dequantization=trainer.model_config.dequantization,
        dtype=trainer.evaluation_dtype(),
        chunk=5,
    )  # other slices than the core's: the noise must not depend on them
    assert studio is not None
    assert core.n_test == printed["n_test"] == studio.n_test == IMAGES
    assert core.dtype == printed["dtype"] == studio.dtype
    assert printed["bpd"] == pytest.approx(core.bpd, abs=1e-5)
    assert studio.bpd == pytest.approx(core.bpd, abs=1e-5)
    assert studio.nll_nats == pytest.approx(core.nll_nats, rel=1e-6)


def test_a_two_d_checkpoint_gets_the_same_nll_from_the_cli_and_the_trainer(tmp_path, capsys):
    preset = load_preset("quick-monotone")
    trainer = Trainer(preset.model_config(blocks=2), preset.train_config(eval_every=0, test_size=3000))
    trainer.run(5)
    path = trainer.save_checkpoint(tmp_path / "toy.safetensors")
    core = Trainer.from_checkpoint(path).evaluate(fixed=True)
    assert cli.main(["eval", str(path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert core.dtype == printed["dtype"] == "float64"
    assert printed["n_test"] == core.n_test == 3000
    assert printed["nll_nats"] == pytest.approx(core.nll_nats, rel=1e-12)
