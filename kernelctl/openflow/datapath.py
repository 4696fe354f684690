"""The switch's view of the device, built from what the daemon already has: its function
records and the VNIC device host's management channel. One small adapter, so that the
switch model stays testable with a fake.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kernelctl.openflow.constants import Port
from kernelctl.openflow.switch import WIRE_PORT, DatapathError, DeviceFlow, PortInfo
from vdev import control


@dataclass(frozen=True)
class FunctionPort:
    function_id: int
    name: str
    created: float


class VnicDatapath:
    """``request`` sends one management request to the VNIC device host and returns its
    result (raising on refusal or silence); ``functions`` lists the live VNIC functions."""

    def __init__(
        self,
        request: Callable[[control.Record], Any],
        functions: Callable[[], list[FunctionPort]],
        mac: bytes,
        wire_name: str,
        revoke: Callable[[int, str, int], None],
    ) -> None:
        self._request = request
        self._revoke = revoke
        self._functions = functions
        self.mac = mac
        self.wire_name = wire_name
        self.started = time.time()

    def wall_clock(self) -> float:
        return time.time()

    def ports(self) -> list[PortInfo]:
        ports = [PortInfo(f.function_id, f.name or f"fn{f.function_id}", self.mac, f.created) for f in self._functions()]
        ports.append(PortInfo(WIRE_PORT, self.wire_name, self.mac, self.started))
        ports.append(PortInfo(Port.LOCAL, "local", self.mac, self.started))
        return ports

    def _call(self, body: control.Record) -> Any:
        try:
            return self._request(body)
        except Exception as exc:  # a refusal or a silent host: the controller gets an error
            raise DatapathError(str(exc)) from None

    def device_stats(self) -> dict[str, Any]:
        result = self._call(control.Stats())
        return result if isinstance(result, dict) else {}

    def add_flow(self, flow: DeviceFlow) -> int:
        result = self._call(
            control.HostAddFlow(
                priority=flow.priority,
                match=tuple(control.FlowField(name, value, mask) for name, value, mask in flow.fields),
                outputs=tuple(control.FlowOutput(function_id, queue) for function_id, queue in flow.outputs),
                to_controller=flow.to_controller,
                controller_len=flow.controller_len,
                meter=flow.meter,
            )
        )
        if not isinstance(result, dict) or not isinstance(result.get("flow_id"), int):
            raise DatapathError(f"the device answered add_flow with {result!r}")
        return int(result["flow_id"])

    def packet_out(self, target: str, data: bytes, function_id: int = 0, queue: int = 0) -> None:
        self._call(control.HostPacketOut(target, data.hex(), function_id, queue))

    def revoke_claim(self, function_id: int, proto: str, port: int) -> None:
        try:
            self._revoke(function_id, proto, port)
        except Exception as exc:
            raise DatapathError(str(exc)) from None

    def set_meter(self, meter_id: int, rate_kbps: int, burst_kb: int) -> None:
        self._call(control.HostSetMeter(meter_id, rate_kbps, burst_kb))

    def remove_flows(self, flow_ids: list[int]) -> dict[int, dict[str, int]]:
        if not flow_ids:
            return {}
        result = self._call(control.HostRemoveFlows(tuple(flow_ids)))
        removed = result.get("removed", {}) if isinstance(result, dict) else {}
        finals: dict[int, dict[str, int]] = {}
        for key, counters in removed.items():
            if isinstance(counters, dict):
                finals[int(key)] = {name: int(value) for name, value in counters.items() if isinstance(value, int)}
        return finals
