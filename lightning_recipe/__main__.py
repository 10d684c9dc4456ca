"""``python -m lightning_recipe`` / ``lightning-recipe``: command-line entry point."""

from __future__ import annotations

import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``lightning-recipe`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    print("usage: lightning-recipe preflight MODULE:Model MODULE:DataModule")
    return 2 if argv else 0


if __name__ == "__main__":
    sys.exit(main())
