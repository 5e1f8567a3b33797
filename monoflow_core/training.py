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

The trainer is assembled from small modules: :mod:`~monoflow_core.training_step` (gradients, clipping and the
guarded optimizer step), :mod:`~monoflow_core.training_eval` (its tests) and :mod:`~monoflow_core.training_state`
(its resumable state); this module holds the loop and the names the CLI, the studio and users import.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import math
import operator
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from . import solvers
from .blocks import ActNorm
from .bounds import INTERVALS, check_in
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from .config import DTYPES, SCHEDULES, FlowConfig, TrainConfig, check_float, check_int
from .data import ToyStream
from .data.images import ImageSet, ImageStream, load_image_set
from .data.points import POINTS_DATA, PointSet, PointStream
from .distributed import DistributedContext
from .flat_adam import FlatAdam
from .flow import Flow
from .fused.flat import FLAT, FlatParameters
from .image_layers import ActNorm2d
from .metrics import (
    PAPER_PROTOCOL_TESTS,
    EvalMetrics,
    RunSummary,
    StepMetrics,
    paper_protocol_nll,
    paper_protocol_value,
)
from .models import build_flow
from .multiscale import MultiscaleFlow
from .nn.lipschitz import spectral_layers, update_lipschitz
from .precision import PrecisionPolicy, check_cudnn_benchmark, resolve_precision
from .training_eval import EVAL_CHUNK, EVAL_STREAM_SEED_OFFSET, TrainerEvaluation
from .training_state import CHECKPOINT_HISTORY, TrainerState, thin_records
from .training_step import (
    OptimizerGuard,
    TrainingError,
    accumulate_gradients,
    clip_gradients,
    grad_norm,
    gradients,
    make_adam,
    solver_summary,
)

_TRAINING = operator.attrgetter("training")

#: Held while a trainer seeds torch's global generator and builds its flow (see Trainer.__init__).
_SEEDED_BUILD = threading.Lock()

__all__ = [
    "CHECKPOINT_HISTORY",
    "DTYPES",
    "EVAL_CHUNK",
    "EVAL_STREAM_SEED_OFFSET",
    "NOISE_SEED_OFFSET",
    "PAPER_PROTOCOL_TESTS",
    "SCHEDULES",
    "EvalMetrics",
    "RunSummary",
    "StepMetrics",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "lr_factor",
    "make_adam",
    "paper_protocol_nll",
    "paper_protocol_value",
    "thin_records",
]


#: The dequantization noise generator is seeded with ``seed + NOISE_SEED_OFFSET``.
NOISE_SEED_OFFSET = 7919


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


StepCallback = Callable[[StepMetrics, EvalMetrics | None], Any]


class Trainer(TrainerEvaluation, TrainerState):
    """Trains a flow on a toy density (maximum likelihood) or on the 1-D staircase (MSE).

    One :meth:`step` = fresh batch, forward, backward, gradient-norm check and clipping, Adam step,
    ``update_lipschitz`` power iterations, EMA update. Steps with a non-finite loss or gradient, or whose update
    overflows a parameter (e.g. a huge learning rate), are *rejected*: parameters and optimizer state stay
    bit-identical, and after ``max_rejected_steps`` consecutive rejections a :class:`TrainingError` is raised.
    Between steps the learning rate and solver settings may be changed live
    (:meth:`set_lr`, :meth:`set_solver`). :meth:`state_dict` / :meth:`load_state_dict` capture everything
    needed for a bit-for-bit resumption (on the same device, same seed; on CUDA with cuDNN's autotuning on, up to
    rounding: ``TrainConfig.cudnn_benchmark``).

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
        # How G is computed in training (TF32 or not, the solvers' floor, cuDNN's autotuning); evaluations use full
        # precision.
        self.precision: PrecisionPolicy = self._resolve_precision(train_config.precision, train_config.cudnn_benchmark)
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
        # The fused runs' parameters as views of a few flat buffers, which the fold, Adam, the norms and the EMA
        # read whole (monoflow_core.fused.flat); the modules keep their parameter names, checkpoints are unchanged.
        self._flat: FlatParameters | None = FlatParameters.of(self.flow) if FLAT.enabled else None
        self.optimizer = make_adam(
            self.flow.parameters(),
            self._flat,
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
        # (the copy shares no storage with the flow; it gets buffers of its own for the averaging)
        self._ema_flat = FlatParameters.of(self._ema_flow) if self._ema_flow is not None and FLAT.enabled else None
        self._ema_updates = 0
        self._step = 0
        self._consecutive_rejections = 0
        self._rejected_total = 0
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
        # The spectrally normalised layers whose vectors the power iterations refine after each step.
        self._spectral = list(spectral_layers(self.flow))
        # The optimizer step, undone when it overflows a parameter (it backs up only steps that could).
        self._guard = OptimizerGuard(self.optimizer, self._params, self.dtype, covering=self._param_tensors)
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
    def training_images(self) -> ImageSet | None:
        """The training set of an image run (None for other tasks), as loaded once at construction."""
        return self._train_images

    def set_lr(self, lr: float) -> None:
        """Change the base learning rate from the next step on (the schedule's factor still applies)."""
        lr = check_in("lr", check_float("lr", lr), INTERVALS["lr"])
        self._base_lr = lr
        # Keep the stored configuration truthful, so checkpoints and config.json record the rate in use.
        self.train_config.lr = lr
        self._apply_lr(self._step)

    def set_precision(self, precision: str | None = None, *, cudnn_benchmark: str | None = None) -> None:
        """Change the precision policy (``TrainConfig.precision``, ``TrainConfig.cudnn_benchmark``) from the next step
        on; ``None`` keeps a setting."""
        cfg = self.train_config
        precision = cfg.precision if precision is None else precision
        benchmark = cfg.cudnn_benchmark if cudnn_benchmark is None else check_cudnn_benchmark(cudnn_benchmark)
        self.precision = self._resolve_precision(precision, benchmark)
        cfg.precision = self.precision.requested
        cfg.cudnn_benchmark = benchmark

    def _resolve_precision(self, precision: str, cudnn_benchmark: str) -> PrecisionPolicy:
        # A step's shapes are fixed when its solves keep a fixed shape: the streams always return whole batches of
        # batch_size samples, and accumulation chunks and data-parallel shards have at most two sizes.
        return resolve_precision(
            precision,
            self.device,
            self.dtype,
            benchmark=cudnn_benchmark,
            convolutions=self.task == "image",
            fixed_shapes=solvers.default_fixed_shape(self.device),
        )

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
    def _attach_flat(self) -> FlatParameters | None:
        """The flow's flat layout, prepared for a step (its gradient views attached); rebuilt from the parameters'
        current values if something replaced their storage (e.g. ``flow.to(dtype)``)."""
        flat = self._flat
        if flat is None:
            return None
        if not flat.intact():
            flat = self._flat = FlatParameters.of(self.flow)
            cast(FlatAdam, self.optimizer).bind(flat)
            if flat is None:
                return None
        flat.attach()
        return flat

    def _param_tensors(self) -> list[Tensor]:
        """Tensors holding exactly the flow's parameter entries: the flat buffers and the other parameters when the
        layout holds, else the parameters (for reductions over all of them)."""
        flat = self._flat
        return flat.param_tensors() if flat is not None and flat.intact() else list(self._params)

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

    def _snapshot(self) -> dict[str, Tensor] | None:
        """A copy of the flow's state when the forward pass itself may modify it (ActNorm's data init)."""
        if self._needs_actnorm_init():
            return {k: v.detach().clone() for k, v in self.flow.state_dict().items()}
        return None

    def _ema_pairs(self) -> tuple[list[Tensor], list[Tensor]]:
        """The averaged copy's parameters and the flow's, as matching tensors: the flat buffers and the other
        parameters when both layouts hold (a handful of tensors), else parameter by parameter."""
        assert self._ema_flow is not None
        flat, ema_flat = self._flat, self._ema_flat
        if (
            flat is not None
            and ema_flat is not None
            and flat.intact()
            and ema_flat.intact()
            and [t.shape for t in flat.param_tensors()] == [t.shape for t in ema_flat.param_tensors()]
        ):
            return ema_flat.param_tensors(), flat.param_tensors()
        return [p.detach() for p in self._ema_flow.parameters()], [p.detach() for p in self._params]

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.train_config.ema
        if self._ema_flow is None or decay is None:
            return
        ema_params, params = self._ema_pairs()
        if len(ema_params) != len(params):
            raise RuntimeError("the averaged copy of the flow no longer matches the flow's parameters")
        # One multi-tensor call per kind instead of one call per tensor: the toy models have ~40-90 small tensors,
        # and a Python loop over them cost about a tenth of a 4-block step.
        if self._ema_updates == 0:
            # Start from the weights after the first step, so ActNorm's data init is not averaged with zeros.
            torch._foreach_copy_(ema_params, params)
        elif ema_params:
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        ema_buffers: list[Tensor] = list(self._ema_flow.buffers())
        buffers: list[Tensor] = list(self.flow.buffers())
        if len(ema_buffers) != len(buffers):
            raise RuntimeError("the averaged copy of the flow no longer matches the flow's buffers")
        if buffers:
            torch._foreach_copy_(ema_buffers, buffers)
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
        if not all(map(_TRAINING, self._modules)):  # (train() itself walks and sets all 120 modules)
            self.flow.train()
        snapshot = self._snapshot()
        if snapshot is not None:
            self._initialize_actnorm(batch)
        self.optimizer.zero_grad(set_to_none=True)
        flat = self._attach_flat()
        norm = math.nan
        with flat.active() if flat is not None else contextlib.nullcontext():
            loss_value, problem = accumulate_gradients(
                self._loss_sum,
                batch,
                dist=self.dist,
                chunks=self.train_config.grad_accumulation,
                params=self._params,
                dtype=self.dtype,
                device=self.device,
                loss_transform=self.loss_transform,
                after_backward=flat.gather if flat is not None else None,
            )
        it_mean, it_max, failed = solver_summary(self.flow)
        exact = self.flow.logdet_is_exact
        message = f"step {index}: {problem}; optimizer step skipped" if problem else ""
        grads = flat.grad_tensors() if flat is not None else gradients(self._params)
        if not message:
            norm = grad_norm(grads)
            if not math.isfinite(norm):
                message = f"step {index}: non-finite gradient norm ({norm}); optimizer step skipped"
        if not message:
            clip_gradients(grads, norm, self.train_config.grad_clip)
            # (a step whose update overflows is rejected like a non-finite loss, parameters and state restored)
            message = self._guard.step(index, params_changed=snapshot is not None)
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
                update_lipschitz(self.flow, self.train_config.lipschitz_iterations, layers=self._spectral)
            self._update_ema()
            self._consecutive_rejections = 0
        self._step += 1
        metrics = StepMetrics(
            step=index,
            loss=loss_value,
            lr=lr,
            grad_norm=norm,
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
