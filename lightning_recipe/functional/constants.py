"""The constant prediction: label statistics, the best input-independent output, its loss, the noise band."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from lightning_recipe._core.dtypes import wide


LossFn = Callable[[Tensor, Tensor], Tensor]


_ABSENT = 0.5  # pseudo-count given to a class or label value that never occurs (keeps the bias finite)


@dataclass
class LabelStats:
    """Label statistics of the training set, in the canonical layout.

    Attributes:
        task: ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``"regression"``.
        count: number of labelled positions seen (ignored positions excluded).
        class_counts: ``(C,)`` class counts (sums of probabilities for soft targets), multiclass only.
        positives: ``(L,)`` number of positive labels, binary/multilabel only.
        mean: ``(D,)`` target mean, regression only.
        var: ``(D,)`` target variance (population), regression only.
        sample: a bounded sample of canonical targets, used for medians and numeric minimisation.
        source: how the labels were read (``"dataset.targets"``, ``"TensorDataset"``, ``"dataloader"``, ...).
    """

    task: str
    count: int
    sample: Tensor
    class_counts: Optional[Tensor] = None
    positives: Optional[Tensor] = None
    mean: Optional[Tensor] = None
    var: Optional[Tensor] = None
    source: str = ""

    def summary(self) -> dict:
        """Plain numbers for the report."""
        out: dict = {"task": self.task, "count": self.count, "source": self.source}
        for name in ("class_counts", "positives", "mean", "var"):
            v = getattr(self, name)
            if v is not None:
                out[name] = [round(float(x), 6) for x in v.flatten()[:64]]
        return out


def log_prior(class_counts: Tensor, weight: Optional[Tensor] = None, label_smoothing: float = 0.0) -> Tensor:
    """Logits of the constant prediction that minimises the cross-entropy: ``log q``.

    ``q_j ∝ n_j w_j`` with class weights, ``q = (1 - ε) p + ε / C`` with label smoothing ``ε``. A class that never
    occurs gets a pseudo-count of 0.5, so its logit is finite.

    Args:
        class_counts: ``(C,)`` counts of each class.
        weight: the loss's class weights, if any.
        label_smoothing: the loss's label smoothing.

    Example::

        >>> log_prior(torch.tensor([1.0, 3.0])).exp()
        tensor([0.2500, 0.7500])
    """
    n = wide(class_counts).clamp_min(0)
    n = torch.where(n > 0, n, torch.full_like(n, _ABSENT))
    if weight is not None:
        n = n * wide(weight.to(n.device))
    p = n / n.sum()
    if label_smoothing:
        p = (1 - label_smoothing) * p + label_smoothing / p.numel()
    return p.log().float()


def log_odds(positives: Tensor, count: int, pos_weight: Optional[Tensor] = None) -> Tensor:
    """Logits of the constant prediction that minimises the binary cross-entropy with logits.

    ``log(w p / (1 - p))`` per label, with ``w`` the ``pos_weight`` (1 without one). Labels that are always or never
    positive get a pseudo-count of 0.5, so the logit is finite.

    Args:
        positives: ``(L,)`` number of positives per label.
        count: number of examples.
        pos_weight: the loss's ``pos_weight``, if any.

    Example::

        >>> log_odds(torch.tensor([10.0]), 100)  # p = 0.1
        tensor([-2.1972])
    """
    pos = wide(positives).clamp(_ABSENT, count - _ABSENT) if count > 1 else wide(positives).clamp(0.25, 0.75)
    p = pos / max(count, 1)
    w = 1.0 if pos_weight is None else wide(pos_weight.to(p.device))
    return (w * p / (1 - p)).log().float()


def entropy(class_counts: Tensor) -> float:
    """Entropy (nats) of the label distribution: the cross-entropy of the prior prediction.

    Example::

        >>> round(entropy(torch.tensor([5.0, 5.0])), 6) == round(math.log(2), 6)
        True
    """
    p = wide(class_counts) / wide(class_counts).sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def constant_loss(loss: LossFn, constant: Tensor, targets: Tensor) -> float:
    """The loss of predicting ``constant`` for every target.

    Args:
        loss: a loss on canonical ``(outputs, targets)``.
        constant: ``(K,)`` prediction.
        targets: canonical targets (``(M,)`` class indices or ``(M, K)``).

    Example::

        >>> round(constant_loss(torch.nn.CrossEntropyLoss(), torch.zeros(4), torch.tensor([0, 1, 2, 3])), 4)
        1.3863
    """
    out = constant.float().reshape(1, -1).expand(targets.shape[0], -1)
    with torch.no_grad():
        return float(loss(out, targets))


def numeric_constant(loss: LossFn, targets: Tensor, init: Tensor, max_iter: int = 200) -> Tensor:
    """Minimise ``loss`` over one constant vector by L-BFGS, starting at ``init``.

    Used for losses without a closed form (Huber, class weights together with label smoothing, a user's callable).

    Example::

        >>> y = torch.tensor([[0.0], [0.0], [10.0]])
        >>> c = numeric_constant(torch.nn.MSELoss(), y, torch.zeros(1))
        >>> round(float(c), 3)
        3.333
    """
    c = init.detach().float().clone().reshape(-1).requires_grad_(True)
    opt = torch.optim.LBFGS([c], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        value = loss(c.reshape(1, -1).expand(targets.shape[0], -1), targets)
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(closure)
    return c.detach()


def optimal_constant(
    task: str,
    stats: LabelStats,
    loss: LossFn,
    loss_name: str = "",
    weight: Optional[Tensor] = None,
    label_smoothing: float = 0.0,
    pos_weight: Optional[Tensor] = None,
) -> tuple[Tensor, str]:
    """The constant prediction that minimises the loss on the training labels, and how it was found.

    Closed forms: ``log p`` for cross-entropy (class weights or label smoothing included), log-odds for BCE with
    logits (``pos_weight`` included), mean for MSE, median for L1. Anything else is minimised numerically on the
    label sample, starting from the closed form of the same task.

    Args:
        task: the task.
        stats: label statistics.
        loss: the loss on canonical ``(outputs, targets)``.
        loss_name: the loss class name (``"CrossEntropyLoss"``, ...); an unknown name means numeric.
        weight: class weights of a cross-entropy loss.
        label_smoothing: label smoothing of a cross-entropy loss.
        pos_weight: ``pos_weight`` of a BCE-with-logits loss.

    Example::

        >>> s = LabelStats("regression", 3, torch.tensor([[1.0], [2.0], [6.0]]), mean=torch.tensor([3.0]))
        >>> optimal_constant("regression", s, torch.nn.L1Loss(), "L1Loss")
        (tensor([2.]), 'median')
    """
    if task == "multiclass":
        assert stats.class_counts is not None
        closed = loss_name in ("CrossEntropyLoss", "NLLLoss")
        if closed and not (weight is not None and label_smoothing):
            return log_prior(stats.class_counts, weight, label_smoothing), "log class prior"
        init = log_prior(stats.class_counts)
        return numeric_constant(loss, stats.sample, init), "numeric"
    if task in ("binary", "multilabel"):
        assert stats.positives is not None
        init = log_odds(stats.positives, stats.count, pos_weight)
        if loss_name in ("BCEWithLogitsLoss", "BCELoss"):  # BCELoss: the log-odds before the model's sigmoid
            return init, "log-odds"
        return numeric_constant(loss, stats.sample, init), "numeric"
    assert stats.mean is not None
    if loss_name == "MSELoss":
        return stats.mean.float(), "mean"
    if loss_name == "L1Loss":
        return stats.sample.float().median(dim=0).values, "median"
    return numeric_constant(loss, stats.sample.float(), stats.mean.float()), "numeric"


def noise_band(
    loss: LossFn, constant: Tensor, targets: Tensor, sigma: float, draws: int = 64, seed: int = 0
) -> tuple[float, float]:
    """Mean and standard deviation of the loss when the outputs are ``constant`` plus i.i.d. ``N(0, sigma²)`` noise.

    A model at initialisation outputs its head bias plus input-dependent deviations; this is the loss such a model
    would have if the deviations carried no information about the labels. It sets the tolerance of the initial-loss
    check in the loss's own units, for any loss, without a table of constants. Uses a private generator (no global
    random state is touched).

    Example::

        >>> mean, sd = noise_band(torch.nn.MSELoss(), torch.zeros(1), torch.zeros(1000, 1), sigma=2.0)
        >>> abs(mean - 4.0) < 0.2
        True
    """
    gen = torch.Generator().manual_seed(seed)
    t = targets.cpu()
    m, k = t.shape[0], constant.numel()
    draws = int(max(8, min(draws, 4_000_000 // max(1, m * k))))
    base = constant.float().cpu().reshape(1, -1)
    values = []
    with torch.no_grad():
        for _ in range(draws):
            noise = torch.randn(m, k, generator=gen) * sigma
            values.append(float(loss(base + noise, t)))
    v = torch.tensor(values, dtype=torch.float64)
    return float(v.mean()), float(v.std()) if len(values) > 1 else 0.0
