"""``monoflow eval``: a checkpoint's test NLL, test MSE or bits/dim on its fixed, seeded held-out set.

The test itself is :meth:`~monoflow_core.training.Trainer.evaluate`, the one implementation the trainer and the
studio use too.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from ..config import DTYPES
from ..data.images import IMAGE_DATASETS
from ..data.points import POINTS_DATA
from ..precision import arithmetic_statement, full_precision
from ..resources import SEED_MAX, check_memory, points_bytes
from ..training import TrainConfig, Trainer
from .datasets import ALL_DATA, _data_name
from .errors import EXIT_OK, CLIError
from .loading import _evaluation_flow, _load
from .options import _set_threads
from .report import _describe_test, _jsonable


def _cmd_eval(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    ckpt = _load(args.checkpoint, args.device)
    stored = ckpt.train_config
    if args.data is not None:
        data = _data_name(args.data)
    elif stored is not None:
        data = stored.data
    else:
        raise CLIError(
            f"{args.checkpoint}: holds a flow only (no training configuration); pass --data NAME, one of "
            f"{list(ALL_DATA)}"
        )
    if data == POINTS_DATA and (args.data is not None or ckpt.points is None):
        raise CLIError(
            f"--data {args.data}: a run on your own points is tested on the held-out points stored in "
            "its checkpoint; omit --data"
            if ckpt.points is not None
            else f"--data {args.data}: {args.checkpoint} holds no points of its own (only checkpoints of runs "
            "on a point file do)"
        )
    if args.split is not None and data not in IMAGE_DATASETS:
        raise CLIError(
            f"--split {args.split}: only image data sets have splits; {data!r} is tested on its fixed, seeded "
            "held-out set (choose it with --seed and --test-size)"
        )
    flow = _evaluation_flow(ckpt)
    if stored is not None:
        base = stored
    else:
        dtype = str(ckpt.metadata.get("dtype", "float32"))
        base = TrainConfig(data=data, dtype=dtype if dtype in DTYPES else "float32")
    changes: dict[str, Any] = {"data": data, "device": args.device, "ema": None}
    if args.data_dir is not None:
        changes["data_dir"] = args.data_dir
    if args.split is not None:
        changes["eval_split"] = args.split
    if args.seed is not None:
        changes["test_seed"] = args.seed
    if args.test_size is not None:
        changes["eval_size" if data in ("staircase", *IMAGE_DATASETS) else "test_size"] = args.test_size
    elif data in IMAGE_DATASETS:
        changes["eval_size"] = 10**9  # the whole split
    test_config = base.replace(**changes)
    if test_config.test_seed > SEED_MAX:
        raise CLIError(
            f"test_seed {test_config.test_seed} (from the checkpoint {args.checkpoint}): must be an integer "
            f"in [0, 2**63 - 1 = {SEED_MAX}]; override it with --seed"
        )
    if data not in IMAGE_DATASETS:  # image tests are capped by their split, which is loaded anyway
        n = test_config.test_size if test_config.task == "density" else test_config.eval_size
        label = (
            f"--test-size {args.test_size}"
            if args.test_size is not None
            else (f"test_size {n} (the run's; override it with --test-size)")
        )
        # the evaluation copy (float64 by default)
        copy = sum(t.numel() for t in (*flow.parameters(), *flow.buffers())) * 8
        check_memory(label, points_bytes(n, flow.dim) + copy, "the held-out test", hint="use a smaller --test-size")
    # The trainer's evaluate() is the one implementation of the held-out test (float64 copy, seeded).
    trainer = Trainer(ckpt.model_config, test_config, flow=flow, points=ckpt.points if data == POINTS_DATA else None)
    result = trainer.evaluate(fixed=True, dtype=args.dtype)
    with full_precision():  # the arithmetic evaluate() ran in (docs/precision.md)
        arith = arithmetic_statement(getattr(torch, result.dtype), trainer.device)
    step = ckpt.metadata.get("step")
    if isinstance(step, int):
        # The evaluation trainer starts at step 0; report the checkpoint's iteration (image results print it).
        result.step = step
    if args.json:
        doc: dict[str, Any] = {"data": data}
        if result.bpd is not None:
            doc["bpd"] = _jsonable(result.bpd)
            doc["bpd_stderr"] = _jsonable(result.bpd_stderr)
            doc["split"] = result.split
            doc["dequantization"] = result.dequantization
            doc["nll_nats"] = _jsonable(result.nll_nats)
        elif result.nll_nats is not None:
            doc["nll_nats"] = _jsonable(result.nll_nats)
            doc["nll_stderr_nats"] = _jsonable(result.nll_stderr_nats)
        else:
            doc["mse"] = _jsonable(result.mse)
        if ckpt.points is not None and result.nll_nats is not None:
            doc["points"] = {
                "source": ckpt.points.source,
                "mean": ckpt.points.mean.tolist(),
                "scale": ckpt.points.scale.tolist(),
                "log_scale": ckpt.points.log_scale,
                "nll_nats_data_units": _jsonable(result.nll_nats + ckpt.points.log_scale),
            }
        doc.update(
            {
                "n_test": result.n_test,
                "seconds": result.seconds,
                "exact": result.exact,
                "test_seed": test_config.test_seed,
                "dtype": result.dtype,
                "precision": arith,
                "step": step,
                "checkpoint": str(args.checkpoint),
            }
        )
        print(json.dumps(doc, allow_nan=False))
    else:
        at = f" at iteration {step}" if step is not None else ""
        print(f"{args.checkpoint}{at}: {_describe_test(result, data)} [test seed {test_config.test_seed}]")
        if ckpt.points is not None and result.nll_nats is not None:
            print(
                f"points: {ckpt.points.describe()}; in the data's units the test NLL is "
                f"{result.nll_nats + ckpt.points.log_scale:.4f} nats"
            )
    return EXIT_OK
