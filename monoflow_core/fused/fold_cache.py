"""Folds made once per evaluation (a scope), and runs of blocks folded in one batch."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypeAlias

import torch
from torch import nn

from ..nn.densenet import DenseNetG
from .fold import fold_nets
from .folded import FoldedNet
from .plan import fast_eligible, fusable_runs, linears, net_of

__all__ = ["FOLDS", "FoldCache", "FoldScopes", "cached_fold", "fold_scope", "folded_runs"]

#: Folds by the identity and version of the nets they fold (:func:`fold_key`); each with its nets, which stay
#: referenced so that their ids are not reused while the cache lives.
FoldCache: TypeAlias = dict[tuple[object, ...], tuple[list[DenseNetG], FoldedNet]]


def fold_key(nets: Sequence[DenseNetG]) -> tuple[object, ...]:
    """Identity and version of the nets and of every tensor a fold reads, and the settings it folds in."""
    key: list[object] = []
    for g in nets:
        key.append(id(g))
        for t in (*g.parameters(), *g.buffers()):
            key.append((t.data_ptr(), t._version, t.dtype, t.device))
        key.extend((lin.mode, lin.coeff) for lin in linears(g))
        key.append(g.lip_coeff)
    return tuple(key)


class FoldScopes:
    """The fold cache of the scope each thread is in (:func:`fold_scope`); None outside any scope."""

    def __init__(self) -> None:
        self._local = threading.local()

    def current(self) -> FoldCache | None:
        """This thread's cache, or None outside a scope."""
        cache: FoldCache | None = getattr(self._local, "cache", None)
        return cache

    @contextmanager
    def scope(self, cache: FoldCache | None = None) -> Iterator[FoldCache]:
        """Enter a scope on this thread (see :func:`fold_scope`)."""
        outer = self.current()
        current = outer if outer is not None else ({} if cache is None else cache)
        self._local.cache = current
        try:
            yield current
        finally:
            self._local.cache = outer


#: The process's fold scopes.
FOLDS = FoldScopes()


@contextmanager
def fold_scope(cache: FoldCache | None = None) -> Iterator[FoldCache]:
    """Within this scope (on this thread) :func:`cached_fold` folds each run of blocks once.

    One evaluation (a density grid, a batch of samples) calls the fused path once per chunk and per block; folding
    costs a few milliseconds (exact spectral norms), which the scope saves after the first chunk. Folds are not
    kept beyond the scope: an optimizer may update parameters in place without bumping their version counters
    (the fused Adam kernel does not), so a fold remembered across evaluations could be stale. The weights must
    not change inside the scope. ``cache`` lets worker threads of one evaluation share the folds; a nested scope
    keeps the outer one's.
    """
    with FOLDS.scope(cache) as current:
        yield current


def cached_fold(nets: Sequence[DenseNetG]) -> FoldedNet:
    """:func:`~monoflow_core.fused.fold.fold_nets` without autograd; inside a :func:`fold_scope`, each run of nets is
    folded once."""
    cache = FOLDS.current()
    key = fold_key(nets) if cache is not None else None
    if cache is not None and key is not None and key in cache:
        return cache[key][1]
    with torch.no_grad():
        folded = fold_nets(nets)
    if cache is not None and key is not None:
        cache[key] = (list(nets), folded)  # the nets stay referenced, so their ids are not reused in the scope
    return folded


@contextmanager
def folded_runs(layers: Sequence[nn.Module], dim: int) -> Iterator[None]:
    """A :func:`fold_scope` in which every run of fused blocks among ``layers`` is folded at once, up front.

    The transport view (and the inverse pass where the compiled kernels do not serve) takes the blocks one at a time
    (``cached_fold([net])``), and on the PyTorch path folding one block costs nearly as much as folding ten (a
    few milliseconds of small operators and spectral norms). Here each run is folded in one batch and filed under its
    own key (for :func:`~monoflow_core.fused.run.fused_inverse_run`) and each block's slice under the block's, so the
    per-block calls find it. Without gradients only (the fold is made under ``no_grad``).
    """
    with fold_scope() as cache:
        for start, stop in fusable_runs(layers, dim):
            nets = [net_of(blk) for blk in layers[start:stop] if fast_eligible(blk, dim)]
            keys = [fold_key([g]) for g in nets]
            if len(nets) > 1 and not all(k in cache for k in keys):
                with torch.no_grad():
                    folded = fold_nets(nets)
                cache[fold_key(nets)] = (nets, folded)  # (for fused_inverse_run)
                for j, (g, k) in enumerate(zip(nets, keys, strict=True)):
                    cache[k] = ([g], folded.select(j))
        yield
