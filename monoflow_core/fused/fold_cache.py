"""Folds made once per evaluation (a scope), and runs of blocks folded in one batch."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..nn.densenet import DenseNetG
from .fold import fold_nets
from .folded import FoldedNet
from .plan import fusable_runs


def _fold_key(nets: Sequence[DenseNetG]) -> tuple[Any, ...]:
    """Identity and version of the nets and of every tensor a fold reads, and the settings it folds in."""
    key: list[Any] = []
    for g in nets:
        key.append(id(g))
        for t in (*g.parameters(), *g.buffers()):
            key.append((t.data_ptr(), t._version, t.dtype, t.device))
        key.extend((lin.mode, lin.coeff) for lin in [*g.layers, g.final])
        key.append(g.lip_coeff)
    return tuple(key)


_FOLD_SCOPE = threading.local()


@contextmanager
def fold_scope(cache: dict[Any, Any] | None = None) -> Iterator[dict[Any, Any]]:
    """Within this scope (on this thread) :func:`cached_fold` folds each run of blocks once.

    One evaluation (a density grid, a batch of samples) calls the fused path once per chunk and per block; folding
    costs a few milliseconds (exact spectral norms), which the scope saves after the first chunk. Folds are not
    kept beyond the scope: an optimizer may update parameters in place without bumping their version counters
    (the fused Adam kernel does not), so a fold remembered across evaluations could be stale. The weights must
    not change inside the scope. ``cache`` lets worker threads of one evaluation share the folds; a nested scope
    keeps the outer one's.
    """
    outer = getattr(_FOLD_SCOPE, "cache", None)
    _FOLD_SCOPE.cache = outer if outer is not None else ({} if cache is None else cache)
    try:
        yield _FOLD_SCOPE.cache
    finally:
        _FOLD_SCOPE.cache = outer


def cached_fold(nets: Sequence[DenseNetG]) -> FoldedNet:
    """:func:`fold_nets` without autograd; inside a :func:`fold_scope`, each run of nets is folded once."""
    cache = getattr(_FOLD_SCOPE, "cache", None)
    key = _fold_key(nets) if cache is not None else None
    if cache is not None and key in cache:
        return cache[key][1]
    with torch.no_grad():
        folded = fold_nets(nets)
    if cache is not None:
        cache[key] = (list(nets), folded)  # the nets stay referenced, so their ids are not reused in the scope
    return folded


@contextmanager
def folded_runs(layers: Sequence[Any], dim: int) -> Iterator[None]:
    """A :func:`fold_scope` in which every run of fused blocks among ``layers`` is folded at once, up front.

    The transport view (and the inverse pass where the compiled kernels do not serve) takes the blocks one at a time
    (``cached_fold([block.net])``), and on the PyTorch path folding one block costs nearly as much as folding ten (a
    few milliseconds of small operators and spectral norms). Here each run is folded in one batch and filed under its
    own key (for :func:`fused_inverse_run`) and each block's slice under the block's, so the per-block calls find it.
    Without gradients only (the fold is made under ``no_grad``).
    """
    with fold_scope() as cache:
        for start, stop in fusable_runs(layers, dim):
            nets = [blk.net for blk in layers[start:stop]]
            keys = [_fold_key([g]) for g in nets]
            if len(nets) > 1 and not all(k in cache for k in keys):
                with torch.no_grad():
                    folded = fold_nets(nets)
                cache[_fold_key(nets)] = (nets, folded)  # (for fused_inverse_run)
                for j, (g, k) in enumerate(zip(nets, keys, strict=True)):
                    cache[k] = ([g], folded.select(j))
        yield
