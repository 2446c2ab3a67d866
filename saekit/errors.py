"""One exception type for every user-facing error.

A `SaekitError` message is one line that says what is wrong and what to do. The CLI prints it
as `error: <message>` and exits non-zero, without a traceback.
"""


class SaekitError(Exception):
    """A user-facing error: bad input, a corrupt or incomplete store, a refused overwrite."""
