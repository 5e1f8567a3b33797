"""A training run's resumable state: :class:`TrainerState`, the state half of
:class:`~monoflow_core.training.Trainer`.

:meth:`TrainerState.state_dict` captures everything a bit-for-bit resumption needs (same device, same seed): the
flow, the optimizer, the data streams, the random generators, the EMA copy and the thinned histories;
:meth:`TrainerState.load_state_dict` restores it. Checkpoints (:mod:`monoflow_core.checkpoint`) store this state.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from .data import ToyStream
from .data.images import ImageStream
from .data.points import PointStream
from .flow import Flow
from .metrics import PAPER_PROTOCOL_TESTS, TRAINER_STATE_FORMAT, EvalMetrics, StepMetrics

__all__ = ["CHECKPOINT_HISTORY", "TrainerState", "thin_records"]

# A checkpoint's header keeps at most this many step records and this many test records, thinned evenly over the
# run (the newest always kept, and the last PAPER_PROTOCOL_TESTS tests intact): the header's size and the save's time
# must not grow with the number of steps (the whole history lives in the run's metrics.csv). At about 250 bytes a
# record the thinned histories stay below 200 KB.
CHECKPOINT_HISTORY = 512


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


class TrainerState:
    """The resumable state of a :class:`~monoflow_core.training.Trainer`, one of its base classes.

    It holds no state of its own: the trainer's constructor sets the attributes declared here.
    """

    flow: Flow
    optimizer: torch.optim.Optimizer
    device: torch.device
    history: deque[StepMetrics]
    eval_history: list[EvalMetrics]
    _step: int
    _base_lr: float
    _stream: ToyStream | ImageStream | PointStream
    _eval_stream: ToyStream | None
    _noise_generator: torch.Generator
    _ema_flow: Flow | None
    _ema_updates: int
    _consecutive_rejections: int
    _rejected_total: int
    _concat_state: bool | None
    #: Re-applies the learning-rate and concatenation schedules at a step (the trainer's own method).
    _apply_schedules: Callable[[int], None]

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
