"""Two libOS TCP endpoints that differ only in the receive and transmit path: one takes the
pure-Python path, the other the compiled one (``libos.fast``), both in this process.

``World`` wires a ``NetStack`` and a ``TcpLayer`` the way the ``vnic`` runtime does
(``libos.api.vnic_tcp.VnicStreams.attach``, ``libos.api.vnic.VnicLibOS._progress``): on the
compiled path received frames go through the C RX burst (``arx_rx_burst``, which copies and
classifies them) and TCP segments are written by the C segment writer (``arx_tx_tcp``) into
TX buffers, both over a fake ring in ordinary memory instead of a device's DMA region.
Everything that leaves either world is collected on ``wire`` as whole Ethernet frames.

``frame`` builds the peer's frames, hostile ones included; ``snapshot`` is every piece of
connection state a differential test compares. Used by ``tests/test_tcp_fast_diff.py`` and
the micro-benchmark ``tools/bench_tcp_rx.py``.
"""

from __future__ import annotations

import random
import struct
from dataclasses import asdict
from typing import Any

from libos.net.arp import ArpCache
from libos.net.stack import NetStack
from libos.net.tcp import TcpConfig, TcpConnection, TcpLayer
from libos.net.tcp.control_block import ControlBlock
from libos.net.tcp.timers import Timers
from vdev import layout
from vdev.wire.checksum import internet_checksum, pseudo_header_sum
from vdev.wire.ipv4 import PROTO_TCP, Ipv4Packet

OUR_MAC = bytes.fromhex("02aa00000002")
PEER_MAC = bytes.fromhex("02bb00000009")
OUR_IP = bytes([10, 9, 0, 2])
PEER_IP = bytes([10, 9, 0, 9])
PORT = 80
PEER_PORT = 40000
ISN_KEY = b"differential-key"
RING = 16
BUF = layout.VNIC_BUFFER_SIZE
_TCP = struct.Struct("!HHIIBBHHH")
_IP = struct.Struct("!BBHHHBBH4s4s")


class FakeNic:
    """The compiled half of ``VnicDriver`` over memory of our own: the same C calls, the
    same arguments, a ring that completes whatever is put on it."""

    def __init__(self, ffi: Any, lib: Any, wire: list[bytes]) -> None:
        self.ffi = ffi
        self.lib = lib
        self.wire = wire
        self.rx_descs = ffi.new("struct arx_desc[]", RING)
        self.tx_descs = ffi.new("struct arx_desc[]", RING)
        self.rx_bufs = ffi.new("uint8_t[]", RING * BUF)
        self.tx_bufs = ffi.new("uint8_t[]", RING * BUF)
        self.arena = bytearray(RING * BUF)
        self.arena_ptr = ffi.from_buffer("uint8_t[]", self.arena, require_writable=True)
        self.lengths = ffi.new("uint32_t[]", RING)
        self.kinds = ffi.new("uint8_t[]", RING)
        self.errors = ffi.new("uint32_t *")
        self.rx_start = 0
        self.tx_prod = 0

    def receive(self, frames: list[bytes]) -> tuple[list[bytes], list[int]]:
        """Complete ``frames`` on the RX ring (at most a ring's worth) and take them with the
        C burst, as ``VnicDriver._receive_fast`` does."""
        if len(frames) > RING:
            raise ValueError(f"a burst holds at most {RING} frames")
        for k, frame in enumerate(frames):
            slot = (self.rx_start + k) % RING
            length = min(len(frame), BUF)
            self.ffi.memmove(self.rx_bufs + slot * BUF, frame[:length], length)
            desc = self.rx_descs[slot]
            desc.length = length
            desc.status = 0
        count = self.lib.arx_rx_burst(
            self.rx_descs, RING - 1, self.rx_bufs, RING * BUF, 0x1000, BUF, self.rx_start,
            len(frames), self.arena_ptr, len(self.arena), self.lengths, self.kinds, self.errors,
        )  # fmt: skip
        if count != len(frames):
            raise RuntimeError(f"the RX burst took {count} of {len(frames)} completed frames")
        self.rx_start = (self.rx_start + len(frames)) & 0xFFFFFFFF
        taken = [bytes(self.arena[i * BUF : i * BUF + self.lengths[i]]) for i in range(count)]
        return taken, list(self.kinds[0:count])

    def transmit_tcp(
        self, macs_ips: bytes, ttl: int, ident: int, src_port: int, dst_port: int, seq: int,
        ack: int, flags: int, window: int, options: bytes, payload: bytes | bytearray | memoryview,
    ) -> bool:  # fmt: skip
        payload_ptr = payload if type(payload) is bytes else self.ffi.from_buffer(payload)
        length = self.lib.arx_tx_tcp(
            self.tx_descs, RING - 1, self.tx_bufs, RING * BUF, 0x2000, BUF, self.tx_prod,
            macs_ips, macs_ips[12:], ttl, ident, src_port, dst_port, seq, ack, flags, window,
            options, len(options), payload_ptr, len(payload),
        )  # fmt: skip
        if length < 0:
            return False
        slot = self.tx_prod % RING
        desc = self.tx_descs[slot]
        assert desc.length == length and desc.iova == 0x2000 + slot * BUF
        self.wire.append(bytes(self.ffi.buffer(self.tx_bufs + slot * BUF, length)))
        self.tx_prod += 1
        return True


class World:
    """A NetStack and a TcpLayer, on the pure path (``compiled`` None) or the compiled one
    (``compiled`` = ``libos.fast.compiled()``), there with header prediction unless
    ``predict`` is False."""

    def __init__(self, config: TcpConfig, compiled: tuple[Any, Any] | None, predict: bool = True) -> None:
        arp: ArpCache[bytearray] = ArpCache(lifetime=1e9, refresh_margin=1.0)
        self.stack = NetStack(OUR_MAC, OUR_IP, 24, arp_cache=arp)
        arp.update(PEER_IP, PEER_MAC, 0.0, create=True)
        self.tcp = TcpLayer(
            config, isn_key=ISN_KEY, rng=random.Random(0), fast_path=compiled if predict else None
        )
        self.wire: list[bytes] = []
        self.stack.register_ip_protocol(PROTO_TCP, self._ip_input)
        self.nic: FakeNic | None = None
        if compiled is not None:
            self.nic = FakeNic(*compiled, self.wire)
            self.stack.tcp_writer = self.nic.transmit_tcp
            self.stack.tcp_input_verified = self._verified_input
            self.tcp.direct_send = self.stack.send_tcp
            self.tcp.direct_fields = self.stack.write_tcp
        self.conn: TcpConnection | None = None

    def _ip_input(self, packet: Ipv4Packet, raw: bytes, now: float) -> None:
        self.tcp.segment_received(packet.src, packet.dst, packet.payload, now)

    def _verified_input(self, src_ip: bytes, dst_ip: bytes, frame: bytes, end: int, now: float) -> None:
        self.tcp.frame_received(src_ip, dst_ip, frame, end, now)

    def deliver(self, frames: list[bytes], now: float) -> None:
        """One RX burst, then one turn of the runtime."""
        if self.nic is not None:
            taken, kinds = self.nic.receive(frames)
            self.stack.receive_burst(taken, kinds, now)
        else:
            for frame in frames:
                self.stack.receive(frame, now)
        self.turn(now)

    def turn(self, now: float) -> None:
        """What the runtime does after input or an application call: due timers and queued
        output, then the outboxes to the wire."""
        tcp = self.tcp
        deadline = tcp.next_deadline()
        if deadline is not None and deadline <= now:
            tcp.on_timer(now)
        for dst_ip, _src_ip, segment in tcp.drain_outbox():
            self.stack.send_ip(dst_ip, PROTO_TCP, segment, now)
        self.wire.extend(self.stack.outbox)
        self.stack.outbox.clear()

    def take_wire(self) -> list[bytes]:
        out = list(self.wire)
        self.wire.clear()
        return out


def frame(
    seq: int,
    ack: int,
    flags: int,
    window: int,
    payload: bytes,
    options: bytes = b"",
    *,
    data_offset: int | None = None,
    ident: int = 1,
    src_port: int = PEER_PORT,
    dst_port: int = PORT,
    total_delta: int = 0,
    pad: int = 0,
    corrupt: str = "",
) -> bytes:
    """The peer's Ethernet/IPv4/TCP frame; ``corrupt`` names one hostile change:
    ``tcp_csum``, ``ip_csum`` (a checksum flipped), ``total`` (the IPv4 total length off by
    ``total_delta``, its checksum correct). ``data_offset`` may lie about the options."""
    words = (20 + len(options)) // 4 if data_offset is None else data_offset
    header = _TCP.pack(src_port, dst_port, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, (words & 15) << 4,
                       flags & 0xFF, window, 0, 0)  # fmt: skip
    segment = bytearray(header + options + payload)
    checksum = internet_checksum(segment, pseudo_header_sum(PEER_IP, OUR_IP, PROTO_TCP, len(segment)))
    if corrupt == "tcp_csum":
        checksum ^= 0x0101
    struct.pack_into("!H", segment, 16, checksum)
    total = (20 + len(segment) + (total_delta if corrupt == "total" else 0)) & 0xFFFF
    ip = bytearray(_IP.pack(0x45, 0, total, ident, 0x4000, 64, PROTO_TCP, 0, PEER_IP, OUR_IP))
    ip_checksum = internet_checksum(ip)
    if corrupt == "ip_csum":
        ip_checksum ^= 0x8000
    struct.pack_into("!H", ip, 10, ip_checksum)
    return OUR_MAC + PEER_MAC + b"\x08\x00" + bytes(ip) + bytes(segment) + bytes(pad)


# Every field of a connection that the differential tests compare: the control block, the
# timers, and the state the sender, receiver and congestion control keep beside it.
CONTROL_BLOCK_FIELDS = tuple(ControlBlock.__slots__)


def snapshot(conn: TcpConnection) -> dict[str, object]:
    tcb = conn._tcb
    timers = conn._timers
    sender = conn._sender
    receiver = conn._receiver
    congestion = conn.congestion
    return {
        **{name: getattr(tcb, name) for name in CONTROL_BLOCK_FIELDS},
        **{f"timer.{name}": getattr(timers, name) for name in Timers.__slots__},
        "receive_buffer": bytes(receiver.buffer),
        "reassembly": receiver.reassembly.ranges(),
        "send_buffer": bytes(sender.buffer),
        "buffer_seq": sender.buffer_seq,
        "rtt_end": sender.rtt_end,
        "rto": (sender.rto.rto, sender.rto.srtt),
        "cwnd": (congestion.cwnd, congestion.ssthresh, congestion.in_recovery, congestion.dupacks),
        "scoreboard": sender._scoreboard.blocks(),
    }


def layer_state(world: World) -> dict[str, object]:
    """The layer's counters (but ``predicted``, which only says which path a segment
    took), its connections and its next deadline."""
    counters = world.tcp.counters.as_dict()
    del counters["predicted"]
    return {
        "tcp_counters": counters,
        "stack_counters": asdict(world.stack.counters),
        "connections": world.tcp.connection_count,
        "deadline": world.tcp.next_deadline(),
    }
