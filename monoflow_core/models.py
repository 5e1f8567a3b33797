"""Builders from configuration: :func:`build_flow` turns a :class:`FlowConfig` into a :class:`Flow`."""

from __future__ import annotations

from torch import nn

from .blocks import ActNorm, InverseResidualBlock, MonotoneBlock, ResidualBlock
from .config import FlowConfig
from .flow import Flow
from .nn.densenet import DenseNetG, JacobianNet, LipschitzMLP

__all__ = ["build_flow", "build_g"]

_BLOCKS = {"monotone": MonotoneBlock, "residual": ResidualBlock, "inverse_residual": InverseResidualBlock}


def build_g(config: FlowConfig) -> JacobianNet:
    """The network G of one block, as configured."""
    if config.g == "densenet":
        return DenseNetG(
            config.dim,
            depth=config.depth,
            growth=config.growth,
            activation=config.activation,
            coeff=config.lipschitz,
            lip_coeff=config.concat_lipschitz,
            learnable_concat=config.learnable_concat,
            spectral_mode=config.spectral_norm,
        )
    return LipschitzMLP(
        config.dim,
        hidden=config.hidden,
        activation=config.activation,
        coeff=config.lipschitz,
        spectral_mode=config.spectral_norm,
    )


def build_flow(config: FlowConfig | None = None) -> Flow:
    """Build a flow from a configuration (the paper's 2-D toy Monotone Flow by default).

    Layers: ``[ActNorm]`` if ``actnorm_input``, then per block the configured formulation around a fresh G,
    followed by an ActNorm if ``actnorm``.
    """
    # The flow keeps its own copy: live changes (``Flow.set_solver_options``) never touch the caller's object.
    config = FlowConfig() if config is None else config.replace()
    config.validate()
    estimator = config.estimator_settings()
    layers: list[nn.Module] = []
    if config.actnorm_input:
        layers.append(ActNorm(config.dim))
    for formulation in config.formulations():
        layers.append(
            _BLOCKS[formulation](
                build_g(config),
                solver=config.solver,
                tol=config.tol,
                max_iter=config.max_iter,
                memory=config.anderson_memory,
                logdet=config.logdet,
                estimator=estimator,
                implicit_grad=config.implicit_grad,
            )
        )
        if config.actnorm:
            layers.append(ActNorm(config.dim))
    return Flow(layers, (config.dim,), config=config)
