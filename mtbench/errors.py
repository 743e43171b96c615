"""The one user-facing error type.

A :class:`MtbenchError` carries a one-line message naming the bad value and what is accepted. The CLI prints it
without a traceback and exits with code 2; library callers can catch it.
"""


class MtbenchError(ValueError):
    """Bad input from the user (unknown name, invalid option value, missing file). Message is one line."""
