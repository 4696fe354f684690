"""Redis-compatible key-value server, written once against the queue API.

    python -m libos.apps.kv --backend vnic --port 6379
    python -m libos.apps.kv --backend linux --port 6379

It prints one line when it is ready (tests and tools wait for it) and its counters when
it stops (SIGTERM or SIGINT).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from libos.api import BACKENDS, LibOSError, open_libos
from kernelctl.client import ControlError
from libos.apps.kv.durable import (
    DEFAULT_LOG_BYTES,
    CommandLogError,
    baseline_log_path,
    open_linux_log,
    open_vsa_log,
)
from libos.apps.kv.server import DEFAULT_MAX_CLIENTS, KvServer
from libos.storage.log import LogError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m libos.apps.kv", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=BACKENDS, required=True)
    parser.add_argument("--port", type=int, default=6379)
    parser.add_argument("--address", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--instance", default="", help="topology instance (tests use their own)")
    parser.add_argument("--netns", default=None,
                        help="linux: namespace to run in ('' stays here; default: the instance's baseline)")
    parser.add_argument("--max-clients", type=int, default=DEFAULT_MAX_CLIENTS)
    parser.add_argument("--poll-window", type=float, default=None, help="vnic: seconds of polling before sleeping")
    parser.add_argument("--durable", action="store_true",
                        help="log every write before replying (vnic: a VSA; linux: a file fsynced per loop turn)")
    parser.add_argument("--vsa", default=None, help="vnic --durable: the VSA to log to (default kv-PORT)")
    parser.add_argument("--log-size", type=int, default=DEFAULT_LOG_BYTES, help="bytes of log (VSA or file)")
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
        command_log = None
        if args.durable:
            if args.backend == "vnic":
                command_log = open_vsa_log(args.instance, args.vsa or f"kv-{args.port}", args.log_size)
            else:
                command_log = open_linux_log(baseline_log_path(args.instance, args.port), args.log_size)
        los = open_libos(args.backend, instance=args.instance, netns=args.netns,
                         name=f"kv:{args.port}", poll_window=args.poll_window)
        server = KvServer(los, args.port, address=args.address, max_clients=args.max_clients,
                          command_log=command_log)
    except (LibOSError, ValueError, OSError, ControlError, LogError, CommandLogError) as exc:
        print(f"kv: {exc}", file=sys.stderr)
        return 1
    print(f"kv: ready backend={args.backend} port={args.port}", flush=True)
    server.serve(lambda: stopping)
    stats = server.stats()
    print("kv: stats " + json.dumps(stats), flush=True)
    server.server.close_all()
    los.shutdown()
    if server.command_log is not None:
        server.command_log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
