"""The rules of ``DataCheck``: each reads the scans of the training and validation data and returns a finding."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from lightning_recipe._core.scan import _Scan, _tensors
from lightning_recipe.findings import Finding
from lightning_recipe.functional.data import (
    _PER_FEATURE_NORMS,
    LARGE_TV,
    NEXT_TOKEN_FRACTION,
    _class_weighting,
    familywise_z,
    label_shift,
    scale_shift,
    standardized_on_itself,
    token_alignment,
)

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
_SHIFT = [
    "validation scaled with its own statistics (a scaler fitted on each split) instead of the training set's",
    "forgot to scale the validation/test data (the transform applied to the training split only)",
    "a different preprocessing per split (another normalisation, resizing, colour order or augmentation at "
    "evaluation time)",
    "a different unit in one split (metres vs centimetres, 0-1 vs 0-255 pixels)",
]
_LABEL_SHIFT = [
    "a split by position of data sorted by class (or by time, source or file): shuffle before splitting, or split "
    "stratified by class",
    "a different class-index mapping per split (label encoders fitted on each split)",
    "validation data from another source or period than the training data",
]
# class balance: beyond this ratio, or with fewer examples of a class than this, an imbalance warns even when the head
# bias is set to the prior (a model can ignore the class; per-class metrics have too few examples to mean anything)
EXTREME_IMBALANCE = 1000.0
MIN_CLASS_EXAMPLES = 10
_IMBALANCE = [
    "heavy class imbalance: accuracy is misleading; HeadBiasInit sets the head bias to the class prior so the "
    "initial loss is right; consider class weights or resampling if the rare classes matter",
]



class _DataRules:
    """The judgements of :class:`~lightning_recipe.DataCheck`, mixed into it (they read its thresholds)."""

    def _val_stream_skip(self, step: int) -> Finding:
        return Finding(f"{self.name}.overlap", "skip", f"{self.name}: the validation data is an iterable dataset, "
                       "which only validation may read (a stream drawn from here would lose batches, or give "
                       "validation other ones): train/validation overlap not checked.", step=step)

    def _shift_stream_skip(self, step: int) -> Finding:
        return Finding(f"{self.name}.shift", "skip", f"{self.name}: the validation data is an iterable dataset, "
                       "which only validation may read: its distribution is not compared with the training data's.",
                       step=step)

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

    def _scale(self, s: "_Scan", step: int,
               input_norm: Callable[[], Optional[tuple[str, nn.Module, bool]]]) -> Finding:
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
            if norm is not None and norm[2]:
                details["input_rescaled"] = norm[0]
                return Finding(name, "pass", f"{self.name}: the raw inputs are off scale ({numbers}), but the first "
                               f"weight layer they reach, {layer}, receives them with every feature on a standardised "
                               "scale: the model rescales its own input in forward (instance normalisation such as "
                               "RevIN, a stored mean and std).", len(off) / judged, 0.0, step, details=details)
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
        within = _split_within_batch(train, val) if found == val.rows else None
        if frac > self.max_overlap and within is not None:
            return Finding(name, "skip", f"{self.name}: the training and validation batches hold the same inputs in the "
                           f"same order and differ only in {within}: one set of examples (a graph's nodes, a "
                           "sequence's positions) whose splits are chosen by a mask or an index in the batch "
                           f"(transductive training), so every validation row is a training row by design ({numbers}): "
                           "train/validation overlap not judged.", frac, self.max_overlap, step, details=details)
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

    def _balance(self, s: "_Scan", step: int, loss: Optional[Callable], bias_init: bool = False,
                 sampled: bool = False) -> Finding:
        name = f"{self.name}.balance"
        counts = s.class_counts()
        if counts is None:
            return Finding(name, "skip", f"{self.name}: the targets are not class indices or 0/1 labels: no class "
                           "balance to report.", step=step)
        kind, c = counts
        if kind == "classes":
            first = int((c > 0).nonzero().min()) if bool((c > 0).any()) else 0
            c = c[first:]  # labels offset by `first` (y - 5 in training_step): no class below it
            ratio = float(c.max() / c.min()) if c.min() > 0 else math.inf
            shown = ", ".join(f"{j}: {int(v)}" for j, v in enumerate(c.tolist()[:20], first)) + (" ..." if len(c) > 20 else "")
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
        details["sampled"] = sampled
        if ratio > self.max_imbalance and (s.per_position or weighted or sampled):
            why = []
            if s.per_position:
                shape = ", ".join(["N", *map(str, s.target_shape)])
                why.append(f"the targets hold a class per position (shape ({shape})): token and pixel "
                           "frequencies are naturally skewed (spaces in text, background in segmentation maps)")
            if weighted:
                why.append(f"the loss weights the classes ({weighted})")
            if sampled:
                why.append("the training loader draws with a WeightedRandomSampler, which sets the class mix the "
                           "model sees")
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

    def _shift(self, train: "_Scan", val: Optional["_Scan"], step: int) -> Finding:
        """Validation inputs on another scale than the training inputs, or labels distributed far from them."""
        name = f"{self.name}.shift"
        if val is None or val.rows == 0:
            return Finding(name, "skip", f"{self.name}: no validation dataloader: the validation distribution is not "
                           "compared with the training one.", step=step)
        parts: list[tuple[str, str]] = []  # (status, sentence)
        details: dict[str, Any] = {"train_rows": train.rows, "val_rows": val.rows}
        causes: list[str] = []
        inputs = self._input_shift(train, val, details)
        if inputs is not None:
            parts.append(inputs)
            causes += _SHIFT if inputs[0] != "pass" else []
        labels = self._label_shift(train, val, details)
        if labels is not None:
            parts.append(labels)
            causes += _LABEL_SHIFT if labels[0] != "pass" else []
        if not parts:
            return Finding(name, "skip", f"{self.name}: no real-valued input features and no class labels to compare "
                           "between the training and validation data (integer token ids are not compared).",
                           step=step, details=details)
        order = {"pass": 0, "note": 1, "warn": 2}
        status = max((p[0] for p in parts), key=order.__getitem__)
        text = " ".join(p[1] for p in parts)
        inp, lab = details.get("inputs", {}), details.get("labels", {})
        if lab and (status == lab.get("status") or not inp):
            measured, expected = lab["tv"], max(lab["bound"], LARGE_TV)
        else:
            measured, expected = inp.get("large_fraction", 0.0), 0.5
        if status == "pass":
            return Finding(name, "pass", f"{self.name}: validation data distributed as the training data: {text}",
                           measured, expected, step, details=details)
        hint = (" HINT: fit every preprocessing step (scaler, normaliser, label encoder) on the training split and "
                "apply it unchanged to the others; shuffle (or stratify) before splitting. If the validation data is "
                "meant to differ (another domain or period), this is expected.")
        lead = ("the validation data is distributed differently from the training data" if status == "warn" else
                "the validation data differs somewhat from the training data (more than sampling explains; healthy "
                "data split by time or source can differ this much: a note, not a warning)")
        return Finding(name, status, f"{self.name}: {lead}: {text}" + (hint if status == "warn" else ""), measured,
                       expected, step, causes if status == "warn" else [], details)

    def _input_shift(self, train: "_Scan", val: "_Scan", details: dict[str, Any]) -> Optional[tuple[str, str]]:
        mt, mv = train.moments(), val.moments()
        judged = large = moderate = 0
        worst: Optional[dict[str, Any]] = None
        ratios: list[Tensor] = []
        own: list[str] = []
        for tname, a in mt.items():
            b = mv.get(tname)
            if b is None or b["mean"].shape != a["mean"].shape or a["rows"] < 2 or b["rows"] < 2:
                continue
            keep = ~a["binary"] & (a["n"] > 1)
            r = scale_shift(a["mean"], a["std"], a["kurtosis"], a["rows"], b["mean"], b["std"], b["kurtosis"],
                            b["rows"])
            ok = r["judged"] & keep
            if not ok.any():
                continue
            judged += int(ok.sum())
            large += int((r["large"] & ok).sum())
            moderate += int((r["moderate"] & ok).sum())
            ratios.append(r["ratio"][ok])
            # the worst feature: the farthest beyond its sampling limit, on either statistic
            sig = torch.maximum(r["smd"].abs() / r["se_smd"], (r["ratio"] ** 2 - 1).abs() / (2 * r["se_log_ratio"])
                                .clamp_min(1e-300)) / r["z"]
            score = torch.where(ok, sig, torch.full_like(r["smd"], -1.0))
            j = int(score.argmax())
            if worst is None or float(score[j]) > worst["limits"]:
                worst = {"tensor": tname, "index": j, "smd": float(r["smd"][j]), "std_ratio": float(r["ratio"][j]),
                         "se_smd": float(r["se_smd"][j]), "se_log_ratio": float(r["se_log_ratio"][j]),
                         "z": float(r["z"]), "limits": float(score[j])}
            # a whole validation set standardized on itself (2-D features, every row read): means exactly 0, stds 1
            complete = val.population is None or val.population <= val.rows
            if (b["ndim"] == 2 and complete and standardized_on_itself(b["mean"][keep], b["std"][keep], b["rows"])
                    and not (torch.equal(a["mean"], b["mean"]) and torch.equal(a["std"], b["std"]))):
                own.append(tname)
        if not judged:
            return None
        ratio = torch.cat(ratios)
        med = float(ratio.median())
        frac = large / judged
        details["inputs"] = {"judged": judged, "large": large, "moderate": moderate, "large_fraction": frac,
                             "std_ratio_median": med, "std_ratios": [round(float(v), 4) for v in ratio[:64]],
                             "worst": worst, "standardized_on_itself": own}
        w = worst or {}
        where = "" if w.get("tensor") == "inputs" else f" of `{w.get('tensor')}`"
        numbers = (f"{large} of {judged} input features shifted far beyond sampling error (|mean difference| > 1 "
                   f"training std, or std ratio beyond 2x), {moderate} beyond 0.2 std or 1.25x; median std ratio "
                   f"(validation/training) {med:.3g}; worst feature {w.get('index')}{where}: standardized mean "
                   f"difference {w.get('smd', 0):.3g} (sampling error {w.get('se_smd', 0):.2g}), std ratio "
                   f"{w.get('std_ratio', 1):.3g} (sampling error of its log {w.get('se_log_ratio', 0):.2g}; limit "
                   f"{w.get('z', 3):.2f} sampling errors)")
        if own:
            status = "warn"
            text = (f"the validation inputs ({', '.join(f'`{t}`' for t in own)}) were standardized with their own "
                    "statistics: every feature's mean is 0 and std 1 on the validation rows to within 1% of the "
                    f"sampling error 1/sqrt({val.rows}) = {1 / math.sqrt(val.rows):.2g} that the training set's "
                    "statistics would leave; a shift between the splits is hidden, not removed (and the model is "
                    f"judged on other inputs than it will get) ({numbers}).")
        elif large and frac >= 0.5:
            status = "warn"
            text = f"inputs on another scale: {numbers}."
        elif moderate:
            status = "note"
            text = (f"inputs: {numbers}" + (" (a few features: drift, or one feature in another unit)" if large
                                            else "") + ".")
        else:
            status = "pass"
            text = f"inputs: {numbers}."
        details["inputs"]["status"] = status
        return status, text

    def _label_shift(self, train: "_Scan", val: "_Scan", details: dict[str, Any]) -> Optional[tuple[str, str]]:
        ct, cv = train.class_counts(), val.class_counts()
        if ct is None or cv is None or ct[0] != cv[0]:
            return None
        # labels per position (tokens, pixels) are not independent: the examples are the independent units
        nt = float(train.target_rows) if train.per_position else None
        nv = float(val.target_rows) if val.per_position else None
        if ct[0] == "classes":
            r = label_shift(ct[1], cv[1], nt, nv)
            what = f"{r['classes']} classes"
        else:
            (pt, rt), (pv, rv) = ct[1], cv[1]
            if pt.shape != pv.shape:
                return None
            best = None
            for j in range(pt.numel()):  # each 0/1 label as a distribution over two values; the farthest one
                rj = label_shift(torch.stack([rt - pt[j], pt[j]]), torch.stack([rv - pv[j], pv[j]]), nt or rt,
                                 nv or rv, z=3.0 if pt.numel() == 1 else familywise_z(pt.numel()))
                if best is None or rj["tv"] - rj["bound"] > best["tv"] - best["bound"]:
                    best = {**rj, "label": j}
            r = best
            what = f"0/1 label {r['label']}" if pt.numel() > 1 else "0/1 labels"
        far = r["tv"] > r["bound"]
        missing = r["missing"]
        details["labels"] = {k: r[k] for k in ("tv", "bound", "classes", "missing")}
        numbers = (f"label distributions ({what}) at total variation distance {r['tv']:.3g} (sampling explains up to "
                   f"{r['bound']:.3g}, the chi-square bound at 3 sigma for {train.target_rows} and {val.target_rows} "
                   "examples)")
        if missing:
            shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
            numbers += (f"; classes absent from the validation data although each should appear at least 7 times: "
                        f"{shown} ({len(missing)} of {r['classes']})")
        if far and (r["tv"] >= LARGE_TV or missing):
            status, text = "warn", f"labels: {numbers}."
        elif far:
            status, text = "note", f"labels: {numbers}."
        else:
            status, text = "pass", f"labels: {numbers}."
        details["labels"]["status"] = status
        return status, text


def _batch_parts(batch: Any) -> list[tuple[str, Tensor]]:
    """The tensors of a batch as read, named by their place in it (``batch[3]``, ``batch['mask']``)."""
    if isinstance(batch, Tensor):
        return [("batch", batch)]
    if isinstance(batch, dict):
        return [(f"batch[{k!r}]", v) for k, v in batch.items() if isinstance(v, Tensor)]
    if isinstance(batch, (list, tuple)):
        return [(f"batch[{i}]", v) for i, v in enumerate(batch) if isinstance(v, Tensor)]
    return []


def _split_within_batch(train: "_Scan", val: "_Scan") -> Optional[str]:
    """The parts in which the first training and validation batches differ, when they hold the same inputs in the
    same order (a mask or an index in the batch selects what each split scores: transductive node classification on
    one graph); ``None`` otherwise, and when nothing differs (the same loader twice is a real overlap)."""
    same = lambda u, v: u.shape == v.shape and u.dtype == v.dtype and torch.equal(u, v)  # noqa: E731
    xa, xb = _tensors(train.first_hx), _tensors(val.first_hx)
    if not xa or len(xa) != len(xb) or not all(same(u, v) for (_, u), (_, v) in zip(xa, xb)):
        return None
    pa, pb = _batch_parts(train.first_raw), _batch_parts(val.first_raw)
    if len(pa) != len(pb) or [n for n, _ in pa] != [n for n, _ in pb]:
        return None
    differ = [n for (n, u), (_, v) in zip(pa, pb) if not same(u, v)]
    return ", ".join(differ) if differ else None
