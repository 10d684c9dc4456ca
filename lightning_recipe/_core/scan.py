"""The data scan of ``DataCheck``: running statistics of the rows read (scale, non-finite values, hashes, labels)."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_recipe._core import labels as _labels
from lightning_recipe.functional.data import _feature_matrix, _int_view, _is_image, _judged, duplicate_fraction, \
    off_scale, row_hashes


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


def _to_cpu(x: Any) -> Any:
    from lightning_utilities.core.apply_func import apply_to_collection

    return apply_to_collection(x, Tensor, lambda t: t.detach().cpu())
