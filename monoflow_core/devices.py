"""The ``auto`` device: the faster device for a task on this machine, and why.

* Image flows (multiscale, convolutional G): CUDA when this torch build sees a GPU. Their steps are dominated by
  large convolutions on batches of images, which a GPU runs one to two orders of magnitude faster than this
  project's CPUs.
* Vector flows (the 2-D toys, the 1-D staircase): the CPU. Their G are tiny (a few thousand weights), so a step is
  a long chain of small operators whose cost on a GPU is kernel launches and host synchronisations, and the fused
  CPU kernels (:mod:`monoflow_core.fused`, CPU only) run the paper's 2-D models' solves in one call. Measure the
  toy step on CUDA against the fused CPU path with ``benchmarks/gpu_step.py`` (part E) before changing this rule.

The user's explicit ``--device`` (or the studio's device menu) always wins; ``auto`` is the default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .config import FlowConfig

__all__ = ["AUTO", "resolve_device"]

AUTO = "auto"


def resolve_device(requested: str | None, model: FlowConfig, *, cuda_available: bool | None = None) -> tuple[str, str]:
    """The device to train ``model`` on, and a short reason for the log.

    Args:
        requested: a device string, or ``None`` / ``"auto"`` for the automatic choice.
        model: the model configuration (its task decides).
        cuda_available: whether CUDA may be used (default: ``torch.cuda.is_available()``).

    Returns:
        ``(device, reason)``, e.g. ``("cpu", "auto: a vector model, the CPU's fused kernels")``; an explicit request
        comes back unchanged with the reason ``"requested"``.
    """
    if requested is not None and requested.strip().lower() != AUTO:
        return requested, "requested"
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if model.is_image:
        if cuda:
            return "cuda", "auto: an image model, on the GPU"
        return "cpu", "auto: an image model, but no CUDA device here"
    return "cpu", f"auto: a {model.dim}-D vector model, faster on the CPU (fused kernels, no launch latency)"
