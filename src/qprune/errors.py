"""Errors meant for people: one line that names the config key (or file) and the fix.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class QpruneError(Exception):
    """Base of the errors the CLI reports in one line."""


class ConfigError(QpruneError, ValueError):
    """A config value is invalid or two values do not fit together."""


class DataError(QpruneError, FileNotFoundError):
    """A dataset cannot be found or read."""


class StorageError(QpruneError, OSError):
    """A file cannot be written (a full disk, a read-only filesystem): nothing half-written is left."""


class RunDirectoryError(QpruneError):
    """A run directory's file is missing or corrupt, so the run cannot be resumed as it is."""


class RunDirectoryBusy(RunDirectoryError):
    """Another process holds the run directory's lock (the same command running twice)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT), saying what it interrupted: the CLI prints it in one line, without a traceback."""
