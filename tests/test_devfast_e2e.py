"""End to end, as root: UDP echo through the real device host must take the compiled path.

The differential test (test_devfast_diff.py) proves the compiled path does what the Python
model does; this test proves the device host really runs it on a real tap (batched reads
in C, writes from C) and that the status shows it.
"""

from __future__ import annotations

import json

import pytest

from kernelctl.names import Topology
from tests.conftest import kernelctl
from tests.helpers import echo_app, run_in_netns
from tests.test_e2e_udp import echo_sizes_client
from vdev.fast import pure_requested

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(pure_requested(), reason="ARRAKIS_PURE=1: the device host runs the Python model by request"),
]


def test_udp_echo_runs_on_the_compiled_path(instance: Topology) -> None:
    with echo_app("vnic", instance.tag, 7) as vnic:
        result = run_in_netns(instance.client_netns, echo_sizes_client, (instance.vnic_ip, 7), 500, 7, timeout=120)
        status = json.loads(kernelctl(instance.tag, "status", "-j").stdout)
        vnic.stop()
    assert result["ok"] == 500, result
    fast = status["device"]["fast"]
    assert fast is not None and fast["module"] == "vdev.fast._vfast"
    # Every request and every reply is a fast case (exact filter, posted buffer, own MAC);
    # the first ARP exchange is not. A reply the app posts in the instant between the
    # compiled burst's last look at the TX ring and the model's look goes through the model
    # (correctly, only slower): how many do depends on scheduling (12% in one loaded CI
    # run), so this checks that the TX burst runs, not what share it gets; the share is a
    # benchmark figure.
    assert fast["rx_frames"] >= 490, fast
    assert fast["tx_frames"] >= 1, fast
    # ARP, and a frame that arrives before the app has given its RX buffer back (the model
    # then queues or drops it, as a NIC with an empty ring does): nothing else leaves C.
    assert set(fast["to_model"]) <= {"rx_not_l4", "tx_not_l4", "rx_no_buffer"}, fast
