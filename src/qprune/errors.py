"""Errors meant for people: one line that names the config key (or file) and the fix.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class QpruneError(Exception):
    """Base of the errors the CLI reports in one line."""


class ConfigError(QpruneError, ValueError):
    """A config value is invalid or two values do not fit together."""


class DataError(QpruneError, FileNotFoundError):
    """A dataset cannot be found or read."""
