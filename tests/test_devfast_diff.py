"""The compiled VNIC data path (vdev/fast) against the Python model, the reference.

Two identical worlds (a device, one function, a driver's DMA memory, a fake in-memory wire)
take the same sequence of operations, hostile ones included: bad IOVAs, read-only buffers,
bad lengths, impossible ring indices, spoofed sources, runts, ARP. One world runs the pure
Python path, the other the compiled one. After every step their driver memory (rings and
buffers), registers, counters and wire output must be equal.

With ARRAKIS_VDEV_FAST=asan (and libasan preloaded) the same test runs against the
AddressSanitizer/UBSan build; ``test_sanitized_build_passes_the_differential_test`` does that
in a subprocess.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import module_loaded, run_sanitized_pytest, sanitized_vfast_env
from vdev import layout
from vdev.fast.mirror import FastPath
from vdev.ring import DriverRing
from vdev.vnic.device import RX_BUDGET, TX_BUDGET, VnicDevice
from vdev.vnic.filters import Match
from vdev.vnic.function import FunctionConfig, VnicFunction

REPO = Path(__file__).resolve().parent.parent
PAGE = 4096
NIC_MAC = bytes.fromhex("02aa00000001")
FN_MAC = bytes.fromhex("02aa00000002")
PEER_MAC = bytes.fromhex("02bb00000009")
NIC_IP = bytes([10, 9, 0, 1])
FN_IP = bytes([10, 9, 0, 2])
PEER_IP = bytes([10, 9, 0, 9])
PORT = 7
OTHER_PORT = 8

RING_SIZE = 16
RX_RING_IOVA = 0x10000
TX_RING_IOVA = RX_RING_IOVA + 0x1000
RX1_RING_IOVA = RX_RING_IOVA + 0x2000  # queue 1's RX ring: RSS spreads flows over both
BUFFERS_IOVA = 0x20000  # 32 buffers of 2 KiB, read-write
RO_IOVA = 0x40000  # one read-only page
BUFFERS = 32
RW_SIZE = 0x30000 - 0x10000  # rings page pair + buffers


class FakeWire:
    def __init__(self) -> None:
        self.pending: list[bytes] = []
        self.sent: list[bytes] = []

    def fds(self) -> list[int]:
        return []

    def receive(self, queue: int, budget: int) -> list[bytes]:
        taken, self.pending = self.pending[:budget], self.pending[budget:]
        return taken

    def send(self, queue: int, frame: bytes) -> bool:
        self.sent.append(bytes(frame))
        return True

    def close(self) -> None:
        pass


def _memfd(size: int) -> int:
    fd = os.memfd_create("devfast-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(src_mac: bytes, dst_mac: bytes, src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0x4000, 64, 17, 0, src, dst)
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return dst_mac + src_mac + b"\x08\x00" + header + udp


def arp_request(sender_mac: bytes, sender_ip: bytes, target_ip: bytes) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, sender_mac, sender_ip, b"\0" * 6, target_ip)
    return b"\xff" * 6 + sender_mac + b"\x08\x06" + body


class World:
    """One device with one function and its driver, on a fake wire."""

    def __init__(self, fast: bool) -> None:
        self.wire = FakeWire()
        self.device = VnicDevice(self.wire, NIC_MAC, [NIC_IP])
        self.device.fast = FastPath(RX_BUDGET, TX_BUDGET) if fast else None
        self.now = 1.0
        config = FunctionConfig(function_id=1, mac=FN_MAC, ipv4=FN_IP, num_queues=2)
        self.function: VnicFunction = self.device.add_function(
            config, [Match(ip_proto=17, ip=FN_IP, port=PORT)], self.now
        )
        self.rw_fd = _memfd(RW_SIZE)
        self.ro_fd = _memfd(PAGE)
        self.memory = mmap.mmap(self.rw_fd, RW_SIZE)
        self.function.dma_table.map(RX_RING_IOVA, RW_SIZE, self.rw_fd, 0, readable=True, writable=True)
        self.function.dma_table.map(RO_IOVA, PAGE, self.ro_fd, 0, readable=True, writable=False)
        regs = self.function.regs
        self.view = view = memoryview(self.memory)
        self.rx = DriverRing(regs, 0, view[0 : RING_SIZE * 16], RING_SIZE, layout.VNIC_DESC)
        self.tx = DriverRing(regs, 1, view[0x1000 : 0x1000 + RING_SIZE * 16], RING_SIZE, layout.VNIC_DESC)
        self.rx1 = DriverRing(regs, 2, view[0x2000 : 0x2000 + RING_SIZE * 16], RING_SIZE, layout.VNIC_DESC)
        self.rx.enable(RX_RING_IOVA)
        self.tx.enable(TX_RING_IOVA)
        self.rx1.enable(RX1_RING_IOVA)
        self.function.sync_rings()
        self.next_buffer = 0

    def buffer_iova(self, kind: str) -> int:
        if kind == "ro":
            return RO_IOVA
        if kind == "outside":
            return 0x90000
        if kind == "straddle":
            return BUFFERS_IOVA + BUFFERS * 2048 - 100  # runs past the mapping's end
        self.next_buffer = (self.next_buffer + 1) % BUFFERS
        return BUFFERS_IOVA + self.next_buffer * 2048

    def apply(self, op: tuple[object, ...]) -> None:
        kind = op[0]
        if kind == "post_rx":
            _k, where, capacity = op
            assert isinstance(where, str) and isinstance(capacity, int)
            for rx in (self.rx, self.rx1):
                if rx.space() > 0:
                    rx.post(self.buffer_iova(where), capacity, 0, 0, 0)
                    rx.publish()
        elif kind == "wire":
            _k, frame = op
            assert isinstance(frame, bytes)
            self.device.backend.pending.append(frame)  # type: ignore[attr-defined]
        elif kind == "post_tx":
            _k, where, frame, length = op
            assert isinstance(where, str) and isinstance(frame, bytes) and isinstance(length, int)
            if self.tx.space() > 0:
                iova = self.buffer_iova(where)
                if where == "buffer":
                    offset = iova - RX_RING_IOVA
                    self.memory[offset : offset + len(frame)] = frame
                self.tx.post(iova, length, 0, 0, 0)
                self.tx.publish()
        elif kind == "bad_prod":
            _k, which, value = op
            assert isinstance(value, int)
            ring = self.rx if which == "rx" else self.tx
            ring.regs.u32[ring._prod_at] = value & 0xFFFFFFFF
        elif kind == "rss":
            # The driver's RSS block, hostile settings included (entries past the queue
            # count, sizes that are no power of two, unknown control bits).
            _k, control, size, entries, key = op
            assert isinstance(control, int) and isinstance(size, int)
            assert isinstance(entries, bytes) and isinstance(key, bytes)
            regs = self.function.regs
            regs.write32(layout.REG_RSS_CONTROL, control)
            regs.write32(layout.REG_RSS_TABLE_SIZE, size)
            page = regs.page
            page[layout.REG_RSS_KEY : layout.REG_RSS_KEY + len(key)] = key
            page[layout.REG_RSS_TABLE : layout.REG_RSS_TABLE + len(entries)] = entries
            self.function.sync_rings()
        elif kind == "reenable":
            rings = ((self.rx, RX_RING_IOVA), (self.tx, TX_RING_IOVA), (self.rx1, RX1_RING_IOVA))
            for ring, iova in rings:
                ring.disable()
            self.function.sync_rings()
            for ring, iova in rings:
                ring.prod = ring.reaped = 0
                ring.enable(iova)
            self.function.sync_rings()
        elif kind == "traffic":
            # Ordinary traffic, so that the fast cases are common among the hostile ones.
            _k, count, size = op
            assert isinstance(count, int) and isinstance(size, int)
            for index in range(count):
                self.apply(("post_rx", "buffer", 2048))
                self.apply(("wire", _good_rx(bytes([index]) * size)))
                frame = _good_tx(bytes([index]) * size)
                self.apply(("post_tx", "buffer", frame, len(frame)))
        elif kind == "reap":
            for ring in (self.rx, self.tx, self.rx1):
                ring.reap(ring.completed())
        elif kind == "poll":
            self.now += 0.001
            self.device.receive_from_wire(0, self.now)
            self.device.poll_transmit(self.now)
            self.device.raise_irqs()

    def state(self) -> dict[str, object]:
        snapshot = self.device.snapshot()
        snapshot.pop("fast")  # which path ran: the one thing that may differ
        return {
            "memory": bytes(self.memory),
            "registers": bytes(self.function.regs.page),
            "snapshot": snapshot,
            "wire": list(self.wire.sent),
            "rx_cons": None if self.function.rx_rings[0] is None else self.function.rx_rings[0].cons,
            "tx_cons": None if self.function.tx_rings[0] is None else self.function.tx_rings[0].cons,
            "rx1_cons": None if self.function.rx_rings[1] is None else self.function.rx_rings[1].cons,
        }

    def close(self) -> None:
        self.device.close()
        self.rx.descs.release()
        self.tx.descs.release()
        self.rx1.descs.release()
        self.view.release()
        self.memory.close()
        os.close(self.rw_fd)
        os.close(self.ro_fd)


def _good_rx(payload: bytes) -> bytes:
    return udp_frame(PEER_MAC, FN_MAC, PEER_IP, FN_IP, 5000, PORT, payload)


def _good_tx(payload: bytes) -> bytes:
    return udp_frame(FN_MAC, PEER_MAC, FN_IP, PEER_IP, PORT, 5000, payload)


payloads = st.binary(min_size=0, max_size=64)
rx_frames = st.one_of(
    payloads.map(_good_rx),
    st.tuples(st.integers(1, 65535), payloads).map(  # many flows, for RSS to spread
        lambda a: udp_frame(PEER_MAC, FN_MAC, PEER_IP, FN_IP, a[0], PORT, a[1])
    ),
    payloads.map(_good_rx),
    payloads.map(lambda p: udp_frame(PEER_MAC, FN_MAC, PEER_IP, FN_IP, 5000, OTHER_PORT, p)),  # default function
    st.just(arp_request(PEER_MAC, PEER_IP, FN_IP)),
    st.just(arp_request(PEER_MAC, PEER_IP, NIC_IP)),
    st.binary(min_size=0, max_size=40),  # runts and garbage
    st.integers(1450, 1600).map(lambda n: _good_rx(b"x" * (n - 42))),  # near and past the MTU
    payloads.map(lambda p: _good_rx(p)[:30]),  # truncated IPv4
    payloads.map(lambda p: _good_rx(p)[:16] + b"\xff\xff" + _good_rx(p)[18:]),  # total length lies
)
tx_frames = st.one_of(
    payloads.map(_good_tx),
    payloads.map(_good_tx),
    payloads.map(lambda p: udp_frame(PEER_MAC, PEER_MAC, FN_IP, PEER_IP, PORT, 5000, p)),  # spoofed MAC
    payloads.map(lambda p: udp_frame(FN_MAC, PEER_MAC, PEER_IP, FN_IP, PORT, 5000, p)),  # spoofed IP
    payloads.map(lambda p: udp_frame(FN_MAC, PEER_MAC, FN_IP, PEER_IP, OTHER_PORT, 5000, p)),  # ungranted port
    st.just(arp_request(FN_MAC, FN_IP, PEER_IP)),
    st.just(arp_request(FN_MAC, PEER_IP, FN_IP)),  # ARP from an address it does not own
    st.binary(min_size=14, max_size=60),
)
operations = st.one_of(
    st.tuples(st.just("traffic"), st.integers(1, 20), st.integers(0, 1400)),
    st.tuples(st.just("post_rx"), st.sampled_from(["buffer", "buffer", "buffer", "ro", "outside", "straddle"]),
              st.sampled_from([2048, 2048, 1514, 60, 0, 65535])),
    st.tuples(st.just("wire"), rx_frames),
    tx_frames.flatmap(
        lambda frame: st.tuples(
            st.just("post_tx"),
            st.sampled_from(["buffer", "buffer", "buffer", "ro", "outside", "straddle"]),
            st.just(frame),
            st.sampled_from([len(frame), len(frame), 0, 13, 1515, max(14, len(frame) - 1), 65535]),
        )
    ),
    st.tuples(st.just("bad_prod"), st.sampled_from(["rx", "tx"]), st.integers(0, 2**32 - 1)),
    st.just(("reenable",)),
    st.tuples(
        st.just("rss"),
        st.sampled_from([1, 1, 1, 0, 3, 0x80000001]),
        st.sampled_from([1, 2, 4, 128, 128, 0, 3, 129, 2**32 - 1]),
        st.binary(min_size=128, max_size=128).map(lambda b: bytes(x % 3 if x < 250 else x for x in b)),
        st.binary(min_size=40, max_size=40),
    ),
    st.just(("reap",)),
    st.just(("poll",)),
    st.just(("poll",)),
)


def run_both(ops: list[tuple[object, ...]]) -> tuple[World, World]:
    pure, fast = World(False), World(True)
    try:
        for step, op in enumerate(ops):
            pure.apply(op)
            fast.apply(op)
            assert pure.state() == fast.state(), f"worlds differ after step {step}: {op!r}"
    except BaseException:
        pure.close()
        fast.close()
        raise
    return pure, fast


@given(st.lists(operations, min_size=4, max_size=60))
@settings(max_examples=int(os.environ.get("DEVFAST_EXAMPLES", "150")), deadline=None)
def test_compiled_path_matches_the_python_model(ops: list[tuple[object, ...]]) -> None:
    pure, fast = run_both(ops + [("poll",)])
    pure.close()
    fast.close()


def test_fast_cases_take_the_compiled_path() -> None:
    """The differential test would pass if C did nothing: check that it does the work."""
    ops: list[tuple[object, ...]] = []
    for index in range(8):
        ops.append(("post_rx", "buffer", 2048))
        ops.append(("wire", _good_rx(bytes([index]) * 20)))
        ops.append(("post_tx", "buffer", _good_tx(bytes([index]) * 30), len(_good_tx(bytes([index]) * 30))))
    ops.append(("poll",))
    pure, fast = run_both(ops)
    try:
        assert fast.device.fast is not None
        assert fast.device.fast.rx_fast_frames == 8
        assert fast.device.fast.tx_fast_frames == 8
        counters = fast.function.counters
        assert counters.rx_packets == 8 and counters.tx_packets == 8
        assert len(fast.wire.sent) == 8
        assert fast.device.counters.delivered == 8
    finally:
        pure.close()
        fast.close()


def test_hostile_cases_fall_back_to_the_model() -> None:
    ops: list[tuple[object, ...]] = [
        ("post_rx", "outside", 2048),
        ("post_rx", "ro", 2048),
        ("wire", _good_rx(b"a")),
        ("wire", _good_rx(b"b")),
        ("post_tx", "buffer", udp_frame(PEER_MAC, PEER_MAC, FN_IP, PEER_IP, PORT, 5000, b"x"), 43),
        ("post_tx", "outside", b"", 60),
        ("poll",),
        ("bad_prod", "tx", 1000),
        ("poll",),
    ]
    pure, fast = run_both(ops)
    try:
        counters = fast.function.counters.as_dict()
        assert counters["iommu_faults"] == 3 and counters["rx_errors"] == 2
        assert counters["ring_errors"] == 1  # the impossible TX prod stopped that ring
        assert fast.device.fast is not None and fast.device.fast.rx_fast_frames == 0
        assert fast.wire.sent == pure.wire.sent
    finally:
        pure.close()
        fast.close()


def test_pure_environment_variable_selects_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARRAKIS_PURE", "1")
    device = VnicDevice(FakeWire(), NIC_MAC, [NIC_IP])
    try:
        assert device.fast is None
    finally:
        device.close()
    monkeypatch.delenv("ARRAKIS_PURE")
    device = VnicDevice(FakeWire(), NIC_MAC, [NIC_IP])
    try:
        assert isinstance(device.fast, FastPath)
    finally:
        device.close()


def test_unmap_between_bursts_leaves_no_export() -> None:
    """C holds the driver's memory only during a burst: unmapping afterwards works and
    leaves no stale mapping behind (a held export would make mmap.close fail)."""
    pure, fast = run_both([("post_rx", "buffer", 2048), ("wire", _good_rx(b"z")), ("poll",)])
    try:
        table = fast.function.dma_table
        table.unmap(RO_IOVA, PAGE)
        table.unmap(RX_RING_IOVA, RW_SIZE)
        assert table.stale_unmaps == 0
    finally:
        pure.close()
        fast.close()


def test_sanitized_build_passes_the_differential_test() -> None:
    """The same differential and hostile-input tests against the ASan/UBSan build."""
    env = dict(sanitized_vfast_env(), DEVFAST_EXAMPLES="60")
    run_sanitized_pytest(env, __file__, "-k", "not sanitized")
    assert "_vfast_asan" in module_loaded(env, "f.load_module().__name__", "import vdev.fast as f")


def test_rss_spread_takes_the_compiled_path_and_matches_the_model() -> None:
    """With RSS on, C picks the queue itself (the same one as the model) for most frames."""
    ops: list[tuple[object, ...]] = [("rss", 1, 4, bytes([0, 1, 1, 0]) + bytes(124), bytes(range(40)))]
    for index in range(12):
        ops.append(("post_rx", "buffer", 2048))
        ops.append(("wire", udp_frame(PEER_MAC, FN_MAC, PEER_IP, FN_IP, 4000 + index, PORT, b"x")))
    ops.append(("poll",))
    pure, fast = run_both(ops)
    try:
        assert fast.function.rss.enabled
        assert fast.device.fast is not None and fast.device.fast.rx_fast_frames == 12
        rx0, rx1 = fast.function.rx_rings
        assert rx0 is not None and rx1 is not None and rx0.cons > 0 and rx1.cons > 0
        assert rx0.cons + rx1.cons == 12
    finally:
        pure.close()
        fast.close()
