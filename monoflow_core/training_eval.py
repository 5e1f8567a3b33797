"""The tests of a training run: :class:`TrainerEvaluation`, the evaluation half of
:class:`~monoflow_core.training.Trainer`.

A test never changes the training state: it runs on a detached copy of the evaluation weights (the EMA copy if
kept), in full float32 / float64 arithmetic (:func:`~monoflow_core.precision.full_precision`), inside
``torch.random.fork_rng``, in the dtype :mod:`monoflow_core.evaluation_policy` decides. Density tasks report the
negative log-likelihood in nats, regression the MSE, image tasks bits/dim (docs/algorithm.md section 9.1).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor

from . import evaluation
from .config import FlowConfig, TrainConfig, check_int
from .data import ToyStream, sample_staircase, sample_toy
from .data.images import ImageSet, load_image_set
from .data.points import PointSet
from .evaluation_policy import evaluation_copy, evaluation_dtype, image_test
from .flow import Flow
from .metrics import PAPER_PROTOCOL_TESTS, EvalMetrics, paper_protocol_value
from .precision import full_precision

__all__ = ["EVAL_CHUNK", "EVAL_STREAM_SEED_OFFSET", "TrainerEvaluation"]

#: The fresh-sample test stream is seeded with ``seed + EVAL_STREAM_SEED_OFFSET`` so it never repeats the
#: training batches.
EVAL_STREAM_SEED_OFFSET = 1_000_003

#: Chunk size (samples) for evaluations.
EVAL_CHUNK = 10_000


class TrainerEvaluation:
    """The tests of a :class:`~monoflow_core.training.Trainer`, one of its base classes.

    It holds no state of its own: the trainer's constructor sets the attributes declared here (the run's
    configuration, device and data, the flow and its EMA copy, the step counter and the test history).
    """

    train_config: TrainConfig
    model_config: FlowConfig
    task: str
    device: torch.device
    dtype: torch.dtype
    points: PointSet | None
    flow: Flow
    eval_history: list[EvalMetrics]
    _ema_flow: Flow | None
    _step: int
    _test_set: Any
    _eval_stream: ToyStream | None
    _eval_images: dict[str, ImageSet]

    @property
    def eval_flow(self) -> Flow:
        """The weights used for evaluation: the EMA copy if enabled, else the trained flow."""
        return self._ema_flow if self._ema_flow is not None else self.flow

    def evaluation_dtype(self) -> torch.dtype:
        """The dtype :meth:`evaluate` tests in by default."""
        return self._eval_dtype(None)

    def _eval_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        return evaluation_dtype(self.task, self.device, self.dtype, dtype)

    def evaluation_copy(self, dtype: torch.dtype | None = None) -> Flow:
        """A detached copy of the evaluation weights (EMA if kept), prepared for a test in ``dtype`` (default:
        :meth:`evaluation_dtype`; see :mod:`monoflow_core.evaluation_policy`). The live flow is untouched."""
        return evaluation_copy(self.eval_flow, self._eval_dtype(dtype))

    def _fixed_test_set(self) -> Any:
        if self._test_set is None:
            cfg = self.train_config
            if self.points is not None:
                self._test_set = self.points.test[: cfg.test_size]
            elif self.task == "density":
                self._test_set = sample_toy(cfg.data, cfg.test_size, rng=cfg.test_seed, dtype=torch.float64)
            else:
                self._test_set = sample_staircase(cfg.eval_size, rng=cfg.test_seed, dtype=torch.float64)
        return self._test_set

    @full_precision()
    def evaluate(
        self,
        n: int | None = None,
        fixed: bool = True,
        *,
        dtype: torch.dtype | None = None,
        record: bool = False,
        split: str | None = None,
    ) -> EvalMetrics:
        """Test the model (EMA weights if enabled) without changing the training state.

        Always in full float32 / float64 arithmetic (TF32 off, :func:`~monoflow_core.precision.full_precision`).
        Density tasks: the mean negative log-likelihood in nats, on the first ``n`` (default ``test_size``)
        points of the fixed seeded held-out set, or with ``fixed=False`` on ``n`` (default ``eval_size``) fresh
        points from a separate seeded stream (the paper's protocol, docs/algorithm.md §9.1). Regression: the test MSE
        on ``eval_size`` seeded points (the paper's 10,000) or on fresh ones.

        Args:
            n: number of test points (``None``: the configured size).
            fixed: the fixed held-out set (True) or fresh samples (False).
            dtype: evaluation dtype; ``None`` = float64 on CPU, the training dtype elsewhere.
            record: append the result to :attr:`eval_history`.
            split: image tasks: the split to test (default ``eval_split``); ignored otherwise.
        """
        t0 = time.perf_counter()
        cfg = self.train_config
        dt = self._eval_dtype(dtype)
        if n is not None:
            n = check_int("n", n, 1)
        if self.task == "image":
            result = self._evaluate_images(n, dt, split or cfg.eval_split)
            result.seconds = time.perf_counter() - t0
            if record:
                self.eval_history.append(result)
            return result
        fixed = fixed or self.points is not None  # a user's points have no fresh samples: the held-out part
        if fixed:
            data = self._fixed_test_set()
            size = data.shape[0] if isinstance(data, Tensor) else data[0].shape[0]
            if n is not None and n > size:
                raise ValueError(f"n: the fixed test set has {size} points, asked for {n}")
            if n is not None:
                data = data[:n] if isinstance(data, Tensor) else (data[0][:n], data[1][:n])
        else:
            assert self._eval_stream is not None
            data = self._eval_stream.sample(n if n is not None else cfg.eval_size, torch.float64)
        model = self.evaluation_copy(dt)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            # Seeded so that estimator-based (non-exact) test NLLs are reproducible.
            torch.manual_seed(cfg.test_seed)
            if self.task == "density":
                assert isinstance(data, Tensor)
                logp = evaluation.log_prob(model, data, chunk=EVAL_CHUNK)
                nll = float(-logp.mean())
                stderr = float(logp.std() / math.sqrt(logp.numel())) if logp.numel() > 1 else 0.0
                mse = None
                n_test = int(logp.numel())
            else:
                x, y = data
                mse = evaluation.test_mse(model, x, y, chunk=EVAL_CHUNK)
                nll, stderr = None, None
                n_test = int(x.shape[0])
        result = EvalMetrics(
            step=self._step,
            nll_nats=nll,
            mse=mse,
            n_test=n_test,
            seconds=time.perf_counter() - t0,
            exact=bool(model.logdet_is_exact),
            fixed=fixed,
            nll_stderr_nats=stderr,
            dtype=str(dt).replace("torch.", ""),
        )
        if record:
            self.eval_history.append(result)
        return result

    def evaluation_images(self, split: str | None = None) -> ImageSet:
        """An image split for evaluations (default ``eval_split``), loaded once."""
        cfg = self.train_config
        split = split or cfg.eval_split
        if split not in self._eval_images:
            self._eval_images[split] = load_image_set(cfg.data, split, cfg.data_dir)
        return self._eval_images[split]

    def _evaluate_images(self, n: int | None, dtype: torch.dtype, split: str) -> EvalMetrics:
        """Bits/dim on the first ``n`` (default ``eval_size``, at most all) images of the evaluation split.

        The dequantization noise comes from a generator seeded with ``test_seed``, so repeated evaluations of the
        same weights agree; with an estimated log-det the probes are seeded too.
        """
        cfg = self.train_config
        images = self.evaluation_images(split).images
        count = min(n if n is not None else cfg.eval_size, images.shape[0])
        model = self.evaluation_copy(dtype)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.test_seed)  # only a power-series log-det draws from it
            result = image_test(
                model,
                images[:count],
                step=self._step,
                seed=cfg.test_seed,
                split=split,
                dequantization=getattr(self.model_config, "dequantization", "uniform"),
            )
        assert result is not None
        return result

    def paper_protocol(self, last: int = PAPER_PROTOCOL_TESTS) -> float | None:
        """Mean of the last ``last`` recorded fresh-sample tests (nats or MSE); see :func:`paper_protocol_value`."""
        return paper_protocol_value(self.eval_history, last)
