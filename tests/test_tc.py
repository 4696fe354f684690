"""kernelctl.tc: argument checks and u32 keys without root; with root, real HTB classes on
a tagged topology (removed in the fixture even on failure) and real frames counted in them."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyroute2 import netns

from kernelctl import tc, topology
from kernelctl.names import Topology
from kernelctl.names import topology as topology_names
from tests.conftest import unique_tag

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
ABSENT = topology_names("h3z")  # never built: argument errors must come before any I/O


@pytest.mark.parametrize(
    ("direction", "proto", "port", "expected"),
    [
        ("rx", 17, 5001, ["0x05000000/0x0f000000+0", "0x00110000/0x00ff0000+8",
                          "0x0a0a0002/0xffffffff+16", "0x00001389/0x0000ffff+20"]),
        ("tx", 17, 5001, ["0x05000000/0x0f000000+0", "0x00110000/0x00ff0000+8",
                          "0x0a0a0002/0xffffffff+12", "0x13890000/0xffff0000+20"]),
        ("rx", 6, 0, ["0x05000000/0x0f000000+0", "0x00060000/0x00ff0000+8",
                      "0x0a0a0002/0xffffffff+16"]),
        ("tx", 1, 0, ["0x05000000/0x0f000000+0", "0x00010000/0x00ff0000+8",
                      "0x0a0a0002/0xffffffff+12"]),
        ("rx", 6, 65535, ["0x05000000/0x0f000000+0", "0x00060000/0x00ff0000+8",
                          "0x0a0a0002/0xffffffff+16", "0x0000ffff/0x0000ffff+20"]),
    ],
)
def test_match_keys(direction: tc.Direction, proto: int, port: int, expected: list[str]) -> None:
    assert tc._match_keys(direction, "10.10.0.2", proto, port) == expected


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"minor": 0}, "minor"),
        ({"minor": 0xFFFF}, "minor"),
        ({"minor": True}, "minor"),
        ({"minor": 1.5}, "minor"),
        ({"direction": "up"}, "direction"),
        ({"rate_bps": 0}, "rate_bps"),
        ({"rate_bps": 7_999}, "rate_bps"),
        ({"rate_bps": 10**13}, "rate_bps"),
        ({"rate_bps": 1e6}, "rate_bps"),
        ({"ip": "10.10.0.256"}, "IPv4"),
        ({"ip": "fe80::1"}, "IPv4"),
        ({"ip": "ten"}, "IPv4"),
        ({"ip": 167772162}, "IPv4"),
        ({"proto": 0}, "proto"),
        ({"proto": 256}, "proto"),
        ({"port": -1}, "port"),
        ({"port": 65536}, "port"),
        ({"proto": 1, "port": 7}, "no ports"),
        ({"burst_bytes": 100}, "burst_bytes"),
        ({"rate_bps": 8_000, "burst_bytes": 61_000}, "60 s"),
    ],
)
def test_set_rate_refuses_bad_arguments_before_any_io(kwargs: dict[str, object], fragment: str) -> None:
    args: dict[str, object] = {
        "minor": 5, "direction": "rx", "rate_bps": 1_000_000,
        "ip": "10.10.0.2", "proto": 17, "port": 5001,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=fragment):
        tc.set_rate(ABSENT, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("minor", [0, 0x10000, -3])
def test_remove_rate_refuses_bad_minor(minor: int) -> None:
    with pytest.raises(ValueError):
        tc.remove_rate(ABSENT, minor)
    with pytest.raises(ValueError):
        tc.remove_rate(ABSENT, 5, "both")  # type: ignore[arg-type]


def test_a_topology_that_is_not_built_is_a_tc_error() -> None:
    for call in (tc.ensure_roots, tc.list_classes):
        with pytest.raises(tc.TcError):
            call(ABSENT)
    tc.teardown(ABSENT)  # nothing to tear down is not an error


@given(
    ip=st.one_of(st.text(max_size=20), st.integers(), st.none()),
    proto=st.integers(-5, 300),
    port=st.integers(-5, 70_000),
    direction=st.sampled_from(["rx", "tx", "", "RX"]),
)
def test_match_keys_raise_only_value_error(ip: object, proto: int, port: int, direction: str) -> None:
    try:
        keys = tc._match_keys(direction, ip, proto, port)  # type: ignore[arg-type]
    except ValueError:
        return
    assert 3 <= len(keys) <= 4
    assert all(re.fullmatch(r"0x[0-9a-f]{8}/0x[0-9a-f]{8}\+\d+", key) for key in keys)


def test_filter_info_puts_priority_high_and_the_ethertype_in_network_order() -> None:
    assert tc._filter_info(5, 0x0800) == (5 << 16) | 0x0008
    assert tc._filter_info(0xFFFE, 0x0003) == (0xFFFE << 16) | 0x0300


def test_describe_missing() -> None:
    everything = dict.fromkeys(tc.CAPABILITY_NAMES, True)
    assert "every probed feature is present" in tc.describe_missing(everything)

    this_kernel = everything | {"flower": False, "gact": False, "skbedit": False, "netem": False}
    text = tc.describe_missing(this_kernel)
    for word in ("flower", "gact", "skbedit", "netem", "mirroring works"):
        assert word in text
    assert "htb" not in text.split(";")[0]

    no_ifb = everything | {"ifb": False}
    text = tc.describe_missing(no_ifb)
    assert "cannot be mirrored" in text and "ifb" in text
    assert "cannot be mirrored" in tc.describe_missing({})  # nothing known: all missing


def test_class_stats_as_dict() -> None:
    stats = tc.ClassStats(minor=5, direction="rx", rate_bps=8_000, bytes=1, packets=2, drops=3)
    assert stats.as_dict() == {
        "minor": 5, "direction": "rx", "rate_bps": 8_000, "bytes": 1, "packets": 2, "drops": 3,
    }


def _kernel_config() -> str | None:
    try:
        return gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()
    except OSError:
        return None


@needs_root
def test_capabilities_on_this_kernel() -> None:
    # Only probe namespaces of this process: a suite running beside this one makes others.
    def probes() -> set[str]:
        return {name for name in netns.listnetns() if name.startswith(f"arx-tccap-{os.getpid()}-")}

    assert probes() == set()
    caps = tc.capabilities()
    assert set(caps) == set(tc.CAPABILITY_NAMES)
    for name in tc.REQUIRED_CAPABILITIES:
        assert caps[name], name
    config = _kernel_config()
    if config is None:
        pytest.skip("no /proc/config.gz to compare the optional features with")
    for name, option in (
        ("flower", "NET_CLS_FLOWER"), ("gact", "NET_ACT_GACT"),
        ("skbedit", "NET_ACT_SKBEDIT"), ("netem", "NET_SCH_NETEM"), ("tbf", "NET_SCH_TBF"),
    ):
        built = re.search(rf"^CONFIG_{option}=[ym]$", config, re.MULTILINE) is not None
        assert caps[name] == built, name
    assert probes() == set()  # the probe namespace is gone


@pytest.fixture
def topo() -> Iterator[Topology]:
    instance = topology_names(unique_tag())
    try:
        topology.build(instance)
        tc.ensure_roots(instance)
        yield instance
    finally:
        topology.destroy(instance)


def _tc_show(topo: Topology, *what: str) -> str:
    return subprocess.run(
        ["tc", "-n", topo.client_netns, "-s", *what],
        capture_output=True, text=True, check=True,
    ).stdout


def _classes(topo: Topology) -> dict[tuple[str, int], tc.ClassStats]:
    return {(c.direction, c.minor): c for c in tc.list_classes(topo)}


def _classes_when(topo: Topology, ready: Callable[[dict[tuple[str, int], tc.ClassStats]], bool],
                  timeout: float = 20.0) -> dict[tuple[str, int], tc.ClassStats]:
    """The classes once ``ready`` holds for them (the kernel accounts asynchronously);
    the last reading when the deadline passes, for the caller's asserts to explain."""
    deadline = time.monotonic() + timeout
    while True:
        found = _classes(topo)
        if ready(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


@needs_root
def test_set_rate_shows_in_tc_and_can_change(topo: Topology) -> None:
    tc.set_rate(topo, 5, "rx", 2_000_000, topo.vnic_ip, 17, 5001)
    tc.set_rate(topo, 6, "tx", 1_000_000, topo.vnic_ip, 6, 80)
    assert re.search(r"class htb 1:5 .*rate 2Mbit ceil 2Mbit", _tc_show(topo, "class", "show", "dev", topo.tap))
    assert re.search(r"class htb 1:6 .*rate 1Mbit ceil 1Mbit", _tc_show(topo, "class", "show", "dev", topo.ifb))
    filters = _tc_show(topo, "filter", "show", "dev", topo.tap)
    assert "flowid 1:5" in filters and "0a0a0002/ffffffff at 16" in filters
    assert "13890000/ffff0000 at 22" in filters  # destination port 5001

    # Change the rate and the match of the same class: both must take effect.
    tc.set_rate(topo, 5, "rx", 3_000_000, topo.vnic_ip, 17, 7000)
    classes = _classes(topo)
    assert set(classes) == {("rx", 5), ("tx", 6)}
    assert classes["rx", 5].rate_bps == 3_000_000
    assert classes["tx", 6].rate_bps == 1_000_000
    filters = _tc_show(topo, "filter", "show", "dev", topo.tap)
    assert "1b580000/ffff0000 at 22" in filters  # 7000
    assert "13890000" not in filters
    assert filters.count("flowid 1:5") == 1


@needs_root
def test_ensure_roots_again_keeps_classes_and_the_redirect(topo: Topology) -> None:
    tc.set_rate(topo, 9, "rx", 1_000_000, topo.vnic_ip, 17, 9)
    tc.ensure_roots(topo)
    assert set(_classes(topo)) == {("rx", 9)}
    ingress = _tc_show(topo, "filter", "show", "dev", topo.tap, "ingress")
    assert ingress.count(f"Egress Redirect to device {topo.ifb}") == 1


@needs_root
def test_set_rate_needs_roots(topo: Topology) -> None:
    tc.teardown(topo)
    with pytest.raises(tc.TcError, match="ensure_roots"):
        tc.set_rate(topo, 5, "rx", 1_000_000, topo.vnic_ip, 17, 5001)


@needs_root
def test_remove_rate(topo: Topology) -> None:
    tc.set_rate(topo, 5, "rx", 1_000_000, topo.vnic_ip, 17, 5001)
    tc.set_rate(topo, 5, "tx", 1_000_000, topo.vnic_ip, 17, 5001)
    tc.set_rate(topo, 7, "rx", 1_000_000, topo.vnic_ip, 17, 5002)
    tc.set_rate(topo, 7, "tx", 1_000_000, topo.vnic_ip, 17, 5002)
    tc.remove_rate(topo, 7, "tx")
    assert set(_classes(topo)) == {("rx", 5), ("tx", 5), ("rx", 7)}
    tc.remove_rate(topo, 5)
    tc.remove_rate(topo, 5)  # already gone: nothing happens
    assert set(_classes(topo)) == {("rx", 7)}
    assert "flowid 1:5" not in _tc_show(topo, "filter", "show", "dev", topo.tap)
    assert "flowid 1:5" not in _tc_show(topo, "filter", "show", "dev", topo.ifb)
    assert "1:5" not in _tc_show(topo, "class", "show", "dev", topo.tap)


@needs_root
def test_teardown_restores_default_qdiscs(topo: Topology) -> None:
    tc.set_rate(topo, 5, "rx", 1_000_000, topo.vnic_ip, 17, 5001)
    tc.teardown(topo)
    tc.teardown(topo)
    for dev in (topo.tap, topo.ifb):
        shown = _tc_show(topo, "qdisc", "show", "dev", dev)
        assert "htb" not in shown and "ingress" not in shown
    assert tc.list_classes(topo) == []


# Runs inside the client namespace as the device host would: attaches a queue of the
# multi-queue tap, then either sends UDP datagrams toward the vNIC address and counts
# what arrives on the queue ("rx"), or writes frames from the vNIC address into the tap
# ("tx"). Prints a JSON result.
_TRAFFIC = r"""
import fcntl, json, os, select, socket, struct, subprocess, sys, time
tap, mode, src_ip, dst_ip, port, count = sys.argv[1:7]
port, count = int(port), int(count)
fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", tap.encode(), 0x0002 | 0x1000 | 0x0100))
payload = bytes(32)
if mode == "rx":
    # Attaching the queue raises the tap's carrier, but the bridge learns of it through
    # the kernel's link-watch work, up to a second later: until its port forwards, a
    # flooded frame skips the tap and is lost. Wait for that state, not for a guess.
    deadline = time.monotonic() + 20
    while True:
        shown = json.loads(subprocess.run(["ip", "-j", "-d", "link", "show", "dev", tap],
                                          capture_output=True, text=True, check=True).stdout)[0]
        port_state = shown.get("linkinfo", {}).get("info_slave_data", {}).get("state")
        if port_state == "forwarding" and shown.get("operstate") == "UP":
            break
        if time.monotonic() > deadline:
            sys.exit(f"the bridge port {tap} never forwarded: {shown}")
        time.sleep(0.01)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(count):
        sock.sendto(payload, (dst_ip, port))
        sock.sendto(payload, (dst_ip, port + 1))  # another function's port: not counted
    seen = 0
    deadline = time.monotonic() + 20  # a loaded machine; the loop ends at the count
    while seen < count and time.monotonic() < deadline:
        if not select.select([fd], [], [], 0.2)[0]:
            continue
        frame = os.read(fd, 65536)
        if len(frame) >= 38 and frame[12:14] == b"\x08\x00" and frame[23] == 17:
            if struct.unpack_from("!H", frame, 36)[0] == port:
                seen += 1
    print(json.dumps({"seen": seen}))
else:
    def checksum(data):
        total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        return ~total & 0xFFFF
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + len(payload), 1, 0, 64, 17, 0,
                         socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    udp = struct.pack("!HHHH", port, 9, 8 + len(payload), 0) + payload
    frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x02" + b"\x08\x00" + header + udp
    for _ in range(count):
        os.write(fd, frame)
    print(json.dumps({"written": count}))
"""
FRAME_BYTES = 14 + 20 + 8 + 32


def _traffic(topo: Topology, mode: str, src: str, dst: str, port: int, count: int) -> dict[str, int]:
    proc = topology.run_in_netns(
        topo.client_netns,
        [sys.executable, "-c", _TRAFFIC, topo.tap, mode, src, dst, str(port), str(count)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    result: dict[str, int] = json.loads(out)
    return result


@needs_root
def test_traffic_toward_the_app_is_counted_in_its_class(topo: Topology) -> None:
    # Without ARP from a device host, a permanent neighbour entry lets the stack send
    # to the vNIC address; the bridge floods the unknown MAC out of the tap.
    subprocess.run(
        ["ip", "-n", topo.client_netns, "neigh", "replace", topo.vnic_ip,
         "lladdr", "02:00:00:00:00:02", "dev", topo.bridge, "nud", "permanent"],
        check=True,
    )
    tc.set_rate(topo, 5, "rx", 8_000_000, topo.vnic_ip, 17, 5001)
    tc.set_rate(topo, 6, "tx", 8_000_000, topo.vnic_ip, 17, 5001)
    result = _traffic(topo, "rx", topo.client_ip, topo.vnic_ip, 5001, 5)
    assert result["seen"] == 5
    classes = _classes(topo)
    assert classes["rx", 5].packets == 5
    assert classes["rx", 5].bytes == 5 * FRAME_BYTES
    assert classes["rx", 5].drops == 0
    assert classes["tx", 6].packets == 0  # the other direction saw none of it


@needs_root
def test_traffic_from_the_app_is_redirected_to_the_ifb_and_counted(topo: Topology) -> None:
    tc.set_rate(topo, 5, "rx", 8_000_000, topo.vnic_ip, 17, 5001)
    tc.set_rate(topo, 6, "tx", 8_000_000, topo.vnic_ip, 17, 5001)
    tc.set_rate(topo, 7, "tx", 8_000_000, topo.vnic_ip, 17, 6000)
    assert _traffic(topo, "tx", topo.vnic_ip, topo.client_ip, 5001, 4)["written"] == 4
    # A frame written into the tap reaches the ifb's classes from a softirq and the ifb's
    # own queue, after the write returned: wait for the count, then check nothing else.
    classes = _classes_when(topo, lambda found: ("tx", 6) in found and found["tx", 6].packets >= 4)
    assert classes["tx", 6].packets == 4
    assert classes["tx", 6].bytes == 4 * FRAME_BYTES
    assert classes["tx", 7].packets == 0
    assert classes["rx", 5].packets == 0
