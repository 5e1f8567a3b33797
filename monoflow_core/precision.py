"""The precision policy: how G is computed on each device and dtype, and what tolerance that arithmetic can reach.

Every implicit block solves ``w + G(w) = rhs`` (Ahn et al. 2022, arXiv:2210.08176; docs/algorithm.md section 4) to a
relative tolerance. How far a solve can get is set by the arithmetic that evaluates G, not by the dtype alone:
on NVIDIA GPUs since Ampere, float32 matrix products and cuDNN convolutions may run in *TF32*, which rounds their
inputs to 10 mantissa bits (a relative rounding of up to 2^-11, about 4.9e-4) before accumulating in float32.
PyTorch enables TF32 for cuDNN convolutions by default. A solve that aims below the noise this leaves in G's output
never meets its tolerance: it spins to ``max_iter``. This module decides the arithmetic explicitly, in one place:

* :func:`resolve_precision` turns the configured request (``"auto"``, ``"highest"`` or ``"tf32"``) and the run's
  device and dtype into a :class:`PrecisionPolicy`: TF32 on or off for the solves, log-dets and implicit gradients
  of training, and the tolerance floor that arithmetic can reach. Evaluations that report numbers (bits/dim, NLL)
  always run in full float32 or float64 (:func:`full_precision`).
* :func:`arithmetic_floor` is the floor of the arithmetic *in effect* (PyTorch's TF32 flags at the time of the
  solve), used by every solve (:func:`monoflow_core.solvers.effective_tolerance`): whoever sets the flags, no solve
  aims below what its arithmetic can reach.
* :func:`emulate_reduced_precision` reproduces TF32 (or bfloat16) rounding on the CPU, so that the behaviour of
  the solvers under that noise is tested without a GPU.
* :func:`resolve_cudnn_benchmark` decides, with the same policy, whether cuDNN autotunes its convolution
  algorithms during training (``torch.backends.cudnn.benchmark``): where a run's shapes are fixed.

docs/precision.md gives the choice for each device and dtype, the reasoning and the measurements.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "ARITHMETIC_EPS",
    "CUDNN_BENCHMARK",
    "PRECISIONS",
    "REDUCED_FLOOR_EPS",
    "TOL_FLOOR_EPS",
    "PrecisionPolicy",
    "arithmetic",
    "arithmetic_floor",
    "arithmetic_statement",
    "check_cudnn_benchmark",
    "check_precision",
    "cudnn_benchmark_mode",
    "emulate_reduced_precision",
    "full_precision",
    "resolve_cudnn_benchmark",
    "resolve_precision",
    "round_mantissa",
    "tf32_enabled",
    "tf32_mode",
    "tolerance_floor",
]

#: Values of ``TrainConfig.precision`` (``--precision``).
PRECISIONS = ("auto", "highest", "tf32")

#: Values of ``TrainConfig.cudnn_benchmark``: ``"auto"`` (on where a run's shapes are fixed), ``"on"`` or ``"off"``.
CUDNN_BENCHMARK = ("auto", "on", "off")

#: Machine epsilon (spacing of the numbers just above 1) of each arithmetic G may be computed in. TF32 and
#: bfloat16 keep 10 and 7 mantissa bits.
ARITHMETIC_EPS = {
    "float64": 2.0**-52,
    "float32": 2.0**-23,
    "tf32": 2.0**-10,
    "bfloat16": 2.0**-7,
    "float16": 2.0**-10,
}

#: The tolerance floor in IEEE arithmetic (float32, float64): this many machine epsilons (docs/solvers.md).
TOL_FLOOR_EPS = 10.0

#: The tolerance floor where products round their inputs (TF32, bfloat16): this many machine epsilons of that
#: arithmetic, i.e. 9.8e-4 in TF32 and 7.8e-3 in bfloat16. Rounding a product's inputs changes G's output by up to
#: about ``L u |w|`` per layer (``u = eps / 2``, Lip(G) = L < 1), so the residual noise of a trained G can approach one
#: epsilon; with TF32 emulated on the CPU (docs/precision.md) fresh CIFAR-10- and MNIST-shaped blocks stopped at
#: 0.005-0.015 epsilons (5e-6 to 1.4e-5).
REDUCED_FLOOR_EPS = 1.0

#: Arithmetics whose products round their inputs to fewer bits than the dtype holds.
_REDUCED = ("tf32", "bfloat16", "float16")

# The CPU emulation in effect (set by emulate_reduced_precision), read by arithmetic(); per thread, like the
# dispatch mode that does the rounding.
_emulated = threading.local()


def tolerance_floor(kind: str) -> float:
    """The smallest relative residual a solve in arithmetic ``kind`` aims at (see :data:`ARITHMETIC_EPS`).

    IEEE arithmetic: ``10 eps`` (1.19e-6 in float32, 2.2e-15 in float64). Products with rounded inputs (TF32,
    bfloat16, float16): ``1 eps`` of that arithmetic (9.8e-4 in TF32, 7.8e-3 in bfloat16).
    """
    if kind not in ARITHMETIC_EPS:
        raise ValueError(f"arithmetic: unknown {kind!r}; choose one of {list(ARITHMETIC_EPS)}")
    factor = REDUCED_FLOOR_EPS if kind in _REDUCED else TOL_FLOOR_EPS
    return factor * ARITHMETIC_EPS[kind]


# PyTorch has two sets of TF32 flags: the long-standing ones (``torch.set_float32_matmul_precision``,
# ``torch.backends.cudnn.allow_tf32``) and, since 2.9, per-operator ``fp32_precision`` strings. Mixing them makes the
# long-standing getters raise (e.g. a per-operator matmul setting that differs between CUDA and the CPU's oneDNN).
# This module sets the long-standing flags, which PyTorch keeps consistent across operators, and reads them; only
# where a user's own mixing makes a getter raise does it read (and later restore) the per-operator strings.


# Typed as Any: the per-operator flag objects exist only in recent torch versions (and in no type stubs).
_cuda: Any = torch.backends.cuda
_cudnn: Any = torch.backends.cudnn
_mkldnn: Any = torch.backends.mkldnn


def _matmul_tf32() -> bool:
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:  # pragma: no cover - per-operator flags set apart by the user
        return str(_cuda.matmul.fp32_precision) == "tf32"


def _conv_tf32() -> bool:
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # per-operator flags set apart (cuDNN convolutions and RNNs differ)
        return str(_cudnn.conv.fp32_precision) == "tf32"


def tf32_enabled() -> tuple[bool, bool]:
    """Whether float32 matrix products and cuDNN convolutions on CUDA may use TF32 now: ``(matmul, conv)``."""
    return _matmul_tf32(), _conv_tf32()


def _set_tf32(matmul: bool, conv: bool) -> None:
    torch.set_float32_matmul_precision("high" if matmul else "highest")
    torch.backends.cudnn.allow_tf32 = conv


def _flag_state() -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    matmul: tuple[Any, ...]
    conv: tuple[Any, ...]
    try:
        matmul = ("global", torch.get_float32_matmul_precision())
    except RuntimeError:  # pragma: no cover - per-operator flags set apart by the user
        matmul = ("per_op", str(_cuda.matmul.fp32_precision), str(_mkldnn.matmul.fp32_precision))
    try:
        conv = ("legacy", bool(torch.backends.cudnn.allow_tf32))
    except RuntimeError:
        conv = ("per_op", str(_cudnn.conv.fp32_precision), str(_cudnn.rnn.fp32_precision))
    return matmul, conv


def _restore_flags(state: tuple[tuple[Any, ...], tuple[Any, ...]]) -> None:
    matmul, conv = state
    if matmul[0] == "global":
        torch.set_float32_matmul_precision(matmul[1])
    else:  # pragma: no cover - per-operator flags set apart by the user
        _cuda.matmul.fp32_precision, _mkldnn.matmul.fp32_precision = matmul[1:]
    if conv[0] == "legacy":
        torch.backends.cudnn.allow_tf32 = conv[1]
    else:
        _cudnn.conv.fp32_precision, _cudnn.rnn.fp32_precision = conv[1:]


@contextlib.contextmanager
def tf32_mode(enabled: bool) -> Iterator[None]:
    """Allow (or forbid) TF32 in CUDA float32 matrix products and cuDNN convolutions inside the block.

    The flags are PyTorch's process-wide settings; they are restored on exit. Usable as a decorator.
    """
    state = _flag_state()
    _set_tf32(enabled, enabled)
    try:
        yield
    finally:
        _restore_flags(state)


@contextlib.contextmanager
def cudnn_benchmark_mode(enabled: bool) -> Iterator[None]:
    """Let cuDNN time its convolution algorithms for each new input shape (or not) inside the block.

    ``torch.backends.cudnn.benchmark`` is a process-wide setting; it is restored on exit. Usable as a decorator.
    """
    before = bool(torch.backends.cudnn.benchmark)
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


@contextlib.contextmanager
def _training_arithmetic(tf32: bool, benchmark: bool) -> Iterator[None]:
    with tf32_mode(tf32), cudnn_benchmark_mode(benchmark):
        yield


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """TF32 off: full float32 / float64 arithmetic, as every reported evaluation uses. Usable as a decorator."""
    with tf32_mode(False):
        yield


def arithmetic(dtype: torch.dtype, device: torch.device | str | None = None) -> str:
    """The arithmetic G's products run in now for tensors of ``dtype`` on ``device`` (one of :data:`ARITHMETIC_EPS`).

    float32 on CUDA is ``"tf32"`` while either TF32 flag is on (a conservative reading: it cannot know whether G
    uses matrix products or convolutions). Inside :func:`emulate_reduced_precision` the emulated arithmetic is
    reported for float32 on any device.
    """
    if dtype == torch.float64:
        return "float64"
    if dtype == torch.bfloat16:
        return "bfloat16"
    if dtype == torch.float16:
        return "float16"
    emulated = getattr(_emulated, "kind", None)
    if dtype == torch.float32 and emulated is not None:
        return str(emulated)
    if dtype == torch.float32 and device is not None and torch.device(device).type == "cuda" and any(tf32_enabled()):
        return "tf32"
    return "float32" if dtype == torch.float32 else "float64"


def arithmetic_floor(dtype: torch.dtype, device: torch.device | str | None = None) -> float:
    """The tolerance floor of the arithmetic in effect for ``dtype`` on ``device`` (:func:`tolerance_floor`)."""
    if dtype not in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        # Any other floating dtype: 10 of its epsilons, as before this policy existed.
        return TOL_FLOOR_EPS * torch.finfo(dtype).eps
    return tolerance_floor(arithmetic(dtype, device))


# --------------------------------------------------------------------------------------------------------------
# the policy
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrecisionPolicy:
    """How a run computes G, resolved from its configuration by :func:`resolve_precision`.

    Attributes:
        requested: the configured value (``"auto"``, ``"highest"`` or ``"tf32"``).
        mode: what runs: ``"highest"`` (IEEE float32 / float64 everywhere) or ``"tf32"``.
        device: the device type (``"cpu"``, ``"cuda"``, ...).
        dtype: the training dtype's name.
        tf32: TF32 in CUDA matrix products and cuDNN convolutions during training (solves, log-dets, implicit
            gradients, the optimizer step).
        tolerance_floor: the solver tolerance floor during training.
        evaluation_floor: the floor during evaluations, which always run in full precision.
        reason: why this mode was chosen.
        cudnn_benchmark: cuDNN autotunes its convolution algorithms during training
            (:func:`resolve_cudnn_benchmark`).
        cudnn_benchmark_reason: why.
    """

    requested: str
    mode: str
    device: str
    dtype: str
    tf32: bool
    tolerance_floor: float
    evaluation_floor: float
    reason: str
    cudnn_benchmark: bool
    cudnn_benchmark_reason: str

    def training(self) -> contextlib.AbstractContextManager[None]:
        """The arithmetic of a training step (TF32 on or off, cuDNN benchmark on or off); restores PyTorch's flags
        on exit."""
        return _training_arithmetic(self.tf32, self.cudnn_benchmark)

    def evaluation(self) -> contextlib.AbstractContextManager[None]:
        """The arithmetic of a reported evaluation: always full precision."""
        return full_precision()

    def describe(self) -> str:
        """One line for logs: what runs, where, the floors and why."""
        arith = "TF32 in matrix products and cuDNN convolutions" if self.tf32 else f"full {self.dtype} (TF32 off)"
        return (
            f"precision {self.mode} (requested {self.requested}): training on {self.device} in {arith}, solver "
            f"tolerance floor {self.tolerance_floor:.3g}; evaluations in full {self.dtype} (floor "
            f"{self.evaluation_floor:.3g}); {self.reason}; cuDNN benchmark {self.cudnn_benchmark_reason}"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values for ``config.json`` and ``eval --json``."""
        return {
            "requested": self.requested,
            "mode": self.mode,
            "device": self.device,
            "dtype": self.dtype,
            "tf32": self.tf32,
            "tolerance_floor": self.tolerance_floor,
            "evaluation": f"full {self.dtype} (TF32 off)",
            "evaluation_tolerance_floor": self.evaluation_floor,
            "reason": self.reason,
            "cudnn_benchmark": self.cudnn_benchmark,
            "cudnn_benchmark_reason": self.cudnn_benchmark_reason,
        }


def arithmetic_statement(dtype: torch.dtype, device: torch.device | str) -> dict[str, Any]:
    """What the arithmetic in effect is for ``dtype`` on ``device``, for reports (``eval --json``).

    Call it inside the computation it describes (e.g. within :func:`full_precision`): it reads PyTorch's flags.
    """
    kind = arithmetic(dtype, device)
    return {
        "arithmetic": kind,
        "tf32": kind == "tf32",
        "device": torch.device(device).type,
        "dtype": str(dtype).replace("torch.", ""),
        "tolerance_floor": arithmetic_floor(dtype, device),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
    }


def check_precision(value: Any) -> str:
    """``value`` as one of :data:`PRECISIONS`, else ``ValueError("precision: ...")``."""
    if not isinstance(value, str) or value.lower() not in PRECISIONS:
        raise ValueError(f"precision: unknown value {value!r}; choose one of {list(PRECISIONS)}")
    return value.lower()


def check_cudnn_benchmark(value: Any) -> str:
    """``value`` as one of :data:`CUDNN_BENCHMARK`, else ``ValueError("cudnn_benchmark: ...")``."""
    if not isinstance(value, str) or value.lower() not in CUDNN_BENCHMARK:
        raise ValueError(f"cudnn_benchmark: unknown value {value!r}; choose one of {list(CUDNN_BENCHMARK)}")
    return value.lower()


def resolve_cudnn_benchmark(
    requested: str, device: torch.device | str, *, convolutions: bool, fixed_shapes: bool
) -> tuple[bool, str]:
    """Whether cuDNN autotunes its convolution algorithms during training, and why (docs/precision.md).

    With ``torch.backends.cudnn.benchmark`` on, cuDNN times its algorithms the first time it meets an input shape
    and keeps the fastest for that shape. That pays when a run meets the same few shapes step after step: image
    flows (convolutional G) on CUDA, whose solves keep a fixed shape (finished samples masked, not removed:
    :func:`monoflow_core.solvers.default_fixed_shape`) on batches of a fixed size. Where the shapes change from one
    iteration to the next (solves that compact the batch) every new shape would be timed again.

    * ``"auto"``: on for a model with convolutions on CUDA whose shapes are fixed; off otherwise, saying why.
    * ``"on"`` / ``"off"``: as requested; ``"on"`` resolves to off where there is no cuDNN (not CUDA).

    Args:
        requested: one of :data:`CUDNN_BENCHMARK`.
        device: the training device.
        convolutions: the model's G has convolutions (an image flow).
        fixed_shapes: every step meets the same shapes (fixed-shape solves, batches of a fixed size).

    Returns:
        ``(on, reason)``; the reason begins with ``"on"`` or ``"off"``.
    """
    req = check_cudnn_benchmark(requested)
    dev = torch.device(device).type
    if dev != "cuda":
        return False, f"off: {'requested on, but ' if req == 'on' else ''}the {dev} has no cuDNN"
    if req != "auto":
        return req == "on", f"{req}: requested"
    if not convolutions:
        return False, "off (auto): a vector model has no convolutions to tune"
    if not fixed_shapes:
        return False, "off (auto): the solves change the batch's shape from one iteration to the next"
    return True, "on (auto): an image model on CUDA with fixed shapes (cuDNN tunes each convolution once)"


def resolve_precision(
    requested: str,
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    benchmark: str = "auto",
    convolutions: bool = False,
    fixed_shapes: bool = False,
) -> PrecisionPolicy:
    """The policy for a run on ``device`` in ``dtype`` (docs/precision.md).

    The arithmetic of G (``requested``):

    * ``"highest"``: IEEE arithmetic everywhere; the floor is 10 epsilons of the dtype.
    * ``"tf32"``: TF32 in CUDA float32 products and convolutions during training, with the TF32 floor
      (:func:`tolerance_floor`); where TF32 does not exist (the CPU, float64) it resolves to ``"highest"`` and says so.
    * ``"auto"``: ``"highest"`` on every device and dtype. On CUDA float32 this turns off the TF32 that PyTorch
      enables for convolutions by default: TF32's rounding leaves residual noise that a float32 solve cannot get
      below, and the solves, log-dets and implicit gradients of training are then only as exact as TF32's floor
      allows (docs/precision.md has the measurements); the released code of the paper turns TF32 off as well.

    cuDNN's autotuning (``benchmark``, ``convolutions``, ``fixed_shapes``): see :func:`resolve_cudnn_benchmark`.
    """
    req = check_precision(requested)
    dev = torch.device(device).type
    name = str(dtype).replace("torch.", "")
    full = tolerance_floor("float64" if dtype == torch.float64 else "float32")
    tuned = resolve_cudnn_benchmark(benchmark, device, convolutions=convolutions, fixed_shapes=fixed_shapes)
    if req == "tf32" and dev == "cuda" and dtype == torch.float32:
        return PrecisionPolicy(
            req,
            "tf32",
            dev,
            name,
            True,
            tolerance_floor("tf32"),
            full,
            "TF32 requested: faster products, solves stop at the TF32 floor",
            *tuned,
        )
    if req == "tf32":
        why = "float64 has no TF32 mode" if dtype != torch.float32 else f"the {dev} has no TF32 arithmetic"
        return PrecisionPolicy(req, "highest", dev, name, False, full, full, f"TF32 requested, but {why}", *tuned)
    if req == "highest":
        reason = "highest requested"
    elif dev == "cuda" and dtype == torch.float32:
        reason = (
            "auto: TF32 off on CUDA float32, so solves reach float32's floor rather than stalling on TF32 "
            "rounding noise (as the paper's released code does)"
        )
    else:
        reason = f"auto: {dev} {name} arithmetic is IEEE"
    return PrecisionPolicy(req, "highest", dev, name, False, full, full, reason, *tuned)


# --------------------------------------------------------------------------------------------------------------
# emulation on the CPU
# --------------------------------------------------------------------------------------------------------------


def round_mantissa(x: Tensor, bits: int) -> Tensor:
    """float32 ``x`` rounded to ``bits`` explicit mantissa bits, to nearest with ties away from zero.

    This is the conversion TF32 (``bits=10``) applies to the inputs of a product; ``bits=7`` gives bfloat16's
    precision. Other dtypes are returned unchanged.
    """
    if x.dtype != torch.float32 or not 0 <= bits < 23:
        return x
    drop = 23 - bits
    raw = x.contiguous().view(torch.int32)
    # Adding half of the dropped range to the magnitude bits rounds ties away from zero; the mask then truncates.
    rounded = (raw + (1 << (drop - 1))) & ~((1 << drop) - 1)
    finite = torch.isfinite(x)
    return torch.where(finite, rounded.view(torch.float32), x)


# Operators whose float32 inputs TF32 hardware rounds (argument positions): products and convolutions, forward and
# backward. Additions (the bias of addmm) stay in float32, as in the hardware's accumulator.
_PRODUCT_ARGS: dict[Any, tuple[int, ...]] = {
    torch.ops.aten.mm.default: (0, 1),
    torch.ops.aten.addmm.default: (1, 2),
    torch.ops.aten.bmm.default: (0, 1),
    torch.ops.aten.baddbmm.default: (1, 2),
    torch.ops.aten.mv.default: (0, 1),
    torch.ops.aten.addmv.default: (1, 2),
    torch.ops.aten.convolution.default: (0, 1),
    torch.ops.aten.convolution_backward.default: (0, 1, 2),
}


class _RoundProducts(TorchDispatchMode):
    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.rounded = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        positions = _PRODUCT_ARGS.get(func)
        if positions:
            args = list(args)
            for i in positions:
                if i < len(args) and isinstance(args[i], Tensor):
                    args[i] = round_mantissa(args[i], self.bits)
            self.rounded += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def emulate_reduced_precision(kind: str = "tf32", *, declare: bool = True) -> Iterator[_RoundProducts]:
    """Run float32 products and convolutions as TF32 (or bfloat16) hardware would, on any device (for tests).

    Inside the block every float32 matrix product and convolution (forward and backward) first rounds its inputs
    to 10 (TF32) or 7 (bfloat16) mantissa bits, then runs in float32. With ``declare`` :func:`arithmetic` reports
    ``kind`` for float32, so that solves aim at that arithmetic's floor, as they do on a GPU whose TF32 flags are on;
    without it solves aim at float32's floor, as they did before this policy existed. Yields the dispatch mode,
    whose ``rounded`` counts the products it rounded.
    """
    bits = {"tf32": 10, "bfloat16": 7}.get(kind)
    if bits is None:
        raise ValueError(f"emulate: unknown arithmetic {kind!r}; choose 'tf32' or 'bfloat16'")
    previous = getattr(_emulated, "kind", None)
    if declare:
        _emulated.kind = kind
    try:
        with _RoundProducts(bits) as mode:
            yield mode
    finally:
        _emulated.kind = previous
