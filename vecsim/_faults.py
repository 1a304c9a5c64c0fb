"""Crash-test hook: the tests that kill ``vecsim index`` and resume it use these points."""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def kill_point(name: str) -> None:
    """SIGKILL this process at the named point when VECSIM_KILL_AT names it ('name', or
    'name:N' for its N-th passage). Does nothing otherwise (one environment lookup)."""
    target = os.environ.get("VECSIM_KILL_AT")
    if not target or target.split(":")[0] != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if ":" not in target or int(target.split(":")[1]) == _counts[name]:
        os.kill(os.getpid(), signal.SIGKILL)


def kill_once(name: str) -> None:
    """SIGKILL this process at the named point the first time any process of the job passes
    it, when VECSIM_RAY_KILL_ONCE is 'name:MARKER' (MARKER: a file path that records the kill,
    so a restarted Ray actor is not killed again). Does nothing otherwise."""
    target = os.environ.get("VECSIM_RAY_KILL_ONCE")
    if not target or target.split(":", 1)[0] != name:
        return
    try:
        os.close(os.open(target.split(":", 1)[1], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
