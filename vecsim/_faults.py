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
