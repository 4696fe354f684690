"""Helpers for root tests: run client code inside a namespace, start and stop apps."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tools import nsrun

REPO = Path(__file__).resolve().parent.parent


def run_in_netns(netns: str, fn: Callable[..., Any], *args: Any, timeout: float = 60.0) -> Any:
    """``fn(*args)`` in a child inside ``netns``; a failure there fails the test here."""
    try:
        return nsrun.run_in_netns(netns, fn, *args, timeout=timeout)
    except RuntimeError as exc:
        raise AssertionError(str(exc)) from None


class App:
    """An application process (e.g. ``libos.apps.echo``) that prints a ready line."""

    def __init__(self, module: str, *args: str, ready: str = "ready", timeout: float = 30.0) -> None:
        self.argv = [sys.executable, "-u", "-m", module, *args]
        self.process = subprocess.Popen(
            self.argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        if not self._wait_for(ready, timeout):
            err = self.stop()
            raise AssertionError(f"{module} did not become ready: {self.lines} {err}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def _wait_for(self, text: str, timeout: float) -> bool:
        stdout = self.process.stdout
        if stdout is None:
            return False
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([stdout], [], [], 0.2)
            if ready:
                line = stdout.readline()
                if not line:
                    return False
                self.lines.append(line.rstrip())
                if text in line:
                    return True
            elif self.process.poll() is not None:
                return False
        return False

    def stop(self, sig: int = signal.SIGTERM) -> str:
        """Stop it; returns what it printed on stderr."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            out, err = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, err = self.process.communicate()
        self.lines += out.splitlines()
        return err

    def stats(self) -> dict[str, Any]:
        for line in reversed(self.lines):
            if line.startswith("echo: stats "):
                return json.loads(line[len("echo: stats ") :])
        raise AssertionError(f"no stats line in {self.lines}")

    def __enter__(self) -> App:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def echo_app(backend: str, tag: str, port: int, *extra: str) -> App:
    return App("libos.apps.echo", "--backend", backend, "--instance", tag, "--port", str(port), *extra)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
