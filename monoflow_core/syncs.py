"""Counting host synchronisations and operators, on any device (the CPU included), for tests and benchmarks.

On CUDA every operator that needs a value on the host (``.item()``, ``bool(tensor)``, ``float(tensor)``, boolean-mask
indexing, ``torch.nonzero``, the error check of ``torch.linalg.solve``) waits for every kernel queued before it, so
the GPU idles while the host catches up. The same operators run on the CPU, where they cost nothing, so counting
them there (with :class:`SyncCounter`) measures how often a CUDA run would synchronise: a test can bound the
synchronisations per solver iteration without a GPU.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OperatorCounter", "SyncCounter"]

_aten = torch.ops.aten

# Operators that read a device value on the host, or whose output size depends on device values.
_ALWAYS = {
    _aten._local_scalar_dense.default,  # .item(), bool(), float(), int()
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten._linalg_check_errors.default,  # torch.linalg.solve / inv / cholesky without _ex
}
# Indexing operators that synchronise when an index is a boolean mask (it is turned into positions first).
_MASK_INDEXED = {_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default}


def _has_mask(indices: Any) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class SyncCounter(TorchDispatchMode):
    """A dispatch mode that counts the operators that would synchronise a CUDA device with the host.

    Use ``with SyncCounter() as syncs: ...``; afterwards ``syncs.count`` is the total and ``syncs.by_operator``
    names them (e.g. ``_local_scalar_dense`` for ``.item()`` and ``bool(tensor)``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_operator: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(self.by_operator.values())

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _ALWAYS or (func in _MASK_INDEXED and len(args) > 1 and _has_mask(args[1])):
            self.by_operator[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


class OperatorCounter(TorchDispatchMode):
    """A dispatch mode that counts aten operators: all of them (``ops``), and those that are not views
    (``launches``: each is a kernel launch on a GPU). A count does not depend on the machine's load, so it can stand
    where a timing would not.

    Use ``with OperatorCounter() as counter: ...``; subclasses may extend :meth:`counted`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.launches = 0

    def counted(self, func: Any) -> None:
        """Record one call of ``func``."""
        self.ops += 1
        if not getattr(func, "is_view", False):
            self.launches += 1

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counted(func)
        return func(*args, **(kwargs or {}))
