"""One exception type for user errors.

The CLI turns a :class:`LowbitError` into one line on stderr and exit code 2; anything else is a bug
and keeps its traceback.
"""


class LowbitError(Exception):
    """A problem with the user's input (data, model name, bits, budget, file) that they can fix."""
