"""The one training loop of monoflow: :class:`TrainConfig`, :class:`Trainer`, metrics and the paper protocol.

The CLI and the studio's worker thread both drive :class:`Trainer`; neither adds any mathematics. A trainer owns
the flow, an Adam optimizer, a seeded resumable stream of fresh training batches and the bookkeeping around them
(learning-rate schedule, learnable-concatenation schedule, power iterations, EMA, NaN guard, metrics).

Two kinds of task, chosen by the data set:

* **density** (the eight 2-D toy densities): loss = ``-mean log p(x)`` in nats, with
  ``log p(x) = log N(F(x); 0, I) + log|det J_F(x)|`` (docs/algorithm.md section 1);
* **regression** (``"staircase"``): the flow is used as a map ``x -> y`` and trained on the mean squared error
  (Ahn et al. 2022, Figure 4; docs/algorithm.md section 9.2).

The published protocols (docs/algorithm.md section 9.1) are reproduced by the defaults: Adam with lr 1e-3, betas
(0.9, 0.999) and coupled weight decay 1e-5, batches of 500 fresh samples, 5 power iterations after every step,
concatenation weights frozen for the first 25,000 iterations, a test on 10,000 fresh samples every 100 iterations
and the mean of the last 20 tests as the reported number (:func:`paper_protocol_value`).
"""

from __future__ import annotations

import bisect
import copy
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from . import evaluation
from .blocks import ActNorm
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from .config import DTYPES, SCHEDULES, FlowConfig, TrainConfig, check_float, check_int
from .data import ToyStream, sample_staircase, sample_toy
from .data.images import ImageSet, ImageStream, load_image_set
from .data.points import POINTS_DATA, PointSet, PointStream
from .distributed import DistributedContext
from .evaluation_policy import evaluation_copy, evaluation_dtype, image_test
from .flow import Flow
from .image_layers import ActNorm2d
from .metrics import (
    PAPER_PROTOCOL_TESTS,
    TRAINER_STATE_FORMAT,
    EvalMetrics,
    RunSummary,
    StepMetrics,
    paper_protocol_nll,
    paper_protocol_value,
)
from .models import build_flow
from .multiscale import MultiscaleFlow
from .nn.lipschitz import update_lipschitz
from .precision import PrecisionPolicy, full_precision, resolve_precision

#: Held while a trainer seeds torch's global generator and builds its flow (see Trainer.__init__).
_SEEDED_BUILD = threading.Lock()

__all__ = [
    "DTYPES",
    "PAPER_PROTOCOL_TESTS",
    "SCHEDULES",
    "EvalMetrics",
    "RunSummary",
    "StepMetrics",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "lr_factor",
    "paper_protocol_nll",
    "paper_protocol_value",
]


#: Power iterations before an evaluation (the released code's 200; only layers in ``"power"`` mode need them).

#: The fresh-sample test stream is seeded with ``seed + EVAL_STREAM_SEED_OFFSET`` so it never repeats the
#: training batches.
EVAL_STREAM_SEED_OFFSET = 1_000_003

#: Chunk size (samples) for evaluations.
EVAL_CHUNK = 10_000

#: The dequantization noise generator is seeded with ``seed + NOISE_SEED_OFFSET``.
NOISE_SEED_OFFSET = 7919


# A checkpoint's header keeps at most this many step records and this many test records, thinned evenly over the
# run (the newest always kept, and the last PAPER_PROTOCOL_TESTS tests intact): the header's size and the save's time
# must not grow with the number of steps (the whole history lives in the run's metrics.csv). At about 250 bytes a
# record the thinned histories stay below 200 KB.
CHECKPOINT_HISTORY = 512


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. too many consecutive steps with a non-finite loss or gradient)."""


def lr_factor(config: TrainConfig, step: int) -> float:
    """Multiplier of the base learning rate at (0-based) iteration ``step``.

    Linear warm-up ``(step + 1) / warmup_iterations`` for the first ``warmup_iterations`` iterations; for
    ``"step"``, times ``lr_gamma ** (number of milestones <= step)`` (``torch.optim.lr_scheduler.MultiStepLR``
    semantics: the paper's 1-D run uses 0.01 up to iteration 4,999 and 0.002 from 5,000).
    """
    factor = 1.0
    if config.warmup_iterations > 0 and step < config.warmup_iterations:
        factor *= (step + 1) / config.warmup_iterations
    if config.schedule == "step":
        factor *= config.lr_gamma ** bisect.bisect_right(config.lr_milestones, step)
    return factor


# --------------------------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------------------------


StepCallback = Callable[[StepMetrics, EvalMetrics | None], Any]


def thin_records(records: list[Any], limit: int, *, keep_last: int = 1) -> list[Any]:
    """At most ``limit`` of ``records``, evenly spaced over the whole list, with the last ``keep_last`` kept whole.

    Used to bound a checkpoint's copy of the step and test histories: a curve redrawn from the thinned records
    keeps its shape over the whole run, and the most recent records (the paper protocol's last tests) are exact.

    Args:
        records: the records, oldest first.
        limit: the largest number of records returned (at least ``keep_last``).
        keep_last: how many of the newest records are always kept.

    Returns:
        A new list, oldest first.
    """
    if len(records) <= limit:
        return list(records)
    keep_last = min(keep_last, limit)
    head, tail = records[: len(records) - keep_last], records[len(records) - keep_last :]
    room = limit - keep_last
    if room <= 0 or not head:
        return list(tail)
    # Evenly spaced indices over the older part, its first record included.
    picked = sorted({(i * len(head)) // room for i in range(room)})
    return [head[i] for i in picked] + list(tail)


def make_adam(params: Iterable[Tensor], **kwargs: Any) -> torch.optim.Adam:
    """Adam with the fused kernel where this torch build has it (same algorithm; about 7x faster here for the
    hundred small tensors of a toy flow: 1.2 ms instead of 7.8 ms per step), else the ``foreach`` one."""
    params = list(params)
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, foreach=True, **kwargs)


class Trainer:
    """Trains a flow on a toy density (maximum likelihood) or on the 1-D staircase (MSE).

    One :meth:`step` = fresh batch, forward, backward, gradient-norm check and clipping, Adam step,
    ``update_lipschitz`` power iterations, EMA update. Steps with a non-finite loss or gradient, or whose update
    overflows a parameter (e.g. a huge learning rate), are *rejected*: parameters and optimizer state stay
    bit-identical, and after ``max_rejected_steps`` consecutive rejections a :class:`TrainingError` is raised.
    Between steps the learning rate and solver settings may be changed live
    (:meth:`set_lr`, :meth:`set_solver`). :meth:`state_dict` / :meth:`load_state_dict` capture everything
    needed for a bit-for-bit resumption (on the same device, same seed).

    Randomness: the weights come from ``torch.manual_seed(seed)`` immediately before building the flow (so the
    same seed gives the same weights; note this reseeds torch's global generator); training batches come from a
    :class:`~monoflow_core.data.ToyStream` with its own numpy generator; the only torch randomness during
    training is the power-series log-det estimator's (global generator, saved in :meth:`state_dict`).
    Evaluations run inside ``torch.random.fork_rng`` so they never perturb the training stream.

    Args:
        model_config: the flow's architecture.
        train_config: the run's settings.
        flow: an already built flow (e.g. from a checkpoint) to train instead of ``build_flow(model_config)``.
        history_length: how many :class:`StepMetrics` :attr:`history` keeps.
        images: image runs: train on this in-memory set instead of loading ``train_config.data`` (e.g. synthetic
            or user arrays; a checkpoint of such a run resumes only with the same ``images`` passed again).
        eval_images: image runs with ``images``: the set evaluations of ``eval_split`` use (default: that split
            of ``train_config.data``, loaded when first needed).
        points: runs on ``data = "points"``: the user's :class:`~monoflow_core.data.points.PointSet` (batches from
            its training part, tests on its held-out part; checkpoints store it, so a resume needs nothing else).

    Attributes:
        flow: the flow being trained.
        optimizer: the Adam optimizer.
        history: the most recent step metrics.
        eval_history: every test recorded by :meth:`run` (and by :meth:`evaluate` with ``record=True``).
        loss_transform: optional ``loss -> loss`` hook applied before the finiteness check (for tests and
            diagnostics, e.g. to inject a NaN).
    """

    def __init__(
        self,
        model_config: FlowConfig,
        train_config: TrainConfig,
        flow: Flow | None = None,
        *,
        history_length: int = 10_000,
        images: ImageSet | None = None,
        eval_images: ImageSet | None = None,
        points: PointSet | None = None,
    ) -> None:
        model_config.validate()
        train_config.validate()
        if (points is not None) != (train_config.data == POINTS_DATA):
            raise ValueError(
                f"data: a PointSet goes with data {POINTS_DATA!r} and only with it (got data "
                f"{train_config.data!r} and {'a' if points is not None else 'no'} PointSet)"
            )
        #: The user's points of a ``"points"`` run, else None.
        self.points: PointSet | None = points
        self.model_config = model_config
        self.train_config = train_config
        self.task = train_config.task
        self._train_images: ImageSet | None = None
        self._eval_images: dict[str, ImageSet] = {}
        if images is not None or eval_images is not None:
            if train_config.task != "image" or images is None:
                raise ValueError(
                    "images: in-memory training images need an image data set in the training config and a training set"
                )
            self._train_images = images
            if eval_images is not None:
                self._eval_images = {train_config.eval_split: eval_images}
        elif self.task == "image":
            # First, so that a missing or malformed data file is the error a user sees.
            self._train_images = load_image_set(train_config.data, "train", train_config.data_dir)
        self.device = torch.device(train_config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: {train_config.device!r} requested but CUDA is not available (pass --device cpu)")
        self.dtype = train_config.torch_dtype
        # How G is computed in training (TF32 or not, and the solvers' floor); evaluations use full precision.
        self.precision: PrecisionPolicy = resolve_precision(train_config.precision, self.device, self.dtype)
        self.dist = DistributedContext.current()
        if self._train_images is not None:
            # The data decide the image shape and the number of levels; the architecture comes from the config.
            shape = list(self._train_images.image_shape)
            if flow is None:
                model_config = model_config.replace(image_shape=shape, levels=self._train_images.levels)
                self.model_config = model_config
            elif list(flow.event_shape) != shape or getattr(flow, "levels", None) != self._train_images.levels:
                raise ValueError(
                    f"data: {train_config.data!r} has images of shape {tuple(shape)} with "
                    f"{self._train_images.levels} levels; the flow models {flow.event_shape} with "
                    f"{getattr(flow, 'levels', None)} levels"
                )
        # Seeding and building under one lock: two trainers built at once in two threads (the studio's compare
        # mode) would otherwise interleave their draws from the global generator and get unreproducible weights.
        with _SEEDED_BUILD:
            torch.manual_seed(train_config.seed)
            if flow is None:
                flow = build_flow(model_config)
        self.flow: Flow = flow.to(device=self.device, dtype=self.dtype)
        if self.task != "image":
            expected = 2 if self.task == "density" else 1
            if self.flow.event_shape != (expected,):
                raise ValueError(
                    f"data: {train_config.data!r} needs a flow on {expected}-D samples (FlowConfig.dim = "
                    f"{expected}), the flow has event shape {self.flow.event_shape}"
                )
        # Every process starts from rank 0's weights and power-iteration vectors.
        self.dist.broadcast_module(self.flow)
        if self.dist.active:
            # Independent estimator probes on each process (the weights above came from the shared seed).
            torch.manual_seed(train_config.seed + 1_000_003 * self.dist.rank)
        self.optimizer = make_adam(
            self.flow.parameters(),
            lr=train_config.lr,
            betas=tuple(train_config.betas),
            weight_decay=train_config.weight_decay,
        )
        self._base_lr = float(train_config.lr)
        self._stream: ToyStream | ImageStream | PointStream
        self._eval_stream: ToyStream | None
        if self._train_images is not None:
            self._stream = ImageStream(self._train_images, train_config.seed)
            self._eval_stream = None
        elif points is not None:
            # No fresh samples of a user's points: every test uses the held-out part.
            self._stream = PointStream(points, train_config.seed)
            self._eval_stream = None
        else:
            self._stream = ToyStream(train_config.data, train_config.seed)
            self._eval_stream = ToyStream(train_config.data, train_config.seed + EVAL_STREAM_SEED_OFFSET)
        # Dequantization noise comes from its own CPU generator, so runs are reproducible on any device.
        self._noise_generator = torch.Generator().manual_seed(train_config.seed + NOISE_SEED_OFFSET)
        self._ema_flow: Flow | None = copy.deepcopy(self.flow) if train_config.ema is not None else None
        self._ema_updates = 0
        self._step = 0
        self._consecutive_rejections = 0
        self._rejected_total = 0
        # Largest |parameter| after the last optimizer step and the parameters' version sum then: while neither the
        # parameters changed since nor the next step can reach float overflow, that step needs no backup.
        self._param_peak: float | None = None
        self._param_versions = -1
        self._concat_state: bool | None = None
        self._test_set: Any = None
        self.history: deque[StepMetrics] = deque(maxlen=history_length)
        self.eval_history: list[EvalMetrics] = []
        self.loss_transform: Callable[[Tensor], Tensor] | None = None
        # The flow's modules and parameters, listed once (the trainer built the flow, whose structure stays fixed):
        # walking the module tree on every step (train mode, ActNorm checks, gradient norms) cost about 1 ms a step
        # for the 2-D toy model's 120 modules and 90 parameter tensors, a tenth of its step.
        self._modules = list(self.flow.modules())
        self._actnorms = [m for m in self._modules if isinstance(m, ActNorm | ActNorm2d)]
        self._params = list(self.flow.parameters())
        self._apply_schedules(0)

    # -- properties and live controls ---------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """Iterations completed (rejected ones included)."""
        return self._step

    @property
    def base_lr(self) -> float:
        """The learning rate before the schedule's factor."""
        return self._base_lr

    @property
    def current_lr(self) -> float:
        """The learning rate the next step will use."""
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def rejected_total(self) -> int:
        """Rejected iterations so far."""
        return self._rejected_total

    @property
    def eval_flow(self) -> Flow:
        """The weights used for evaluation: the EMA copy if enabled, else the trained flow."""
        return self._ema_flow if self._ema_flow is not None else self.flow

    def set_lr(self, lr: float) -> None:
        """Change the base learning rate from the next step on (the schedule's factor still applies)."""
        lr = check_float("lr", lr)
        if not lr > 0:
            raise ValueError(f"lr: must be > 0, got {lr!r}")
        self._base_lr = lr
        # Keep the stored configuration truthful, so checkpoints and config.json record the rate in use.
        self.train_config.lr = lr
        self._apply_lr(self._step)

    def set_precision(self, precision: str) -> None:
        """Change the precision policy (``TrainConfig.precision``) from the next step on."""
        self.precision = resolve_precision(precision, self.device, self.dtype)
        self.train_config.precision = self.precision.requested

    def set_solver(self, tol: float | None = None, max_iter: int | None = None, solver: str | None = None) -> None:
        """Change the fixed-point solver settings of every block from the next pass on (no rebuild)."""
        for f in (self.flow, self._ema_flow):
            if f is not None:
                f.set_solver_options(solver=solver, tol=tol, max_iter=max_iter)

    # -- schedules -----------------------------------------------------------------------------------------
    def _apply_lr(self, step: int) -> None:
        lr = self._base_lr * lr_factor(self.train_config, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _apply_concat(self, step: int) -> None:
        start = self.train_config.concat_learnable_from
        if start is None:
            return
        learnable = step >= start
        if learnable == self._concat_state:
            return
        for module in self.flow.modules():
            set_learnable = getattr(module, "set_concat_learnable", None)
            if set_learnable is not None:  # the dense and the conv DenseNet G
                set_learnable(learnable)
        self._concat_state = learnable

    def _apply_schedules(self, step: int) -> None:
        self._apply_lr(step)
        self._apply_concat(step)

    # -- one step -----------------------------------------------------------------------------------------
    def _next_batch(self) -> tuple[Tensor, ...]:
        """The global batch as a tuple of tensors on the device: ``(x,)``, ``(x, y)`` or ``(images, noise)``."""
        if isinstance(self._stream, ImageStream):
            images = self._stream.sample(self.train_config.batch_size)
            noise = self._draw_noise(images.shape)
            return images.to(self.device), noise
        batch = self._stream.sample(self.train_config.batch_size, self.dtype)
        if isinstance(batch, tuple):
            return tuple(b.to(self.device) for b in batch)
        return (batch.to(self.device),)

    def _draw_noise(self, shape: torch.Size) -> Tensor:
        from .dequantization import draw_noise

        flow = cast(MultiscaleFlow, self.flow)  # the image task's flow (its levels were checked in __init__)
        noise = draw_noise(flow.dequantizer, shape, self.dtype, "cpu", self._noise_generator)
        return noise.to(self.device)

    def _loss_sum(self, batch: tuple[Tensor, ...]) -> Tensor:
        """The sum over the batch's samples of each sample's share of the loss (divide by the global batch).

        Images: bits/dim of each image; densities: negative log-likelihood in nats; regression: the squared
        error summed over output dimensions divided by their number (so the mean is the MSE).
        """
        if self.task == "image":
            images, noise = batch
            flow = cast(MultiscaleFlow, self.flow)  # the image task's flow (its levels were checked in __init__)
            return flow.bpd(images, noise=noise).sum()
        if self.task == "density":
            return -self.flow.log_prob(batch[0]).sum()
        x, y = batch
        y_hat, _ = self.flow(x)
        return ((y_hat - y) ** 2).reshape(x.shape[0], -1).mean(dim=1).sum()

    def _needs_actnorm_init(self) -> bool:
        return any(not m.is_initialized for m in self._actnorms)

    def _initialize_actnorm(self, batch: tuple[Tensor, ...]) -> None:
        """ActNorm's data-dependent initialisation from the whole global batch (no gradient).

        Every process holds the global batch, so in a data-parallel run every process computes the same
        statistics, identical to a single-process run; gradient-accumulation chunks also see one initialisation.
        """
        with torch.no_grad():
            self._loss_sum(batch)

    def _grad_norm(self) -> float:
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return 0.0
        # One fused kernel for all per-tensor norms (a per-tensor loop costs ~200 operators per step here).
        norms = torch.stack(torch._foreach_norm([g.detach() for g in grads])).to(torch.float64)
        return float(torch.linalg.vector_norm(norms))

    def _clip(self, norm: float) -> None:
        clip = self.train_config.grad_clip
        if clip is None:
            return
        # Same rule as torch.nn.utils.clip_grad_norm_, applied to the norm already measured.
        coef = clip / (norm + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_([p.grad.detach() for p in self._params if p.grad is not None], coef)

    def _snapshot(self) -> dict[str, Tensor] | None:
        """A copy of the flow's state when the forward pass itself may modify it (ActNorm's data init)."""
        if self._needs_actnorm_init():
            return {k: v.detach().clone() for k, v in self.flow.state_dict().items()}
        return None

    def _adam_step_bound(self) -> float:
        """An upper bound on how far the next optimizer step moves any parameter entry (``inf``: none known).

        Adam moves an entry by ``lr |m_hat| / (sqrt(v_hat) + eps)`` whatever the gradients: with
        ``r = beta1^2 / beta2 < 1``, Cauchy-Schwarz over the two moving averages bounds ``|m_hat| / sqrt(v_hat)`` by
        ``1 / sqrt((1 - beta2) (1 - r))`` (about 73 for the default betas). A factor 4 covers rounding.
        """
        if type(self.optimizer) is not torch.optim.Adam:  # another rule (or AdamW's decay): no bound known
            return math.inf
        bound = 0.0
        for group in self.optimizer.param_groups:
            beta1, beta2 = (float(b) for b in group["betas"])
            if group.get("decoupled_weight_decay", False) or not 0.0 <= beta1 * beta1 < beta2 < 1.0:
                return math.inf
            gain = 1.0 / math.sqrt((1.0 - beta2) * (1.0 - beta1 * beta1 / beta2))
            bound = max(bound, 4.0 * abs(float(group["lr"])) * gain)
        return bound

    def _parameter_versions(self) -> int:
        # Every in-place change of a parameter (optimizer, load_state_dict, ActNorm's init) bumps its version.
        return sum(p._version for p in self._params)

    def _optimizer_backup(self) -> tuple[list[Tensor], dict[Any, dict[str, Any]]]:
        """Copies of the parameters and of the optimizer's state, to undo a step (:meth:`_restore_optimizer`)."""
        params = [p.detach().clone() for p in self._params]
        state = {
            p: {k: v.clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in s.items()}
            for p, s in self.optimizer.state.items()
        }
        return params, state

    @torch.no_grad()
    def _restore_optimizer(self, backup: tuple[list[Tensor], dict[Any, dict[str, Any]]]) -> None:
        params, state = backup
        torch._foreach_copy_([p.detach() for p in self._params], params)
        # The saved copies become the state: bit-identical values, and the entries the step created vanish.
        self.optimizer.state.clear()
        self.optimizer.state.update(state)

    def _guarded_optimizer_step(self, index: int, params_changed: bool) -> str:
        """The optimizer step, undone if it left a non-finite parameter; returns the rejection message or "".

        A huge learning rate overflows parameters to inf, and the next pass's spectral norms would fail on them.
        The check is one reduction over all parameters and the step's only host sync after the update. A backup to
        undo the step is taken only when the step could overflow (:meth:`_adam_step_bound` from the last measured
        peak) or that peak is stale, so ordinary steps copy nothing.
        """
        peak = self._param_peak
        limit = 0.5 * torch.finfo(self.dtype).max
        risky = (
            peak is None
            or params_changed
            or self._param_versions != self._parameter_versions()
            or not peak + self._adam_step_bound() < limit
        )
        backup = self._optimizer_backup() if risky else None
        self.optimizer.step()
        with torch.no_grad():
            # One flat copy (a C++ loop, not a Python one per tensor) and one reduction; the max-norm propagates
            # NaN and turns -inf into inf, so the peak is finite iff every entry is.
            flat = torch._utils._flatten_dense_tensors(self._params) if self._params else None
            peak = float(torch.linalg.vector_norm(flat, math.inf)) if flat is not None and flat.numel() else 0.0
        self._param_versions = self._parameter_versions()
        if math.isfinite(peak):
            self._param_peak = peak
            return ""
        self._param_peak = None
        if backup is None:  # only if the parameters were replaced without an in-place change (``p.data = ...``)
            raise TrainingError(
                f"step {index}: the optimizer step left non-finite parameters ({peak}) and no backup was taken to "
                "undo it (the parameters were changed outside the trainer); resume from a checkpoint"
            )
        self._restore_optimizer(backup)
        self._param_versions = self._parameter_versions()
        return f"step {index}: the optimizer step made parameters non-finite ({peak}); step undone"

    def _accumulate_gradients(self, batch: tuple[Tensor, ...]) -> tuple[float, str]:
        """Forward and backward over this process's micro-batches; sum gradients and loss over processes.

        Returns ``(mean loss of the global batch, rejection message or "")``.
        """
        global_size = batch[0].shape[0]
        local = tuple(self.dist.shard(t) for t in batch)
        chunks = self.train_config.grad_accumulation
        local_loss = 0.0
        # (no split when there is nothing to split: the common case pays no extra operators)
        pieces = (local,) if chunks == 1 else zip(*(torch.tensor_split(t, chunks) for t in local), strict=True)
        for piece in pieces:
            if piece[0].shape[0] == 0:
                continue
            loss = self._loss_sum(piece) / global_size
            if self.loss_transform is not None:
                loss = self.loss_transform(loss)
            value = float(loss.detach())
            local_loss += value
            if not math.isfinite(value):  # local_loss is then non-finite too
                break
            loss.backward()
            del loss
        if self.dist.active:
            # One collective for the loss and every gradient: ranks stay in lockstep even when one is non-finite.
            params = [p for p in self._params if p.requires_grad]
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat(
                [torch.tensor([local_loss], dtype=self.dtype, device=self.device)] + [g.reshape(-1) for g in grads]
            )
            self.dist.all_reduce_sum(flat)
            local_loss = float(flat[0])
            offset = 1
            for p in params:
                n = p.numel()
                p.grad = flat[offset : offset + n].view_as(p)  # flat is this step's own buffer
                offset += n
        if not math.isfinite(local_loss):
            return local_loss, f"non-finite loss ({local_loss})"
        return local_loss, ""

    def _solver_summary(self) -> tuple[float, int, int]:
        """Summed mean, largest and failed counts of the forward solves' iterations over the blocks."""
        recorded = [stats.get("forward") for stats in self.flow.solver_stats()]
        forward = [fwd for fwd in recorded if fwd is not None and fwd.batch_size > 0]
        if not forward:
            return 0.0, 0, 0
        if len({fwd.batch_size for fwd in forward}) == 1:  # the usual case: a few operators for all blocks at once
            its = torch.stack([fwd.iterations for fwd in forward])
            failed = int((~torch.stack([fwd.converged for fwd in forward])).sum())
            return float(its.double().mean(dim=1).sum()), int(its.max()), failed
        mean, worst, failed = 0.0, 0, 0
        for fwd in forward:
            mean += float(fwd.iterations.double().mean())
            worst = max(worst, int(fwd.iterations.max()))
            failed += fwd.n_failed
        return mean, worst, failed

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.train_config.ema
        if self._ema_flow is None or decay is None:
            return
        for pe, p in zip(self._ema_flow.parameters(), self._params, strict=True):
            if self._ema_updates == 0:
                # Start from the weights after the first step, so ActNorm's data init is not averaged with zeros.
                pe.copy_(p)
            else:
                pe.lerp_(p, 1.0 - decay)
        for be, b in zip(self._ema_flow.buffers(), self.flow.buffers(), strict=True):
            be.copy_(b)
        self._ema_updates += 1

    def step(self) -> StepMetrics:
        """Run one training iteration, in the arithmetic of :attr:`precision`, and return its metrics.

        Raises:
            TrainingError: after ``max_rejected_steps`` consecutive rejected iterations.
        """
        with self.precision.training():
            return self._step_once()

    def _step_once(self) -> StepMetrics:
        t0 = time.perf_counter()
        index = self._step
        self._apply_schedules(index)
        lr = self.current_lr
        batch = self._next_batch()
        if not all(m.training for m in self._modules):  # (train() itself walks and sets all 120 modules)
            self.flow.train()
        snapshot = self._snapshot()
        if snapshot is not None:
            self._initialize_actnorm(batch)
        self.optimizer.zero_grad(set_to_none=True)
        grad_norm = math.nan
        loss_value, problem = self._accumulate_gradients(batch)
        it_mean, it_max, failed = self._solver_summary()
        exact = self.flow.logdet_is_exact
        message = f"step {index}: {problem}; optimizer step skipped" if problem else ""
        if not message:
            grad_norm = self._grad_norm()
            if not math.isfinite(grad_norm):
                message = f"step {index}: non-finite gradient norm ({grad_norm}); optimizer step skipped"
        if not message:
            self._clip(grad_norm)
            # (a step whose update overflows is rejected like a non-finite loss, parameters and state restored)
            message = self._guarded_optimizer_step(index, params_changed=snapshot is not None)
        rejected = bool(message)
        if rejected:
            self.optimizer.zero_grad(set_to_none=True)
            if snapshot is not None:
                self.flow.load_state_dict(snapshot)
            self._consecutive_rejections += 1
            self._rejected_total += 1
        else:
            self.optimizer.zero_grad(set_to_none=True)
            if self.train_config.lipschitz_iterations:
                update_lipschitz(self.flow, self.train_config.lipschitz_iterations)
            self._update_ema()
            self._consecutive_rejections = 0
        self._step += 1
        metrics = StepMetrics(
            step=index,
            loss=loss_value,
            lr=lr,
            grad_norm=grad_norm,
            seconds=time.perf_counter() - t0,
            rejected=rejected,
            message=message,
            solver_iterations_mean=it_mean,
            solver_iterations_max=it_max,
            solver_failed=failed,
            exact=exact,
        )
        self.history.append(metrics)
        limit = self.train_config.max_rejected_steps
        if self._consecutive_rejections >= limit:
            raise TrainingError(
                f"training diverged: {self._consecutive_rejections} consecutive iterations were rejected "
                f"(limit max_rejected_steps = {limit}); last: {message}. Parameters are those of the last good "
                "step: lower the learning rate, set grad_clip, or resume from an earlier checkpoint."
            )
        return metrics

    # -- evaluation ---------------------------------------------------------------------------------------
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

    @property
    def training_images(self) -> ImageSet | None:
        """The training set of an image run (None for other tasks), as loaded once at construction."""
        return self._train_images

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

    # -- the loop -----------------------------------------------------------------------------------------
    def run(
        self,
        iterations: int | None = None,
        callback: StepCallback | None = None,
        *,
        checkpoint_path: str | Path | None = None,
        checkpoint_metadata: dict[str, Any] | None = None,
    ) -> RunSummary:
        """Run ``iterations`` steps (default: up to ``train_config.iterations`` in total).

        Every ``eval_every`` completed iterations a fresh-sample test (``eval_size`` points) is recorded in
        :attr:`eval_history`; the summary's ``paper_protocol`` is the mean of the last 20 of them (Table 1).

        Args:
            iterations: steps to run in this call.
            callback: called after every step as ``callback(step_metrics, eval_metrics_or_None)``; returning
                ``False`` (not merely a falsy value) stops the run.
            checkpoint_path: if given, a checkpoint is written there every ``checkpoint_every`` iterations and
                at the end, also when the callback stops the run (the project's one periodic-checkpoint
                implementation; ``monoflow train`` uses it).
            checkpoint_metadata: extra metadata for those checkpoints (e.g. the preset's name).

        Raises:
            TrainingError: from :meth:`step`.
        """
        cfg = self.train_config
        if iterations is None:
            iterations = max(0, cfg.iterations - self._step)
        iterations = check_int("iterations", iterations, 0)
        t0 = time.perf_counter()
        rejected = 0
        stopped = False
        last: StepMetrics | None = None
        saved_at = -1
        steps_run = 0
        for _ in range(iterations):
            last = self.step()
            steps_run += 1
            rejected += int(last.rejected)
            ev = None
            # In a data-parallel run only rank 0 tests and writes (evaluations use no collectives).
            if cfg.eval_every and self._step % cfg.eval_every == 0 and self.dist.is_main:
                ev = self.evaluate(fixed=False, record=True)
            if checkpoint_path is not None and cfg.checkpoint_every and self._step % cfg.checkpoint_every == 0:
                if self.dist.is_main:
                    self.save_checkpoint(checkpoint_path, metadata=checkpoint_metadata)
                saved_at = self._step
            if callback is not None and callback(last, ev) is False:
                stopped = True
                break
        if checkpoint_path is not None and saved_at != self._step and self.dist.is_main:
            self.save_checkpoint(checkpoint_path, metadata=checkpoint_metadata)
        fresh = [e for e in self.eval_history if not e.fixed]
        return RunSummary(
            steps_run=steps_run,
            step=self._step,
            seconds=time.perf_counter() - t0,
            rejected_steps=rejected,
            last_loss=None if last is None else last.loss,
            paper_protocol=paper_protocol_value(fresh),
            paper_protocol_tests=min(len(fresh), PAPER_PROTOCOL_TESTS),
            last_eval=self.eval_history[-1] if self.eval_history else None,
            stopped_early=stopped,
            task=self.task,
        )

    # -- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A snapshot (deep copy) of everything needed to resume training exactly.

        Keys: ``format``, ``step``, ``flow`` (module state incl. buffers), ``optimizer``, ``base_lr``,
        ``stream`` and ``eval_stream`` (data stream states, JSON), ``torch_rng`` (CPU generator state, uint8),
        ``cuda_rng`` (on CUDA), ``ema`` (EMA flow state or ``None``), ``ema_updates``,
        ``consecutive_rejections``, ``rejected_total``, ``history``, ``eval_history`` (lists of dicts, thinned to at
        most :data:`CHECKPOINT_HISTORY` records each by :func:`thin_records`, so the state's size does not grow with
        the number of steps; the last :data:`PAPER_PROTOCOL_TESTS` tests are always whole, so the paper protocol
        survives a resume).
        """
        state: dict[str, Any] = {
            "format": TRAINER_STATE_FORMAT,
            "step": self._step,
            "flow": self.flow.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "base_lr": self._base_lr,
            "stream": self._stream.state_dict(),
            "eval_stream": None if self._eval_stream is None else self._eval_stream.state_dict(),
            "noise_rng": self._noise_generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "ema": None if self._ema_flow is None else self._ema_flow.state_dict(),
            "ema_updates": self._ema_updates,
            "consecutive_rejections": self._consecutive_rejections,
            "rejected_total": self._rejected_total,
            "history": [m.to_dict() for m in thin_records(list(self.history), CHECKPOINT_HISTORY)],
            "eval_history": [
                e.to_dict() for e in thin_records(self.eval_history, CHECKPOINT_HISTORY, keep_last=PAPER_PROTOCOL_TESTS)
            ],
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return copy.deepcopy(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (possibly read back from a checkpoint)."""
        if not isinstance(state, dict) or state.get("format") != TRAINER_STATE_FORMAT:
            raise ValueError(
                f"trainer state: expected a dict with format {TRAINER_STATE_FORMAT!r}, "
                f"got {state.get('format') if isinstance(state, dict) else type(state).__name__!r}"
            )
        self.flow.load_state_dict(state["flow"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._step = int(state["step"])
        self._base_lr = float(state["base_lr"])
        self._stream.load_state_dict(state["stream"])
        if self._eval_stream is not None and state.get("eval_stream") is not None:
            self._eval_stream.load_state_dict(state["eval_stream"])
        if state.get("noise_rng") is not None:
            self._noise_generator.set_state(state["noise_rng"].to(device="cpu", dtype=torch.uint8))
        torch.set_rng_state(state["torch_rng"].to(device="cpu", dtype=torch.uint8))
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        ema = state.get("ema")
        if self._ema_flow is not None:
            self._ema_flow.load_state_dict(ema if ema is not None else self.flow.state_dict())
        self._ema_updates = int(state.get("ema_updates", 0))
        self._consecutive_rejections = int(state.get("consecutive_rejections", 0))
        self._rejected_total = int(state.get("rejected_total", 0))
        self.history.clear()
        self.history.extend(StepMetrics.from_dict(m) for m in state.get("history", []))
        self.eval_history = [EvalMetrics.from_dict(e) for e in state.get("eval_history", [])]
        self._concat_state = None  # force the schedule to be re-applied
        self._apply_schedules(self._step)

    # -- checkpoints --------------------------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write a resumable checkpoint (see :func:`monoflow_core.checkpoint.save_checkpoint`)."""
        return save_checkpoint(path, self, metadata=metadata)

    @classmethod
    def from_checkpoint(cls, source: str | Path | Checkpoint, *, device: str | None = None) -> Trainer:
        """A trainer that continues a checkpointed run exactly where it stopped.

        Args:
            source: a checkpoint path or a loaded :class:`~monoflow_core.checkpoint.Checkpoint`.
            device: run on this device instead of the checkpoint's.

        Raises:
            CheckpointError: if the file is unreadable or holds no training state.
        """
        ckpt = source if isinstance(source, Checkpoint) else load_checkpoint(source)
        if ckpt.train_config is None or ckpt.trainer_state is None:
            raise CheckpointError(f"checkpoint {ckpt.path}: holds a flow only, no training state to resume")
        train_config = ckpt.train_config if device is None else ckpt.train_config.replace(device=device)
        try:
            trainer = cls(ckpt.model_config, train_config, flow=ckpt.flow, points=ckpt.points)
            trainer.load_state_dict(ckpt.trainer_state)
        except (ValueError, TypeError, KeyError) as err:
            # What depends on the data rather than the file (e.g. an image set whose levels differ from the
            # flow's) surfaces here: name the checkpoint, as every other loading error does.
            raise CheckpointError(f"checkpoint {ckpt.path}: cannot resume: {err}") from err
        return trainer

    resume = from_checkpoint
