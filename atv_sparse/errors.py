"""The one exception type users see.

Every problem caused by the user's input (a missing checkpoint, a bad pattern, a corrupt tensor)
raises :class:`AtvSparseError` with a one-line message that names the file, tensor, layer or
parameter and says what to do. Library messages name Python parameters in backticks
(`` `nsamples` must be at least 1``), never command-line flags: the CLI prints ``error: <message>``
with its own flag for each parameter it has (``--nsamples``), exit code 2. Anything else is a bug
and keeps its traceback: a broken internal invariant is an assertion, a call with the wrong kind
of argument a ``TypeError``.
"""


class AtvSparseError(ValueError):
    """Bad input: the message names the offending thing and how to fix it."""


def with_flags(message: str, flags: dict[str, str]) -> str:
    """``message`` with each backticked parameter name that ``flags`` knows written as its flag
    (`` `nsamples` `` -> ``--nsamples``); other backticked names stay as they are."""
    import re

    return re.sub(r"`(\w+)`", lambda m: flags.get(m.group(1), m.group(0)), message)
