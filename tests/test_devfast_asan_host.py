"""A whole VNIC device host on the AddressSanitizer/UBSan build of its compiled data path, as root.

test_devfast_diff.py runs the C functions under the sanitizers inside the test process; this
test runs the real host process on them (the daemon is started with ARRAKIS_VDEV_FAST=asan
and libasan preloaded, and its device hosts inherit both). Through it go ordinary echo
traffic of every size and a few thousand hostile frames from the wire: truncated and lying
Ethernet, IPv4, UDP and TCP headers addressed to the app's filter. Any memory error or
undefined behaviour aborts the host (``abort_on_error``), which the daemon would restart
under a new pid; the test checks that it did not, and that the host's log is clean.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from kernelctl.hostproc import nic_mac
from kernelctl.names import Topology, topology
from tests.conftest import KERNELCTL, REPO, kernelctl, leftovers, require_root, unique_tag
from tests.helpers import echo_app, run_in_netns, sanitized_vfast_env
from tests.test_e2e_udp import echo_sizes_client

pytestmark = pytest.mark.root

ETH_P_ALL = 0x0003


def hostile_frames(bridge: str, dst_mac: str, dst_ip: str, count: int, seed: int) -> int:
    """``count`` frames for the VNIC's MAC whose headers lie in every way a parser can be lied to."""
    rng = random.Random(seed)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((bridge, 0))
    dst = bytes.fromhex(dst_mac.replace(":", ""))
    src = bytes([0x02, 0xBA, 0xD0, 0, 0, 1])
    target = socket.inet_aton(dst_ip)
    sent = 0
    for _ in range(count):
        proto = rng.choice((6, 17, 1, rng.randrange(256)))
        ihl = rng.choice((5, 5, 5, 0, 4, 6, 15))
        total = rng.choice((20 + 8, rng.randrange(65536), 0, 1500))
        ip = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, rng.randrange(65536), rng.choice((0, 0x2000, 0x1FFF)),
                         64, proto, rng.randrange(65536), socket.inet_aton("10.66.0.9"), target)
        l4 = struct.pack("!HHHH", rng.randrange(65536), 7, rng.choice((0, 7, 8, 65535, rng.randrange(65536))),
                         rng.randrange(65536))
        if proto == 6:
            l4 += struct.pack("!IIBBHHH", rng.getrandbits(32), rng.getrandbits(32), rng.randrange(256),
                              rng.randrange(256), rng.randrange(65536), rng.randrange(65536), 0)
        body = ip + l4 + rng.randbytes(rng.randrange(64))
        cut = rng.choice((len(body), rng.randrange(len(body) + 1)))
        ethertype = rng.choice((0x0800, 0x0800, 0x0800, 0x86DD, 0x0806, rng.randrange(65536)))
        frame = dst + src + struct.pack("!H", ethertype) + body[:cut]
        try:
            sock.send(frame)
            sent += 1
        except OSError:
            pass  # a frame shorter than the link allows
        if sent % 100 == 0:
            time.sleep(0.002)  # paced: a burst past the tap's queue would be dropped before the device
    sock.close()
    return sent


def _child_pid(topo: Topology) -> int:
    daemon = int(topo.pid_file.read_text())
    listing = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(daemon)], capture_output=True, text=True).stdout
    return next(int(line.split()[0]) for line in listing.splitlines() if "vdev.vnic.host" in line)


def test_device_host_on_the_sanitized_build_survives_traffic_and_hostile_frames() -> None:
    require_root()
    topo = topology(unique_tag())
    up = subprocess.run([*KERNELCTL, "--instance", topo.tag, "up"], capture_output=True, text=True, timeout=120,
                        cwd=REPO, env=sanitized_vfast_env())
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        host = _child_pid(topo)
        with echo_app("vnic", topo.tag, 7) as app:
            echoed = run_in_netns(topo.client_netns, echo_sizes_client, (topo.vnic_ip, 7), 1500, 11, timeout=180)
            sent = run_in_netns(topo.client_netns, hostile_frames, topo.bridge, nic_mac(topo), topo.vnic_ip, 3000, 12,
                                timeout=120)
            again = run_in_netns(topo.client_netns, echo_sizes_client, (topo.vnic_ip, 7), 100, 13, timeout=120)
            status = json.loads(kernelctl(topo.tag, "status", "-j").stdout)
            app.stop()
        log = (topo.run_dir / "vnic-host.log").read_text(errors="replace")
        assert "AddressSanitizer" not in log and "runtime error" not in log, log[-4000:]
        assert _child_pid(topo) == host, "the device host died and was restarted:\n" + log[-4000:]
        assert echoed["ok"] == 1500 and echoed["mismatched"] == 0, echoed
        assert sent >= 2900 and again["ok"] == 100, (sent, again)
        assert status["device"]["fast"]["module"] == "vdev.fast._vfast_asan", status["device"]["fast"]
        assert "_vfast_asan" in Path(f"/proc/{host}/maps").read_text(), "the host did not load the sanitized build"
        assert status["device"]["fast"]["rx_frames"] >= 1500, status["device"]["fast"]
        # The hostile frames went through the sanitized C parser before it handed them back
        # (most of them: the kernel may drop some on the way to the tap under load).
        assert sum(status["device"]["fast"]["to_model"].values()) >= 1000, status["device"]["fast"]
    finally:
        kernelctl(topo.tag, "down", "--purge", check=False)
        assert leftovers(topo) == []
