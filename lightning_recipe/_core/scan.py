"""The data scan of ``DataCheck``: running statistics of the rows read (scale, non-finite values, hashes, labels).

The scan streams: each batch is processed as it comes, in slices of at most ``_Scan._CHUNK`` values, and only
running sums, class counts, two 64-bit hashes per row (16 bytes a row) and a fixed-size reservoir of rows (for the
column statistics that decide whether equal rows can arise by chance) are kept, so its memory is bounded
independently of the data size: no row is kept beyond the first batch (the figure).
"""

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


def _slice_rows(x: Any, a: int, b: int, n: int) -> Any:
    """Rows ``a:b`` of every tensor of ``x`` (a tensor, or a dict/sequence of them) whose first dimension is ``n``."""
    if isinstance(x, Tensor):
        return x[a:b] if x.ndim and x.shape[0] == n else x
    if isinstance(x, dict):
        return {k: _slice_rows(v, a, b, n) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        items = [_slice_rows(v, a, b, n) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
    return x


class _Scan:
    """Running statistics of the rows read (CPU, float64): memory bounded independently of the number of rows, except
    the hashes (16 bytes a row, ``max_batches`` times the batch size rows at most).

    Batches are processed in slices of at most ``_CHUNK`` values (small batches merged up to it, large ones cut), so
    the float64 temporaries of a slice stay under a few MiB whatever the batch or dataset size. ``_RESERVOIR`` rows
    (at most ``_MAX_COLS`` columns of each) are kept as a uniform sample of the rows read (reservoir sampling with a
    private generator), for the per-column numbers of distinct values of :meth:`chance_free`.
    """

    _MAX_COLS = 256
    _CHUNK = 2**16
    _RESERVOIR = 1024

    def __init__(self, layout: str) -> None:
        self.layout = layout
        self.rows = 0
        self.batches = 0  # batches read
        self.timed_out = False  # the scan stopped at its time budget (SCAN_SECONDS) before `max_batches`
        self.population: Optional[int] = None
        self.width: Optional[int] = None
        self.first: Optional[tuple[Any, Any]] = None
        self.first_inputs: Any = None  # the first batch's inputs on the device
        self.first_raw: Any = None  # the first batch as read, and its inputs (CPU): what else the batch holds
        self.first_hx: Any = None
        self.target_shape: Optional[tuple[int, ...]] = None  # of one example's targets
        self.target_float = False
        self.nonfinite_x = 0
        self.nonfinite_y = 0
        self._nonfinite_feat: dict[tuple[str, int], int] = {}
        self._hashes: list[Tensor] = []
        self._label_hashes: list[Tensor] = []
        self._cols: Optional[Tensor] = None  # the reservoir: (at most _RESERVOIR rows, at most _MAX_COLS columns)
        self._cols_seen = 0  # rows offered to the reservoir
        self._gen = torch.Generator().manual_seed(0)  # private: the global random state is never drawn from
        self._col_idx: Optional[Tensor] = None
        self._stats: dict[str, dict[str, Any]] = {}
        # class counts, streamed: ("classes", counts) for integer targets, ("labels", positives, rows) for 0/1 floats
        self._target_width: Optional[int] = None
        self._target_int: Optional[bool] = None
        self._counts: Optional[Tensor] = None
        self._pos: Optional[Tensor] = None
        self._label_rows = 0
        self._binary_labels = True
        self.target_rows = 0  # examples whose targets were counted
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
            n = _tensors(x)[0][1].shape[0]
            per_row = max(1, sum(t[0].numel() for _, t in _tensors(x) if t.ndim and t.shape[0] == n and n))
            step = max(1, self._CHUNK // per_row)
            for a in range(0, max(n, 1), step):
                b = min(n, a + step)
                self._process(_slice_rows(x, a, b, n), _slice_rows(y, a, b, n), _slice_rows(hx, a, b, n))

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
            self._count_targets(y.reshape(y.shape[0], -1) if y.ndim else y.reshape(1, 1))
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
            self._offer(v[:, self._col_idx])

    def _offer(self, rows: Tensor) -> None:
        """Reservoir sampling (Vitter's algorithm R, one batch at a time): after ``t`` rows offered, each is in the
        reservoir with probability ``_RESERVOIR / t``."""
        k = self._RESERVOIR
        if self._cols is None:
            self._cols = rows[:k].clone()
            self._cols_seen = min(k, rows.shape[0])
            rows = rows[k:]
        elif self._cols.shape[0] < k:
            take = k - self._cols.shape[0]
            self._cols = torch.cat([self._cols, rows[:take]])
            self._cols_seen += min(take, rows.shape[0])
            rows = rows[take:]
        m = rows.shape[0]
        if m == 0:
            return
        t = self._cols_seen + 1 + torch.arange(m, dtype=torch.float64)  # 1-based index of each row offered
        slot = (torch.rand(m, generator=self._gen, dtype=torch.float64) * t).long()
        keep = slot < k
        self._cols[slot[keep]] = rows[keep]
        self._cols_seen += m

    def _count_targets(self, y: Tensor) -> None:
        """Add ``(n, values per example)`` targets to the class counts (negative class indices left out; float targets
        counted as 0/1 labels per column over the rows whose values are all finite, while every such value is 0 or 1)."""
        if self._target_width is None:
            self._target_width, self._target_int = y.shape[1], not (y.is_floating_point() or y.dtype == torch.bool)
        if y.shape[1] != self._target_width:
            return
        self.target_rows += y.shape[0]
        if y.dtype == torch.bool:
            y = y.float()
        if self._target_int and not y.is_floating_point():
            v = y.reshape(-1)
            v = v[v >= 0]
            if v.numel():
                c = torch.bincount(v, minlength=int(v.max()) + 1).double()
                if self._counts is None:
                    self._counts = c
                else:
                    if c.shape[0] > self._counts.shape[0]:
                        c[: self._counts.shape[0]] += self._counts
                        self._counts = c
                    else:
                        self._counts[: c.shape[0]] += c
            return
        if self._target_int or not self._binary_labels:
            return
        y = y[torch.isfinite(y).all(1)]
        if not bool(((y == 0) | (y == 1)).all()):
            self._binary_labels = False
            return
        pos = y.double().sum(0)
        self._pos = pos if self._pos is None else self._pos + pos
        self._label_rows += y.shape[0]

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
            # sums of powers of (x - c), c the first slice's mean: central moments without cancellation (shift rule)
            "c": m0.sum(0) / finite.sum(0).clamp_min(1), "q": torch.zeros(4, m.shape[1], dtype=torch.float64),
            "rows": 0, "ndim": t.ndim,
        })
        if s["n"].shape[0] != m.shape[1]:
            return
        s["rows"] += t.shape[0]
        dev = torch.where(finite, m0 - s["c"], torch.zeros_like(m0))
        p = dev.clone()
        for k in range(4):
            s["q"][k] += p.sum(0)
            if k < 3:
                p *= dev
        del dev, p
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
        if self._cols is None:
            return True
        cols = self._cols
        k = cols.shape[0]
        s = cols.sort(0).values
        distinct = 1 + (s[1:] != s[:-1]).sum(0) if k > 1 else torch.ones(cols.shape[1], dtype=torch.long)
        if int(distinct.max()) >= max(2, k // 2):
            return True
        # distinct values counted on the reservoir (at most the true numbers: the space is underestimated, so this
        # errs towards "can repeat by chance"); the pairs that could coincide are those of all the rows read
        log_space = float(distinct.double().log().sum())
        return log_space > 2 * math.log(max(self._cols_seen, k, 2)) + math.log(100)

    @property
    def per_position(self) -> bool:
        """Whether the targets hold a class per position (token sequences, segmentation maps), not one per example:
        class indices with more than one value per example, 0/1 floats with at least 2 dimensions beyond N
        (``(N, L)`` floats are the labels of a multilabel task)."""
        if self.target_shape is None:
            return False
        return len(self.target_shape) >= 2 if self.target_float else math.prod(self.target_shape) > 1

    def class_counts(self) -> Optional[tuple[str, Any]]:
        """``("classes", counts)`` for class-index targets, ``("labels", (positives per column, rows))`` for 0/1
        float targets, else ``None``."""
        if self._target_int:
            return ("classes", self._counts.clone()) if self._counts is not None else None
        if self._target_int is None or not self._binary_labels or self._pos is None or self._label_rows == 0:
            return None
        return "labels", (self._pos.clone(), float(self._label_rows))

    def moments(self) -> dict[str, dict[str, Any]]:
        """Per judged input tensor: per-feature ``mean``, ``std`` (population), ``kurtosis`` (``m4 / std**4``; 1 for
        a constant), ``rows`` (examples read), ``binary`` and ``ndim`` (of the tensor, batch dimension included)."""
        out = {}
        for name, s in self._stats.items():
            n = s["n"].clamp_min(1)
            a1, a2, a3, a4 = (s["q"][k] / n for k in range(4))
            var = (a2 - a1**2).clamp_min(0)
            m4 = (a4 - 4 * a1 * a3 + 6 * a1**2 * a2 - 3 * a1**4).clamp_min(0)
            kurt = torch.where(var > 0, m4 / var.clamp_min(1e-300) ** 2, torch.ones_like(var))
            out[name] = {"mean": s["c"] + a1, "std": var.sqrt(), "kurtosis": kurt, "rows": s["rows"],
                         "n": s["n"], "binary": s["binary"], "ndim": s["ndim"]}
        return out


def _to_cpu(x: Any) -> Any:
    from lightning_utilities.core.apply_func import apply_to_collection

    return apply_to_collection(x, Tensor, lambda t: t.detach().cpu())
