"""Generalization math: a fit's bias/variance verdict from its train and validation shares of the gain."""

from __future__ import annotations


def bias_variance(train_share: float, val_share: float, bias_threshold: float = 0.5, variance_gap: float = 0.25) -> str:
    """The bias/variance verdict from the share of the constant prediction's loss left on training and validation.

    ``r = (L - floor) / (P - floor)``: 0 is a perfect fit, 1 is no better than the label prior. High bias: the
    training share is above ``bias_threshold``; high variance: validation keeps ``variance_gap`` more of it than
    training.

    Example::

        >>> bias_variance(0.1, 0.15), bias_variance(0.7, 0.75), bias_variance(0.05, 0.6), bias_variance(0.6, 0.95)
        ('neither', 'high bias', 'high variance', 'high bias and high variance')
    """
    bias = not train_share <= bias_threshold  # NaN (no learnable signal measured) counts as bias
    variance = val_share - train_share > variance_gap
    return ("high bias and high variance" if bias and variance else "high bias" if bias else
            "high variance" if variance else "neither")
