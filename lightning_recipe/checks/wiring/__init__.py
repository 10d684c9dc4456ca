"""``WiringCheck``: the callback and its hooks (``check``), its rules (``rules``), what it reads (``probes``)."""

from lightning_recipe.checks.wiring.check import WiringCheck

__all__ = ["WiringCheck"]
