"""What a training run records: per-step and per-test metrics, the run summary and the paper protocol.

Kept apart from the trainer so that checkpoints (which store and check these records) never depend on the
training loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PAPER_PROTOCOL_TESTS",
    "TRAINER_STATE_FORMAT",
    "EvalMetrics",
    "RunSummary",
    "StepMetrics",
    "paper_protocol_nll",
    "paper_protocol_value",
]

#: Table 1 of Ahn et al. (2022, arXiv:2210.08176) reports the mean of the last 20 tests.
PAPER_PROTOCOL_TESTS = 20

#: Format tag of :meth:`monoflow_core.training.Trainer.state_dict`.
TRAINER_STATE_FORMAT = "monoflow-trainer-state/1"


@dataclass
class StepMetrics:
    """What one training iteration did.

    Attributes:
        step: 0-based index of the iteration.
        loss: the training loss: NLL in nats (density tasks) or MSE (regression); NaN/inf when rejected.
        lr: learning rate used.
        grad_norm: global gradient norm before clipping (NaN when no gradient was computed).
        seconds: wall time of the iteration, in seconds.
        rejected: whether the optimizer step was skipped or undone (non-finite loss, gradient or parameters).
        message: why it was rejected ("" otherwise).
        solver_iterations_mean: forward-solve G-evaluations per sample, summed over blocks (whole-flow cost).
        solver_iterations_max: largest per-sample forward-solve iteration count of any block.
        solver_failed: samples that missed the solver tolerance, summed over blocks.
        exact: whether the loss used exact log-dets (False: an unbiased estimate).
    """

    step: int
    loss: float
    lr: float
    grad_norm: float
    seconds: float
    rejected: bool = False
    message: str = ""
    solver_iterations_mean: float = 0.0
    solver_iterations_max: int = 0
    solver_failed: int = 0
    exact: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepMetrics:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class EvalMetrics:
    """One test of the model.

    Attributes:
        step: iterations completed when the test ran.
        nll_nats: mean test negative log-likelihood in nats (density tasks), else ``None``.
        nll_stderr_nats: standard error of that mean, in nats.
        mse: mean test squared error (regression), else ``None``.
        n_test: number of test points.
        seconds: wall time of the evaluation, in seconds.
        exact: whether the log-dets were exact; if False ``nll_nats`` is a stochastic *estimate*.
        fixed: True for the fixed seeded held-out set, False for fresh samples (the paper's protocol).
        dtype: the dtype the evaluation ran in.
        bpd: image tasks: mean test bits per dimension (the dequantization bound, docs/algorithm.md section 9.3), else
            ``None``. ``nll_nats`` then holds the same bound in nats per image.
        bpd_stderr: standard error of ``bpd`` over the test images (bits/dim).
        split: image tasks: the split evaluated (``"test"`` or ``"validation"``).
        dequantization: image tasks: ``"uniform"`` or ``"variational"`` (an ELBO).
    """

    step: int
    nll_nats: float | None
    mse: float | None
    n_test: int
    seconds: float
    exact: bool
    fixed: bool
    nll_stderr_nats: float | None = None
    dtype: str = "float64"
    bpd: float | None = None
    bpd_stderr: float | None = None
    split: str = ""
    dequantization: str = ""

    @property
    def value(self) -> float:
        """The headline number: bits/dim (images), NLL in nats (2-D densities) or MSE."""
        if self.bpd is not None:
            return float(self.bpd)
        return float(self.nll_nats if self.nll_nats is not None else self.mse)  # type: ignore[arg-type]

    def describe(self) -> str:
        """A one-line human-readable summary with units."""
        if self.bpd is not None:
            how = "exact log-det" if self.exact else "power-series log-det estimate"
            bound = "ELBO, variational" if self.dequantization == "variational" else "uniform"
            return (
                f"step {self.step}: {self.split} bpd {self.bpd:.4f} +- {self.bpd_stderr or 0.0:.4f} bits/dim on "
                f"{self.n_test} {self.split} images ({how}; {bound} dequantization bound)"
            )
        where = "held-out" if self.fixed else "fresh"
        if self.nll_nats is not None:
            label = "test NLL" if self.exact else "test NLL (estimate)"
            err = f" +- {self.nll_stderr_nats:.4f}" if self.nll_stderr_nats is not None else ""
            return f"step {self.step}: {label} {self.nll_nats:.4f}{err} nats on {self.n_test} {where} points"
        return f"step {self.step}: test MSE {self.mse:.4g} on {self.n_test} {where} points"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalMetrics:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def paper_protocol_value(evals: Iterable[EvalMetrics], last: int = PAPER_PROTOCOL_TESTS) -> float | None:
    """Mean of the last ``last`` fresh-sample tests: Table 1's protocol (Ahn et al. 2022; docs/algorithm.md §9.1).

    Returns the mean test NLL in nats (density) or MSE (regression) over at most ``last`` of the most recent
    tests with ``fixed == False``, or ``None`` if there are none.
    """
    values = [e.value for e in evals if not e.fixed]
    if not values:
        return None
    tail = values[-last:]
    return float(sum(tail) / len(tail))


def paper_protocol_nll(evals: Iterable[EvalMetrics], last: int = PAPER_PROTOCOL_TESTS) -> float | None:
    """Table 1's number in nats: mean test NLL of the last ``last`` fresh-sample tests (density tasks only)."""
    return paper_protocol_value([e for e in evals if e.nll_nats is not None], last)


@dataclass
class RunSummary:
    """What :meth:`Trainer.run` did.

    Attributes:
        steps_run: iterations run by this call.
        step: iterations completed in total.
        seconds: wall time of the call, in seconds.
        rejected_steps: iterations of this call whose optimizer step was skipped.
        last_loss: the last training loss (nats or MSE).
        paper_protocol: mean of the last 20 fresh-sample tests (nats or MSE), ``None`` without tests.
        paper_protocol_tests: how many tests that mean covers (the paper uses 20).
        last_eval: the last test, if any.
        stopped_early: whether the callback stopped the run.
        task: ``"density"`` or ``"regression"``.
    """

    steps_run: int
    step: int
    seconds: float
    rejected_steps: int
    last_loss: float | None
    paper_protocol: float | None
    paper_protocol_tests: int
    last_eval: EvalMetrics | None
    stopped_early: bool
    task: str

    def describe(self) -> str:
        if self.task == "image":
            last = f"; last {self.last_eval.describe()}" if self.last_eval is not None else ""
            return f"{self.steps_run} iterations in {self.seconds:.1f} s (step {self.step}){last}"
        unit = " nats" if self.task == "density" else ""
        what = "test NLL" if self.task == "density" else "test MSE"
        pp = (
            f"; paper protocol ({what}, mean of last {self.paper_protocol_tests} fresh tests): "
            f"{self.paper_protocol:.4f}{unit}"
            if self.paper_protocol is not None
            else ""
        )
        return f"{self.steps_run} iterations in {self.seconds:.1f} s (step {self.step}){pp}"
