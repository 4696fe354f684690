"""The fairness anchor of ``tools/bench kv``: our key-value engine (``KvSession``) behind a
plain ``asyncio.Protocol`` on Linux sockets, as a Python programmer would write it without
this project; with ``--backend uvloop`` the same code on uvloop's event loop.

    python -m tools.kv_anchor --backend asyncio|uvloop --instance TAG --port 6379

It runs in the instance's baseline namespace (like the ``linux`` backend), prints
``kv-anchor: ready backend=B port=P`` once it listens and ``kv-anchor: stats {json}`` after
SIGTERM or SIGINT. The linux backend of the queue API is fair only when it is at least as
fast as this.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from typing import Any

from libos.apps.kv.commands import KvEngine
from libos.apps.kv.session import KvSession

SWEEP_INTERVAL = 0.1  # active expiry ten times a second, as Redis's default hz


class KvProtocol(asyncio.Protocol):
    """One client connection: bytes in, KvSession, bytes out."""

    def __init__(self, engine: KvEngine, counters: dict[str, int]) -> None:
        self.engine = engine
        self.counters = counters
        self.session = KvSession(engine)
        self.transport: Any = None  # asyncio's Transport, or uvloop's (not a subclass of it)
        self.scheduled = False
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.counters["accepted"] += 1

    def data_received(self, data: bytes) -> None:
        self.session.feed(data, time.time())
        self._after_feed()

    def _after_feed(self) -> None:
        transport = self.transport
        if transport is None:
            return
        session = self.session
        out = session.take_output()
        if out:
            transport.write(out)
        if session.should_close:
            transport.close()
            return
        if session.has_pending():
            # A pipelining client's backlog runs on a later loop turn, as in StreamServer;
            # meanwhile read no more of its input.
            if not self.paused:
                transport.pause_reading()
                self.paused = True
            if not self.scheduled:
                self.scheduled = True
                asyncio.get_running_loop().call_soon(self._resume)
        elif self.paused:
            self.paused = False
            transport.resume_reading()

    def _resume(self) -> None:
        self.scheduled = False
        if self.transport is None or self.transport.is_closing():
            return
        self.session.feed(b"", time.time())
        self._after_feed()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.session.close()
        self.counters["closed"] += 1


async def serve(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    engine = KvEngine(now=time.time(), tcp_port=args.port)
    counters = {"accepted": 0, "closed": 0}
    server = await loop.create_server(lambda: KvProtocol(engine, counters), args.address, args.port,
                                      backlog=511, reuse_address=True)
    stopped = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)

    def sweep() -> None:
        engine.sweep(time.time())
        loop.call_later(SWEEP_INTERVAL, sweep)

    loop.call_later(SWEEP_INTERVAL, sweep)
    print(f"kv-anchor: ready backend={args.backend} port={args.port}", flush=True)
    await stopped.wait()
    server.close()
    return {"server": counters, "commands": engine.stats.total_commands_processed,
            "keys": len(engine.keyspace), "loop": type(loop).__module__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.kv_anchor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("asyncio", "uvloop"), required=True)
    parser.add_argument("--port", type=int, default=6379)
    parser.add_argument("--address", default="0.0.0.0")
    parser.add_argument("--instance", default="", help="topology instance whose baseline namespace to run in")
    parser.add_argument("--netns", default=None, help="namespace to run in ('' stays here)")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error("--port must be in 1..65535")
    netns = args.netns
    if netns is None:
        from kernelctl.names import topology

        netns = topology(args.instance).linux_netns
    if netns:
        from pyroute2 import netns as pyroute2_netns

        pyroute2_netns.setns(netns, flags=0)  # never create a namespace that is gone
    if args.backend == "uvloop":
        import uvloop

        stats = uvloop.run(serve(args))
    else:
        stats = asyncio.run(serve(args))
    print("kv-anchor: stats " + json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
