"""Controller flows in the VNIC (vdev/vnic/flows.py and their place in the filter table):
tuple-space lookup by priority, masks, counters, the claimed filters' precedence, and the
compiled data path against the Python model with controller flows installed."""

from __future__ import annotations

import ipaddress
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_devfast_diff import FN_IP, FN_MAC, OTHER_PORT, PEER_IP, PEER_MAC, PORT, World, _good_rx, run_both, udp_frame
from vdev.vnic.filters import CONTROLLER_FUNCTION, DEFAULT_FUNCTION, DROP_FUNCTION, FilterTable, InvalidMatch, Match
from vdev.vnic.flows import MAX_FLOWS, Flow, FlowTable

IP = lambda text: int(ipaddress.IPv4Address(text))  # noqa: E731
FULL32 = 0xFFFFFFFF


def frame(src: str, dst: str, dport: int, sport: int = 5000) -> bytes:
    return udp_frame(PEER_MAC, FN_MAC, ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed, sport, dport, b"x")


def flow(flow_id: int, priority: int, **fields: tuple[int, int]) -> Flow:
    return Flow(flow_id, priority, dict(fields), ((1, 0),), False, 0)


def test_highest_priority_wins_across_subtables() -> None:
    table = FlowTable()
    table.add(flow(1, 10, eth_type=(0x800, 0xFFFF), ipv4_src=(IP("10.0.0.0"), 0xFF000000)))
    table.add(flow(2, 20, eth_type=(0x800, 0xFFFF), ipv4_src=(IP("10.1.0.0"), 0xFFFF0000)))
    table.add(flow(3, 5, eth_type=(0x800, 0xFFFF), ip_proto=(17, 0xFF), l4_dst=(53, 0xFFFF)))
    hit = table.lookup(frame("10.1.2.3", "10.9.0.2", 53))
    assert hit is not None and hit.flow_id == 2
    hit = table.lookup(frame("10.2.2.3", "10.9.0.2", 53))
    assert hit is not None and hit.flow_id == 1
    hit = table.lookup(frame("11.2.2.3", "10.9.0.2", 53))
    assert hit is not None and hit.flow_id == 3
    assert table.lookup(frame("11.2.2.3", "10.9.0.2", 54)) is None
    table.remove(2)
    hit = table.lookup(frame("10.1.2.3", "10.9.0.2", 53))
    assert hit is not None and hit.flow_id == 1


def test_equal_priorities_go_to_the_oldest_and_fields_missing_from_a_frame_never_match() -> None:
    table = FlowTable()
    table.add(flow(1, 7, eth_type=(0x800, 0xFFFF)))
    table.add(flow(2, 7, eth_type=(0x800, 0xFFFF), ipv4_dst=(IP("10.9.0.2"), FULL32)))
    hit = table.lookup(frame("1.1.1.1", "10.9.0.2", 1))
    assert hit is not None and hit.flow_id == 1
    table.add(flow(3, 9, l4_dst=(80, 0xFFFF)))
    arp = b"\xff" * 6 + PEER_MAC + b"\x08\x06" + bytes(28)
    assert table.lookup(arp) is None
    assert table.lookup(b"\x01\x02") is None


def test_lookup_against_a_linear_scan_of_random_tables() -> None:
    rng = random.Random(3)
    table = FlowTable()
    flows = []
    shapes = [("ipv4_src", 0xFFFFFF00), ("ipv4_src", FULL32), ("ipv4_dst", 0xFFFF0000), ("l4_dst", 0xFFFF)]
    for flow_id in range(1, 400):
        name, mask = rng.choice(shapes)
        fields = {"eth_type": (0x800, 0xFFFF), "ip_proto": (17, 0xFF)}
        value = rng.choice([IP("10.0.0.0"), IP("10.0.1.0"), IP("10.9.0.0")]) | rng.randrange(4)
        fields[name] = ((value if name != "l4_dst" else rng.randrange(50, 60)) & mask, mask)
        item = flow(flow_id, rng.randrange(0, 50), **fields)
        table.add(item)
        flows.append(item)
    for flow_id in rng.sample(range(1, 400), 100):
        table.remove(flow_id)
        flows = [f for f in flows if f.flow_id != flow_id]
    for _ in range(500):
        src = f"10.0.{rng.randrange(2)}.{rng.randrange(4)}"
        dst = f"10.9.0.{rng.randrange(4)}"
        data = frame(src, dst, rng.randrange(50, 60))
        values = {"eth_type": 0x800, "ip_proto": 17, "ipv4_src": IP(src), "ipv4_dst": IP(dst),
                  "l4_dst": int.from_bytes(data[36:38], "big")}
        matching = [f for f in flows if all(values[n] & m == v for n, (v, m) in f.fields.items())]
        expected = max(matching, key=lambda f: (f.priority, -f.order), default=None)
        assert table.lookup(data) is expected


def test_the_table_is_bounded_and_checks_fields() -> None:
    table = FlowTable()
    with pytest.raises(ValueError):
        table.add(flow(1, 1, ipv4_src=(1, 0)))
    with pytest.raises(ValueError):
        table.add(flow(1, 1, ipv4_src=(3, 2)))
    with pytest.raises(ValueError):
        table.add(flow(1, 70000))
    for flow_id in range(MAX_FLOWS):
        table.add(flow(flow_id + 1, 1, l4_dst=(flow_id % 65536, 0xFFFF)))
    with pytest.raises(ValueError):
        table.add(flow(MAX_FLOWS + 1, 1))


def claimed_table() -> FilterTable:
    table = FilterTable()
    table.add_rx(1, 0, Match(ip_proto=17, ip=FN_IP, port=PORT))
    return table


def test_claimed_filters_come_before_controller_flows() -> None:
    table = claimed_table()
    # Drop everything from the peer: its claimed traffic still reaches function 1.
    drop = table.add_flow(100, {"eth_type": (0x800, 0xFFFF), "ipv4_src": (int.from_bytes(PEER_IP, "big"), FULL32)}, [])
    claimed = _good_rx(b"x")
    other = udp_frame(PEER_MAC, FN_MAC, PEER_IP, FN_IP, 5000, OTHER_PORT, b"x")
    (delivery,) = table.classify_rx_deliveries(claimed)
    assert delivery.function_id == 1
    (delivery,) = table.classify_rx_deliveries(other)
    assert (delivery.function_id, delivery.filter_id) == (DROP_FUNCTION, drop)
    table.record_rx(delivery, len(other), True)
    flow_stats = [entry for entry in table.stats() if entry["kind"] == "flow"]
    assert flow_stats[0]["packets"] == 1 and flow_stats[0]["bytes"] == len(other)
    assert table.remove_flow(drop)["packets"] == 1
    (delivery,) = table.classify_rx_deliveries(other)
    assert delivery.function_id == DEFAULT_FUNCTION


def test_a_flow_with_several_outputs_counts_a_frame_once() -> None:
    table = claimed_table()
    flow_id = table.add_flow(5, {}, [(1, 0), (DEFAULT_FUNCTION, 0)], to_controller=True, controller_len=64)
    other = udp_frame(PEER_MAC, FN_MAC, PEER_IP, FN_IP, 5000, OTHER_PORT, b"x")
    deliveries = table.classify_rx_deliveries(other)
    assert [d.function_id for d in deliveries] == [CONTROLLER_FUNCTION, 1, DEFAULT_FUNCTION]
    for delivery in deliveries:
        table.record_rx(delivery, len(other), True)
    (entry,) = [e for e in table.stats() if e["kind"] == "flow"]
    assert entry["id"] == flow_id and entry["packets"] == 1
    assert table.function_counters(1)["rx_packets"] == 1
    with pytest.raises(InvalidMatch):
        table.add_flow(5, {}, [(1, 99)])


# ---- the compiled path with controller flows installed -------------------------------------------

PEER = int.from_bytes(PEER_IP, "big")
FLOW_SPECS: list[tuple[int, dict[str, tuple[int, int]], list[tuple[int, int]], bool]] = [
    (10, {"eth_type": (0x800, 0xFFFF), "ipv4_src": (PEER, FULL32)}, [], False),  # drop the peer
    (20, {"eth_type": (0x800, 0xFFFF), "ip_proto": (17, 0xFF), "l4_dst": (OTHER_PORT, 0xFFFF)}, [(1, 0)], False),  # steer
    (30, {"eth_type": (0x800, 0xFFFF), "ip_proto": (17, 0xFF), "l4_dst": (PORT, 0xFFFF)}, [], True),  # claimed: no effect
    (1, {}, [(DEFAULT_FUNCTION, 0)], True),  # table miss to LOCAL and the controller
    (40, {"eth_src": (int.from_bytes(PEER_MAC, "big") & 0xFFFFFF000000, 0xFFFFFF000000)}, [(1, 0)], False),
]


class FlowWorld(World):
    def apply(self, op: tuple[object, ...]) -> None:
        if op[0] == "flow":
            priority, fields, outputs, controller = FLOW_SPECS[op[1]]  # type: ignore[index]
            self.device.filters.add_flow(priority, fields, outputs, controller, 64)
        elif op[0] == "unflow":
            flows = sorted(self.device.filters.flows.flows)
            if flows:
                self.device.filters.remove_flow(flows[0])
        else:
            super().apply(op)

    def state(self) -> dict[str, object]:
        state = super().state()
        state["packet_ins"] = self.device.take_packet_ins()
        return state


rx = st.one_of(
    st.binary(max_size=64).map(_good_rx),
    st.binary(max_size=64).map(lambda p: udp_frame(PEER_MAC, FN_MAC, PEER_IP, FN_IP, 5000, OTHER_PORT, p)),
    st.binary(max_size=64).map(lambda p: udp_frame(PEER_MAC, FN_MAC, bytes([10, 9, 0, 7]), FN_IP, 5000, OTHER_PORT, p)),
    st.binary(min_size=0, max_size=40),
)
flow_operations = st.one_of(
    st.tuples(st.just("flow"), st.integers(0, len(FLOW_SPECS) - 1)),
    st.just(("unflow",)),
    st.tuples(st.just("post_rx"), st.just("buffer"), st.just(2048)),
    st.tuples(st.just("wire"), rx),
    st.tuples(st.just("traffic"), st.integers(1, 10), st.integers(0, 200)),
    st.just(("reap",)),
    st.just(("poll",)),
)


def run_flow_worlds(ops: list[tuple[object, ...]]) -> tuple[World, World]:
    import tests.test_devfast_diff as diff

    original = diff.World
    diff.World = FlowWorld  # type: ignore[misc]
    try:
        return run_both(ops)
    finally:
        diff.World = original  # type: ignore[misc]


@given(st.lists(flow_operations, min_size=4, max_size=50))
@settings(max_examples=120, deadline=None)
def test_compiled_path_honours_controller_flows(ops: list[tuple[object, ...]]) -> None:
    pure, fast = run_flow_worlds(ops + [("poll",)])
    pure.close()
    fast.close()


def test_controller_flows_act_on_both_paths() -> None:
    ops: list[tuple[object, ...]] = [("flow", 1), ("flow", 0)]
    for index in range(6):
        ops.append(("post_rx", "buffer", 2048))
        ops.append(("wire", _good_rx(bytes([index]))))  # claimed: delivered in C despite the drop flow
        ops.append(("wire", udp_frame(PEER_MAC, FN_MAC, bytes([10, 9, 0, 7]), FN_IP, 5000, OTHER_PORT, b"s")))  # steered
        ops.append(("wire", udp_frame(PEER_MAC, FN_MAC, PEER_IP, FN_IP, 5000, OTHER_PORT, b"d")))  # drop (10) and steer (20) match
    ops += [("wire", udp_frame(PEER_MAC, FN_MAC, PEER_IP, FN_IP, 5000, 9, b"z")), ("poll",)]
    pure, fast = run_flow_worlds(ops)
    try:
        for world in (pure, fast):
            flows = {e["priority"]: e for e in world.device.filters.stats() if e["kind"] == "flow"}
            # The steer flow (priority 20) beats the drop flow (10) for OTHER_PORT.
            assert flows[20]["packets"] == 12 and flows[10]["packets"] == 1
            assert world.device.counters.flow_dropped == 1
            counters = world.function.counters
            assert counters.rx_packets + counters.rx_no_buffer == 18 and counters.rx_packets == 6
        assert fast.device.fast is not None and fast.device.fast.rx_fast_frames >= 1
    finally:
        pure.close()
        fast.close()


def test_meters_and_packet_ins_are_bounded_in_the_device() -> None:
    from vdev import control
    from vdev.vnic.device import MAX_PACKET_INS

    world = World(False)
    try:
        device = world.device
        device.set_meter(1, 80, 0, world.now)  # 80 kbit/s: a 10 kB/s bucket of 1514 bytes
        device.filters.add_flow(20, {"eth_type": (0x800, 0xFFFF), "ip_proto": (17, 0xFF), "l4_dst": (OTHER_PORT, 0xFFFF)},
                                [(DEFAULT_FUNCTION, 0)], meter=1)
        other = udp_frame(PEER_MAC, FN_MAC, PEER_IP, FN_IP, 5000, OTHER_PORT, b"m" * 458)  # 500 bytes
        device.receive_from_wire(0, world.now, [other] * 10)
        meter = device.snapshot()["meters"][0]  # type: ignore[index]
        assert meter["packets_in"] == 10 and meter["band_packets"] == 7  # 1514 bytes of burst: 3 frames
        device.receive_from_wire(0, world.now + 0.1, [other] * 3)  # 1000 bytes earned in 100 ms: 2 more
        meter = device.snapshot()["meters"][0]  # type: ignore[index]
        assert meter["band_packets"] == 8
        with pytest.raises(KeyError):
            device.set_meter(9, 0, 0, world.now)
        # A to-controller flow under a flood: at most MAX_PACKET_INS wait, the rest are counted.
        device.filters.add_flow(1, {}, [], to_controller=True, controller_len=64)
        flood = udp_frame(PEER_MAC, FN_MAC, PEER_IP, FN_IP, 5000, 9, b"f")
        device.receive_from_wire(0, world.now + 0.2, [flood] * (MAX_PACKET_INS + 50))
        taken = device.take_packet_ins()
        assert len(taken) == MAX_PACKET_INS and device.counters.packet_ins_dropped == 50
        assert taken[0][1] == len(flood) and len(taken[0][2]) == min(64, len(flood))
    finally:
        world.close()
    # The event that carries them to kernelctl is checked like any other message.
    event = control.decode_reply(control.PacketInEvent(7, 60, b"\x01\x02").to_json())
    assert event == control.PacketInEvent(7, 60, b"\x01\x02")
    for bad in (b'{"event": "packet_in", "flow_id": -1, "total_len": 1, "data": ""}',
                b'{"event": "packet_in", "flow_id": 1, "total_len": 1, "data": "zz"}',
                b'{"event": "packet_in", "flow_id": 1, "total_len": 1, "data": "' + b"00" * 2000 + b'"}'):
        with pytest.raises(control.ProtocolError):
            control.decode_reply(bad)
