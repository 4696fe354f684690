"""memcached-compatible server (TCP and UDP on one port), written once against the queue API.

    python -m libos.apps.memcache --backend vnic --port 11211
    python -m libos.apps.memcache --backend linux --port 11211
    python -m libos.apps.memcache --backend vnic --port 11211 --workers 2

With ``--workers N`` it runs N worker processes (``libos.apps.workers``: one per VNIC
queue pair, or per SO_REUSEPORT socket on linux). Each worker owns a whole, independent
store, like N separate memcached instances behind one address: a flow (a TCP connection,
or a UDP client socket) always reaches the same worker, so a client sees its own writes on
that connection, but a key set over one connection is not visible to a connection that
landed on another worker. Partitioning the keys instead would need every worker to forward
requests for keys it does not own, across processes, on the request path; the device steers
by flow, not by key, so it cannot do that part.

It prints one line when it is ready (tests and tools wait for it) and its counters when
it stops (SIGTERM or SIGINT).
"""

from __future__ import annotations

import sys
import time

from libos.api import LibOS, LibOSError
from libos.apps.common import open_server_libos, parse_server_args, serve_and_report, server_parser, stop_on_signals
from libos.apps.memcache.protocol import McEngine
from libos.apps.memcache.server import DEFAULT_MAX_CLIENTS, McServer
from libos.apps.memcache.store import DEFAULT_MAX_BYTES, McStore
from libos.apps.workers import add_workers_option, serve_workers


def main(argv: list[str] | None = None) -> int:
    parser = server_parser("python -m libos.apps.memcache", __doc__, 11211, DEFAULT_MAX_CLIENTS)
    parser.add_argument("--no-udp", action="store_true", help="serve TCP only")
    parser.add_argument("-m", "--memory", type=int, default=DEFAULT_MAX_BYTES >> 20, metavar="MB",
                        help="item memory in megabytes, as memcached's -m (default %(default)s)")
    add_workers_option(parser)
    args = parse_server_args(parser, argv)
    if args.memory < 1:
        parser.error("--memory must be at least 1 MB")

    def make_server(los: LibOS) -> McServer:
        now = time.time()
        engine = McEngine(now, McStore(max_bytes=args.memory << 20, started_at=now))
        return McServer(los, args.port, address=args.address, max_clients=args.max_clients,
                        udp=not args.no_udp, engine=engine)

    if args.workers != 1:
        return serve_workers("memcache", args, make_server)

    should_stop = stop_on_signals()
    try:
        los = open_server_libos(args, f"memcache:{args.port}")
        server = make_server(los)
    except (LibOSError, ValueError) as exc:
        print(f"memcache: {exc}", file=sys.stderr)
        return 1
    serve_and_report("memcache", args, server, los, should_stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
