"""Unit tests of the control protocol (vdev.control): records, checks, framing, channels."""

from __future__ import annotations

import json
import os
import socket
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdev import control

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=20,
)


def pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


# ---- depth and JSON ------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2, 31, 32])
def test_nesting_up_to_the_bound_is_accepted(depth: int) -> None:
    text = b"[" * (depth - 1) + b"{}" + b"]" * (depth - 1)
    control.check_depth(text)
    nested = b'{"a":' + b"[" * (depth - 1) + b"0" + b"]" * (depth - 1) + b"}"
    assert "a" in control.decode_json(nested)


@pytest.mark.parametrize("text", [b"[" * 33 + b"]" * 33, b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}", b"[" * 10**6])
def test_deep_or_unbalanced_nesting_is_refused_without_recursion(text: bytes) -> None:
    with pytest.raises(control.ProtocolError):
        control.check_depth(text)


def test_brackets_inside_strings_do_not_count() -> None:
    text = json.dumps({"s": "[" * 1000 + '\\"' + "{" * 1000}).encode()
    control.check_depth(text)
    assert control.decode_json(text)["s"].startswith("[[")


@pytest.mark.parametrize("text", [b"NaN", b'{"x": NaN}', b'{"x": Infinity}', b"[]", b'"s"', b"{", b"\xff"])
def test_not_a_strict_json_object_is_refused(text: bytes) -> None:
    with pytest.raises(control.ProtocolError):
        control.decode_json(text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decoding_any_bytes_raises_only_protocol_errors(data: bytes) -> None:
    for protocol in (control.CONTROL, control.VNIC_MGMT, control.VSIC_MGMT):
        try:
            protocol.decode(data)
        except control.RequestRefused:
            pass
    try:
        control.decode_reply(data)
    except control.ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(control.CONTROL.records)), st.dictionaries(st.text(max_size=12), JSON, max_size=6))
def test_any_fields_give_a_record_or_a_refusal_with_the_id(op: str, fields: dict[str, Any]) -> None:
    payload = json.dumps({**fields, "id": 7, "op": op}).encode()
    try:
        request = control.CONTROL.decode(payload)
    except control.RequestRefused as exc:
        assert exc.request_id == 7
        assert str(exc).startswith(op)
    else:
        assert request.id == 7 and request.body.OP == op
        # A record that decoded encodes to what decodes to itself.
        assert control.CONTROL.decode(control.request_json(7, request.body)) == request


# ---- records --------------------------------------------------------------------------------


def test_records_check_types_and_ranges_when_built_in_python_too() -> None:
    assert control.OpenVnic(filters=[control.Filter("udp", 5000)]).filters == (control.Filter("udp", 5000),)  # type: ignore[arg-type]
    with pytest.raises(control.ProtocolError, match="port must be an integer in"):
        control.Filter("udp", 0)
    with pytest.raises(control.ProtocolError, match="must be true or false"):
        control.OpenVsa(name="a", write=1)  # type: ignore[arg-type]
    with pytest.raises(control.ProtocolError, match="filters must be a list of 1..64"):
        control.OpenVnic(filters=())
    with pytest.raises(control.ProtocolError, match="name must be a string of 0..64"):
        control.OpenVnic(filters=(control.Filter("tcp", 1),), name="n" * 65)
    with pytest.raises(control.ProtocolError, match="rx_bps"):
        control.SetRate(function_id=1, rx_bps=True)
    with pytest.raises(control.ProtocolError, match=r"extents\[0\]\[1\]"):
        control.VsicCreateFunction.from_fields({"function_id": 1, "extents": [[1, -1]]})


def test_every_protocol_table_has_one_record_per_op() -> None:
    assert set(control.CONTROL.records) == {
        "open_vnic", "open_vsa", "add_filter", "set_rate", "status", "shutdown",
        "vsa_create", "vsa_resize", "vsa_delete", "vsa_list", "vsa_grant", "vsa_revoke",
        "name_serve", "name_publish", "name_make", "name_open", "name_list", "name_stat", "name_remove",
    }
    assert set(control.VNIC_MGMT.records) == {
        "create_function", "destroy_function", "stats", "shutdown", "add_filter", "remove_filter", "set_rate", "add_flow",
        "remove_flows",
        "packet_out", "set_meter",
    }
    assert set(control.VSIC_MGMT.records) == {"create_function", "destroy_function", "stats", "shutdown", "set_limits"}


def test_unknown_op_and_bad_ids_are_refused() -> None:
    with pytest.raises(control.RequestRefused) as refused:
        control.CONTROL.decode(b'{"id": 3, "op": "__class__"}')
    assert refused.value.request_id == 3 and "unknown request" in str(refused.value)
    for request_id in ("1", -1, 1.0, True, 2**53, None):
        with pytest.raises(control.RequestRefused) as refused:
            control.CONTROL.decode(json.dumps({"id": request_id, "op": "status"}).encode())
        assert refused.value.request_id is None


def test_a_request_over_the_request_bound_is_refused_before_parsing() -> None:
    with pytest.raises(control.RequestRefused, match="at most"):
        control.CONTROL.decode(b'{"id":1,"op":"status","pad":"' + b"x" * control.MAX_REQUEST + b'"}')


# ---- framing --------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=5 * control.CHUNK), st.booleans())
def test_frames_reassemble_to_the_payload(size: int, as_object: bool) -> None:
    payload = (b"{" if as_object else b"x") + os.urandom(size)
    datagrams = control.frames(payload)
    assert all(len(d) <= control.CHUNK + 1 for d in datagrams)
    inbox = control.Reassembler()
    results = [inbox.feed(d) for d in datagrams]
    assert results[:-1] == [None] * (len(datagrams) - 1)
    assert results[-1] == payload
    assert not inbox.in_message


def test_an_oversized_message_is_refused_at_its_end_and_the_next_one_is_read() -> None:
    inbox = control.Reassembler(limit=3 * control.CHUNK)
    for datagram in control.frames(b"x" * (10 * control.CHUNK))[:-1]:
        assert inbox.feed(datagram) is None
    assert inbox._parts == []  # discarded as they came
    with pytest.raises(control.ProtocolError, match="larger than"):
        inbox.feed(control.frames(b"x" * (10 * control.CHUNK))[-1])
    assert inbox.feed(b'{"id": 1}') == b'{"id": 1}'


def test_a_truncated_or_headless_datagram_is_an_error_and_resets() -> None:
    inbox = control.Reassembler()
    with pytest.raises(control.ProtocolError, match="datagram larger"):
        inbox.feed(b"{" + b"x" * 10, truncated=True)
    with pytest.raises(control.ProtocolError, match="not a message"):
        inbox.feed(b"garbage")
    assert inbox.feed(bytes([control.PART_MORE]) + b"ab") is None
    with pytest.raises(control.ProtocolError, match="not a message"):
        inbox.feed(b"\x07")
    assert inbox.feed(b"{}") == b"{}"


def test_blocking_helpers_carry_large_messages_and_fds() -> None:
    ours, theirs = pair()
    message = {"blob": "y" * (3 * control.CHUNK)}
    read_end, write_end = os.pipe()
    try:
        import threading

        sender = threading.Thread(
            target=control.send_blocking, args=(ours, control.encode_json(message), [write_end])
        )
        sender.start()
        received = control.recv_blocking(theirs)
        sender.join()
        assert received is not None
        payload, fds = received
        assert control.decode_json(payload) == message and len(fds) == 1
        os.write(fds[0], b"!")
        assert os.read(read_end, 1) == b"!"
        os.close(fds[0])
    finally:
        for fd in (read_end, write_end):
            os.close(fd)
        ours.close()
        theirs.close()


def test_a_channel_never_blocks_and_bounds_what_it_holds() -> None:
    ours, theirs = pair()
    channel = control.Channel(ours, max_output=4 << 20)
    try:
        big = control.encode_json({"blob": "z" * (1 << 20)})
        channel.send(big)
        sent = 1
        assert channel.flush() is False  # the peer reads nothing: the rest waits, no block
        assert channel.pending
        with pytest.raises(control.ChannelFull):
            for _ in range(8):
                channel.send(big)
                sent += 1
        assert sent == 4 and channel.pending_bytes <= 4 << 20
        # The peer reads: everything queued arrives whole and in order.
        peer = control.Channel(theirs)
        received: list[control.Incoming] = []
        while len(received) < sent:
            channel.flush()
            received += peer.receive()
        assert not channel.pending and channel.messages_out == 0
        assert all(item.payload == big for item in received)
    finally:
        channel.close()
        theirs.close()


def test_a_channel_reports_extra_fds_and_closes_them() -> None:
    ours, theirs = pair()
    channel = control.Channel(theirs)
    read_end, write_end = os.pipe()
    try:
        datagrams = control.frames(b"x" * (2 * control.CHUNK))
        socket.send_fds(ours, [datagrams[0]], [read_end])
        socket.send_fds(ours, [datagrams[1]], [write_end])  # fds on a later part: refused
        for datagram in datagrams[2:]:
            ours.send(datagram)
        (incoming,) = channel.receive()
        assert incoming.payload is None and "first part" in incoming.error and incoming.fds == []
        ours.close()
        assert channel.receive() == [] and channel.closed
    finally:
        os.close(read_end)
        os.close(write_end)
        channel.close()
