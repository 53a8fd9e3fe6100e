"""User-facing errors.

Anything a user can fix (a bad flag, a missing file, an unsupported model) raises `SlicelmError`
with a one-line message that says what to do. The CLI turns it into ``slicelm: error: ...`` and
exit code 2; everything else is a bug and keeps its traceback.
"""


class SlicelmError(Exception):
    """A mistake in the user's input, reported as one line and exit code 2 by the CLI."""
