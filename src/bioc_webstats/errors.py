"""Expected failures: the CLI prints them as one line and exits 1, the web answers cleanly."""


class WebstatsError(Exception):
    """A failure the operator can act on (bad input, unreachable database, missing parameter)."""


class ConfigError(WebstatsError):
    """Configuration could not be loaded; the message names the parameter or file."""


def first_line(exc: BaseException) -> str:
    """An error as one journal line: the first line of its text (of the driver's error under
    a SQLAlchemy one, whose own text adds SQL and a link), else its type's name."""
    inner = getattr(exc, "orig", None) or exc
    text = str(inner).strip()
    return text.splitlines()[0] if text else type(inner).__name__


def printable(text: str) -> str:
    """A text for one line of output: each character that would break or forge the line (a
    line break, an escape sequence, a bell) written as its escape (``\\n``), the rest as is."""
    if text.isprintable():
        return text
    # (a backslash doubled then: an escaped newline and a "\\n" the value held differ)
    return "".join(
        "\\\\" if ch == "\\" else ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text
    )
