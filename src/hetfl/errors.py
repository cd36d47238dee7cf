"""User-facing error types. The CLI prints these as one line and exits with code 2."""


class HetflError(Exception):
    """Base class for errors caused by user input (config, data files, CLI arguments)."""


class ConfigError(HetflError):
    """A config key is unknown, mistyped or has an impossible value. The message names the key."""


class HetflWarning(UserWarning):
    """Something the user should know about a run that still goes on; the CLI prints it as one line."""


class DataError(HetflError):
    """A data file is missing or malformed. The message names the file (and line where known)."""
