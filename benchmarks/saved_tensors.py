"""Bytes of tensors a training step saves for its backward pass, per image (``saved_tensors_hooks``).

Measures one training step of an image preset (default ``paper-cifar10`` reduced to one block per scale, batch 4,
on the CPU, synthetic CIFAR-shaped images): every tensor autograd saves for backward passes through a pack hook
(:class:`torch.autograd.graph.saved_tensors_hooks`), which wraps it in a small holder object; the holder's
destructor runs when autograd frees the graph that held it. So the script can report, at the moment the loss is
ready and ``backward`` is about to run,

* ``live``: the bytes of distinct storages still held for backward (what the step really keeps), and
* ``peak``: the most such bytes alive at any moment of the forward pass (graphs built and freed inside the forward
  pass, such as the memory-efficient log-det's, count here),

each divided by the batch size. The model's own parameters and buffers are counted apart (``model_state``): autograd
saves many of them (every linear layer saves its weight), but they exist whether or not anything is saved, so the
figure per image leaves them out; the total with them is reported too. What is left is per-sample activations plus
a few weight-sized tensors computed during the step (normalised and folded weights), which do not grow with the
batch. Tensors a custom ``autograd.Function`` stores as plain ``ctx`` attributes, or closures that hold a graph's
root, escape the hooks: the project's Functions save tensors through ``ctx.save_for_backward``, and its closures
hold only block inputs and outputs (a few copies of each block's input).

Usage::

    python benchmarks/saved_tensors.py [--preset paper-cifar10] [--blocks 1] [--batch 4]
        [--out benchmarks/results/saved_tensors]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import torch

from monoflow_core.data.images import ImageSet
from monoflow_core.memory_plan import SavedTensorMeter
from monoflow_core.presets import load_preset
from monoflow_core.training import Trainer

MIB = 2**20


def synthetic_trainer(
    preset_name: str, blocks: int, batch: int, device: str = "cpu", dtype: str = "float32", **train_changes: Any
) -> Trainer:
    """A trainer of ``preset_name`` with ``blocks`` blocks per scale on synthetic images of the preset's shape."""
    preset = load_preset(preset_name)
    model = preset.model_config(blocks_per_scale=[blocks] * len(preset.model["blocks_per_scale"]))
    c, h, w = preset.model["image_shape"]
    training = preset.train_config(
        data="digits", data_dir=None, device=device, batch_size=batch, eval_every=0, dtype=dtype, **train_changes
    )
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (max(256, batch), c, h, w), dtype=torch.uint8, generator=generator)
    synthetic = ImageSet(name=f"synthetic-{preset_name}", split="train", images=images, levels=256)
    return Trainer(model, training, images=synthetic)


def measure_step(trainer: Trainer) -> dict[str, Any]:
    """Saved-tensor bytes of one forward + backward of ``trainer``'s model on one batch (no optimizer step)."""
    batch = trainer._next_batch()
    if trainer._needs_actnorm_init():
        trainer._initialize_actnorm(batch)  # as the first step does, without a graph
    size = batch[0].shape[0]
    state = [*trainer.flow.parameters(), *trainer.flow.buffers()]
    meter = SavedTensorMeter({t.untyped_storage().data_ptr() for t in state})
    t0 = time.perf_counter()
    with meter.hooks():
        loss = trainer._loss_sum(batch) / size
    forward_s = time.perf_counter() - t0
    live, peak, live_state = meter.live, meter.peak, meter.live_state
    t0 = time.perf_counter()
    loss.backward()
    backward_s = time.perf_counter() - t0
    del loss
    return {
        "batch": size,
        "live_bytes": live,
        "model_state_bytes": live_state,
        "peak_bytes": peak,
        "packed_bytes": meter.packed_total,
        "live_mib_per_image": live / size / MIB,
        "live_with_model_state_mib_per_image": (live + live_state) / size / MIB,
        "peak_mib_per_image": peak / size / MIB,
        "forward_s": forward_s,
        "backward_s": backward_s,
        "left_after_backward": meter.live,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper-cifar10")
    parser.add_argument("--blocks", type=int, default=1, help="blocks per scale")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--label", default="", help="a note stored with the result (e.g. 'before')")
    parser.add_argument("--out", default=str(common.RESULTS_DIR / "saved_tensors"))
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    torch.manual_seed(0)
    trainer = synthetic_trainer(args.preset, args.blocks, args.batch)
    result = measure_step(trainer)
    info = common.machine_info()
    md = [
        "# Saved tensors of one training step",
        "",
        *common.machine_header(info, [common.command_line()]),
        "",
        f"{args.preset} with {args.blocks} block(s) per scale, batch {args.batch}, float32, CPU, synthetic images"
        + (f" ({args.label})" if args.label else "")
        + ":",
        "",
        f"- saved for backward when the loss is ready, parameters and buffers left out: "
        f"**{result['live_mib_per_image']:.1f} MiB per image** ({result['live_bytes'] / MIB:.0f} MiB in all)",
        f"- the same with the parameters and buffers that autograd saves: "
        f"{result['live_with_model_state_mib_per_image']:.1f} MiB per image "
        f"({result['model_state_bytes'] / MIB:.0f} MiB of model state)",
        f"- peak of saved tensors alive during the forward pass (model state left out): "
        f"{result['peak_mib_per_image']:.1f} MiB per image",
        f"- every pack, duplicates included: {result['packed_bytes'] / MIB:.0f} MiB",
        f"- forward {result['forward_s']:.1f} s, backward {result['backward_s']:.1f} s (a shared 2-core machine)",
    ]
    md_path, json_path = common.write_results(
        args.out, md, {"machine": info, "preset": args.preset, "blocks": args.blocks, "label": args.label, **result}
    )
    print("\n".join(md))
    print(f"wrote {md_path} and {json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
