"""The valid ranges of the configurations' numeric fields: one source for the validators and the studio.

:class:`~monoflow_core.config.FlowConfig` and :class:`~monoflow_core.config.TrainConfig` check their numeric fields
against these tables, the live changes of a running model (``Flow.set_solver_options``, ``Trainer.set_lr``) against
the same entries, and the studio's controls take their limits from here, so a control can never offer a value the
engine refuses, nor refuse one it accepts at the edge it shares with the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["INTERVALS", "MINIMUM", "Interval", "check_in"]


@dataclass(frozen=True)
class Interval:
    """The real numbers between ``low`` and ``high``; an end is open (excluded) or closed, ``None`` is unbounded.

    Attributes:
        low: the lower end, or ``None``.
        high: the upper end, or ``None``.
        low_open: ``low`` itself is excluded.
        high_open: ``high`` itself is excluded.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def rule(self) -> str:
        """The condition in words, as error messages state it: ``"lie in (0, 1)"``, ``"be > 0"``, ``"be >= 0"``."""
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"lie in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"be {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"be {'<' if self.high_open else '<='} {self.high:g}"
        return "be a number"

    def inside(self, resolution: float) -> tuple[float | None, float | None]:
        """The closed ends of the values a control stepping by ``resolution`` can show inside the interval.

        A closed end is itself; an open end moves one ``resolution`` inwards (for ``(0, 1)`` at 0.001: 0.001 and
        0.999); an unbounded end stays ``None`` (the control chooses its own limit there).
        """
        low = None if self.low is None else self.low + resolution if self.low_open else self.low
        high = None if self.high is None else self.high - resolution if self.high_open else self.high
        return low, high


def check_in(name: str, value: float, interval: Interval) -> float:
    """``value`` if it lies in ``interval``, else ``ValueError("name: must lie in ..., got value")``."""
    if value not in interval:
        raise ValueError(f"{name}: must {interval.rule()}, got {value!r}")
    return value


#: The smallest value of each integer field of the configurations (none of them has an upper limit).
MINIMUM: dict[str, int] = {
    # FlowConfig
    "dim": 1,
    "blocks": 1,
    "depth": 1,
    "growth": 2,
    "hidden": 1,
    "max_iter": 1,
    "anderson_memory": 1,
    "n_exact_terms": 1,
    "n_exact_terms_eval": 1,
    "n_probes": 1,
    "blocks_per_scale": 0,
    "fc_blocks": 0,
    "fc_growth": 2,
    "vdq_blocks": 1,
    "vdq_channels": 1,
    "levels": 2,
    "image_shape": 1,
    "bins": 2,
    # TrainConfig
    "iterations": 1,
    "batch_size": 1,
    "lr_milestones": 1,
    "warmup_iterations": 0,
    "concat_learnable_from": 0,
    "lipschitz_iterations": 0,
    "seed": 0,
    "eval_every": 0,
    "eval_size": 1,
    "test_size": 1,
    "test_seed": 0,
    "max_rejected_steps": 1,
    "checkpoint_every": 0,
    "grad_accumulation": 1,
}

#: The valid interval of each real-valued field of the configurations.
INTERVALS: dict[str, Interval] = {
    # FlowConfig. The Lipschitz coefficient must stay below 1 for the blocks to be invertible (Ahn et al. 2022,
    # section 3); a relative tolerance of 1 or more would accept any iterate.
    "lipschitz": Interval(0.0, 1.0, low_open=True, high_open=True),
    "concat_lipschitz": Interval(0.0, 1.0, low_open=True),
    "tol": Interval(0.0, 1.0, low_open=True, high_open=True),
    "logit_alpha": Interval(0.0, 0.5, high_open=True),
    # TrainConfig
    "lr": Interval(0.0, low_open=True),
    "lr_gamma": Interval(0.0, low_open=True),
    "weight_decay": Interval(0.0),
    "betas": Interval(0.0, 1.0, high_open=True),
    "grad_clip": Interval(0.0, low_open=True),
    "ema": Interval(0.0, 1.0, low_open=True, high_open=True),
}
