"""GPU check for image flows: CIFAR-10-sized step time and memory, and a short digits run on CUDA.

Two parts, both through the core's one training loop (:class:`monoflow_core.training.Trainer`):

1. **CIFAR-10-sized architecture** (``paper-cifar10``: 3 scales of 16 monotone blocks, conv DenseNet G with
   growth 172, 4 FC blocks, power-series log-det), batch 64 of synthetic 32x32 RGB images (uniform random
   levels written as a ``folder``-free in-memory set), float32: median seconds per training step over
   ``--steps`` steps after ``--warmup`` steps, and the peak CUDA memory (``torch.cuda.max_memory_allocated``).
2. **Digits on CUDA**: ``digits-cpu`` for ``--digits-steps`` steps, then the exact test bits/dim on the 447 test
   images.

CI never has a GPU; run this where one is lent (e.g. the ``device`` tool) and record the figures in
``benchmarks/results/gpu_images.md``. ``--device cpu --blocks 1`` runs a tiny version anywhere (for checking the
script itself).

Usage::

    python benchmarks/gpu_images.py [--device cuda] [--steps 20] [--warmup 3] [--digits-steps 300]
        [--blocks 16] [--out benchmarks/results/gpu_images]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import torch

from monoflow_core.data.images import ImageSet
from monoflow_core.presets import load_preset
from monoflow_core.training import Trainer


def cifar_step_time(device: str, blocks: int, steps: int, warmup: int, batch: int) -> dict[str, Any]:
    """Median step time and peak memory of the CIFAR-10-sized model on synthetic images."""
    preset = load_preset("paper-cifar10")
    model = preset.model_config(blocks_per_scale=[blocks] * 3)
    # Any image data name will do: the synthetic CIFAR-shaped set passed to the trainer replaces it.
    training = preset.train_config(data="digits", data_dir=None, device=device, batch_size=batch, eval_every=0)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2048, 3, 32, 32), dtype=torch.uint8, generator=generator)
    synthetic = ImageSet(name="synthetic-cifar", split="train", images=images, levels=256)
    trainer = Trainer(model, training, images=synthetic)  # the data decide the shape: 3 x 32 x 32, 256 levels
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = trainer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        print(f"cifar-sized step {i + 1}/{warmup + steps}: {time.perf_counter() - t0:.2f} s, {m.loss:.3f} bits/dim",
              file=sys.stderr, flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {"blocks_per_scale": blocks, "batch": batch, "median_step_s": statistics.median(times),
            "peak_memory_gib": peak, "last_train_bpd": m.loss, "steps_timed": steps}


def digits_run(device: str, steps: int) -> dict[str, Any]:
    """``digits-cpu`` on ``device`` for ``steps`` steps; exact test bits/dim on all test images."""
    preset = load_preset("digits-cpu")
    trainer = Trainer(preset.model_config(), preset.train_config(device=device, eval_every=0))
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(steps):
            trainer.step()
            if (i + 1) % 50 == 0:
                print(f"digits step {i + 1}/{steps}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    train_s = time.perf_counter() - t0
    ev = trainer.evaluate(n=10**9, split="test")
    return {"steps": steps, "train_seconds": train_s, "test_bpd": ev.bpd, "test_bpd_stderr": ev.bpd_stderr,
            "exact": ev.exact, "n_test": ev.n_test}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--blocks", type=int, default=16, help="blocks per scale of the CIFAR-sized model")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--digits-steps", type=int, default=300)
    parser.add_argument("--out", default=str(common.RESULTS_DIR / "gpu_images"))
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (CI never has one); pass --device cpu for a dry run")
    cifar = cifar_step_time(args.device, args.blocks, args.steps, args.warmup, args.batch)
    digits = digits_run(args.device, args.digits_steps)
    info = common.machine_info()
    if args.device.startswith("cuda"):
        info["cuda_device"] = torch.cuda.get_device_name()
    md = [
        "# Image flows on a GPU",
        "",
        *common.machine_header(info, [common.command_line()]),
        "",
        f"CIFAR-10-sized Monotone Flow (paper-cifar10, {args.blocks}-{args.blocks}-{args.blocks} blocks), batch "
        f"{args.batch} of synthetic 32x32 RGB images, float32, power-series log-det: median "
        f"{cifar['median_step_s'] * 1e3:.0f} ms per training step over {args.steps} steps; peak memory "
        + (f"{cifar['peak_memory_gib']:.2f} GiB." if cifar["peak_memory_gib"] is not None else "n/a (CPU)."),
        "",
        f"digits-cpu on {args.device}: {digits['steps']} steps in {digits['train_seconds']:.1f} s; test "
        f"{digits['test_bpd']:.4f} +- {digits['test_bpd_stderr']:.4f} bits/dim on {digits['n_test']} images "
        f"({'exact' if digits['exact'] else 'estimated'} log-det).",
    ]
    md_path, json_path = common.write_results(args.out, md, {"machine": info, "cifar": cifar, "digits": digits})
    print("\n".join(md))
    print(f"wrote {md_path} and {json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
