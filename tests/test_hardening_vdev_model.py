"""The VNIC device model against a driver that writes anything anywhere it may (issue 7).

No register value, descriptor, DMA map or unmap a driver can produce may raise out of the
calls the device host loop makes (``sync_rings``, ``poll_transmit``, ``receive_from_wire``,
``raise_irqs``, ``set_asleep``): those run outside any per-session error handling, so an
exception there would end the device host for every app.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdev import layout
from vdev.vfio_user import wire
from vdev.vfio_user.server import REQUIRED_REGION_SEALS, ServerSession
from vdev.vfio_user.wire import Header, Message, VfioError
from vdev.vnic.device import VnicDevice
from vdev.vnic.filters import Match
from vdev.vnic.function import FunctionConfig, VnicFunction

PAGE = 4096
IOVA = 0x10_0000
MEM_SIZE = 16 * PAGE
MAC = bytes.fromhex("020000000001")
IP = socket.inet_aton("10.0.0.2")


class ListBackend:
    def __init__(self) -> None:
        self.inbound: list[bytes] = []
        self.sent: list[bytes] = []

    def fds(self) -> list[int]:
        return []

    def receive(self, queue: int, budget: int) -> list[bytes]:
        frames, self.inbound = self.inbound[:budget], self.inbound[budget:]
        return frames

    def send(self, queue: int, frame: bytes) -> bool:
        self.sent.append(frame)
        return True

    def close(self) -> None:
        pass


PEER_MAC = bytes.fromhex("020000000002")
# From the function (granted MAC, IP and port 53) to a peer; and a peer's datagram to it.
_FRAME = (
    PEER_MAC + MAC + b"\x08\x00"
    + bytes.fromhex("4500001c00004000401100000a0000020a000001") + struct.pack("!HHHH", 53, 9, 8, 0)
)
_RX_FRAME = (
    MAC + PEER_MAC + b"\x08\x00"
    + bytes.fromhex("4500001c00004000401100000a0000010a000002") + struct.pack("!HHHH", 9, 53, 8, 0)
)

registers = st.tuples(
    st.integers(0, PAGE // 4 - 1),
    st.sampled_from([0, 1, 7, 8, 64, 4096, 0xFFFFFFFF, IOVA & 0xFFFFFFFF, (IOVA >> 32)]),
)
ring_setups = st.tuples(
    st.integers(0, 1),  # ring index (RX0, TX0)
    st.sampled_from([IOVA, IOVA + PAGE, IOVA + MEM_SIZE - 64, 0, 2**64 - 16]),
    st.sampled_from([8, 16, 4096, 3, 0]),
    st.integers(0, 2**32 - 1),  # prod
)
descriptors = st.lists(
    st.tuples(
        st.sampled_from([IOVA + 2 * PAGE, IOVA + MEM_SIZE - 10, 0, 2**64 - 1, IOVA]),
        st.integers(0, 0xFFFF),
    ),
    max_size=16,
)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("reg"), registers),
        st.tuples(st.just("ring"), ring_setups),
        st.tuples(st.just("descs"), descriptors),
        st.tuples(st.just("unmap"), st.none()),
        st.tuples(st.just("map"), st.none()),
        st.tuples(st.just("frames"), st.integers(0, 80)),
        st.tuples(st.just("reset"), st.none()),
    ),
    max_size=25,
)


def _setup() -> tuple[ListBackend, VnicDevice, VnicFunction, int]:
    backend = ListBackend()
    device = VnicDevice(backend, MAC, [IP])
    function = device.add_function(FunctionConfig(function_id=1, mac=MAC, ipv4=IP), [Match(ip_proto=17, ip=IP, port=53)], 0.0)
    # The driver's interrupt eventfd, full and in blocking mode: signalling must not wait.
    irq = os.eventfd(0, os.EFD_CLOEXEC)
    os.eventfd_write(irq, 0xFFFF_FFFF_FFFF_FFFE)
    function.set_irq_eventfds(layout.IRQ_INDEX_MSIX, 0, [irq])
    return backend, device, function, irq


def _turn(device: VnicDevice, now: float) -> None:
    # What the device host loop does every turn, outside any session's try.
    device.set_asleep(True)
    device.sync_rings()
    device.set_asleep(False)
    device.sync_rings()
    device.receive_from_wire(0, now)
    device.poll_transmit(now)
    device.raise_irqs()


def test_the_harness_reaches_the_data_path() -> None:
    """So that the fuzzing below is not vacuous: a well-formed script sends and signals."""
    backend, device, function, _irq = _setup()
    fd = os.memfd_create("h1-model", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, MEM_SIZE)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    try:
        function.dma_table.map(IOVA, MEM_SIZE, fd, 0, True, True)
        os.pwrite(fd, _FRAME, 2 * PAGE)
        os.pwrite(fd, layout.VNIC_DESC.pack(IOVA + 2 * PAGE, len(_FRAME), 0, 0, 0), PAGE)
        regs = function.regs
        regs.write64(layout.ring_reg(1, layout.RING_IOVA), IOVA + PAGE)
        regs.write32(layout.ring_reg(1, layout.RING_SIZE), 8)
        regs.write32(layout.ring_reg(1, layout.RING_PROD), 1)
        regs.write32(layout.ring_reg(1, layout.RING_IRQ_WANTED), 1)
        regs.write32(layout.ring_reg(1, layout.RING_ENABLE), 1)
        _turn(device, 0.001)
        assert backend.sent == [_FRAME]
        assert function.counters.irqs == 1
    finally:
        device.close()
        os.close(fd)


@settings(max_examples=150, deadline=None)
@given(steps)
def test_no_driver_input_raises_out_of_the_host_loop_calls(script: list[tuple[str, object]]) -> None:
    backend, device, function, _irq = _setup()
    fd = os.memfd_create("h1-model", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, MEM_SIZE)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    memory = mmap.mmap(fd, MEM_SIZE)
    regs = function.regs
    mapped = False
    now = 0.0
    try:
        function.dma_table.map(IOVA, MEM_SIZE, fd, 0, True, True)
        mapped = True
        for kind, value in script:
            if kind == "reg":
                index, word = value  # type: ignore[misc]
                regs.u32[index] = word
            elif kind == "ring":
                ring_index, iova, size, prod = value  # type: ignore[misc]
                regs.write64(layout.ring_reg(ring_index, layout.RING_IOVA), iova)
                regs.write32(layout.ring_reg(ring_index, layout.RING_SIZE), size)
                regs.write32(layout.ring_reg(ring_index, layout.RING_PROD), prod)
                regs.write32(layout.ring_reg(ring_index, layout.RING_ENABLE), 1)
                regs.write32(layout.ring_reg(ring_index, layout.RING_IRQ_WANTED), 1)
            elif kind == "descs":
                for slot, (iova, length) in enumerate(value):  # type: ignore[arg-type]
                    layout.VNIC_DESC.pack_into(memory, slot * 16, iova, length, 0, 0, 0)
                    layout.VNIC_DESC.pack_into(memory, PAGE + slot * 16, iova, length, 0, 0, 0)
                memory[2 * PAGE : 2 * PAGE + len(_FRAME)] = _FRAME
            elif kind == "unmap" and mapped:
                function.dma_table.unmap(IOVA, MEM_SIZE)
                mapped = False
            elif kind == "map" and not mapped:
                function.dma_table.map(IOVA, MEM_SIZE, fd, 0, True, True)
                mapped = True
            elif kind == "frames":
                backend.inbound = [_RX_FRAME[: int(value)]] * 3 + [_RX_FRAME]  # type: ignore[call-overload]
            elif kind == "reset":
                function.reset()
            now += 0.001
            _turn(device, now)
    except VfioError:
        raise AssertionError("the script only maps what it unmapped") from None
    finally:
        device.close()
        memory.close()
        os.close(fd)


def _request(command: int, payload: bytes, msg_id: int = 0) -> Message:
    return Message(Header(msg_id, command, wire.HEADER_SIZE + len(payload), wire.TYPE_COMMAND, 0), payload)


def test_server_hands_out_only_sealed_region_memory() -> None:
    """Defect 1's class: whatever the device model, the server sends no region fd whose size
    the client could change (or whose seals it could add to)."""
    backend = ListBackend()
    device = VnicDevice(backend, MAC, [IP])
    function = device.add_function(FunctionConfig(function_id=1, mac=MAC, ipv4=IP), [], 0.0)
    session = ServerSession(function)
    session.handle(_request(wire.CMD_VERSION, wire.encode_version(wire.SUPPORTED_MAJOR, 0, {})))
    info_request = _request(wire.CMD_DEVICE_GET_REGION_INFO, wire.encode_region_info_request(layout.BAR0_INDEX, 256), 1)
    _reply, fd = session.handle(info_request)
    assert fd is not None
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    assert seals & REQUIRED_REGION_SEALS == REQUIRED_REGION_SEALS
    for size in (0, 2 * layout.BAR0_SIZE):
        with pytest.raises(PermissionError):
            os.ftruncate(fd, size)
    # A model that forgot to seal: refused, not handed out.
    unsealed = os.memfd_create("h1-unsealed-bar", os.MFD_CLOEXEC)
    os.ftruncate(unsealed, layout.BAR0_SIZE)
    original = function._bar_fd
    function._bar_fd = unsealed
    try:
        fresh = ServerSession(function)
        fresh.handle(_request(wire.CMD_VERSION, wire.encode_version(wire.SUPPORTED_MAJOR, 0, {})))
        with pytest.raises(VfioError) as caught:
            fresh.handle(info_request)
        assert caught.value.errno == errno.EIO
    finally:
        function._bar_fd = original
        os.close(unsealed)
        device.close()
