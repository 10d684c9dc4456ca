"""``python -m lightning_recipe`` / ``lightning-recipe``: command-line entry point."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

_HELP = """\
usage: lightning-recipe COMMAND ...

commands:
  preflight MODEL [DATA] [options]   run the recipe's early checks on your LightningModule in seconds;
                                     exit code 1 when a check fails (for CI). `lightning-recipe preflight -h`

example:
  lightning-recipe preflight examples/preflight_demo.py:Model examples/preflight_demo.py:DataModule
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``lightning-recipe`` command; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_HELP)
        return 0 if args else 2
    if args[0] == "--version":
        from lightning_recipe import __version__

        print(f"lightning-recipe {__version__}")
        return 0
    if args[0] == "preflight":
        from lightning_recipe.preflight import main as preflight_main

        return preflight_main(args[1:])
    print(f"lightning-recipe: unknown command {args[0]!r}\n\n{_HELP}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
