"""User-facing errors.

A `FastADError` is a mistake the user can fix (bad path, corrupt image, mismatched checkpoint). The
CLI prints its message as one line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class FastADError(Exception):
    """An error caused by user input, reported as one clear line without a traceback."""
