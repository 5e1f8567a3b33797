"""The ``monoflow`` command: train, evaluate, sample from and draw Monotone Flows from the shell.

Subcommands (``monoflow SUBCOMMAND --help`` for each):

* ``train``: train on a toy density, the 1-D staircase or images from a shipped preset (the paper's protocols,
  docs/algorithm.md §§9.1, 9.2, 9.3), with flags overriding the preset; writes ``config.json``, ``metrics.csv`` and a
  resumable ``checkpoint.safetensors`` into an output folder; Ctrl-C saves a checkpoint and exits 130. Under
  ``torchrun`` it trains data-parallel (:mod:`monoflow_core.distributed`).
* ``eval``: test NLL in nats (test MSE for the staircase, bits/dim for images) on the fixed, seeded test set.
* ``sample``: model samples as ``.npy``, a 2-D histogram ``.png`` or, for images, a ``.png`` sample grid.
* ``density``: the log-density on a grid as ``.npy`` or a heat map ``.png``.
* ``warmup``: compile the engine's kernels ahead of time (:mod:`monoflow_core.warmup`).
* ``presets``: the shipped presets.

The command adds no mathematics: it drives :class:`~monoflow_core.training.Trainer` and the functions of
:mod:`monoflow_core.evaluation`. User mistakes (a missing or corrupt file, an unknown name, a value out of range,
an unwritable path, a FIFO or device given as a file) end with one line ``monoflow: error: ...`` on stderr and
exit status 2; anything else is a bug and keeps its traceback (set ``MONOFLOW_DEBUG=1`` to get tracebacks for user
errors too).

Resources are checked before they are spent (:mod:`monoflow_core.resources`): every size (points, batch, blocks,
grid resolution, image size, threads) is compared with this machine's memory, disk and cores, and a request that
cannot fit is refused naming the flag and the estimated need. Large outputs are streamed: ``sample`` and
``density`` write ``.npy`` files a piece at a time (bounded memory; only the disk limits them) with a progress bar.
Output that is not finite (samples or log-densities of a diverged solve) is an error (exit status 1), never a file
written with exit status 0, and running out of memory anyway is one line with exit status 1. ``train`` holds an
advisory lock on its output folder (:mod:`monoflow_core.runlock`), so two runs never write into one folder.

The package's modules: :mod:`~monoflow_core.cli.entry` (:func:`main`), :mod:`~monoflow_core.cli.parser`
(:func:`build_parser`), one module per subcommand (:mod:`~monoflow_core.cli.train` with
:mod:`~monoflow_core.cli.train_setup` and :mod:`~monoflow_core.cli.run_folder`, :mod:`~monoflow_core.cli.evaluate`,
:mod:`~monoflow_core.cli.sample`, :mod:`~monoflow_core.cli.density`, :mod:`~monoflow_core.cli.utility`), and what
they share: :mod:`~monoflow_core.cli.errors`, :mod:`~monoflow_core.cli.options`, :mod:`~monoflow_core.cli.paths`,
:mod:`~monoflow_core.cli.datasets`, :mod:`~monoflow_core.cli.points`, :mod:`~monoflow_core.cli.loading`,
:mod:`~monoflow_core.cli.outputs` and :mod:`~monoflow_core.cli.report`.
"""

from .entry import main
from .parser import build_parser

__all__ = ["build_parser", "main"]
