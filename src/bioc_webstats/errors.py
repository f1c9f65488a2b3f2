"""Expected failures: the CLI prints them as one line and exits 1, the web answers cleanly."""


class WebstatsError(Exception):
    """A failure the operator can act on (bad input, unreachable database, missing parameter)."""

    exit_code = 1


class SchemaBehindError(WebstatsError):
    """The database has no schema yet or an older one: `bioc-webstats db upgrade` is the fix.
    Exit status 3, so a deploy decides to migrate by the status, not by the message."""

    exit_code = 3


class ConfigError(WebstatsError):
    """Configuration could not be loaded; the message names the parameter or file."""
