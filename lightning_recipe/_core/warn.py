"""One warning per distinct message per fit: a warn-once cache keyed by the trainer.

Several checks that need the same thing (inputs and targets, a forward that gives a tensor) skip for the same
reason; the user reads the reason once, and every check still records its own ``skip`` finding. Files that cannot be
written are reported once per folder the same way.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

from lightning.pytorch.utilities import rank_zero_warn

from lightning_recipe.exceptions import RecipeWarning

_SEEN: "weakref.WeakKeyDictionary[Any, set[str]]" = weakref.WeakKeyDictionary()
_NO_TRAINER: set[str] = set()  # when no trainer is known (a check called outside a fit): once per process


def warn_once(trainer: Optional[Any], message: str, key: Optional[str] = None, category: type = RecipeWarning) -> bool:
    """Emit ``message`` as a ``category`` warning (default :class:`RecipeWarning`) unless ``key`` (default: the
    message) was already said in this fit of ``trainer``. Returns whether it was emitted."""
    key = message if key is None else key
    try:
        seen = _SEEN.setdefault(trainer, set()) if trainer is not None else _NO_TRAINER
    except TypeError:  # pragma: no cover - an object that cannot be weakly referenced
        seen = _NO_TRAINER
    if key in seen:
        return False
    seen.add(key)
    rank_zero_warn(message, category=category)
    return True


def new_fit(trainer: Any) -> None:
    """Forget what was warned about in a previous fit of ``trainer``."""
    _SEEN.pop(trainer, None)

