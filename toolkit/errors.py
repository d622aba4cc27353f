"""The one exception a user sees.

Every stage raises :class:`ToolkitError` for bad input. The CLI prints its
message as a single line and exits with status 2; it never shows a traceback.
"""


class ToolkitError(Exception):
    """A problem the user can fix: the message names the input and what to do."""
