"""Build and tear down the Linux side of one topology instance (DESIGN.md section 2).

This is the only module that drives pyroute2 for namespaces and links; the rest of
kernelctl calls the few typed functions below, so it can be tested with a fake.

What :func:`build` makes, for an instance ``topo`` (names from :mod:`kernelctl.names`)::

    netns topo.client_netns                       netns topo.linux_netns
      lo (up)                                       lo (up)
      bridge topo.bridge, topo.client_ip/prefix     topo.veth_linux_side,
        +-- tap topo.tap (multi-queue, no PI)         topo.linux_ip/prefix
        +-- veth topo.veth_bridge_side  <------------>  (the veth's peer)
      ifb topo.ifb (tc redirects the tap's ingress here)

Every step first looks at what is there and only adds what is missing, or replaces what
has the wrong kind, so a second call, or a call after a crash half-way, ends in the same
state. The links get IPv6 address generation mode "none" before they go up: without a
link-local address the kernel sends no DAD, router solicitation or MLD traffic of its
own on them, so packet counters in tests see only what the test sent.
"""

from __future__ import annotations

import errno
import re
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from kernelctl.names import Topology

__all__ = [
    "TopologyError",
    "build",
    "destroy",
    "enter_netns",
    "exists",
    "run_in_netns",
]


class TopologyError(RuntimeError):
    """A namespace or link could not be created, inspected or removed."""


# A netns name becomes a file name under /run/netns; pyroute2 would take a name with a
# slash for a path, so anything but a plain file name is refused.
_NETNS_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
# IFNAMSIZ is 16 including the terminating NUL (include/uapi/linux/if.h).
_IFNAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$")

_IN6_ADDR_GEN_MODE_NONE = 1  # include/uapi/linux/if_link.h, enum in6_addr_gen_mode
_IFLA_TUN_TYPE_TAP = 2  # IFF_TAP as reported in IFLA_TUN_TYPE
_IFF_UP = 0x1
# The ifb driver starts with a 32-packet queue; the HTB leaves tc puts on it inherit
# that as their pfifo limit, which drops bursts long before the rate limit is reached.
_IFB_TXQUEUELEN = 1000
_ROOT_UID = 0


def _check_netns_name(name: str) -> None:
    if not isinstance(name, str) or not _NETNS_NAME.match(name):
        raise ValueError(f"invalid network namespace name {name!r}")


def _check_names(topo: Topology) -> None:
    _check_netns_name(topo.client_netns)
    _check_netns_name(topo.linux_netns)
    if topo.client_netns == topo.linux_netns:
        raise ValueError("client and linux namespaces must differ")
    for ifname in topo.link_names:
        if not isinstance(ifname, str) or not _IFNAME.match(ifname):
            raise ValueError(f"invalid interface name {ifname!r}")
    if len(set(topo.link_names)) != len(topo.link_names):
        raise ValueError(f"interface names must be distinct: {topo.link_names}")


@contextmanager
def _step(what: str) -> Iterator[None]:
    """Turn pyroute2's and the OS's errors into one exception type with context."""
    try:
        yield
    except (NetlinkError, OSError) as err:
        raise TopologyError(f"{what}: {err}") from err


def _open_netns(name: str) -> IPRoute:
    # flags=0: never let pyroute2 create a namespace as a side effect of opening it.
    return IPRoute(netns=name, flags=0)


def _ensure_netns(name: str) -> None:
    if name in netns.listnetns():
        return
    try:
        netns.create(name)
    except FileExistsError:
        pass  # created by a concurrent build: same end state


def _lookup(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _get_link(ipr: IPRoute, index: int) -> Any:
    return ipr.link("get", index=index)[0]


def _link_kind(msg: Any) -> str | None:
    kind = msg.get(("linkinfo", "kind"))
    return str(kind) if kind is not None else None


def _delete_link(ipr: IPRoute, ifname: str) -> None:
    index = _lookup(ipr, ifname)
    if index is None:
        return
    try:
        ipr.link("del", index=index)
    except NetlinkError as err:
        if err.code != errno.ENODEV:
            raise


def _quiet_ipv6(ipr: IPRoute, index: int) -> None:
    ipr.link(
        "set",
        index=index,
        IFLA_AF_SPEC={
            "attrs": [
                ("AF_INET6", {"attrs": [("IFLA_INET6_ADDR_GEN_MODE", _IN6_ADDR_GEN_MODE_NONE)]})
            ]
        },
    )


def _ensure_kind(ipr: IPRoute, ifname: str, kind: str, **create: Any) -> int:
    """The index of ``ifname``, created (or re-created, if of another kind) as ``kind``."""
    index = _lookup(ipr, ifname)
    if index is not None and _link_kind(_get_link(ipr, index)) != kind:
        _delete_link(ipr, ifname)
        index = None
    if index is None:
        ipr.link("add", ifname=ifname, kind=kind, **create)
        index = _lookup(ipr, ifname)
        if index is None:
            raise TopologyError(f"{ifname} vanished right after it was created")
        _quiet_ipv6(ipr, index)
    return index


def _ensure_address(ipr: IPRoute, index: int, address: str, prefixlen: int) -> None:
    present = {
        (msg.get("address"), msg.get("prefixlen"))
        for msg in ipr.addr("dump", index=index)
    }
    if (address, prefixlen) in present:
        return
    try:
        ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
    except NetlinkError as err:
        if err.code != errno.EEXIST:
            raise


def _set_up(ipr: IPRoute, index: int, **extra: Any) -> None:
    ipr.link("set", index=index, state="up", **extra)


def _tap_is_right(msg: Any) -> bool:
    """Whether an existing tun device is the persistent multi-queue tap we need."""
    if _link_kind(msg) != "tun":
        return False
    data = msg.get(("linkinfo", "data"))
    if data is None:
        return False
    return bool(
        data.get("IFLA_TUN_TYPE") == _IFLA_TUN_TYPE_TAP
        and data.get("IFLA_TUN_MULTI_QUEUE") == 1
        and data.get("IFLA_TUN_PI") == 0
        and data.get("IFLA_TUN_PERSIST") == 1
        and data.get("IFLA_TUN_OWNER") == _ROOT_UID
    )


def _ensure_tap(ipr: IPRoute, ifname: str) -> int:
    index = _lookup(ipr, ifname)
    if index is not None and not _tap_is_right(_get_link(ipr, index)):
        _delete_link(ipr, ifname)
        index = None
    if index is None:
        # A tap cannot be made over rtnetlink; pyroute2 forks a helper into the netns
        # that opens /dev/net/tun and issues TUNSETIFF, TUNSETOWNER and TUNSETPERSIST.
        # IFF_MULTI_QUEUE must be set now: a device host's TUNSETIFF with
        # IFF_MULTI_QUEUE is refused (EINVAL) on a single-queue device.
        ipr.link(
            "add",
            ifname=ifname,
            kind="tuntap",
            mode="tap",
            uid=_ROOT_UID,
            ifr={"no_pi": 1, "multi_queue": 1},
        )
        index = _lookup(ipr, ifname)
        if index is None:
            raise TopologyError(f"{ifname} vanished right after it was created")
        _quiet_ipv6(ipr, index)
    return index


def _ensure_veth(ipr: IPRoute, topo: Topology) -> int:
    """The bridge side's index; its peer ends up in the linux namespace."""
    bridge_side = _lookup(ipr, topo.veth_bridge_side)
    if bridge_side is not None and _link_kind(_get_link(ipr, bridge_side)) != "veth":
        _delete_link(ipr, topo.veth_bridge_side)
        bridge_side = None
    stray_peer = _lookup(ipr, topo.veth_linux_side)
    if bridge_side is not None and stray_peer is None:
        # A pair whose peer is in neither namespace is half dead: when the linux namespace is
        # deleted, the kernel removes the peer and then the bridge side in a deferred cleanup,
        # so for a while the bridge side outlives its peer. Start the pair afresh.
        with _open_netns(topo.linux_netns) as linux:
            peer_in_place = _lookup(linux, topo.veth_linux_side) is not None
        if not peer_in_place:
            _delete_link(ipr, topo.veth_bridge_side)
            bridge_side = None
    if bridge_side is None:
        if stray_peer is not None:
            _delete_link(ipr, topo.veth_linux_side)
        with _open_netns(topo.linux_netns) as linux:
            # A leftover of the same name in the linux netns would make the pair's
            # creation fail; deleting it there is part of "ends in the same state".
            _delete_link(linux, topo.veth_linux_side)
        # Creating the peer directly inside the other namespace is atomic: no moment
        # where both ends sit in the client namespace.
        ipr.link(
            "add",
            ifname=topo.veth_bridge_side,
            kind="veth",
            peer={"ifname": topo.veth_linux_side, "net_ns_fd": topo.linux_netns},
        )
        bridge_side = _lookup(ipr, topo.veth_bridge_side)
        if bridge_side is None:
            raise TopologyError(f"{topo.veth_bridge_side} vanished right after it was created")
        _quiet_ipv6(ipr, bridge_side)
    elif stray_peer is not None:
        ipr.link("set", index=stray_peer, net_ns_fd=topo.linux_netns)
    return bridge_side


def build(topo: Topology) -> None:
    """Create whatever of ``topo`` is missing; idempotent (see the module docstring)."""
    _check_names(topo)
    with _step(f"create namespaces {topo.client_netns}, {topo.linux_netns}"):
        _ensure_netns(topo.client_netns)
        _ensure_netns(topo.linux_netns)

    with _step(f"configure {topo.client_netns}"), _open_netns(topo.client_netns) as ipr:
        loopback = _lookup(ipr, "lo")
        if loopback is None:
            raise TopologyError(f"{topo.client_netns} has no loopback")
        _set_up(ipr, loopback)

        # STP off and forward delay 0: a new port forwards at once instead of spending
        # 2 x 15 s in listening/learning (IEEE 802.1D port states).
        bridge = _ensure_kind(ipr, topo.bridge, "bridge", br_stp_state=0, br_forward_delay=0)
        ipr.link("set", index=bridge, kind="bridge", br_stp_state=0, br_forward_delay=0)
        _ensure_address(ipr, bridge, topo.client_ip, topo.subnet_prefix)
        _set_up(ipr, bridge)

        tap = _ensure_tap(ipr, topo.tap)
        _set_up(ipr, tap, master=bridge)

        bridge_side = _ensure_veth(ipr, topo)
        _set_up(ipr, bridge_side, master=bridge)

        ifb = _ensure_kind(ipr, topo.ifb, "ifb")
        _set_up(ipr, ifb, txqlen=_IFB_TXQUEUELEN)

    with _step(f"configure {topo.linux_netns}"), _open_netns(topo.linux_netns) as ipr:
        loopback = _lookup(ipr, "lo")
        if loopback is None:
            raise TopologyError(f"{topo.linux_netns} has no loopback")
        _set_up(ipr, loopback)
        linux_side = _lookup(ipr, topo.veth_linux_side)
        if linux_side is None:
            raise TopologyError(f"{topo.veth_linux_side} is missing from {topo.linux_netns}")
        # The peer was created in this namespace, where _ensure_veth could not reach it.
        _quiet_ipv6(ipr, linux_side)
        _ensure_address(ipr, linux_side, topo.linux_ip, topo.subnet_prefix)
        _set_up(ipr, linux_side)


def _links_present(name: str, ifnames: Sequence[str]) -> bool:
    with _open_netns(name) as ipr:
        return all(_lookup(ipr, ifname) is not None for ifname in ifnames)


def exists(topo: Topology) -> bool:
    """Whether both namespaces and every link of ``topo`` are present (not whether up)."""
    _check_names(topo)
    present = netns.listnetns()
    if topo.client_netns not in present or topo.linux_netns not in present:
        return False
    client_links = (topo.bridge, topo.tap, topo.veth_bridge_side, topo.ifb)
    try:
        with _step(f"inspect {topo.client_netns}, {topo.linux_netns}"):
            return _links_present(topo.client_netns, client_links) and _links_present(
                topo.linux_netns, (topo.veth_linux_side,)
            )
    except TopologyError as err:
        if isinstance(err.__cause__, FileNotFoundError):
            return False  # a namespace went away while we looked
        raise


def _remove_netns(name: str) -> None:
    if name not in netns.listnetns():
        return
    try:
        # Delete our links first: a process still inside the namespace (a device host)
        # would otherwise keep the namespace, and with it the tap and the addresses,
        # alive after the name is gone.
        with _open_netns(name) as ipr:
            for link in ipr.get_links():
                ifname = str(link.get("ifname"))
                if ifname != "lo":
                    _delete_link(ipr, ifname)
    except FileNotFoundError:
        pass
    try:
        netns.remove(name)
    except FileNotFoundError:
        pass


def destroy(topo: Topology) -> None:
    """Remove both namespaces and any link of ours in the root namespace; never fails
    because something is already gone."""
    _check_names(topo)
    with _step(f"remove namespaces {topo.client_netns}, {topo.linux_netns}"):
        _remove_netns(topo.client_netns)
        _remove_netns(topo.linux_netns)
    with _step("remove stray links in the root namespace"), IPRoute() as ipr:
        for ifname in topo.link_names:
            _delete_link(ipr, ifname)


def enter_netns(name: str) -> None:
    """Move the calling thread into the existing network namespace ``name``.

    For a device host (or a ``preexec_fn`` that starts one): afterwards, sockets it
    creates and the ``/dev/net/tun`` file descriptors it opens belong to that
    namespace, so ``TUNSETIFF`` with ``IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE`` finds the
    tap ``build`` made there. setns(2) moves only the calling thread: call this before
    starting any other thread; file descriptors opened earlier keep their namespace.
    Raises :class:`TopologyError` if the namespace does not exist (it is never created).
    """
    _check_netns_name(name)
    if name not in netns.listnetns():
        raise TopologyError(f"network namespace {name!r} does not exist")
    with _step(f"enter network namespace {name}"):
        netns.setns(name, flags=0)


def run_in_netns(name: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
    """Start ``argv`` inside network namespace ``name`` (via ``ip netns exec``, which also
    gives the child a /sys of that namespace). Keyword arguments go to Popen."""
    _check_netns_name(name)
    if isinstance(argv, (str, bytes)) or not argv:
        raise ValueError("argv must be a non-empty sequence of strings")
    args = list(argv)
    if not all(isinstance(arg, str) for arg in args):
        raise ValueError("argv must be a non-empty sequence of strings")
    return subprocess.Popen(["ip", "netns", "exec", name, *args], **popen_kwargs)
