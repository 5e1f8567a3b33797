"""Fused exact path for stacks of small-dimensional blocks built on the project's DenseNet G.

The generic blocks (``monoflow_core.blocks``) work for any G through autograd. For the project's own
:class:`~monoflow_core.nn.densenet.DenseNetG` with a concatenated activation (CPila, CReLU, or CLipSwish, the
i-DenseNet baseline's, whose learnable ``beta`` is folded into the weights) in small dimensions (the paper's 2-D
and 1-D models) this package runs a whole run of consecutive blocks as one ``torch.autograd.Function`` with a
hand-written exact backward (docs/performance.md):

* weights: every block's spectrally normalised weights are computed *batched* over the blocks, and the
  DenseNet's concatenation weights, the activation's shift, ``1/1.06`` scale, Pila's ``k`` (times ``log2 e``,
  for ``exp2``) or CLipSwish's ``beta`` and ``1/(1.1 * 1.004)`` (:func:`~monoflow_core.fused.folded.swish_gains`),
  and the ``[x, -x]`` of the concatenated activation are folded into them; the solver's copy of the last layer also
  carries the identity, so it yields ``w + G(w)`` and ``I + J_G`` directly;
* layout: feature-major, one column per point: the primal points and their ``n`` tangent copies side by side,
  so one evaluation of G with its Jacobian is one ``W @ X`` per layer and a handful of elementwise operations,
  written in place into a per-run workspace (no ``cat``, no ``where``);
* forward: Newton's method with the exact Jacobian (forward-mode tangents), each sample frozen once it meets
  the tolerance, or once it stalls (the generic solvers' stall exit, :class:`~monoflow_core.fused.newton.StallTest`);
  the last evaluation is at the solution and provides ``J_G(w*)`` for the exact log-det and every activation the
  backward pass needs. Without a backward pass, finished samples leave the batch;
* backward: the implicit-function gradient in closed form (docs/algorithm.md §6), batched over the blocks wherever
  the blocks do not depend on each other: one reverse pass through the tangent networks of all blocks carries
  the log-dets' gradient (this is where the activation's second derivative enters); the recursion
  ``a = (g_w + v) (I + J)^{-1}`` (``g_w = sqrt 2 g`` for a monotone block, ``g`` for an inverse residual one) runs
  block by block on (n, B) tensors; one reverse pass through all primal
  networks carries ``-a dG/dtheta``; each weight gradient is one batched product.

The kernels of this path come in two implementations with the same algorithm and results (to rounding):

* compiled (:mod:`monoflow_core.fused.kernels`, Numba; CPU, float32/float64): a run's solves, log-dets and backward,
  and the fold, are one compiled call each, per sample and layer in loops, with BLAS for the layer products.
  PyTorch's per-operator cost (a few microseconds, ~3,400 operators per training step of the paper's model)
  disappears. They compile at first use (about half a minute on a new machine, then loaded from Numba's on-disk
  cache in about a second), and the fused path waits for them (:attr:`FusedSettings.wait`):
  a run that switched from one kernel set to the other at whatever step the compile happened to finish would not be
  reproducible bit for bit. :func:`kernels_ready` without ``wait`` starts the compile in a background thread ahead
  of time (the studio does at start), which is cancelled and joined before the interpreter finalises
  (:meth:`~monoflow_core.fused.compiler.KernelCompiler.stop_background_compiles`);
* PyTorch (:mod:`~monoflow_core.fused.evaluate`, :mod:`~monoflow_core.fused.newton`,
  :mod:`~monoflow_core.fused.backward`): feature-major batched operators as described above; also the CUDA path, and the
  fallback without Numba or with ``MONOFLOW_KERNELS=0`` (:data:`SETTINGS`).

Both paths agree to rounding in float64 (tests/core/test_fast.py runs on both kernel sets,
tests/core/test_kernels.py compares them piece by piece), and the generic path remains the reference.

The package's modules, one job each: :mod:`~monoflow_core.fused.plan` (eligibility, runs of blocks),
:mod:`~monoflow_core.fused.folded`, :mod:`~monoflow_core.fused.fold`, :mod:`~monoflow_core.fused.fold_compiled` and
:mod:`~monoflow_core.fused.fold_cache` (the folded weights), :mod:`~monoflow_core.fused.algebra` (small matrices),
:mod:`~monoflow_core.fused.workspace` (buffers), :mod:`~monoflow_core.fused.evaluate` and
:mod:`~monoflow_core.fused.newton` (G and the solves on the PyTorch kernels), :mod:`~monoflow_core.fused.backward`,
:mod:`~monoflow_core.fused.compiler` and :mod:`~monoflow_core.fused.warm` (compiling the kernels),
:mod:`~monoflow_core.fused.dispatch` (running them), :mod:`~monoflow_core.fused.kernels`,
:mod:`~monoflow_core.fused.kernels_fold` and :mod:`~monoflow_core.fused.blas` (the compiled code), and
:mod:`~monoflow_core.fused.run` (the entry points); :mod:`~monoflow_core.fused.settings` holds the settings they
read.
"""

from __future__ import annotations

from . import warm
from .compiler import COMPILER, KERNEL_SETS, kernels_ready
from .dispatch import kernel_parts
from .fold import fold_nets
from .fold_cache import cached_fold, fold_scope, folded_runs
from .folded import FoldedNet
from .plan import FAST_MAX_DIM, FusedBlock, fast_eligible, fusable_runs
from .run import fused_inverse, fused_inverse_run, run_fused
from .settings import SETTINGS, FusedSettings

__all__ = [
    "COMPILER",
    "FAST_MAX_DIM",
    "KERNEL_SETS",
    "SETTINGS",
    "FoldedNet",
    "FusedBlock",
    "FusedSettings",
    "cached_fold",
    "fast_eligible",
    "fold_nets",
    "fold_scope",
    "folded_runs",
    "fusable_runs",
    "fused_inverse",
    "fused_inverse_run",
    "kernel_parts",
    "kernels_ready",
    "run_fused",
]

# The warm-up that compiles a kernel set runs the whole fused path, which needs the compiler: wired in here.
COMPILER.warm_up = warm.run_kernels_once
