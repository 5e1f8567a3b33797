"""``python -m monoflow_studio`` and the ``monoflow-studio`` console script: launch the studio."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Launch the studio (see :func:`monoflow_studio.app.main`); importable without a display."""
    from .app import main as app_main

    return app_main(argv)


if __name__ == "__main__":
    sys.exit(main())
