"""Error types whose message is meant for the user, not for a debugger.

Anything raised as a `LoomError` is printed by the launcher as one line (`loomtrain: error: ...`)
instead of a stack trace: the message must name the key, file or rank at fault and say what to do.
"""


class LoomError(Exception):
    """A failure the user can fix: bad config, bad data, missing file, corrupt checkpoint."""


class ConfigError(LoomError):
    """A configuration value is wrong; raised before any process or training starts."""


class DataError(LoomError):
    """The data source is missing, empty or unreadable."""
