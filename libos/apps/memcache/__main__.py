"""memcached-compatible server (TCP and UDP on one port), written once against the queue API.

    python -m libos.apps.memcache --backend vnic --port 11211
    python -m libos.apps.memcache --backend linux --port 11211

It prints one line when it is ready (tests and tools wait for it) and its counters when
it stops (SIGTERM or SIGINT).
"""

from __future__ import annotations

import sys

from libos.api import LibOSError
from libos.apps.common import open_server_libos, parse_server_args, serve_and_report, server_parser, stop_on_signals
from libos.apps.memcache.server import DEFAULT_MAX_CLIENTS, McServer


def main(argv: list[str] | None = None) -> int:
    parser = server_parser("python -m libos.apps.memcache", __doc__, 11211, DEFAULT_MAX_CLIENTS)
    parser.add_argument("--no-udp", action="store_true", help="serve TCP only")
    args = parse_server_args(parser, argv)

    should_stop = stop_on_signals()
    try:
        los = open_server_libos(args, f"memcache:{args.port}")
        server = McServer(los, args.port, address=args.address, max_clients=args.max_clients,
                          udp=not args.no_udp)
    except (LibOSError, ValueError) as exc:
        print(f"memcache: {exc}", file=sys.stderr)
        return 1
    serve_and_report("memcache", args, server, los, should_stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
