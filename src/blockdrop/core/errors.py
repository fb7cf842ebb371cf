"""User-facing errors.

Every problem a user can cause (bad file, bad field, bad flag) is raised as a
``BlockdropError`` whose message names the file, field or flag. The CLI prints
it on one line and exits non-zero; library callers can catch it.
"""


class BlockdropError(Exception):
    """A problem with user input; the message is shown to the user as is."""


class AnnotationError(BlockdropError):
    """A malformed or inconsistent annotation file."""


class DataError(BlockdropError):
    """Unreadable media, arrays or dataset files."""


class ConfigError(BlockdropError):
    """An invalid configuration file, key or command-line override."""


class CheckpointError(BlockdropError):
    """A checkpoint that cannot be read or does not fit the model."""


class TrainingError(BlockdropError):
    """A run that cannot go on as configured (e.g. a loss that went non-finite)."""


class RunFolderError(BlockdropError):
    """A run folder that cannot be used as asked (locked, changed, damaged)."""


class OutputError(BlockdropError):
    """An output path that cannot be written as asked: not a regular file, not one blockdrop wrote,
    or not writable."""


class DiskFullError(OutputError):
    """A write refused for lack of space (a full disk or an exhausted quota)."""


def listing(items, shown: int = 20) -> str:
    """At most ``shown`` items, comma-separated, with a count of the rest (for error messages)."""
    items = [str(i) for i in items]
    more = f" ... and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more
