"""Redis-compatible key-value server, written once against the queue API.

    python -m libos.apps.kv --backend vnic --port 6379
    python -m libos.apps.kv --backend linux --port 6379

It prints one line when it is ready (tests and tools wait for it) and its counters when
it stops (SIGTERM or SIGINT).
"""

from __future__ import annotations

import argparse
import sys

from kernelctl.client import ControlError
from libos.api import LibOSError
from libos.apps.common import open_server_libos, parse_server_args, serve_and_report, server_parser, stop_on_signals
from libos.apps.kv.durable import (
    DEFAULT_LOG_BYTES,
    CommandLogError,
    baseline_log_path,
    open_linux_log,
    open_vsa_log,
)
from libos.apps.kv.files import kv_names, name_snapshot
from libos.apps.kv.server import DEFAULT_MAX_CLIENTS, KvServer
from libos.files import FileServer, ServerError
from libos.storage.log import LogError


def main(argv: list[str] | None = None) -> int:
    parser = server_parser("python -m libos.apps.kv", __doc__, 6379, DEFAULT_MAX_CLIENTS)
    parser.add_argument("--durable", action="store_true",
                        help="log every write before replying (vnic: a VSA; linux: a file fsynced per loop turn)")
    parser.add_argument("--vsa", default=None, help="vnic --durable: the VSA to log to (default kv-PORT)")
    parser.add_argument("--log-size", type=int, default=DEFAULT_LOG_BYTES, help="bytes of log (VSA or file)")
    parser.add_argument("--names", action=argparse.BooleanOptionalAction, default=None,
                        help="serve /apps/kv-PORT/keys and /info in kernelctl's name tree (default: with vnic)")
    args = parse_server_args(parser, argv)

    should_stop = stop_on_signals()
    files: FileServer | None = None
    try:
        command_log = None
        if args.durable:
            if args.backend == "vnic":
                command_log = open_vsa_log(args.instance, args.vsa or f"kv-{args.port}", args.log_size)
            else:
                command_log = open_linux_log(baseline_log_path(args.instance, args.port), args.log_size)
        los = open_server_libos(args, f"kv:{args.port}")
        server = KvServer(los, args.port, address=args.address, max_clients=args.max_clients,
                          command_log=command_log)
        if args.names if args.names is not None else args.backend == "vnic":
            if args.durable and args.backend == "vnic":
                name_snapshot(args.instance, args.port, args.vsa or f"kv-{args.port}")
            files = FileServer(args.instance)
            files.start(kv_names(server.engine, args.port))
    except (LibOSError, ValueError, OSError, ControlError, LogError, CommandLogError, ServerError) as exc:
        print(f"kv: {exc}", file=sys.stderr)
        return 1
    serve_and_report("kv", args, server, los, should_stop)
    if files is not None:
        files.stop()
    if server.command_log is not None:
        server.command_log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
