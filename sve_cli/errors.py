"""One exception family for user errors.

The CLI catches `SveError` (and pydantic's validation errors, and the `OSError`s that are the
environment's: a missing file, no permission, a full disk) and prints one line, exit code 2; anything
else is our bug and keeps its traceback.
"""


class SveError(Exception):
    """A problem with what the user handed us (a path, a file, an option), not a bug."""


class RecipeError(SveError):
    """A recipe file that cannot be read or validated."""


class LockedError(SveError):
    """Another sve process holds the output."""


class CheckpointError(SveError):
    """A model checkpoint is missing, unreadable or malformed."""


class TargetError(SveError):
    """The targeted parameters cannot be resolved."""


class ForeignDecompositionError(SveError):
    """A decomposition cache was taken from other weights than the model being built."""


class OutputExistsError(SveError):
    """An output already exists and `--overwrite` was not given."""
