"""Expected failures: the CLI prints them as one line and exits 1, the web answers cleanly."""


class WebstatsError(Exception):
    """A failure the operator can act on (bad input, unreachable database, missing parameter)."""


class ConfigError(WebstatsError):
    """Configuration could not be loaded; the message names the parameter or file."""
