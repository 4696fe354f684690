"""The control plane daemon: one per topology instance, root, never on the data path.

It owns the topology (namespaces, bridge, tap, veth, ifb), the tc configuration, the port
claims and the device host process. Applications and the CLI reach it over a UNIX
``SOCK_SEQPACKET`` control socket; it identifies each caller with ``SO_PEERCRED`` and checks
the policy once, when a function is set up. After that the application and the device
host talk directly (vfio-user and shared memory); the daemon only hears about the function
again when it goes away, either from the device host (the application's vfio-user socket
closed) or because the application's control connection closed. Whichever comes first
reclaims the function's ports, filters and tc classes.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernelctl import tc, topology
from kernelctl.hostproc import DeviceHostProcess, vnic_host, vsic_host
from kernelctl.names import Topology
from kernelctl.names import topology as topology_names
from kernelctl.policy import PROTOCOLS, Policy, PolicyError
from kernelctl.storage import StoragePlane, StorageRequestError
from vdev import mgmt

log = logging.getLogger("kernelctl")

MAX_CLIENTS = 256
MAX_FILTERS_PER_FUNCTION = 64
MAX_RATE_BPS = 100 * 10**9
_UCRED = struct.Struct("3i")


class RequestError(Exception):
    """A control request that is refused; the message goes back to the caller."""


@dataclass
class Caller:
    sock: socket.socket
    pid: int
    uid: int
    gid: int
    functions: set[int] = field(default_factory=set)


@dataclass
class FunctionRecord:
    function_id: int
    owner_pid: int
    owner_uid: int
    name: str
    claims: list[tuple[str, int]]
    rx_bps: int
    tx_bps: int
    created: float
    tc_minors: list[int] = field(default_factory=list)
    device: str = "vnic"  # which device host serves it: "vnic" or "vsic"
    vsa: str = ""  # vsic: the VSA it opened
    writable: bool = False


class Daemon:
    def __init__(self, topo: Topology, policy: Policy, spin: float | None = None) -> None:
        self.topo = topo
        self.policy = policy
        self.spin = spin
        self.selector = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self.callers: dict[int, Caller] = {}
        self.functions: dict[int, FunctionRecord] = {}
        self.claims: dict[tuple[str, int], int] = {}
        self.hosts: dict[str, DeviceHostProcess] = {}
        self.running = True
        self._next_function = 1
        self.tc_missing = ""
        # The storage plane refuses to shrink or delete a VSA that a function has open.
        self.storage = StoragePlane(
            topo, lambda: [r.vsa for r in self.functions.values() if r.device == "vsic"], policy
        )

    # ---- life cycle --------------------------------------------------------------------

    def start(self) -> None:
        topo = self.topo
        topo.run_dir.mkdir(parents=True, exist_ok=True)
        topology.build(topo)
        self.tc_missing = tc.describe_missing()
        try:
            tc.ensure_roots(topo)
        except Exception as exc:  # a kernel without htb/ifb still gets the device limiters
            log.warning("tc rate limits unavailable: %s", exc)
            self.tc_missing = f"{self.tc_missing}; tc roots failed: {exc}".strip("; ")
        self.storage.start()
        self._start_host("vnic")
        self._start_host("vsic")
        path = topo.control_socket
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        listener.bind(str(path))
        os.chmod(path, 0o666)  # anyone may ask; the policy decides what they get
        listener.listen(64)
        listener.setblocking(False)
        self.listener = listener
        self.selector.register(listener, selectors.EVENT_READ, "listener")
        topo.pid_file.write_text(f"{os.getpid()}\n")
        log.info("kernelctl up: %s (pid %d)", path, os.getpid())

    @property
    def host(self) -> DeviceHostProcess | None:
        """The VNIC device host."""
        return self.hosts.get("vnic")

    def _start_host(self, kind: str) -> None:
        if kind == "vnic":
            host = vnic_host(self.topo, spin=self.spin)
        else:
            attached = self.storage.attached
            if attached is None:
                raise RuntimeError("no image for the VSIC device host")
            host = vsic_host(self.topo, attached.raw_device, spin=self.spin)
        self.hosts[kind] = host
        self.selector.register(host.sock, selectors.EVENT_READ, kind)

    def run(self) -> None:
        while self.running:
            for key, _mask in self.selector.select(timeout=1.0):
                if key.data == "listener":
                    self._accept()
                elif key.data in self.hosts:
                    self._on_host_events(key.data)
                else:
                    self._on_caller(key.fileobj)  # type: ignore[arg-type]
            self._check_hosts()

    def stop(self) -> None:
        self.running = False
        for caller in list(self.callers.values()):
            self._drop_caller(caller)
        for host in self.hosts.values():
            try:
                self.selector.unregister(host.sock)
            except (KeyError, ValueError):
                pass
            host.stop()
        self.hosts.clear()
        if self.listener is not None:
            self.selector.unregister(self.listener)
            self.listener.close()
            self.listener = None
        try:
            tc.teardown(self.topo)
        except Exception as exc:
            log.warning("tc teardown: %s", exc)
        try:
            self.storage.stop()
        except Exception as exc:
            log.warning("storage: %s", exc)
        topology.destroy(self.topo)
        for path in (self.topo.control_socket, self.topo.pid_file):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def _check_hosts(self) -> None:
        for kind, host in list(self.hosts.items()):
            if host.alive():
                continue
            # A device host died (a bug, or someone killed it): its functions died with it.
            log.error("%s device host exited with %s; restarting it", kind, host.returncode())
            try:
                self.selector.unregister(host.sock)
            except (KeyError, ValueError):
                pass
            host.stop()
            for function_id, record in list(self.functions.items()):
                if record.device == kind:
                    self._reclaim(function_id)
            self._start_host(kind)

    # ---- callers -----------------------------------------------------------------------

    def _accept(self) -> None:
        if self.listener is None:
            return
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        if len(self.callers) >= MAX_CLIENTS:
            sock.close()
            return
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        pid, uid, gid = _UCRED.unpack(creds)
        sock.setblocking(False)
        caller = Caller(sock, pid, uid, gid)
        self.callers[sock.fileno()] = caller
        self.selector.register(sock, selectors.EVENT_READ, "caller")

    def _on_caller(self, sock: socket.socket) -> None:
        caller = self.callers.get(sock.fileno())
        if caller is None:
            return
        try:
            received = mgmt.recv_message(sock)
        except BlockingIOError:
            return
        except mgmt.MgmtError as exc:
            self._send(caller, {"id": None, "ok": False, "error": f"malformed request: {exc}"})
            return
        except OSError:
            received = None
        if received is None:
            self._drop_caller(caller)
            return
        message, fds = received
        for fd in fds:  # no request takes file descriptors
            os.close(fd)
        request_id = message.get("id")
        reply_fds: list[int] = []
        try:
            if fds:
                raise RequestError("requests carry no file descriptors")
            result, reply_fds = self._handle(caller, message)
        except RequestError as exc:
            self._send(caller, {"id": request_id, "ok": False, "error": str(exc)})
        else:
            self._send(caller, {"id": request_id, "ok": True, "result": result}, reply_fds)
        finally:
            for fd in reply_fds:
                os.close(fd)

    def _send(self, caller: Caller, message: dict[str, Any], fds: list[int] | None = None) -> None:
        try:
            caller.sock.setblocking(True)
            caller.sock.settimeout(2.0)
            mgmt.send_message(caller.sock, message, fds)
            caller.sock.setblocking(False)
        except OSError:
            self._drop_caller(caller)

    def _drop_caller(self, caller: Caller) -> None:
        fd = caller.sock.fileno()
        if fd >= 0:
            self.callers.pop(fd, None)
            try:
                self.selector.unregister(caller.sock)
            except (KeyError, ValueError):
                pass
        caller.sock.close()
        for function_id in list(caller.functions):
            self._destroy_function(function_id)

    # ---- requests ----------------------------------------------------------------------

    def _handle(self, caller: Caller, message: dict[str, Any]) -> tuple[object, list[int]]:
        op = message.get("op")
        if op == "open_vnic":
            return self._open_vnic(caller, message)
        if op == "open_vsa":
            return self._open_vsa(caller, message)
        if op == "add_filter":
            return self._add_filter(caller, message), []
        if op == "status":
            return self.status(), []
        if op == "set_rate":
            return self._set_rate(caller, message), []
        if isinstance(op, str) and op.startswith("vsa_"):
            try:
                return self.storage.handle(op, caller.uid, message), []
            except StorageRequestError as exc:
                raise RequestError(str(exc)) from None
        if op == "shutdown":
            if caller.uid != 0:
                raise RequestError("only root may shut kernelctl down")
            self.running = False
            return None, []
        raise RequestError(f"unknown request {op!r}")

    def _parse_claims(self, caller: Caller, specs: object) -> list[tuple[str, int]]:
        if not isinstance(specs, list) or not specs:
            raise RequestError("filters must be a non-empty list")
        if len(specs) > MAX_FILTERS_PER_FUNCTION:
            raise RequestError(f"at most {MAX_FILTERS_PER_FUNCTION} filters per function")
        claims: list[tuple[str, int]] = []
        for spec in specs:
            if not isinstance(spec, dict):
                raise RequestError("a filter is an object {proto, port}")
            proto, port = spec.get("proto"), spec.get("port")
            if proto not in PROTOCOLS:
                raise RequestError(f"proto must be one of {', '.join(PROTOCOLS)}")
            if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
                raise RequestError(f"bad port {port!r}")
            claims.append((str(proto), port))
        for claim in claims:
            self._check_claim(caller, claim)
        if len(set(claims)) != len(claims):
            raise RequestError("the same port is asked for twice")
        return claims

    def _check_claim(self, caller: Caller, claim: tuple[str, int]) -> None:
        proto, port = claim
        if not self.policy.allows(caller.uid, proto, port):
            raise RequestError(f"policy forbids uid {caller.uid} to claim {proto}/{port}")
        holder = self.claims.get(claim)
        if holder is not None:
            record = self.functions[holder]
            raise RequestError(
                f"{proto}/{port} is already claimed by function {holder} "
                f"(pid {record.owner_pid}, {record.name or 'unnamed'})"
            )

    @staticmethod
    def _rate(message: dict[str, Any], key: str) -> int:
        value = message.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_RATE_BPS:
            raise RequestError(f"{key} must be 0..{MAX_RATE_BPS} bits per second")
        return value

    def _open_vnic(self, caller: Caller, message: dict[str, Any]) -> tuple[object, list[int]]:
        claims = self._parse_claims(caller, message.get("filters"))
        rx_bps = self._rate(message, "rx_bps")
        tx_bps = self._rate(message, "tx_bps")
        name = message.get("name", "")
        if not isinstance(name, str) or len(name) > 64:
            raise RequestError("name must be a string of at most 64 characters")
        host = self.host
        if host is None:
            raise RequestError("no device host")
        function_id = self._next_function
        self._next_function += 1
        app_end, device_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            host.request(
                {
                    "op": "create_function",
                    "function_id": function_id,
                    "ip": self.topo.vnic_ip,
                    "rx_filters": [{"proto": proto, "port": port} for proto, port in claims],
                    "rx_bps": rx_bps,
                    "tx_bps": tx_bps,
                    "owner_pid": caller.pid,
                    "owner_uid": caller.uid,
                    "name": name,
                },
                [device_end.fileno()],
                self._on_host_event,
            )
        except Exception as exc:
            app_end.close()
            raise RequestError(f"device host refused the function: {exc}") from None
        finally:
            device_end.close()
        record = FunctionRecord(function_id, caller.pid, caller.uid, name, claims, rx_bps, tx_bps, time.time())
        self.functions[function_id] = record
        for claim in claims:
            self.claims[claim] = function_id
        caller.functions.add(function_id)
        self._program_rates(record)
        fd = os.dup(app_end.fileno())
        app_end.close()
        return {"function_id": function_id, "ip": self.topo.vnic_ip, "prefix_len": self.topo.subnet_prefix}, [fd]

    def _open_vsa(self, caller: Caller, message: dict[str, Any]) -> tuple[object, list[int]]:
        """Access is checked here, once; then the app talks to the VSIC device host alone."""
        name = message.get("name")
        write = message.get("write", True)
        if not isinstance(name, str) or not isinstance(write, bool):
            raise RequestError("open_vsa needs a name and write: true|false")
        try:
            vsa = self.storage.check_access(name, caller.uid, write)
        except StorageRequestError as exc:
            raise RequestError(str(exc)) from None
        iops = self._rate(message, "iops")
        bps = self._rate(message, "bps")
        host = self.hosts.get("vsic")
        if host is None:
            raise RequestError("no storage device host")
        function_id = self._next_function
        self._next_function += 1
        app_end, device_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            result = host.request(
                {
                    "op": "create_function",
                    "function_id": function_id,
                    "extents": [[extent.physical_block, extent.block_count] for extent in vsa.extents],
                    "read_only": not write,
                    "iops": iops,
                    "bps": bps,
                    "name": name,
                    "owner_pid": caller.pid,
                    "owner_uid": caller.uid,
                },
                [device_end.fileno()],
                self._on_host_event,
            )
        except Exception as exc:
            app_end.close()
            raise RequestError(f"storage device host refused the function: {exc}") from None
        finally:
            device_end.close()
        record = FunctionRecord(
            function_id, caller.pid, caller.uid, f"vsa:{name}", [], 0, 0, time.time(),
            device="vsic", vsa=name, writable=write,
        )
        self.functions[function_id] = record
        caller.functions.add(function_id)
        fd = os.dup(app_end.fileno())
        app_end.close()
        capacity = result.get("capacity_blocks") if isinstance(result, dict) else None
        return {"function_id": function_id, "vsa": name, "writable": write, "capacity_blocks": capacity}, [fd]

    def _add_filter(self, caller: Caller, message: dict[str, Any]) -> object:
        function_id = message.get("function_id")
        if not isinstance(function_id, int) or function_id not in caller.functions:
            raise RequestError("no such function of yours")
        record = self.functions[function_id]
        if len(record.claims) >= MAX_FILTERS_PER_FUNCTION:
            raise RequestError(f"at most {MAX_FILTERS_PER_FUNCTION} filters per function")
        (claim,) = self._parse_claims(caller, [{"proto": message.get("proto"), "port": message.get("port")}])
        if self.host is None:
            raise RequestError("no device host")
        try:
            self.host.request(
                {"op": "add_filter", "function_id": function_id, "proto": claim[0], "port": claim[1]},
                [],
                self._on_host_event,
            )
        except Exception as exc:
            raise RequestError(f"device host refused the filter: {exc}") from None
        record.claims.append(claim)
        self.claims[claim] = function_id
        self._program_rates(record)
        return None

    def _set_rate(self, caller: Caller, message: dict[str, Any]) -> object:
        function_id = message.get("function_id")
        if not isinstance(function_id, int) or function_id not in self.functions:
            raise RequestError("no such function")
        record = self.functions[function_id]
        if caller.uid != 0 and caller.uid != record.owner_uid:
            raise RequestError("only root or the owner may change a function's rate")
        rx_bps, tx_bps = self._rate(message, "rx_bps"), self._rate(message, "tx_bps")
        if self.host is None:
            raise RequestError("no device host")
        self.host.request(
            {"op": "set_rate", "function_id": function_id, "rx_bps": rx_bps, "tx_bps": tx_bps}, [], self._on_host_event
        )
        record.rx_bps, record.tx_bps = rx_bps, tx_bps
        self._program_rates(record)
        return None

    def _program_rates(self, record: FunctionRecord) -> None:
        """Mirror the device's limiters into Linux tc, one class per claim and direction."""
        self._remove_rates(record)
        if not (record.rx_bps or record.tx_bps):
            return
        number = {"udp": 17, "tcp": 6}
        try:
            for proto, port in record.claims:
                for direction, rate in (("rx", record.rx_bps), ("tx", record.tx_bps)):
                    if not rate:
                        continue
                    minor = self._allocate_minor()
                    tc.set_rate(self.topo, minor, direction, rate, self.topo.vnic_ip, number[proto], port)  # type: ignore[arg-type]
                    record.tc_minors.append(minor)
        except Exception as exc:
            log.warning("tc mirror of function %d failed: %s", record.function_id, exc)

    def _allocate_minor(self) -> int:
        # Class 1:<minor> for one claim and direction; minors are recycled on reclaim.
        used = {minor for record in self.functions.values() for minor in record.tc_minors}
        for minor in range(0x10, 0xFFFF):
            if minor not in used:
                return minor
        raise RequestError("no tc class numbers left")

    def _remove_rates(self, record: FunctionRecord) -> None:
        for minor in record.tc_minors:
            try:
                tc.remove_rate(self.topo, minor)
            except Exception as exc:
                log.warning("tc remove %x: %s", minor, exc)
        record.tc_minors.clear()

    # ---- reclaiming ----------------------------------------------------------------------

    def _destroy_function(self, function_id: int) -> None:
        record = self.functions.get(function_id)
        if record is None:
            return
        host = self.hosts.get(record.device)
        if host is not None:
            try:
                host.request({"op": "destroy_function", "function_id": function_id}, [], self._on_host_event)
            except Exception as exc:
                log.warning("%s device host destroy %d: %s", record.device, function_id, exc)
        self._reclaim(function_id)

    def _reclaim(self, function_id: int) -> None:
        record = self.functions.pop(function_id, None)
        if record is None:
            return
        for claim in record.claims:
            if self.claims.get(claim) == function_id:
                del self.claims[claim]
        self._remove_rates(record)
        for caller in self.callers.values():
            caller.functions.discard(function_id)
        log.info("function %d reclaimed (pid %d)", function_id, record.owner_pid)

    def _on_host_events(self, kind: str) -> None:
        host = self.hosts.get(kind)
        if host is None:
            return
        for event in host.drain_events():
            self._on_host_event(event)

    def _on_host_event(self, event: dict[str, Any]) -> None:
        if event.get("event") == "function_closed":
            function_id = event.get("function_id")
            if isinstance(function_id, int):
                self._reclaim(function_id)

    # ---- status ----------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        device: object = None
        storage_device: object = None
        if self.host is not None:
            try:
                device = self.host.request({"op": "stats"}, [], self._on_host_event)
            except Exception as exc:
                device = {"error": str(exc)}
        vsic = self.hosts.get("vsic")
        if vsic is not None:
            try:
                storage_device = vsic.request({"op": "stats"}, [], self._on_host_event)
            except Exception as exc:
                storage_device = {"error": str(exc)}
        try:
            classes = [c.as_dict() for c in tc.list_classes(self.topo)]
        except Exception as exc:
            classes = [{"error": str(exc)}]
        return {
            "instance": self.topo.tag or "default",
            "pid": os.getpid(),
            "policy": self.policy.source,
            "addresses": {"client": self.topo.client_ip, "vnic": self.topo.vnic_ip, "linux": self.topo.linux_ip},
            "functions": [
                {
                    "function_id": r.function_id,
                    "owner_pid": r.owner_pid,
                    "owner_uid": r.owner_uid,
                    "name": r.name,
                    "claims": [f"{p}/{n}" for p, n in r.claims],
                    "rx_bps": r.rx_bps,
                    "tx_bps": r.tx_bps,
                    "device": r.device,
                }
                for r in self.functions.values()
            ],
            "device": device,
            "tc_classes": classes,
            "tc_missing": self.tc_missing,
            "storage": self.storage.status(),
            "storage_device": storage_device,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="kernelctl daemon (started by 'kernelctl up')")
    parser.add_argument("--instance", default="")
    parser.add_argument("--policy", type=Path, default=None)
    parser.add_argument("--spin", type=float, default=None, help="device host polling window, seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s kernelctl[%(process)d] %(message)s")
    if os.geteuid() != 0:
        print("kernelctl: the daemon must run as root", file=sys.stderr)
        return 1
    try:
        policy = Policy.load(args.policy)
    except (PolicyError, OSError) as exc:
        print(f"kernelctl: policy: {exc}", file=sys.stderr)
        return 1
    daemon = Daemon(topology_names(args.instance), policy, spin=args.spin)

    def on_signal(_signum: int, _frame: object) -> None:
        daemon.running = False

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        daemon.start()
        daemon.run()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print("kernelctl: another daemon owns this instance", file=sys.stderr)
        raise
    finally:
        daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
