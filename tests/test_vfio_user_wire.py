"""vfio-user codec: layouts, VERSION JSON, region-info capabilities and stream framing."""

from __future__ import annotations

import errno
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdev.vfio_user import wire
from vdev.vfio_user.wire import MessageReader, ProtocolError, RegionInfo, VfioError

LIMIT = 4096


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def new_fds(count: int) -> list[int]:
    return [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(count)]


def test_header_layout_matches_the_spec() -> None:
    data = wire.encode_message(0x1234, wire.CMD_DMA_MAP, b"abcd", wire.FLAG_NO_REPLY, 0)
    assert data[:16] == bytes.fromhex("3412 0200 14000000 10000000 00000000".replace(" ", ""))
    assert data[16:] == b"abcd"
    reply = wire.encode_error_reply(wire.Header(7, 9, 16, 0, 0), errno.EINVAL)
    assert wire.HEADER.unpack(reply) == (7, 9, 16, wire.TYPE_REPLY | wire.FLAG_ERROR, errno.EINVAL)


def test_layout_sizes() -> None:
    assert (wire.DMA_MAP.size, wire.DMA_UNMAP.size, wire.DEVICE_INFO.size) == (32, 24, 16)
    assert (wire.REGION_INFO.size, wire.IRQ_INFO.size, wire.SET_IRQS.size, wire.REGION_ACCESS.size) == (32, 16, 20, 16)


def test_version_round_trip() -> None:
    payload = wire.encode_version(0, 2, {"capabilities": {"max_msg_fds": 8, "unknown": [1]}, "other": 1})
    assert payload[:4] == b"\x00\x00\x02\x00" and payload.endswith(b"\x00")
    version = wire.decode_version(payload)
    assert (version.major, version.minor, version.capabilities.max_msg_fds) == (0, 2, 8)
    assert version.capabilities.max_data_xfer_size == wire.DEFAULT_MAX_DATA_XFER_SIZE
    assert wire.decode_version(b"\x00\x00\x00\x00").capabilities == wire.Capabilities()


@pytest.mark.parametrize(
    "text",
    [
        b'{"capabilities":{}}',  # no NUL
        b"{nope\x00",
        b"\xff\xfe\x00",  # not UTF-8
        b"[1,2]\x00",
        b'{"capabilities":[]}\x00',
        b'{"capabilities":{"max_msg_fds":"8"}}\x00',
        b'{"capabilities":{"max_msg_fds":true}}\x00',
        b'{"capabilities":{"max_msg_fds":1.5}}\x00',
        b'{"capabilities":{"max_msg_fds":0}}\x00',
        b'{"capabilities":{"max_msg_fds":1025}}\x00',
        b'{"capabilities":{"max_data_xfer_size":-1}}\x00',
        b'{"capabilities":{"pgsizes":18446744073709551616}}\x00',
        b"[" * 100_000 + b"\x00",  # nesting deep enough to hit the recursion limit
        b"\x00",
    ],
)
def test_version_refuses_bad_json(text: bytes) -> None:
    with pytest.raises(VfioError) as caught:
        wire.decode_version(b"\x00\x00\x02\x00" + text)
    assert caught.value.errno == errno.EINVAL


def test_short_payloads_are_refused() -> None:
    for decoder in (
        wire.decode_version,
        wire.decode_dma_map,
        wire.decode_dma_unmap,
        wire.decode_device_info_request,
        wire.decode_region_info_request,
        wire.decode_irq_info_request,
        wire.decode_set_irqs,
        wire.decode_region_info_reply,
        wire.decode_irq_info_reply,
        wire.decode_device_info_reply,
    ):
        with pytest.raises(VfioError):
            decoder(b"\x00")


def test_argsz_rules() -> None:
    with pytest.raises(VfioError):
        wire.decode_dma_map(wire.DMA_MAP.pack(31, 3, 0, 0, 4096))
    with pytest.raises(VfioError):
        wire.decode_dma_map(wire.encode_dma_map(3, 0, 0, 4096) + b"\x00")
    with pytest.raises(VfioError):
        wire.decode_set_irqs(wire.SET_IRQS.pack(24, 0x24, 2, 0, 1))
    with pytest.raises(VfioError):
        wire.decode_region_info_request(wire.encode_region_info_request(0, 31))
    assert wire.decode_set_irqs(wire.encode_set_irqs(0x22, 2, 0, 2, b"\x01\x00")).data == b"\x01\x00"


def test_region_access_data_must_match_count() -> None:
    good = wire.encode_region_access(8, 0, 3, b"abc")
    assert wire.decode_region_access(good, with_data=True).data == b"abc"
    for bad in (good[:-1], good + b"x"):
        with pytest.raises(VfioError):
            wire.decode_region_access(bad, with_data=True)


def test_region_info_with_sparse_capability() -> None:
    info = RegionInfo(wire.REGION_FLAG_READ | wire.REGION_FLAG_WRITE | wire.REGION_FLAG_MMAP, 8192, 5, 0, [(0, 4096)])
    short, send_fd = wire.encode_region_info_reply(32, 0, info)
    assert not send_fd and len(short) == 32
    argsz, index, decoded = wire.decode_region_info_reply(short)
    assert argsz == 32 + 16 + 16 and decoded.sparse_areas == ()
    full, send_fd = wire.encode_region_info_reply(argsz, 0, info)
    assert send_fd and len(full) == argsz
    _, index, decoded = wire.decode_region_info_reply(full)
    assert (index, decoded.size, decoded.fd, tuple(decoded.sparse_areas)) == (0, 8192, None, ((0, 4096),))
    assert decoded.flags & wire.REGION_FLAG_CAPS
    plain, send_fd = wire.encode_region_info_reply(256, 1, RegionInfo(wire.REGION_FLAG_READ, 4096))
    assert not send_fd and len(plain) == 32


def _region_reply(cap_offset: int, caps: bytes, size: int = 8192) -> bytes:
    flags = wire.REGION_FLAG_MMAP | wire.REGION_FLAG_CAPS
    return wire.REGION_INFO.pack(32 + len(caps), flags, 0, cap_offset, size, 0) + caps


@pytest.mark.parametrize(
    "reply",
    [
        _region_reply(8, wire.CAP_HEADER.pack(1, 1, 0) + wire.SPARSE_MMAP_COUNT.pack(0, 0)),  # inside fixed part
        _region_reply(44, wire.CAP_HEADER.pack(1, 1, 0) + wire.SPARSE_MMAP_COUNT.pack(0, 0)),  # past the end
        _region_reply(32, wire.CAP_HEADER.pack(1, 1, 0) + wire.SPARSE_MMAP_COUNT.pack(5, 0)),  # areas overrun
        _region_reply(32, wire.CAP_HEADER.pack(1, 1, 0)),  # sparse header truncated
        _region_reply(32, wire.CAP_HEADER.pack(2, 1, 32) + bytes(8)),  # loops to itself
        _region_reply(
            32, wire.CAP_HEADER.pack(1, 1, 0) + wire.SPARSE_MMAP_COUNT.pack(1, 0) + wire.SPARSE_AREA.pack(4096, 8192)
        ),  # area beyond the region
    ],
    ids=["inside-fixed", "past-end", "areas-overrun", "truncated", "loop", "area-beyond"],
)
def test_region_info_reply_bad_capabilities(reply: bytes) -> None:
    with pytest.raises(VfioError):
        wire.decode_region_info_reply(reply)


def test_reader_reassembles_byte_by_byte() -> None:
    stream = b"".join(wire.encode_message(n, wire.CMD_DEVICE_GET_INFO, bytes(n)) for n in range(5))
    reader = MessageReader(LIMIT)
    got: list[wire.Message] = []
    for byte in stream:
        reader.feed(bytes([byte]))
        got.extend(reader)
    assert [(m.header.msg_id, m.payload) for m in got] == [(n, bytes(n)) for n in range(5)]
    assert reader.buffered == 0


def test_reader_gives_fds_to_the_last_header_in_the_chunk() -> None:
    # Linux stops a recvmsg right after the write that carried fds, so they belong to the
    # last message that starts in the chunk, not the first.
    first = wire.encode_message(1, wire.CMD_REGION_WRITE, b"x" * 40)
    second = wire.encode_message(2, wire.CMD_DEVICE_SET_IRQS, b"y" * 20)
    fds = new_fds(2)
    reader = MessageReader(LIMIT)
    reader.feed(first[:10])
    reader.feed(first[10:] + second[:5], fds)
    assert reader.pending_fds == 2
    reader.feed(second[5:])
    messages = list(reader)
    assert [m.fds for m in messages] == [(), tuple(fds)]
    wire.close_fds(fds)


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (wire.HEADER.pack(1, 4, 15, 0, 0), "below"),
        (wire.HEADER.pack(1, 4, LIMIT + 1, 0, 0), "over the limit"),
        (wire.HEADER.pack(1, 4, 16, wire.TYPE_REPLY, 0), "type"),
    ],
)
def test_reader_framing_errors(header: bytes, fragment: str) -> None:
    reader = MessageReader(LIMIT)
    fds = new_fds(1)
    with pytest.raises(ProtocolError, match=fragment) as caught:
        reader.feed(header, fds)
    assert caught.value.header is not None and caught.value.header.msg_id == 1
    assert not fd_is_open(fds[0])  # the rejecting reader closed it
    with pytest.raises(ProtocolError):
        reader.feed(b"")


def test_reader_refuses_fds_without_a_header_and_closes_them() -> None:
    message = wire.encode_message(1, wire.CMD_REGION_WRITE, b"z" * 100)
    reader = MessageReader(LIMIT)
    reader.feed(message[:50])
    fds = new_fds(3)
    with pytest.raises(ProtocolError, match="without a message header"):
        reader.feed(message[50:], fds)
    assert not any(fd_is_open(fd) for fd in fds)


def test_reader_close_releases_pending_fds() -> None:
    message = wire.encode_message(1, wire.CMD_DMA_MAP, bytes(32))
    reader = MessageReader(LIMIT)
    fds = new_fds(1)
    reader.feed(message[:20], fds)
    reader.close()
    assert not fd_is_open(fds[0])


def test_reply_reader_refuses_commands() -> None:
    reader = MessageReader(LIMIT, expected_type=wire.TYPE_REPLY)
    with pytest.raises(ProtocolError):
        reader.feed(wire.encode_message(1, 1))
    reader = MessageReader(LIMIT, expected_type=wire.TYPE_REPLY)
    reader.feed(wire.encode_message(1, 1, b"", wire.TYPE_REPLY | wire.FLAG_ERROR, 22))
    message = reader.next_message()
    assert message is not None and message.header.is_error and message.header.error_no == 22


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=8), st.lists(st.booleans(), max_size=8))
def test_reader_random_bytes_raise_only_protocol_error(chunks: list[bytes], with_fd: list[bool]) -> None:
    reader = MessageReader(256)
    handed: list[int] = []
    fed: list[int] = []
    try:
        for number, chunk in enumerate(chunks):
            fds = new_fds(1) if number < len(with_fd) and with_fd[number] and chunk else []
            fed += fds
            reader.feed(chunk, fds)
            for message in reader:
                assert 16 <= message.header.msg_size <= 256
                handed += message.fds
    except ProtocolError:
        pass
    finally:
        reader.close()
    # Every fd was either handed out with a message or closed by the reader.
    assert [fd for fd in fed if fd_is_open(fd)] == handed
    wire.close_fds(handed)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_decoders_random_bytes_raise_only_vfio_error(payload: bytes) -> None:
    for decoder in (
        wire.decode_version,
        wire.decode_dma_map,
        wire.decode_dma_unmap,
        wire.decode_device_info_request,
        wire.decode_region_info_request,
        wire.decode_region_info_reply,
        wire.decode_irq_info_request,
        wire.decode_irq_info_reply,
        wire.decode_set_irqs,
    ):
        try:
            decoder(payload)
        except VfioError:
            pass
    for with_data in (True, False):
        try:
            wire.decode_region_access(payload, with_data)
        except VfioError:
            pass


@given(st.dictionaries(st.text(max_size=20), st.integers() | st.text() | st.booleans() | st.none(), max_size=5))
def test_version_random_capabilities(caps: dict[str, object]) -> None:
    payload = wire.encode_version(0, 0, {"capabilities": caps})
    try:
        version = wire.decode_version(payload)
    except VfioError:
        return
    assert 1 <= version.capabilities.max_msg_fds <= wire.MAX_MSG_FDS_LIMIT
    assert json.loads(payload[4:-1])["capabilities"] == caps
