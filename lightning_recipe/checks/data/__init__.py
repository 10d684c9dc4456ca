"""``DataCheck``: the callback, its hooks and the data scan (``check``), its rules (``rules``)."""

from lightning_recipe.checks.data.check import DataCheck

__all__ = ["DataCheck"]
