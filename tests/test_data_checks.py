import math
import os
import warnings

import numpy as np
import pytest
import torch
from helpers import TinyModel, blobs, loader, trainer
from sklearn.datasets import load_digits
from torch import nn

from lightning_recipe.checks.data import DataCheck
from lightning_recipe.functional.data import duplicate_fraction, row_hashes, token_alignment
from lightning_recipe.report.plotting import plot_first_batch
from lightning_recipe.exceptions import RecipeCheckError, RecipeWarning


def _digits():
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def _standardized_split(n_train=1500):
    x, y = _digits()
    xt, yt, xv, yv = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    mean, std = xt.mean(0), xt.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (xt - mean) / std, yt, (xv - mean) / std, yv


def _by_name(cb):
    return {f.check.split(".")[-1]: f for f in cb.findings}


def _fit(tmp_path, model, train, val=None, figure=False, **kw):
    cb = DataCheck(figure=figure, **kw)
    tr = trainer(tmp_path, [cb], max_steps=1, limit_val_batches=1 if val is not None else 0, num_sanity_val_steps=0)
    tr.fit(model, train, val)
    return cb


class _ImageModel(TinyModel):
    def __init__(self) -> None:
        super().__init__(in_dim=64, out_dim=10)

    def forward(self, x):
        return self.net(x.flatten(1))


def test_healthy_standardized_digits_pass(tmp_path):
    xt, yt, xv, yv = _standardized_split()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecipeWarning)
        cb = _fit(tmp_path, TinyModel(in_dim=64, out_dim=10), loader(xt, yt, 64), loader(xv, yv, 64, shuffle=False),
                  figure=True)
    f = _by_name(cb)
    # validation = the last 297 rows in the data set's order (the writers differ): a moderate shift of a few pixels,
    # beyond sampling error but small, is a note; a warning needs most features shifted far
    assert {k: v.status for k, v in f.items()} == {
        "finite": "pass", "scale": "pass", "duplicates": "pass", "overlap": "pass", "balance": "pass", "leak": "skip",
        "shift": "note"}
    assert f["shift"].details["inputs"]["large"] == 0 and f["shift"].details["labels"]["status"] == "pass"
    assert f["finite"].measured == 0 and f["finite"].details == {} and f["duplicates"].measured == 0.0
    assert f["overlap"].measured == 0.0 and f["overlap"].details["val_rows"] == 297
    counts = torch.bincount(yt).double()
    assert f["balance"].measured == pytest.approx(float(counts.max() / counts.min()))
    assert f["balance"].details["class_counts"] == torch.bincount(yt).tolist()
    worst = f["scale"].details["worst"]
    assert abs(worst["mean"]) < 1e-4 and worst["std"] == pytest.approx(1.0, abs=1e-4)  # standardised on this split
    assert os.path.isfile(os.path.join(tmp_path, "recipe", "data_first_batch.png"))


def test_raw_pixels_warn_and_standardized_images_pass(tmp_path):
    x, y = _digits()
    raw = (x * 16).clamp(max=255).reshape(-1, 1, 8, 8)  # 0-255 pixel values
    with pytest.warns(RecipeWarning, match="far from a standardised scale"):
        cb = _fit(tmp_path, _ImageModel(), loader(raw, y, 64))
    f = _by_name(cb)["scale"]
    assert f.status == "warn" and f.measured == 1.0  # the one channel is off scale
    mean, std = raw.double().mean(), raw.double().std(unbiased=False)
    assert f.details["worst"]["mean"] == pytest.approx(float(mean), rel=1e-6)  # 78.1
    assert f.details["worst"]["std"] == pytest.approx(float(std), rel=1e-6)  # 95.9
    assert f.details["min"] == 0.0 and f.details["max"] == 255.0 and f.details["image"]
    std_imgs = (raw - mean.float()) / std.float()
    cb = _fit(tmp_path / "std", _ImageModel(), loader(std_imgs, y, 64), figure=True)  # own folder: a second fit
    f = _by_name(cb)["scale"]                                                           # into one writes recipe_1/
    assert f.status == "pass" and abs(f.details["worst"]["mean"]) < 1e-5
    assert os.path.isfile(os.path.join(tmp_path, "std", "recipe", "data_first_batch.png"))


def test_nan_feature_fails(tmp_path):
    xt, yt, _, _ = _standardized_split()
    xt = xt.clone()
    xt[[3, 50, 77, 100, 101, 900, 1499], 5] = float("nan")
    with pytest.raises(RecipeCheckError, match="7 non-finite values") as err:
        _fit(tmp_path, TinyModel(in_dim=64, out_dim=10), loader(xt, yt, 64))
    assert "feature 5: 7" in str(err.value) and "missing values" in str(err.value)


def test_dataset_concatenated_twice_fails(tmp_path):
    xt, yt, _, _ = _standardized_split()
    x2, y2 = torch.cat([xt, xt]), torch.cat([yt, yt])
    with pytest.raises(RecipeCheckError, match="exact duplicates") as err:
        _fit(tmp_path, TinyModel(in_dim=64, out_dim=10), loader(x2, y2, 64))
    assert "0.5 of the training examples" in str(err.value)
    # a sample of 10 batches (640 of 3000 rows): ~68 equal pairs expected, the estimate is near 0.5
    cb = _fit(tmp_path, TinyModel(in_dim=64, out_dim=10), loader(x2, y2, 64), on_fail="warn", max_batches=10)
    f = _by_name(cb)["duplicates"]
    assert f.status == "fail" and not f.details["exact"] and f.details["population"] == 3000
    assert 0.35 < f.measured < 0.65 and 40 < f.details["equal_pairs"] < 100


def test_validation_subset_of_train_fails(tmp_path):
    xt, yt, _, _ = _standardized_split()
    with pytest.raises(RecipeCheckError, match="also occur in the training set") as err:
        _fit(tmp_path, TinyModel(in_dim=64, out_dim=10), loader(xt, yt, 64), loader(xt[:200], yt[:200], 64))
    assert "200 of 200 validation rows" in str(err.value) and "validation split taken from the training set" in str(err.value)


def test_class_imbalance_warns_with_counts(tmp_path):
    x, y = blobs(n=1000, classes=3, priors=[0.9, 0.08, 0.02])
    counts = torch.bincount(y, minlength=3).double()
    with pytest.warns(RecipeWarning, match="heavy class imbalance"):
        cb = _fit(tmp_path, TinyModel(out_dim=3), loader(x, y, 100))
    f = _by_name(cb)["balance"]
    assert f.status == "warn" and f.measured == pytest.approx(float(counts.max() / counts.min()))
    assert f.details["class_counts"] == counts.long().tolist()
    x, y = blobs(n=1000, classes=3)
    f = _by_name(_fit(tmp_path, TinyModel(out_dim=3), loader(x, y, 100)))["balance"]
    assert f.status == "pass" and f.measured < 1.5


def test_class_imbalance_rebalanced_by_a_weighted_sampler_passes_naming_it(tmp_path):
    """The same 90/8/2 data drawn through a WeightedRandomSampler (weights 1 / class count, as imbalance guides
    write it): the model sees balanced batches, so the dataset's imbalance is no warning; the counts are reported."""
    from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

    x, y = blobs(n=1000, classes=3, priors=[0.9, 0.08, 0.02])
    counts = torch.bincount(y, minlength=3).double()
    sampler = WeightedRandomSampler((1.0 / counts)[y], num_samples=len(y), replacement=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cb = _fit(tmp_path, TinyModel(out_dim=3), DataLoader(TensorDataset(x, y), batch_size=100, sampler=sampler))
    assert not [w for w in caught if issubclass(w.category, RecipeWarning)]
    f = _by_name(cb)["balance"]
    assert f.status == "pass" and f.measured == pytest.approx(float(counts.max() / counts.min()))
    assert "WeightedRandomSampler" in f.message and f.details["sampled"] is True


def test_small_categorical_space_only_warns():
    # 3 binary features: 8 possible rows; 400 rows repeat by chance, which is no evidence of copying
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2, (400, 3), generator=g).float()
    from lightning_recipe._core.scan import _Scan

    s = _Scan("auto")
    s.add(x, torch.zeros(400, dtype=torch.long), x)
    s.finish()
    frac, _, exact = s.duplicate_fraction()
    assert exact and frac == pytest.approx(1 - 8 / 400) and not s.chance_free()


def test_hashes_and_token_figure():
    h = row_hashes(torch.tensor([[0.0, 1.0], [-0.0, 1.0], [0.0, 2.0]]))
    assert bool((h[0] == h[1]).all()) and not bool((h[0] == h[2]).all())
    assert duplicate_fraction(row_hashes(torch.arange(6.0).reshape(-1, 1))) == (0.0, 0)
    fig = plot_first_batch(torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([0, 1]),
                           decode=lambda ids: "".join("abcdefg"[i] for i in ids))
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "bcd" in texts[0] and "efg" in texts[0]


def test_token_ids_are_not_judged_for_scale(tmp_path):
    class Tokens(TinyModel):
        def __init__(self):
            super().__init__(in_dim=8, out_dim=4)
            self.emb = nn.Embedding(50, 8)

        def forward(self, x):
            return self.net(self.emb(x).mean(1))

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (256, 12), generator=g)
    y = torch.randint(0, 4, (256,), generator=g)
    cb = _fit(tmp_path, Tokens(), loader(x, y, 32), decode=lambda ids: " ".join(f"w{i}" for i in ids),
              figure=True)
    f = _by_name(cb)
    assert f["scale"].status == "skip" and f["duplicates"].status == "pass"
    assert os.path.isfile(os.path.join(tmp_path, "recipe", "data_first_batch.png"))


def test_no_global_rng_draw(tmp_path):
    xt, yt, _, _ = _standardized_split()
    torch.manual_seed(123)
    _fit(tmp_path, TinyModel(in_dim=64, out_dim=10), loader(xt, yt, 64))
    a = torch.rand(1)
    torch.manual_seed(123)
    tr = trainer(tmp_path, [], max_steps=1, limit_val_batches=0, num_sanity_val_steps=0)
    tr.fit(TinyModel(in_dim=64, out_dim=10), loader(xt, yt, 64))
    assert torch.equal(a, torch.rand(1))
    assert np.isfinite(a.item())


def test_one_natural_duplicate_across_the_split_is_a_note(tmp_path):
    """Like iris (one repeated row in 150): a duplicate that straddles a random split is not a split bug."""
    xt, yt, xv, yv = _standardized_split()
    xv, yv = xv[:30].clone(), yv[:30].clone()
    xv[0], yv[0] = xt[7], yt[7]  # 1 of 30 validation rows (3.3%) also in train
    with warnings.catch_warnings():  # healthy data does this: a note, never a warning
        warnings.simplefilter("error", RecipeWarning)
        cb = _fit(tmp_path, TinyModel(in_dim=64, out_dim=10), loader(xt, yt, 64), loader(xv, yv, 64))
    f = _by_name(cb)["overlap"]
    assert f.status == "note" and f.details["found"] == 1 and f.measured == pytest.approx(1 / 30)
    assert "also occur in the training set" in f.message
    xv[1:4], yv[1:4] = xt[8:11], yt[8:11]  # 4 of 30 (13%): not chance, not enough for a split bug (5 * 1%): warn
    with pytest.warns(RecipeWarning, match="also occur in the training set"):
        cb = _fit(tmp_path, TinyModel(in_dim=64, out_dim=10), loader(xt, yt, 64), loader(xv, yv, 64),
                  max_overlap=0.05)
    f = _by_name(cb)["overlap"]
    assert f.status == "warn" and f.details["found"] == 4 and f.measured == pytest.approx(4 / 30)


class _Graph(torch.utils.data.Dataset):
    """One graph's nodes as one item (batch_size=None): features, labels and the mask of the split's nodes."""

    def __init__(self, x, y, mask):
        self.item = (x, y, mask)

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return self.item


class _Transductive(TinyModel):
    def training_step(self, batch, batch_idx):
        x, y, mask = batch
        return self.loss_fn(self(x)[mask], y[mask])

    def validation_step(self, batch, batch_idx):
        x, y, mask = batch
        self.log("val_loss", self.loss_fn(self(x)[mask], y[mask]))


def test_one_graph_split_by_masks_is_no_overlap_but_the_same_loader_twice_is(tmp_path):
    """Transductive node classification: both splits read the whole graph and score the nodes of their own mask;
    every validation row is a training row by design (skip, naming the part that differs). The same mask in both
    loaders is the real overlap, and fails."""
    from torch.utils.data import DataLoader

    x, y = blobs(n=200)
    mask = torch.arange(200) < 120
    graph = lambda m: DataLoader(_Graph(x, y, m), batch_size=None)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecipeWarning)
        cb = _fit(tmp_path, _Transductive(), graph(mask), graph(~mask))
    f = _by_name(cb)["overlap"]
    assert f.status == "skip" and f.details["found"] == f.details["val_rows"] == 200 and f.measured == 1.0
    assert "differ only in batch[2]" in f.message
    with pytest.raises(RecipeCheckError, match="also occur in the training set"):
        _fit(tmp_path, _Transductive(), graph(mask), graph(mask))


def test_image_grid_is_one_image_of_tiles_with_the_batch_colour_scale():
    """The first-batch grid: every image placed as it is in its tile, one colour scale, labels above the tiles."""
    x = torch.arange(6 * 3 * 5, dtype=torch.float32).reshape(6, 1, 3, 5)  # six 3x5 grayscale images
    fig = plot_first_batch(x, torch.tensor([3, 1, 4, 1, 5, 9]))
    (ax,) = fig.axes
    (im,) = ax.get_images()
    canvas = np.ma.filled(im.get_array(), np.nan)
    gap = 1  # ceil(0.2 * 3)
    assert canvas.shape == (2 * (3 + gap), 4 * (5 + 1) + 1)  # 2 rows x 4 columns of tiles
    for i in range(6):
        r, c = divmod(i, 4)
        tile = canvas[r * 4 + gap:(r + 1) * 4, c * 6 + 1:(c + 1) * 6]
        assert np.array_equal(tile, x[i, 0].numpy())
    assert np.isnan(canvas[:, 0]).all()  # the space between tiles is background, not a pixel value
    assert im.get_clim() == (0.0, float(x.max()))
    assert [t.get_text() for t in ax.texts] == ["y=3", "y=1", "y=4", "y=1", "y=5", "y=9"]


def _char_windows(t: int = 32, stride: int = 16):
    """Character windows of Python stdlib source (``json.decoder``) as ids ``(n, t + 1)``, and the vocabulary size."""
    import inspect
    import json.decoder

    text = inspect.getsource(json.decoder)
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text])
    starts = torch.arange(0, len(ids) - t - 1, stride)
    return ids[starts[:, None] + torch.arange(t + 1)], len(vocab)


class _CharLM(TinyModel):
    """Per-position character model: (N, T) ids -> (N, T, V) logits, flattened in training_step."""

    def __init__(self, vocab):
        super().__init__(in_dim=16, out_dim=vocab)
        self.emb = nn.Embedding(vocab, 16)

    def forward(self, x):
        return self.net(self.emb(x))

    def compute_loss(self, batch):
        x, y = batch
        return self.loss_fn(self(x).flatten(0, 1), y.flatten())


def test_token_alignment():
    s = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert token_alignment(s[:, :-1], s[:, 1:]) == {"equal": 0.0, "shifted": 1.0, "positions": 6}
    assert token_alignment(s[:, :-1], s[:, :-1]) == {"equal": 1.0, "shifted": 0.0, "positions": 6}
    y = s[:, 1:].clone()
    y[:, -1] = -100  # ignored positions are not counted
    assert token_alignment(s[:, :-1], y) == {"equal": 0.0, "shifted": 1.0, "positions": 4}
    assert token_alignment(s[:, 0], s[:, 0]) == {"equal": 1.0, "shifted": None, "positions": 2}
    assert token_alignment(s.float(), s) is None and token_alignment(s.to(torch.uint8), s) is None
    assert token_alignment(s, s.float()) is None and token_alignment(s[:, :-1], s[:, :2]) is None


def test_unshifted_language_model_targets_fail(tmp_path):
    w, vocab = _char_windows()
    x = w[:, :-1]
    with pytest.raises(RecipeCheckError, match="the targets are a copy of the inputs") as err:
        _fit(tmp_path, _CharLM(vocab), loader(x, x.clone(), 64))  # the shift by one forgotten
    assert "tokens[:, 1:]" in str(err.value) and "`max_copied_targets=1.0`" in str(err.value)
    assert "100.0% of the 2048 labelled target positions" in str(err.value) and "not shifted by one" in str(err.value)
    cb = _fit(tmp_path, _CharLM(vocab), loader(x, x.clone(), 64), on_fail="warn")
    f = _by_name(cb)["leak"]
    assert f.status == "fail" and f.measured == 1.0 and f.expected == 0.999 and f.details["positions"] == 64 * 32
    # a copy task opts out
    f = _by_name(_fit(tmp_path, _CharLM(vocab), loader(x, x.clone(), 64), max_copied_targets=1.0))["leak"]
    assert f.status == "pass" and f.measured == 1.0 and "allowed by `max_copied_targets=1`" in f.message


def test_a_task_that_mostly_copies_its_input_is_not_a_leak(tmp_path):
    """A correction task (truecasing, spelling, denoising) changes a few positions: 2% here, not a copy."""
    w, vocab = _char_windows()
    x = w[:, :-1]
    y = x.clone()
    changed = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < 0.02
    y[changed] = (x[changed] + 1) % vocab
    f = _by_name(_fit(tmp_path, _CharLM(vocab), loader(x, y, 64)))["leak"]
    assert f.status == "pass" and "mostly a copy" in f.message and f.details["positions"] == 64 * 32
    overall = float((x == y).float().mean())  # 0.980; the check reads one batch of 64 rows drawn from the set
    assert abs(f.measured - overall) < 0.01 and f.measured * 2048 == round(f.measured * 2048) and f.measured < 0.999


def test_shifted_language_model_passes_and_says_so(tmp_path):
    w, vocab = _char_windows()
    x, y = w[:, :-1], w[:, 1:]
    cb = _fit(tmp_path, _CharLM(vocab), loader(x, y, len(x)))  # one batch: the first batch is the whole set
    f = _by_name(cb)
    assert f["leak"].status == "pass" and "shifted by one position (next-token prediction)" in f["leak"].message
    assert f["leak"].details["shifted"] == 1.0
    # a character equal to the next one (runs of indentation spaces, "ee"): natural, far below the limit
    assert f["leak"].measured == pytest.approx(float((x == y).double().mean()))
    assert f["leak"].measured == pytest.approx(0.234, abs=1e-3)


def test_autoencoder_on_its_own_inputs_is_not_a_leak(tmp_path):
    xt, _, _, _ = _standardized_split()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecipeWarning)
        cb = _fit(tmp_path, TinyModel(in_dim=64, out_dim=64, loss_fn=nn.MSELoss()), loader(xt, xt.clone(), 64))
    f = _by_name(cb)
    assert f["leak"].status == "skip" and "autoencoder" in f["leak"].message
    assert f["balance"].status == "skip"


def test_per_position_class_imbalance_passes_with_counts(tmp_path):
    """Character frequencies are naturally skewed: counted and shown, not warned about."""
    w, vocab = _char_windows()
    x, y = w[:, :-1], w[:, 1:]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecipeWarning)
        cb = _fit(tmp_path, _CharLM(vocab), loader(x, y, 64))
    f = _by_name(cb)["balance"]
    counts = torch.bincount(y.reshape(-1)).double()
    assert f.status == "pass" and f.details["per_position"] and f.details["class_counts"] == counts.long().tolist()
    assert f.measured == pytest.approx(float(counts.max() / counts.min())) and f.measured > 1000  # spaces vs rare chars
    assert "a class per position (shape (N, 32))" in f.message and "naturally skewed" in f.message


@pytest.mark.parametrize("loss", ["ce_weight", "bce_pos_weight", "none"])
def test_binary_imbalance_weighted_by_the_loss_passes(tmp_path, loss):
    x, y = blobs(n=1000, classes=2, priors=[0.95, 0.05])
    counts = torch.bincount(y, minlength=2).double()
    ratio = float(counts.max() / counts.min())
    if loss == "ce_weight":
        model, target = TinyModel(out_dim=2, loss_fn=nn.CrossEntropyLoss(weight=torch.tensor([1.0, 19.0]))), y
    elif loss == "bce_pos_weight":
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([19.0]))
        model, target = TinyModel(out_dim=1, loss_fn=loss_fn), y.float()[:, None]
    else:
        model, target = TinyModel(out_dim=2), y
    if loss == "none":
        with pytest.warns(RecipeWarning, match="heavy class imbalance"):
            f = _by_name(_fit(tmp_path, model, loader(x, target, 100)))["balance"]
        assert f.status == "warn" and f.measured == pytest.approx(ratio) and f.details["weighted"] is None
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecipeWarning)
        f = _by_name(_fit(tmp_path, model, loader(x, target, 100)))["balance"]
    assert f.status == "pass" and f.measured == pytest.approx(ratio) and ratio > 10  # 95/5: about 19
    name = "`weight=` of CrossEntropyLoss" if loss == "ce_weight" else "`pos_weight=` of BCEWithLogitsLoss"
    assert f.details["weighted"] == name and f"the loss weights the classes ({name})" in f.message


@pytest.mark.parametrize("loss", ["ce_weight", "bce_pos_weight"])
def test_a_weight_that_favours_the_majority_still_warns(tmp_path, loss):
    """Weights inverted (the rare class weighted 1/19 of the frequent one): the imbalance is made worse."""
    x, y = blobs(n=1000, classes=2, priors=[0.95, 0.05])
    if loss == "ce_weight":
        model, target = TinyModel(out_dim=2, loss_fn=nn.CrossEntropyLoss(weight=torch.tensor([19.0, 1.0]))), y
    else:
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1 / 19]))
        model, target = TinyModel(out_dim=1, loss_fn=loss_fn), y.float()[:, None]
    with pytest.warns(RecipeWarning, match="weights the rare side LESS"):
        f = _by_name(_fit(tmp_path, model, loader(x, target, 100)))["balance"]
    counts = torch.bincount(y, minlength=2).double()
    assert f.status == "warn" and f.details["weight_against"] is True and f.details["weighted"] is None
    assert f.measured == pytest.approx(float(counts.max() / counts.min()))


class _NormFirst(TinyModel):
    def __init__(self, norm):
        super().__init__(in_dim=30, out_dim=2)
        self.net = nn.Sequential(norm, nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 2))


def _breast_cancer():
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def test_raw_features_into_batchnorm_pass_with_a_note(tmp_path):
    x, y = _breast_cancer()  # raw: e.g. mean area ~650, std ~350
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecipeWarning)
        f = _by_name(_fit(tmp_path, _NormFirst(nn.BatchNorm1d(30)), loader(x, y, 64)))["scale"]
    assert f.status == "pass" and f.details["input_norm"] == "net.0" and f.measured > 0
    assert "`net.0` (BatchNorm1d), standardises each feature" in f.message
    with pytest.warns(RecipeWarning, match="far from a standardised scale"):  # a Linear first: the scale matters
        f = _by_name(_fit(tmp_path, TinyModel(in_dim=30, out_dim=2), loader(x, y, 64)))["scale"]
    assert f.status == "warn" and "input_norm" not in f.details
    # LayerNorm standardises each example across its features: features in mixed units stay mixed
    with pytest.warns(RecipeWarning, match="does not bring features in mixed units to one scale"):
        f = _by_name(_fit(tmp_path, _NormFirst(nn.LayerNorm(30)), loader(x, y, 64)))["scale"]
    assert f.status == "warn"


def test_raw_signals_into_an_instance_norm_without_parameters_pass(tmp_path):
    """``InstanceNorm1d`` without ``affine`` holds no parameter or buffer: it is still found as the first layer."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (256,), generator=g)
    x = 500 + 100 * torch.randn(256, 4, 16, generator=g) + 50 * y[:, None, None]  # raw sensor values: mean ~500

    class Signals(TinyModel):
        def __init__(self):
            super().__init__(in_dim=64, out_dim=2)
            self.norm = nn.InstanceNorm1d(4)

        def forward(self, x):
            return self.net(self.norm(x).flatten(1))

    assert not list(nn.InstanceNorm1d(4).parameters()) and not list(nn.InstanceNorm1d(4).buffers())
    f = _by_name(_fit(tmp_path, Signals(), loader(x, y, 64)))["scale"]
    assert f.status == "pass" and f.details["input_norm"] == "norm" and "(InstanceNorm1d)" in f.message


class _RevIN(nn.Module):
    """Reversible instance normalisation (Kim et al., 2022): each window standardised by its own mean and std, then a
    learnable affine map; the forecast is mapped back with the same statistics."""

    def __init__(self, n):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(n)), nn.Parameter(torch.zeros(n))

    def forward(self, x):
        mu, sd = x.mean(1, keepdim=True), x.std(1, keepdim=True) + 1e-5
        return (x - mu) / sd * self.weight + self.bias, mu, sd


class _Forecaster(TinyModel):
    def __init__(self, revin=True):
        super().__init__(in_dim=16, out_dim=4, loss_fn=nn.MSELoss())
        self.revin = _RevIN(16) if revin else None

    def forward(self, x):
        if self.revin is None:
            return self.net(x)
        z, mu, sd = self.revin(x)
        return self.net(z) * sd + mu


def test_raw_windows_rescaled_in_forward_pass_and_raw_windows_into_a_linear_warn(tmp_path):
    """Sine windows with a per-series offset of std 50 (raw sensor levels): a forecaster that standardises each window
    itself (RevIN, a module with parameters, so not the first weight layer) passes naming its first Linear; the same
    windows straight into a Linear warn."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(20, dtype=torch.float32)
    off, amp = 50 * torch.randn(512, 1, generator=g), 1 + torch.rand(512, 1, generator=g)
    phase = torch.rand(512, 1, generator=g)
    series = off + amp * torch.sin(0.5 * t + 6.28 * phase)
    x, y = series[:, :16], series[:, 16:]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecipeWarning)
        f = _by_name(_fit(tmp_path, _Forecaster(), loader(x, y, 64)))["scale"]
    assert f.status == "pass" and f.details["input_rescaled"] == "net.0", f.message
    assert "`net.0` (Linear), receives them with every feature on a standardised scale" in f.message
    assert f.details["worst"]["std"] > 10  # the raw windows are off scale: std ~50 per position
    with pytest.warns(RecipeWarning, match="far from a standardised scale"):
        f = _by_name(_fit(tmp_path, _Forecaster(revin=False), loader(x, y, 64)))["scale"]
    assert f.status == "warn" and "input_rescaled" not in f.details


def test_norm_probe_leaves_training_untouched(tmp_path):
    x, y = _breast_cancer()
    weights = []
    for cbs in ([], [DataCheck(on_fail="warn", figure=False)]):
        torch.manual_seed(0)
        m = _NormFirst(nn.BatchNorm1d(30))
        trainer(tmp_path, cbs, max_steps=3, limit_val_batches=0, num_sanity_val_steps=0).fit(m, loader(x, y, 64))
        weights.append(torch.cat([p.detach().float().flatten() for p in m.state_dict().values()]))
    assert _by_name(cbs[0])["scale"].details["input_norm"] == "net.0" and torch.equal(weights[0], weights[1])


def test_off_scale_judges_the_small_side_by_magnitude():
    """Too large by mean or std (factor 10), too small only when every value is under 1 / factor**2 = 0.01."""
    from lightning_recipe.functional.data import off_scale

    mean = torch.tensor([0.0, 12.1, 0.0, 4.6e-5, 0.5, 0.0])
    std = torch.tensor([1.0, 5.0, 11.0, 1.7e-3, 1e-3, 1e-4])
    max_abs = torch.tensor([3.0, 16.0, 40.0, 0.0625, 0.51, 3e-4])
    # a standardised feature, raw digits' brightest pixel, a wide feature, a border pixel of digits / 16, a nearly
    # constant feature of usual size, a feature in a wrong small unit
    assert off_scale(mean, std, max_abs).tolist() == [False, True, True, False, False, True]
    assert off_scale(mean, std, max_abs, factor=20.0).tolist() == [False, False, False, False, False, True]


def test_digits_scaled_to_unit_range_pass_the_scale_rule(tmp_path):
    x, y = _digits()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecipeWarning)
        cb = _fit(tmp_path, TinyModel(in_dim=64, out_dim=10), loader(x / 16, y, 64))
    f = _by_name(cb)["scale"]
    assert f.status == "pass" and f.details["off"] == [] and f.details["worst"]["max_abs"] == 0.0625
    assert "max |x|" in f.message


def test_imbalance_with_head_bias_init_is_a_note(tmp_path):
    from lightning_recipe import HeadBiasInit

    x, y = blobs(n=1000, classes=3, priors=[0.9, 0.08, 0.02])
    counts = torch.bincount(y, minlength=3).double()
    cb = DataCheck(figure=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecipeWarning)
        trainer(tmp_path, [HeadBiasInit(), cb], max_steps=1, limit_val_batches=0).fit(TinyModel(out_dim=3),
                                                                                     loader(x, y, 100))
    f = _by_name(cb)["balance"]
    assert f.status == "note" and f.measured == pytest.approx(float(counts.max() / counts.min()))
    assert f.details["rarest_examples"] == float(counts.min()) and f.details["head_bias_init"]


class _TableModel(TinyModel):
    """Batches ``((categories, numbers), y)``: an embedding per categorical column, then the MLP."""

    def __init__(self) -> None:
        super().__init__(in_dim=8 + 5, out_dim=3)
        self.emb = nn.Embedding(12, 8)

    def forward(self, x):
        cat, num = x
        return self.net(torch.cat([self.emb(cat[:, 0]), num], 1))

    def compute_loss(self, batch):
        (cat, num), y = batch
        return self.loss_fn(self((cat, num)), y)


def _table(n: int = 600):
    g = torch.Generator().manual_seed(0)
    cat = torch.randint(0, 12, (n, 1), generator=g)
    num = torch.randn(n, 5, generator=g)
    return cat, num, (num[:, 0] > 0).long() + (cat[:, 0] > 5).long()


def _table_loader(cat, num, y, shuffle=True):
    from torch.utils.data import DataLoader, TensorDataset

    ds = TensorDataset(cat, num, y)
    return DataLoader(ds, batch_size=64, shuffle=shuffle, collate_fn=lambda items: (
        (torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])), torch.stack([i[2] for i in items])))


def test_categorical_and_numeric_columns_cannot_repeat_by_chance(tmp_path):
    # integer categories beside continuous numbers: equal rows are copies, not chance (the numbers never repeat)
    cat, num, y = _table()
    with pytest.raises(RecipeCheckError, match="exact duplicates"):
        _fit(tmp_path, _TableModel(), _table_loader(torch.cat([cat, cat]), torch.cat([num, num]), torch.cat([y, y])))
    with pytest.raises(RecipeCheckError, match="also occur in the training set"):
        _fit(tmp_path, _TableModel(), _table_loader(cat, num, y), _table_loader(cat[:128], num[:128], y[:128], False))
    # the categories alone (12 values) repeat by chance: a note, never a failure
    from lightning_recipe._core.scan import _Scan

    s = _Scan("auto")
    s.add(cat, y, cat)
    s.finish()
    assert s.discrete and not s.chance_free()
    s = _Scan("auto")
    s.add((cat, num), y, (cat, num))
    s.finish()
    assert not s.discrete and s.chance_free()


def test_scan_memory_is_bounded_and_streaming_keeps_the_numbers():
    # 20000 rows of 64 features: the scan keeps running sums, class counts, 16 bytes of hashes a row and a reservoir
    # of 1024 rows (uniform: about half of it from each half of the rows); the numbers equal one pass over all rows
    from lightning_recipe._core.scan import _Scan

    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 64, generator=g) * 3 + 1
    x[:, 0] = torch.arange(20000.0)  # the row's index: where the reservoir's rows come from
    y = torch.randint(0, 5, (20000,), generator=g)
    s = _Scan("auto")
    for a in range(0, 20000, 500):
        s.add(x[a : a + 500], y[a : a + 500], x[a : a + 500])
    s.finish()
    assert s._cols.shape == (1024, 64) and s._cols_seen == 20000 and len(s.__dict__.get("_targets", [])) == 0
    idx = s._cols[:, 0].to(torch.int32).view(torch.float32)  # the reservoir holds the values' bits
    frac = float((idx < 10000).double().mean())
    assert abs(frac - 0.5) < 3 * math.sqrt(0.25 / 1024)  # binomial, 3 sigma
    assert len(set(idx.tolist())) == 1024  # each row at most once
    kind, counts = s.class_counts()
    assert kind == "classes" and counts.tolist() == torch.bincount(y).double().tolist()
    m = s.moments()["inputs"]
    xd = x.double()
    assert torch.allclose(m["mean"], xd.mean(0), rtol=1e-9) and torch.allclose(m["std"], xd.std(0, unbiased=False))
    kurt = ((xd - xd.mean(0)) ** 4).mean(0) / xd.var(0, unbiased=False) ** 2
    assert torch.allclose(m["kurtosis"], kurt, rtol=1e-6) and m["rows"] == 20000
    assert s.duplicate_fraction() == (0.0, 0, True) and s.chance_free()
    # a batch larger than the slice size is cut into slices of at most _CHUNK values: same numbers
    t = _Scan("auto")
    t.add(x, y, x)
    t.finish()
    assert torch.equal(t.hash_keys(), s.hash_keys()) and torch.allclose(t.moments()["inputs"]["std"], m["std"])
