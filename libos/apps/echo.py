"""UDP echo server, written once against the queue API, run on either backend.

    python -m libos.apps.echo --backend vnic --port 7
    python -m libos.apps.echo --backend linux --port 7

Each datagram goes back to its sender unchanged. The server prints one line when it is
ready (tests and tools wait for it) and its counters when it stops (SIGTERM or SIGINT).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from libos.api import BACKENDS, LibOSError, Opcode, SocketKind, open_libos


def parse_rate(text: str) -> int:
    """'10mbit', '500kbit', '1gbit' or plain bits per second."""
    units = {"gbit": 10**9, "mbit": 10**6, "kbit": 10**3, "bit": 1}
    lowered = text.strip().lower()
    for suffix, scale in units.items():
        if lowered.endswith(suffix):
            return int(float(lowered[: -len(suffix)]) * scale)
    return int(lowered)


POPS_IN_FLIGHT = 16


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=BACKENDS, required=True)
    parser.add_argument("--port", type=int, default=7)
    parser.add_argument("--instance", default="", help="topology instance (tests use their own)")
    parser.add_argument("--rate", type=parse_rate, default=0, help="vnic: limit each direction, e.g. 10mbit")
    parser.add_argument("--sink", action="store_true", help="count datagrams, do not answer")
    parser.add_argument("--poll-window", type=float, default=None, help="vnic: seconds of polling before sleeping")
    args = parser.parse_args(argv)

    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        los = open_libos(
            args.backend,
            instance=args.instance,
            name=f"echo:{args.port}",
            rx_bps=args.rate,
            tx_bps=args.rate,
            poll_window=args.poll_window,
        )
        qd = los.socket(SocketKind.UDP)
        los.bind(qd, ("0.0.0.0", args.port))
    except LibOSError as exc:
        print(f"echo: {exc}", file=sys.stderr)
        return 1
    print(f"echo: ready backend={args.backend} port={args.port}", flush=True)
    received = 0
    received_bytes = 0
    # Several pops wait at once and one wait hands back a poll's worth of datagrams; push
    # tokens are collected too (True marks a pop), so no completed result is left behind.
    pending: dict[int, bool] = {los.pop(qd): True for _ in range(POPS_IN_FLIGHT)}
    while not stopping:
        for token, result in los.wait_many(pending, 0.2):
            if not pending.pop(token):
                continue  # a push completed
            if result.opcode is Opcode.POP and result.address is not None:
                received += 1
                received_bytes += len(result.data)
                if not args.sink:
                    pending[los.pushto(qd, result.data, result.address)] = False
            pending[los.pop(qd)] = True
    stats = los.stats()
    stats.update(received=received, received_bytes=received_bytes)
    print("echo: stats " + json.dumps(stats), flush=True)
    los.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
