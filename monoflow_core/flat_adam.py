"""Adam that steps each flat parameter buffer as one tensor (:class:`FlatAdam`).

The trainer's flow keeps its fused runs' parameters as views of a few flat buffers
(:mod:`monoflow_core.fused.flat`). Adam's update is elementwise, so stepping a buffer whole is the same arithmetic as
stepping its ~90 parameter tensors one by one, in one call instead of a multi-tensor call whose per-tensor
bookkeeping (grouping, state lookup, step counters) cost more than the update itself here.

The optimizer's state keeps torch's layout exactly: one entry per parameter with ``step``, ``exp_avg`` and
``exp_avg_sq``, keyed by parameter, so ``state_dict`` and ``load_state_dict`` (and checkpoints written before the
flat layout existed) are unchanged. For a buffer's parameters those entries are views of the buffer's moment tensors
and of one step-counter tensor. Whatever replaces them (``load_state_dict``, the trainer's overflow guard restoring a
backup, another optimizer's state) is copied into the buffer's tensors at the next step. A buffer whose parameters do
not all have their gradients in the buffer, whose entries are incomplete or whose step counters differ is stepped
tensor by tensor by torch's own Adam, exactly as before.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam

from .fused.flat import FlatBuffer, FlatParameters

__all__ = ["FlatAdam"]

_MOMENTS = ("exp_avg", "exp_avg_sq")


def _step_dtype(fused: bool) -> torch.dtype:
    # torch.optim.Adam's dtype for its step counters (its _get_scalar_dtype)
    if fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class _Slot:
    """One buffer's Adam state: moment tensors of the buffer's shape and one step counter per parameter, with each
    parameter's state entry made of views of them."""

    def __init__(self, buffer: FlatBuffer, group: dict[str, Any]) -> None:
        self.buffer = buffer
        self.group = group
        data = buffer.data.detach()
        self.exp_avg = torch.zeros_like(data)
        self.exp_avg_sq = torch.zeros_like(data)
        fused = bool(group.get("fused"))
        device = data.device if fused or group.get("capturable") else torch.device("cpu")
        self.steps = torch.zeros(len(buffer.params), dtype=_step_dtype(fused), device=device)
        flat_m = self.exp_avg.view(data.shape[0], -1)
        flat_v = self.exp_avg_sq.view(data.shape[0], -1)
        self.entries: list[dict[str, Tensor]] = []
        count = len(buffer.offsets)
        for i, p in enumerate(buffer.params):
            row, start = divmod(i, count)
            start = buffer.offsets[start]
            size = p.numel()
            self.entries.append(
                {
                    "step": self.steps[i],
                    "exp_avg": flat_m[row, start : start + size].view(p.shape),
                    "exp_avg_sq": flat_v[row, start : start + size].view(p.shape),
                }
            )
        self.ids = {id(p) for p in buffer.params}
        self.equal_steps: bool | None = None  # unknown

    def fast_group(self) -> bool:
        """Whether the group's settings are ones the whole-buffer step reproduces."""
        g = self.group
        return not (
            g.get("amsgrad")
            or g.get("capturable")
            or g.get("differentiable")
            or isinstance(g.get("lr"), Tensor)
            or any(isinstance(b, Tensor) for b in g.get("betas", ()))
        )

    def own_state(self, state: dict[Any, Any]) -> bool:
        """Make the optimizer's entries for the buffer's parameters this slot's views; False if they cannot be."""
        params = self.buffer.params
        entries = list(map(state.get, params))
        if all(map(operator.is_, entries, self.entries)):
            return True
        if all(not e for e in entries):  # no state yet: torch's lazy start, all zeros
            self.exp_avg.zero_()
            self.exp_avg_sq.zero_()
            self.steps.zero_()
        elif all(e is not None and set(e) == {"step", *_MOMENTS} for e in entries):
            # state from elsewhere (a loaded state dict, a restored backup): copied in, then replaced by the views
            loaded = [e for e in entries if e is not None]
            try:
                for key in _MOMENTS:
                    torch._foreach_copy_([m[key] for m in self.entries], [e[key] for e in loaded])
                values = [float(e["step"]) for e in loaded]
                self.steps.copy_(torch.tensor(values, dtype=self.steps.dtype))
            except (RuntimeError, TypeError, ValueError):
                return False
        else:
            return False
        for p, mine in zip(params, self.entries, strict=True):
            state[p] = mine
        self.equal_steps = None
        return True

    def step(self) -> None:
        """One Adam step of the whole buffer (its gradients attached, its state owned, its counters equal)."""
        g = self.group
        data, grad = self.buffer.data.detach(), self.buffer.grad
        beta1, beta2 = g["betas"]
        if g.get("fused"):
            self.steps.add_(1)
            # (torch.optim.Adam's fused step: the counters advanced first, then one kernel over the tensors)
            kernel = torch._fused_adamw_ if g.get("decoupled_weight_decay") else torch._fused_adam_
            kernel(
                [data],
                [grad],
                [self.exp_avg],
                [self.exp_avg_sq],
                [],
                [self.steps[0]],
                lr=g["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=g["weight_decay"],
                eps=g["eps"],
                amsgrad=False,
                maximize=g["maximize"],
                grad_scale=None,
                found_inf=None,
            )
            return
        counter = self.steps[0].clone()
        adam(
            [data],
            [grad],
            [self.exp_avg],
            [self.exp_avg_sq],
            [],
            [counter],
            foreach=g.get("foreach"),
            capturable=False,
            differentiable=False,
            fused=None,
            decoupled_weight_decay=bool(g.get("decoupled_weight_decay", False)),
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=g["lr"],
            weight_decay=g["weight_decay"],
            eps=g["eps"],
            maximize=g["maximize"],
        )
        self.steps.add_(1)


class FlatAdam(torch.optim.Adam):
    """:class:`torch.optim.Adam` that steps each buffer of a :class:`~monoflow_core.fused.flat.FlatParameters`
    layout as one tensor (see the module docstring); every other parameter, and any buffer it cannot step whole, goes
    through torch's own step.

    Args:
        params: the parameters (or parameter groups), as for :class:`torch.optim.Adam`.
        layout: the flat layout of (some of) those parameters, or None (then this is plain Adam).
        **kwargs: Adam's settings.
    """

    def __init__(self, params: Iterable[Any], layout: FlatParameters | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._slots: list[_Slot] = []
        self.bind(layout)

    def bind(self, layout: FlatParameters | None) -> None:
        """Step ``layout``'s buffers whole from now on (None: none). A buffer whose parameters are not all in one of
        this optimizer's groups is left to the per-tensor step. Existing state is taken over at the next step."""
        group_of: dict[int, dict[str, Any]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                group_of[id(p)] = group
        self._slots = []
        for buffer in [] if layout is None else layout.buffers:
            groups = {id(group_of.get(id(p))) for p in buffer.params}
            owner = group_of.get(id(buffer.params[0]))
            if owner is not None and len(groups) == 1:
                self._slots.append(_Slot(buffer, owner))

    def _step_slot(self, slot: _Slot) -> bool:
        """Step one buffer whole if it can be; True if its parameters need nothing more this step."""
        buffer = slot.buffer
        if not buffer.grads_attached():
            # no gradient anywhere (e.g. the frozen concatenation weights): Adam skips such parameters
            return all(p.grad is None for p in buffer.params)
        if not (slot.fast_group() and buffer.intact() and slot.own_state(self.state)):
            return False
        if slot.equal_steps is None:
            slot.equal_steps = bool((slot.steps == slot.steps[0]).all())
        if not slot.equal_steps:
            return False
        slot.step()
        return True

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One Adam step: each buffer whole where it can be, the remaining parameters by torch's Adam."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        done: set[int] = set()
        for slot in self._slots:
            if self._step_slot(slot):
                done |= slot.ids
            else:
                slot.equal_steps = None  # (the per-tensor step may advance some counters only)
        if len(done) == sum(len(group["params"]) for group in self.param_groups):
            return loss
        saved = [group["params"] for group in self.param_groups]
        try:
            for group in self.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in done]
            super().step()
        finally:
            for group, params in zip(self.param_groups, saved, strict=True):
                group["params"] = params
        return loss

    def slots(self) -> Sequence[FlatBuffer]:
        """The buffers stepped whole (when they can be)."""
        return [slot.buffer for slot in self._slots]
