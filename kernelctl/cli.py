"""The ``kernelctl`` command: bring the control plane up and down, and look at it.

    kernelctl up        start the daemon and the device host, build the topology (idempotent)
    kernelctl down      remove every namespace, link, tc rule, process and file it made
                        (images and the VSA registry stay; --purge deletes them too)
    kernelctl status    functions, filters and rate limits with their counters (-j: JSON)
    kernelctl vsa create NAME SIZE | resize NAME SIZE | delete NAME | ls
    kernelctl vsa grant NAME UID ro|rw | revoke NAME UID
    kernelctl ls [-l] [-j] PATH | stat PATH | cat PATH | rm PATH | mkdir PATH
                        the global name tree (kernelctl/names_cli.py)

``--instance TAG`` selects a side-by-side instance with its own names (tests use this).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kernelctl import fuse_mount, names_cli, storage, tc, topology
from kernelctl.client import ControlClient, ControlError
from kernelctl.names import Topology
from kernelctl.procs import wait_or_kill
from kernelctl.names import topology as topology_names
from vdev import control

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def _daemon_pid(topo: Topology) -> int | None:
    try:
        pid = int(topo.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if b"kernelctl.daemon" in cmdline else None


def _reachable(topo: Topology) -> bool:
    try:
        with ControlClient(topo.control_socket, timeout=5.0) as client:
            client.status()
        return True
    except (ControlError, OSError):
        return False


def cmd_up(topo: Topology, args: argparse.Namespace) -> int:
    if _reachable(topo):
        print(f"kernelctl: instance {topo.tag or 'default'} is already up")
        if not fuse_mount.healthy(topo):  # the FUSE export was killed: mount it again
            _mount_names(topo)
        return 0
    stale = _daemon_pid(topo)
    if stale is not None:
        os.kill(stale, signal.SIGKILL)
    topo.run_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "kernelctl.daemon", "--instance", topo.tag]
    if args.policy is not None:
        argv += ["--policy", str(args.policy)]
    if args.spin is not None:
        argv += ["--spin", str(args.spin)]
    if args.openflow_tls is not None:
        argv += ["--openflow-tls", str(args.openflow_tls)]
    log_path = topo.run_dir / "kernelctl.log"
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, start_new_session=True
        )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            print(f"kernelctl: the daemon exited with {process.returncode}; its log:", file=sys.stderr)
            print(log_path.read_text()[-4000:], file=sys.stderr)
            return 1
        if topo.control_socket.exists() and _reachable(topo):
            _mount_names(topo)
            print(
                f"kernelctl: up (instance {topo.tag or 'default'}, pid {process.pid}): "
                f"clients in netns {topo.client_netns} at {topo.client_ip}, VNIC {topo.vnic_ip}, "
                f"baseline netns {topo.linux_netns} at {topo.linux_ip}"
            )
            return 0
        time.sleep(0.1)
    process.kill()
    print("kernelctl: the daemon did not come up in time", file=sys.stderr)
    return 1


def _mount_names(topo: Topology) -> None:
    why = fuse_mount.start(topo)
    if why:
        print(f"kernelctl: the name tree is not exported at {fuse_mount.mountpoint(topo)}: {why}", file=sys.stderr)


def cmd_down(topo: Topology, args: argparse.Namespace) -> int:
    fuse_mount.stop(topo)  # first: its process holds a control connection and the mount
    pid = _daemon_pid(topo)
    if _reachable(topo):
        try:
            with ControlClient(topo.control_socket, timeout=5.0) as client:
                client.call(control.Shutdown())
        except (ControlError, OSError) as exc:
            print(f"kernelctl: shutdown request failed ({exc}); stopping it by signal", file=sys.stderr)
    if pid is not None:
        wait_or_kill(pid, STOP_TIMEOUT, lambda: _daemon_pid(topo))
    # Whatever the daemon did or did not get to, leave nothing behind.
    fuse_mount.stop(topo)
    try:
        tc.teardown(topo)
    except Exception:
        pass
    topology.destroy(topo)
    try:
        storage.stop_images(topo)
    except Exception as exc:
        print(f"kernelctl: releasing images: {exc}", file=sys.stderr)
    shutil.rmtree(topo.run_dir, ignore_errors=True)
    if args.purge:
        storage.purge(topo)
    print(f"kernelctl: down (instance {topo.tag or 'default'}{', purged' if args.purge else ''})")
    return 0


def _fmt_rate(bps: object) -> str:
    if not isinstance(bps, int) or bps <= 0:
        return "-"
    for unit, scale in (("Gbit", 10**9), ("Mbit", 10**6), ("Kbit", 10**3)):
        if bps >= scale:
            return f"{bps / scale:g}{unit}"
    return f"{bps}bit"


def _table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def render_status(status: dict[str, Any]) -> str:
    out = []
    addresses = status.get("addresses", {})
    out.append(
        f"kernelctl instance {status.get('instance')} (pid {status.get('pid')}), policy {status.get('policy')}; "
        f"client {addresses.get('client')}, vnic {addresses.get('vnic')}, linux {addresses.get('linux')}"
    )
    device = status.get("device") or {}
    counters = {f["function_id"]: f.get("counters", {}) for f in device.get("functions", [])}
    rows = []
    for function in status.get("functions", []):
        c = counters.get(function["function_id"], {})
        rows.append(
            [
                function["function_id"],
                function["owner_pid"],
                function["owner_uid"],
                function["name"] or "-",
                ",".join(function["claims"]),
                _fmt_rate(function["rx_bps"]),
                _fmt_rate(function["tx_bps"]),
                c.get("rx_packets", 0),
                c.get("tx_packets", 0),
                c.get("rx_no_buffer", 0) + c.get("rx_rate_dropped", 0) + c.get("rx_errors", 0),
                c.get("tx_spoofed", 0),
                c.get("iommu_faults", 0),
            ]
        )
    out.append("\nFunctions")
    out.append(
        _table(
            ["ID", "PID", "UID", "NAME", "CLAIMS", "RX-LIMIT", "TX-LIMIT", "RX-PKTS", "TX-PKTS", "RX-DROPS", "SPOOFED", "IOMMU-FAULTS"],
            rows,
        )
        if rows
        else "  (none)"
    )
    filters = [f for f in device.get("filters", []) if isinstance(f, dict) and f.get("kind") == "filter"]
    out.append("\nFilters (match -> function: packets, bytes, drops)")
    if filters:
        rows = []
        for entry in filters:
            match = entry.get("match", {})
            described = " ".join(f"{k}={v}" for k, v in match.items() if v is not None)
            rows.append(
                [entry.get("id"), entry.get("direction"), described, entry.get("function"),
                 entry.get("packets"), entry.get("bytes"), entry.get("drops")]
            )
        out.append(_table(["ID", "DIR", "MATCH", "FUNCTION", "PACKETS", "BYTES", "DROPS"], rows))
    else:
        out.append("  (none)")
    out.append(_render_controller_flows(status, device))
    table = next((f for f in device.get("filters", []) if isinstance(f, dict) and f.get("kind") == "table"), None)
    if table is not None:
        out.append(f"Unmatched frames (to the default function): {table.get('unmatched')}")
    default = device.get("default_function")
    if isinstance(default, dict):
        out.append("\nDefault function (kernelctl's): " + ", ".join(f"{k} {v}" for k, v in default.items()))
    wire = device.get("device")
    if isinstance(wire, dict):
        out.append("Wire: " + ", ".join(f"{k} {v}" for k, v in wire.items()))
    classes = status.get("tc_classes", [])
    out.append("\ntc classes (HTB; rx on the tap, tx on the ifb)")
    if classes:
        keys = list(classes[0].keys())
        out.append(_table([k.upper() for k in keys], [[c.get(k, "") for k in keys] for c in classes]))
    else:
        out.append("  (none)")
    if status.get("tc_missing"):
        out.append(str(status["tc_missing"]))
    names = status.get("names")
    if isinstance(names, dict):
        servers = names.get("servers") or []
        out.append(f"\nNames: {names.get('names')} in the tree (kernelctl ls -l /apps); file servers: {len(servers)}")
        if servers:
            out.append(_table(["SERVER", "PID", "UID", "OPENS"],
                              [[s.get("server"), s.get("pid"), s.get("uid"), s.get("opens")] for s in servers]))
    return "\n".join(out)


def _render_controller_flows(status: dict[str, Any], device: dict[str, Any]) -> str:
    """The OpenFlow controller's flows (table 0, below the claimed ones) with their counters."""
    openflow = status.get("openflow")
    if not isinstance(openflow, dict):
        return ""
    counts = {
        entry.get("id"): entry
        for entry in device.get("filters", [])
        if isinstance(entry, dict) and entry.get("kind") == "flow"
    }
    lines = [f"\nOpenFlow controller flows ({openflow.get('socket')}; {openflow.get('controllers')} controller(s) connected)"]
    rows = []
    for flow in openflow.get("flows", []):
        entry = counts.get(flow.get("device_flow"), {})
        rows.append([
            flow.get("priority"), f"{flow.get('cookie', 0):#x}", flow.get("match"), flow.get("actions"),
            flow.get("base_packets", 0) + entry.get("packets", 0), flow.get("base_bytes", 0) + entry.get("bytes", 0),
            f"{flow.get('age', 0):.0f}s",
        ])
    if rows:
        lines.append(_table(["PRIORITY", "COOKIE", "MATCH", "ACTIONS", "PACKETS", "BYTES", "AGE"], rows))
    else:
        lines.append("  (none)")
    return "\n".join(lines)


def cmd_status(topo: Topology, args: argparse.Namespace) -> int:
    try:
        with ControlClient(topo.control_socket, timeout=10.0) as client:
            status = client.status()
    except ControlError as exc:
        print(f"kernelctl: {exc} (is it up? try 'kernelctl up')", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(render_status(status))
    return 0


def parse_size(text: str) -> int:
    """'64M', '1G', '4096' (bytes); binary units, as dd and truncate read them."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        if cleaned and cleaned[-1] in units:
            return int(float(cleaned[:-1]) * units[cleaned[-1]])
        return int(cleaned)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (try 64M or 1G)") from None


_VSA_REQUESTS: dict[str, Callable[[argparse.Namespace], control.Record]] = {
    "create": lambda args: control.VsaCreate(name=args.name, size_bytes=args.size),
    "resize": lambda args: control.VsaResize(name=args.name, size_bytes=args.size),
    "delete": lambda args: control.VsaDelete(name=args.name),
    "ls": lambda args: control.VsaList(),
    "grant": lambda args: control.VsaGrant(name=args.name, uid=args.uid, mode=args.mode),
    "revoke": lambda args: control.VsaRevoke(name=args.name, uid=args.uid),
}


def cmd_vsa(topo: Topology, args: argparse.Namespace) -> int:
    try:
        body = _VSA_REQUESTS[args.vsa_command](args)
    except control.ProtocolError as exc:
        print(f"kernelctl: {exc}", file=sys.stderr)
        return 2
    try:
        with ControlClient(topo.control_socket, timeout=10.0) as client:
            result, _fds = client.call(body)
    except ControlError as exc:
        print(f"kernelctl: {exc}", file=sys.stderr)
        return 1
    if args.vsa_command != "ls":
        if result is not None:
            print(f"kernelctl: VSA {result['name']}: {result['size_bytes'] >> 20} MiB in {len(result['extents'])} extent(s)")
        return 0
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    rows = [
        [v["name"], v["owner_uid"], f"{v['size_bytes'] >> 20}M", " ".join(f"{b}+{n}" for b, n in v["extents"]),
         ",".join(f"{uid}:{mode}" for uid, mode in v["grants"].items()) or "-"]
        for v in result["vsas"]
    ]
    print(f"capacity {result['capacity_bytes'] >> 20} MiB, free {result['free_bytes'] >> 20} MiB (4 KiB blocks)")
    print(_table(["NAME", "OWNER", "SIZE", "EXTENTS (block+count)", "GRANTS"], rows) if rows else "  (no VSAs)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kernelctl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instance", default="", help="topology instance tag (default: the DESIGN.md names)")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start the control plane and build the topology")
    up.add_argument("--policy", type=Path, default=None, help="policy file (default /etc/arrakis/policy.toml)")
    up.add_argument("--spin", type=float, default=None, help="device host polling window in seconds")
    up.add_argument(
        "--openflow-tls", type=int, default=None, metavar="PORT",
        help="also serve OpenFlow over TLS on 127.0.0.1:PORT (0: a free port), with certificates kernelctl makes",
    )
    down = commands.add_parser("down", help="tear everything down")
    down.add_argument("--purge", action="store_true", help="also delete the images and the VSA registry")
    status = commands.add_parser("status", help="functions, filters, rate limits and counters")
    status.add_argument("-j", "--json", action="store_true", help="JSON output")
    vsa = commands.add_parser("vsa", help="virtual storage areas")
    vsa_commands = vsa.add_subparsers(dest="vsa_command", required=True)
    for name, help_text in (("create", "make a VSA"), ("resize", "grow or shrink a VSA")):
        sub = vsa_commands.add_parser(name, help=help_text)
        sub.add_argument("name")
        sub.add_argument("size", type=parse_size)
    vsa_commands.add_parser("delete", help="delete a VSA").add_argument("name")
    ls = vsa_commands.add_parser("ls", help="list VSAs")
    ls.add_argument("-j", "--json", action="store_true")
    grant = vsa_commands.add_parser("grant", help="let another uid use a VSA (the shared-VSA way)")
    grant.add_argument("name")
    grant.add_argument("uid", type=int)
    grant.add_argument("mode", choices=("ro", "rw"))
    revoke = vsa_commands.add_parser("revoke", help="take a grant back")
    revoke.add_argument("name")
    revoke.add_argument("uid", type=int)
    names_cli.add_parsers(commands)
    args = parser.parse_args(argv)
    if args.command in ("up", "down") and os.geteuid() != 0:
        print("kernelctl: up and down need root", file=sys.stderr)
        return 1
    try:
        topo = topology_names(args.instance)
    except ValueError as exc:
        print(f"kernelctl: {exc}", file=sys.stderr)
        return 2
    handlers: dict[str, Callable[[Topology, argparse.Namespace], int]] = {
        "up": cmd_up, "down": cmd_down, "status": cmd_status, "vsa": cmd_vsa, **names_cli.HANDLERS,
    }
    return handlers[args.command](topo, args)


if __name__ == "__main__":
    sys.exit(main())
