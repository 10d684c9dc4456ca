"""Dense outputs: one prediction per pixel or time step (autoencoders, segmentation, per-position regression).

A convolution's bias is per channel, so the constant prediction is one value per channel, pooled over positions:
per-pixel class log-frequencies, the log-odds of the pixel positive rate, the per-channel mean.
"""

import math
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from helpers import trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_recipe as lr
from lightning_recipe._core.conventions import resolve_task

N_TRAIN, BATCH = 256, 32


class Dense(L.LightningModule):
    """A tiny fully convolutional net; ``squeeze`` drops the channel of one-channel logits for ``(N, H, W)`` masks."""

    def __init__(self, net: nn.Module, loss_fn: nn.Module, squeeze: bool = False, lr: float = 1e-2) -> None:
        super().__init__()
        self.net, self.loss_fn, self.squeeze, self.lr = net, loss_fn, squeeze, lr

    def forward(self, x):
        return self.net(x)

    def _loss(self, batch):
        x, y = batch
        out = self(x)
        return self.loss_fn(out.squeeze(1) if self.squeeze else out, y)

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _conv2d(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, c_out, 1))


def _images(n: int = N_TRAIN + 64, hw: int = 8, seed: int = 0) -> torch.Tensor:
    """Smooth random images ``(N, 1, H, W)``: blobs to segment."""
    g = torch.Generator().manual_seed(seed)
    return nn.functional.avg_pool2d(torch.randn(n, 1, hw, hw, generator=g), 3, 1, 1) * 3


def autoencoder():
    """sklearn's digits as 8x8 images in [0, 1], reconstructed (MSE, targets = inputs)."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images[: N_TRAIN + 64], dtype=torch.float32).unsqueeze(1) / 16.0
    return Dense(_conv2d(1, 1), nn.MSELoss()), x, x


def multiclass_segmentation():
    """Three imbalanced classes per pixel: CrossEntropyLoss on (N, 3, H, W) logits vs (N, H, W) class maps."""
    x = _images()
    return Dense(_conv2d(1, 3), nn.CrossEntropyLoss()), x, torch.bucketize(x[:, 0], torch.tensor([-0.5, 0.8]))


def binary_segmentation():
    """One logit per pixel: BCEWithLogitsLoss on (N, 1, H, W) 0/1 masks (about 1 pixel in 4 positive)."""
    x = _images()
    return Dense(_conv2d(1, 1), nn.BCEWithLogitsLoss()), x, (x > 0.7).float()


def binary_segmentation_hw():
    """The same with (N, H, W) masks: training_step squeezes the logits' channel."""
    x = _images()
    return Dense(_conv2d(1, 1), nn.BCEWithLogitsLoss(), squeeze=True), x, (x[:, 0] > 0.7).float()


def regression_1d(n: int = N_TRAIN + 64, length: int = 32):
    """A 1-D conv predicting a smoothed signal at every position, (N, 1, L), offset 3."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, length, generator=g)
    y = nn.functional.avg_pool1d(x, 5, 1, 2) * 2 + 3.0
    net = nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), nn.ReLU(), nn.Conv1d(8, 1, 3, padding=1))
    return Dense(net, nn.MSELoss()), x, y


def _closed_form(case: str, y: torch.Tensor, y_batch: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """(bias, loss of that constant on all training labels, on the first batch) from the labels alone."""
    if case == "multiclass_segmentation":
        p = torch.bincount(y.reshape(-1), minlength=3).double() / y.numel()
        return p.log(), float(-(p * p.log()).sum()), float(-p.log()[y_batch.reshape(-1)].mean())
    if case.startswith("binary"):
        p = float(y.double().mean())
        yb = y_batch.double()
        batch = float(-(yb * math.log(p) + (1 - yb) * math.log(1 - p)).mean())
        return torch.tensor([math.log(p / (1 - p))]), -(p * math.log(p) + (1 - p) * math.log(1 - p)), batch
    m = y.double().mean()
    return m.reshape(1), float(((y.double() - m) ** 2).mean()), float(((y_batch.double() - m) ** 2).mean())


CASES = {"autoencoder": autoencoder, "multiclass_segmentation": multiclass_segmentation,
         "binary_segmentation": binary_segmentation, "binary_segmentation_hw": binary_segmentation_hw,
         "regression_1d": regression_1d}


def _fit(tmp_path, model, x, y, callbacks, epochs: int):
    t = trainer(tmp_path, callbacks, max_epochs=epochs)
    train = DataLoader(TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), batch_size=BATCH, shuffle=False)
    val = DataLoader(TensorDataset(x[N_TRAIN:], y[N_TRAIN:]), batch_size=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(model, train, val)
    return t, [str(w.message) for w in caught if issubclass(w.category, lr.RecipeWarning)]


@pytest.mark.parametrize("preset", ["strict", "recommended"])
@pytest.mark.parametrize("case", list(CASES))
def test_healthy_dense_fit_starts_at_the_per_channel_constant_and_warns_nothing(tmp_path, case, preset):
    L.seed_everything(0)
    model, x, y = CASES[case]()
    head = model.net[-1]
    t, recipe_warnings = _fit(tmp_path, model, x, y, lr.strict() if preset == "strict" else lr.recommended(), 7)
    assert recipe_warnings == []
    findings = lr.collect_findings(t)
    assert not [f.message for f in findings if f.status in ("warn", "fail")]
    by = {f.check: f for f in findings}
    bias, population, first_batch = _closed_form(case, y[:N_TRAIN], y[:BATCH])
    # the head bias is one constant per channel: the closed form from the pixel statistics
    hb = by["HeadBiasInit"]
    assert hb.status == "pass" and len(hb.details["bias"]) == head.bias.numel() == bias.numel()
    assert torch.tensor(hb.details["bias"]).double() == pytest.approx(bias, abs=1e-4)
    assert hb.measured == pytest.approx(population, rel=1e-4)  # loss of that constant over every training pixel
    il = by["InitialLossCheck"]
    assert il.status == "pass"
    assert il.expected == pytest.approx(first_batch, rel=1e-4)  # the first batch's pixels, unshuffled loader
    assert il.details["population"] == pytest.approx(population, rel=1e-4)
    assert il.measured == pytest.approx(first_batch, rel=0.25)  # an untrained net outputs about its bias
    assert by["LossDecreaseCheck"].status == "pass"  # every check ran (56 batches): none was skipped for lack of steps
    assert by["LossDecreaseCheck"].measured < 0.5 * population  # it learned far more than the per-channel prior
    dependence = by["InputDependenceCheck"]
    assert dependence.status == "pass" and dependence.details["zeroed"] > dependence.details["real"]
    assert by["BatchIndependenceCheck"].status == "pass" and by["OutputRangeCheck"].status == "pass"
    # the prediction records hold one number per sample (and channel), not one per pixel, and the figure is drawn
    dynamics = next(cb for r in t.callbacks if isinstance(r, lr.Recipe) for cb in r.callbacks
                    if isinstance(cb, lr.PredictionDynamics))
    records = np.stack(dynamics.values)
    assert records.shape[1:] == ((16, 1) if y.is_floating_point() and "binary" not in case else (16,))
    assert np.isfinite(records).all() and dynamics.figures and by["PredictionDynamics"].status == "pass"


def test_dense_layouts_follow_the_heads_bias():
    mse = nn.MSELoss()
    conv = nn.Conv2d(4, 3, 1)
    s = resolve_task(mse, torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4, 5), head=conv)
    assert (s.num_outputs, s.channel_dim, s.positions, s.dense) == (3, 1, 20, True)
    out = torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
    assert torch.equal(s.canonical_outputs(out)[4 * 5 + 2 * 5 + 1], out[1, :, 2, 1])  # example 1, pixel (2, 1)
    assert torch.equal(s.canonical_targets(out)[4 * 5 + 2 * 5 + 1], out[1, :, 2, 1])
    # one logit per pixel, (N, H, W) masks: one constant shared by every pixel, a binary task
    s = resolve_task(nn.BCEWithLogitsLoss(), torch.zeros(2, 1, 4, 5), torch.zeros(2, 4, 5), head=nn.Conv2d(4, 1, 1))
    assert (s.task, s.num_outputs, s.positions) == ("binary", 1, 20)
    # a linear layer at every step of (N, T, C): its bias runs along the last dimension, also when T == C
    s = resolve_task(nn.BCEWithLogitsLoss(), torch.zeros(2, 3, 3), torch.zeros(2, 3, 3), head=nn.Linear(4, 3))
    assert (s.task, s.num_outputs, s.channel_dim, s.positions) == ("multilabel", 3, -1, 3)
    s = resolve_task(mse, torch.zeros(2, 3, 3), torch.zeros(2, 3, 3), head=nn.Conv1d(4, 3, 1))
    assert (s.num_outputs, s.channel_dim) == (3, 1)
    # a bias per output element (a linear layer reshaped to an image), flat outputs, or no head: one output each
    assert resolve_task(mse, torch.zeros(2, 1, 4, 5), torch.zeros(2, 1, 4, 5), head=nn.Linear(3, 20)).num_outputs == 20
    assert resolve_task(mse, torch.zeros(2, 6), torch.zeros(2, 6), head=nn.Linear(3, 6)).positions == 1
    assert resolve_task(mse, torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4, 5)).num_outputs == 60
    # class-index maps: positions counted, the class dimension as before
    s = resolve_task(nn.CrossEntropyLoss(), torch.zeros(2, 3, 4, 5), torch.zeros(2, 4, 5, dtype=torch.long))
    assert (s.num_outputs, s.class_dim, s.positions) == (3, 1, 20)


@pytest.mark.parametrize("case", ["multiclass_segmentation", "binary_segmentation"])
def test_segmentation_with_masks_shuffled_across_examples_plateaus_at_the_pixel_prior(tmp_path, case):
    """The bug: masks paired with the wrong images. Nothing but the pixel label frequencies can be learned, so the
    loss stays at the pixel label entropy (binary: the entropy of the pixel positive rate), and LossDecreaseCheck
    says the model learned only the label prior."""
    L.seed_everything(0)
    model, x, y = CASES[case]()
    y = y[torch.randperm(y.shape[0], generator=torch.Generator().manual_seed(1))]
    _, population, _ = _closed_form(case, y[:N_TRAIN], y[:BATCH])
    t, recipe_warnings = _fit(tmp_path, model, x, y, lr.recommended(), 8)
    assert any("learned only the label prior" in m for m in recipe_warnings)
    by = {f.check: f for f in lr.collect_findings(t)}
    assert by["InitialLossCheck"].status == "pass" and by["HeadBiasInit"].status == "pass"
    plateau = by["LossDecreaseCheck.plateau"]
    assert plateau.status == "fail" and plateau.expected == pytest.approx(population, rel=1e-4)
    assert plateau.measured == pytest.approx(population, rel=0.05)


def test_autoencoder_fed_zeros_instead_of_its_inputs_fails_input_dependence(tmp_path):
    """The bug: the loader yields blank inputs (a wrong transform) while the targets are the real images. The
    reconstruction cannot depend on the input: zeroing the (already zero) inputs changes nothing."""
    L.seed_everything(0)
    model, x, y = autoencoder()
    t, recipe_warnings = _fit(tmp_path, model, torch.zeros_like(x), y, lr.recommended(), 7)
    by = {f.check: f for f in lr.collect_findings(t)}
    dependence = by["InputDependenceCheck"]
    assert dependence.status == "fail" and dependence.details["max_output_change"] == 0.0
    assert any("does not use its input" in m for m in recipe_warnings)
    assert by["HeadBiasInit"].status == "pass" and by["InitialLossCheck"].status == "pass"  # the layout is understood
    assert dependence.details["real"] == pytest.approx(dependence.details["zeroed"])


class _Upsampled(nn.Module):
    """A segmentation net whose classifier runs at half resolution, its logits upsampled to the input size after it
    (as in DeepLab-style heads): no module outputs the model's output."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                                  nn.ReLU())
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        return nn.functional.interpolate(self.head(self.body(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)


def test_a_head_upsampled_after_it_is_found_and_set_to_the_pixel_log_frequencies(tmp_path):
    L.seed_everything(0)
    _, x, y = multiclass_segmentation()
    model = Dense(_Upsampled(3), nn.CrossEntropyLoss())
    t, recipe_warnings = _fit(tmp_path, model, x, y, lr.recommended(), 3)
    assert recipe_warnings == []
    by = {f.check: f for f in lr.collect_findings(t)}
    bias, population, first_batch = _closed_form("multiclass_segmentation", y[:N_TRAIN], y[:BATCH])
    hb = by["HeadBiasInit"]
    assert hb.status == "pass" and hb.details["head"] == "net.head"
    assert torch.tensor(hb.details["bias"]).double() == pytest.approx(bias, abs=1e-4)
    assert by["InitialLossCheck"].status == "pass" and by["InitialLossCheck"].expected == pytest.approx(first_batch, rel=1e-4)


def test_autoencoder_on_raw_integer_pixels_is_neither_class_labels_nor_a_leak(tmp_path):
    """Digits as raw 0..16 intensities: 17 integer target values, and a random conv net whose output already
    correlates with its targets (they are its inputs), so the first loss may start below the constant's."""
    L.seed_everything(0)
    model, x, _ = autoencoder()
    x = x * 16
    assert torch.equal(x, x.round()) and x.unique().numel() == 17
    t, recipe_warnings = _fit(tmp_path, model, x, x, lr.recommended(), 3)
    assert recipe_warnings == []
    by = {f.check: f for f in lr.collect_findings(t)}
    out = by["OutputRangeCheck"]
    assert out.status == "pass" and out.measured == 17 and out.details["input_target_correlation"] == 1.0
    il = by["InitialLossCheck"]
    assert il.status == "pass" and il.details["input_target_correlation"] == 1.0
    _, population, first_batch = _closed_form("autoencoder", x[:N_TRAIN], x[:BATCH])
    assert il.expected == pytest.approx(first_batch, rel=1e-4)
    assert il.measured < il.details["lower"]  # below the noise band of a constant, as explained, and not a leak


def test_integer_targets_unrelated_to_the_inputs_still_look_like_class_labels(tmp_path):
    L.seed_everything(0)
    _, x, _ = autoencoder()
    x = x * 16
    shuffled = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))]
    t, recipe_warnings = _fit(tmp_path, autoencoder()[0], x, shuffled, lr.recommended(), 1)
    out = {f.check: f for f in lr.collect_findings(t)}["OutputRangeCheck"]
    # a note (the severity policy: ordinal and count regressions look the same), not the pixel-intensity pass
    assert out.status == "note" and "look like class labels" in out.message
    assert abs(out.details["input_target_correlation"]) < 0.9  # below the pixel-intensity threshold


def test_dense_label_statistics_read_a_bounded_number_of_values(monkeypatch):
    from lightning_recipe._core import labels as _labels

    monkeypatch.setattr(_labels, "_MAX_VALUES", 25_000)
    maps = torch.arange(10.0).reshape(10, 1, 1).expand(10, 100, 100)  # example i: every pixel equal to i
    kept, source, _ = _labels._bounded(maps, "TensorDataset")
    assert kept.shape == (2, 100, 100) and source == "TensorDataset, 2 of 10 examples"
    assert len(set(kept[:, 0, 0].tolist())) == 2  # two whole, distinct examples
    small = torch.zeros(10, 50)
    assert _labels._bounded(small, "s")[0] is small


def test_soft_class_maps_count_their_positions():
    probs = torch.softmax(torch.randn(2, 3, 4, 5), 1)
    s = resolve_task(nn.CrossEntropyLoss(), torch.zeros(2, 3, 4, 5), probs)
    assert (s.soft_targets, s.num_outputs, s.positions) == (True, 3, 20)
    assert torch.equal(s.canonical_targets(probs)[4 * 5 + 7], probs[1, :, 1, 2])  # example 1, pixel (1, 2)
    assert resolve_task(nn.CrossEntropyLoss(), torch.zeros(2, 3), torch.softmax(torch.randn(2, 3), 1)).positions == 1


@pytest.mark.parametrize("loss", [nn.MSELoss(), nn.L1Loss(), nn.BCEWithLogitsLoss()])
def test_per_channel_constants_of_a_three_channel_map_pool_the_positions(loss):
    from lightning_recipe._core.labels import stats_from_targets
    from lightning_recipe.functional import constant_loss, optimal_constant

    g = torch.Generator().manual_seed(0)
    if isinstance(loss, nn.BCEWithLogitsLoss):  # per-pixel multilabel: positive rates 0.1, 0.5, 0.8 per channel
        y = (torch.rand(40, 3, 6, 7, generator=g) < torch.tensor([0.1, 0.5, 0.8]).reshape(1, 3, 1, 1)).float()
    else:  # channels with means 0, 10, -5 and different spreads
        y = torch.randn(40, 3, 6, 7, generator=g) * torch.tensor([1.0, 3.0, 0.5]).reshape(1, 3, 1, 1)
        y = y + torch.tensor([0.0, 10.0, -5.0]).reshape(1, 3, 1, 1)
    spec = resolve_task(loss, torch.zeros_like(y), y, head=nn.Conv2d(8, 3, 1))
    assert (spec.num_outputs, spec.positions) == (3, 42) and any("one constant per channel" in n for n in spec.notes)
    c, how = optimal_constant(spec.task, stats_from_targets(spec, spec.canonical_targets(y)), spec.loss, spec.loss_name)
    per_channel = y.transpose(0, 1).reshape(3, -1).double()  # every pixel of every example, per channel
    if isinstance(loss, nn.BCEWithLogitsLoss):
        p = per_channel.mean(1)
        assert how == "log-odds" and c.double() == pytest.approx((p / (1 - p)).log(), abs=1e-5)
        closed = float(-(p * p.log() + (1 - p) * (1 - p).log()).mean())  # mean binary entropy of the channels
    elif isinstance(loss, nn.L1Loss):
        assert how == "median" and torch.equal(c, per_channel.float().median(1).values)
        closed = float((per_channel - per_channel.median(1, keepdim=True).values).abs().mean())
    else:
        assert how == "mean" and c.double() == pytest.approx(per_channel.mean(1), abs=1e-4)
        closed = float(per_channel.var(1, unbiased=False).mean())  # mean per-pixel variance of the channels
    assert constant_loss(spec.loss, c, spec.canonical_targets(y)) == pytest.approx(closed, rel=1e-4)


def test_a_sigmoid_before_a_per_pixel_bce_with_logits_stops_the_fit(tmp_path):
    """The bug: forward ends in a sigmoid and the loss applies its own. HeadBiasInit understands the dense layout
    (the conv before the sigmoid, one log-odds), and OutputRangeCheck stops the strict fit before any step."""
    L.seed_everything(0)
    _, x, y = binary_segmentation()
    model = Dense(nn.Sequential(_conv2d(1, 1), nn.Sigmoid()), nn.BCEWithLogitsLoss())
    with pytest.raises(lr.RecipeCheckError, match="double sigmoid"):
        _fit(tmp_path, model, x, y, lr.strict(), 1)
    assert model.global_step == 0
    bias, _, _ = _closed_form("binary_segmentation", y[:N_TRAIN], y[:BATCH])
    assert float(model.net[0][-1].bias) == pytest.approx(float(bias), abs=1e-4)


class _Tagger(L.LightningModule):
    """A token tagger fed Hugging Face-style dict batches ``{"input_ids", "labels"}``, padded to each batch's longest
    sequence (labels -100 on the padding), the loss inline as most taggers write it."""

    def __init__(self, vocab: int = 20, tags: int = 4, lr: float = 1e-2) -> None:
        super().__init__()
        self.emb, self.head, self.lr = nn.Embedding(vocab, 16), nn.Linear(16, tags), lr

    def forward(self, input_ids):
        return self.head(torch.relu(self.emb(input_ids)))

    def training_step(self, batch, batch_idx):
        logits = self(batch["input_ids"])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _padded_tagging_data(n: int = 96, seed: int = 0):
    """Sentences of 3-12 tokens whose tag is the token id mod 4, and a collate that pads each batch to its longest."""
    g = torch.Generator().manual_seed(seed)
    sentences = [torch.randint(1, 20, (int(torch.randint(3, 13, (1,), generator=g)),), generator=g) for _ in range(n)]

    def collate(items):
        t = max(len(s) for s in items)
        ids = torch.zeros(len(items), t, dtype=torch.long)
        labels = torch.full((len(items), t), -100, dtype=torch.long)
        for i, s in enumerate(items):
            ids[i, : len(s)], labels[i, : len(s)] = s, s % 4
        return {"input_ids": ids, "labels": labels}

    return sentences, collate


def test_padded_token_tagging_with_input_ids_and_labels(tmp_path):
    """A dict batch of ``input_ids`` and ``labels`` needs no ``split_batch``; labels padded to a different length in
    each batch are counted per position (the padding, -100, left out): the head bias is the log frequency of each tag
    over the real tokens, and no check is switched off by an internal error."""
    sentences, collate = _padded_tagging_data()
    counts = torch.bincount(torch.cat([s % 4 for s in sentences]), minlength=4).double()
    p = counts / counts.sum()
    model = _Tagger(lr=0.0)  # the bias stays where HeadBiasInit put it
    checks = [lr.HeadBiasInit(on_fail="raise"), lr.InitialLossCheck(on_fail="raise")]
    loader = DataLoader(sentences, batch_size=16, shuffle=True, collate_fn=collate)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [lr.Recipe(callbacks=checks)], max_steps=3).fit(model, loader)
    assert not [w for w in caught if "internal error" in str(w.message)]
    b = model.head.bias.detach().double()
    torch.testing.assert_close(b - b.mean(), p.log() - p.log().mean(), atol=1e-4, rtol=0)
    (initial,) = [f for f in checks[1].findings if f.check == "InitialLossCheck"]
    assert initial.status == "pass"  # the label entropy over the real tokens, H = -sum p log p:
    assert initial.details["population"] == pytest.approx(float(-(p * p.log()).sum()), rel=1e-4)
