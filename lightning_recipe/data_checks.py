"""``DataCheck``: the recipe's "become one with the data" and "visualise just before the net".

At fit start the training data is read through a private ``DataLoader`` (same dataset and collate function,
sampled with a private seeded generator, so training's iterators and random state are untouched), at most
``max_batches`` batches of it, and checked for:

* non-finite inputs or targets (fail);
* inputs far from a standardised scale, per feature (per channel for images): too large, or too small in every value
  (warn);
* duplicated examples (rows hashed; warn, fail when a large fraction, e.g. a dataset concatenated twice);
* examples shared between the training and the validation set (hashed; fail above a small fraction);
* class balance (pass with the counts; a note on an imbalance the head bias handles; warn on heavy imbalance of
  per-example classes that nothing handles, or an extreme one);
* class-index targets that are a copy of the integer inputs (a language model whose targets were not shifted; fail);

and a figure of the first batch exactly as it goes into the network (after ``transfer_batch_to_device`` and
``on_after_batch_transfer``) is saved through the loggers: an image grid, per-feature histograms, or decoded
token ids.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_recipe._base import OnFail, _OnceCheck
from lightning_recipe._conventions import find_loss, probe_mode, run_forward, split_batch
from lightning_recipe import _labels
from lightning_recipe._labels import (
    _private_loader,
    _single_loader,
    _to_device,
    first_batch,
    is_iterable,
    read_batches,
)
from lightning_recipe.exceptions import RecipeConfigError, RecipeWarning
from lightning_recipe.findings import Finding

Layout = Literal["auto", "image", "features"]
# "nearly all": the fraction of positions at which targets that are the inputs shifted by one match them (exactly 1.0
# for `x, y = s[:, :-1], s[:, 1:]`; a few positions may differ through padding or special tokens)
NEXT_TOKEN_FRACTION = 0.95
# normalisation layers that standardise each feature (channel) separately, and those that standardise each example
_PER_FEATURE_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
_PER_EXAMPLE_NORMS = (nn.LayerNorm, nn.GroupNorm)

_NONFINITE = [
    "missing values in the features (NaN) not imputed",
    "division by zero or log of zero in preprocessing (a feature with zero variance standardised)",
    "corrupted files or a failed decode producing NaN/Inf",
]
_SCALE = [
    "raw pixel values 0-255 (divide by 255 and standardise per channel)",
    "features in mixed units (standardise each feature: subtract the mean, divide by the std)",
    "a scaler fitted on the wrong split, or not applied to this one",
]
_DUPLICATES = [
    "the dataset concatenated twice (or a list of files read twice)",
    "oversampling applied before the train/validation split",
    "a data pipeline that repeats examples (wrong index mapping in __getitem__)",
]
_OVERLAP = [
    "validation split taken from the training set (or a subset of it)",
    "duplicated examples that landed on both sides of the split (deduplicate before splitting)",
    "the same files listed in both splits",
]
_LEAK = [
    "a language model whose targets were not shifted by one (`y = tokens[:, :-1]` instead of `tokens[:, 1:]`): the "
    "target of each position is its own input, so the model learns to copy",
    "the same tensor returned as inputs and targets (a dataset yielding `(x, x)`, a wrong key in `split_batch`)",
    "the label column left among the input features",
]
# class balance: beyond this ratio, or with fewer examples of a class than this, an imbalance warns even when the head
# bias is set to the prior (a model can ignore the class; per-class metrics have too few examples to mean anything)
EXTREME_IMBALANCE = 1000.0
MIN_CLASS_EXAMPLES = 10
_IMBALANCE = [
    "heavy class imbalance: accuracy is misleading; HeadBiasInit sets the head bias to the class prior so the "
    "initial loss is right; consider class weights or resampling if the rare classes matter",
]


class DataCheck(_OnceCheck):
    """Check the training data before the first step and show exactly what goes into the network.

    What is read: at ``on_train_start`` at most ``max_batches`` batches of a private loader over the training dataset
    (its collate function and worker settings, workers not persistent; a random order from a private generator seeded
    with 0), and as many of the validation dataset; each scan also stops reading after about 2 seconds
    (``lightning_recipe._labels.SCAN_SECONDS``; the ``finite`` finding says how many batches were read and whether the
    time budget stopped it). Everything below is computed on these rows, so the cost is bounded by ``max_batches``
    times the batch size, independent of the dataset length: one pass of reading, and hashing in
    ``O(rows x values per row)``. An ``IterableDataset`` is never read here (a one-shot stream would lose the batches,
    a stream with its own random state would give training other ones): the check then runs at the first training
    batch, on that batch only (finite, scale, leak, the figure), and one ``scan`` skip finding says that duplicates,
    overlap and balance were not checked.

    * **finite** (fail): the count of NaN/Inf values among the inputs and targets read.
    * **scale** (warn): per feature of 2-D inputs ``(N, D)``, per channel of image-like inputs (4-D ``(N, C, H, W)``,
      3-D ``(N, H, W)`` judged as one channel, ``layout="features"`` judges 3-D ``(N, T, D)`` per last dimension), the
      mean, standard deviation and largest magnitude of the values that go into the network. A feature is *off
      scale* when ``|mean| > scale_factor`` or ``std > scale_factor`` (too large: raw 0-255 pixels, mean ~78, std
      ~96; features in mixed units such as an income in dollars), or when every value is smaller in magnitude than
      ``1 / scale_factor**2`` (too small: a feature in the wrong unit; judged by ``max |x|``, not by the std, so a
      nearly constant feature, such as a border pixel of digits scaled to [0, 1] with mean 5e-5 and std 0.0017 but
      values up to 0.0625, or a rare one-hot column, is on scale; the small side is looser because networks cope
      better with small inputs than with large ones, e.g. scikit-learn's diabetes features have std 0.048). Inputs in
      [0, 1] or [-1, 1] are on scale. Digits in raw units 0-16 warn: 8 of 64 pixels have a mean above 10 (up to 12.1).
      Not judged: integer inputs other than ``uint8`` images (token ids), booleans, features whose values
      are all 0 or 1 (binary, one-hot), constant features. A model that normalises its own input passes with a note:
      only when something is off scale, one probe forward of the first batch (eval mode, as the other probes) finds
      the first layer with parameters or buffers that the inputs reach; when it receives as many values as the inputs
      hold and is a ``BatchNorm*``/``InstanceNorm*`` (each feature or channel standardised), or a ``LayerNorm``/
      ``GroupNorm`` on images (each example standardised: right for pixels, all in one unit, but not for tabular
      features in mixed units, where it still warns), the scale of the raw inputs does not matter.
    * **duplicates**: inputs are hashed row by row (two independent 64-bit linear hashes of the raw bytes).
      When every row was read the measured value is the fraction of rows that are extra copies
      (``1 - unique / rows``: 0.5 for a dataset concatenated twice); when only a sample of ``k`` of ``n`` rows was
      read, the number of equal pairs ``P`` in the sample estimates it as ``P (n - 1) / (k (k - 1))`` (exact for
      pairs). When equal rows cannot arise by chance (the product of the per-column numbers of distinct values
      exceeds ``100 k²``, or a column is continuous with at least ``k / 2`` distinct values): warn above
      ``max_duplicates``, fail above ``5 * max_duplicates``. Otherwise a ``note`` above ``max_duplicates`` (small
      categorical input spaces repeat rows naturally; integer inputs such as token ids too: text repeats phrases).
    * **overlap**: validation rows whose hash is among the training hashes, as a fraction of the validation rows
      read, scaled by ``n / k`` of the training side when the training set was sampled. Above ``max_overlap``, when
      chance coincidences are impossible (as above) and at least 3 rows were found: fail above ``5 * max_overlap``
      (a split bug puts a large share of the validation rows in train), else warn; a ``note`` otherwise: one or two
      natural duplicates that straddle a random split (one pair in iris), or rows that can be equal by chance.
    * **balance**: class counts of integer targets (negative values such as ``ignore_index=-100`` left out), or of
      each label of 0/1 float targets. Pass with the counts when the largest over the smallest count is at most
      ``max_imbalance`` (a class that never occurs among the rows read counts as infinite imbalance). Above it:

      - a ``note`` (never a warning) when :class:`~lightning_recipe.HeadBiasInit` is in use (it sets the head bias to
        the prior, which is what an imbalance needs to train from the right loss), or for multilabel targets (rare
        labels are the norm: a multilabel task whose rarest label has 5% positives, 19:1, is healthy);
      - a ``warn`` when no head-bias init is in use (training starts far from the right loss), and, with or without
        it (but not for the expected or handled cases below), when the imbalance is extreme: more than ``1000:1``, or a class with fewer than 10 examples in the
        training set (estimated from the rows read, scaled by the dataset's length when only a sample was read),
        where a model can ignore the class and per-class metrics have too few examples to mean anything;
      - a pass, saying why, when the imbalance is expected or handled: targets with a class per position (dimensions
        beyond the batch: ``(N, T)`` token sequences, ``(N, H, W)`` segmentation maps; float 0/1 maps with at least 2
        dimensions beyond N), whose frequencies are naturally skewed (spaces and ``e`` in text, background pixels) and
        not actionable; or a loss that weights the classes (``CrossEntropyLoss``/``NLLLoss`` with a non-uniform
        ``weight=``, ``BCEWithLogitsLoss`` with a ``pos_weight=`` other than 1) towards the rare side: a weight that
        favours the frequent side makes the imbalance worse, and is judged as no weight, saying so.
    * **leak** (fail): class-index targets compared with every integer input tensor of the same shape (token ids,
      categories; not ``uint8`` images, bool or float inputs) on the first batch (:func:`token_alignment`): the
      fraction of labelled positions whose target equals the input at the same position. Above
      ``max_copied_targets`` (99.9 %) the targets are a copy of the inputs, and the model learns to copy (a language
      model whose targets were not shifted: the loss falls to ~0, every other check passes); tasks that mostly copy
      (spelling correction, truecasing, denoising: 97-99 % of the positions equal) change a few positions and pass.
      Passes saying so when the targets are the inputs shifted by one (next-token prediction:
      ``y[:, t] == x[:, t + 1]`` on at least 95% of the positions).
      Float inputs are never compared: regressing on the inputs (an autoencoder) is legitimate. Skipped when no input
      has the targets' shape.

    Hashing sees the examples as the dataset returns them, before ``on_after_batch_transfer``: random augmentation
    inside the dataset makes copies look different, so they go undetected (no false alarm). Under DDP each rank
    reads its own shard: duplicates across ranks are not seen, failures are reduced across ranks.

    The figure (``data_first_batch.png``), built from the first batch after ``on_after_batch_transfer``: an image grid
    (up to 16 images, with their labels, colour scale over the whole batch so that unscaled values show), per-feature
    histograms for tabular inputs, or the first rows of token ids decoded with ``decode``.

    Args:
        on_fail: ``"raise"`` or ``"warn"``.
        max_batches: batches read from each of the training and validation sets.
        scale_factor: how far from mean 0 / std 1 a feature may be (see above).
        max_duplicates: fraction of duplicated training rows above which to warn.
        max_overlap: fraction of validation rows found in the training set above which to fail.
        max_imbalance: largest ratio of the most to the least frequent class before a warning.
        max_copied_targets: fraction of class-index targets equal to the input at the same position above which the
            targets are a copy of the inputs (fail); ``1.0`` turns the rule off, for a copy task (the target is meant
            to be the input).
        layout: ``"auto"``, ``"image"`` (dimension 1 is the channel) or ``"features"`` (the last dimension is the
            feature) for inputs with more than 2 dimensions.
        decode: ``callable(list_of_token_ids) -> str`` to show integer inputs as text in the figure.
        figure: draw the figure of the first batch.
        **kwargs: overrides (``split_batch``, ...), see :class:`RecipeCheck`.

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[DataCheck(max_batches=20)], logger=False)
    """

    def __init__(
        self,
        on_fail: OnFail = "raise",
        max_batches: int = 100,
        scale_factor: float = 10.0,
        max_duplicates: float = 0.05,
        max_overlap: float = 0.01,
        max_imbalance: float = 10.0,
        max_copied_targets: float = 0.999,
        layout: Layout = "auto",
        decode: Optional[Callable[[list[int]], str]] = None,
        figure: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(on_fail, **kwargs)
        if not isinstance(max_batches, int) or max_batches < 1:
            raise RecipeConfigError(f"{self.name}: `max_batches` must be a positive int, got {max_batches!r}.")
        if not scale_factor > 1:
            raise RecipeConfigError(f"{self.name}: `scale_factor` must be > 1, got {scale_factor!r}.")
        for name, v in (("max_duplicates", max_duplicates), ("max_overlap", max_overlap)):
            if not 0 <= v < 1:
                raise RecipeConfigError(f"{self.name}: `{name}` must be in [0, 1), got {v!r}.")
        if not max_imbalance >= 1:
            raise RecipeConfigError(f"{self.name}: `max_imbalance` must be >= 1, got {max_imbalance!r}.")
        if not 0 <= max_copied_targets <= 1:
            raise RecipeConfigError(f"{self.name}: `max_copied_targets` must be in [0, 1], got {max_copied_targets!r}.")
        if layout not in ("auto", "image", "features"):
            raise RecipeConfigError(f"{self.name}: `layout` must be 'auto', 'image' or 'features', got {layout!r}.")
        if decode is not None and not callable(decode):
            raise RecipeConfigError(f"{self.name}: `decode` must be callable, got {type(decode).__name__}.")
        self.max_batches = max_batches
        self.scale_factor = float(scale_factor)
        self.max_duplicates = float(max_duplicates)
        self.max_overlap = float(max_overlap)
        self.max_imbalance = float(max_imbalance)
        self.max_copied_targets = float(max_copied_targets)
        self.layout = layout
        self.decode = decode
        self.figure = figure
        self.done = False

    # -- hooks ----------------------------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.done or self._disabled:
            return
        self.done = True
        loader = _single_loader(trainer.train_dataloader, "train")
        if loader is None:
            self._config_error(
                f"the train dataloader is a {type(trainer.train_dataloader).__name__}; this check reads one torch "
                "DataLoader (the first of a list/dict)."
            )
            return
        stream = is_iterable(loader)
        train = self._scan(trainer, loader, keep_first=True)
        if train is None:
            return
        val_loader = _single_loader(trainer.val_dataloaders, "val") if trainer.val_dataloaders is not None else None
        val_stream = is_iterable(val_loader)  # validation reads it: never drawn from here either
        val = self._scan(trainer, val_loader, keep_first=False) if val_loader is not None and not (
            stream or val_stream) else None
        step = trainer.global_step
        loss = find_loss(pl_module, self._settings.loss_fn)
        findings = [
            self._finite(train, step),
            self._scale(train, step, lambda: self._input_norm(trainer, pl_module, train)),
            *([self._stream_skip(train, step)] if stream else [
                self._duplicates(train, step),
                self._val_stream_skip(step) if val_stream else self._overlap(train, val, step),
                self._balance(train, step, loss, _head_bias_in_use(trainer))]),
            self._leak(train, step, loss),
        ]
        if self.figure and trainer.is_global_zero and self._dir is not None and train.first is not None:
            self._draw(trainer, train.first)
        self.findings.extend(f for f in findings if not f.failed)
        for f in findings:
            if f.status == "warn":
                rank_zero_warn(f.message + (" Likely causes: " + "; ".join(f.causes) if f.causes else ""),
                               category=RecipeWarning)
        fails = [f for f in findings if f.failed]
        last = None
        if fails:
            last = fails[-1]
            self.findings.extend(fails[:-1])
            if len(fails) > 1:
                last.message += " Also failed: " + "; ".join(f.check for f in fails[:-1]) + " (see the report)."
                last.causes = [c for f in fails for c in f.causes]
        self._conclude(trainer, last)

    # -- reading ----------------------------------------------------------------------------------------------------
    def _scan(self, trainer: "pl.Trainer", loader: DataLoader, keep_first: bool) -> Optional["_Scan"]:
        scan = _Scan(self.layout)
        if is_iterable(loader):  # a stream is read by training only: the first batch it fetched, already moved
            first = first_batch(trainer)
            batches: Any = [first]
            scan.population = None
        else:
            batches = _private_loader(loader, seed=0)
            try:
                scan.population = len(batches.sampler)  # type: ignore[arg-type]
            except TypeError:
                scan.population = None
        reader = batches if is_iterable(loader) else read_batches(batches, self.max_batches)
        with isolate_rng():
            for raw in reader:
                scan.batches += 1
                moved = raw if is_iterable(loader) else _to_device(trainer, raw)
                try:
                    x, y = split_batch(moved, self._settings.split_batch)
                except RecipeConfigError as err:
                    self._config_error(str(err))
                    return None
                try:
                    hx, _ = split_batch(raw, self._settings.split_batch)
                except RecipeConfigError:
                    hx = x
                if keep_first and scan.first is None:
                    scan.first_inputs = x  # on the device, for a probe forward
                x, y, hx = _to_cpu(x), _to_cpu(y), _to_cpu(hx)
                scan.add(x, y, hx)
                if keep_first and scan.first is None:
                    scan.first = (x, y)
        scan.timed_out = bool(getattr(reader, "timed_out", False))
        scan.finish()
        if scan.rows == 0:
            self._config_error("the dataloader yielded no batch with an input tensor: nothing to check.")
            return None
        return scan

    # -- checks -----------------------------------------------------------------------------------------------------
    def _val_stream_skip(self, step: int) -> Finding:
        return Finding(f"{self.name}.overlap", "skip", f"{self.name}: the validation data is an iterable dataset, "
                       "which only validation may read (a stream drawn from here would lose batches, or give "
                       "validation other ones): train/validation overlap not checked.", step=step)

    def _stream_skip(self, s: "_Scan", step: int) -> Finding:
        return Finding(
            f"{self.name}.scan", "skip",
            f"{self.name}: the training data is an iterable dataset, which only training may read (a stream drawn from "
            "here would lose batches, or give training other ones): only the first batch training fetched was checked "
            f"({s.rows} rows: finite values, scale, targets copied from the inputs, and the figure). Duplicates, "
            "train/validation overlap and class balance need a scan of the data and were not checked. HINT: check a "
            "map-style copy of a sample of the data (a list of examples in a DataLoader) with DataCheck to cover them.",
            step=step, details={"rows": s.rows, "batches": 1},
        )

    def _finite(self, s: "_Scan", step: int) -> Finding:
        name = f"{self.name}.finite"
        bad = s.nonfinite_x + s.nonfinite_y
        if bad:
            where = ", ".join(f"feature {j}: {c}" for j, c in s.nonfinite_features()[:8])
            return Finding(
                name, "fail",
                f"{self.name}: {bad} non-finite values (NaN/Inf) in the training data ({s.nonfinite_x} in the inputs, "
                f"{s.nonfinite_y} in the targets) among {s.rows} rows read ({s.read()})"
                f"{'; per input feature: ' + where if where else ''}."
                " Expected 0: a single NaN input makes the loss NaN. HINT: impute or drop missing values before "
                "training.", float(bad), 0.0, step, list(_NONFINITE),
                {"rows": s.rows, "batches": s.batches, "timed_out": s.timed_out, "nonfinite_inputs": s.nonfinite_x,
                 "nonfinite_targets": s.nonfinite_y},
            )
        return Finding(name, "pass", f"{self.name}: no NaN/Inf among {s.rows} training rows read ({s.read()}).", 0.0,
                       0.0, step)

    def _scale(self, s: "_Scan", step: int, input_norm: Callable[[], Optional[tuple[str, nn.Module]]]) -> Finding:
        name = f"{self.name}.scale"
        summary = s.scale_summary(self.scale_factor)
        if summary is None:
            return Finding(name, "skip", f"{self.name}: no real-valued input features to judge (integer token ids, "
                           "booleans or binary features only).", step=step)
        off, judged = summary["off"], summary["judged"]
        unit = "channel" if summary["image"] else "feature"
        worst = summary["worst"]
        numbers = (f"{len(off)} of {judged} judged input {unit}s off scale; worst {unit} {worst['index']} of "
                   f"`{worst['tensor']}`: mean {worst['mean']:.4g}, std {worst['std']:.4g}, max |x| "
                   f"{worst['max_abs']:.4g} (expected |mean| <= {self.scale_factor:g}, std <= {self.scale_factor:g} "
                   f"and max |x| >= {1 / self.scale_factor**2:g}; overall range [{summary['min']:.4g}, "
                   f"{summary['max']:.4g}])")
        details = {k: v for k, v in summary.items() if k != "off"} | {"off": off[:64]}
        if off:
            norm = input_norm()
            layer = f"`{norm[0]}` ({type(norm[1]).__name__})" if norm is not None else ""
            if norm is not None and (isinstance(norm[1], _PER_FEATURE_NORMS) or summary["image"]):
                how = "each feature (channel)" if isinstance(norm[1], _PER_FEATURE_NORMS) else "each example"
                details["input_norm"] = norm[0]
                return Finding(name, "pass", f"{self.name}: the raw inputs are off scale ({numbers}), but the first "
                               f"layer they reach, {layer}, standardises {how}: the model normalises its own input.",
                               len(off) / judged, 0.0, step, details=details)
            note = (f" The first layer the inputs reach, {layer}, standardises each example across its features, which "
                    "does not bring features in mixed units to one scale." if norm is not None else "")
            return Finding(name, "warn", f"{self.name}: inputs are far from a standardised scale: {numbers}.{note} "
                           "HINT: standardise the inputs; if this scale is intended, raise `scale_factor`.",
                           len(off) / judged, 0.0, step, list(_SCALE), details)
        return Finding(name, "pass", f"{self.name}: inputs on a standardised scale: {numbers}.", 0.0, 0.0, step,
                       details=details)

    def _duplicates(self, s: "_Scan", step: int) -> Finding:
        name = f"{self.name}.duplicates"
        frac, pairs, exact = s.duplicate_fraction()
        chance_free = s.chance_free()
        how = (f"{s.rows} of {s.population} rows read; " if not exact else f"all {s.rows} rows read; ") + (
            f"{pairs} equal pairs" if not exact else f"{s.rows - s.unique} extra copies")
        details = {"rows": s.rows, "population": s.population, "equal_pairs": pairs, "exact": exact,
                   "chance_free": chance_free, "conflicting_labels": s.conflicting_labels()}
        if s.conflicting_labels():
            how += f", {s.conflicting_labels()} duplicated inputs with different labels"
        limit = 5 * self.max_duplicates
        if frac > limit and chance_free:
            return Finding(name, "fail", f"{self.name}: {frac:.3g} of the training examples are exact duplicates ({how}); "
                           f"expected at most {limit:g} (0.5 means every example is there twice). HINT: deduplicate the "
                           "dataset; if the repetition is intended (oversampling), pass `max_duplicates=`.", frac,
                           limit, step, list(_DUPLICATES), details)
        if frac > self.max_duplicates:
            # where equal rows arise by chance (token ids, small categorical spaces) healthy data repeats: a note
            tail = "" if chance_free else " (the input space is small enough that equal rows can occur by chance)"
            return Finding(name, "warn" if chance_free else "note", f"{self.name}: {frac:.3g} of the training "
                           f"examples are exact duplicates ({how}); "
                           f"expected at most {self.max_duplicates:g}{tail}.", frac, self.max_duplicates, step,
                           list(_DUPLICATES), details)
        return Finding(name, "pass", f"{self.name}: duplicated training examples: {frac:.3g} ({how}).", frac,
                       self.max_duplicates, step, details=details)

    def _overlap(self, train: "_Scan", val: Optional["_Scan"], step: int) -> Finding:
        name = f"{self.name}.overlap"
        if val is None or val.rows == 0:
            return Finding(name, "skip", f"{self.name}: no validation dataloader: train/validation overlap not checked.",
                           step=step)
        if val.width != train.width:
            return Finding(name, "skip", f"{self.name}: validation rows have {val.width} values, training rows "
                           f"{train.width}: not comparable.", step=step)
        found = int(torch.isin(val.hash_keys(), train.hash_keys()).sum())
        scale = (train.population / train.rows) if train.population and train.population > train.rows else 1.0
        frac = min(1.0, found / val.rows * scale)
        chance_free = train.chance_free()
        numbers = (f"{found} of {val.rows} validation rows read are also among {train.rows} training rows read"
                   + (f" (of {train.population}; estimated fraction {frac:.3g})" if scale > 1 else f" ({frac:.3g})"))
        details = {"found": found, "val_rows": val.rows, "train_rows": train.rows, "train_population": train.population,
                   "chance_free": chance_free}
        if frac > self.max_overlap:
            # a split bug (validation taken from train, a dataset duplicated before splitting) puts a large share of
            # the validation rows in train; a few natural duplicates straddling a split only warn
            # ... and where equal rows can arise by chance, or only one or two rows straddle the split (one pair in
            # iris), healthy data does it: a note
            status = ("fail" if chance_free and frac > 5 * self.max_overlap and found >= 3 else
                      "warn" if chance_free and found >= 3 else "note")
            return Finding(name, status, f"{self.name}: validation examples also occur in the training set: {numbers}; "
                           f"expected at most {self.max_overlap:g}. Validation metrics overstate generalisation. HINT: "
                           "split before any duplication; pass `max_overlap=` if the overlap is intended.", frac,
                           self.max_overlap, step, list(_OVERLAP), details)
        return Finding(name, "pass", f"{self.name}: train/validation overlap: {numbers}.", frac, self.max_overlap, step,
                       details=details)

    def _balance(self, s: "_Scan", step: int, loss: Optional[Callable], bias_init: bool = False) -> Finding:
        name = f"{self.name}.balance"
        counts = s.class_counts()
        if counts is None:
            return Finding(name, "skip", f"{self.name}: the targets are not class indices or 0/1 labels: no class "
                           "balance to report.", step=step)
        kind, c = counts
        if kind == "classes":
            ratio = float(c.max() / c.min()) if c.min() > 0 else math.inf
            shown = ", ".join(f"{j}: {int(v)}" for j, v in enumerate(c.tolist()[:20])) + (" ..." if len(c) > 20 else "")
            what = f"class counts among {int(c.sum())} labels read: {{{shown}}}; largest/smallest = {ratio:.3g}"
            details = {"class_counts": [int(v) for v in c.tolist()[:1000]], "ratio": ratio}
        else:
            pos, n = c
            neg = n - pos
            ratios = torch.where(torch.minimum(pos, neg) > 0, torch.maximum(pos, neg) / torch.minimum(pos, neg).clamp_min(1),
                                 torch.full_like(pos, math.inf))
            j = int(ratios.argmax())
            ratio = float(ratios[j])
            what = (f"positives per label among {int(n)} rows read: {[int(v) for v in pos.tolist()[:20]]}; most "
                    f"imbalanced label {j}: majority/minority = {ratio:.3g}")
            details = {"positives": [int(v) for v in pos.tolist()[:1000]], "rows": int(n), "ratio": ratio}
        weighted, against = _class_weighting(loss, kind, c, j if kind == "labels" else 0)
        if against:  # a weight that favours the majority handles nothing: judged as unweighted, and said so
            what += f"; the loss's {weighted} weights the rare side LESS than the frequent one, making it worse"
            weighted = None
        details["per_position"], details["weighted"], details["weight_against"] = s.per_position, weighted, against
        if ratio > self.max_imbalance and (s.per_position or weighted):
            why = []
            if s.per_position:
                shape = ", ".join(["N", *map(str, s.target_shape)])
                why.append(f"the targets hold a class per position (shape ({shape})): token and pixel "
                           "frequencies are naturally skewed (spaces in text, background in segmentation maps)")
            if weighted:
                why.append(f"the loss weights the classes ({weighted})")
            return Finding(name, "pass", f"{self.name}: {what} (more than {self.max_imbalance:g}); not warned about: "
                           + "; ".join(why) + ".", ratio, self.max_imbalance, step, details=details)
        multilabel = kind == "labels" and int(c[0].numel()) > 1
        # the rarest class (label side) as it occurs in the whole training set, estimated from the rows read
        rarest = float(c.min()) if kind == "classes" else float(torch.minimum(pos, neg)[j])
        if s.population and s.population > s.rows:
            rarest *= s.population / s.rows
        details["rarest_examples"], details["head_bias_init"], details["multilabel"] = rarest, bias_init, multilabel
        extreme = not multilabel and (ratio > EXTREME_IMBALANCE or rarest < MIN_CLASS_EXAMPLES)
        if ratio > self.max_imbalance and not extreme and (bias_init or multilabel):
            why = ("HeadBiasInit sets the head bias to the class prior, so training starts at the right loss"
                   if bias_init else "rare labels are the norm of a multilabel task; the loss treats each label "
                   "on its own")
            return Finding(name, "note", f"{self.name}: class imbalance: {what} (more than {self.max_imbalance:g}); "
                           f"a note, not a warning: {why}. Watch per-class metrics, not accuracy.", ratio,
                           self.max_imbalance, step, list(_IMBALANCE), details)
        if ratio > self.max_imbalance:
            why = (f" The rarest class has about {rarest:.3g} examples in the training set (fewer than "
                   f"{MIN_CLASS_EXAMPLES}): too few to learn it or to measure it." if rarest < MIN_CLASS_EXAMPLES else
                   f" Beyond {EXTREME_IMBALANCE:g}:1 a model can reach a low loss while never predicting the rare "
                   "class." if ratio > EXTREME_IMBALANCE else
                   " No HeadBiasInit sets the head bias to the prior, so training starts far from the right loss.")
            return Finding(name, "warn", f"{self.name}: heavy class imbalance: {what} (more than {self.max_imbalance:g})."
                           f"{why} Watch per-class metrics, not accuracy. HINT: add HeadBiasInit, weight the loss, "
                           "or pass `max_imbalance=` to change the threshold.", ratio, self.max_imbalance, step,
                           list(_IMBALANCE), details)
        return Finding(name, "pass", f"{self.name}: {what}.", ratio, self.max_imbalance, step, details=details)

    def _leak(self, s: "_Scan", step: int, loss: Optional[Callable]) -> Finding:
        name = f"{self.name}.leak"
        x, y = s.first if s.first is not None else (None, None)
        ignore = getattr(loss, "ignore_index", None)
        best: Optional[tuple[str, dict[str, Any]]] = None
        if isinstance(y, Tensor):
            for tname, t in _tensors(x):
                a = token_alignment(t, y, ignore if isinstance(ignore, int) else None)
                if a is not None and (best is None or a["equal"] > best[1]["equal"]):
                    best = (tname, a)
        if best is None:
            return Finding(name, "skip", f"{self.name}: no class-index targets with an integer input of the same "
                           "shape: nothing to compare (float targets equal to the inputs, as in an autoencoder, are "
                           "legitimate and never flagged).", step=step)
        tname, a = best
        where = "" if tname == "inputs" else f" `{tname}`"
        numbers = (f"{a['equal']:.1%} of the {a['positions']} labelled target positions of the first batch equal the "
                   f"input{where} at the same position")
        if a["shifted"] is not None:
            numbers += f", {a['shifted']:.1%} the input at the next position"
        details = {"input": tname, **a}
        limit = self.max_copied_targets
        if a["equal"] > limit:
            return Finding(name, "fail", f"{self.name}: the targets are a copy of the inputs: {numbers} (expected at "
                           f"most {limit:.1%}). A model that copies its input reaches a loss near 0 and learns "
                           "nothing. HINT: for next-token prediction shift the targets by one (`x, y = tokens[:, :-1], "
                           "tokens[:, 1:]`); for a copy task (the target is meant to be the input) pass "
                           "`max_copied_targets=1.0`.", a["equal"], limit, step, list(_LEAK), details)
        if a["shifted"] is not None and a["shifted"] >= NEXT_TOKEN_FRACTION:
            return Finding(name, "pass", f"{self.name}: the targets are the inputs shifted by one position (next-token "
                           f"prediction): {numbers}.", a["equal"], limit, step, details=details)
        what = ("a copy of the inputs (allowed by `max_copied_targets={:g}`)".format(limit) if a["equal"] == 1.0 else
                "mostly a copy of the inputs, as in a correction or denoising task (only a copy of more than "
                f"max_copied_targets={limit:g} of the positions fails)" if a["equal"] >= NEXT_TOKEN_FRACTION else
                "not a copy")
        return Finding(name, "pass", f"{self.name}: the targets are {what}: {numbers}.", a["equal"], limit, step,
                       details=details)

    def _input_norm(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                    s: "_Scan") -> Optional[tuple[str, nn.Module]]:
        """The first layer the first batch's inputs reach, ``(name, module)``, when it is a normalisation layer that
        receives as many values as the inputs hold (one probe forward, as the shared context's: eval mode, no grad,
        private random state)."""
        x = s.first_inputs
        if not isinstance(x, Tensor):
            return None
        seen: list[tuple[nn.Module, tuple]] = []
        handles = []
        try:
            for m in pl_module.modules():
                if _stateful_leaf(m):
                    handles.append(m.register_forward_pre_hook(lambda mod, a: None if seen else seen.append((mod, a))))
            with probe_mode(trainer, pl_module):
                run_forward(pl_module, x, self._settings.forward)
        except Exception:  # a forward that cannot run here (or a module that takes no hook): no note, the warning stays
            return None
        finally:
            for h in handles:
                h.remove()
        if not seen:
            return None
        mod, args = seen[0]
        fed = args[0] if args and isinstance(args[0], Tensor) else None
        if not isinstance(mod, _PER_FEATURE_NORMS + _PER_EXAMPLE_NORMS) or fed is None or fed.numel() != x.numel():
            return None
        return next((n for n, m in pl_module.named_modules() if m is mod), type(mod).__name__), mod

    # -- figure -----------------------------------------------------------------------------------------------------
    def _draw(self, trainer: "pl.Trainer", first: tuple[Any, Any]) -> None:
        from lightning_recipe.loggers import log_figure

        x, y = first
        tensors = _tensors(x)
        if not tensors:
            return
        try:
            fig = plot_first_batch(tensors[0][1], y if isinstance(y, Tensor) else None, self.layout, self.decode)
        except Exception as err:  # a figure must never stop the fit
            rank_zero_warn(f"{self.name}: could not draw the first batch: {err}", category=RecipeWarning)
            return
        path = log_figure(trainer, "recipe/data_first_batch", fig, trainer.global_step, self._dir)
        if path and path not in self.figures:
            self.figures.append(path)

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.done = False  # a checkpoint restored after this brings back `done`



# -- pure helpers -------------------------------------------------------------------------------------------------
def row_hashes(rows: Tensor, seed: int = 0) -> Tensor:
    """Two independent 64-bit hashes of each row's raw values: ``(N, ...)`` → ``(N, 2)`` int64.

    Rows are equal exactly when their values are bitwise equal (``-0.0`` counts as ``0.0``); each hash is a linear
    form with random odd 64-bit coefficients over the mixed integer view of the values (wrap-around arithmetic), so
    two different rows collide with probability about ``2**-128``.

    Args:
        rows: a tensor whose first dimension indexes the rows.
        seed: seeds the coefficients (the same seed gives comparable hashes).

    Example::

        >>> h = row_hashes(torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0]]))
        >>> bool((h[0] == h[2]).all()), bool((h[0] == h[1]).all())
        (True, False)
    """
    v = _int_view(rows)
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-(2**62), 2**62, (2, v.shape[1]), generator=g, dtype=torch.int64) * 2 + 1
    v = v * -7046029254386353131  # mix the bits before the linear form
    v = v ^ (v >> 31)
    return torch.stack([(v * w[0]).sum(1), (v * w[1]).sum(1)], dim=1)


def duplicate_fraction(hashes: Tensor, population: Optional[int] = None) -> tuple[float, int]:
    """Fraction of rows that are extra copies, from row hashes ``(k, 2)`` of ``k`` rows read out of ``population``.

    With every row read it is ``1 - unique / k``; from a sample of ``k`` out of ``n`` rows the ``P`` equal pairs in
    the sample estimate it as ``P (n - 1) / (k (k - 1))`` (exact for pairs, capped at 1). Returns the fraction and
    ``P``.

    Example::

        >>> h = row_hashes(torch.arange(10.0).repeat(2).reshape(-1, 1))
        >>> duplicate_fraction(h)
        (0.5, 10)
    """
    k = hashes.shape[0]
    if k < 2:
        return 0.0, 0
    _, counts = torch.unique(hashes, dim=0, return_counts=True)
    pairs = int((counts * (counts - 1) // 2).sum())
    n = population if population is not None else k
    if n <= k:
        return 1.0 - counts.numel() / k, pairs
    return min(1.0, pairs * (n - 1) / (k * (k - 1))), pairs


def _head_bias_in_use(trainer: "pl.Trainer") -> bool:
    """Whether a callback of the trainer (or of a bundle it holds) sets the head bias to the prior this fit."""
    stack = list(trainer.callbacks)
    while stack:
        cb = stack.pop()
        if getattr(cb, "_sets_head_bias", False) and not getattr(cb, "skip", False):
            return True
        stack.extend(c for c in (getattr(cb, "callbacks", None) or []) if c is not cb)
    return False


def off_scale(mean: Tensor, std: Tensor, max_abs: Tensor, factor: float = 10.0) -> Tensor:
    """Which features are far from a standardised scale: too large, ``|mean| > factor`` or ``std > factor`` (raw
    pixels 0-255, an income in dollars), or too small, ``0 < max |x| < 1 / factor**2`` (every value of the feature
    under 0.01 in magnitude: a feature in the wrong unit). The small side is judged by the feature's magnitude, not
    its spread: a nearly constant feature (a border pixel that is almost always 0, a rare one-hot column) has a tiny
    std but values of the usual size, and is on scale; so is any feature within [0, 1] or [-1, 1] that reaches 0.01.
    Constant features (``std == 0``) are not judged.

    Args:
        mean: per-feature mean.
        std: per-feature standard deviation.
        max_abs: per-feature largest ``|x|``.
        factor: how far from mean 0 / std 1 a feature may be.

    Example::

        >>> mean, std = torch.tensor([0.1, 120.0, 0.0, 0.0, 5e-5]), torch.tensor([1.2, 70.0, 0.0, 1e-3, 1.7e-3])
        >>> off_scale(mean, std, torch.tensor([4.0, 255.0, 0.0, 3e-3, 0.0625])).tolist()  # the last: a border pixel
        [False, True, False, True, False]
    """
    return (mean.abs() > factor) | (std > factor) | ((std > 0) & (max_abs < 1.0 / factor**2))


def token_alignment(inputs: Tensor, targets: Tensor, ignore_index: Optional[int] = None) -> Optional[dict[str, Any]]:
    """How class-index targets line up with integer inputs of the same shape (token ids, categories).

    ``equal``: the fraction of labelled positions whose target equals the input at the same position (1.0 when the
    targets are a copy of the inputs). ``shifted``: for ``(N, T)`` tensors with ``T > 1``, the fraction of labelled
    positions ``t < T - 1`` whose target equals the input at ``t + 1`` (1.0 for next-token prediction,
    ``x, y = s[:, :-1], s[:, 1:]``), else ``None``. Targets that are negative (``ignore_index=-100``) or equal to
    ``ignore_index`` are not labelled. ``None`` when the two cannot be compared: float, bool or ``uint8`` (image)
    inputs, float or bool targets, different shapes, or no labelled position. One host sync.

    Example::

        >>> s = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
        >>> token_alignment(s[:, :-1], s[:, 1:])
        {'equal': 0.0, 'shifted': 1.0, 'positions': 6}
        >>> token_alignment(s[:, :-1], s[:, :-1])["equal"]
        1.0
    """
    if (inputs.ndim == 0 or inputs.shape != targets.shape or inputs.is_floating_point() or inputs.is_complex()
            or inputs.dtype in (torch.bool, torch.uint8) or targets.is_floating_point() or targets.is_complex()
            or targets.dtype == torch.bool):
        return None
    valid = labelled_positions(targets, ignore_index)
    sums = [valid.sum(), (valid & (inputs == targets)).sum()]
    if inputs.ndim == 2 and inputs.shape[1] > 1:
        v = valid[:, :-1]
        sums += [v.sum(), (v & (targets[:, :-1] == inputs[:, 1:])).sum()]
    counts = torch.stack(sums).tolist()  # the one host sync
    if counts[0] == 0:
        return None
    shifted = counts[3] / counts[2] if len(counts) == 4 and counts[2] else None
    return {"equal": counts[1] / counts[0], "shifted": shifted, "positions": int(counts[0])}


def labelled_positions(targets: Tensor, ignore_index: Optional[int] = None) -> Tensor:
    """Where class-index targets carry a label: not negative (``-100``, PyTorch's default ``ignore_index``) and not
    ``ignore_index``.

    Example::

        >>> labelled_positions(torch.tensor([[3, -100, 0]]), ignore_index=0).tolist()
        [[True, False, False]]
    """
    keep = targets >= 0
    return keep & (targets != ignore_index) if ignore_index is not None else keep


# -- private --------------------------------------------------------------------------------------------------------
def _class_weighting(loss: Optional[Callable], kind: str, counts: Any, label: int = 0) -> tuple[Optional[str], bool]:
    """How the loss weights the classes (``kind`` ``"classes"``) or the positives (``"labels"``), or ``None``; and
    whether that weight works against the imbalance (the rarest class, or the minority side of the most imbalanced
    label, weighted less than the most frequent one: the imbalance made worse).

    Example::

        >>> bce = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([0.03]))
        >>> _class_weighting(bce, "labels", (torch.tensor([30.0]), 1000))  # 30 positives of 1000, weighted down
        ('`pos_weight=` of BCEWithLogitsLoss', True)
    """
    attr = "weight" if kind == "classes" else "pos_weight"
    w = getattr(loss, attr, None)
    if not isinstance(w, Tensor) or w.numel() == 0:
        return None, False
    w = w.detach().float().cpu().reshape(-1)
    if bool((w == (w[0] if kind == "classes" else 1)).all()):  # uniform class weights, or pos_weight 1
        return None, False
    name = f"`{attr}=` of {type(loss).__name__}"
    if kind == "classes":
        if w.numel() != len(counts):
            return name, False
        c = torch.as_tensor(counts, dtype=torch.float64)
        against = bool(w[int(c.argmin())] < w[int(c.argmax())])
    else:
        pos, n = counts
        pw = float(w[label] if w.numel() > label else w[0])
        minority_positive = float(pos[label]) < n - float(pos[label])
        against = pw < 1 if minority_positive else pw > 1
    return name, against


def _stateful_leaf(m: nn.Module) -> bool:
    """A module without children that holds parameters or buffers of its own (not a reshape, an activation, ...), or
    a normalisation layer (``InstanceNorm1d`` without ``affine`` holds neither)."""
    own = next(m.parameters(recurse=False), None) is not None or next(m.buffers(recurse=False), None) is not None
    return (own or isinstance(m, _PER_FEATURE_NORMS + _PER_EXAMPLE_NORMS)) and next(m.children(), None) is None


def _to_cpu(x: Any) -> Any:
    from lightning_utilities.core.apply_func import apply_to_collection

    return apply_to_collection(x, Tensor, lambda t: t.detach().cpu())


def _tensors(x: Any) -> list[tuple[str, Tensor]]:
    """The tensors of an input (a tensor, or a dict/sequence of them) with a batch dimension, named."""
    if isinstance(x, Tensor):
        return [("inputs", x)] if x.ndim >= 1 else []
    if isinstance(x, dict):
        return [(str(k), v) for k, v in x.items() if isinstance(v, Tensor) and v.ndim >= 1]
    if isinstance(x, (list, tuple)):
        return [(f"inputs[{i}]", v) for i, v in enumerate(x) if isinstance(v, Tensor) and v.ndim >= 1]
    return []


def _cat(items: list[Any]) -> Any:
    """Concatenate batches along the first dimension: tensors, or dicts/tuples of tensors (None stays None)."""
    first = items[0]
    if first is None:
        return None
    if isinstance(first, Tensor):
        return torch.cat(items) if first.ndim else first
    if isinstance(first, dict):
        return {k: _cat([it[k] for it in items]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_cat([it[i] for it in items]) for i in range(len(first))) if not hasattr(first, "_fields") \
            else type(first)(*(_cat([it[i] for it in items]) for i in range(len(first))))
    raise TypeError(f"cannot concatenate {type(first).__name__}")


def _int_view(rows: Tensor) -> Tensor:
    """Rows as ``(N, D)`` int64 holding the exact bits of the values."""
    x = rows.reshape(rows.shape[0], -1) if rows.ndim else rows.reshape(1, 1)
    if x.dtype == torch.bool:
        return x.long()
    if x.is_complex():
        x = torch.view_as_real(x).reshape(x.shape[0], -1)
    if x.is_floating_point():
        x = torch.where(x == 0, torch.zeros_like(x), x).contiguous()
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
        return x.view(bits).long()
    return x.long()


def _is_image(x: Tensor, layout: str) -> bool:
    if layout == "image":
        return x.ndim >= 3
    if layout == "features":
        return False
    return x.ndim >= 3


def _feature_matrix(x: Tensor, layout: str) -> Tensor:
    """``(M, F)`` values per feature: features of 2-D inputs, channels of images, the last dim for sequences."""
    if x.ndim == 1:
        return x.reshape(-1, 1)
    if x.ndim == 2:
        return x
    if _is_image(x, layout):
        if x.ndim == 3:
            return x.reshape(-1, 1)
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def _judged(x: Tensor, layout: str) -> bool:
    """Whether the scale of ``x`` is judged: real values, or ``uint8`` images; not token ids or booleans."""
    if x.dtype == torch.bool:
        return False
    if x.is_floating_point():
        return True
    return x.dtype == torch.uint8 and _is_image(x, layout)


def _figure(width: float, height: float):  # noqa: ANN202
    """A plain figure: no constrained layout (it costs seconds for a grid of small panels)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.04, right=0.98, bottom=0.06, top=0.88, wspace=0.15, hspace=0.45)
    return fig


class _Scan:
    """Running statistics of the rows read (CPU, float64): bounded memory except the hashes (16 bytes a row)."""

    _MAX_COLS = 256
    _CHUNK = 2**20

    def __init__(self, layout: str) -> None:
        self.layout = layout
        self.rows = 0
        self.batches = 0  # batches read
        self.timed_out = False  # the scan stopped at its time budget (SCAN_SECONDS) before `max_batches`
        self.population: Optional[int] = None
        self.width: Optional[int] = None
        self.first: Optional[tuple[Any, Any]] = None
        self.first_inputs: Any = None  # the first batch's inputs on the device
        self.target_shape: Optional[tuple[int, ...]] = None  # of one example's targets
        self.target_float = False
        self.nonfinite_x = 0
        self.nonfinite_y = 0
        self._nonfinite_feat: dict[tuple[str, int], int] = {}
        self._hashes: list[Tensor] = []
        self._label_hashes: list[Tensor] = []
        self._cols: list[Tensor] = []
        self._col_idx: Optional[Tensor] = None
        self._stats: dict[str, dict[str, Any]] = {}
        self._targets: list[Tensor] = []
        self._unique: Optional[int] = None
        self._pending: list[tuple[Any, Any, Any]] = []
        self._pending_size = 0
        self.discrete = False  # integer inputs other than uint8 images: token ids, categories

    def add(self, x: Any, y: Any, hx: Any) -> None:
        """Buffer a batch; batches are processed in chunks of about a million values (fewer, larger tensor ops)."""
        tensors = _tensors(x)
        if not tensors:
            return
        if self.rows == 0 and not self._pending:
            # discrete: integer inputs (other than uint8 images) and no continuous floating column beside them (a
            # 0/1 mask is not continuous; the numeric columns of a categorical + numeric table are)
            ints = [t for _, t in tensors if not t.is_floating_point() and t.dtype not in (torch.uint8, torch.bool)]
            floats = [t for _, t in tensors if t.is_floating_point()]
            self.discrete = bool(ints) and not any(bool((f != f.round()).any()) for f in floats)
        self._pending.append((x, y, hx))
        self._pending_size += sum(t.numel() for _, t in tensors)
        if self._pending_size >= self._CHUNK:
            self.finish()

    def read(self) -> str:
        """How much was read: the batches, and whether the time budget stopped the scan."""
        out = f"{self.batches} batch{'es' if self.batches != 1 else ''}"
        if self.timed_out:
            out += f", stopped by the scan's time budget of {_labels.SCAN_SECONDS:g} s of loading"
        return out

    def finish(self) -> None:
        """Process the buffered batches."""
        pending, self._pending, self._pending_size = self._pending, [], 0
        if not pending:
            return
        if len(pending) > 1:
            try:
                merged = [_cat([p[i] for p in pending]) for i in range(3)]
            except (RuntimeError, TypeError, ValueError):
                merged = None
            if merged is not None:
                pending = [(merged[0], merged[1], merged[2])]
        for x, y, hx in pending:
            self._process(x, y, hx)

    def _process(self, x: Any, y: Any, hx: Any) -> None:
        tensors = _tensors(x)
        n = tensors[0][1].shape[0]
        self.rows += n
        for name, t in tensors:
            if t.shape[0] != n:
                continue
            if t.is_floating_point() or t.is_complex():
                bad = ~torch.isfinite(t)
                count = int(bad.sum())
                self.nonfinite_x += count
                if count:
                    per = bad.reshape(-1, 1) if t.ndim == 1 else _feature_matrix(bad, self.layout).sum(0)
                    for j in torch.nonzero(per.reshape(-1)).reshape(-1).tolist():
                        key = (name, j)
                        self._nonfinite_feat[key] = self._nonfinite_feat.get(key, 0) + int(per.reshape(-1)[j])
            if _judged(t, self.layout):
                self._accumulate(name, t)
        if isinstance(y, Tensor):
            if self.target_shape is None:
                self.target_shape, self.target_float = tuple(y.shape[1:]), y.is_floating_point()
            if y.is_floating_point():
                self.nonfinite_y += int((~torch.isfinite(y)).sum())
            self._targets.append(y.reshape(y.shape[0], -1) if y.ndim else y.reshape(1, 1))
            if y.ndim and y.shape[0] == n:
                self._label_hashes.append(row_hashes(y))
        hashed = [t for _, t in _tensors(hx) if t.shape[0] == n]
        if not hashed:
            hashed = [t for _, t in tensors if t.shape[0] == n]
        v = torch.cat([_int_view(t) for t in hashed], dim=1)
        if self.width is None:
            self.width = v.shape[1]
            self._col_idx = torch.linspace(0, v.shape[1] - 1, min(v.shape[1], self._MAX_COLS)).round().long().unique()
        self._hashes.append(row_hashes(v))
        if v.shape[1] == self.width and self._col_idx is not None:
            self._cols.append(v[:, self._col_idx])

    def _accumulate(self, name: str, t: Tensor) -> None:
        m = _feature_matrix(t, self.layout).double()
        finite = torch.isfinite(m)
        all_finite = bool(finite.all())
        m0 = m if all_finite else torch.where(finite, m, torch.zeros_like(m))
        s = self._stats.setdefault(name, {
            "n": torch.zeros(m.shape[1], dtype=torch.float64), "s1": torch.zeros(m.shape[1], dtype=torch.float64),
            "s2": torch.zeros(m.shape[1], dtype=torch.float64), "binary": torch.ones(m.shape[1], dtype=torch.bool),
            "absmax": torch.zeros(m.shape[1], dtype=torch.float64),
            "min": math.inf, "max": -math.inf, "image": _is_image(t, self.layout),
        })
        if s["n"].shape[0] != m.shape[1]:
            return
        s["n"] += finite.sum(0)
        s["s1"] += m0.sum(0)
        s["s2"] += (m0 * m0).sum(0)
        s["binary"] &= ((m0 == 0) | (m0 == 1)).all(0)
        if m0.shape[0]:
            s["absmax"] = torch.maximum(s["absmax"], m0.abs().amax(0))
        vals = m if all_finite else m[finite]
        if vals.numel():
            lo, hi = torch.aminmax(vals)
            s["min"], s["max"] = min(s["min"], float(lo)), max(s["max"], float(hi))

    # -- summaries ------------------------------------------------------------------------------------------------
    def nonfinite_features(self) -> list[tuple[str, int]]:
        return [(f"{name}[{j}]" if name != "inputs" else str(j), c) for (name, j), c in self._nonfinite_feat.items()]

    def scale_summary(self, factor: float) -> Optional[dict[str, Any]]:
        off: list[str] = []
        judged = 0
        worst: Optional[dict[str, Any]] = None
        lo, hi, image = math.inf, -math.inf, False
        for name, s in self._stats.items():
            n = s["n"].clamp_min(1)
            mean = s["s1"] / n
            std = (s["s2"] / n - mean**2).clamp_min(0).sqrt()
            mask = ~s["binary"] & (s["n"] > 1) & (std > 0)
            if not mask.any():
                continue
            image = image or s["image"]
            lo, hi = min(lo, s["min"]), max(hi, s["max"])
            absmax = s["absmax"]
            bad = off_scale(mean, std, absmax, factor) & mask
            judged += int(mask.sum())
            off += [f"{name}[{j}]" if name != "inputs" else str(j) for j in torch.nonzero(bad).reshape(-1).tolist()]
            # how far off, in units of `factor`: too large by |mean| or std, too small by the largest magnitude
            score = torch.maximum(torch.maximum(mean.abs(), std), 1.0 / (factor * absmax.clamp_min(1e-300)))
            score = torch.where(mask, score, torch.full_like(score, -1.0))
            j = int(score.argmax())
            if worst is None or float(score[j]) > worst["score"]:
                worst = {"tensor": name, "index": j, "mean": float(mean[j]), "std": float(std[j]),
                         "max_abs": float(absmax[j]), "score": float(score[j])}
        if worst is None:
            return None
        return {"off": off, "judged": judged, "worst": worst, "min": lo, "max": hi, "image": image}

    def hash_keys(self) -> Tensor:
        """One int64 key per row (the two hashes combined; collisions ~2**-64 per pair)."""
        h = torch.cat(self._hashes) if self._hashes else torch.zeros(0, 2, dtype=torch.int64)
        return h[:, 0] * 1000003 ^ h[:, 1]

    @property
    def unique(self) -> int:
        if self._unique is None:
            h = torch.cat(self._hashes) if self._hashes else torch.zeros(0, 2, dtype=torch.int64)
            self._unique = int(torch.unique(h, dim=0).shape[0])
        return self._unique

    def duplicate_fraction(self) -> tuple[float, int, bool]:
        h = torch.cat(self._hashes) if self._hashes else torch.zeros(0, 2, dtype=torch.int64)
        frac, pairs = duplicate_fraction(h, self.population)
        exact = self.population is None or self.population <= self.rows
        return frac, pairs, exact

    def conflicting_labels(self) -> int:
        """Duplicated inputs whose labels differ (label noise)."""
        if not self._label_hashes or sum(h.shape[0] for h in self._label_hashes) != self.rows:
            return 0
        keys = self.hash_keys()
        lab = torch.cat(self._label_hashes)
        lkey = lab[:, 0] * 1000003 ^ lab[:, 1]
        pairs = torch.unique(torch.stack([keys, lkey], 1), dim=0)
        return int(pairs.shape[0] - torch.unique(keys).shape[0])

    def chance_free(self) -> bool:
        """Whether equal rows cannot arise by chance: a continuous column, or an input space much larger than k².

        Never for integer inputs other than uint8 images (token ids, categories): text and categorical data repeat
        naturally (a phrase in two windows of a corpus), so their duplicates and overlap only warn.
        """
        if self.discrete:
            return False
        if not self._cols:
            return True
        cols = torch.cat(self._cols)
        k = cols.shape[0]
        s = cols.sort(0).values
        distinct = 1 + (s[1:] != s[:-1]).sum(0) if k > 1 else torch.ones(cols.shape[1], dtype=torch.long)
        if int(distinct.max()) >= max(2, k // 2):
            return True
        log_space = float(distinct.double().log().sum())
        return log_space > 2 * math.log(max(k, 2)) + math.log(100)

    @property
    def per_position(self) -> bool:
        """Whether the targets hold a class per position (token sequences, segmentation maps), not one per example:
        class indices with more than one value per example, 0/1 floats with at least 2 dimensions beyond N
        (``(N, L)`` floats are the labels of a multilabel task)."""
        if self.target_shape is None:
            return False
        return len(self.target_shape) >= 2 if self.target_float else math.prod(self.target_shape) > 1

    def class_counts(self) -> Optional[tuple[str, Any]]:
        if not self._targets:
            return None
        y = torch.cat([t for t in self._targets if t.shape[1:] == self._targets[0].shape[1:]])
        if y.dtype == torch.bool:
            y = y.float()
        if not y.is_floating_point():
            v = y.reshape(-1)
            v = v[v >= 0]
            if v.numel() == 0:
                return None
            return "classes", torch.bincount(v, minlength=int(v.max()) + 1).double()
        finite = torch.isfinite(y).all(1)
        y = y[finite]
        if y.numel() == 0 or not bool(((y == 0) | (y == 1)).all()):
            return None
        return "labels", (y.double().sum(0), float(y.shape[0]))


def plot_first_batch(
    inputs: Tensor,
    targets: Optional[Tensor] = None,
    layout: str = "auto",
    decode: Optional[Callable[[list[int]], str]] = None,
    max_items: int = 16,
    max_features: int = 8,
):  # noqa: ANN201
    """The first batch exactly as it goes into the network.

    Image-like inputs (``(N, C, H, W)``, ``(N, H, W)``): a grid of up to ``max_items`` images (tiles of one image, so
    it draws as fast as one panel) with their labels above, one colour scale for the whole batch (its range in the title, so that unscaled values show); RGB when
    ``C == 3``, else the first channel. Integer 2-D inputs (token ids): the first rows, decoded with ``decode`` when
    given, else the ids. Anything else: a histogram per feature (up to ``max_features``) with its mean and std, and
    one of the targets.

    Example::

        >>> fig = plot_first_batch(torch.rand(8, 1, 6, 6) * 255, torch.arange(8))
        >>> [t.get_text() for t in fig.axes[0].texts][:3]
        ['y=0', 'y=1', 'y=2']
    """
    x = inputs.detach().cpu()
    y = targets.detach().cpu() if isinstance(targets, Tensor) else None

    def label(i: int) -> str:
        if y is None or y.ndim == 0 or i >= y.shape[0]:
            return ""
        v = y[i]
        return f"y={v.item():.4g}" if v.numel() == 1 else f"y={v.reshape(-1)[:4].tolist()}"

    if x.dtype != torch.bool and not x.is_floating_point() and x.ndim == 2 and x.dtype != torch.uint8:
        rows = min(x.shape[0], 8)
        fig = _figure(12, 0.6 * rows + 1)
        ax = fig.add_subplot()
        ax.axis("off")
        lines = []
        for i in range(rows):
            ids = x[i].tolist()
            text = decode(ids) if decode is not None else " ".join(str(t) for t in ids[:48]) + (" ..." if len(ids) > 48 else "")
            lines.append(f"[{i}] {label(i)}  {text!s}"[:200])
        ax.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=8, transform=ax.transAxes)
        ax.set_title("First batch: " + ("decoded token ids" if decode is not None else "token ids (pass `decode=` for text)"))
        return fig
    xf = x.float()
    if _is_image(x, layout) and x.ndim in (3, 4):
        imgs = (xf if x.ndim == 3 else (xf.permute(0, 2, 3, 1) if x.shape[1] == 3 else xf[:, 0])).numpy()
        n = min(imgs.shape[0], max_items)
        cols = min(n, 4) if n else 1
        rows = max(1, math.ceil(n / cols))
        lo, hi = float(xf.min()), float(xf.max())
        # one image of tiles on one axes (a grid of axes costs ~30 ms a panel to draw); the gap above a tile holds
        # its label
        h, w = imgs.shape[1], imgs.shape[2]
        gap = max(1, math.ceil(0.2 * h))
        rgb = imgs.ndim == 4
        canvas = np.full((rows * (h + gap), cols * (w + 1) + 1) + ((3,) if rgb else ()), 1.0 if rgb else np.nan)
        for i in range(n):
            r, c = divmod(i, cols)
            tile = np.clip((imgs[i] - lo) / max(hi - lo, 1e-12), 0, 1) if rgb else imgs[i]
            canvas[r * (h + gap) + gap:(r + 1) * (h + gap), c * (w + 1) + 1:(c + 1) * (w + 1)] = tile
        fig = _figure(1.8 * cols, (1.8 * cols) * canvas.shape[0] / canvas.shape[1] + 0.6)
        ax = fig.add_axes((0.01, 0.01, 0.98, 1 - 0.02 - 0.5 / fig.get_figheight()))
        ax.axis("off")
        if rgb:
            ax.imshow(canvas, interpolation="nearest", aspect="auto")
        else:
            import matplotlib

            cmap = matplotlib.colormaps["gray"].with_extremes(bad="white")
            ax.imshow(canvas, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest", aspect="auto")
        for i in range(n):
            r, c = divmod(i, cols)
            ax.text(c * (w + 1) + 1 + w / 2, r * (h + gap) + gap - 0.5, label(i), ha="center", va="bottom", fontsize=8)
        fig.suptitle(f"First batch as the network sees it: {tuple(x.shape)} {str(x.dtype).replace('torch.', '')}, "
                     f"values in [{lo:.4g}, {hi:.4g}], mean {float(xf.mean()):.3g}, std {float(xf.std()):.3g}", fontsize=9)
        return fig
    m = _feature_matrix(xf, layout)
    k = min(m.shape[1], max_features)
    extra = 1 if y is not None and y.numel() else 0
    cols = min(k + extra, 4)
    rows = max(1, math.ceil((k + extra) / cols))
    fig = _figure(3 * cols, 2.2 * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(-1)
    for j, ax in enumerate(axes):
        if j < k:
            v = m[:, j].numpy()
            v = v[np.isfinite(v)]
            _histogram(ax, v, f"feature {j}: mean {v.mean() if v.size else float('nan'):.3g}, std "
                       f"{v.std() if v.size else float('nan'):.3g}", "tab:blue")
        elif j == k and extra:
            _histogram(ax, y.float().reshape(-1).numpy(), "targets", "tab:orange")
        else:
            ax.axis("off")
    fig.suptitle(f"First batch as the network sees it: {tuple(x.shape)}, {m.shape[1]} features"
                 + (f" (first {k} shown)" if k < m.shape[1] else ""), fontsize=9)
    return fig


def _histogram(ax: Any, v: np.ndarray, title: str, color: str) -> None:
    """A histogram panel without ticks (they cost most of a panel's drawing time): the range is written under it."""
    ax.hist(v, bins=20, color=color, histtype="stepfilled")  # one patch, not one per bin
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)
    if v.size:
        ax.set_xlabel(f"{v.min():.3g} .. {v.max():.3g}", fontsize=7, labelpad=1)
