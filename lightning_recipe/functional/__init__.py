"""Pure math of the recipe, one module per family: tensors in, numbers out, no Lightning, doctested.

``constants`` (the best input-independent prediction and its loss), ``loss_decrease`` (the loss-curve tests),
``data`` (row hashes, duplicates, scale, token alignment), ``input_dependence``, ``generalization``,
``optimization``, ``output_range``, ``wiring``, ``batch_independence``, ``parameter_updates``, ``reproducibility``,
``prediction`` and ``activations``; the names of ``constants`` and ``loss_decrease`` are also importable from here.

Every function here works on plain tensors in a *canonical layout* and is tested against closed forms:

* multiclass targets: class indices ``(M,)`` (or class probabilities ``(M, C)``), outputs ``(M, C)`` logits;
* binary / multilabel targets: ``(M, L)`` in ``{0, 1}``, outputs ``(M, L)`` logits;
* regression targets: ``(M, D)``, outputs ``(M, D)``.

A *constant prediction* is one vector ``c`` of size ``C``/``L``/``D`` repeated for every example: what a network
outputs when its head bias is ``c`` and its weights contribute nothing. One definition serves the bias
initialisation (the ``c`` that minimises the loss), the expected initial loss (the loss at the current bias) and
the plateau diagnosis (the loss of the best ``c``: everything a model can learn from the label prior alone).
"""

from lightning_recipe.functional.constants import (
    LabelStats,
    LossFn,
    constant_loss,
    entropy,
    log_odds,
    log_prior,
    noise_band,
    numeric_constant,
    optimal_constant,
)
from lightning_recipe.functional.loss_decrease import (
    above_prior_test,
    decrease_test,
    diverged,
    plateau_test,
    trend,
)

__all__ = [
    "LabelStats",
    "LossFn",
    "above_prior_test",
    "constant_loss",
    "decrease_test",
    "diverged",
    "entropy",
    "log_odds",
    "log_prior",
    "noise_band",
    "numeric_constant",
    "optimal_constant",
    "plateau_test",
    "trend",
]
