"""A checkpoint's header does not grow with the number of steps (the step history lives in metrics.csv)."""

from __future__ import annotations

import dataclasses
import itertools
import struct

from monoflow_core import FlowConfig
from monoflow_core.training import (
    CHECKPOINT_HISTORY,
    PAPER_PROTOCOL_TESTS,
    TrainConfig,
    Trainer,
    paper_protocol_value,
    thin_records,
)


def _header_bytes(path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def _simulate(trainer: Trainer, steps: int) -> None:
    """Fill the trainer's histories as ``steps`` iterations with a test every 100 would have."""
    template = trainer.history[-1]
    test = trainer.eval_history[-1]
    trainer.history.clear()
    trainer.history.extend(dataclasses.replace(template, step=i, loss=float(i)) for i in range(steps))
    trainer.eval_history = [dataclasses.replace(test, step=i, nll_nats=float(i)) for i in range(99, steps, 100)]


def test_header_size_does_not_grow_with_steps(tmp_path):
    trainer = Trainer(
        FlowConfig(blocks=1, growth=8),
        TrainConfig(batch_size=16, eval_every=1, eval_size=64, test_size=64),
        history_length=200_000,
    )
    trainer.run(1)
    sizes = {}
    for steps in (60_000, 100_000):
        _simulate(trainer, steps)
        path = tmp_path / f"{steps}.safetensors"
        trainer.save_checkpoint(path)
        sizes[steps] = _header_bytes(path)
    # Both past the thinning limit: more steps may only change the digits of the recorded numbers.
    assert sizes[100_000] < 1.05 * sizes[60_000], sizes
    assert sizes[100_000] < 400_000, sizes

    resumed = Trainer.resume(tmp_path / "100000.safetensors")
    assert len(resumed.history) == CHECKPOINT_HISTORY
    assert resumed.history[-1].step == 99_999 and resumed.history[0].step == 0
    assert len(resumed.eval_history) == CHECKPOINT_HISTORY
    # The paper protocol (mean of the last 20 tests) is exactly what the straight run had.
    assert resumed.paper_protocol() == paper_protocol_value(trainer.eval_history)
    tail = [e.step for e in resumed.eval_history[-PAPER_PROTOCOL_TESTS:]]
    assert tail == [e.step for e in trainer.eval_history[-PAPER_PROTOCOL_TESTS:]]


def test_thin_records_keeps_the_tail_and_spreads_the_rest():
    records = list(range(10_000))
    thinned = thin_records(records, 100, keep_last=20)
    assert len(thinned) == 100
    assert thinned[-20:] == records[-20:]
    assert thinned[0] == 0 and thinned == sorted(thinned)
    gaps = {b - a for a, b in itertools.pairwise(thinned[:80])}
    assert max(gaps) - min(gaps) <= 1  # evenly spaced over the older part
    assert thin_records(records[:50], 100) == records[:50]
    assert thin_records(records, 5, keep_last=20) == records[-5:]
