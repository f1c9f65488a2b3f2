"""What a process of ours asks of the Linux kernel about itself (``prctl``)."""

from __future__ import annotations

import signal

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4


def _prctl(option: int, arg: int) -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, arg, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: nothing to ask
        pass


def keep_memory_private() -> None:
    """Make this process not dumpable: a process of the same unix user (another command of
    the service user, or a compromised one) could otherwise read this one's memory and
    environment through ``/proc/<pid>/mem`` and ``environ`` (the database logins,
    ``etl/ip_hash_key``); no core dump of it is written either. ``exec`` resets it, so every
    entry point asks again; forks keep it."""
    _prctl(_PR_SET_DUMPABLE, 0)


def die_with_parent() -> None:
    """SIGKILL this process when its parent exits."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
