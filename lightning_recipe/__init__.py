"""lightning_recipe: PyTorch Lightning callbacks that make the silent failures of neural-net training loud."""

from lightning_recipe._base import RecipeCheck
from lightning_recipe.exceptions import RecipeCheckError, RecipeConfigError, RecipeWarning
from lightning_recipe.findings import Finding, collect_findings
from lightning_recipe.head_bias import HeadBiasInit
from lightning_recipe.initial_loss import InitialLossCheck
from lightning_recipe.loss_decrease import LossDecreaseCheck
from lightning_recipe.prediction_dynamics import PredictionDynamics
from lightning_recipe.presets import recommended, strict

__version__ = "0.1.0"

__all__ = [
    "Finding",
    "HeadBiasInit",
    "InitialLossCheck",
    "LossDecreaseCheck",
    "PredictionDynamics",
    "RecipeCheck",
    "RecipeCheckError",
    "RecipeConfigError",
    "RecipeWarning",
    "collect_findings",
    "recommended",
    "strict",
]
