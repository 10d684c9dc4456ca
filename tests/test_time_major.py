"""Sequence models without ``batch_first``: outputs ``(T, N, C)`` for targets ``(N, T)``."""

import math

import lightning as L
import pytest
import torch
from helpers import loader, trainer
from test_no_false_alarms import _TimeMajor
from torch import nn

import lightning_recipe as lr
from lightning_recipe._core.conventions import resolve_task
from lightning_recipe.exceptions import RecipeConfigError


def test_time_major_layout_is_put_in_the_targets_order():
    logits = torch.randn(7, 3, 5)  # (T, N, C)
    y = torch.randint(0, 5, (3, 7))  # (N, T)
    spec = resolve_task(nn.CrossEntropyLoss(), logits, y)
    assert spec.time_major and spec.num_outputs == 5
    canon = spec.canonical_outputs(logits)
    assert torch.equal(canon[2 * 7 + 4], logits[4, 2])  # example 2, position 4 is row 2 * T + 4, like its target
    assert spec.canonical_targets(y)[2 * 7 + 4] == y[2, 4]
    assert not resolve_task(nn.CrossEntropyLoss(), torch.randn(3, 7, 5), y).time_major  # (N, T, C): batch first
    with pytest.raises(RecipeConfigError, match=r"\(T, N, C\) with \(N, T\)"):
        resolve_task(nn.CrossEntropyLoss(), torch.randn(4, 4, 5), torch.randint(0, 5, (4, 6)))


class _Misaligned(_TimeMajor):
    """The bug: (T, N, C) logits flattened as they are against (N, T) targets, so position t of example n is scored
    against the target of another position."""

    def compute_loss(self, batch):
        x, y = batch
        return self.loss_fn(self(x).reshape(-1, 6), y.reshape(-1))


def test_misaligned_time_major_logits_plateau_at_the_label_entropy(tmp_path):
    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (768, 10), generator=g)
    y = (x + 1) % 6
    t = trainer(tmp_path, lr.recommended(), max_epochs=6)
    with pytest.warns(lr.RecipeWarning, match="learned only the label prior"):
        t.fit(_Misaligned(), loader(x[:640], y[:640]), loader(x[640:], y[640:], shuffle=False))
    findings = {f.check: f for f in lr.collect_findings(t)}
    p = torch.bincount(y[:640].reshape(-1), minlength=6).double() / y[:640].numel()
    entropy = float(-(p * p.log()).sum())  # the loss of the best constant prediction: the label entropy
    assert entropy == pytest.approx(math.log(6), abs=5e-3)
    plateau = findings["LossDecreaseCheck.plateau"]
    assert plateau.status == "fail" and plateau.expected == pytest.approx(entropy, rel=1e-4)
    assert plateau.measured == pytest.approx(entropy, abs=0.02)
    assert findings["InitialLossCheck"].status == "pass"  # the layout was understood: every check ran
    assert not [f for f in findings.values() if "Cannot match" in f.message]
