"""Errors that mean the user asked for something that cannot be done: the CLI prints them as one line."""


class ConfigError(ValueError):
    """A config that cannot train; raised before anything is compiled."""
