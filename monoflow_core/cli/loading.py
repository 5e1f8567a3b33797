"""A checkpoint loaded for ``eval``, ``sample`` and ``density``, with the weights every test uses."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import Checkpoint, load_checkpoint
from ..evaluation_policy import prepare_for_test
from ..flow import Flow
from .errors import CLIError, _one_line
from .paths import _require_regular_file


def _load(path: str, device: str, flag: str = "checkpoint") -> Checkpoint:
    _require_regular_file(flag, path, "a .safetensors checkpoint file")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise CLIError(f"--device: invalid device {device!r} ({_one_line(str(err))}); e.g. 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device: {device!r} requested but CUDA is not available on this machine")
    return load_checkpoint(path, map_location=dev)


def _require_finite_weights(flow: Flow, path: Path) -> None:
    """Refuse a flow whose weights hold NaN or infinities (before a solver or a norm computation trips on them).

    Training never saves such weights (it rejects non-finite steps): a file holding them is damaged, and every
    sample, density or training step from it would be NaN.
    """
    for name, tensor in (*flow.named_parameters(), *flow.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CLIError(f"{path}: the weights hold NaN or infinite values ({name}); the checkpoint is damaged")


def _evaluation_flow(ckpt: Checkpoint) -> Flow:
    """The weights to evaluate: the EMA weights if the run kept them, with tightened power-iteration norms.

    The same preparation as every test (:func:`~monoflow_core.evaluation_policy.prepare_for_test`: eval mode,
    power-iterated spectral norms tightened). The checkpoint's flow is modified in place.
    """
    flow = ckpt.flow
    ema = ckpt.trainer_state.get("ema") if ckpt.trainer_state is not None else None
    if ema is not None:
        flow.load_state_dict(ema)
    _require_finite_weights(flow, ckpt.path)
    return prepare_for_test(flow)
