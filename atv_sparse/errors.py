"""The one exception type users see.

Every problem caused by the user's input (a missing checkpoint, a bad pattern, a corrupt tensor)
raises :class:`AtvSparseError` with a one-line message that names the file, tensor or layer and
says what to do. The CLI turns it into ``error: <message>`` and exit code 2; anything else is a bug
and keeps its traceback.
"""


class AtvSparseError(ValueError):
    """Bad input: the message names the offending thing and how to fix it."""
