"""Receive-side scaling in the VNIC model (vdev/vnic/rss.py) and in the compiled path.

In process, no root: a device on a fake wire, one function with four queue pairs, and a
driver's rings in a memfd. The hash is checked against the specification's published
verification vectors, the spread over queues with a chi-squared test, flows for order, and
the driver's register block with hostile settings.
"""

from __future__ import annotations

import mmap
import os
import random
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_devfast_diff import FN_IP, FN_MAC, NIC_IP, NIC_MAC, PEER_MAC, PORT, FakeWire, _memfd, arp_request, udp_frame
from vdev import layout
from vdev.fast import load_module
from vdev.fast.mirror import FastPath
from vdev.ring import DriverRing
from vdev.vnic.device import RX_BUDGET, TX_BUDGET, VnicDevice
from vdev.vnic.filters import Match
from vdev.vnic.function import FunctionConfig
from vdev.vnic.rss import RssSteering, ToeplitzHasher, flow_tuple, toeplitz_hash

# Microsoft, "Verifying the RSS Hash Calculation": the key and the IPv4 examples
# (destination, source, then the hash over the addresses only and over addresses and ports).
MS_KEY = bytes.fromhex("6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa")
MS_VECTORS = [
    ("161.142.100.80", 1766, "66.9.149.187", 2794, 0x323E8FC2, 0x51CCC178),
    ("65.69.140.83", 4739, "199.92.111.2", 14230, 0xD718262A, 0xC626B0EA),
    ("12.22.207.184", 38024, "24.19.198.95", 12898, 0xD2D0A5DE, 0x5C2B394A),
    ("209.142.163.6", 2217, "38.27.205.30", 48228, 0x82989176, 0xAFC7327F),
    ("202.188.127.2", 1303, "153.39.163.191", 44251, 0x5D1809C5, 0x10E828A2),
]
QUEUES = 4
RING_SIZE = 256
RING_BYTES = RING_SIZE * layout.VNIC_DESC_SIZE
RINGS_IOVA = 0x100000
BUFFERS_IOVA = RINGS_IOVA + QUEUES * 0x2000
MEMORY_SIZE = QUEUES * 0x2000 + QUEUES * RING_SIZE * layout.VNIC_BUFFER_SIZE


@pytest.mark.parametrize(("dst", "dport", "src", "sport", "ip_hash", "tcp_hash"), MS_VECTORS)
def test_toeplitz_matches_the_specification_vectors(dst: str, dport: int, src: str, sport: int, ip_hash: int, tcp_hash: int) -> None:
    addresses = socket.inet_aton(src) + socket.inet_aton(dst)
    four_tuple = addresses + struct.pack("!HH", sport, dport)
    assert toeplitz_hash(MS_KEY, addresses) == ip_hash
    assert toeplitz_hash(MS_KEY, four_tuple) == tcp_hash
    assert ToeplitzHasher(MS_KEY).hash(four_tuple) == tcp_hash
    assert load_module().lib.vf_toeplitz(MS_KEY, four_tuple) == tcp_hash


@given(st.binary(min_size=40, max_size=40), st.binary(min_size=12, max_size=12))
@settings(max_examples=200, deadline=None)
def test_the_table_hash_and_the_c_hash_agree_with_the_reference(key: bytes, data: bytes) -> None:
    expected = toeplitz_hash(key, data)
    assert ToeplitzHasher(key).hash(data) == expected
    assert load_module().lib.vf_toeplitz(key, data) == expected


def tcp_frame(src: bytes, sport: int, dport: int, payload: bytes = b"", dst: bytes = FN_IP) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x18, 65535, 0, 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0, src, dst)
    return FN_MAC + PEER_MAC + b"\x08\x00" + header + tcp


class MultiQueueWorld:
    """A device with one function of QUEUES queue pairs and RX rings full of buffers."""

    def __init__(self, fast: bool) -> None:
        self.wire = FakeWire()
        self.device = VnicDevice(self.wire, NIC_MAC, [NIC_IP])
        self.device.fast = FastPath(RX_BUDGET, TX_BUDGET) if fast else None
        self.now = 1.0
        config = FunctionConfig(function_id=1, mac=FN_MAC, ipv4=FN_IP, num_queues=QUEUES)
        matches = [Match(ip_proto=17, ip=FN_IP, port=PORT), Match(ip_proto=6, ip=FN_IP, port=PORT)]
        self.function = self.device.add_function(config, matches, self.now)
        self.fd = _memfd(MEMORY_SIZE)
        self.memory = mmap.mmap(self.fd, MEMORY_SIZE)
        self.view = memoryview(self.memory)
        self.function.dma_table.map(RINGS_IOVA, MEMORY_SIZE, self.fd, 0, readable=True, writable=True)
        regs = self.function.regs
        self.rx: list[DriverRing] = []
        for queue in range(QUEUES):
            offset = queue * 0x2000
            ring = DriverRing(regs, layout.vnic_ring_index(queue, layout.RX), self.view[offset : offset + RING_BYTES], RING_SIZE, layout.VNIC_DESC)
            ring.enable(RINGS_IOVA + offset)
            self.rx.append(ring)
            self._post(queue, RING_SIZE)
        self.function.sync_rings()
        self.received: list[list[bytes]] = [[] for _ in range(QUEUES)]

    def _buffer(self, queue: int, slot: int) -> int:
        return QUEUES * 0x2000 + (queue * RING_SIZE + slot) * layout.VNIC_BUFFER_SIZE

    def _post(self, queue: int, count: int) -> None:
        ring = self.rx[queue]
        for _ in range(count):
            slot = ring.prod & ring.mask
            ring.post(RINGS_IOVA + self._buffer(queue, slot), layout.VNIC_BUFFER_SIZE, 0, 0, 0)
        ring.publish()

    def set_rss(self, key: bytes, table: list[int], control: int = layout.RSS_ENABLE, size: int | None = None) -> int:
        regs = self.function.regs
        page = regs.page
        page[layout.REG_RSS_KEY : layout.REG_RSS_KEY + len(key)] = key
        page[layout.REG_RSS_TABLE : layout.REG_RSS_TABLE + len(table)] = bytes(table)
        regs.write32(layout.REG_RSS_TABLE_SIZE, len(table) if size is None else size)
        regs.write32(layout.REG_RSS_CONTROL, control)
        self.function.sync_rings()
        return regs.read32(layout.REG_RSS_STATE)

    def feed(self, frames: list[bytes]) -> None:
        """Put frames through the device (the compiled path if on), reaping as a driver does."""
        for start in range(0, len(frames), 128):
            burst = frames[start : start + 128]
            self.now += 0.001
            if self.device.fast is not None:
                self.wire.pending.extend(burst)
                while self.wire.pending:
                    self.device.receive_from_wire(0, self.now)
            else:
                self.device.receive_from_wire(0, self.now, burst)
            self.reap()

    def reap(self) -> None:
        for queue, ring in enumerate(self.rx):
            done = ring.completed()
            for offset in range(done):
                _iova, length, _flags, status, _reserved = ring.peek(ring.reaped + offset)
                assert status == layout.DESC_OK
                slot = (ring.reaped + offset) & ring.mask
                start = self._buffer(queue, slot)
                self.received[queue].append(bytes(self.memory[start : start + length]))
            ring.reap(done)
            self._post(queue, done)

    def close(self) -> None:
        self.device.close()
        for ring in self.rx:
            ring.descs.release()
        self.view.release()
        self.memory.close()
        os.close(self.fd)


@pytest.fixture(params=["pure", "compiled"])
def world(request: pytest.FixtureRequest) -> MultiQueueWorld:
    made = MultiQueueWorld(request.param == "compiled")
    request.addfinalizer(made.close)
    return made


def random_flows(count: int, seed: int) -> list[tuple[bytes, int]]:
    rng = random.Random(seed)
    flows = set()
    while len(flows) < count:
        flows.add((bytes([10, rng.randrange(256), rng.randrange(256), rng.randrange(1, 255)]), rng.randrange(1024, 65536)))
    return sorted(flows)


def test_rss_spreads_flows_evenly_over_the_queues(world: MultiQueueWorld) -> None:
    """10,000 flows, one frame each: the per-queue counts pass a chi-squared test of
    uniformity (3 degrees of freedom; 16.27 is the 0.1% critical value)."""
    assert world.set_rss(MS_KEY, [index % QUEUES for index in range(layout.RSS_TABLE_MAX)]) == layout.RSS_STATE_ON
    flows = random_flows(10_000, seed=1)
    frames = [udp_frame(PEER_MAC, FN_MAC, src, FN_IP, sport, PORT, b"x") for src, sport in flows]
    world.feed(frames)
    counts = [len(frames) for frames in world.received]
    assert sum(counts) == len(flows)
    expected = len(flows) / QUEUES
    chi_squared = sum((count - expected) ** 2 / expected for count in counts)
    assert chi_squared < 16.27, counts
    # Each frame went where the hash says.
    hasher = ToeplitzHasher(MS_KEY)
    for queue, received in enumerate(world.received):
        for frame in received[:50]:
            data = flow_tuple(frame)
            assert data is not None and hasher.hash(data) % QUEUES == queue
    if world.device.fast is not None:
        assert world.device.fast.rx_fast_frames == len(flows)  # C chose the queues itself


def test_one_flows_frames_stay_on_one_queue_in_order(world: MultiQueueWorld) -> None:
    world.set_rss(os.urandom(40), [index % QUEUES for index in range(16)])
    flows = random_flows(40, seed=2)
    frames = []
    for sequence in range(60):
        for src, sport in flows:
            frames.append(tcp_frame(src, sport, PORT, struct.pack("!I", sequence)))
    world.feed(frames)
    queues_of_flow: dict[tuple[bytes, int], set[int]] = {}
    sequences: dict[tuple[bytes, int], list[int]] = {}
    for queue, received in enumerate(world.received):
        for frame in received:
            flow = (frame[26:30], struct.unpack("!H", frame[34:36])[0])
            queues_of_flow.setdefault(flow, set()).add(queue)
            sequences.setdefault(flow, []).append(struct.unpack("!I", frame[-4:])[0])
    assert len(queues_of_flow) == len(flows)
    assert all(len(queues) == 1 for queues in queues_of_flow.values())
    assert all(seq == list(range(60)) for seq in sequences.values())
    assert len(set().union(*queues_of_flow.values())) > 1  # 40 flows do not all hash alike


def test_arp_other_protocols_and_fragments_keep_the_filters_queue(world: MultiQueueWorld) -> None:
    world.set_rss(MS_KEY, [3] * 8)  # every spread flow to queue 3
    peer = bytes([10, 9, 0, 9])
    fragment = bytearray(udp_frame(PEER_MAC, FN_MAC, peer, FN_IP, 5000, PORT, b"frag"))
    fragment[20:22] = b"\x20\x00"  # more fragments
    frames = [
        arp_request(PEER_MAC, peer, FN_IP),
        bytes(fragment),
        udp_frame(PEER_MAC, FN_MAC, peer, FN_IP, 5000, PORT, b"spread"),
    ]
    world.feed(frames)
    assert [f[12:14] for f in world.received[0]] == [b"\x08\x06", b"\x08\x00"]  # ARP, the fragment
    assert world.received[3] == [frames[2]]


@pytest.mark.parametrize(
    ("table", "size", "control"),
    [
        ([0, 1, 2, QUEUES], None, layout.RSS_ENABLE),  # an entry names no queue
        ([0, 1, 255, 0], None, layout.RSS_ENABLE),
        ([0, 1, 2], None, layout.RSS_ENABLE),  # not a power of two
        ([0], 0, layout.RSS_ENABLE),
        ([0] * 128, 256, layout.RSS_ENABLE),  # past the table
        ([0] * 128, 2**32 - 1, layout.RSS_ENABLE),
        ([0, 1], None, layout.RSS_ENABLE | 0x100),  # an unknown control bit
    ],
)
def test_a_bad_rss_setting_is_refused_whole(world: MultiQueueWorld, table: list[int], size: int | None, control: int) -> None:
    assert world.set_rss(MS_KEY, [1, 2]) == layout.RSS_STATE_ON
    assert world.set_rss(MS_KEY, table, control, size) == layout.RSS_STATE_REFUSED
    assert world.function.regs.read32(layout.REG_RSS_REFUSALS) == 1
    assert not world.function.rss.enabled
    flows = random_flows(50, seed=3)
    world.feed([udp_frame(PEER_MAC, FN_MAC, src, FN_IP, sport, PORT, b"") for src, sport in flows])
    assert len(world.received[0]) == 50  # all on the filter's queue, as with RSS off
    # A good setting afterwards is taken.
    assert world.set_rss(MS_KEY, [0, 1, 2, 3]) == layout.RSS_STATE_ON


def test_a_refused_setting_is_judged_once(world: MultiQueueWorld) -> None:
    """The device's own state and refusal counter sit inside the RSS block; writing them must
    not make the next look see a "new" setting and judge (and count) it again."""
    assert world.set_rss(MS_KEY, [0, 1, 2, QUEUES]) == layout.RSS_STATE_REFUSED
    for _ in range(5):
        world.function.sync_rings()
    assert world.function.regs.read32(layout.REG_RSS_REFUSALS) == 1
    assert world.function.rss.refusals == 1


def test_rss_off_and_reset_restore_the_filters_queue(world: MultiQueueWorld) -> None:
    world.set_rss(MS_KEY, [2])
    assert world.set_rss(MS_KEY, [2], control=0) == layout.RSS_STATE_OFF
    world.set_rss(MS_KEY, [2])
    world.function.reset()  # registers zeroed: RSS off at the next look
    world.function.sync_rings()
    assert world.function.regs.read32(layout.REG_RSS_STATE) == layout.RSS_STATE_OFF
    assert not world.function.rss.enabled


@given(st.binary(min_size=layout.RSS_BLOCK_END - layout.REG_RSS_CONTROL, max_size=layout.RSS_BLOCK_END - layout.REG_RSS_CONTROL), st.binary(max_size=80))
@settings(max_examples=300, deadline=None)
def test_any_register_block_is_safe(block: bytes, frame: bytes) -> None:
    """Whatever the driver writes, the device neither fails nor names a queue it lacks."""
    page = bytearray(layout.PAGE_SIZE)
    page[layout.REG_RSS_CONTROL : layout.RSS_BLOCK_END] = block
    from vdev.ring import Registers

    regs = Registers(page)
    steering = RssSteering(QUEUES)
    steering.sync(regs)
    for candidate in (frame, udp_frame(PEER_MAC, FN_MAC, frame[:4].ljust(4, b"\0"), FN_IP, 5000, PORT, frame)):
        assert 0 <= steering.queue_for(candidate, 0) < QUEUES
    assert regs.read32(layout.REG_RSS_STATE) in (layout.RSS_STATE_OFF, layout.RSS_STATE_ON, layout.RSS_STATE_REFUSED)
    regs.release()


def test_each_tx_queue_sends_its_frames_once(world: MultiQueueWorld) -> None:
    """Workers transmit on their own TX rings. A compiled TX burst of one queue must leave
    the other queues' rings alone (it once copied a stale cons back into them, and the
    device sent old frames again)."""
    regs = world.function.regs
    tx_rings = []
    for queue in range(2):
        offset = queue * 0x2000 + 0x1000
        ring = DriverRing(regs, layout.vnic_ring_index(queue, layout.TX), world.view[offset : offset + RING_BYTES], RING_SIZE, layout.VNIC_DESC)
        ring.enable(RINGS_IOVA + offset)
        tx_rings.append(ring)
    world.function.sync_rings()
    peer = bytes([10, 9, 0, 9])
    sent = []
    try:
        for round_index in range(6):
            for queue, ring in enumerate(tx_rings):
                frame = udp_frame(FN_MAC, PEER_MAC, FN_IP, peer, PORT, 5000, bytes([queue, round_index]))
                if queue == 0 and round_index % 2:
                    frame = arp_request(FN_MAC, FN_IP, peer)  # the model sends it, not C
                slot = ring.prod & ring.mask
                start = world._buffer(2 + queue, slot)  # the RX buffers of queues 2 and 3: unused here
                world.memory[start : start + len(frame)] = frame
                ring.post(RINGS_IOVA + start, len(frame), 0, 0, 0)
                ring.publish()
                sent.append(frame)
                world.now += 0.001
                world.device.poll_transmit(world.now)
                ring.reap(ring.completed())
        assert world.wire.sent == sent
    finally:
        for ring in tx_rings:
            ring.descs.release()


@pytest.mark.parametrize("queues", [0, -1, 65, 2**32])
def test_the_control_protocol_refuses_an_impossible_queue_count(queues: int) -> None:
    from vdev import control

    with pytest.raises(control.ProtocolError):
        control.OpenVnic(filters=(control.Filter("udp", 5000),), queues=queues)


def test_the_device_refuses_more_queues_than_the_register_page_holds() -> None:
    device = VnicDevice(FakeWire(), NIC_MAC, [NIC_IP])
    try:
        with pytest.raises(ValueError):
            device.add_function(FunctionConfig(function_id=1, mac=FN_MAC, ipv4=FN_IP, num_queues=layout.MAX_RINGS // 2 + 1), [], 1.0)
        assert device.functions == {}
        device.add_function(FunctionConfig(function_id=1, mac=FN_MAC, ipv4=FN_IP, num_queues=layout.MAX_RINGS // 2), [], 1.0)
    finally:
        device.close()


def test_a_doorbell_makes_the_device_take_a_new_rss_setting(world: MultiQueueWorld) -> None:
    """Even while the device host is busy (it looks at ring enables only when it wakes)."""
    regs = world.function.regs
    world.function.regs.page[layout.REG_RSS_KEY : layout.REG_RSS_KEY + 40] = MS_KEY
    regs.write32(layout.REG_RSS_TABLE_SIZE, 2)
    regs.page[layout.REG_RSS_TABLE : layout.REG_RSS_TABLE + 2] = bytes([1, 2])
    regs.write32(layout.REG_RSS_CONTROL, layout.RSS_ENABLE)
    assert not world.function.rss.enabled
    world.function.region_write(layout.BAR0_INDEX, layout.doorbell_offset(1), b"\0\0\0\0")
    assert world.function.rss.enabled and regs.read32(layout.REG_RSS_STATE) == layout.RSS_STATE_ON
