"""One exception type for user errors.

The CLI turns a :class:`LowbitError` into one line on stderr and exit code 2; anything else is a bug
and keeps its traceback.
"""


class LowbitError(Exception):
    """A problem with the user's input (data, model name, bits, budget, file) that they can fix."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), at most 300 characters."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def one_line(e: BaseException) -> str:
    """How an exception raised in the user's own code (model, loss, data) is quoted in a LowbitError."""
    return f"{type(e).__name__}: {first_line(e)}" if str(e).strip() else type(e).__name__
