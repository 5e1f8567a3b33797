"""Builders from configuration: :func:`build_flow` turns a :class:`FlowConfig` into a :class:`Flow`."""

from __future__ import annotations

from torch import nn

from .blocks import ActNorm, InverseResidualBlock, MonotoneBlock, ResidualBlock
from .config import FlowConfig
from .dequantization import UniformDequantizer, VariationalDequantizer
from .families.build import build_family_flow
from .families.names import IMPLICIT
from .flow import Flow
from .image_layers import ActNorm2d, FlatG, LogitTransform, Squeeze
from .multiscale import MultiscaleFlow
from .nn.conv import ConvDenseNetG
from .nn.densenet import DenseNetG, JacobianNet, LipschitzMLP

__all__ = ["build_flow", "build_g", "build_image_flow"]

_BLOCKS = {"monotone": MonotoneBlock, "residual": ResidualBlock, "inverse_residual": InverseResidualBlock}


def _dense_g(config: FlowConfig, n: int, growth: int) -> DenseNetG:
    return DenseNetG(
        n,
        depth=config.depth,
        growth=growth,
        activation=config.activation,
        coeff=config.lipschitz,
        lip_coeff=config.concat_lipschitz,
        learnable_concat=config.learnable_concat,
        spectral_mode=config.spectral_norm,
    )


def build_g(config: FlowConfig) -> JacobianNet:
    """The network G of one block, as configured."""
    if config.g == "densenet":
        return _dense_g(config, config.dim, config.growth)
    return LipschitzMLP(
        config.dim,
        hidden=config.hidden,
        activation=config.activation,
        coeff=config.lipschitz,
        spectral_mode=config.spectral_norm,
    )


def _block(config: FlowConfig, net: JacobianNet) -> nn.Module:
    return _BLOCKS[config.formulations()[0]](
        net,
        solver=config.solver,
        tol=config.tol,
        max_iter=config.max_iter,
        memory=config.anderson_memory,
        logdet=config.logdet,
        estimator=config.estimator_settings(),
        implicit_grad=config.implicit_grad,
    )


def build_image_flow(config: FlowConfig) -> MultiscaleFlow:
    """The multiscale image flow of docs/algorithm.md section 9.3 from a configuration with ``image_shape``.

    Per scale ``n x [block(conv DenseNet G), ActNorm2d]``, a 2x2 squeeze between scales (with ``factor_out``,
    half of the channels then leave for the base density), and ``fc_blocks x [block(fully connected DenseNet
    G), ActNorm2d]`` at the end; a logit transform first. The paper's 16-16-16 presets and tiny CPU models
    come from this one builder.
    """
    assert config.image_shape is not None
    c, h, w = config.image_shape
    layers: list[nn.Module] = [LogitTransform(config.logit_alpha)]
    plan: list[tuple[str, int]] = [("layer", 0)]

    def add(layer: nn.Module) -> None:
        plan.append(("layer", len(layers)))
        layers.append(layer)

    scales = len(config.blocks_per_scale)
    for s, n_blocks in enumerate(config.blocks_per_scale):
        for _ in range(n_blocks):
            g = ConvDenseNetG(
                c,
                (h, w),
                depth=config.depth,
                growth=config.growth,
                activation=config.activation,
                coeff=config.lipschitz,
                lip_coeff=config.concat_lipschitz,
                learnable_concat=config.learnable_concat,
                spectral_mode=config.spectral_norm,
            )
            add(_block(config, g))
            if config.actnorm:
                add(ActNorm2d(c))
        if s < scales - 1:
            add(Squeeze())
            c, h, w = c * 4, h // 2, w // 2
            if config.factor_out:
                c //= 2
                plan.append(("factor", c))
    for _ in range(config.fc_blocks):
        add(_block(config, FlatG(_dense_g(config, c * h * w, config.fc_growth), (c, h, w))))
        if config.actnorm:
            add(ActNorm2d(c))
    c0 = config.image_shape[0]
    dequantizer: nn.Module
    if config.dequantization == "variational":
        dequantizer = VariationalDequantizer(c0, config.levels, config.vdq_blocks, config.vdq_channels)
    else:
        dequantizer = UniformDequantizer(config.levels)
    return MultiscaleFlow(layers, plan, config.image_shape, dequantizer, config.levels, config=config)


def build_flow(config: FlowConfig | None = None) -> Flow:
    """Build a flow from a configuration (the paper's 2-D toy Monotone Flow by default).

    Layers: ``[ActNorm]`` if ``actnorm_input``, then per block the configured formulation around a fresh G,
    followed by an ActNorm if ``actnorm``. A configuration with ``image_shape`` builds a
    :class:`~monoflow_core.multiscale.MultiscaleFlow` (:func:`build_image_flow`); one whose ``family`` is not
    ``"implicit"`` a :class:`~monoflow_core.families.build.ComparisonFlow` (docs/families.md; needs zuko).
    """
    # The flow keeps its own copy: live changes (``Flow.set_solver_options``) never touch the caller's object.
    config = FlowConfig() if config is None else config.replace()
    config.validate()
    if config.family != IMPLICIT:  # a comparison family (Real NVP, Glow, NSF, MAF, CNF), built from zuko
        return build_family_flow(config)
    if config.is_image:
        return build_image_flow(config)
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
