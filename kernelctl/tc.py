"""Rate limits mirrored into Linux traffic control (DESIGN.md section 4, "Rate specifiers").

The device's token buckets are the limiters that count; this module mirrors each one
into tc so that ``tc -s class show`` shows every application's share. It is the only
module that drives pyroute2 for tc; the rest of kernelctl calls the typed functions below.

Directions are named from the application's side, like its rings:

* ``"rx"`` (toward the app): frames Linux sends into the tap, i.e. the tap's *egress*.
  HTB root ``1:`` on the tap, one class ``1:<minor>`` per function, chosen by a u32
  filter on IPv4 destination address, IP protocol and destination port.
* ``"tx"`` (from the app): frames the device host writes into the tap arrive on the
  tap's *ingress*, where nothing can be shaped (there is no queue there). An ingress
  qdisc with a match-all u32 filter redirects them (action mirred, egress redirect) to
  the ifb device, whose egress has HTB root ``1:`` and classes chosen by u32 on source
  address, protocol and source port. The ifb hands the frame back to the stack after its
  qdisc, as if it had just arrived on the tap.

HTB runs with ``default 0``: a frame no filter claims goes to HTB's direct queue and
passes unshaped, so kernelctl's own traffic (ARP, ICMP, RSTs) never waits behind an app.

Each class ``1:<minor>`` has its own u32 filter at priority ``minor`` (its own tcf_proto),
so one function's filter is added, replaced or removed without touching the others; the
cost is a linear walk over the priorities per frame, fine for tens of functions.
Port matches assume a 20-byte IPv4 header, as tc's own ``match ip dport`` does: a frame
with IP options or a non-first fragment is not matched and passes through unshaped.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Literal

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from kernelctl.names import Topology

__all__ = [
    "CAPABILITY_NAMES",
    "REQUIRED_CAPABILITIES",
    "ClassStats",
    "Direction",
    "TcError",
    "capabilities",
    "describe_missing",
    "ensure_roots",
    "list_classes",
    "remove_rate",
    "set_rate",
    "teardown",
]

Direction = Literal["rx", "tx"]
_DIRECTIONS: Final = ("rx", "tx")


class TcError(RuntimeError):
    """The kernel refused a tc request, or the topology's links are missing."""


@dataclass(frozen=True)
class ClassStats:
    minor: int
    direction: Direction
    rate_bps: int
    bytes: int
    packets: int
    drops: int

    def as_dict(self) -> dict[str, int | str]:
        """Plain values, for the control protocol's JSON."""
        return dataclasses.asdict(self)


CAPABILITY_NAMES: Final = (
    "htb", "tbf", "u32", "ingress", "mirred", "ifb", "flower", "gact", "skbedit", "netem",
)
# What mirroring rate limits needs; the rest would only be nice to have.
REQUIRED_CAPABILITIES: Final = ("htb", "u32", "ingress", "mirred", "ifb")

_TC_H_ROOT: Final = 0xFFFFFFFF
_TC_H_INGRESS: Final = 0xFFFFFFF1
_ROOT_MAJOR: Final = 0x1
_ROOT_HANDLE: Final = _ROOT_MAJOR << 16  # "1:"
_INGRESS_HANDLE: Final = 0xFFFF0000  # "ffff:"
_REDIRECT_PRIO: Final = 1
_ETH_P_ALL: Final = 0x0003
_ETH_P_IP: Final = 0x0800
_MAX_MINOR: Final = 0xFFFE  # 0xffff is left alone; 0 names the qdisc itself
_MIN_RATE_BPS: Final = 8_000
# HTB takes 64-bit rates; 1 Tbit/s is far above any link here and keeps the default
# burst (10 ms of the rate) inside a u32.
_MAX_RATE_BPS: Final = 10**12
# A burst must hold at least one full frame, or HTB can never send it (1514 + slack).
_MIN_BURST_BYTES: Final = 1600
# HTB stores the burst as time at the class rate in a u32 of psched ticks (64 ns);
# capping the burst at 60 s of the rate keeps it far below that field's ~270 s.
_MAX_BURST_SECONDS: Final = 60
# Default burst: 10 ms of the rate. HTB refills when a timer fires, and a timer can be
# late by a jiffy (4 ms at HZ=250); a burst shorter than that caps throughput below the
# configured rate.
_DEFAULT_BURST_DIVISOR: Final = 100
# Protocols with 16-bit source and destination ports at offsets 0 and 2 of their header.
_PORT_PROTOCOLS: Final = frozenset({6, 17, 33, 132, 136})  # TCP, UDP, DCCP, SCTP, UDP-Lite
# IPv4 header offsets (RFC 791 section 3.1), relative to the network header, which is
# where u32 counts from on both the tap and the ifb.
_IP_PROTOCOL_OFFSET: Final = 9
_IP_SRC_OFFSET: Final = 12
_IP_DST_OFFSET: Final = 16
_L4_PORTS_OFFSET: Final = 20  # with IHL = 5: the first word of TCP/UDP is sport, dport

_NOT_FOUND: Final = frozenset({errno.ENOENT, errno.ENODEV})


def _check_minor(minor: int) -> None:
    if isinstance(minor, bool) or not isinstance(minor, int) or not 1 <= minor <= _MAX_MINOR:
        raise ValueError(f"class minor must be an int in 1..{_MAX_MINOR:#x}, got {minor!r}")


def _check_direction(direction: str) -> None:
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be 'rx' or 'tx', got {direction!r}")


def _check_int(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in {low}..{high}, got {value!r}")


def _match_keys(direction: Direction, ip: str, proto: int, port: int) -> list[str]:
    """u32 keys (pyroute2's ``value/mask+offset`` strings) for one function's traffic.

    rx matches destination fields (frames toward the app), tx source fields.
    """
    _check_direction(direction)
    if not isinstance(ip, str):
        raise ValueError(f"ip must be an IPv4 address string, got {ip!r}")
    try:
        address = int(ipaddress.IPv4Address(ip))
    except ValueError as err:
        raise ValueError(f"ip must be an IPv4 address, got {ip!r}: {err}") from None
    _check_int("proto", proto, 1, 255)
    _check_int("port", port, 0, 0xFFFF)
    if port and proto not in _PORT_PROTOCOLS:
        raise ValueError(f"IP protocol {proto} has no ports; pass port=0")
    address_offset = _IP_DST_OFFSET if direction == "rx" else _IP_SRC_OFFSET
    keys = [
        # IHL = 5 (RFC 791 section 3.1): the port offsets below hold only without options.
        "0x05000000/0x0f000000+0",
        f"0x{proto << 16:08x}/0x00ff0000+{_IP_PROTOCOL_OFFSET - 1}",
        f"0x{address:08x}/0xffffffff+{address_offset}",
    ]
    if port:
        # Source port is the high half of the first transport word, destination the low.
        if direction == "rx":
            keys.append(f"0x{port:08x}/0x0000ffff+{_L4_PORTS_OFFSET}")
        else:
            keys.append(f"0x{port << 16:08x}/0xffff0000+{_L4_PORTS_OFFSET}")
    return keys


def _burst_for(rate_bytes: int, burst_bytes: int | None) -> int:
    if burst_bytes is None:
        return max(_MIN_BURST_BYTES, rate_bytes // _DEFAULT_BURST_DIVISOR)
    _check_int("burst_bytes", burst_bytes, _MIN_BURST_BYTES, 2**32 - 1)
    if burst_bytes > rate_bytes * _MAX_BURST_SECONDS:
        raise ValueError(
            f"burst of {burst_bytes} bytes takes over {_MAX_BURST_SECONDS} s at "
            f"{rate_bytes} bytes/s; HTB cannot store it"
        )
    return burst_bytes


@contextmanager
def _client_netns(topo: Topology) -> Iterator[IPRoute]:
    if topo.client_netns not in netns.listnetns():
        raise TcError(f"network namespace {topo.client_netns} does not exist")
    try:
        with IPRoute(netns=topo.client_netns, flags=0) as ipr:
            yield ipr
    except NetlinkError as err:
        raise TcError(f"tc in {topo.client_netns}: {err}") from err
    except FileNotFoundError as err:
        raise TcError(f"network namespace {topo.client_netns} vanished") from err


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise TcError(f"link {ifname} not found; build the topology first")
    return int(found[0])


def _qdisc_at(ipr: IPRoute, index: int, parent: int) -> Any | None:
    for msg in ipr.get_qdiscs(index=index):
        if msg["index"] == index and msg["parent"] == parent:
            return msg
    return None


def _ensure_htb_root(ipr: IPRoute, index: int) -> None:
    root = _qdisc_at(ipr, index, _TC_H_ROOT)
    if root is not None and root.get_attr("TCA_KIND") == "htb" and root["handle"] == _ROOT_HANDLE:
        return  # keep it: replacing would drop every class (HTB has no "change" for roots)
    ipr.tc("replace", "htb", index, _ROOT_HANDLE, default=0)


def _ensure_ingress(ipr: IPRoute, index: int) -> None:
    present = _qdisc_at(ipr, index, _TC_H_INGRESS)
    if present is not None and present.get_attr("TCA_KIND") == "ingress":
        return
    if present is not None:
        ipr.tc("del", index=index, parent=_TC_H_INGRESS, handle=present["handle"])
    ipr.tc("add", "ingress", index, _INGRESS_HANDLE)


def ensure_roots(topo: Topology) -> None:
    """Install the root qdiscs and the tap-to-ifb redirect; idempotent, keeps classes."""
    with _client_netns(topo) as ipr:
        tap = _index(ipr, topo.tap)
        ifb = _index(ipr, topo.ifb)
        _ensure_htb_root(ipr, tap)
        _ensure_htb_root(ipr, ifb)
        _ensure_ingress(ipr, tap)
        # Delete and add rather than replace: u32 ignores a new selector on replace, and
        # u32 handles are shared by every priority of a qdisc, so a fixed handle could
        # name another filter. Frames pass unshaped for the moment in between.
        _delete_filters(ipr, tap, _INGRESS_HANDLE, _REDIRECT_PRIO, _ETH_P_ALL)
        ipr.tc(
            "add-filter",
            "u32",
            tap,
            parent=_INGRESS_HANDLE,
            prio=_REDIRECT_PRIO,
            protocol=_ETH_P_ALL,
            target=_ROOT_HANDLE | 1,  # unused: the action steals every frame
            keys=["0x0/0x0+0"],
            action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": ifb},
        )


def set_rate(
    topo: Topology,
    minor: int,
    direction: Direction,
    rate_bps: int,
    ip: str,
    proto: int,
    port: int,
    *,
    burst_bytes: int | None = None,
) -> None:
    """Create or change class ``1:<minor>`` for one function and direction.

    ``rate_bps`` (bits per second, rounded down to whole bytes) is both the HTB rate and
    ceil. ``ip``/``proto``/``port`` select the traffic: destination fields for "rx",
    source fields for "tx"; ``port=0`` matches every port (and is required for protocols
    without ports). :func:`ensure_roots` must have run.
    """
    _check_minor(minor)
    _check_direction(direction)
    _check_int("rate_bps", rate_bps, _MIN_RATE_BPS, _MAX_RATE_BPS)
    keys = _match_keys(direction, ip, proto, port)
    rate_bytes = rate_bps // 8
    burst = _burst_for(rate_bytes, burst_bytes)
    classid = _ROOT_HANDLE | minor
    with _client_netns(topo) as ipr:
        dev = _index(ipr, topo.tap if direction == "rx" else topo.ifb)
        root = _qdisc_at(ipr, dev, _TC_H_ROOT)
        if root is None or root.get_attr("TCA_KIND") != "htb" or root["handle"] != _ROOT_HANDLE:
            raise TcError("no HTB root on the device; call ensure_roots first")
        ipr.tc(
            "replace-class",
            "htb",
            dev,
            classid,
            parent=_ROOT_HANDLE,
            rate=rate_bytes,
            ceil=rate_bytes,
            burst=burst,
            cburst=burst,
        )
        # See ensure_roots for why delete and add; in between, this function's frames
        # pass through unshaped.
        _delete_filters(ipr, dev, _ROOT_HANDLE, minor, _ETH_P_IP)
        ipr.tc(
            "add-filter",
            "u32",
            dev,
            parent=_ROOT_HANDLE,
            prio=minor,
            protocol=_ETH_P_IP,
            target=classid,
            keys=keys,
        )


def _filter_info(prio: int, protocol: int) -> int:
    # tcm_info of a filter: priority in the high 16 bits, ethertype (network order) low.
    return (prio << 16) | int.from_bytes(protocol.to_bytes(2, "big"), "little")


def _delete_filters(ipr: IPRoute, dev: int, parent: int, prio: int, protocol: int) -> None:
    """Delete every filter at one priority of a qdisc; none there is fine."""
    try:
        ipr.tc("del-filter", index=dev, parent=parent, info=_filter_info(prio, protocol))
    except NetlinkError as err:
        if err.code not in _NOT_FOUND:
            raise


def _remove_one(ipr: IPRoute, dev: int, minor: int) -> None:
    classid = _ROOT_HANDLE | minor
    if not any(msg["handle"] == classid for msg in ipr.get_classes(index=dev)):
        return
    # The filter goes first: HTB refuses to delete a class a filter still points at.
    _delete_filters(ipr, dev, _ROOT_HANDLE, minor, _ETH_P_IP)
    try:
        ipr.tc("del-class", index=dev, handle=classid, parent=_ROOT_HANDLE)
    except NetlinkError as err:
        if err.code not in _NOT_FOUND:
            raise


def remove_rate(topo: Topology, minor: int, direction: Direction | None = None) -> None:
    """Remove class ``1:<minor>`` and its filter (both directions unless one is named);
    nothing happens for a class that is not there."""
    _check_minor(minor)
    if direction is not None:
        _check_direction(direction)
    with _client_netns(topo) as ipr:
        for name, ifname in (("rx", topo.tap), ("tx", topo.ifb)):
            if direction in (None, name):
                _remove_one(ipr, _index(ipr, ifname), minor)


def _class_stats(msg: Any, direction: Direction) -> ClassStats | None:
    handle = int(msg["handle"])
    if msg.get_attr("TCA_KIND") != "htb" or handle >> 16 != _ROOT_MAJOR or not handle & 0xFFFF:
        return None
    options = msg.get_attr("TCA_OPTIONS")
    rate_bytes = 0
    if options is not None:
        rate64 = options.get_attr("TCA_HTB_RATE64")
        parms = options.get_attr("TCA_HTB_PARMS")
        if rate64:
            rate_bytes = int(rate64)
        elif parms is not None:
            rate_bytes = int(parms["rate"])
    sent_bytes = sent_packets = drops = 0
    stats2 = msg.get_attr("TCA_STATS2")
    if stats2 is not None:
        basic = stats2.get_attr("TCA_STATS_BASIC")
        queue = stats2.get_attr("TCA_STATS_QUEUE")
        if basic is not None:
            sent_bytes, sent_packets = int(basic["bytes"]), int(basic["packets"])
        if queue is not None:
            drops = int(queue["drops"])
    return ClassStats(
        minor=handle & 0xFFFF,
        direction=direction,
        rate_bps=rate_bytes * 8,
        bytes=sent_bytes,
        packets=sent_packets,
        drops=drops,
    )


def list_classes(topo: Topology) -> list[ClassStats]:
    """Every class ``1:<minor>`` with its rate and counters, rx (tap) then tx (ifb),
    each sorted by minor."""
    result: list[ClassStats] = []
    with _client_netns(topo) as ipr:
        devices: tuple[tuple[Direction, str], ...] = (("rx", topo.tap), ("tx", topo.ifb))
        for direction, ifname in devices:
            dev = _index(ipr, ifname)
            found = [
                stats
                for msg in ipr.get_classes(index=dev)
                if msg["index"] == dev and (stats := _class_stats(msg, direction)) is not None
            ]
            result.extend(sorted(found, key=lambda stats: stats.minor))
    return result


def teardown(topo: Topology) -> None:
    """Remove the roots, the ingress redirect and every class; a no-op if already gone."""
    if topo.client_netns not in netns.listnetns():
        return
    with _client_netns(topo) as ipr:
        for ifname in (topo.tap, topo.ifb):
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                continue
            dev = int(found[0])
            # Deleting a root qdisc takes its classes and filters with it; the kernel
            # then attaches the device's default qdisc again.
            for parent in (_TC_H_ROOT, _TC_H_INGRESS):
                present = _qdisc_at(ipr, dev, parent)
                if present is None or not present["handle"]:
                    continue  # the default qdisc (handle 0) cannot be deleted
                try:
                    ipr.tc("del", index=dev, parent=parent, handle=present["handle"])
                except NetlinkError as err:
                    if err.code not in _NOT_FOUND:
                        raise


def _kind_present(name: str, request: Callable[[], object], refused_if_present: int = 0) -> bool:
    """Run one probe request: True if the kernel accepted it, False if it does not know
    the kind. Any other refusal is a fault in the probe and raised as such."""
    try:
        request()
    except NetlinkError as err:
        # The kernel answers ENOENT for an unknown qdisc, classifier or action kind
        # (qdisc_lookup_ops, tcf_proto_lookup_ops and tc_lookup_action_n all fail that
        # way when nothing is built in or loadable) and EOPNOTSUPP for an unknown link
        # kind (rtnl_newlink).
        if err.code in (errno.ENOENT, errno.EOPNOTSUPP):
            return False
        if refused_if_present and err.code == refused_if_present:
            return True
        raise TcError(f"probing {name}: {err}") from err
    return True


def _run_probes(ipr: IPRoute) -> dict[str, bool]:
    ipr.link("add", ifname="arxcap0", kind="veth", peer="arxcap1")
    dev = _index(ipr, "arxcap0")
    peer = _index(ipr, "arxcap1")
    results = {
        "ifb": _kind_present("ifb", partial(ipr.link, "add", ifname="arxcapifb", kind="ifb")),
        "htb": _kind_present("htb", partial(ipr.tc, "add", "htb", dev, _ROOT_HANDLE, default=0)),
        "ingress": _kind_present("ingress", partial(ipr.tc, "add", "ingress", dev, _INGRESS_HANDLE)),
    }
    standalone_qdiscs: tuple[tuple[str, dict[str, int]], ...] = (
        ("tbf", {"rate": 125_000, "burst": _MIN_BURST_BYTES, "latency": 50_000}),
        ("netem", {"delay": 1000}),
    )
    for name, options in standalone_qdiscs:
        results[name] = _kind_present(name, partial(ipr.tc, "add", name, peer, 0x20000, **options))
        if results[name]:
            ipr.tc("del", index=peer, parent=_TC_H_ROOT, handle=0x20000)

    # Classifiers and actions need a classful parent: the ingress qdisc, or the HTB
    # root if ingress is missing. Each probe gets its own priority.
    parent = _INGRESS_HANDLE if results["ingress"] else _ROOT_HANDLE
    have_parent = results["ingress"] or results["htb"]

    def u32_filter(prio: int, **extra: object) -> Callable[[], object]:
        return partial(
            ipr.tc, "add-filter", "u32", dev, parent=parent, prio=prio,
            protocol=_ETH_P_ALL, target=_ROOT_HANDLE | 1, keys=["0x0/0x0+0"], **extra,
        )

    mirred = {"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": peer}
    filter_probes: tuple[tuple[str, Callable[[], object], int], ...] = (
        ("u32", u32_filter(1), 0),
        ("mirred", u32_filter(2, action=mirred), 0),
        ("gact", u32_filter(3, action={"kind": "gact", "action": "drop"}), 0),
        ("skbedit", u32_filter(4, action={"kind": "skbedit", "priority": 1}), 0),
        # pyroute2 has no flower encoder and sends a bare TCA_KIND to the root qdisc:
        # a kernel with flower refuses it for lack of options (EINVAL), one without
        # refuses the kind itself (ENOENT). Either answer settles the question.
        ("flower", partial(ipr.tc, "add-filter", "flower", dev,
                           info=_filter_info(5, _ETH_P_ALL)), errno.EINVAL),
    )
    for name, request, refused_if_present in filter_probes:
        results[name] = have_parent and _kind_present(name, request, refused_if_present)
    return results


def capabilities() -> dict[str, bool]:
    """Which of :data:`CAPABILITY_NAMES` this kernel has, found by trying each in a
    throwaway network namespace (removed afterwards, even on error).

    Actions are probed through u32 filters: if u32 is missing they read as missing too.
    """
    name = f"arx-tccap-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        netns.create(name)
    except OSError as err:
        raise TcError(f"cannot create the probe namespace {name}: {err}") from err
    try:
        with IPRoute(netns=name, flags=0) as ipr:
            results = _run_probes(ipr)
    except NetlinkError as err:
        raise TcError(f"probing tc capabilities: {err}") from err
    finally:
        # No process lives in the namespace, so removing its name frees it and
        # everything the probes created inside.
        netns.remove(name)
    return {key: results[key] for key in CAPABILITY_NAMES}


_WHAT: Final = {
    "htb": "the HTB qdisc (sch_htb)",
    "tbf": "the token bucket qdisc (sch_tbf)",
    "u32": "the u32 classifier (cls_u32)",
    "ingress": "the ingress qdisc (sch_ingress)",
    "mirred": "the mirred action (act_mirred)",
    "ifb": "the ifb device",
    "flower": "the flower classifier (cls_flower)",
    "gact": "the generic actions pass/drop (act_gact)",
    "skbedit": "the skbedit action (act_skbedit)",
    "netem": "the network emulator qdisc (sch_netem)",
}


def describe_missing(caps: dict[str, bool] | None = None) -> str:
    """A sentence for logs and ``kernelctl status``: what this kernel lacks, and whether
    rate limits can still be mirrored. Probes the kernel unless ``caps`` is given."""
    if caps is None:
        caps = capabilities()
    missing = [name for name in CAPABILITY_NAMES if not caps.get(name, False)]
    if not missing:
        return "tc: every probed feature is present."
    absent = "; ".join(_WHAT[name] for name in missing)
    blocking = [name for name in REQUIRED_CAPABILITIES if name in missing]
    if blocking:
        consequence = (
            "rate limits cannot be mirrored into Linux (needs "
            + ", ".join(blocking)
            + "); the device's own limiters still apply"
        )
    else:
        consequence = "rate limit mirroring works (htb, u32, ingress, mirred and ifb are present)"
    return f"tc: this kernel lacks {absent}; {consequence}."
