"""``python -m monoflow_studio`` / ``monoflow-studio``: the studio is not built yet (tracked as its own issue)."""

import sys


def main() -> int:
    """Explain that the studio is not built yet and point at the working command line."""
    print(
        "monoflow studio: the studio is not built yet. The engine and the `monoflow` command work today:\n"
        "  monoflow train --data 8gaussians --out runs/demo",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
