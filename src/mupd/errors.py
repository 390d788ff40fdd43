"""Errors a user can act on.

Every message names the thing at fault (file, gene, size, stain) so that the CLI, the server
(HTTP 4xx) and the plugin (a notification) can show it as is, without a traceback.
"""


class MuPDError(Exception):
    """Base class: a problem with the user's input or setup, with a message fit to show."""


class SlideError(MuPDError):
    """A slide file that cannot be opened or read as asked."""


class RegionError(MuPDError):
    """A region that is empty, negative or outside the slide."""


class OutputExistsError(MuPDError):
    """Refusing to overwrite an existing file without an explicit flag."""


class ModelError(MuPDError):
    """A model folder that is missing, incomplete, or not a MuPD model."""


class ConditionError(MuPDError):
    """A bad condition: unknown stain, unusable RNA profile, wrong tile size, bad text."""


class DataError(MuPDError):
    """Training or fine-tuning data that cannot be used (reported before training starts)."""


class CancelledError(MuPDError):
    """A long job was cancelled by the user."""
