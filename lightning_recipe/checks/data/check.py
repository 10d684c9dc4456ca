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
* validation data distributed differently from the training data: inputs on another scale, validation standardized
  with its own statistics, labels far from the training labels (warn; a moderate shift is a note);

and a figure of the first batch exactly as it goes into the network (after ``transfer_batch_to_device`` and
``on_after_batch_transfer``) is saved through the loggers: an image grid, per-feature histograms, or decoded
token ids.
"""

from __future__ import annotations

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
from lightning_recipe._core.labels import (
    _private_loader,
    _single_loader,
    _to_device,
    first_batch,
    is_iterable,
    read_batches,
    weighted_sampler,
)
from lightning_recipe._core.memory import paused_gc
from lightning_recipe._core.scan import _Scan, _tensors, _to_cpu
from lightning_recipe.exceptions import RecipeConfigError, RecipeWarning
from lightning_recipe.checks.data.rules import _DataRules
from lightning_recipe.functional.data import (
    _INPUT_WEIGHT_LAYERS,
    _PER_EXAMPLE_NORMS,
    _PER_FEATURE_NORMS,
    _stateful_leaf,
    off_scale,
)
from lightning_recipe.report.plotting import plot_first_batch


Layout = Literal["auto", "image", "features"]


class DataCheck(_DataRules, _OnceCheck):
    """Check the training data before the first step and show exactly what goes into the network.

    What is read: at ``on_train_start`` at most ``max_batches`` batches of a private loader over the training dataset
    (its collate function and worker settings, workers not persistent; a random order from a private generator seeded
    with 0), and as many of the validation dataset; each scan also stops reading after about 2 seconds
    (``lightning_recipe._core.labels.SCAN_SECONDS``; the ``finite`` finding says how many batches were read and whether the
    time budget stopped it). Everything below is computed on these rows, so the cost is bounded by ``max_batches``
    times the batch size, independent of the dataset length: one pass of reading, and hashing in
    ``O(rows x values per row)``. The scan streams: batches are processed in slices of at most 65536 values and
    only running sums, class counts, 16 bytes of hashes per row and a fixed reservoir of 1024 rows are kept (no row
    beyond the first batch, for the figure), so its memory does not grow with the data. An ``IterableDataset`` is never read here (a one-shot stream would lose the batches,
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
      features in mixed units, where it still warns), the scale of the raw inputs does not matter. Nor does it when
      the first weight layer the inputs reach (``Linear``, ``Conv``, ``RNN``) receives as many values as they hold,
      every feature of them on scale by the rule above: the model rescales its input in ``forward`` (reversible
      instance normalisation, RevIN, in forecasters fed raw windows; a stored mean and std).
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
      A ``skip`` when every validation row is a training row because both splits read the same inputs in the same
      order and their first batches differ in another part (a mask or an index: transductive node classification
      on one graph); the same loader twice, where nothing differs, is the overlap it is.
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
        favours the frequent side makes the imbalance worse, and is judged as no weight, saying so; or a training
        loader that draws with a ``WeightedRandomSampler`` (it sets the class mix the model sees; the counts
        reported are the dataset's).
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

    * **shift**: the validation data against the training data (skipped without a validation loader).

      - *inputs*, per judged feature (as for ``scale``; integer token ids are not compared): the standardized mean
        difference ``(mean_v - mean_t) / std_t`` and the std ratio ``std_v / std_t`` (features constant in training
        are not judged), each against its sampling error for ``n_t`` and ``n_v`` examples
        (:func:`~lightning_recipe.functional.data.scale_shift`: ``sqrt(1/n_t + 1/n_v)`` for the mean difference,
        ``sqrt((kurtosis - 1)(1/n_t + 1/n_v))`` for the variance ratio, so sparse pixels that happen to be all zero in
        validation are within it) at ``z`` such that a healthy split exceeds it on any of the ``D`` features with the
        chance of one 3-sigma event. A feature is *far* when beyond that and the means differ by more than one
        training std or the spreads by more than 2x. **warn** when at least half of the judged features are far (a
        preprocessing difference moves every feature: digits scaled by 1/16 for training and left raw for
        validation, median ratio 16, 60 of 61 pixels far), or when the validation rows of a 2-D input were
        standardized with their own statistics (every mean 0 and std 1 to within 1% of the sampling error
        ``1/sqrt(n_v)``, which the training statistics would leave: a shift hidden, not removed). A **note** when some
        features are beyond sampling error by more than 0.2 std or 1.25x (drift, a split by time or source: the
        last 297 rows of digits, another set of writers, are such a note).
      - *labels*, class indices (or each 0/1 label): the total variation distance between the class frequencies
        against ``½ sqrt((K - 1 + 3 sqrt(2 (K - 1))) (1/n_t + 1/n_v))``, the chi-square bound at 3 sigma
        (:func:`~lightning_recipe.functional.data.label_shift`; examples, not positions, count for labels per
        position). **warn** beyond it when the distance is at least 0.25 or classes are absent from validation that
        should appear at least 7 times each (a class-sorted data set split by position: validation holds 2 of 10
        digits, distance 0.8); a **note** beyond it otherwise.

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
                self._balance(train, step, loss, _head_bias_in_use(trainer), weighted_sampler(loader) is not None),
                self._shift_stream_skip(step) if val_stream else self._shift(train, val, step)]),
            self._leak(train, step, loss),
        ]
        if self.figure and trainer.is_global_zero and self._dir is not None and train.first is not None:
            with paused_gc():  # see its docstring
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
                if scan.first_raw is None:
                    scan.first_raw, scan.first_hx = _to_cpu(raw), hx
                scan.add(x, y, hx)
                if keep_first and scan.first is None:
                    scan.first = (x, y)
        scan.timed_out = bool(getattr(reader, "timed_out", False))
        scan.finish()
        if scan.rows == 0:
            self._config_error("the dataloader yielded no batch with an input tensor: nothing to check.")
            return None
        return scan


    def _input_norm(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                    s: "_Scan") -> Optional[tuple[str, nn.Module, bool]]:
        """How the model meets off-scale inputs, from one probe forward of the first batch (as the shared context's:
        eval mode, no grad, private random state): ``(name, module, False)`` when the first layer the inputs reach
        is a normalisation layer that receives as many values as the inputs hold; ``(name, module, True)`` when the
        first weight layer (``Linear``, ``Conv``, ``RNN``) receives as many values, every feature of them on a
        standardised scale (the model rescales its input in ``forward``: instance normalisation such as RevIN, a
        stored mean and std); ``None`` otherwise."""
        x = s.first_inputs
        if not isinstance(x, Tensor):
            return None
        seen: list[tuple[nn.Module, tuple]] = []

        def record(mod: nn.Module, args: tuple) -> None:
            if not seen or not isinstance(seen[-1][0], _INPUT_WEIGHT_LAYERS):  # up to the first weight layer
                seen.append((mod, args))

        handles = []
        try:
            for m in pl_module.modules():
                if _stateful_leaf(m) or isinstance(m, _INPUT_WEIGHT_LAYERS):
                    handles.append(m.register_forward_pre_hook(record))
            with probe_mode(trainer, pl_module):
                run_forward(pl_module, x, self._settings.forward)
        except Exception:  # a forward that cannot run here (or a module that takes no hook): no note, the warning stays
            return None
        finally:
            for h in handles:
                h.remove()

        def fed(args: tuple) -> Optional[Tensor]:
            t = args[0] if args and isinstance(args[0], Tensor) else None
            return t if t is not None and t.numel() == x.numel() and t.is_floating_point() else None

        def named(mod: nn.Module) -> str:
            return next((n for n, m in pl_module.named_modules() if m is mod), type(mod).__name__)

        if not seen:
            return None
        if isinstance(seen[0][0], _PER_FEATURE_NORMS + _PER_EXAMPLE_NORMS):
            return (named(seen[0][0]), seen[0][0], False) if fed(seen[0][1]) is not None else None
        mod, args = seen[-1]
        t = fed(args) if isinstance(mod, _INPUT_WEIGHT_LAYERS) else None
        if t is None:
            return None
        f = t.detach().float().reshape(t.shape[0], -1)
        mean, std, top = f.mean(0), f.std(0, unbiased=False), f.abs().amax(0)
        judged = std > 0
        if not bool(judged.any()) or bool((off_scale(mean, std, top, self.scale_factor) & judged).any()):
            return None
        return named(mod), mod, True

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
