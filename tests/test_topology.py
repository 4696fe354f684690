"""kernelctl.topology: name checks without root; real namespaces, links and traffic with
root, each test on its own tagged instance, removed in the fixture even on failure."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from pyroute2 import IPRoute, netns

from kernelctl import topology
from kernelctl.names import Topology
from kernelctl.names import topology as topology_names
from tests.conftest import unique_tag

IFF_UP = 0x1
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.mark.parametrize(
    "change",
    [
        {"client_netns": "../etc"},
        {"client_netns": "arx/h3"},
        {"client_netns": ""},
        {"linux_netns": "arx-h3q-net", "client_netns": "arx-h3q-net"},
        {"tap": "vnic-with-a-far-too-long-name"},
        {"bridge": "arx br"},
        {"ifb": "vnich3q"},  # the same name as the tap
    ],
)
def test_bad_names_are_refused_before_anything_is_touched(change: dict[str, Any]) -> None:
    topo = dataclasses.replace(topology_names("h3q"), **change)
    for call in (topology.build, topology.destroy, topology.exists):
        with pytest.raises(ValueError):
            call(topo)


@pytest.mark.parametrize("argv", [[], "ping", ["ping", 3], b"ls"])
def test_run_in_netns_refuses_bad_argv(argv: object) -> None:
    with pytest.raises(ValueError):
        topology.run_in_netns("arx-h3q-net", argv)  # type: ignore[arg-type]


def test_enter_netns_refuses_bad_or_missing_names() -> None:
    with pytest.raises(ValueError):
        topology.enter_netns("/proc/1/ns/net")
    with pytest.raises(topology.TopologyError):
        topology.enter_netns("arx-h3q-absent")
    assert "arx-h3q-absent" not in netns.listnetns()  # and it was not created either


def _fresh() -> Iterator[Topology]:
    # A tag of its own, so a suite running beside this one never shares these namespaces;
    # what an interrupted earlier run left is purged by conftest at the start of the suite.
    topo = topology_names(unique_tag())
    try:
        yield topo
    finally:
        topology.destroy(topo)


@pytest.fixture
def topo_a() -> Iterator[Topology]:
    yield from _fresh()


@pytest.fixture
def topo_b() -> Iterator[Topology]:
    yield from _fresh()


def _links(ns: str) -> dict[str, object]:
    with IPRoute(netns=ns, flags=0) as ipr:
        return {str(link.get("ifname")): link for link in ipr.get_links()}


def _addresses(ns: str, ifname: str) -> set[str]:
    with IPRoute(netns=ns, flags=0) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        return {f"{a.get('address')}/{a.get('prefixlen')}" for a in ipr.addr("dump", index=index)}


def _ping(topo: Topology, address: str) -> int:
    proc = topology.run_in_netns(
        topo.client_netns,
        ["ping", "-c", "1", "-W", "2", address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc.wait(timeout=10)


def _check_full(topo: Topology) -> None:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert topo.client_netns in listed.stdout and topo.linux_netns in listed.stdout

    client = _links(topo.client_netns)
    for name in ("lo", topo.bridge, topo.tap, topo.veth_bridge_side, topo.ifb):
        assert name in client, name
        assert client[name]["flags"] & IFF_UP, f"{name} is down"  # type: ignore[index]
    bridge_index = client[topo.bridge]["index"]  # type: ignore[index]
    for port in (topo.tap, topo.veth_bridge_side):
        assert client[port].get("master") == bridge_index, port  # type: ignore[attr-defined]
    bridge_data = client[topo.bridge].get(("linkinfo", "data"))  # type: ignore[attr-defined]
    assert bridge_data.get("IFLA_BR_STP_STATE") == 0
    assert bridge_data.get("IFLA_BR_FORWARD_DELAY") == 0
    tap_data = client[topo.tap].get(("linkinfo", "data"))  # type: ignore[attr-defined]
    assert tap_data.get("IFLA_TUN_TYPE") == 2  # tap, not tun
    assert tap_data.get("IFLA_TUN_MULTI_QUEUE") == 1
    assert tap_data.get("IFLA_TUN_PI") == 0
    assert tap_data.get("IFLA_TUN_PERSIST") == 1
    assert tap_data.get("IFLA_TUN_OWNER") == 0
    assert client[topo.ifb].get(("linkinfo", "kind")) == "ifb"  # type: ignore[attr-defined]
    assert topo.veth_linux_side not in client
    # IPv6 address generation is off on every link we made: no link-local addresses.
    assert _addresses(topo.client_netns, topo.bridge) == {f"{topo.client_ip}/{topo.subnet_prefix}"}
    for name in (topo.tap, topo.veth_bridge_side, topo.ifb):
        assert _addresses(topo.client_netns, name) == set(), name

    linux = _links(topo.linux_netns)
    for name in ("lo", topo.veth_linux_side):
        assert linux[name]["flags"] & IFF_UP, f"{name} is down"  # type: ignore[index]
    assert _addresses(topo.linux_netns, topo.veth_linux_side) == {
        f"{topo.linux_ip}/{topo.subnet_prefix}"
    }

    shown = subprocess.run(
        ["ip", "-n", topo.client_netns, "link"], capture_output=True, text=True, check=True
    ).stdout
    for name in (topo.bridge, topo.tap, topo.veth_bridge_side, topo.ifb):
        assert name in shown
    assert topology.exists(topo)


@needs_root
def test_build_twice_gives_the_full_topology(topo_a: Topology) -> None:
    assert not topology.exists(topo_a)
    topology.build(topo_a)
    topology.build(topo_a)
    _check_full(topo_a)
    assert _ping(topo_a, topo_a.linux_ip) == 0


@needs_root
def test_build_repairs_a_half_built_topology(topo_a: Topology) -> None:
    topology.build(topo_a)
    with IPRoute(netns=topo_a.client_netns, flags=0) as ipr:
        for name in (topo_a.veth_bridge_side, topo_a.ifb):
            ipr.link("del", index=ipr.link_lookup(ifname=name)[0])
        bridge = ipr.link_lookup(ifname=topo_a.bridge)[0]
        ipr.addr("del", index=bridge, address=topo_a.client_ip, prefixlen=topo_a.subnet_prefix)
        ipr.link("set", index=bridge, state="down")
        # A single-queue tap of the right name would make every device host attach fail.
        ipr.link("del", index=ipr.link_lookup(ifname=topo_a.tap)[0])
        ipr.link("add", ifname=topo_a.tap, kind="tuntap", mode="tap", ifr={"no_pi": 1})
    assert not topology.exists(topo_a)
    topology.build(topo_a)
    _check_full(topo_a)
    assert _ping(topo_a, topo_a.linux_ip) == 0


@needs_root
def test_build_recreates_a_missing_namespace(topo_a: Topology) -> None:
    topology.build(topo_a)
    netns.remove(topo_a.linux_netns)  # the veth's peer goes with it
    topology.build(topo_a)
    _check_full(topo_a)
    assert _ping(topo_a, topo_a.linux_ip) == 0


@needs_root
def test_destroy_leaves_nothing_and_can_repeat(topo_a: Topology) -> None:
    topology.build(topo_a)
    with IPRoute() as ipr:  # a stray link of ours in the root namespace
        ipr.link("add", ifname=topo_a.ifb, kind="ifb")
    topology.destroy(topo_a)
    topology.destroy(topo_a)
    present = netns.listnetns()
    assert topo_a.client_netns not in present and topo_a.linux_netns not in present
    with IPRoute() as ipr:
        for name in topo_a.link_names:
            assert not ipr.link_lookup(ifname=name), name
    assert not topology.exists(topo_a)


_ATTACH_QUEUES = """
import fcntl, os, struct, sys
from kernelctl.topology import enter_netns
enter_netns(sys.argv[1])
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
flags = 0x0002 | 0x1000 | 0x0100  # IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE
fds = [os.open("/dev/net/tun", os.O_RDWR) for _ in range(2)]
for fd in fds:
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", sys.argv[2].encode(), flags))
print("attached", flush=True)
sys.stdin.read()
"""


@needs_root
def test_a_device_host_can_attach_two_queues_from_inside_the_namespace(
    topo_a: Topology,
) -> None:
    topology.build(topo_a)
    host = subprocess.Popen(
        [sys.executable, "-c", _ATTACH_QUEUES, topo_a.client_netns, topo_a.tap],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert host.stdout is not None
        assert host.stdout.readline().strip() == "attached"
        tap = _links(topo_a.client_netns)[topo_a.tap]
        assert tap.get(("linkinfo", "data")).get("IFLA_TUN_NUM_QUEUES") == 2  # type: ignore[attr-defined]
    finally:
        host.kill()
        host.wait(timeout=10)


@needs_root
def test_two_topologies_coexist(topo_a: Topology, topo_b: Topology) -> None:
    topology.build(topo_a)
    topology.build(topo_b)
    _check_full(topo_a)
    _check_full(topo_b)
    # Same addresses in both: only namespaces keep them apart.
    assert _ping(topo_a, topo_a.linux_ip) == 0
    assert _ping(topo_b, topo_b.linux_ip) == 0
    topology.destroy(topo_a)
    assert not topology.exists(topo_a)
    _check_full(topo_b)
    assert _ping(topo_b, topo_b.linux_ip) == 0
