"""The two namespaces of Lightning: ``lightning.pytorch`` and the standalone ``pytorch_lightning`` package.

A Trainer of one refuses the modules of the other; the recipe's own utilities (preflight, overfit one batch) accept
both, telling them apart by class names and package roots (``pytorch_lightning`` may not be installed).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

_ROOTS = ("lightning", "pytorch_lightning")


def _is_lightning(obj: Any, name: str) -> bool:
    """Whether ``obj`` (an instance or a class) is a Lightning ``name`` (``LightningModule``, ...) of either namespace:
    ``lightning.pytorch`` or the standalone ``pytorch_lightning`` package.

    Example::

        >>> import lightning as L
        >>> _is_lightning(L.LightningModule, "LightningModule"), _is_lightning(object(), "LightningModule")
        (True, False)
    """
    cls = obj if isinstance(obj, type) else type(obj)
    return any(c.__name__ == name and c.__module__.split(".")[0] in _ROOTS
               for c in cls.__mro__)


def _namespace(model: Any) -> Any:
    """The Lightning package ``model`` was written for: ``pytorch_lightning`` for its modules, else ``lightning.pytorch``
    (a Trainer of one namespace refuses the modules of the other)."""
    for c in type(model).__mro__:
        if c.__name__ == "LightningModule" and c.__module__.split(".")[0] == "pytorch_lightning":
            import pytorch_lightning

            return pytorch_lightning
    return pl
