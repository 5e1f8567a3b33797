"""The rules of every reported test, in one place: its dtype, the evaluation copy, and the image test.

The trainer (:meth:`~monoflow_core.training.Trainer.evaluate`), the command line (``monoflow eval`` and the tests
printed by ``monoflow train``) and the studio (its bits/dim tests, run off the training thread) all call these, so
a checkpoint gets the same figure wherever it is tested (``tests/core/test_evaluation_policy.py`` checks it).

* **dtype.** Likelihoods of 2-D and 1-D flows are tested in float64 on the CPU: about 1.8x the cost of float32
  there, and no test point is held back by float32's solver-tolerance floor (docs/performance.md). Image flows
  and GPU runs test in their training dtype: float64 convolutions are about 10x slower on CPUs (oneDNN has no
  float64 path) and an exact image log-det needs ~65 evaluations of G. Pictures and samples are not tests: they
  use the training dtype (``monoflow density`` / ``sample``, the studio's frames).
* **Evaluation copy.** A detached copy of the evaluation weights (the EMA if kept) in eval mode and the test
  dtype; power-iterated spectral norms are tightened on it with :data:`EVAL_POWER_ITERATIONS` iterations, as the
  released code does before testing, so that testing never changes the training trajectory.
* **Image test.** Bits/dim with dequantization noise seeded by the run's ``test_seed`` (Ahn et al. 2022, sec. 5;
  Residual Flows' protocol), mean and standard error; nats are bits/dim times ``D log 2``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor, nn

from . import evaluation
from .metrics import EvalMetrics
from .nn.lipschitz import spectral_layers, update_lipschitz

__all__ = ["EVAL_POWER_ITERATIONS", "evaluation_copy", "evaluation_dtype", "image_test", "prepare_for_test"]

#: Power iterations that tighten each power-iterated spectral norm of an evaluation copy (the released code: 200).
EVAL_POWER_ITERATIONS = 200

_M = TypeVar("_M", bound=nn.Module)


def evaluation_dtype(
    task: str, device: torch.device, training_dtype: torch.dtype, requested: torch.dtype | None = None
) -> torch.dtype:
    """The dtype a reported test runs in: ``requested`` if given, else the rule in the module docstring.

    Args:
        task: ``"density"``, ``"regression"`` or ``"image"``.
        device: where the model lives.
        training_dtype: the dtype the model trains in.
        requested: an explicit choice (``--dtype``), which always wins.
    """
    if requested is not None:
        return requested
    if task == "image" or device.type != "cpu":
        return training_dtype
    return torch.float64


def prepare_for_test(model: _M) -> _M:
    """Puts ``model`` (already a private copy) in eval mode and tightens its power-iterated spectral norms."""
    model.eval()
    if any(layer.mode == "power" for layer in spectral_layers(model)):
        update_lipschitz(model, EVAL_POWER_ITERATIONS)
    return model


def evaluation_copy(flow: _M, dtype: torch.dtype) -> _M:
    """A detached copy of ``flow`` in ``dtype``, prepared for a test (:func:`prepare_for_test`); ``flow`` is
    untouched."""
    return prepare_for_test(copy.deepcopy(flow).to(dtype=dtype))


def image_test(
    model: nn.Module,
    images: Tensor,
    *,
    step: int,
    seed: int,
    split: str,
    dequantization: str,
    slice_size: int = evaluation.IMAGE_NOISE_BLOCK,
    stop: Callable[[], bool] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EvalMetrics | None:
    """Bits/dim of a prepared evaluation model on integer images, as an :class:`~monoflow_core.metrics.EvalMetrics`.

    Args:
        model: an image flow from :func:`evaluation_copy` (or prepared with :func:`prepare_for_test`).
        images: integer images (N, C, H, W).
        step: the training step the weights come from.
        seed: the run's ``test_seed`` (dequantization noise; the result does not depend on ``slice_size``).
        split: the split the images come from.
        dequantization: the model's dequantization (recorded in the result).
        slice_size: images per forward pass.
        stop: polled between slices; True abandons the test (returns ``None``).
        progress: called after every slice with (images done, total).
    """
    t0 = time.perf_counter()
    bpd = evaluation.image_bpd(model, images, seed=seed, slice_size=slice_size, stop=stop, progress=progress)
    if bpd is None:
        return None
    mean = float(bpd.mean())
    stderr = float(bpd.std() / math.sqrt(bpd.numel())) if bpd.numel() > 1 else 0.0
    nats_per_bit = math.prod(images.shape[1:]) * math.log(2.0)  # D log 2, with D = C H W the flow's dimension
    dtype = next(model.parameters()).dtype
    return EvalMetrics(
        step=step,
        nll_nats=mean * nats_per_bit,
        mse=None,
        n_test=int(bpd.numel()),
        seconds=time.perf_counter() - t0,
        exact=bool(getattr(model, "logdet_is_exact", False)),
        fixed=True,
        nll_stderr_nats=stderr * nats_per_bit,
        dtype=str(dtype).replace("torch.", ""),
        bpd=mean,
        bpd_stderr=stderr,
        split=split,
        dequantization=dequantization,
    )
