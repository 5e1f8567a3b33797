"""The ``monoflow`` entry point: parse, run the subcommand, and turn its failures into exit statuses."""

from __future__ import annotations

import os
import sys

from ..checkpoint import CheckpointError
from ..fused import COMPILER
from ..runtime import tune_allocator
from .errors import (
    DEBUG_ENV,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    PROG,
    CLIError,
    _describe_error,
    _error,
    _one_line,
    _out_of_memory,
)
from .parser import build_parser


def _kernel_notice(text: str) -> None:
    """Print a notice of the compiled kernels (``monoflow_core.fused.COMPILER.notice``) on stderr, above any
    progress bar."""
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the ``monoflow`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    0: success; 1: training diverged or nothing to list; 2: a user error (one ``monoflow: error:`` line on
    stderr); 130: interrupted by Ctrl-C (a training run saves its checkpoint first).
    """
    tune_allocator()  # mid-sized temporaries from the heap, not fresh mmaps (monoflow_core.runtime)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except CLIError as err:
        _error(str(err))
        return err.code
    except SystemExit as exc:  # --help, --version
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_USAGE)
    if args.command == "train" and args.resume is None and args.out is None:
        _error("train: --out DIR is required for a new run (see 'monoflow train --help')")
        return EXIT_USAGE
    debug = bool(os.environ.get(DEBUG_ENV))
    previous_notice = COMPILER.notice
    COMPILER.notice = _kernel_notice  # say when the kernels are compiled, and when they are ready
    try:
        return int(args.handler(args))
    except CLIError as err:
        if debug:
            raise
        _error(str(err))
        return err.code
    except (CheckpointError, ValueError, OSError) as err:
        if debug:
            raise
        _error(_describe_error(err))
        return EXIT_USAGE
    except (MemoryError, RuntimeError) as err:
        # Sizes are checked up front (monoflow_core.resources), but those checks are estimates: a request that
        # passed them and still exhausted memory is reported as such, in one line, rather than as a crash.
        if debug or not _out_of_memory(err):
            raise
        _error(
            f"out of memory ({_one_line(str(err)) or type(err).__name__}); use smaller sizes (--n, --batch-size, "
            "--test-size, --resolution, ...)"
        )
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        COMPILER.notice = previous_notice
