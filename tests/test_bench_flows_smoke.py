"""tools/bench_flows.py runs and measures what it says (no timings asserted: a benchmark is
not a test). The model part needs nothing; the end-to-end part one throwaway instance."""

from __future__ import annotations

import argparse

import pytest

from kernelctl.names import Topology
from tests.helpers import echo_app
from tools import bench_flows


@pytest.mark.parametrize("kind", bench_flows.KINDS)
def test_the_model_part_hits_the_claimed_port_and_the_last_flow(kind: str) -> None:
    result = bench_flows.model(100, kind, 640)
    assert result["flow_packets"] == 640  # every flow_hit frame, nothing else
    assert result["claimed_packets"] == 640
    assert all(result[key] > 0 for key in ("claimed_ns_per_frame", "flow_hit_ns_per_frame", "no_flow_ns_per_frame"))


@pytest.mark.root
def test_the_end_to_end_part_installs_flows_and_sees_the_burst(instance: Topology) -> None:
    from tools.benchlib import device_host_pids

    with echo_app("vnic", instance.tag, 7):
        controller = bench_flows.Controller(instance.run_dir / "openflow.sock")
        try:
            args = argparse.Namespace(pings=20, burst=300)
            result = bench_flows.end_to_end(instance, controller, device_host_pids(instance)["vnic"], 50, "masked", args)
        finally:
            controller.close()
    assert result["rtt_claimed_us"]["samples"] >= 15
    assert result["unclaimed_burst"]["seen_by_device"] >= 0.9 * 300
