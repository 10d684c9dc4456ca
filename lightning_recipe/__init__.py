"""lightning_recipe: PyTorch Lightning callbacks that make the silent failures of neural-net training loud."""

from lightning_recipe._core.base import RecipeCheck
from lightning_recipe.checks.activations import ActivationCheck
from lightning_recipe.checks.batch_independence import BatchIndependenceCheck
from lightning_recipe.checks.data import DataCheck
from lightning_recipe.exceptions import RecipeCheckError, RecipeConfigError, RecipeSkipNotice, RecipeWarning
from lightning_recipe.findings import Finding, collect_findings
from lightning_recipe.checks.generalization import GeneralizationCheck
from lightning_recipe.checks.head_bias import HeadBiasInit
from lightning_recipe.checks.initial_loss import InitialLossCheck
from lightning_recipe.checks.input_dependence import InputDependenceCheck
from lightning_recipe.checks.loss_decrease import LossDecreaseCheck
from lightning_recipe.checks.optimization import OptimizationHealthCheck
from lightning_recipe.checks.output_range import OutputRangeCheck
from lightning_recipe.overfit import overfit_one_batch
from lightning_recipe.checks.parameter_updates import ParameterUpdateCheck
from lightning_recipe.checks.prediction_dynamics import PredictionDynamics
from lightning_recipe.presets import Recipe, recommended, strict
from lightning_recipe.checks.reproducibility import ReproducibilityCheck
from lightning_recipe.checks.wiring import WiringCheck
from lightning_recipe.report.live import set_live_figures

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
    "RecipeSkipNotice",
    "RecipeWarning",
    "ReproducibilityCheck",
    "WiringCheck",
    "collect_findings",
    "overfit_one_batch",
    "recommended",
    "set_live_figures",
    "strict",
]
