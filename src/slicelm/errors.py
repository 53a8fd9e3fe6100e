"""User-facing errors.

Anything a user can fix (a bad flag, a missing file, an unsupported model) raises `SlicelmError`
with a one-line message that says what to do. The CLI turns it into ``slicelm: error: ...`` and
exit code 2; everything else is a bug and keeps its traceback.
"""


class SlicelmError(Exception):
    """A mistake in the user's input, reported as one line and exit code 2 by the CLI."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
