"""The mechanics of one training step, apart from the trainer's bookkeeping.

:class:`~monoflow_core.training.Trainer` runs a step as: fresh batch, forward and backward
(:func:`accumulate_gradients`), gradient norm and clipping (:func:`grad_norm`, :func:`clip_gradients`), the
optimizer step undone if it overflows a parameter (:class:`OptimizerGuard`), then power iterations and EMA. The
pieces here hold no state of the run except the guard's last measured parameter peak.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from .distributed import DistributedContext
from .flat_adam import FlatAdam
from .flow import Flow
from .fused.flat import FlatParameters

__all__ = [
    "OptimizerGuard",
    "TrainingError",
    "accumulate_gradients",
    "clip_gradients",
    "grad_norm",
    "gradients",
    "make_adam",
    "solver_summary",
]


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. too many consecutive steps with a non-finite loss or gradient)."""


def make_adam(params: Iterable[Tensor], layout: FlatParameters | None = None, **kwargs: Any) -> torch.optim.Adam:
    """Adam with the fused kernel where this torch build has it (same algorithm; about 7x faster here for the
    hundred small tensors of a toy flow: 1.2 ms instead of 7.8 ms per step), else the ``foreach`` one.

    It is a :class:`~monoflow_core.flat_adam.FlatAdam`: with a flat ``layout`` of (some of) the parameters, each
    of its buffers is stepped as one tensor; without, it is torch's Adam.
    """
    params = list(params)
    try:
        return FlatAdam(params, layout, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return FlatAdam(params, layout, foreach=True, **kwargs)


Backup = tuple[list[Tensor], dict[Any, dict[str, Any]]]

_VERSION = operator.attrgetter("_version")


class OptimizerGuard:
    """The optimizer step, undone when it leaves a non-finite parameter.

    A huge learning rate overflows parameters to inf, and the next pass's spectral norms would fail on them. The
    guard keeps the largest |parameter| after the last optimizer step and the parameters' version sum then: while
    neither the parameters changed since nor the next step can reach float overflow (:meth:`step_bound`), that step
    needs no backup, so ordinary steps copy nothing.

    Args:
        optimizer: the run's optimizer.
        params: the flow's parameters (the list the trainer keeps; its structure stays fixed).
        dtype: the parameters' dtype (its largest finite value sets the overflow limit).
        covering: returns tensors whose entries are exactly the parameters' (the trainer's flat buffers and the other
            parameters, a handful of tensors instead of ~90), for the peak; default ``params``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: Sequence[Tensor],
        dtype: torch.dtype,
        covering: Callable[[], Sequence[Tensor]] | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.params = params
        self.dtype = dtype
        self.covering = covering
        self._peak: float | None = None
        self._versions = -1

    def step_bound(self) -> float:
        """An upper bound on how far the next optimizer step moves any parameter entry (``inf``: none known).

        Adam moves an entry by ``lr |m_hat| / (sqrt(v_hat) + eps)`` whatever the gradients: with
        ``r = beta1^2 / beta2 < 1``, Cauchy-Schwarz over the two moving averages bounds ``|m_hat| / sqrt(v_hat)`` by
        ``1 / sqrt((1 - beta2) (1 - r))`` (about 73 for the default betas). A factor 4 covers rounding.
        """
        if type(self.optimizer) not in (torch.optim.Adam, FlatAdam):  # another rule (or AdamW): no bound known
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
        return sum(map(_VERSION, self.params))

    def backup(self) -> Backup:
        """Copies of the parameters and of the optimizer's state, to undo a step (:meth:`restore`)."""
        params = [p.detach().clone() for p in self.params]
        state = {
            p: {k: v.clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in s.items()}
            for p, s in self.optimizer.state.items()
        }
        return params, state

    @torch.no_grad()
    def restore(self, backup: Backup) -> None:
        params, state = backup
        torch._foreach_copy_([p.detach() for p in self.params], params)
        # The saved copies become the state: bit-identical values, and the entries the step created vanish.
        self.optimizer.state.clear()
        self.optimizer.state.update(state)

    def step(self, index: int, params_changed: bool) -> str:
        """The optimizer step, undone if it left a non-finite parameter; returns the rejection message or "".

        The check is one reduction over all parameters and the step's only host sync after the update. A backup to
        undo the step is taken only when the step could overflow (:meth:`step_bound` from the last measured peak)
        or that peak is stale.

        Args:
            index: the step's (0-based) iteration, for the messages.
            params_changed: the forward pass changed the parameters (ActNorm's data init).

        Raises:
            TrainingError: the step overflowed and no backup was taken (the parameters were replaced outside the
                trainer without an in-place change).
        """
        peak = self._peak
        limit = 0.5 * torch.finfo(self.dtype).max
        risky = (
            peak is None
            or params_changed
            or self._versions != self._parameter_versions()
            or not peak + self.step_bound() < limit
        )
        backup = self.backup() if risky else None
        self.optimizer.step()
        with torch.no_grad():
            # One reduction per tensor (a few flat buffers on the trainer's flow), then their maximum: the max-norm
            # propagates NaN and turns -inf into inf, so the peak is finite iff every entry is.
            tensors = [t for t in (self.covering() if self.covering is not None else self.params) if t.numel()]
            peaks = torch._foreach_norm([t.detach() for t in tensors], math.inf) if tensors else []
            peak = float(torch.stack(list(peaks)).max()) if peaks else 0.0
        self._versions = self._parameter_versions()
        if math.isfinite(peak):
            self._peak = peak
            return ""
        self._peak = None
        if backup is None:  # only if the parameters were replaced without an in-place change (``p.data = ...``)
            raise TrainingError(
                f"step {index}: the optimizer step left non-finite parameters ({peak}) and no backup was taken to "
                "undo it (the parameters were changed outside the trainer); resume from a checkpoint"
            )
        self.restore(backup)
        self._versions = self._parameter_versions()
        return f"step {index}: the optimizer step made parameters non-finite ({peak}); step undone"


def accumulate_gradients(
    loss_sum: Callable[[tuple[Tensor, ...]], Tensor],
    batch: tuple[Tensor, ...],
    *,
    dist: DistributedContext,
    chunks: int,
    params: Sequence[Tensor],
    dtype: torch.dtype,
    device: torch.device,
    loss_transform: Callable[[Tensor], Tensor] | None = None,
    after_backward: Callable[[], None] | None = None,
) -> tuple[float, str]:
    """Forward and backward over this process's micro-batches; sum gradients and loss over processes.

    Args:
        loss_sum: the sum over a batch's samples of each sample's share of the loss.
        batch: the global batch (every process holds all of it).
        dist: this process's place in a data-parallel run.
        chunks: micro-batches per process (``TrainConfig.grad_accumulation``).
        params: the flow's parameters.
        dtype: the training dtype (of the summed loss in a data-parallel run).
        device: the training device.
        loss_transform: optional ``loss -> loss`` hook applied before the finiteness check.
        after_backward: called once this process's backward passes are done, before the gradients are summed over
            processes (the trainer's flat layout gathers its gradients there).

    Returns:
        ``(mean loss of the global batch, rejection message or "")``.
    """
    global_size = batch[0].shape[0]
    local = tuple(dist.shard(t) for t in batch)
    local_loss = 0.0
    # (no split when there is nothing to split: the common case pays no extra operators)
    pieces = (local,) if chunks == 1 else zip(*(torch.tensor_split(t, chunks) for t in local), strict=True)
    for piece in pieces:
        if piece[0].shape[0] == 0:
            continue
        loss = loss_sum(piece) / global_size
        if loss_transform is not None:
            loss = loss_transform(loss)
        value = float(loss.detach())
        local_loss += value
        if not math.isfinite(value):  # local_loss is then non-finite too
            break
        loss.backward()
        del loss
    if after_backward is not None:
        after_backward()
    if dist.active:
        # One collective for the loss and every gradient: ranks stay in lockstep even when one is non-finite.
        trained = [p for p in params if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trained]
        flat = torch.cat([torch.tensor([local_loss], dtype=dtype, device=device)] + [g.reshape(-1) for g in grads])
        dist.all_reduce_sum(flat)
        local_loss = float(flat[0])
        offset = 1
        for p in trained:
            n = p.numel()
            summed = flat[offset : offset + n].view_as(p)
            if p.grad is None:
                p.grad = summed  # flat is this step's own buffer
            else:  # written into the gradient in place: it may be a view of the trainer's flat gradient buffer
                p.grad.copy_(summed)
            offset += n
    if not math.isfinite(local_loss):
        return local_loss, f"non-finite loss ({local_loss})"
    return local_loss, ""


def gradients(params: Sequence[Tensor]) -> list[Tensor]:
    """The parameters' gradients (those that have one)."""
    return [p.grad for p in params if p.grad is not None]


def grad_norm(grads: Sequence[Tensor]) -> float:
    """The global 2-norm of gradient tensors ``grads`` (0 when there are none): the parameters' gradients
    (:func:`gradients`) or tensors that hold exactly their entries (the trainer's flat gradient buffers)."""
    if not grads:
        return 0.0
    # One fused kernel for all per-tensor norms (a per-tensor loop costs ~200 operators per step here).
    norms = torch.stack(torch._foreach_norm([g.detach() for g in grads])).to(torch.float64)
    return float(torch.linalg.vector_norm(norms))


def clip_gradients(grads: Sequence[Tensor], norm: float, clip: float | None) -> None:
    """Scale gradient tensors ``grads`` (as for :func:`grad_norm`) down to global norm ``clip`` (``None``: no
    clipping), given their measured ``norm``."""
    if clip is None:
        return
    # Same rule as torch.nn.utils.clip_grad_norm_, applied to the norm already measured.
    coef = clip / (norm + 1e-6)
    if coef < 1.0 and grads:
        torch._foreach_mul_([g.detach() for g in grads], coef)


def solver_summary(flow: Flow) -> tuple[float, int, int]:
    """Summed mean, largest and failed counts of the forward solves' iterations over the blocks."""
    recorded = [stats.get("forward") for stats in flow.solver_stats()]
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
