"""The exceptions a user sees.

Every stage raises a :class:`ToolkitError` subclass for bad input. The CLI prints its
message as a single line and exits with status 2; it never shows a traceback. Tests
match on the kind (``pytest.raises(ConfigError)``), not on the wording.
"""


class ToolkitError(Exception):
    """A problem the user can fix: the message names the input and what to do."""


class ConfigError(ToolkitError):
    """A config file, ``--set`` override or command flag is invalid (names the key)."""


class DataError(ToolkitError):
    """Input data (CSV, DICOM, NIfTI, store files) is missing or malformed (names the file)."""


class ContractError(ToolkitError):
    """Two artifacts do not fit together (a synthetic set made for another window, size or split)."""
