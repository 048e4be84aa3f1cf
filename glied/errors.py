"""Errors that the CLI turns into one clear line and a non-zero exit.

Raise :class:`GliedError` (or a subclass) for anything a user can fix: a missing file, a bad config,
mismatched cached features, missing weights. The message must name the file and say what to do.
"""


class GliedError(Exception):
    """A user-facing error: the CLI prints ``error: <message>`` on one line and exits with status 2."""


class InputError(GliedError):
    """Bad user input: a missing or unreadable file, invalid JSON, an unknown id."""


class ConfigError(GliedError):
    """A bad or inconsistent configuration, or a checkpoint/cache whose identity does not match."""


class WeightsError(GliedError):
    """Missing, unsafe or mismatched model weights."""
