"""lightning_recipe: PyTorch Lightning callbacks that make the silent failures of neural-net training loud."""

from lightning_recipe._base import RecipeCheck
from lightning_recipe.activations import ActivationCheck
from lightning_recipe.batch_independence import BatchIndependenceCheck
from lightning_recipe.data_checks import DataCheck
from lightning_recipe.exceptions import RecipeCheckError, RecipeConfigError, RecipeWarning
from lightning_recipe.findings import Finding, collect_findings
from lightning_recipe.generalization import GeneralizationCheck
from lightning_recipe.head_bias import HeadBiasInit
from lightning_recipe.initial_loss import InitialLossCheck
from lightning_recipe.input_dependence import InputDependenceCheck
from lightning_recipe.loss_decrease import LossDecreaseCheck
from lightning_recipe.optimization import OptimizationHealthCheck
from lightning_recipe.output_range import OutputRangeCheck
from lightning_recipe.overfit import overfit_one_batch
from lightning_recipe.parameter_updates import ParameterUpdateCheck
from lightning_recipe.prediction_dynamics import PredictionDynamics
from lightning_recipe.presets import Recipe, recommended, strict
from lightning_recipe.reproducibility import ReproducibilityCheck
from lightning_recipe.wiring import WiringCheck

__version__ = "0.1.0"

__all__ = [
    "ActivationCheck",
    "BatchIndependenceCheck",
    "DataCheck",
    "Finding",
    "GeneralizationCheck",
    "HeadBiasInit",
    "InitialLossCheck",
    "InputDependenceCheck",
    "LossDecreaseCheck",
    "OptimizationHealthCheck",
    "OutputRangeCheck",
    "ParameterUpdateCheck",
    "PredictionDynamics",
    "Recipe",
    "RecipeCheck",
    "RecipeCheckError",
    "RecipeConfigError",
    "RecipeWarning",
    "ReproducibilityCheck",
    "WiringCheck",
    "collect_findings",
    "overfit_one_batch",
    "recommended",
    "strict",
]
