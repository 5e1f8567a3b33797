"""Data for monoflow: the 2-D toy densities and the 1-D staircase task of the Monotone Flows paper.

See :mod:`monoflow_core.data.toy` (Ahn et al., NeurIPS 2022, Table 1 and Figure 4; the 2-D sets are FFJORD's /
Residual Flows' toy data, ALGORITHM.md sections 7.1 and 7.2).
"""

from .toy import (
    DATASETS,
    STAIRCASE_SLOPE_A,
    TOY_DATASETS,
    ToyStream,
    check_dataset_name,
    sample_staircase,
    sample_toy,
    staircase_target,
)

__all__ = [
    "DATASETS",
    "STAIRCASE_SLOPE_A",
    "TOY_DATASETS",
    "ToyStream",
    "check_dataset_name",
    "sample_staircase",
    "sample_toy",
    "staircase_target",
]
