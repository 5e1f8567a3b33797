"""The folded weights of a run of DenseNet G networks, as the fused path's kernels read them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

from ..nn.activations import CLipSwish
from ..nn.densenet import DenseNetG

__all__ = ["BlockWeights", "FoldedNet", "swish_gains"]


@dataclass
class FoldedNet:
    """Folded weights of a stack of ``nb`` DenseNet G networks (index ``j`` = block ``j`` of a run).

    The feature buffer of one evaluation (:class:`~monoflow_core.fused.workspace.Workspace`) has a leading bias row
    (1 on primal columns, 0 on tangent columns), so biases ride in the weights: layer ``i`` computes the
    pre-activations of its ``2k`` concatenated units (``k [h - shift, -h - shift]`` for CPila) as
    ``weights[i][j] @ X[:1 + width_i]`` and G is ``final[j] @ X``. The concatenation weights, the activation's scale
    and Pila's k live in the weights, so the buffer holds raw activation outputs.
    """

    weights: list[Tensor]  # (nb, 2k, 1 + width_i)
    final: Tensor  # (nb, n, 1 + width_total)
    n: int
    kind: str  # "pila", "relu" or "swish"

    def tensors(self) -> list[Tensor]:
        """The hidden layers' weights, then the final layer's (the order :meth:`from_tensors` reads)."""
        return [*self.weights, self.final]

    @classmethod
    def from_tensors(cls, tensors: Sequence[Tensor], n: int, kind: str) -> FoldedNet:
        """The fold whose :meth:`tensors` are ``tensors``."""
        return cls(list(tensors[:-1]), tensors[-1], n, kind)

    def select(self, j: int) -> FoldedNet:
        """The fold of block ``j`` alone (a one-block stack of views)."""
        return FoldedNet([w[j : j + 1] for w in self.weights], self.final[j : j + 1], self.n, self.kind)

    def reversed(self) -> FoldedNet:
        """The fold of the same blocks in reverse order (copies)."""
        return FoldedNet([w.flip(0) for w in self.weights], self.final.flip(0), self.n, self.kind)

    def block(self, j: int) -> BlockWeights:
        """Detached weights of block ``j`` for the feature-major evaluation kernels."""
        return BlockWeights([w[j].detach() for w in self.weights], self.final[j].detach(), self.n, self.kind)


@dataclass
class BlockWeights:
    """The folded weights of one block, detached: the left operands of the PyTorch kernels' feature-major products."""

    weights: list[Tensor]  # (2k, 1 + width_i): left operands of the feature-major products
    final: Tensor  # (n, 1 + width_total)
    n: int
    kind: str

    @property
    def total(self) -> int:
        """Rows of the feature buffer: the bias row, the input and every layer's outputs."""
        return int(self.final.shape[1])

    def map_weights(self, sign: float) -> Tensor:
        """Final weights of the map ``w + sign G(w)``: the identity rides on the input rows of the buffer.

        With them the last product yields ``w + sign G(w)`` on the primal columns and ``I + sign J_G`` on the
        tangent columns, i.e. the Newton residual's value and Jacobian without further operations.
        """
        eye = torch.zeros_like(self.final)
        eye[:, 1 : 1 + self.n] = torch.eye(self.n, dtype=eye.dtype, device=eye.device)
        return eye.add_(self.final) if sign > 0 else eye.sub_(self.final)


def swish_gains(nets: Sequence[DenseNetG]) -> Tensor:
    """CLipSwish's ``beta = softplus(beta_raw)`` of every block and dense layer, (nb, depth), differentiable.

    The fold multiplies a hidden layer's pre-activations by ``beta`` (``h = beta z``), so that the activation kernels
    evaluate one fixed function, ``h sigmoid(h) = beta swish_beta(z)`` (LipSwish, Chen et al. 2019, section 4.1;
    CLipSwish, Perugachi-Diaz et al. 2021, section 3.2), and the later layers' column scales carry the remaining
    ``1 / (1.1 * 1.004 * beta)``. ``beta`` thus enters the folded weights only, and its gradient (including the
    exact log-det's second-order terms) flows back through the fold like the weights' own.
    """
    raw = torch.stack([cast(CLipSwish, a).beta_raw for g in nets for a in g.activations])
    return F.softplus(raw).view(len(nets), len(nets[0].activations))
