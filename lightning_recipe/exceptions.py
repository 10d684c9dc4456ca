"""Errors and warnings raised by the recipe checks."""


class RecipeCheckError(RuntimeError):
    """A recipe check failed in ``on_fail="raise"`` mode.

    The message names the check, the measured value, the expected value and the likely causes.

    Example::

        >>> isinstance(RecipeCheckError("InitialLossCheck failed"), RuntimeError)
        True
    """


class RecipeConfigError(ValueError):
    """A callback could not find what it needs (inputs, targets, loss, head, ...).

    Raised at fit start, before the first training step; the message names the argument that fixes it.

    Example::

        >>> str(RecipeConfigError("pass `head=`"))
        'pass `head=`'
    """


class RecipeWarning(UserWarning):
    """A recipe check failed in ``on_fail="warn"`` mode (or found something worth a look).

    Example::

        >>> issubclass(RecipeWarning, UserWarning)
        True
    """
