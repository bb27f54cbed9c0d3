"""User-facing errors.

A :class:`LowbitError` is a mistake the user can fix (a wrong path, an unsupported bit-width, an output folder
that already exists). The CLI prints its message on one line and exits non-zero instead of showing a traceback,
so every message must say what is wrong *and* how to fix it.
"""


class LowbitError(Exception):
    """A problem with the user's input, explained in one actionable line."""
