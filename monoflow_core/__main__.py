"""``python -m monoflow_core``: the ``monoflow`` command (see :mod:`monoflow_core.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
