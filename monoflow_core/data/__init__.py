"""Data for monoflow: the 2-D toy densities, the 1-D staircase task and image sets.

See :mod:`monoflow_core.data.toy` (Ahn et al., NeurIPS 2022, Table 1 and Figure 4; the 2-D sets are FFJORD's /
Residual Flows' toy data, docs/algorithm.md sections 9.1, 9.2) and :mod:`monoflow_core.data.images` (scikit-learn's
8x8 digits built in; readers for MNIST, CIFAR-10, downsampled ImageNet and folders of PNG/JPEG files) and
:mod:`monoflow_core.data.points` (a user's own 2-D points from CSV / NPY / NPZ files or drawn in the studio).
"""

from .images import (
    IMAGE_DATASETS,
    ImageDataError,
    ImageSet,
    ImageStream,
    check_image_dataset_name,
    image_set_shape,
    load_image_set,
)
from .point_files import PointDataError
from .points import POINTS_DATA, PointSet, PointStream, load_points, make_point_set
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
    "IMAGE_DATASETS",
    "POINTS_DATA",
    "STAIRCASE_SLOPE_A",
    "TOY_DATASETS",
    "ImageDataError",
    "ImageSet",
    "ImageStream",
    "PointDataError",
    "PointSet",
    "PointStream",
    "ToyStream",
    "check_dataset_name",
    "check_image_dataset_name",
    "image_set_shape",
    "load_image_set",
    "load_points",
    "make_point_set",
    "sample_staircase",
    "sample_toy",
    "staircase_target",
]
