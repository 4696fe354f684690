"""What the server applications' command lines share: the options that pick a backend and a
port, the signals that stop them, and the two lines tests and tools read from stdout.

A server prints ``NAME: ready backend=B port=P`` once it listens (tests and tools wait for
that line) and ``NAME: stats {json}`` after SIGTERM or SIGINT stopped its loop.
"""

from __future__ import annotations

import argparse
import json
import signal
from collections.abc import Callable, Sequence
from typing import Protocol

from libos.api import BACKENDS, LibOS, open_libos
from libos.apps.streams import StreamServer


class ServedApp(Protocol):
    """What ``serve_and_report`` needs from an application server (KvServer, McServer)."""

    def serve(self, should_stop: Callable[[], bool]) -> None: ...

    def stats(self) -> dict[str, object]: ...

    @property
    def server(self) -> StreamServer: ...


def server_parser(prog: str, description: str | None, default_port: int,
                  default_max_clients: int) -> argparse.ArgumentParser:
    """A parser with the options every server takes; the caller adds its own after."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=BACKENDS, required=True)
    parser.add_argument("--port", type=int, default=default_port)
    parser.add_argument("--address", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--instance", default="", help="topology instance (tests use their own)")
    parser.add_argument("--netns", default=None,
                        help="linux: namespace to run in ('' stays here; default: the instance's baseline)")
    parser.add_argument("--max-clients", type=int, default=default_max_clients)
    parser.add_argument("--poll-window", type=float, default=None, help="vnic: seconds of polling before sleeping")
    return parser


def parse_server_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, and refuse a port outside 1..65535 (argparse exits with status 2)."""
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error("--port must be in 1..65535")
    return args


def stop_on_signals() -> Callable[[], bool]:
    """Make SIGTERM and SIGINT end the loop at its next turn instead of killing the process
    (the stats line must still be printed); the returned callable says whether one came.

    Installed before the libOS is opened, so a signal during start-up is not lost either.
    """
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return lambda: stopping


def open_server_libos(args: argparse.Namespace, name: str, *, queues: int = 1,
                      reuse_port: bool = False) -> LibOS:
    """The libOS the command line asked for, named ``name`` in kernelctl's registry
    (``queues`` and ``reuse_port``: for ``libos.apps.workers``)."""
    return open_libos(args.backend, instance=args.instance, netns=args.netns, name=name,
                      poll_window=args.poll_window, queues=queues, reuse_port=reuse_port)


def serve_and_report(name: str, args: argparse.Namespace, server: ServedApp, los: LibOS,
                     should_stop: Callable[[], bool]) -> None:
    """Print the ready line, serve until ``should_stop``, print the stats line, close."""
    print(f"{name}: ready backend={args.backend} port={args.port}", flush=True)
    server.serve(should_stop)
    print(f"{name}: stats " + json.dumps(server.stats()), flush=True)
    server.server.close_all()
    los.shutdown()
