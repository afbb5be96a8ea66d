"""The zerotrain config error type (a leaf module: everything else in the package imports it)."""


class ConfigError(ValueError):
    """A configuration problem; the message names each bad field, the value received and the fix."""
