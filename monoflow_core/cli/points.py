"""The command line's side of a user's own 2-D points: ``monoflow train --data FILE [--columns A,B] [--holdout F]``.

A ``--data`` value that is no data set name but names a CSV, NPY or NPZ file (by its suffix, a path separator, or an
existing file) trains on that file's points (:func:`monoflow_core.data.points.load_points`): split with the run's
``test_seed``, standardised, and stored in the run's checkpoint, so ``monoflow eval|sample|density`` and
``--resume`` need nothing else. Every problem is a ``ValueError`` naming the file or the flag, which the command
reports as one ``monoflow: error:`` line with exit status 2.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..data.point_files import PointDataError, looks_like_point_file, parse_columns
from ..data.points import DEFAULT_HOLDOUT, POINTS_DATA, PointSet, load_points

__all__ = ["holdout_fraction", "point_set_from_args", "points_note", "refuse_point_flags_on_resume"]


def holdout_fraction(text: str) -> float:
    """An argparse type: the held-out fraction, in (0, 0.5]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 0.5], got {text!r}") from None
    if not 0.0 < value <= 0.5:
        raise argparse.ArgumentTypeError(f"must lie in (0, 0.5], got {text}")
    return value


def point_set_from_args(args: argparse.Namespace, data: str, train_config: Any) -> PointSet | None:
    """The points of ``--data FILE`` (``data`` is the canonical name, :data:`POINTS_DATA` for a file), else None.

    Raises:
        PointDataError: the file cannot be used, or ``--columns`` / ``--holdout`` come without a point file.
    """
    columns, holdout = getattr(args, "columns", None), getattr(args, "holdout", None)
    if data != POINTS_DATA:
        for flag, value in (("--columns", columns), ("--holdout", holdout)):
            if value is not None:
                raise PointDataError(
                    f"{flag}: only for --data FILE (a .csv, .npy or .npz of 2-D points); "
                    f"--data {args.data} is a built-in data set"
                )
        return None
    return load_points(
        args.data,
        parse_columns(columns),
        holdout=DEFAULT_HOLDOUT if holdout is None else holdout,
        split_seed=int(train_config.test_seed),
    )


def refuse_point_flags_on_resume(args: argparse.Namespace) -> None:
    """``--resume`` continues with the points stored in the checkpoint: a point file or its options are refused."""
    given = [
        flag
        for flag, attr in (("--columns", "columns"), ("--holdout", "holdout"))
        if getattr(args, attr, None) is not None
    ]
    if args.data is not None and looks_like_point_file(str(args.data)):
        given.insert(0, "--data FILE")
    if given:
        raise PointDataError(
            f"{', '.join(given)}: cannot change when resuming; a run's points travel in its "
            "checkpoint (resume without them)"
        )


def points_note(points: PointSet | None, what: str) -> str:
    """A line saying how ``what`` (samples, log-densities) relate to the data's own units; "" without points."""
    if points is None:
        return ""
    if points.is_identity:
        return f"{what} are in the units of {points.source} (its points were used as they are)"
    m, s, shift = points.mean.tolist(), points.scale.tolist(), points.log_scale
    return (
        f"{what} are in the standardised coordinates of {points.source}: x = mean + scale * z with mean "
        f"({m[0]:.6g}, {m[1]:.6g}), scale ({s[0]:.6g}, {s[1]:.6g}); in the data's units "
        f"log p(x) = log p(z) {'-' if shift >= 0 else '+'} {abs(shift):.6g} (minus the sum of log scale)"
    )
