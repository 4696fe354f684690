"""The VNIC device model: functions, the filter table, the default function, the wire.

This is the "hardware" of one virtual NIC, without the process around it (that is
``vdev.vnic.host``): it moves frames between the wire backend and the functions' rings,
steering received frames with the filter table and checking transmitted ones against it.
Every call takes ``now``; nothing here sleeps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from vdev.fast.mirror import make_fast_path
from vdev.ratelimit import RequestLimiter, TokenBucket
from vdev.vnic.backend import WireBackend
from vdev.vnic.default_function import DefaultFunction
from vdev.vnic.filters import CONTROLLER_FUNCTION, DEFAULT_FUNCTION, TX_REFUSED, Delivery, FilterTable, Match
from vdev.vnic.function import FunctionConfig, VnicFunction

RX_BUDGET = 64  # frames taken from one wire queue per poll
MAX_PACKET_INS = 256  # frames waiting for the host to pass them to kernelctl
# Frames per second the device hands to the controller (a token bucket with a burst of
# MAX_PACKET_INS): a flood of unclaimed traffic under a to-controller flow costs the control
# plane a bounded amount of work; the rest is counted in packet_ins_dropped.
PACKET_IN_RATE = 1000.0
TX_BUDGET = 64  # descriptors taken from one TX ring per poll


MAX_METERS = 64
METER_WINDOW = 0.05  # seconds of traffic a meter's default bucket lets through at once


@dataclass
class Meter:
    """A controller's meter: a token bucket that flows share (a drop band, in bytes)."""

    bucket: TokenBucket
    rate_kbps: int
    burst_kb: int
    packets_in: int = 0
    bytes_in: int = 0
    band_packets: int = 0  # dropped by the band
    band_bytes: int = 0

    def as_dict(self, meter_id: int, flows: int) -> dict[str, int]:
        return {"meter_id": meter_id, "rate_kbps": self.rate_kbps, "burst_kb": self.burst_kb, "flows": flows,
                "packets_in": self.packets_in, "bytes_in": self.bytes_in,
                "band_packets": self.band_packets, "band_bytes": self.band_bytes}


@dataclass
class DeviceCounters:
    wire_rx_packets: int = 0
    wire_rx_bytes: int = 0
    wire_tx_packets: int = 0
    wire_tx_bytes: int = 0
    wire_tx_dropped: int = 0
    delivered: int = 0
    dropped: int = 0  # a function could not take a frame steered to it
    flow_dropped: int = 0  # a controller flow said drop
    packet_ins: int = 0  # frames a controller flow sent to the controller
    packet_ins_dropped: int = 0  # ... that found the packet-in queue full

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class VnicDevice:
    def __init__(self, backend: WireBackend, mac: bytes, addresses: Iterable[bytes]) -> None:
        self.backend = backend
        self.mac = mac
        self.filters = FilterTable()
        self.functions: dict[int, VnicFunction] = {}
        self.default = DefaultFunction(mac, list(addresses))
        self.counters = DeviceCounters()
        self._irq_pending: set[VnicFunction] = set()
        self.tx_deadline: float | None = None  # when a rate-limited TX ring may go on
        self.fast = make_fast_path(RX_BUDGET, TX_BUDGET)  # None: pure Python (ARRAKIS_PURE=1)
        self.meters: dict[int, Meter] = {}
        # (flow id, total length, the frame's first bytes) for the controller; bounded.
        self.packet_ins: list[tuple[int, int, bytes]] = []
        # The shared limiter in requests per second (bytes unlimited); it starts full.
        self._packet_in_limit = RequestLimiter(int(PACKET_IN_RATE), RequestLimiter.UNLIMITED, 0.0,
                                               burst_requests=MAX_PACKET_INS)

    # ---- configuration (from the control plane) -------------------------------------

    def add_function(self, config: FunctionConfig, rx_matches: list[Match], now: float) -> VnicFunction:
        if config.function_id == DEFAULT_FUNCTION or config.function_id in self.functions:
            raise ValueError(f"function {config.function_id} exists")
        function = VnicFunction(config, now)
        filter_ids: list[int] = []
        try:
            self.filters.grant_address(config.function_id, config.ipv4)
            # Anti-spoofing covers the Ethernet layer too: frames from the function's MAC only.
            self.filters.grant_mac(config.function_id, config.mac)
            for match in rx_matches:
                filter_ids.append(self.filters.add_rx(config.function_id, 0, match))
                # Transmit: the same protocol and port, from the function's own address only.
                self.filters.add_tx(config.function_id, replace(match, ip=config.ipv4))
        except Exception:
            self.filters.remove_function(config.function_id)
            function.close()
            raise
        self.functions[config.function_id] = function
        return function

    def remove_function(self, function_id: int) -> None:
        function = self.functions.pop(function_id, None)
        self.filters.remove_function(function_id)
        if function is not None:
            self._irq_pending.discard(function)
            function.close()

    # ---- data path -------------------------------------------------------------------

    def receive_from_wire(self, queue: int, now: float, frames: list[bytes] | None = None) -> int:
        """Take a burst of frames off wire queue ``queue`` (or steer ``frames``)."""
        if frames is None:
            if self.fast is not None:
                return self.fast.receive_from_wire(self, queue, now)
            frames = self.backend.receive(queue, RX_BUDGET)
        if not frames:
            return 0
        counters = self.counters
        functions = self.functions
        classify = self.filters.classify_rx_deliveries
        record = self.filters.record_rx
        meters = self.meters
        for frame in frames:
            length = len(frame)
            counters.wire_rx_packets += 1
            counters.wire_rx_bytes += length
            deliveries = classify(frame)
            if meters and deliveries and not self._metered(deliveries[0], length, now):
                continue
            for delivery in deliveries:
                function_id = delivery.function_id
                if function_id < 0:
                    # A controller flow's verdict: the controller, or nowhere.
                    if function_id == CONTROLLER_FUNCTION:
                        self._to_controller(delivery.filter_id, frame, now)
                    else:
                        counters.flow_dropped += 1
                    record(delivery, length, True)
                    continue
                if function_id == DEFAULT_FUNCTION:
                    for reply in self.default.handle(frame, now):
                        self.send_to_wire(reply)
                    record(delivery, length, True)
                    continue
                function = functions.get(function_id)
                if function is not None and function.deliver(delivery.queue, frame, now):
                    counters.delivered += 1
                    self._irq_pending.add(function)
                    record(delivery, length, True)
                else:
                    counters.dropped += 1
                    record(delivery, length, False)
        return len(frames)

    def _metered(self, delivery: Delivery, length: int, now: float) -> bool:
        """Whether a frame a metered controller flow matched may go on (its meter's band
        drops the rest, and the flow counts them as drops)."""
        flow = self.filters.flows.flows.get(delivery.filter_id)
        if flow is None or not flow.meter:
            return True
        meter = self.meters.get(flow.meter)
        if meter is None:
            return True
        meter.packets_in += 1
        meter.bytes_in += length
        if meter.bucket.try_consume(length, now):
            return True
        meter.band_packets += 1
        meter.band_bytes += length
        self.filters.record_rx(delivery, length, False)
        return False

    def set_meter(self, meter_id: int, rate_kbps: int, burst_kb: int, now: float) -> None:
        """Add or change meter ``meter_id`` (rate 0: remove it). The bucket holds ``burst_kb``
        kilobits, or by default ``METER_WINDOW`` seconds of traffic (frames reach the device
        in bursts after every scheduling gap, as for the receive policer)."""
        if rate_kbps == 0:
            if self.meters.pop(meter_id, None) is None:
                raise KeyError(f"no meter {meter_id}")
            return
        burst_bytes = burst_kb * 125 if burst_kb else max(1514, int(rate_kbps * 125 * METER_WINDOW))
        meter = self.meters.get(meter_id)
        if meter is None:
            if len(self.meters) >= MAX_METERS:
                raise ValueError(f"the device has {MAX_METERS} meters")
            self.meters[meter_id] = Meter(TokenBucket(rate_kbps * 1000, burst_bytes, now), rate_kbps, burst_kb)
        else:
            meter.bucket.set_rate(rate_kbps * 1000, burst_bytes, now)
            meter.rate_kbps, meter.burst_kb = rate_kbps, burst_kb

    def _to_controller(self, flow_id: int, frame: bytes, now: float) -> None:
        flow = self.filters.flows.flows.get(flow_id)
        if flow is None:
            return
        if len(self.packet_ins) >= MAX_PACKET_INS or not self._packet_in_limit.try_consume(0, now):
            self.counters.packet_ins_dropped += 1
            return
        self.counters.packet_ins += 1
        self.packet_ins.append((flow_id, len(frame), bytes(frame[: flow.controller_len])))

    def take_packet_ins(self) -> list[tuple[int, int, bytes]]:
        taken, self.packet_ins = self.packet_ins, []
        return taken

    def send_to_wire(self, frame: bytes) -> None:
        if self.backend.send(0, frame):
            self.counters.wire_tx_packets += 1
            self.counters.wire_tx_bytes += len(frame)
        else:
            self.counters.wire_tx_dropped += 1

    def poll_transmit(self, now: float) -> int:
        """Take posted frames off every function's TX rings onto the wire."""
        sent = 0
        deadline: float | None = None
        allowed = self._tx_allowed
        for function in self.functions.values():
            for queue in range(function.num_queues):
                if function.tx_rings[queue] is None:
                    continue
                fast_sent = 0 if self.fast is None else self.fast.transmit(self, function, queue, TX_BUDGET)
                frames, wait = function.transmit(queue, TX_BUDGET - fast_sent, now, allowed)
                for frame in frames:
                    self.send_to_wire(frame)
                if frames or fast_sent:
                    sent += len(frames) + fast_sent
                    self._irq_pending.add(function)
                if wait > 0:
                    due = now + wait
                    deadline = due if deadline is None else min(deadline, due)
        self.tx_deadline = deadline
        return sent

    def _tx_allowed(self, function_id: int, frame: bytes) -> bool:
        """The transmit filter's verdict on one frame, counted (passed to ``transmit``)."""
        verdict = self.filters.classify_tx(function_id, frame)
        permitted = verdict != TX_REFUSED
        self.filters.record_tx(function_id, verdict, len(frame), permitted)
        return permitted

    def raise_irqs_of(self, function_id: int) -> None:
        function = self.functions.get(function_id)
        if function is not None:
            function.raise_irqs()

    def raise_irqs(self) -> None:
        if self._irq_pending:
            for function in self._irq_pending:
                function.raise_irqs()
            self._irq_pending.clear()

    def has_tx_work(self) -> bool:
        return any(function.has_tx_work() for function in self.functions.values())

    def set_asleep(self, asleep: bool) -> None:
        for function in self.functions.values():
            function.set_asleep(asleep)

    def sync_rings(self) -> None:
        for function in self.functions.values():
            function.sync_rings()

    def snapshot(self) -> dict[str, object]:
        return {
            "device": self.counters.as_dict(),
            "default_function": self.default.counters.as_dict(),
            "functions": [function.snapshot() for function in self.functions.values()],
            "filters": self.filters.stats(),
            "meters": [
                meter.as_dict(meter_id, sum(1 for f in self.filters.flows.flows.values() if f.meter == meter_id))
                for meter_id, meter in sorted(self.meters.items())
            ],
            "fast": None if self.fast is None else self.fast.stats(),
        }

    def close(self) -> None:
        for function_id in list(self.functions):
            self.remove_function(function_id)
        self.backend.close()
