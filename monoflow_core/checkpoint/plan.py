"""The tensors a stored configuration describes, derived without allocating them (the shape-only build).

Before anything is read or built for real, :func:`_flow_plan` builds the flow of the stored
:class:`~monoflow_core.config.FlowConfig` on PyTorch's ``meta`` device (shapes without storage) to learn every
state tensor's name, shape and dtype and the parameters' order, and :func:`_compare` holds the file's tensor table
against them. Layer counts and widths the stored tensors cannot account for are refused first
(:func:`_count_guard`), and the build is aborted once it has done more work than the file could need, so a crafted
``blocks = 10**9`` costs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..config import FlowConfig
from ..families.size import family_state_numbers
from ..models import build_flow
from .errors import _clip, _fail, _short
from .header import _ST_NAMES, _Entry


class _BuildTooLarge(BaseException):
    """Raised inside the meta build once it has done more work than the stored tensors can account for.

    A BaseException so that no ``except Exception`` of a module constructor can swallow it.
    """


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value
    raise TypeError("no tensor argument")


# Initialisers that only fill values: on the meta device there are none to fill, and PyTorch runs them there
# through its Python reference kernels (milliseconds per call, and a first call that imports sympy).
_FILL_ONLY = frozenset(
    {
        nn.init.uniform_,
        nn.init.normal_,
        nn.init.trunc_normal_,
        nn.init.kaiming_uniform_,
        nn.init.kaiming_normal_,
        nn.init.xavier_uniform_,
        nn.init.xavier_normal_,
        nn.init.orthogonal_,
        Tensor.uniform_,
        Tensor.normal_,
    }
)


class _MetaBuild(TorchFunctionMode):
    """Shape-only construction: counts torch calls (aborting past ``budget``) and skips value computations.

    Used inside ``torch.device("meta")``, where every tensor is a shape without storage. Random draws and
    initialisers become plain ``empty`` tensors and ``F.normalize`` (the spectral layers' power-iteration vectors)
    returns an empty tensor of its input's shape and dtype: the same shapes and dtypes, without PyTorch's slow
    Python meta kernels. Every other call runs unchanged.
    """

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget
        self.calls = 0

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        self.calls += 1
        if self.calls > self.budget:
            raise _BuildTooLarge
        kwargs = dict(kwargs or {})
        if func is F.normalize:
            t = _first_tensor(args, kwargs)
            return torch.empty(t.shape, dtype=t.dtype)
        if func in _FILL_ONLY:
            return _first_tensor(args, kwargs)
        if func is torch.randn or func is torch.rand:
            kwargs.pop("generator", None)
            return torch.empty(*args, **kwargs)
        return func(*args, **kwargs)


@dataclass
class _FlowPlan:
    """The flow a configuration describes: every state tensor, and the parameters in optimizer order."""

    tensors: dict[str, _Entry]
    parameters: list[str]


def _count_guard(path: Path, config: FlowConfig, stored: dict[str, _Entry]) -> None:
    """Refuse layer counts and widths that the stored flow tensors cannot hold, before anything loops over them.

    Lower bounds only: every block holds at least one tensor, and some tensor of the flow holds at least one
    number per dimension of the samples (an ActNorm, a first weight, a convolution's power-iteration vector).
    """
    n = len(stored)
    counts: list[tuple[str, int, int]] = []  # (field, value, largest value the file can account for)
    if config.is_image:
        counts.append(("blocks_per_scale / fc_blocks", sum(config.blocks_per_scale) + config.fc_blocks, n))
        # Unused by image flows, but formulations() still makes a list of that many entries.
        counts.append(("blocks", config.blocks, max(n, 10_000)))
        if config.dequantization == "variational":
            counts.append(("vdq_blocks", config.vdq_blocks, n))
        counts.append(("depth", config.depth, n))
    else:
        counts.append(("blocks", config.blocks, n))
        if config.g == "densenet":
            counts.append(("depth", config.depth, n))
        else:
            counts.append(("hidden", len(config.hidden), n))
    if config.family != "implicit":  # a comparison family: one network of len(hidden) + 1 layers per block
        counts.append(("hidden", len(config.hidden), n))
    for field, value, limit in counts:
        if value > limit:
            raise _fail(
                path,
                f"the stored flow tensors do not match model_config: {field} = {_short(value)} needs more layers "
                f"than the {n} flow tensors stored can hold",
            )
    numbers = sum(math.prod(entry.shape) for entry in stored.values())
    setting: list[int] | int | None
    if config.is_image:
        # Each factor-out halves the channels left; the narrowest scale still holds that many numbers a sample.
        halvings = len(config.blocks_per_scale) - 1 if config.factor_out else 0
        field, setting, width = "image_shape", config.image_shape, config.dim >> halvings
    else:
        field, setting, width = "dim", config.dim, config.dim
    if config.family != "implicit":
        # Comparison families are built on the CPU even in the shape-only build (zuko computes its masks from
        # values): sizes beyond what the file stores are refused first, so that build allocates no more than it.
        need = family_state_numbers(config)
        if need > numbers:
            raise _fail(
                path,
                f"the stored flow tensors do not match model_config: family {config.family!r} with blocks = "
                f"{_short(config.blocks)}, hidden = {_short(config.hidden)}, bins = {_short(config.bins)} holds "
                f"{need} numbers, more than the {numbers} stored",
            )
    if width > numbers:
        raise _fail(
            path,
            f"the stored flow tensors do not match model_config: {field} = {_short(setting)} needs tensors of more "
            f"than the {numbers} numbers stored",
        )


def _flow_plan(path: Path, config: FlowConfig, dtype: torch.dtype, stored: dict[str, _Entry]) -> _FlowPlan:
    """Names, shapes and dtypes of the flow ``config`` describes, without allocating any of it.

    The flow is built on the ``meta`` device; its construction is aborted once it has made far more torch calls
    than the ``stored`` flow tensors could need (a layer count the count guard does not know about).
    """
    _count_guard(path, config, stored)
    # A real flow makes about 3 torch calls per state tensor; 64 leaves room for any module's construction.
    mode = _MetaBuild(budget=64 * (len(stored) + 1) + 4096)
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"), mode:
            flow = build_flow(config)
    except _BuildTooLarge:
        raise _fail(
            path,
            f"model_config describes a flow far larger than its {len(stored)} stored tensors (blocks = "
            f"{_short(config.blocks)}, depth = {_short(config.depth)}, blocks_per_scale = "
            f"{_short(config.blocks_per_scale)}, fc_blocks = {_short(config.fc_blocks)})",
        ) from None
    except Exception as err:  # whatever the builder refuses, the stored configuration is the problem
        problem = _clip(str(err) or repr(err))
        raise _fail(path, f"model_config: cannot build the flow it describes ({problem})") from None
    tensors = {}
    for name, t in flow.state_dict().items():
        # Module.to(dtype) converts the floating-point tensors only (ActNorm's 'initialized' stays bool).
        tensors[name] = _Entry(_ST_NAMES.get(dtype if t.is_floating_point() else t.dtype, str(t.dtype)), tuple(t.shape))
    return _FlowPlan(tensors, [name for name, _ in flow.named_parameters()])


def _compare(path: Path, prefix: str, expected: dict[str, _Entry], found: dict[str, _Entry], source: str) -> None:
    """Refuse unless ``found`` (the file's ``prefix*`` tensors) has exactly the names, shapes and dtypes expected."""
    problems = []
    missing = [n for n in expected if n not in found]
    extra = [n for n in found if n not in expected]
    for label, names in (("missing", missing), ("unexpected", extra)):
        if names:
            more = " ..." if len(names) > 3 else ""
            problems.append(f"{label} {', '.join(_short(prefix + n) for n in names[:3])}{more}")
    for name, want in expected.items():
        have = found.get(name)
        if have is not None and have != want:
            problems.append(f"{_short(prefix + name)} is {have.describe()}, {source} gives {want.describe()}")
            if len(problems) >= 3:
                break
    if problems:
        raise _fail(path, f"the stored {prefix[:-1]} tensors do not match {source}: {'; '.join(problems)}")
