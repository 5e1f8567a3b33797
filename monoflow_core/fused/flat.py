"""The parameters of each run of fused blocks held in a few flat tensors, the layout the fold reads.

The 10 blocks of the paper's 2-D toy model have 90 small parameter tensors (per block four weights, four biases and
the concatenation weights ``K``). The fused path reads them per layer position, batched over the blocks, so each
training step used to stack them into the fold's flat rows (:func:`~monoflow_core.fused.fold_compiled.kernel_fold`),
and autograd then unstacked the gradient and accumulated it tensor by tensor; Adam, the gradient norm and the
overflow check each touched the 90 tensors again. Here every parameter *is* a view of one tensor per kind (a
:class:`FlatBuffer`): row ``j`` of the weight buffer holds block ``j``'s weights side by side, exactly the row the
compiled fold reads, and likewise the biases, the ``K`` and CLipSwish's ``beta``. The modules keep their parameters
under the same names (checkpoints and ``state_dict`` do not change); only their storage moves.

During a trainer's step (:meth:`FlatParameters.active`) the fold takes the buffers themselves as its autograd inputs,
and every parameter's ``.grad`` is a view of its buffer's gradient tensor, which is also the buffer's own ``.grad``:
the fold's backward lands in the buffer, anything else that uses a parameter directly (the generic path, the PyTorch
fold) accumulates into the same memory through the view, so the gradients are the same whichever path ran. Outside
a trainer's step nothing changes: the fold stacks the parameters as before, and ``.grad`` is autograd's own.

What replaces a parameter's storage (``module.to(dtype)``, ``param.data = ...``) leaves the buffer behind: the layout
then reports itself broken (:meth:`FlatParameters.intact`) and the trainer builds a new one from the parameters'
current values. A ``copy.deepcopy`` of a flow copies each parameter on its own and shares nothing with the buffers.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..nn.densenet import DenseNetG
from .plan import fast_eligible, fusable_runs, linears, net_of

__all__ = ["FLAT", "FlatBuffer", "FlatParameters", "FlatRun", "FlatSettings", "active_run"]


@dataclass
class FlatSettings:
    """Whether trainers hold the fused runs' parameters in flat buffers (False: one tensor each, as a plain
    :class:`torch.nn.Module`; the reference the flat layout is tested against)."""

    enabled: bool = True


#: The process's flat-layout setting.
FLAT = FlatSettings()


_GRAD = operator.attrgetter("grad")


@dataclass
class FlatBuffer:
    """Parameters of one kind of every block of a run, as views of one tensor.

    Attributes:
        name: the kind (``"weight"``, ``"bias"``, ``"concat"``, ``"activation"``).
        data: the tensor the parameters are views of, (nb, ...): row ``j`` holds block ``j``'s parameters in order. A
            leaf of autograd; while the buffer is attached its ``.grad`` is :attr:`grad`.
        grad: the gradient tensor, of ``data``'s shape; each attached parameter's ``.grad`` is a view of it.
        params: the parameters, block by block.
        grad_views: each parameter's view of :attr:`grad`.
        pointers: each parameter's data pointer when the buffer was made (:meth:`intact`).
        offsets: per position in a block's row, the offset of its parameter (the same in every row).
        usable: set by :meth:`FlatParameters.attach`: whether the parameters agree on ``requires_grad`` (the fold
            then reads :attr:`data`; otherwise it stacks the parameters).
        attached: whether the parameters' ``.grad`` were set to :attr:`grad_views` by the last attach.
    """

    name: str
    data: Tensor
    grad: Tensor
    params: list[nn.Parameter]
    grad_views: list[Tensor]
    pointers: list[int]
    offsets: list[int]
    usable: bool = False
    attached: bool = False

    @classmethod
    def of(cls, name: str, rows: Sequence[Sequence[nn.Parameter]]) -> FlatBuffer:
        """A buffer holding ``rows[j]`` (block ``j``'s parameters of this kind; the same shapes in every row), with
        every parameter re-pointed at its view (values kept)."""
        first = rows[0]
        if len(first) == 1:  # one tensor per block: the buffer keeps its shape, (nb, *shape)
            row_shape: tuple[int, ...] = tuple(first[0].shape)
        else:
            row_shape = (sum(p.numel() for p in first),)
        ref = first[0]
        data = torch.empty((len(rows), *row_shape), dtype=ref.dtype, device=ref.device)
        grad = torch.zeros_like(data)
        flat_data, flat_grad = data.view(len(rows), -1), grad.view(len(rows), -1)
        params: list[nn.Parameter] = []
        grad_views: list[Tensor] = []
        offsets: list[int] = []
        with torch.no_grad():
            for j, row in enumerate(rows):
                start = 0
                for p in row:
                    size = p.numel()
                    if j == 0:
                        offsets.append(start)
                    view = flat_data[j, start : start + size].view(p.shape)
                    view.copy_(p.detach())
                    p.data = view  # the same Parameter object (optimizers and callers keep it), new storage
                    params.append(p)
                    grad_views.append(flat_grad[j, start : start + size].view(p.shape))
                    start += size
        data.requires_grad_(True)
        data.grad = grad
        return cls(name, data, grad, params, grad_views, [p.data_ptr() for p in params], offsets)

    def intact(self) -> bool:
        """Whether every parameter still lives in :attr:`data` (not replaced by ``.to(dtype)`` or ``.data = ...``)."""
        # (map over C functions: no Python frame per parameter; this runs a few times per step)
        return list(map(Tensor.data_ptr, self.params)) == self.pointers

    def grads_attached(self) -> bool:
        """Whether every parameter's ``.grad`` is still its view of :attr:`grad`."""
        return all(map(operator.is_, map(_GRAD, self.params), self.grad_views))

    def attach(self) -> None:
        """Zero :attr:`grad` and make it the gradient of every parameter (all of which need one) and of :attr:`data`."""
        self.grad.zero_()
        for p, g in zip(self.params, self.grad_views, strict=True):
            p.grad = g
        self.data.grad = self.grad
        self.attached = True

    @torch.no_grad()
    def reconcile(self) -> None:
        """After a backward pass during which some parameters' ``.grad`` were replaced (a ``zero_grad`` between the
        attach and the backward pass): each parameter's gradient is the sum of what reached its view of
        :attr:`grad` (through :attr:`data`) and what autograd gave its own ``.grad``, kept in the view again."""
        for p, g in zip(self.params, self.grad_views, strict=True):
            current = p.grad
            if current is g:
                continue
            if current is not None:
                g.add_(current)
            p.grad = g


@dataclass
class FlatRun:
    """The flat buffers of one run of fused blocks (their nets ``nets``, in the run's order).

    Attributes:
        weight: every linear layer's weight, the layers side by side in each row (the compiled fold's ``wflat``).
        bias: their biases, likewise (the fold's ``bflat``).
        concat: the concatenation weights ``K``, (nb, depth, 2).
        activation: the activations' parameters (CLipSwish's ``beta_raw``, (nb, depth)), or None.
        shapes: each linear layer's weight shape, in order.
    """

    nets: list[DenseNetG]
    weight: FlatBuffer
    bias: FlatBuffer
    concat: FlatBuffer
    activation: FlatBuffer | None
    shapes: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def of(cls, nets: Sequence[DenseNetG]) -> FlatRun | None:
        """The buffers of ``nets`` (None if a net has a parameter the layout does not place or a layer without
        bias)."""
        layers = [linears(g) for g in nets]
        if any(lin.bias is None for row in layers for lin in row):
            return None
        acts = [[p for a in g.activations for p in a.parameters()] for g in nets]
        placed = {id(p) for row in layers for lin in row for p in (lin.weight, lin.bias)}
        placed |= {id(g.concat_k) for g in nets} | {id(p) for row in acts for p in row}
        if any(id(p) not in placed for g in nets for p in g.parameters()):
            return None
        dtypes = {(p.dtype, p.device) for g in nets for p in g.parameters()}
        if len(dtypes) != 1:
            return None
        weight = FlatBuffer.of("weight", [[lin.weight for lin in row] for row in layers])
        bias = FlatBuffer.of("bias", [[lin.bias for lin in row if lin.bias is not None] for row in layers])
        concat = FlatBuffer.of("concat", [[g.concat_k] for g in nets])
        activation = FlatBuffer.of("activation", acts) if acts[0] else None
        shapes = [(int(lin.weight.shape[0]), int(lin.weight.shape[1])) for lin in layers[0]]
        return cls(list(nets), weight, bias, concat, activation, shapes)

    def buffers(self) -> list[FlatBuffer]:
        """The run's buffers."""
        return [self.weight, self.bias, self.concat, *([self.activation] if self.activation is not None else [])]

    @property
    def usable(self) -> bool:
        """Whether the fold may read every buffer of the run (set by :meth:`FlatParameters.attach`)."""
        return all(b.usable for b in self.buffers())

    def layer_weight(self, i: int) -> Tensor:
        """Layer ``i``'s weight of every block, (nb, rows, cols): a view of the weight buffer (autograd reaches it)."""
        rows, cols = self.shapes[i]
        start = self.weight.offsets[i]
        return self.weight.data[:, start : start + rows * cols].view(-1, rows, cols)

    def layer_bias(self, i: int) -> Tensor:
        """Layer ``i``'s bias of every block, (nb, rows): a view of the bias buffer."""
        start = self.bias.offsets[i]
        return self.bias.data[:, start : start + self.shapes[i][0]]


class _Active(threading.local):
    layout: FlatParameters | None = None


_ACTIVE = _Active()


class FlatParameters:
    """The flat layout of a flow's fused runs (:class:`FlatRun`), and the parameters it leaves as they are.

    Args:
        runs: the runs' buffers.
        params: all the flow's parameters, in order (those outside every run are :attr:`others`).
    """

    def __init__(self, runs: Sequence[FlatRun], params: Sequence[nn.Parameter]) -> None:
        self.runs = list(runs)
        self.buffers: list[FlatBuffer] = [b for run in self.runs for b in run.buffers()]
        inside = {id(p) for b in self.buffers for p in b.params}
        #: The flow's parameters that no buffer holds (e.g. ActNorm's), in the flow's order.
        self.others: list[nn.Parameter] = [p for p in params if id(p) not in inside]
        self._by_first = {id(run.nets[0]): run for run in self.runs}

    @classmethod
    def of(cls, flow: nn.Module) -> FlatParameters | None:
        """The layout of ``flow``'s fused runs, its parameters re-pointed at the buffers (values kept); None when the
        flow has no run the layout serves (image flows, comparison families, MLP networks)."""
        layers = getattr(flow, "layers", None)
        dim = getattr(flow, "dim", None)
        if not isinstance(layers, nn.ModuleList) or not isinstance(dim, int):
            return None
        blocks = list(layers)
        runs = []
        for start, stop in fusable_runs(blocks, dim):
            nets = [net_of(blk) for blk in blocks[start:stop] if fast_eligible(blk, dim)]
            run = FlatRun.of(nets)
            if run is not None:
                runs.append(run)
        if not runs:
            return None
        return cls(runs, list(flow.parameters()))

    def intact(self) -> bool:
        """Whether every parameter still lives in its buffer (see :meth:`FlatBuffer.intact`)."""
        return all(b.intact() for b in self.buffers)

    def attach(self) -> None:
        """Prepare a training step: each buffer whose parameters all need gradients gets zeroed gradients, viewed by
        the parameters (:meth:`FlatBuffer.attach`); a buffer whose parameters all need none is read without; one that
        is mixed (some parameters frozen by hand) is not read by the fold this step, its parameters keep autograd's
        own gradients."""
        for b in self.buffers:
            flags = {p.requires_grad for p in b.params}
            b.usable = len(flags) == 1
            b.attached = False
            b.data.requires_grad_(flags == {True})
            if flags == {True}:
                b.attach()

    def param_tensors(self) -> list[Tensor]:
        """Tensors whose entries are exactly the parameters' (the buffers and the other parameters), for reductions
        and elementwise updates over all of them (valid while :meth:`intact`)."""
        return [*(b.data.detach() for b in self.buffers), *(p.detach() for p in self.others)]

    def gather(self) -> None:
        """After the backward pass of a step: every attached buffer's parameters see their whole gradient in their
        views again, whatever replaced their ``.grad`` meanwhile (:meth:`FlatBuffer.reconcile`)."""
        for b in self.buffers:
            if b.attached and not b.grads_attached():
                b.reconcile()

    def grad_tensors(self) -> list[Tensor]:
        """Tensors whose entries are exactly the parameters' gradients after :meth:`gather` (each attached buffer's
        gradient tensor, the other parameters' ``.grad``; parameters without a gradient contribute nothing)."""
        grads: list[Tensor] = []
        for b in self.buffers:
            if b.attached:
                grads.append(b.grad)
            else:
                grads.extend(p.grad for p in b.params if p.grad is not None)
        grads.extend(p.grad for p in self.others if p.grad is not None)
        return grads

    @contextmanager
    def active(self) -> Iterator[None]:
        """Within this context (on this thread) the fold of every run of this layout reads its buffers
        (:func:`active_run`)."""
        outer = _ACTIVE.layout
        _ACTIVE.layout = self
        try:
            yield
        finally:
            _ACTIVE.layout = outer

    def find(self, nets: Sequence[DenseNetG]) -> FlatRun | None:
        """The run whose nets are ``nets`` (the same objects in the same order) if the fold may read it."""
        run = self._by_first.get(id(nets[0]))
        if run is None or len(run.nets) != len(nets) or not run.usable:
            return None
        if not all(a is b for a, b in zip(run.nets, nets, strict=True)):
            return None
        return run


def active_run(nets: Sequence[DenseNetG]) -> FlatRun | None:
    """The flat buffers of ``nets`` inside a trainer's step on this thread (:meth:`FlatParameters.active`), else
    None (the fold then stacks the parameters)."""
    layout = _ACTIVE.layout
    return layout.find(nets) if layout is not None else None
