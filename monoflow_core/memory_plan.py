"""How much device memory one training image takes, and how many micro-batches a batch must be split into.

An image flow's training step keeps, per image and per implicit block, one graph of G at the block's fixed point
(Ahn et al. 2022, docs/algorithm.md section 6: the implicit gradient and the memory-efficient log-det estimator
share it; the activations save only their inputs), plus a few copies of the block's input (the point, G's value,
the Neumann vectors). On top of that, one block at a time builds a transient graph: the double backward of the
Neumann log-det gradient (Chen et al. 2019, section 3.2) and, in the solves, G's features without a graph.

:func:`training_bytes_per_image` counts these from the configuration alone (no model is built), and
:func:`plan_grad_accumulation` picks the fewest micro-batches (``--grad-accumulation``) whose step fits a memory
budget, or explains in one message why none does. The count follows the code's real saved tensors: for
``paper-cifar10`` with one block per scale it agrees with ``benchmarks/saved_tensors.py`` (see
``benchmarks/results/saved_tensors.md``), and a test compares it with a measured small model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .resources import ResourceError, _dense_widths, _scales, format_bytes, model_state_bytes

if TYPE_CHECKING:
    from .config import FlowConfig
    from .training import TrainConfig

__all__ = [
    "HEADROOM",
    "TRANSIENT_FACTOR",
    "AccumulationPlan",
    "SavedTensorMeter",
    "plan_grad_accumulation",
    "training_bytes_per_image",
]

#: Copies of a block's input that a block keeps per image besides G's graph: its input, the fixed point and its
#: leaf alias, G's value there, the output, the Neumann vectors q and v (one probe), ActNorm's saved input.
BLOCK_COPIES = 8

#: The transient graph of one block (the Neumann surrogate's double backward: G's features again, their gradients
#: and the activations' recomputed derivatives) in multiples of that block's kept graph.
TRANSIENT_FACTOR = 4

#: Share of the budget a plan may fill: the allocator's fragmentation, cuDNN workspaces and the CUDA context.
HEADROOM = 0.8


def _g_graph_elements(c: int, h: int, w: int, depth: int, growth: int, activation: str) -> int:
    """Elements per image that one graph of a (conv or dense) DenseNet G keeps: every layer's input (the growing
    concatenation), the final layer's input, and each activation's input (all it saves)."""
    layers, final_in = _dense_widths(c, depth, growth, activation)
    per_pixel = sum(width for width, _ in layers) + final_in + sum(hidden for _, hidden in layers)
    return per_pixel * h * w


@dataclass(frozen=True)
class ImageMemory:
    """Bytes of one training image: ``kept`` for the backward pass, ``transient`` for the largest block's peak."""

    kept: int
    transient: int

    @property
    def total(self) -> int:
        return self.kept + self.transient


def training_bytes_per_image(config: FlowConfig, itemsize: int) -> ImageMemory:
    """Device bytes one image of a training step needs, for an image flow (``config.image_shape`` set).

    Args:
        config: the image model's configuration.
        itemsize: bytes per element of the training dtype (4 for float32).
    """
    if not config.is_image:
        raise ValueError("training_bytes_per_image: an image model is needed (image_shape unset)")
    kept = 0
    largest = 0
    *conv_scales, (fc_blocks, c, h, w) = _scales(config)
    for n_blocks, cs, hs, ws in conv_scales:
        graph = _g_graph_elements(cs, hs, ws, config.depth, config.growth, config.activation)
        kept += n_blocks * (graph + BLOCK_COPIES * cs * hs * ws)
        largest = max(largest, graph if n_blocks else 0)
    fc_dim = c * h * w
    graph = _g_graph_elements(fc_dim, 1, 1, config.depth, config.fc_growth, config.activation)
    kept += fc_blocks * (graph + BLOCK_COPIES * fc_dim)
    largest = max(largest, graph if fc_blocks else 0)
    kept += 4 * config.dim  # pixels, dequantized and logit images, the latent
    return ImageMemory(kept=kept * itemsize, transient=TRANSIENT_FACTOR * largest * itemsize)


@dataclass(frozen=True)
class AccumulationPlan:
    """The chosen split of a batch and the figures behind it (for the log)."""

    grad_accumulation: int
    micro_batch: int
    per_image: int
    resident: int
    need: int
    budget: int

    def describe(self) -> str:
        return (
            f"--grad-accumulation {self.grad_accumulation} (micro-batches of {self.micro_batch}): about "
            f"{format_bytes(self.per_image)} per image and {format_bytes(self.resident)} for the model, "
            f"{format_bytes(self.need)} of {format_bytes(self.budget)}"
        )


def plan_grad_accumulation(model: FlowConfig, train: TrainConfig, budget: int) -> AccumulationPlan:
    """The fewest micro-batches (at least ``train.grad_accumulation``) whose training step fits ``budget`` bytes.

    Only :data:`HEADROOM` of the budget is planned for. The need of a micro-batch of ``m`` images is the model's
    resident state (weights, gradients, Adam's moments, an EMA copy) plus ``m`` times
    :func:`training_bytes_per_image`.

    Raises:
        ResourceError: not even one image per micro-batch fits; the message gives the figures and what to change.
    """
    itemsize = 8 if train.dtype == "float64" else 4
    per_image = training_bytes_per_image(model, itemsize).total
    resident = model_state_bytes(model, itemsize, ema=train.ema is not None)
    room = int(budget * HEADROOM) - resident
    batch = train.batch_size
    fits = room // per_image if room > 0 else 0
    if fits < 1:
        raise ResourceError(
            f"--batch-size {batch}: a training step of this model needs about {format_bytes(per_image)} per image "
            f"plus {format_bytes(resident)} for the model's weights, gradients and optimizer state, but only "
            f"{format_bytes(budget)} is available on {train.device} (planning for {HEADROOM:.0%} of it); not even "
            "one image per micro-batch fits: use fewer blocks per scale or a smaller G (the preset's growth), or a "
            "device with more memory"
        )
    k = max(train.grad_accumulation, -(-batch // fits))
    micro = -(-batch // k)
    return AccumulationPlan(
        grad_accumulation=k,
        micro_batch=micro,
        per_image=per_image,
        resident=resident,
        need=resident + micro * per_image,
        budget=budget,
    )


class SavedTensorMeter:
    """Counts the storages autograd saves for backward while they are alive (a ``saved_tensors_hooks`` pair).

    Each saved tensor is wrapped in a holder whose destructor runs when autograd frees the graph that held it, so
    :attr:`live` is the bytes of distinct storages saved for backward at any moment, :attr:`peak` their maximum.
    Storages listed in ``model_state`` (parameters and buffers, which exist anyway) are counted apart in
    :attr:`live_state`. Use as ``with meter.hooks(): ...``.
    """

    def __init__(self, model_state: set[int] | None = None) -> None:
        self.model_state = model_state or set()  # storage pointers of parameters and buffers
        self.refs: dict[int, int] = {}  # storage pointer -> number of live holders
        self.sizes: dict[int, int] = {}  # storage pointer -> its bytes
        self.live = 0  # bytes of live storages that are not model state
        self.live_state = 0  # bytes of live storages that are parameters or buffers
        self.peak = 0
        self.packed_total = 0  # every pack, duplicates included

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            if key in self.model_state:
                self.live_state -= self.sizes.pop(key)
            else:
                self.live -= self.sizes.pop(key)

    def pack(self, t: Tensor) -> Any:
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        self.packed_total += nbytes
        if key not in self.refs:
            self.refs[key] = 0
            self.sizes[key] = nbytes
            if key in self.model_state:
                self.live_state += nbytes
            else:
                self.live += nbytes
                self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        return _Holder(t, key, self)

    @staticmethod
    def unpack(holder: Any) -> Tensor:
        return holder.tensor

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Holder:
    __slots__ = ("key", "meter", "tensor")

    def __init__(self, tensor: Tensor, key: int, meter: SavedTensorMeter) -> None:
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self) -> None:
        self.meter._release(self.key)
