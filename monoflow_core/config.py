"""Model configuration: the :class:`FlowConfig` dataclass, its validation and (de)serialisation.

Defaults reproduce the paper's 2-D toy Monotone Flow (Ahn et al. 2022, Table 1; docs/algorithm.md §9.1): 10 monotone
blocks, DenseNet G of depth 3 and growth 16, CPila, linear coefficient 0.9, concatenation coefficient 0.98,
exact log-det, no ActNorm.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any

import torch

from .bounds import INTERVALS, MINIMUM, check_in
from .data import DATASETS, TOY_DATASETS, check_dataset_name
from .data.images import IMAGE_DATASETS
from .data.points import POINTS_DATA
from .dequantization import DEQUANTIZATIONS
from .families.names import FAMILIES, IMPLICIT
from .logdet import LOGDET_MODES, EstimatorSettings
from .nn.activations import ACTIVATIONS
from .nn.lipschitz import SPECTRAL_MODES
from .precision import check_cudnn_benchmark, check_precision
from .solvers import DEFAULT_TOL, METHODS

__all__ = ["FORMULATIONS", "G_ARCHITECTURES", "FlowConfig", "JsonConfig"]

FORMULATIONS = ("monotone", "residual", "inverse_residual")
G_ARCHITECTURES = ("densenet", "mlp")
IMPLICIT_GRAD_MODES = ("auto", "one_step", "backward_solve")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.lower() not in allowed:
        raise ValueError(f"{name}: unknown value {value!r}; choose one of {list(allowed)}")
    return value.lower()


def _int_at_least(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: must be an integer >= {low}, got {value!r}")
    return value


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}: must be a number, got {value!r}")
    return float(value)


class JsonConfig:
    """JSON (de)serialisation shared by the configuration dataclasses (:class:`FlowConfig`, ``TrainConfig``).

    Subclasses are dataclasses that validate in ``__post_init__``; ``kind`` names them in error messages.
    """

    kind: typing.ClassVar[str] = "configuration"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary of all fields (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build from a dictionary; unknown keys raise ``ValueError`` listing the valid ones."""
        if not isinstance(data, dict):
            raise ValueError(f"a {cls.kind} must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.kind} field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**data)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(json.loads(text))

    def replace(self: C, **changes: Any) -> C:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


C = typing.TypeVar("C", bound=JsonConfig)


@dataclass
class FlowConfig(JsonConfig):
    """Everything needed to build a flow with :func:`monoflow_core.build_flow`.

    Attributes:
        dim: event dimension (2 for the toy densities, 1 for the 1-D fitting task).
        blocks: number of flow blocks.
        formulation: ``"monotone"``, ``"residual"`` or ``"inverse_residual"``; or a list with one entry per
            block (e.g. the 1-D experiment's inverse-residual o residual).
        activation: activation of G (``"cpila"``, ``"clipswish"``, ``"lipswish"``, ``"crelu"``, ``"pila"``).
        g: architecture of G, ``"densenet"`` or ``"mlp"``.
        depth: dense layers of the DenseNet G.
        growth: features each dense layer adds.
        hidden: hidden widths of the MLP G.
        lipschitz: Lipschitz coefficient of each linear layer of G, in (0, 1).
        concat_lipschitz: norm of the DenseNet's concatenation weights ``(eta1, eta2)``, in (0, 1].
        learnable_concat: whether the concatenation weights are trainable from the start.
        spectral_norm: ``"auto"``, ``"exact"`` or ``"power"`` spectral norms.
        solver: fixed-point solver (``"auto"``, ``"newton"``, ``"anderson"``, ``"picard"``).
        tol: relative solver tolerance, in (0, 1), raised at solve time to the dtype's floor of 10 machine epsilons.
            The default, 1e-12, therefore follows the dtype: 1e-12 in float64 (round trips of the default flow to
            better than 1e-10) and 1.19e-6 in float32 (docs/solvers.md).
        max_iter: solver iteration cap, >= 1.
        anderson_memory: Anderson memory m, >= 1.
        logdet: ``"exact"``, ``"estimator"``, ``"auto"`` (exact up to 64 dimensions per block) or ``"hybrid"``
            (the estimator in training, as ``"auto"`` in evaluation).
        implicit_grad: ``"auto"``, ``"one_step"`` or ``"backward_solve"``.
        actnorm: ActNorm after every block.
        actnorm_input: an ActNorm before the first block too (with ``actnorm``: "before and after every block").
        n_exact_terms: estimator terms always computed in training.
        n_exact_terms_eval: estimator terms always computed in evaluation.
        roulette: ``"geometric"`` or ``"poisson"``.
        roulette_param: geometric p in (0, 1) or Poisson lambda > 0.
        n_probes: Hutchinson probes per sample.
        neumann_grad: Neumann-series gradient for the estimator.
        image_shape: ``[C, H, W]`` for a multiscale image flow (docs/algorithm.md §9.3), or ``None`` for a flow on
            vectors of length ``dim``. With an image shape, ``dim`` is set to ``C * H * W`` and the layout comes
            from ``blocks_per_scale`` and ``fc_blocks`` (``blocks`` is then unused); ``depth`` and ``growth``
            describe the conv DenseNet G (the paper: 3 and 172, i.e. 3x3 convs to 86 channels and CPila).
        blocks_per_scale: implicit blocks at each scale (the paper: [16, 16, 16] for MNIST and CIFAR-10,
            [32, 32, 32] for ImageNet); H and W must be divisible by ``2 ** (scales - 1)``.
        fc_blocks: fully connected blocks after the last scale (the paper: 4), >= 0.
        fc_growth: growth of the fully connected blocks' DenseNet G.
        logit_alpha: margin of the logit transform, in [0, 0.5) (the paper: 0.05; 1e-6 for MNIST).
        factor_out: send half of the channels to the base density after each squeeze.
        dequantization: ``"uniform"`` or ``"variational"`` (a learned conditional flow; bounds are ELBOs).
        vdq_blocks: couplings of the variational dequantizer's conditional flow, >= 1.
        vdq_channels: hidden channels of each coupling's network, >= 1.
        levels: pixel levels K of the data (256 for 8-bit images, 17 for the digits); set from the data set by
            the trainer.
        family: ``"implicit"`` (the paper's blocks, chosen by ``formulation``; the default) or a comparison family
            built from the optional package zuko (docs/families.md): ``"realnvp"``, ``"glow"``, ``"nsf"``,
            ``"maf"`` or ``"cnf"``. A comparison family models vectors of ``dim >= 2``; its size comes from
            ``blocks`` (couplings, Glow steps, autoregressive transforms or stacked continuous flows), ``hidden``
            (the widths of each block's network) and ``bins``; ``tol`` is the CNF's ODE tolerance. The fields
            of G, the solvers and the log-det estimator do not apply to them.
        bins: spline bins of the ``"nsf"`` family, >= 2.
    """

    kind: typing.ClassVar[str] = "flow configuration"

    dim: int = 2
    blocks: int = 10
    formulation: str | list[str] = "monotone"
    activation: str = "cpila"
    g: str = "densenet"
    depth: int = 3
    growth: int = 16
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    lipschitz: float = 0.9
    concat_lipschitz: float = 0.98
    learnable_concat: bool = True
    spectral_norm: str = "auto"
    solver: str = "auto"
    tol: float = DEFAULT_TOL
    max_iter: int = 1000
    anderson_memory: int = 5
    logdet: str = "auto"
    implicit_grad: str = "auto"
    actnorm: bool = False
    actnorm_input: bool = False
    n_exact_terms: int = 2
    n_exact_terms_eval: int = 20
    roulette: str = "geometric"
    roulette_param: float = 0.5
    n_probes: int = 1
    neumann_grad: bool = True
    image_shape: list[int] | None = None
    blocks_per_scale: list[int] = field(default_factory=lambda: [16, 16, 16])
    fc_blocks: int = 4
    fc_growth: int = 64
    logit_alpha: float = 0.05
    factor_out: bool = False
    dequantization: str = "uniform"
    vdq_blocks: int = 3
    vdq_channels: int = 32
    levels: int = 256
    family: str = IMPLICIT
    bins: int = 8

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; raise ``ValueError`` naming the field and its allowed values."""
        self.dim = _int_at_least("dim", self.dim, MINIMUM["dim"])
        self.blocks = _int_at_least("blocks", self.blocks, MINIMUM["blocks"])
        if isinstance(self.formulation, list | tuple):
            if len(self.formulation) != self.blocks:
                raise ValueError(
                    f"formulation: a list needs one entry per block ({self.blocks}), got {len(self.formulation)}"
                )
            self.formulation = [_choice("formulation", f, FORMULATIONS) for f in self.formulation]
        else:
            self.formulation = _choice("formulation", self.formulation, FORMULATIONS)
        self.activation = _choice("activation", self.activation, tuple(ACTIVATIONS))
        self.g = _choice("g", self.g, G_ARCHITECTURES)
        self.depth = _int_at_least("depth", self.depth, MINIMUM["depth"])
        self.growth = _int_at_least("growth", self.growth, MINIMUM["growth"])
        if not isinstance(self.hidden, list | tuple) or not self.hidden:
            raise ValueError(f"hidden: must be a non-empty list of widths, got {self.hidden!r}")
        self.hidden = [_int_at_least("hidden", h, MINIMUM["hidden"]) for h in self.hidden]
        self.lipschitz = check_in("lipschitz", _number("lipschitz", self.lipschitz), INTERVALS["lipschitz"])
        self.concat_lipschitz = check_in(
            "concat_lipschitz", _number("concat_lipschitz", self.concat_lipschitz), INTERVALS["concat_lipschitz"]
        )
        self.spectral_norm = _choice("spectral_norm", self.spectral_norm, SPECTRAL_MODES)
        self.solver = _choice("solver", self.solver, METHODS)
        self.tol = check_in("tol", _number("tol", self.tol), INTERVALS["tol"])
        self.max_iter = _int_at_least("max_iter", self.max_iter, MINIMUM["max_iter"])
        self.anderson_memory = _int_at_least("anderson_memory", self.anderson_memory, MINIMUM["anderson_memory"])
        self.logdet = _choice("logdet", self.logdet, LOGDET_MODES)
        self.implicit_grad = _choice("implicit_grad", self.implicit_grad, IMPLICIT_GRAD_MODES)
        for name in ("actnorm", "actnorm_input", "learnable_concat", "neumann_grad"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be true or false, got {getattr(self, name)!r}")
        self.n_exact_terms = _int_at_least("n_exact_terms", self.n_exact_terms, MINIMUM["n_exact_terms"])
        self.n_exact_terms_eval = _int_at_least(
            "n_exact_terms_eval", self.n_exact_terms_eval, MINIMUM["n_exact_terms_eval"]
        )
        self.n_probes = _int_at_least("n_probes", self.n_probes, MINIMUM["n_probes"])
        self.roulette = _choice("roulette", self.roulette, ("geometric", "poisson"))
        self.roulette_param = _number("roulette_param", self.roulette_param)
        self.estimator_settings()  # validates the roulette parameter
        self._validate_image_fields()
        self._validate_family()

    @property
    def is_image(self) -> bool:
        """Whether this configures a multiscale image flow."""
        return self.image_shape is not None

    def _validate_image_fields(self) -> None:
        if not isinstance(self.blocks_per_scale, list | tuple) or not self.blocks_per_scale:
            raise ValueError(
                f"blocks_per_scale: must be a non-empty list of block counts, got {self.blocks_per_scale!r}"
            )
        self.blocks_per_scale = [
            _int_at_least("blocks_per_scale", n, MINIMUM["blocks_per_scale"]) for n in self.blocks_per_scale
        ]
        self.fc_blocks = _int_at_least("fc_blocks", self.fc_blocks, MINIMUM["fc_blocks"])
        self.fc_growth = _int_at_least("fc_growth", self.fc_growth, MINIMUM["fc_growth"])
        self.logit_alpha = check_in("logit_alpha", _number("logit_alpha", self.logit_alpha), INTERVALS["logit_alpha"])
        if not isinstance(self.factor_out, bool):
            raise ValueError(f"factor_out: must be true or false, got {self.factor_out!r}")
        self.dequantization = _choice("dequantization", self.dequantization, DEQUANTIZATIONS)
        self.vdq_blocks = _int_at_least("vdq_blocks", self.vdq_blocks, MINIMUM["vdq_blocks"])
        self.vdq_channels = _int_at_least("vdq_channels", self.vdq_channels, MINIMUM["vdq_channels"])
        self.levels = _int_at_least("levels", self.levels, MINIMUM["levels"])
        if self.image_shape is None:
            return
        shape = self.image_shape
        if not isinstance(shape, list | tuple) or len(shape) != 3:
            raise ValueError(f"image_shape: must be [channels, height, width], got {shape!r}")
        self.image_shape = [_int_at_least("image_shape", s, MINIMUM["image_shape"]) for s in shape]
        c, h, w = self.image_shape
        factor = 2 ** (len(self.blocks_per_scale) - 1)
        if h % factor or w % factor:
            raise ValueError(
                f"image_shape: height and width must be divisible by 2^(scales - 1) = {factor} for "
                f"{len(self.blocks_per_scale)} scales, got {h}x{w}"
            )
        if isinstance(self.formulation, list):
            raise ValueError("formulation: image flows take one formulation for every block, not a list")
        if sum(self.blocks_per_scale) + self.fc_blocks < 1:
            raise ValueError("blocks_per_scale / fc_blocks: an image flow needs at least one block")
        self.dim = c * h * w

    def _validate_family(self) -> None:
        self.family = _choice("family", self.family, FAMILIES)
        self.bins = _int_at_least("bins", self.bins, MINIMUM["bins"])
        if self.family == IMPLICIT:
            return
        if self.image_shape is not None:
            raise ValueError(
                f"family: {self.family!r} models vectors; image flows use the implicit family "
                "(image_shape must be null)"
            )
        if self.dim < 2:
            raise ValueError(f"family: {self.family!r} needs dim >= 2, got dim {self.dim}")

    def formulations(self) -> list[str]:
        """The formulation of each block."""
        if isinstance(self.formulation, list):
            return list(self.formulation)
        return [self.formulation] * self.blocks

    def estimator_settings(self) -> EstimatorSettings:
        """The power-series estimator settings of this configuration."""
        try:
            return EstimatorSettings(
                n_exact_terms=self.n_exact_terms,
                n_exact_terms_eval=self.n_exact_terms_eval,
                roulette=self.roulette,
                roulette_param=self.roulette_param,
                n_probes=self.n_probes,
                neumann_grad=self.neumann_grad,
            )
        except ValueError as err:
            raise ValueError(str(err)) from None


# --------------------------------------------------------------------------------------------------------------
# training configuration
# --------------------------------------------------------------------------------------------------------------

SCHEDULES = ("constant", "step", "warmup")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
EVAL_SPLITS = ("test", "validation")


def check_int(name: str, value: Any, low: int) -> int:
    """``value`` as an int >= ``low`` (bools refused), else ``ValueError("name: ...")``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: must be an integer >= {low}, got {value!r}")
    return int(value)


def check_float(name: str, value: Any) -> float:
    """``value`` as a finite float (bools refused), else ``ValueError("name: ...")``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(float(value)):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    return float(value)


@dataclass
class TrainConfig(JsonConfig):
    """Settings of a training run; defaults reproduce the paper's 2-D toy protocol (docs/algorithm.md section 9.1).

    Attributes:
        data: data set name: one of :data:`monoflow_core.data.DATASETS` (``"staircase"`` is the 1-D regression
            task, the others are 2-D densities) or an image set of
            :data:`monoflow_core.data.images.IMAGE_DATASETS` (``"digits"`` is built in; the others read
            ``data_dir``). Image runs train on bits/dim. ``"points"``: a user's 2-D points, a
            :class:`~monoflow_core.data.points.PointSet` handed to the trainer (and stored in its checkpoints).
        data_dir: folder holding an image set's files (``None`` for the built-in sets).
        grad_accumulation: split each batch of ``batch_size`` into this many micro-batches whose gradients are
            accumulated (less memory; the same update as one big batch when the log-dets are exact, and an update
            with the same expectation when they are estimated, since each micro-batch draws its own probes),
            >= 1 and <= batch_size.
        eval_split: image split used by evaluations, ``"test"`` or ``"validation"`` (digits only).
        iterations: total training iterations of a run, >= 1 (the paper: 50,000 for 2-D, 15,000 for 1-D).
        batch_size: fresh samples per iteration, >= 1 (paper: 500 for 2-D, 5,000 for 1-D).
        lr: Adam learning rate, > 0.
        betas: Adam betas, each in [0, 1).
        weight_decay: Adam's *coupled* L2 weight decay (``torch.optim.Adam``), >= 0.
        schedule: ``"constant"``, ``"step"`` (multiply by ``lr_gamma`` at each of ``lr_milestones``) or
            ``"warmup"`` (linear warm-up over ``warmup_iterations``, then constant). A non-zero
            ``warmup_iterations`` also prepends the warm-up to the other schedules.
        lr_milestones: strictly increasing iteration indices where ``"step"`` multiplies the lr by ``lr_gamma``
            (the 1-D preset: [5000, 10000] with gamma 0.2: 0.01 -> 0.002 -> 0.0004).
        lr_gamma: factor of the ``"step"`` schedule, > 0.
        warmup_iterations: length of the linear warm-up, >= 0 (>= 1 for ``"warmup"``).
        concat_learnable_from: iteration from which the DenseNet concatenation weights are trained (frozen
            before it; the paper's "learnable concatenation" from 25,000); ``None`` follows the model config.
        lipschitz_iterations: power iterations on every spectrally normalised layer after each step, >= 0.
        grad_clip: maximum global gradient norm, > 0, or ``None`` for no clipping.
        ema: decay of an exponential moving average of the weights in (0, 1) (used for evaluation), or
            ``None``.
        seed: seed (>= 0) of the weights (``torch.manual_seed``) and of the training data stream.
        eval_every: a fresh-sample test every this many iterations during :meth:`Trainer.run`; 0 = never.
        eval_size: points per fresh-sample test, >= 1 (paper: 10,000). Also the size of the fixed regression
            test set (the paper's 1-D test MSE is on 10,000 points).
        test_size: size of the fixed, seeded held-out set of density tasks, >= 1.
        test_seed: seed (>= 0) of the held-out set.
        device: torch device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        dtype: ``"float32"`` or ``"float64"`` for training.
        max_rejected_steps: consecutive rejected (non-finite) steps before :class:`TrainingError`, >= 1.
        checkpoint_every: iterations between checkpoints in :meth:`Trainer.run` when it is given a path; 0 =
            only at the end.
        precision: how G is computed in training: ``"auto"`` (TF32 off everywhere), ``"highest"`` (the same,
            explicitly) or ``"tf32"`` (TF32 in CUDA float32 products and convolutions, solves stopping at TF32's
            floor); evaluations always run in full precision (:mod:`monoflow_core.precision`, docs/precision.md).
        cudnn_benchmark: whether cuDNN autotunes its convolution algorithms in training: ``"auto"`` (on for image
            models on CUDA, whose shapes are fixed), ``"on"`` or ``"off"`` (off: the same algorithms in every
            process, for runs that must repeat bit for bit); see
            :func:`~monoflow_core.precision.resolve_cudnn_benchmark`.
    """

    kind: typing.ClassVar[str] = "training configuration"

    data: str = "8gaussians"
    iterations: int = 50000
    batch_size: int = 500
    lr: float = 1e-3
    betas: tuple[float, float] | list[float] = (0.9, 0.999)
    weight_decay: float = 1e-5
    schedule: str = "constant"
    lr_milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    warmup_iterations: int = 0
    concat_learnable_from: int | None = 25000
    lipschitz_iterations: int = 5
    grad_clip: float | None = None
    ema: float | None = None
    seed: int = 0
    eval_every: int = 100
    eval_size: int = 10000
    test_size: int = 100000
    test_seed: int = 1234
    device: str = "cpu"
    dtype: str = "float32"
    max_rejected_steps: int = 20
    checkpoint_every: int = 1000
    data_dir: str | None = None
    grad_accumulation: int = 1
    eval_split: str = "test"
    precision: str = "auto"
    cudnn_benchmark: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check and normalise every field; raise ``ValueError("field: ...")`` with the allowed range."""
        if isinstance(self.data, str) and self.data.lower() in (*IMAGE_DATASETS, POINTS_DATA):
            self.data = self.data.lower()  # (a run on "points" gets its PointSet from the trainer's caller)
        elif not (isinstance(self.data, str) and self.data.lower() in DATASETS):
            raise ValueError(
                f"data: unknown data set {self.data!r}; choose one of {[*DATASETS, *IMAGE_DATASETS, POINTS_DATA]}"
            )
        else:
            self.data = check_dataset_name(self.data)
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise ValueError(f"data_dir: must be a folder path or null, got {self.data_dir!r}")
        if self.data in IMAGE_DATASETS and self.data != "digits" and not self.data_dir:
            raise ValueError(f"data_dir: --data {self.data} needs --data-dir DIR (the folder holding its files)")
        if not isinstance(self.eval_split, str) or self.eval_split.lower() not in EVAL_SPLITS:
            raise ValueError(f"eval_split: unknown value {self.eval_split!r}; choose one of {list(EVAL_SPLITS)}")
        self.eval_split = self.eval_split.lower()
        self.iterations = check_int("iterations", self.iterations, MINIMUM["iterations"])
        self.batch_size = check_int("batch_size", self.batch_size, MINIMUM["batch_size"])
        self.lr = check_in("lr", check_float("lr", self.lr), INTERVALS["lr"])
        if not isinstance(self.betas, list | tuple) or len(self.betas) != 2:
            raise ValueError(f"betas: must be a pair (beta1, beta2), each in [0, 1), got {self.betas!r}")
        betas = tuple(check_float("betas", b) for b in self.betas)
        if not all(b in INTERVALS["betas"] for b in betas):
            raise ValueError(f"betas: each must {INTERVALS['betas'].rule()}, got {self.betas!r}")
        self.betas = (betas[0], betas[1])
        self.weight_decay = check_in(
            "weight_decay", check_float("weight_decay", self.weight_decay), INTERVALS["weight_decay"]
        )
        if not isinstance(self.schedule, str) or self.schedule.lower() not in SCHEDULES:
            raise ValueError(f"schedule: unknown value {self.schedule!r}; choose one of {list(SCHEDULES)}")
        self.schedule = self.schedule.lower()
        if not isinstance(self.lr_milestones, list | tuple):
            raise ValueError(f"lr_milestones: must be a list of increasing iterations >= 1, got {self.lr_milestones!r}")
        self.lr_milestones = [check_int("lr_milestones", m, MINIMUM["lr_milestones"]) for m in self.lr_milestones]
        if any(b <= a for a, b in zip(self.lr_milestones, self.lr_milestones[1:], strict=False)):
            raise ValueError(f"lr_milestones: must be strictly increasing, got {self.lr_milestones!r}")
        self.lr_gamma = check_in("lr_gamma", check_float("lr_gamma", self.lr_gamma), INTERVALS["lr_gamma"])
        self.warmup_iterations = check_int("warmup_iterations", self.warmup_iterations, MINIMUM["warmup_iterations"])
        if self.schedule == "warmup" and self.warmup_iterations < 1:
            raise ValueError("warmup_iterations: must be >= 1 for schedule 'warmup'")
        if self.concat_learnable_from is not None:
            self.concat_learnable_from = check_int(
                "concat_learnable_from", self.concat_learnable_from, MINIMUM["concat_learnable_from"]
            )
        self.lipschitz_iterations = check_int(
            "lipschitz_iterations", self.lipschitz_iterations, MINIMUM["lipschitz_iterations"]
        )
        if self.grad_clip is not None:
            self.grad_clip = check_float("grad_clip", self.grad_clip)
            if self.grad_clip not in INTERVALS["grad_clip"]:
                raise ValueError(f"grad_clip: must {INTERVALS['grad_clip'].rule()} or null, got {self.grad_clip!r}")
        if self.ema is not None:
            self.ema = check_float("ema", self.ema)
            if self.ema not in INTERVALS["ema"]:
                raise ValueError(f"ema: must {INTERVALS['ema'].rule()} or be null, got {self.ema!r}")
        self.seed = check_int("seed", self.seed, MINIMUM["seed"])
        self.eval_every = check_int("eval_every", self.eval_every, MINIMUM["eval_every"])
        self.eval_size = check_int("eval_size", self.eval_size, MINIMUM["eval_size"])
        self.test_size = check_int("test_size", self.test_size, MINIMUM["test_size"])
        self.test_seed = check_int("test_seed", self.test_seed, MINIMUM["test_seed"])
        if not isinstance(self.device, str):
            raise ValueError(f"device: must be a string such as 'cpu' or 'cuda:0', got {self.device!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"device: invalid device {self.device!r} ({err}); e.g. 'cpu', 'cuda', 'cuda:1'") from None
        if not isinstance(self.dtype, str) or self.dtype.lower() not in DTYPES:
            raise ValueError(f"dtype: unknown value {self.dtype!r}; choose one of {list(DTYPES)}")
        self.dtype = self.dtype.lower()
        self.max_rejected_steps = check_int(
            "max_rejected_steps", self.max_rejected_steps, MINIMUM["max_rejected_steps"]
        )
        self.checkpoint_every = check_int("checkpoint_every", self.checkpoint_every, MINIMUM["checkpoint_every"])
        self.grad_accumulation = check_int("grad_accumulation", self.grad_accumulation, MINIMUM["grad_accumulation"])
        if self.grad_accumulation > self.batch_size:
            raise ValueError(
                f"grad_accumulation: must be <= batch_size ({self.batch_size}), got {self.grad_accumulation}"
            )
        self.precision = check_precision(self.precision)
        self.cudnn_benchmark = check_cudnn_benchmark(self.cudnn_benchmark)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The training dtype as a ``torch.dtype``."""
        return DTYPES[self.dtype]

    @property
    def task(self) -> str:
        """``"density"`` (2-D toy densities, a user's points), ``"regression"`` (the staircase) or ``"image"``."""
        if self.data in IMAGE_DATASETS:
            return "image"
        return "density" if self.data in TOY_DATASETS or self.data == POINTS_DATA else "regression"
