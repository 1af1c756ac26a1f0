"""User-facing errors.

Every error a user can cause (bad config, bad data line, missing file, unsupported
checkpoint) is a :class:`MinicdError` subclass whose message says what went wrong, where
(file:line or config key) and how to fix it. ``assert`` is reserved for internal invariants.
"""


class MinicdError(Exception):
    """Base class of every error minicd raises on purpose."""


class ConfigError(MinicdError):
    """A configuration key is missing, unknown or has an invalid value."""


class CheckpointError(MinicdError):
    """A checkpoint or adapter is missing, malformed or unsupported."""


class DataError(MinicdError):
    """An input data file is unreadable or a record in it is invalid."""


class DistributedError(MinicdError):
    """The distributed environment is inconsistent (torchrun variables, backends)."""


class OutputError(MinicdError):
    """An output path cannot be written (read-only, under a file, disk full) or already holds a
    run that would be mixed with the new one."""
