"""The quick presets (what the studio opens on, and the quick variant of every family) train: a few default steps
lower the test NLL."""

from __future__ import annotations

import pytest

from monoflow_core.presets import load_preset
from monoflow_core.training import Trainer

#: The quick presets of the comparison families (docs/families.md), built from the optional zuko.
FAMILY_QUICK = ["quick-realnvp", "quick-glow", "quick-nsf", "quick-maf", "quick-cnf"]


@pytest.mark.parametrize("name", ["quick-monotone", "quick-idensenet", *FAMILY_QUICK])
def test_quick_preset_lowers_the_test_nll_in_a_few_steps(name):
    if name in FAMILY_QUICK:
        pytest.importorskip("zuko")
    preset = load_preset(name)
    assert preset.training["iterations"] == 5000 and preset.training["lr"] >= 5e-3, "a quick preset: large steps"
    trainer = Trainer(preset.model_config(), preset.train_config(eval_every=0, test_size=2000))
    before = trainer.evaluate(fixed=True).value
    trainer.run(40 if name not in FAMILY_QUICK else 25)
    after = trainer.evaluate(fixed=True).value
    # 8gaussians starts near 5 nats under a fresh flow; 40 steps at the Monotone quick presets' Adam 2e-2 (25 for the
    # families, at 5e-3 or more) take it well below.
    assert after < before - 0.5, (before, after)
