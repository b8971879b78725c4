"""Errors a user can cause. The CLI prints them as one line and exits with status 2."""


class LmtError(Exception):
    """A problem with the user's input: a config value, a file, a port, a cluster spec."""


class ConfigError(LmtError):
    """A configuration value is missing, misspelt or of the wrong type or range."""


class DataError(LmtError):
    """A data source cannot be found or does not hold what it should."""
