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
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_recipe._core.base import OnFail, _OnceCheck
from lightning_recipe._core.conventions import find_loss, probe_mode, run_forward, split_batch
from lightning_recipe._core.head_guard import _head_bias_in_use
from lightning_recipe._core.labels import _private_loader, _single_loader, _to_device, first_batch, is_iterable, read_batches
from lightning_recipe._core.scan import _Scan, _tensors, _to_cpu
from lightning_recipe.exceptions import RecipeConfigError, RecipeWarning
from lightning_recipe.findings import Finding
from lightning_recipe.functional.data import (
    _PER_EXAMPLE_NORMS,
    _PER_FEATURE_NORMS,
    NEXT_TOKEN_FRACTION,
    _class_weighting,
    _stateful_leaf,
    token_alignment,
)
from lightning_recipe.report.plotting import plot_first_batch

Layout = Literal["auto", "image", "features"]

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
    (``lightning_recipe._core.labels.SCAN_SECONDS``; the ``finite`` finding says how many batches were read and whether the
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
        from lightning_recipe.report.loggers import log_figure

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
