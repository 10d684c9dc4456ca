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


class RecipeSkipNotice(UserWarning):
    """A check could not run on this code and skipped (``on_fail="warn"``): the conventions by which it finds inputs,
    targets, loss or head did not fit (an output dict with keys of its own, a head without a bias, a loss that takes
    a third tensor). It says nothing about the training, so it is not a :class:`RecipeWarning`: a healthy fit of a
    model the conventions do not cover shows no ``RecipeWarning``. The message names the argument that lets the
    check run; the check records a ``skip`` finding in the report. In ``on_fail="raise"`` mode the same problem is a
    :class:`RecipeConfigError`.

    Example::

        >>> issubclass(RecipeSkipNotice, RecipeWarning)
        False
    """
