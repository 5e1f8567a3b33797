"""The fused path's settings, in one object: whether the compiled kernels serve, how they split a batch, compaction."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

__all__ = ["SETTINGS", "FusedSettings"]


def _kernels_from_environment() -> bool:
    """``MONOFLOW_KERNELS=0`` turns the compiled kernels off for the process."""
    return os.environ.get("MONOFLOW_KERNELS", "1") != "0"


@dataclass
class FusedSettings:
    """Settings the fused path's modules read at each call (so a change takes effect at the next call).

    Attributes:
        use_kernels: whether the compiled per-sample kernels (:mod:`monoflow_core.fused.kernels`, Numba) run the
            solves on CPU when available; False (or the environment variable ``MONOFLOW_KERNELS=0``) uses the
            PyTorch kernels throughout.
        wait: whether the fused path waits for the compiled kernels at its first use for a dtype (compiling or
            loading them in the calling thread, or waiting for a background compile already under way) rather than
            serving with the PyTorch kernels until they are ready. Waiting makes the kernel set of every step a fixed
            function of the settings, so two identical runs, and a resumed run and a straight one, agree bit for
            bit; serving meanwhile switches kernel sets (which agree only to rounding) at whatever step the compile
            finishes. The cost is the wait itself, once per dtype and process: about a second from Numba's on-disk
            cache, half a minute or more the first time on a machine.
        compact_fraction: solves without a backward pass remove finished samples from the batch once
            ``1/compact_fraction`` of it has finished.
        part_min: fewest points per part when the compiled kernels split a batch over threads
            (:func:`monoflow_core.fused.dispatch.kernel_parts`).
        threads: threads the compiled kernels split a batch over; None follows ``torch.get_num_threads()``.
        no_grad_points: points per compiled call in a no-gradient evaluation: a part of a batch (a chunk of a density
            grid or of samples, typically 5,000 points) is solved in slices of this many, whose buffers stay in the
            CPU's caches. On the development VM a 400 x 400 grid and 160,000 samples took about 17% less time in
            slices of 750 to 2,500 points than in one slice of 5,000 (``engine_speed.md``).
    """

    use_kernels: bool = field(default_factory=_kernels_from_environment)
    wait: bool = True
    compact_fraction: int = 4
    part_min: int = 128
    threads: int | None = None
    no_grad_points: int = 1024


#: The process's settings of the fused path.
SETTINGS = FusedSettings()
