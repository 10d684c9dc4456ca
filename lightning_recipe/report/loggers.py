"""One bridge from a figure, scalars or a text report to every logger on the trainer.

Lightning has no common figure API across loggers, so this module dispatches per logger type (lazy imports, so
no logger package is required) and always writes a PNG under ``<log_dir>/recipe/`` as well:

* TensorBoard: the rendered PNG's pixels through ``experiment.add_image(tag, pixels, global_step)`` (the same
  image ``add_figure`` would draw, without drawing it twice); text with ``add_text``.
* Weights & Biases: ``log_image(key, [png], step)`` (works with ``offline=True``); text as a one-cell table.
* MLflow: the rendered PNG as the artifact ``recipe/<name>/step_XXXXXXX.png`` (``log_artifact``; ``log_figure``
  would draw it again); text with ``log_text``.
  MLflow >= 3.13 refuses the ``file:`` tracking store that ``MLFlowLogger`` uses by default unless
  ``MLFLOW_ALLOW_FILE_STORE=true`` is set: give the logger a ``tracking_uri="sqlite:///<dir>/mlflow.db"``.
* Comet (when ``comet_ml`` is installed): ``experiment.log_image`` of the PNG; text with ``log_text``.
* CSVLogger and any other logger: the PNG file under ``<logger.log_dir>/recipe/`` (fsspec, so remote log
  directories work); scalars through ``log_metrics``, text as ``<name>.md`` next to the PNGs.

Every function here is rank-zero only (other ranks return at once: a logger's ``experiment`` is a dummy there, and
rendering would only cost time) and runs no collective. Call it with a directory resolved on every rank beforehand:
``trainer.log_dir`` broadcasts under DDP, so calling it from rank-zero-only code hangs the fit.

Figures must be ``matplotlib.figure.Figure`` objects built without pyplot (nothing is registered in pyplot's figure
manager, no GUI backend is needed). :func:`log_figure` releases the figure after sending it (``close=True``), so a
long fit that draws thousands of figures keeps no figure alive; a figure that was made with pyplot is also closed
in pyplot's registry.
"""

from __future__ import annotations

import io
import os
import re
import sys
from typing import Any, Optional

from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from lightning_recipe.exceptions import RecipeWarning

__all__ = ["log_figure", "log_file", "log_scalars", "log_tags", "log_text"]

_DPI = 100


@rank_zero_only
def log_figure(
    trainer: Any,
    tag: str,
    figure: Any,
    step: Optional[int] = None,
    directory: Optional[str] = None,
    close: bool = True,
) -> Optional[str]:
    """Save ``figure`` as ``<directory>/<name>.png`` and send it to every logger of ``trainer``.

    The figure is rendered once, to PNG; every logger gets those pixels. Loggers and what they receive: TensorBoard
    an image (``add_image``, with ``step`` as the global step), MLflow an artifact ``recipe/<name>/step_XXXXXXX.png``
    on the logger's run, W&B ``log_image`` (step on the
    ``trainer/global_step`` axis), Comet ``log_image``, CSVLogger and unknown loggers a PNG under
    ``<logger.log_dir>/recipe/`` when that differs from ``directory``. A logger that fails gets a warning; the fit
    goes on.

    Args:
        trainer: the Trainer (its ``loggers`` are used).
        tag: figure name, e.g. ``"recipe/prediction_dynamics"``; the file is named after its last part.
        figure: a ``matplotlib.figure.Figure`` (built without pyplot).
        step: the global step to attach (``None`` → ``trainer.global_step``).
        directory: where the PNG goes, resolved on every rank beforehand (``None``: only the loggers get it; the
            W&B and Comet copies then go through a temporary file).
        close: release the figure afterwards (clear its artists; close it in pyplot if pyplot made it).

    Returns:
        The PNG path (``None`` on ranks other than zero and when ``directory`` is ``None``).

    Example::

        >>> from matplotlib.figure import Figure
        >>> import lightning as L, tempfile
        >>> fig = Figure(figsize=(2, 2)); _ = fig.add_subplot().plot([0, 1])
        >>> path = log_figure(L.Trainer(logger=False), "recipe/demo", fig, 0, tempfile.mkdtemp())
        >>> path.endswith("demo.png")
        True
    """
    step = int(trainer.global_step if step is None else step)
    name = _file_name(tag)
    png = _render_png(figure)
    path: Optional[str] = None
    if directory is not None:
        path = os.path.join(str(directory), f"{name}.png")
        try:
            _write_bytes(path, png)
        except OSError as err:  # a file we cannot write never stops the fit: one warning per folder, loggers go on
            unwritable(trainer, str(directory), err)
            path = None
    try:
        for logger in trainer.loggers:
            kind = _kind(logger)
            try:
                if kind == "TensorBoardLogger":  # the PNG already rendered, decoded: no second rendering
                    logger.experiment.add_image(tag, _png_pixels(png), global_step=step, dataformats="HWC")
                    logger.experiment.flush()
                elif kind == "MLFlowLogger":
                    _mlflow_png(logger, png, _artifact_dir(tag), f"step_{step:07d}.png")
                elif kind == "WandbLogger":
                    _with_file(png, path, name, lambda p: logger.log_image(key=tag, images=[p], step=step))
                elif kind == "CometLogger":
                    _with_file(png, path, name, lambda p: logger.experiment.log_image(p, name=tag, step=step))
                else:
                    sub = _logger_dir(logger)
                    if sub is not None:
                        target = os.path.join(sub, "recipe", f"{name}.png")
                        if path is None or not _same_path(target, path):
                            _write_bytes(target, png)
            except Exception as err:  # a logger failing must not stop the fit
                message = f"lightning_recipe could not send figure {tag!r} to {kind}: {err}"
                rank_zero_warn(message, category=RecipeWarning)
    finally:
        if close:
            _release(figure)
    return path


@rank_zero_only
def log_scalars(trainer: Any, metrics: dict[str, float], step: Optional[int] = None, flush: bool = True) -> None:
    """Send scalars to every logger (``log_metrics``), outside Lightning's ``self.log`` machinery.

    Usable in any hook, also at fit end; with ``flush`` file-based loggers (CSV, TensorBoard) are saved so the values
    are on disk at once. The live series during training pass ``flush=False`` (measured: 480 us a call with
    TensorBoard's ``save``, under 100 us without): Lightning saves the loggers itself at every ``log_every_n_steps``,
    and TensorBoard's writer flushes its queue on its own clock.

    Args:
        trainer: the Trainer (its ``loggers`` are used).
        metrics: name → value (plain floats).
        step: the global step (``None`` → ``trainer.global_step``).
        flush: save file-based loggers now.

    Example::

        >>> import lightning as L
        >>> log_scalars(L.Trainer(logger=False), {"recipe/initial_loss": 2.3})
    """
    step = int(trainer.global_step if step is None else step)
    values = {k: float(v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        try:
            logger.log_metrics(dict(values), step=step)
            if flush and _kind(logger) in ("CSVLogger", "TensorBoardLogger"):
                logger.save()
        except Exception as err:
            rank_zero_warn(f"lightning_recipe could not log scalars to {_kind(logger)}: {err}", category=RecipeWarning)


@rank_zero_only
def log_text(trainer: Any, tag: str, text: str, step: Optional[int] = None) -> None:
    """Send a markdown text (the report) to every logger that takes text.

    TensorBoard ``add_text`` (rendered as markdown), MLflow ``log_text`` (artifact ``<tag>.md``), W&B a one-cell
    table, Comet ``log_text``; CSVLogger and unknown loggers get ``<logger.log_dir>/recipe/<name>.md`` unless a
    report already lives there.

    Args:
        trainer: the Trainer (its ``loggers`` are used).
        tag: e.g. ``"recipe/report"``.
        text: markdown.
        step: the global step (``None`` → ``trainer.global_step``).

    Example::

        >>> import lightning as L
        >>> log_text(L.Trainer(logger=False), "recipe/report", "# report")
    """
    step = int(trainer.global_step if step is None else step)
    name = _file_name(tag)
    for logger in trainer.loggers:
        kind = _kind(logger)
        try:
            if kind == "TensorBoardLogger":
                logger.experiment.add_text(tag, text, global_step=step)
                logger.experiment.flush()
            elif kind == "MLFlowLogger":
                logger.experiment.log_text(logger.run_id, text, f"{_artifact_dir(tag)}.md")
            elif kind == "WandbLogger":
                logger.log_text(key=tag, columns=["report"], data=[[text]], step=step)
            elif kind == "CometLogger":
                logger.experiment.log_text(text, step=step, metadata={"tag": tag})
            else:
                sub = _logger_dir(logger)
                if sub is not None:
                    target = os.path.join(sub, "recipe", f"{name}.md")
                    if not _exists(target):
                        _write_bytes(target, text.encode())
        except Exception as err:
            rank_zero_warn(f"lightning_recipe could not send text {tag!r} to {kind}: {err}", category=RecipeWarning)


@rank_zero_only
def log_file(trainer: Any, tag: str, path: str, step: Optional[int] = None) -> None:
    """Send a file (the self-contained ``report.html``, ``report.json``) to every logger that keeps files.

    MLflow: artifact under the tag's folder (the MLflow UI shows HTML artifacts inline); W&B: an HTML file as
    ``wandb.Html`` under ``tag`` (a media file in the run), any other file copied to the run's files
    (``files/recipe/<name>``, synced with the run); Comet: ``log_asset``; CSVLogger and unknown loggers: a copy under
    ``<logger.log_dir>/recipe/`` unless it is the same file; TensorBoard keeps no files (it gets the markdown text
    through :func:`log_text`).

    Args:
        trainer: the Trainer (its ``loggers`` are used).
        tag: e.g. ``"recipe/report_html"``; MLflow stores the file under the tag's parent folder (``recipe/``).
        path: the local file.
        step: the global step (``None`` → ``trainer.global_step``).

    Example::

        >>> import lightning as L
        >>> log_file(L.Trainer(logger=False), "recipe/report_html", "report.html")
    """
    step = int(trainer.global_step if step is None else step)
    base = os.path.basename(path)
    for logger in trainer.loggers:
        kind = _kind(logger)
        try:
            if kind == "MLFlowLogger":
                folder = _artifact_dir(tag).rsplit("/", 1)[0] if "/" in tag else None
                logger.experiment.log_artifact(logger.run_id, path, folder)
            elif kind == "WandbLogger" and base.endswith(".html"):
                import wandb

                with open(path) as fh:  # a file object: never mistaken for a path
                    logger.log_metrics({tag: wandb.Html(fh, inject=False)}, step=step)
            elif kind == "WandbLogger":  # other files: the run's files (`files/recipe/<name>`), synced with the run
                target = os.path.join(logger.experiment.dir, "recipe", base)
                with open(path, "rb") as fh:
                    _write_bytes(target, fh.read())
            elif kind == "CometLogger":
                logger.experiment.log_asset(path, file_name=base, step=step)
            elif kind != "TensorBoardLogger":
                sub = _logger_dir(logger)
                if sub is not None:
                    target = os.path.join(sub, "recipe", base)
                    if not _same_path(target, path):
                        with open(path, "rb") as fh:
                            _write_bytes(target, fh.read())
        except Exception as err:
            rank_zero_warn(f"lightning_recipe could not send file {base!r} to {kind}: {err}", category=RecipeWarning)


@rank_zero_only
def log_tags(trainer: Any, tags: dict[str, Any]) -> None:
    """Set run-level values (the findings counts) where a logger keeps them: MLflow tags on the logger's run
    (``set_tag``), the W&B run summary, Comet ``log_other``; other loggers have no such place and get nothing.

    Args:
        trainer: the Trainer (its ``loggers`` are used).
        tags: name → value, e.g. ``{"recipe/fail": 0, "recipe/warn": 1}``.

    Example::

        >>> import lightning as L
        >>> log_tags(L.Trainer(logger=False), {"recipe/fail": 0})
    """
    for logger in trainer.loggers:
        kind = _kind(logger)
        try:
            if kind == "MLFlowLogger":
                for k, v in tags.items():
                    logger.experiment.set_tag(logger.run_id, k, str(v))
            elif kind == "WandbLogger":
                logger.experiment.summary.update(dict(tags))
            elif kind == "CometLogger":
                for k, v in tags.items():
                    logger.experiment.log_other(k, v)
        except Exception as err:
            rank_zero_warn(f"lightning_recipe could not set tags on {kind}: {err}", category=RecipeWarning)


def unwritable(trainer: Any, directory: str, err: BaseException) -> None:
    """Report once per fit and folder that ``directory`` cannot be written: a :class:`RecipeWarning` naming the path.

    The checks go on; their findings stay available through :func:`~lightning_recipe.collect_findings`.
    """
    from lightning_recipe._core.warn import warn_once

    warn_once(
        trainer,
        f"lightning_recipe cannot write to `{directory}` ({type(err).__name__}: {err}): figures and the report are not "
        "saved there. The checks go on; their findings stay available through `lightning_recipe.collect_findings("
        "trainer)`. HINT: make the folder writable, or give the Trainer another `default_root_dir` or logger `save_dir`.",
        key=f"unwritable: {os.path.abspath(directory) if '://' not in directory else directory}",
    )


# -- helpers --------------------------------------------------------------------------------------------------------
def _kind(logger: Any) -> str:
    return type(logger).__name__


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", part).strip("_") or "figure"


def _file_name(tag: str) -> str:
    """``"recipe/prediction_dynamics"`` → ``"prediction_dynamics"``; other tags keep their path, flattened."""
    return _safe(tag[len("recipe/") :] if tag.startswith("recipe/") else tag)


def _artifact_dir(tag: str) -> str:
    return "/".join(_safe(p) for p in tag.split("/") if p) or "figure"


def _render_png(figure: Any) -> bytes:
    """The figure as PNG bytes: the fastest zlib level (files ~15% larger) and unhinted text (FreeType's hinting
    snaps each glyph to the pixel grid; without it text is drawn ~15% faster and looks as it does on macOS)."""
    import matplotlib as mpl

    buf = io.BytesIO()
    with mpl.rc_context({"text.hinting": "none"}):
        figure.savefig(buf, format="png", dpi=_DPI, pil_kwargs={"compress_level": 1})
    return buf.getvalue()


def _png_pixels(png: bytes) -> Any:
    """``(H, W, 3)`` uint8 pixels of a PNG (what TensorBoard's ``add_figure`` would render again)."""
    import numpy as np
    from matplotlib.image import imread

    rgb = imread(io.BytesIO(png), format="png")[..., :3]
    return (np.clip(rgb, 0.0, 1.0) * 255).round().astype(np.uint8)


def _mlflow_png(logger: Any, png: bytes, artifact_dir: str, file_name: str) -> None:
    """The rendered PNG as an MLflow artifact ``<artifact_dir>/<file_name>`` (``log_figure`` would render again)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, file_name)
        with open(local, "wb") as fh:
            fh.write(png)
        logger.experiment.log_artifact(logger.run_id, local, artifact_dir)


def _write_bytes(path: str, data: bytes) -> None:
    from lightning.fabric.utilities.cloud_io import get_filesystem

    fs = get_filesystem(path)
    parent = os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as fh:
        fh.write(data)


def _exists(path: str) -> bool:
    from lightning.fabric.utilities.cloud_io import get_filesystem

    return bool(get_filesystem(path).exists(path))


def _same_path(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.abspath(a) == os.path.abspath(b)


def _logger_dir(logger: Any) -> Optional[str]:
    for attr in ("log_dir", "save_dir", "root_dir"):
        try:
            value = getattr(logger, attr, None)
        except Exception:  # some loggers compute these lazily and may fail
            value = None
        if isinstance(value, (str, os.PathLike)) and str(value):
            return str(value)
    return None


def _with_file(png: bytes, path: Optional[str], name: str, send: Any) -> None:
    """Call ``send(png_path)``; loggers that copy a file at log time get the PNG already written, or a temp file."""
    if path is not None and "://" not in path:
        send(path)
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, f"{name}.png")
        with open(local, "wb") as fh:
            fh.write(png)
        send(local)


def _release(figure: Any) -> None:
    pyplot = sys.modules.get("matplotlib.pyplot")  # never import pyplot here: only close a figure it manages
    if pyplot is not None:
        try:
            pyplot.close(figure)  # a no-op for a figure built without pyplot
        except Exception:  # pragma: no cover
            pass
    try:
        # drop the axes and artists now instead of waiting for the cycle collector; not `figure.clear()`, which
        # clears each axes first and so builds new ticks and spines for them (~15 ms a figure)
        for ax in list(figure.axes):
            figure.delaxes(ax)
        for artists in (figure.artists, figure.lines, figure.patches, figure.texts, figure.images, figure.legends):
            artists.clear()
    except Exception:  # pragma: no cover - not a matplotlib figure
        pass
