"""The flow container: a stack of invertible layers over a standard normal base density."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import Tensor, nn

from .blocks import _ImplicitBlock, block_solver_stats
from .bounds import INTERVALS, MINIMUM, check_in
from .fused import folded_runs, fusable_runs, fused_inverse_run, run_fused
from .solvers import SolverStats

if TYPE_CHECKING:
    from .config import FlowConfig

__all__ = ["SUPPORTED_DTYPES", "Flow", "standard_normal_log_prob"]

#: The floating-point dtypes a flow computes in: the solvers' tolerances, the compiled kernels and the fused path
#: are written for these two (half precision cannot reach the solvers' default tolerances).
SUPPORTED_DTYPES = (torch.float32, torch.float64)


class _Invertible(Protocol):
    """What a flow needs of a layer besides ``forward``: ``inverse(y) -> x`` (every layer of a flow has one)."""

    def inverse(self, y: Tensor) -> Tensor: ...


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shape_text(shape: tuple[int, ...]) -> str:
    return f"(N, {', '.join(map(str, shape))})"


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """Log-density of N(0, I) per sample, in nats: ``-|z|^2 / 2 - n/2 log(2 pi)``."""
    flat = z.reshape(z.shape[0], math.prod(z.shape[1:]))  # (not -1: ambiguous for an empty batch)
    return -0.5 * (flat * flat).sum(dim=1) - 0.5 * flat.shape[1] * math.log(2.0 * math.pi)


class Flow(nn.Module):
    """A normalizing flow ``F = f_K o ... o f_1`` with ``log p(x) = log N(F(x); 0, I) + log|det J_F(x)|``.

    Args:
        layers: invertible layers, each with ``forward(x) -> (y, logdet)`` and ``inverse(y) -> x``.
        event_shape: shape of one sample, e.g. ``(2,)``.
        config: the configuration the flow was built from (kept for checkpoints), if any.
    """

    _anchor: Tensor  # a buffer, registered in __init__

    def __init__(
        self, layers: Sequence[nn.Module], event_shape: Sequence[int], config: FlowConfig | None = None
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.event_shape = tuple(int(s) for s in event_shape)
        self.config = config
        #: Run eligible blocks (the project's DenseNet G, small dimension, exact log-det, Newton) on the fused
        #: path of ``monoflow_core.fused``; False forces the generic autograd path (the reference).
        self.fast_path = True
        # Carries the flow's dtype and device for sampling, even when no layer has parameters.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """The flow's floating-point dtype."""
        return self._anchor.dtype

    @property
    def device(self) -> torch.device:
        """The device the flow lives on."""
        return self._anchor.device

    @property
    def dim(self) -> int:
        """Number of dimensions of one sample."""
        return math.prod(self.event_shape)

    def _check(self, x: Any, where: str = "forward", shapes: tuple[tuple[int, ...], ...] | None = None) -> None:
        """Reject an input that the entry point ``where`` cannot take, before any kernel runs.

        The input must be a tensor of the flow's dtype (float32 or float64) on the flow's device, of shape
        ``(N, *shape)`` for one of ``shapes`` (default: the event shape). Only attribute reads, no tensor
        operation or host sync: it runs on every training step.

        Raises:
            TypeError: not a tensor, or a tensor of another dtype (or an unsupported one: half, bfloat16, ...).
            ValueError: a tensor on another device or of another shape.
        """
        anchor = self._anchor
        if (
            isinstance(x, Tensor)
            and x.dtype == anchor.dtype
            and x.dtype in SUPPORTED_DTYPES
            and x.device == anchor.device
            and x.shape[1:] in (shapes or (self.event_shape,))
        ):
            return
        raise self._input_error(x, where, shapes or (self.event_shape,))

    def _input_error(self, x: Any, where: str, shapes: tuple[tuple[int, ...], ...]) -> TypeError | ValueError:
        """The error :meth:`_check` raises, naming what ``where`` expected and what it got."""
        dtype, device = self._anchor.dtype, self._anchor.device
        head = f"{type(self).__name__}.{where}"
        expected = (
            f"{head}: expected a torch.Tensor of dtype {_dtype_name(dtype)} on {device} with shape "
            f"{' or '.join(_shape_text(s) for s in shapes)}"
        )
        if len(shapes) > 1:  # several layouts of the same samples
            expected += f" ({self.dim} dimensions per sample)"
        if dtype not in SUPPORTED_DTYPES:  # the flow itself was cast, e.g. by flow.half()
            return TypeError(
                f"{head}: the flow's dtype {_dtype_name(dtype)} is not supported (only float32 and "
                "float64); convert the flow with flow.to(torch.float32)"
            )
        if not isinstance(x, Tensor):
            return TypeError(
                f"{expected}, got {type(x).__name__} (convert it with torch.as_tensor(x, "
                f"dtype=torch.{_dtype_name(dtype)}, device={str(device)!r}))"
            )
        if x.dtype not in SUPPORTED_DTYPES:
            return TypeError(
                f"{expected}, got {_dtype_name(x.dtype)} ({_dtype_name(x.dtype)} inputs are not "
                f"supported: convert them with x.to(torch.{_dtype_name(dtype)}))"
            )
        if x.dtype != dtype:
            got = _dtype_name(x.dtype)
            return TypeError(
                f"{expected}, got {got} (convert the input with x.to(torch.{_dtype_name(dtype)}) or "
                f"the flow with flow.to(torch.{got}))"
            )
        if x.device != device:
            return ValueError(f"{expected}, got a tensor on {x.device} (move it with x.to({str(device)!r}))")
        return ValueError(f"{expected}, got shape {tuple(x.shape)}")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map data to the base space: ``(z, log|det dz/dx|)`` with logdet of shape (B,).

        Raises:
            TypeError, ValueError: ``x`` is not a tensor of the flow's dtype and device of shape (B, *event_shape).
        """
        self._check(x, "forward")
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        if x.shape[0] == 0:  # an empty batch maps to an empty batch (the blocks' solvers need points)
            return x.clone(), total
        layers = list(self.layers)
        runs = dict(fusable_runs(layers, self.dim)) if self.fast_path and x.dim() == 2 else {}
        i = 0
        while i < len(layers):
            if i in runs:
                x, logdet = run_fused(layers[i : runs[i]], x)
                i = runs[i]
            else:
                x, logdet = layers[i](x)
                i += 1
            total = total + logdet
        return x, total

    def inverse(self, z: Tensor) -> Tensor:
        """Map base samples back to data space.

        Raises:
            TypeError, ValueError: ``z`` is not a tensor of the flow's dtype and device of shape (B, *event_shape).
        """
        self._check(z, "inverse")
        if z.shape[0] == 0:
            return z.clone()
        fast = self.fast_path and z.dim() == 2 and not torch.is_grad_enabled()
        layers = list(self.layers)
        if not fast:
            for layer in reversed(layers):
                z = cast(_Invertible, layer).inverse(z)
            return z
        starts = {stop: start for start, stop in fusable_runs(layers, self.dim)}
        with folded_runs(layers, self.dim):  # one fold per run of blocks
            stop = len(layers)
            while stop > 0:
                if stop in starts:  # a run of fused blocks, inverted in one pass
                    z = fused_inverse_run(layers[starts[stop] : stop], z)
                    stop = starts[stop]
                else:
                    stop -= 1
                    z = cast(_Invertible, layers[stop]).inverse(z)
        return z

    def log_prob(self, x: Tensor) -> Tensor:
        """Log-density of each sample in nats, shape (B,). Exact iff :attr:`logdet_is_exact`.

        Raises:
            TypeError, ValueError: ``x`` is not a tensor of the flow's dtype and device of shape (B, *event_shape).
        """
        self._check(x, "log_prob")  # (named here: the forward pass would report itself as the culprit)
        z, logdet = self(x)
        return standard_normal_log_prob(z) + logdet

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` samples ``F^{-1}(temperature * eps)``, ``eps ~ N(0, I)`` (no gradient is recorded).

        Raises:
            TypeError: ``n`` is not an integer (bools and floats included) or ``temperature`` not a real number.
            ValueError: ``n`` negative or too large for one tensor, ``temperature`` not positive and finite.
        """
        where = f"{type(self).__name__}.sample"
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"{where}: n must be an integer, got {type(n).__name__} {n!r}")
        n = int(n)
        if n < 0:
            raise ValueError(f"{where}: n must be >= 0, got {n}")
        # torch sizes tensors in int64 bytes: a larger batch would fail inside randn with an overflow of its own.
        if n * max(self.dim, 1) * self._anchor.element_size() > torch.iinfo(torch.int64).max:
            raise ValueError(
                f"{where}: n = {n} samples of {self.dim} values exceed the largest tensor torch can "
                "hold; draw them in chunks"
            )
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
            raise TypeError(f"{where}: temperature must be a real number, got {type(temperature).__name__}")
        if not 0 < temperature < math.inf:
            raise ValueError(f"{where}: temperature must be positive and finite, got {temperature}")
        z = torch.randn(
            (n, *self.event_shape), dtype=self._anchor.dtype, device=self._anchor.device, generator=generator
        )
        return self.inverse(temperature * z)

    def implicit_blocks(self) -> list[_ImplicitBlock]:
        """The blocks built on G (monotone, residual, inverse residual), in order."""
        return [m for m in self.layers if isinstance(m, _ImplicitBlock)]

    @property
    def logdet_is_exact(self) -> bool:
        """Whether the latest forward pass computed every log-det exactly (False: an unbiased estimate)."""
        return all(b.last_logdet_exact for b in self.implicit_blocks())

    def solver_stats(self) -> list[dict[str, SolverStats | None]]:
        """Per implicit block, the statistics of its latest forward, inverse and backward solves."""
        return [block_solver_stats(b) for b in self.implicit_blocks()]

    def set_solver_options(
        self, *, solver: str | None = None, tol: float | None = None, max_iter: int | None = None
    ) -> None:
        """Change solver settings of every block in place (applies from the next pass; no rebuild)."""
        from .solvers import resolve_method

        if solver is not None:
            resolve_method(solver, 1)
        if tol is not None:
            check_in("tol", tol, INTERVALS["tol"])  # the configuration's range (monoflow_core.bounds)
        if max_iter is not None and max_iter < MINIMUM["max_iter"]:
            raise ValueError(f"max_iter: must be >= {MINIMUM['max_iter']}, got {max_iter}")
        for b in self.implicit_blocks():
            if solver is not None:
                b.solver = solver
            if tol is not None:
                b.tol = float(tol)
            if max_iter is not None:
                b.max_iter = int(max_iter)
        if self.config is not None:
            updates: dict[str, Any] = {
                k: v for k, v in (("solver", solver), ("tol", tol), ("max_iter", max_iter)) if v is not None
            }
            for k, v in updates.items():
                setattr(self.config, k, v)
