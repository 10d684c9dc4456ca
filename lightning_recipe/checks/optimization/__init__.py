"""``OptimizationHealthCheck``: the callback and its hooks (``check``), its five rules (``rules``)."""

from lightning_recipe.checks.optimization.check import OptimizationHealthCheck

__all__ = ["OptimizationHealthCheck"]
