"""One exception type for user errors.

The CLI turns a :class:`LowbitError` into one line on stderr and exit code 2; anything else is a bug
and keeps its traceback.
"""


class LowbitError(Exception):
    """A problem with the user's input (data, model name, bits, budget, file) that they can fix."""


def one_line(e: BaseException) -> str:
    """How an exception raised in the user's own code (model, loss, data) is quoted in a LowbitError."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__
