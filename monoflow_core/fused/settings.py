"""Settings of the fused path that its modules share (the compiled kernels' use and threads, compaction)."""

from __future__ import annotations

import os

#: Solves without a backward pass remove converged samples from the batch once 1/COMPACT_FRACTION of it converged.
COMPACT_FRACTION = 4
#: Whether the compiled per-sample kernels (:mod:`monoflow_core.fused.kernels`, Numba) run the solves on CPU when
#: available; set False (or the environment variable ``MONOFLOW_KERNELS=0``) to use the PyTorch kernels throughout.
USE_KERNELS = os.environ.get("MONOFLOW_KERNELS", "1") != "0"
#: Fewest points per part when the compiled kernels split a batch over threads (:func:`kernel_parts`).
KERNEL_PART_MIN = 128
#: Threads the compiled kernels split a batch over; None follows ``torch.get_num_threads()`` (:func:`kernel_parts`).
KERNEL_THREADS: int | None = None
#: Whether the fused path waits for the compiled kernels at its first use for a dtype (compiling or loading them in
#: the calling thread, or waiting for a background compile already under way) rather than serving with the PyTorch
#: kernels until they are ready. Waiting makes the kernel set of every step a fixed function of the settings, so two
#: identical runs, and a resumed run and a straight one, agree bit for bit; serving meanwhile switches kernel sets
#: (which agree only to rounding) at whatever step the compile finishes. The cost is the wait itself, once per dtype
#: and process: about a second from Numba's on-disk cache, half a minute or more the first time on a machine.
KERNELS_WAIT = True
#: Points per compiled call in a no-gradient evaluation: a part of a batch (a chunk of a density grid or of samples,
#: typically 5,000 points) is solved in slices of this many, whose buffers stay in the CPU's caches. On the
#: development VM a 400 x 400 grid and 160,000 samples took about 17% less time in slices of 750 to 2,500 points
#: than in one slice of 5,000 (``engine_speed.md``).
KERNEL_NO_GRAD_POINTS = 1024
