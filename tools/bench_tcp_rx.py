"""Micro-benchmark (not a test): the libOS's cost per received TCP segment, by path.

    python -m tools.bench_tcp_rx [--segments N] [--repeats R] [--json PATH]

One established connection (``tools/tcp_worlds.py``: a NetStack and a TcpLayer wired as the
``vnic`` runtime wires them, over a fake ring) takes bursts of 32 in-order segments from its
peer, then the application reads everything; the peer's segments are built beforehand. Three
paths, in one process:

* ``pure``: the pure-Python reference (what ARRAKIS_PURE=1 runs);
* ``compiled``: the C RX burst and checksums, C segment writer, TCP in Python
  (ARRAKIS_TCP_PREDICT=0);
* ``predicted``: the same with TCP header prediction in C (the default).

Workloads: data segments of 100 and 1460 bytes (the receiving side of a request stream; we
ACK every second one); pure ACKs of data we send (each frees room, and more data goes out);
and request/response rounds as a key-value server sees them (a 40-byte request that also
acknowledges our last reply, read by the application, answered with a 60-byte reply: one
segment in and one out per round, so the figure is per round). The figure is CPU time of this process per segment (``time.process_time``), the best
of ``--repeats`` runs: the machine is shared, so the minimum is the least disturbed. The
compiled paths include the C RX burst's copy out of the ring; the pure path starts from the
copied frames, so the comparison slightly favours it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from libos import fast
from libos.net.tcp import TcpConfig, TcpState
from tools.tcp_worlds import PEER_IP, PEER_PORT, PORT, RING, World, frame
from vdev.wire.tcp import ACK, PSH, SYN, TcpSegment

BURST = RING
PATHS = ("pure", "compiled", "predicted")


def _world(path: str) -> World:
    compiled = None if path == "pure" else fast.compiled()
    config = TcpConfig(recv_buffer=1 << 20, send_buffer=1 << 24)  # room for every ACKed segment
    world = World(config, compiled, predict=path == "predicted")
    world.tcp.listen(PORT)
    world.deliver([frame(1000, 0, SYN, 65535, b"", b"\x02\x04\x05\xb4")], 0.0)
    syn_ack = TcpSegment.parse(world.take_wire()[0][34:], world.stack.ip, PEER_IP)
    world.deliver([frame(1001, syn_ack.seq + 1, ACK, 65535, b"")], 0.0)
    world.conn = world.tcp.accept(PORT)
    assert world.conn is not None and world.conn.state == TcpState.ESTABLISHED
    world.take_wire()
    return world


def _data_run(path: str, size: int, segments: int) -> float:
    """CPU seconds for ``segments`` in-order data segments of ``size`` bytes."""
    world = _world(path)
    conn = world.conn
    assert conn is not None
    seq = conn.rcv_nxt
    ack = conn.snd_una
    payload = bytes(size)
    frames = []
    for _ in range(segments):
        frames.append(frame(seq, ack, ACK | PSH, 65535, payload, src_port=PEER_PORT))
        seq = (seq + size) & 0xFFFFFFFF
    bursts = [frames[i : i + BURST] for i in range(0, len(frames), BURST)]
    now = 1.0
    start = time.process_time()
    for burst in bursts:
        world.deliver(burst, now)
        conn.recv(1 << 20)
        world.turn(now)
        world.wire.clear()
        now += 0.0001
    spent = time.process_time() - start
    assert conn.rcv_nxt == seq, "every segment must have been taken"
    return spent


def _ack_run(path: str, segments: int) -> float:
    """CPU seconds for ``segments`` pure ACKs, each acknowledging one MSS of our data."""
    world = _world(path)
    conn = world.conn
    assert conn is not None
    mss = conn.snd_mss
    conn.send(bytes(mss * (segments + 64)))
    world.turn(0.5)
    world.wire.clear()
    seq = conn.rcv_nxt
    ack = conn.snd_una
    frames = []
    for _ in range(segments):
        ack = (ack + mss) & 0xFFFFFFFF
        frames.append(frame(seq, ack, ACK, 65535, b""))
    bursts = [frames[i : i + BURST] for i in range(0, len(frames), BURST)]
    now = 1.0
    start = time.process_time()
    for burst in bursts:
        world.deliver(burst, now)
        world.wire.clear()
        now += 0.0001
    spent = time.process_time() - start
    assert conn.snd_una == ack, "every ACK must have been taken"
    return spent


def _request_run(path: str, rounds: int) -> float:
    """CPU seconds for ``rounds`` request/response exchanges, one at a time."""
    world = _world(path)
    conn = world.conn
    assert conn is not None
    request = b"*2\r\n$3\r\nGET\r\n$16\r\nkey:000000000001\r\n"[:40].ljust(40, b"x")
    reply = b"$50\r\n" + bytes(50) + b"\r\n"
    reply = reply[:60].ljust(60, b"y")
    seq = conn.rcv_nxt
    frames = []
    ack = conn.snd_una
    for _ in range(rounds):
        frames.append(frame(seq, ack, ACK | PSH, 65535, request))
        seq = (seq + len(request)) & 0xFFFFFFFF
        ack = (ack + len(reply)) & 0xFFFFFFFF
    now = 1.0
    start = time.process_time()
    for one in frames:
        world.deliver([one], now)
        conn.recv(4096)
        conn.send(reply)
        world.turn(now)
        world.wire.clear()
        now += 0.0001
    spent = time.process_time() - start
    assert conn.rcv_nxt == seq and conn.snd_nxt == ack, "every round must have completed"
    return spent


def measure(segments: int, repeats: int) -> dict[str, Any]:
    workloads: dict[str, Callable[[str], float]] = {
        "data 100 B": lambda path: _data_run(path, 100, segments),
        "data 1460 B": lambda path: _data_run(path, 1460, segments),
        "pure ACK": lambda path: _ack_run(path, segments),
        "request/reply": lambda path: _request_run(path, segments),
    }
    results: dict[str, Any] = {}
    for name, run in workloads.items():
        row: dict[str, float] = {}
        for path in PATHS:
            best = min(run(path) for _ in range(repeats))
            row[path] = best / segments * 1e6
        results[name] = row
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_tcp_rx", description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=4096, help="segments per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs per path; the best counts")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    results = measure(args.segments, args.repeats)
    print(f"TCP receive path, us of CPU per segment (best of {args.repeats} x {args.segments} segments; "
          "shared, loaded machine)")
    print(f"{'workload':14s}" + "".join(f"{path:>11s}" for path in PATHS) + f"{'pure/pred':>11s}{'comp/pred':>11s}")
    for name, row in results.items():
        print(f"{name:14s}" + "".join(f"{row[path]:11.2f}" for path in PATHS)
              + f"{row['pure'] / row['predicted']:11.2f}{row['compiled'] / row['predicted']:11.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"us_per_segment": results, "segments": args.segments,
                                         "repeats": args.repeats, "machine": "shared 2-core VM, loaded"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
