"""Errors a user can act on: entry points print their message alone, without a traceback."""


class UserError(Exception):
    """A problem with the user's data, weights or configuration, explained in the message."""


class DatasetError(UserError):
    """The dataset is missing, empty or inconsistent."""


class WeightsUnavailableError(UserError):
    """Pretrained weights were asked for but cannot be found or fetched."""


class ConfigError(UserError):
    """A configuration value is out of range or unknown."""
