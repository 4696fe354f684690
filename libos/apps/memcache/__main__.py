"""memcached-compatible server (TCP and UDP on one port), written once against the queue API.

    python -m libos.apps.memcache --backend vnic --port 11211
    python -m libos.apps.memcache --backend linux --port 11211

It prints one line when it is ready (tests and tools wait for it) and its counters when
it stops (SIGTERM or SIGINT).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from libos.api import BACKENDS, LibOSError, open_libos
from libos.apps.memcache.server import DEFAULT_MAX_CLIENTS, McServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m libos.apps.memcache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=BACKENDS, required=True)
    parser.add_argument("--port", type=int, default=11211)
    parser.add_argument("--address", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--instance", default="", help="topology instance (tests use their own)")
    parser.add_argument("--netns", default=None,
                        help="linux: namespace to run in ('' stays here; default: the instance's baseline)")
    parser.add_argument("--max-clients", type=int, default=DEFAULT_MAX_CLIENTS)
    parser.add_argument("--no-udp", action="store_true", help="serve TCP only")
    parser.add_argument("--poll-window", type=float, default=None, help="vnic: seconds of polling before sleeping")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error("--port must be in 1..65535")

    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        los = open_libos(args.backend, instance=args.instance, netns=args.netns,
                         name=f"memcache:{args.port}", poll_window=args.poll_window)
        server = McServer(los, args.port, address=args.address, max_clients=args.max_clients,
                          udp=not args.no_udp)
    except (LibOSError, ValueError) as exc:
        print(f"memcache: {exc}", file=sys.stderr)
        return 1
    print(f"memcache: ready backend={args.backend} port={args.port}", flush=True)
    server.serve(lambda: stopping)
    stats = server.stats()
    print("memcache: stats " + json.dumps(stats), flush=True)
    server.server.close_all()
    los.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
