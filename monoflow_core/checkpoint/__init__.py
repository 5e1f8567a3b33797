"""Safe, atomic, versioned checkpoints: one safetensors file per checkpoint, never a pickle.

Layout of a checkpoint file (the `safetensors <https://huggingface.co/docs/safetensors>`_ format: an 8-byte
header length, a JSON header, raw tensor bytes):

* tensors, under prefixed keys: ``flow.<name>`` (the flow's ``state_dict`` including buffers such as the
  spectral-norm vectors ``u, v`` and ActNorm's ``initialized``), and for a training run ``optim.state.<i>.<key>``
  (Adam moments), ``ema.<name>`` (EMA weights) and ``rng.torch`` / ``rng.noise`` / ``rng.cuda`` (generator
  states, uint8); a run on a user's points also stores them as ``data.train``, ``data.test``, ``data.mean`` and
  ``data.scale`` (float64, :class:`~monoflow_core.data.points.PointSet`), described by the ``points`` metadata entry;
* string metadata: ``format`` (:data:`FORMAT_TAG`), ``monoflow_version``, ``torch_version``, ``created``,
  ``dtype``, ``model_config`` (the :class:`~monoflow_core.config.FlowConfig` as JSON), and for a training run
  ``train_config`` and ``trainer_state`` (everything of :meth:`Trainer.state_dict` that is not a tensor: step,
  data-stream states, optimizer param groups, metric histories ...), plus ``metadata`` (JSON: step, data set,
  latest metrics, the caller's own entries).

Loading checks the whole file before it builds anything: the safetensors framing and tensor table, the type of
every metadata entry, both configurations (through their classes' validation), the flow's expected tensor names,
shapes and dtypes (derived from the configuration on PyTorch's ``meta`` device, which allocates no memory) against
the stored ones, and for a training run the optimizer state, the EMA weights, the random-generator states and the
trainer's bookkeeping. Only then are the tensors read and the flow rebuilt with
:func:`~monoflow_core.models.build_flow`; nothing is ever unpickled (no ``torch.load``), so a checkpoint cannot run
code, and a crafted header (``blocks = 10**9``, a width of ``10**7``, a wrong-sized generator state, metadata of
the wrong JSON type) gives one :class:`CheckpointError` naming the file and the field, not a traceback or a
gigabyte allocation. Writing is atomic: the bytes go to a temporary file in the target's directory, are flushed
and fsync'ed, and replace the target with ``os.replace``; a failure leaves any previous checkpoint intact and no
temporary file behind (and the next save removes those of killed processes, :mod:`monoflow_core.fileio`).

The package's modules, one job each: :mod:`~monoflow_core.checkpoint.header` (format tag, limits, the safetensors
header), :mod:`~monoflow_core.checkpoint.metadata` (the JSON entries), :mod:`~monoflow_core.checkpoint.plan` (the
flow's expected tensors, from a shape-only build), :mod:`~monoflow_core.checkpoint.trainer_state` (a training run's
state), :mod:`~monoflow_core.checkpoint.save` and :mod:`~monoflow_core.checkpoint.load`; the error type and the
quoting of file values in messages are in :mod:`~monoflow_core.checkpoint.errors`.
"""

from .errors import CheckpointError
from .header import FORMAT_TAG, MAX_HEADER_BYTES
from .load import Checkpoint, load_checkpoint
from .metadata import read_checkpoint_metadata
from .save import TrainingRun, save_checkpoint

__all__ = [
    "FORMAT_TAG",
    "MAX_HEADER_BYTES",
    "Checkpoint",
    "CheckpointError",
    "TrainingRun",
    "load_checkpoint",
    "read_checkpoint_metadata",
    "save_checkpoint",
]
