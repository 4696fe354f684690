"""Run Python code in a forked child (inside a network namespace, or as another user).

Tests and tools use this to play the client: a real Linux socket in the client namespace,
talking over the bridge to the VNIC or the baseline host; or an application of another uid.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from collections.abc import Callable
from typing import Any


def fork_call(fn: Callable[..., Any], *args: Any, timeout: float = 60.0) -> Any:
    """``fn(*args)`` in a forked child; its result (or its exception, as RuntimeError) here."""
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)

    def child() -> None:
        try:
            sender.send(("ok", fn(*args)))
        except BaseException as exc:  # report everything to the parent, which raises
            sender.send(("error", f"{exc!r}\n{traceback.format_exc()}"))

    process = ctx.Process(target=child, daemon=True)
    process.start()
    sender.close()
    try:
        if not receiver.poll(timeout):
            raise TimeoutError(f"child did not finish in {timeout} s")
        status, value = receiver.recv()
    finally:
        if process.is_alive():
            process.kill()
        process.join(5)
        receiver.close()
    if status != "ok":
        raise RuntimeError(f"child failed: {value}")
    return value


def run_in_netns(
    netns: str, fn: Callable[..., Any], *args: Any, timeout: float = 60.0, cpu: int | None = None
) -> Any:
    """``fn(*args)`` in a forked child that first enters ``netns`` (and is pinned to ``cpu``)."""

    def inside() -> Any:
        from pyroute2 import netns as pyroute2_netns

        pyroute2_netns.setns(netns, flags=0)  # never create a namespace that is gone
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        return fn(*args)

    return fork_call(inside, timeout=timeout)
