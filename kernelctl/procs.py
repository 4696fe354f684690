"""Stopping a process kernelctl started (the daemon, the FUSE export) and may or may not be
the parent of: the CLI that ran ``up`` is not the one that runs ``down``."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path


def wait_or_kill(pid: int, timeout: float, current: Callable[[], int | None]) -> None:
    """Wait up to ``timeout`` seconds for ``pid`` to exit (reaping it if it is our child,
    else watching /proc), then SIGKILL it if ``current()`` still names it. Asking
    ``current()`` (the pid file) rather than killing ``pid`` blindly keeps a recycled pid safe."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                break
        except ChildProcessError:
            pass
        time.sleep(0.05)
    if current() == pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
