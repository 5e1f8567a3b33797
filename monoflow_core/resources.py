"""What the machine can give and what a request will take: memory, disk and thread budgets, checked up front.

The command line checks every size it is given (points, images, blocks, grid resolution, threads) against this
machine *before* spending anything, so that a request that cannot fit ends with one line naming the flag and the
estimated need, instead of a ``MemoryError`` traceback minutes into a run, an out-of-memory kill, or a segfault.

Budgets:

* memory: the smallest of ``MemAvailable`` (``/proc/meminfo``; ``os.sysconf`` elsewhere), the room left under a
  cgroup memory limit, and the room left under ``RLIMIT_AS`` (``ulimit -v``). psutil is not needed. On a CUDA device
  the device's free memory is the budget of the model and its activations.
* disk: ``shutil.disk_usage`` of the folder an output goes to.
* threads: at most :data:`MAX_THREADS_PER_CORE` times ``os.cpu_count()`` (a request for 100,000 intra-op threads
  crashed torch with a segfault).

Estimates (:func:`model_size`, :func:`model_state_bytes`, :func:`activation_bytes_per_sample`,
:func:`points_bytes`) are computed from the configuration alone, without building anything: building the model to
measure it is exactly what must not happen when it does not fit. They are deliberately on the low side (a rough
count of the tensors that must exist, not a prediction of the allocator's peak): a refusal then always means the
request is truly out of reach, while a request near the limit is let through and, at worst, meets the command's
out-of-memory handler.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .families.size import family_size, family_widths

if TYPE_CHECKING:
    from .config import FlowConfig
    from .training import TrainConfig

__all__ = [
    "MAX_THREADS_PER_CORE",
    "SEED_MAX",
    "ModelSize",
    "Need",
    "ResourceError",
    "activation_bytes_per_sample",
    "available_memory",
    "check_disk",
    "check_memory",
    "check_threads",
    "check_training",
    "checkpoint_bytes",
    "format_bytes",
    "free_disk",
    "max_threads",
    "memory_budget",
    "model_size",
    "model_state_bytes",
    "npy_bytes",
    "points_bytes",
    "training_needs",
]

#: Thread counts above this many per core are refused (oversubscription only slows torch down, and very large
#: counts crash it).
MAX_THREADS_PER_CORE = 4

#: Largest seed accepted: torch seeds are 64-bit and the trainer adds offsets to the seed (the evaluation stream,
#: the dequantization noise, each data-parallel rank), so seeds stay below 2**63 to leave room for them.
SEED_MAX = 2**63 - 1

#: Python-side bytes of one ``nn.Module`` (its dicts, hooks and attribute objects), measured at about 3.5 KB on
#: CPython 3.11 with torch 2.x (a 2-D toy block of 11 modules took 38.8 KB of resident memory, 2.8 KB of which were
#: tensors). It is what a request for a billion tiny blocks runs out of long before their parameters.
PYTHON_BYTES_PER_MODULE = 3_000

# Limits at or above this are "no limit" (cgroup v1 reports 2**63 rounded down to a page when unlimited).
_UNLIMITED = 1 << 60


class ResourceError(ValueError):
    """A request this machine cannot serve; the message names the flag, the estimated need and the budget."""


# --------------------------------------------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------------------------------------------


#: Accepted steps of a CNF's adaptive ODE solver assumed by the memory estimate (a trained 2-D FFJORD model takes
#: tens to a few hundred at tolerance 1e-5).
CNF_STEPS_ESTIMATE = 200


def format_bytes(n: float) -> str:
    """``n`` bytes for people, in binary units: ``"512 B"``, ``"1.5 KiB"``, ``"3.2 GiB"``, ``"745 TiB"``,
    ``"1,024 PiB"``, ``"4.4e+21 PiB"``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            if abs(value) >= 1e6:  # absurd requests: digits would only hide the order of magnitude
                return f"{value:.3g} {unit}"
            return f"{value:,.0f} {unit}" if unit == "B" or abs(value) >= 100 else f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------------------------------------------
# budgets
# --------------------------------------------------------------------------------------------------------------


def _read_int(path: str) -> int | None:
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    try:
        return int(text)
    except ValueError:  # cgroup v2 writes "max" for no limit
        return None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2, else v1), or ``None`` without a limit."""
    for limit_path, usage_path in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit = _read_int(limit_path)
        if limit is not None and limit < _UNLIMITED:
            usage = _read_int(usage_path) or 0
            return max(0, limit - usage)
    return None


def _address_space_room() -> int | None:
    """Bytes of address space left under ``RLIMIT_AS`` (``ulimit -v``), or ``None`` without a limit."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or soft >= _UNLIMITED:
        return None
    used = 0
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    used = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    return max(0, soft - used)


def available_memory() -> int | None:
    """Bytes of host memory this process can still allocate, or ``None`` when it cannot be told.

    The smallest of the kernel's ``MemAvailable``, the room under a cgroup limit and the room under
    ``RLIMIT_AS``.
    """
    found = [v for v in (_meminfo_available(), _cgroup_room(), _address_space_room()) if v is not None]
    return min(found) if found else None


def memory_budget(device: object = "cpu") -> int | None:
    """The memory budget of a model and its activations on ``device``: free device memory on CUDA, else the host's.

    Args:
        device: a ``torch.device`` or a device string (``"cpu"``, ``"cuda:1"``).
    """
    if str(device).startswith("cuda"):
        try:
            import torch

            if torch.cuda.is_available():
                free, _ = torch.cuda.mem_get_info(torch.device(str(device)))
                return int(free)
        except (RuntimeError, ValueError):
            return None
    return available_memory()


def free_disk(folder: str | os.PathLike[str]) -> int:
    """Bytes free for this user on the file system holding ``folder``."""
    return int(shutil.disk_usage(folder).free)


def max_threads() -> int:
    """The largest thread count accepted: :data:`MAX_THREADS_PER_CORE` per core of this machine."""
    return MAX_THREADS_PER_CORE * (os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------------------------


def check_threads(label: str, n: int) -> int:
    """``n`` if it is a sane thread count for this machine, else :class:`ResourceError` naming ``label``."""
    cap = max_threads()
    if n > cap:
        cores = os.cpu_count() or 1
        raise ResourceError(
            f"{label} {n}: this machine has {cores} CPU core{'s' if cores != 1 else ''}; "
            f"use at most {cap} threads ({MAX_THREADS_PER_CORE} per core)"
        )
    return n


def check_memory(label: str, need: int, what: str, *, budget: int | None = None, hint: str = "") -> None:
    """Raise :class:`ResourceError` if ``need`` bytes exceed the memory budget.

    Args:
        label: the flag and its value as the user wrote them (``"--batch-size 100000000000"``).
        need: the estimated bytes.
        what: what needs them (``"training"``, ``"the test set"``).
        budget: the budget in bytes; ``None`` asks :func:`available_memory` (and an unknown budget passes).
        hint: advice appended to the message (``"use --grad-accumulation K"``).
    """
    if budget is None:
        budget = available_memory()
    if budget is None or need <= budget:
        return
    tail = f"; {hint}" if hint else ""
    raise ResourceError(
        f"{label}: {what} needs about {format_bytes(need)} of memory but only {format_bytes(budget)} is available "
        f"on this machine{tail}"
    )


def check_disk(label: str, need: int, folder: str | os.PathLike[str], what: str) -> None:
    """Raise :class:`ResourceError` if ``need`` bytes do not fit on the disk holding ``folder``."""
    try:
        free = free_disk(folder)
    except OSError:
        return  # the write itself reports an unusable folder
    if need > free:
        raise ResourceError(
            f"{label}: writing {what} takes {format_bytes(need)} of disk space but only {format_bytes(free)} is free "
            f"in {os.path.abspath(folder)}"
        )


# --------------------------------------------------------------------------------------------------------------
# estimates
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSize:
    """Tensor elements and modules of a flow, counted from its configuration.

    Attributes:
        parameters: trainable elements (what the optimizer keeps two moments of).
        buffers: other tensor elements (power-iteration vectors, ActNorm flags).
        modules: ``nn.Module`` objects (each costs Python memory, :data:`PYTHON_BYTES_PER_MODULE`).
    """

    parameters: int
    buffers: int
    modules: int

    def __add__(self, other: ModelSize) -> ModelSize:
        return ModelSize(self.parameters + other.parameters, self.buffers + other.buffers, self.modules + other.modules)

    def __mul__(self, k: int) -> ModelSize:
        return ModelSize(self.parameters * k, self.buffers * k, self.modules * k)


def _expansion(activation: str) -> int:
    from .nn.activations import ACTIVATIONS

    return int(ACTIVATIONS[activation].expansion)


def _activation(activation: str) -> ModelSize:
    # Some activations learn a parameter (LipSwish's beta); building one is cheap.
    from .nn.activations import get_activation

    return ModelSize(sum(p.numel() for p in get_activation(activation).parameters()), 0, 1)


def _linear(n_in: int, n_out: int) -> ModelSize:
    # SpectralLinear: weight, bias; power-iteration vectors u (n_out) and v (n_in).
    return ModelSize(n_in * n_out + n_out, n_in + n_out, 1)


def _conv(c_in: int, c_out: int, k: int, h: int, w: int) -> ModelSize:
    # SpectralConv2d: kernel, bias; power-iteration images u (c_out, h, w) and v (c_in, h, w).
    return ModelSize(c_out * c_in * k * k + c_out, (c_in + c_out) * h * w, 1)


def _dense_widths(n: int, depth: int, growth: int, activation: str) -> tuple[list[tuple[int, int]], int]:
    """The (input width, hidden width) of each dense layer of a DenseNet G, and the final layer's input width."""
    expansion = _expansion(activation)
    hidden = max(1, growth // expansion)
    widths, width = [], n
    for _ in range(depth):
        widths.append((width, hidden))
        width += hidden * expansion
    return widths, width


def _dense_g(n: int, depth: int, growth: int, activation: str) -> ModelSize:
    layers, final_in = _dense_widths(n, depth, growth, activation)
    size = ModelSize(2 * depth, 0, 3)  # concatenation weights; G and its two ModuleLists
    for width, hidden in layers:
        size = size + _linear(width, hidden) + _activation(activation)
    return size + _linear(final_in, n)


def _mlp_g(n: int, hidden: Sequence[int], activation: str) -> ModelSize:
    expansion = _expansion(activation)
    size, width = ModelSize(0, 0, 3), n
    for h in hidden:
        size = size + _linear(width, h) + _activation(activation)
        width = h * expansion
    return size + _linear(width, n)


def _conv_dense_g(c: int, h: int, w: int, depth: int, growth: int, activation: str) -> ModelSize:
    layers, final_in = _dense_widths(c, depth, growth, activation)
    size = ModelSize(2 * depth, 0, 3)
    for width, hidden in layers:
        size = size + _conv(width, hidden, 3, h, w) + _activation(activation)
    return size + _conv(final_in, c, 3, h, w)


def _scales(config: FlowConfig) -> list[tuple[int, int, int, int]]:
    """``(blocks, c, h, w)`` of each scale of an image flow, then ``(fc_blocks, c, h, w)`` of the last shape."""
    assert config.image_shape is not None
    c, h, w = config.image_shape
    out = []
    n_scales = len(config.blocks_per_scale)
    for s, n_blocks in enumerate(config.blocks_per_scale):
        out.append((n_blocks, c, h, w))
        if s < n_scales - 1:
            c, h, w = c * 4, h // 2, w // 2
            if config.factor_out:
                c //= 2
    out.append((config.fc_blocks, c, h, w))
    return out


def model_size(config: FlowConfig) -> ModelSize:
    """Parameters, buffers and modules of the flow ``build_flow(config)`` would build, without building it.

    Exact for the vector flows and for image flows with uniform dequantization (the tests compare with built
    flows); the variational dequantizer's small convolutions are counted without their Python details.
    """
    if config.family != "implicit":  # a comparison family (monoflow_core.families)
        return ModelSize(*family_size(config))
    block = ModelSize(0, 0, 1)  # the block module around G
    if not config.is_image:
        if config.g == "densenet":
            g = _dense_g(config.dim, config.depth, config.growth, config.activation)
        else:
            g = _mlp_g(config.dim, config.hidden, config.activation)
        actnorm = ModelSize(2 * config.dim, 1, 1)
        per_block = block + g + (actnorm if config.actnorm else ModelSize(0, 0, 0))
        total = per_block * config.blocks + ModelSize(0, 1, 2)  # the Flow (and its anchor buffer), its ModuleList
        return total + actnorm if config.actnorm_input else total
    *conv_scales, (fc_blocks, fc_c, fc_h, fc_w) = _scales(config)
    total = ModelSize(0, 1, 4)  # the flow (and its anchor buffer), its layer list, the logit transform, dequantizer
    for s, (n_blocks, c, h, w) in enumerate(conv_scales):
        g = _conv_dense_g(c, h, w, config.depth, config.growth, config.activation)
        actnorm = ModelSize(2 * c, 1, 1) if config.actnorm else ModelSize(0, 0, 0)
        squeeze = ModelSize(0, 0, 1 if s < len(conv_scales) - 1 else 0)  # between scales
        total = total + (block + g + actnorm) * n_blocks + squeeze
    fc_dim = fc_c * fc_h * fc_w
    fc = block + ModelSize(0, 0, 1) + _dense_g(fc_dim, config.depth, config.fc_growth, config.activation)  # FlatG
    actnorm = ModelSize(2 * fc_c, 1, 1) if config.actnorm else ModelSize(0, 0, 0)
    total = total + (fc + actnorm) * fc_blocks
    if config.dequantization == "variational":
        c0, hid = config.image_shape[0] if config.image_shape else 1, config.vdq_channels
        coupling = 2 * c0 * hid * 9 + hid + hid * hid + hid + hid * 2 * c0 * 9 + 2 * c0
        total = total + ModelSize(coupling * config.vdq_blocks, 0, 4 * config.vdq_blocks)
    return total


def model_state_bytes(config: FlowConfig, itemsize: int, *, ema: bool = False) -> int:
    """Bytes a training run keeps for its model: weights, gradients and Adam's two moments of every parameter,
    the buffers, an EMA copy of both if kept, and the modules' Python objects."""
    size = model_size(config)
    e = 1 if ema else 0
    return (size.parameters * (4 + e) + size.buffers * (1 + e)) * itemsize + size.modules * PYTHON_BYTES_PER_MODULE


def checkpoint_bytes(config: FlowConfig, itemsize: int, *, ema: bool = False) -> int:
    """Host bytes of writing a checkpoint: a CPU copy of weights, Adam moments, buffers (and EMA), then the file's
    bytes built in memory before the atomic write."""
    size = model_size(config)
    e = 1 if ema else 0
    return 2 * (size.parameters * (3 + e) + size.buffers * (1 + e)) * itemsize


def activation_bytes_per_sample(config: FlowConfig, itemsize: int) -> int:
    """Bytes one training sample keeps alive through a forward and backward pass, at the least.

    Per block: G's widest feature map twice (the activations and their derivatives for the backward pass) and
    the block's input four times (solver iterates and the implicit gradient); vector flows of up to 64 dimensions
    also keep two ``dim x dim`` Jacobians (Newton steps, exact log-det). Image blocks are counted with one copy of
    G's features, since their convolutions dominate and the implicit gradient keeps no per-iteration state. Image
    samples add their uint8 pixels and two float copies (dequantized, logit).
    """
    if config.family != "implicit":
        return _family_activation_bytes(config, itemsize)
    if not config.is_image:
        dim = config.dim
        if config.g == "densenet":
            _, width = _dense_widths(dim, config.depth, config.growth, config.activation)
        else:
            width = dim + sum(h * _expansion(config.activation) for h in config.hidden)
        jacobian = 2 * dim * dim if dim <= 64 else 0
        return config.blocks * itemsize * (2 * width + 4 * dim + jacobian)
    total = 0
    *conv_scales, (fc_blocks, c, h, w) = _scales(config)
    for n_blocks, cs, hs, ws in conv_scales:
        _, width = _dense_widths(cs, config.depth, config.growth, config.activation)
        total += n_blocks * itemsize * hs * ws * (width + 2 * cs)
    fc_dim = c * h * w
    _, width = _dense_widths(fc_dim, config.depth, config.fc_growth, config.activation)
    total += fc_blocks * itemsize * (width + 2 * fc_dim)
    return total + config.dim * (1 + 2 * itemsize)


def _family_activation_bytes(config: FlowConfig, itemsize: int) -> int:
    """:func:`activation_bytes_per_sample` of a comparison family (an estimate).

    Per block: each network's features twice (activations and their derivatives) and the block's input four times.
    A CNF keeps more: every evaluation of its ODE network builds ``dim`` Jacobian rows (the exact trace), and the
    adjoint keeps the state of each accepted step; :data:`CNF_STEPS_ESTIMATE` steps are assumed.
    """
    dim = config.dim
    total = 0
    for block in range(min(config.blocks, 2)):  # blocks differ only by parity (families.size)
        n_in, n_out = family_widths(config, block)
        per_block = itemsize * (2 * (n_in + sum(config.hidden) + n_out) + 4 * dim)
        if config.family == "cnf":
            per_block = per_block * (dim + 1) + itemsize * CNF_STEPS_ESTIMATE * (dim + 1)
        total += per_block * ((config.blocks + 1 - block) // 2)
    return total


def points_bytes(n: int, dim: int) -> int:
    """Bytes of a test on ``n`` points of dimension ``dim``: the float64 points as generated and as a tensor, a
    copy in the evaluation dtype, the per-point results, and an index array of the generators."""
    return n * 8 * (4 * dim + 4)


def npy_bytes(shape: Sequence[int], itemsize: int) -> int:
    """Size of a ``.npy`` file of that shape and item size (the header is at most a few hundred bytes)."""
    return 256 + math.prod(int(s) for s in shape) * itemsize


@dataclass(frozen=True)
class Need:
    """Bytes a phase of the work needs on the host and on the device (the same memory on a CPU run)."""

    host: int
    device: int


def training_needs(model: FlowConfig, train: TrainConfig) -> dict[str, Need]:
    """The peak memory of each phase of a training run, from its configurations alone.

    Phases (keys): ``"blocks"`` (building the model and writing checkpoints), ``"batch_size"`` (a training step on
    one micro-batch), ``"eval_size"`` (a fresh-sample test) and ``"test_size"`` (the fixed held-out test); each
    includes the model's resident state. Image tests are capped by their split, which is loaded anyway, so they add
    only the evaluation copy of the weights. For an image run ``model.image_shape`` must be set (the data decide
    it: :func:`~monoflow_core.data.images.image_set_shape`).
    """
    itemsize = 8 if train.dtype == "float64" else 4
    ema = train.ema is not None
    resident = model_state_bytes(model, itemsize, ema=ema)
    size = model_size(model)
    image = model.is_image
    # The trainer evaluates on a copy: float64 on the CPU for vector flows, the training dtype otherwise.
    on_cpu = not str(train.device).startswith("cuda")
    eval_itemsize = 8 if on_cpu and not image else itemsize
    eval_copy = (size.parameters + size.buffers) * eval_itemsize
    micro = -(-train.batch_size // max(1, train.grad_accumulation))
    batch_data = train.batch_size * (model.dim if image else 2 * 8 * model.dim)
    needs = {
        "blocks": Need(host=checkpoint_bytes(model, itemsize, ema=ema), device=resident + eval_copy),
        "batch_size": Need(host=batch_data, device=resident + micro * activation_bytes_per_sample(model, itemsize)),
    }
    test_points = {
        "eval_size": 0 if image else points_bytes(train.eval_size, model.dim),
        # The staircase's fixed test has eval_size points; test_size is only used by the 2-D densities.
        "test_size": 0 if image or train.task != "density" else points_bytes(train.test_size, model.dim),
    }
    for key, points in test_points.items():
        needs[key] = Need(host=points, device=resident + eval_copy)
    return needs


def check_training(
    model: FlowConfig,
    train: TrainConfig,
    labels: Mapping[str, str],
    *,
    hints: Mapping[str, str] | None = None,
    budgets: tuple[int | None, int | None] | None = None,
) -> None:
    """Refuse a training run whose model, batch or tests cannot fit in this machine's memory.

    Args:
        model: the model configuration (with ``image_shape`` set for image runs).
        train: the training configuration.
        labels: how to name each phase's setting in a message, by :func:`training_needs` key
            (``{"batch_size": "--batch-size 100000000000", ...}``); a missing key uses the field's name.
        hints: advice replacing the default one of a phase (by the same keys).
        budgets: ``(host, device)`` budgets in bytes (``None``: unknown, not checked); default: measured, the
            device's being :func:`memory_budget` of ``train.device``.

    Raises:
        ResourceError: naming the first phase that does not fit, its estimated need and the budget.
    """
    on_cuda = str(train.device).startswith("cuda")
    if budgets is None:
        host_budget = available_memory()
        budgets = (host_budget, memory_budget(train.device) if on_cuda else host_budget)
    host_budget, device_budget = budgets
    what = {
        "blocks": "the model (weights, gradients, optimizer state and a checkpoint's copy)",
        "batch_size": "a training step",
        "eval_size": "a fresh-sample test",
        "test_size": "the fixed held-out test",
    }
    advice = {
        "blocks": "use fewer --blocks (or a smaller model)",
        "batch_size": "use a smaller --batch-size, or split it with --grad-accumulation K",
        "eval_size": "use a smaller --eval-size",
        "test_size": "use a smaller --test-size",
        **(hints or {}),
    }
    for key, need in training_needs(model, train).items():
        label = labels.get(key, f"{key} {getattr(train, key, model.blocks)}")
        if on_cuda:
            check_memory(label, need.device, f"{what[key]} on {train.device}", budget=device_budget, hint=advice[key])
            check_memory(label, need.host, what[key], budget=host_budget, hint=advice[key])
        else:
            check_memory(label, need.host + need.device, what[key], budget=host_budget, hint=advice[key])
