"""``python -m monoflow_core.cli``: the ``monoflow`` command (as ``python -m monoflow_core``)."""

import sys

from .entry import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
