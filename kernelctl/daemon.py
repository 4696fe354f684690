"""The control plane daemon: one per topology instance, root, never on the data path.

It owns the topology (namespaces, bridge, tap, veth, ifb), the tc configuration, the port
claims and the device host process. Applications and the CLI reach it over a UNIX
``SOCK_SEQPACKET`` control socket; it identifies each caller with ``SO_PEERCRED`` and checks
the policy once, when a function is set up. After that the application and the device
host talk directly (vfio-user and shared memory); the daemon only hears about the function
again when it goes away, either from the device host (the application's vfio-user socket
closed) or because the application's control connection closed. Whichever comes first
reclaims the function's ports, filters and tc classes.

Every request is a checked record of ``vdev.control.CONTROL`` and its handler comes from
``Daemon.handlers``, a table keyed by record class. The daemon is one selector loop and never
blocks on a caller: replies are queued on the caller's non-blocking ``Channel`` and written
as its socket takes them; while a reply waits, that caller's next request is not read (one
pending reply per connection), and a caller that has not taken its reply within
``REPLY_DEADLINE`` seconds is dropped. No exception from a handler leaves the loop: the
caller gets an error reply (a device host that does not answer within
``kernelctl.hostproc.REQUEST_TIMEOUT`` is one such error). Bounds per uid (root: only the
global ones):

* control connections: ``MAX_CLIENTS_PER_UID`` = 32 per uid; ``MAX_CLIENTS`` = 256 in all,
  the last ``ROOT_RESERVED_CLIENTS`` = 16 of them for root only;
* functions: ``MAX_FUNCTIONS_PER_UID`` = 16 per uid (VNIC and VSIC together); each device
  host holds ``vdev.hostloop.MAX_FUNCTIONS`` = 64, the last ``ROOT_RESERVED_FUNCTIONS`` = 8
  for root only;
* per uid: one request served per loop turn, however many connections it has;
* per connection: 1 pending reply, ``REPLY_DEADLINE`` = 5 s to read it, one request of at
  most ``vdev.control.MAX_REQUEST`` bytes being assembled, ``DATAGRAMS_PER_TURN`` = 64
  datagrams read per loop turn;
* filters per function ``MAX_FILTERS_PER_FUNCTION`` = 64 (``vdev.control.MAX_FILTERS``).
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernelctl import tc, topology
from kernelctl.hostproc import DeviceHostProcess, HostError, nic_mac, vnic_host, vsic_host
from kernelctl.naming import FileServer, NamePlane, NamingError
from kernelctl.names import Topology
from kernelctl.names import topology as topology_names
from kernelctl.openflow import access as openflow_access
from kernelctl.openflow.channel import OpenFlowChannel
from kernelctl.openflow.datapath import FunctionPort, VnicDatapath
from kernelctl.openflow.switch import Switch
from kernelctl.policy import Policy, PolicyError
from kernelctl.storage import StoragePlane, StorageRequestError
from vdev import control
from vdev.hostloop import MAX_FUNCTIONS

log = logging.getLogger("kernelctl")

# Bounds on what callers can make the daemon hold (docs/security.md lists them too). Root
# (uid 0) is bounded only by the global values; every other uid also by its own.
MAX_CLIENTS = 256  # control connections, all uids together
ROOT_RESERVED_CLIENTS = 16  # of MAX_CLIENTS, only root may use the last ones
MAX_CLIENTS_PER_UID = 32  # control connections of one uid (not root)
MAX_FUNCTIONS_PER_UID = 16  # functions of one uid (not root), VNIC and VSIC together
ROOT_RESERVED_FUNCTIONS = 8  # of each device host's MAX_FUNCTIONS, kept for root
REPLY_DEADLINE = 5.0  # seconds a caller has to take a reply off its socket before it is dropped
ACCEPTS_PER_TURN = 32  # connections accepted per loop turn (the rest wait in the backlog)
DATAGRAMS_PER_TURN = 64  # datagrams read from one caller per loop turn
MAX_FILTERS_PER_FUNCTION = control.MAX_FILTERS
MAX_RATE_BPS = control.MAX_RATE_BPS
_UCRED = struct.Struct("3i")


class RequestError(Exception):
    """A control request that is refused; the message goes back to the caller."""


@dataclass(eq=False)
class Caller:
    """One control connection. The daemon reads no request from it while a reply to it is
    still queued, so it holds at most one reply per caller (pending replies: 1)."""

    channel: control.Channel
    pid: int
    uid: int
    gid: int
    functions: set[int] = field(default_factory=set)
    servers: set[int] = field(default_factory=set)  # file servers it started (name_serve)
    dropped: bool = False

    @property
    def sock(self) -> socket.socket:
        return self.channel.sock


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


Handler = Callable[["Caller", Any], tuple[object, list[int]]]
FdHandler = Callable[["Caller", Any, list[int]], tuple[object, list[int]]]


class Daemon:
    def __init__(
        self, topo: Topology, policy: Policy, spin: float | None = None, openflow_tls: int | None = None
    ) -> None:
        self.topo = topo
        self.openflow_tls = openflow_tls  # a TCP port on 127.0.0.1 for TLS controllers (0: any free one)
        self.openflow: OpenFlowChannel | None = None
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
        # The name tree and its live file servers; a server's channel sits in the selector.
        self.names = NamePlane(self._watch_server, self._unwatch_server, self._vsa_owners)
        # The control protocol's ops, by record class (vdev.control.CONTROL).
        self.handlers: dict[type[control.Record], Handler] = {
            control.OpenVnic: self._open_vnic,
            control.OpenVsa: self._open_vsa,
            control.AddFilter: self._add_filter,
            control.SetRate: self._set_rate,
            control.Status: self._status,
            control.Shutdown: self._shutdown,
            control.VsaCreate: self._storage_request,
            control.VsaResize: self._storage_request,
            control.VsaDelete: self._storage_request,
            control.VsaList: self._storage_request,
            control.VsaGrant: self._storage_request,
            control.VsaRevoke: self._storage_request,
            control.NamePublish: self._name_publish,
            control.NameMake: self._name_make,
            control.NameOpen: self._name_open,
            control.NameList: self._name_list,
            control.NameStat: self._name_stat,
            control.NameRemove: self._name_remove,
        }
        # Requests that come with file descriptors (their record's TAKES_FDS).
        self.fd_handlers: dict[type[control.Record], FdHandler] = {
            control.NameServe: self._name_serve,
        }
        missing = set(control.CONTROL.records.values()) - set(self.handlers) - set(self.fd_handlers)
        if missing:
            raise TypeError(f"no handler for {sorted(r.OP for r in missing)}")

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
        self.names.start(topo.registry_path)
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
        self._start_openflow()
        topo.pid_file.write_text(f"{os.getpid()}\n")
        log.info("kernelctl up: %s (pid %d)", path, os.getpid())

    def _start_openflow(self) -> None:
        """The VNIC's filter table as an OpenFlow 1.3 switch (kernelctl/openflow)."""
        grants = openflow_access.access(self.policy.source)
        mac = bytes.fromhex(nic_mac(self.topo).replace(":", ""))
        datapath = VnicDatapath(self._vnic_request, self._vnic_ports, mac, self.topo.tap, self._revoke_claim)
        switch = Switch(
            datapath,
            int.from_bytes(mac, "big"),
            {
                "mfr": "Arrakis on Linux",
                "hw": "VNIC device model (vdev.vnic)",
                "sw": "kernelctl",
                "serial": self.topo.tag or "default",
                "dp": f"VNIC on {self.topo.tap} of instance {self.topo.tag or 'default'}",
            },
        )
        channel = OpenFlowChannel(switch, self.selector, grants.may_connect, lambda uid: uid in grants.may_revoke)
        channel.listen_unix(self.topo.run_dir / "openflow.sock")
        if self.openflow_tls is not None:
            from kernelctl.openflow import tls

            context = tls.server_context(self.topo.run_dir / "openflow-tls")
            port = channel.listen_tls(self.openflow_tls, context)
            (self.topo.run_dir / "openflow-tls" / "port").write_text(f"{port}\n")
            log.info("openflow: TLS on 127.0.0.1:%d", port)
        self.openflow = channel

    def _vnic_request(self, body: control.Record) -> Any:
        host = self.hosts.get("vnic")
        if host is None:
            raise HostError("no VNIC device host")
        return host.request(body, [], self._on_function_closed)

    def _revoke_claim(self, function_id: int, proto: str, port: int) -> None:
        """An OpenFlow controller the policy lets revoke claims deleted this one's flow: the
        function loses the port (its receive and transmit filters, its tc classes)."""
        record = self.functions.get(function_id)
        claim = (proto, port)
        if record is None or claim not in record.claims:
            raise RequestError(f"function {function_id} holds no claim {proto}/{port}")
        self._host_request("vnic", control.HostRemoveFilter(function_id, proto, port), [])
        record.claims.remove(claim)
        if self.claims.get(claim) == function_id:
            del self.claims[claim]
        self._program_rates(record)
        log.info("openflow: claim %s/%d of function %d revoked by a controller", proto, port, function_id)

    def _vnic_ports(self) -> list[FunctionPort]:
        return [
            FunctionPort(record.function_id, record.name, record.created)
            for record in self.functions.values()
            if record.device == "vnic"
        ]

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
            served: set[int] = set()
            busy = self.openflow is not None and self.openflow.busy()
            for key, mask in self.selector.select(timeout=0 if busy else 0.5):
                # Nothing a caller or a device host does may end this loop: a failure is
                # logged, and the caller it concerns (if any) got an error reply.
                try:
                    if key.data == "listener":
                        self._accept()
                    elif isinstance(key.data, Caller):
                        # One request per uid per turn, not per connection: a uid with many
                        # connections gets no more of the daemon than a uid with one.
                        caller = key.data
                        if caller.uid in served:
                            mask &= ~selectors.EVENT_READ
                        if self._on_caller(caller, mask):
                            served.add(caller.uid)
                    elif isinstance(key.data, FileServer):
                        self.names.on_channel(key.data)
                    elif callable(key.data):
                        key.data(mask)  # an OpenFlow listener or controller session
                    elif key.data in self.hosts:
                        self._on_host_events(key.data)
                except Exception:
                    log.exception("control loop")
            try:
                self._check_hosts()
                self._check_deadlines()
                if self.openflow is not None:
                    vnic = self.hosts.get("vnic")
                    if vnic is not None:
                        for event in vnic.take_packet_ins():
                            self.openflow.switch.packet_in(event.flow_id, event.total_len, event.data)
                    self.openflow.tick(time.monotonic())
            except Exception:
                log.exception("control loop")

    def stop(self) -> None:
        self.running = False
        if self.openflow is not None:
            self.openflow.close()
            self.openflow = None
        for caller in list(self.callers.values()):
            self._drop_caller(caller)
        for host in self.hosts.values():
            try:
                self.selector.unregister(host.sock)
            except (KeyError, ValueError):
                pass
            host.stop()
        self.hosts.clear()
        try:
            self.names.stop()
        except Exception as exc:
            log.warning("names: %s", exc)
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
                host.flush()
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
            if kind == "vnic" and self.openflow is not None:
                # The new device has none of the controller's meters and flows: put them back.
                self.openflow.switch.reinstall()

    # ---- callers -----------------------------------------------------------------------

    def _accept(self) -> None:
        if self.listener is None:
            return
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the connection waits in the backlog
                log.warning("accept: %s", exc)
                return
            try:
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
                pid, uid, gid = _UCRED.unpack(creds)
                refusal = self._connection_refusal(uid)
                if refusal:
                    # Say why, without waiting for the caller: one small datagram or nothing.
                    try:
                        sock.send(control.Reply(None, False, error=refusal).to_json(), socket.MSG_DONTWAIT)
                    except OSError:
                        pass
                    sock.close()
                    continue
                caller = Caller(control.Channel(sock, max_input=control.MAX_REQUEST), pid, uid, gid)
            except OSError as exc:
                log.warning("accept: %s", exc)
                sock.close()
                continue
            self.callers[caller.channel.fileno()] = caller
            self.selector.register(caller.channel, selectors.EVENT_READ, caller)

    def _connection_refusal(self, uid: int) -> str:
        total = len(self.callers)
        if uid == 0:
            return f"kernelctl has {total} control connections (limit {MAX_CLIENTS})" if total >= MAX_CLIENTS else ""
        if total >= MAX_CLIENTS - ROOT_RESERVED_CLIENTS:
            return f"kernelctl has {total} control connections (limit {MAX_CLIENTS - ROOT_RESERVED_CLIENTS} for uids other than root)"
        held = sum(1 for caller in self.callers.values() if caller.uid == uid)
        if held >= MAX_CLIENTS_PER_UID:
            return f"uid {uid} already holds {held} control connections (limit {MAX_CLIENTS_PER_UID})"
        return ""

    def _on_caller(self, caller: Caller, mask: int) -> bool:
        """Write what waits for the caller, then read (and answer) at most one request;
        whether a request was served."""
        if caller.dropped:
            return False
        if mask & selectors.EVENT_WRITE:
            self._flush(caller)
        if caller.dropped or caller.channel.pending or not mask & selectors.EVENT_READ:
            return False  # no new request while a reply waits: one pending reply per caller
        served = False
        for incoming in caller.channel.receive(max_messages=1, max_datagrams=DATAGRAMS_PER_TURN):
            self._serve(caller, incoming)
            served = True
        if caller.channel.closed and not caller.dropped:
            self._drop_caller(caller)
        return served

    def _serve(self, caller: Caller, incoming: control.Incoming) -> None:
        """Answer one request; whatever happens, the caller gets a reply and the loop goes on."""
        try:
            self._serve_request(caller, incoming)
        finally:
            control.close_fds(incoming.fds)  # a handler keeps its own copies (os.dup)

    def _serve_request(self, caller: Caller, incoming: control.Incoming) -> None:
        if incoming.payload is None:
            self._reply(caller, control.Reply(None, False, error=f"malformed request: {incoming.error}"))
            return
        try:
            request = control.CONTROL.decode(incoming.payload)
        except control.RequestRefused as exc:
            self._reply(caller, control.Reply(exc.request_id, False, error=str(exc)))
            return
        reply_fds: list[int] = []
        try:
            if len(incoming.fds) != request.body.TAKES_FDS:
                raise RequestError(
                    f"{request.body.OP} comes with {request.body.TAKES_FDS} file descriptors, not {len(incoming.fds)}"
                )
            fd_handler = self.fd_handlers.get(type(request.body))
            if fd_handler is not None:
                result, reply_fds = fd_handler(caller, request.body, list(incoming.fds))
            else:
                result, reply_fds = self.handlers[type(request.body)](caller, request.body)
        except RequestError as exc:
            self._reply(caller, control.Reply(request.id, False, error=str(exc)))
        except Exception as exc:
            log.exception("%s from uid %d", request.body.OP, caller.uid)
            self._reply(caller, control.Reply(request.id, False, error=f"internal error: {type(exc).__name__}: {exc}"))
        else:
            self._reply(caller, control.Reply(request.id, True, result), reply_fds)
        finally:
            control.close_fds(reply_fds)  # the channel holds its own copies until sent

    def _reply(self, caller: Caller, reply: control.Reply, fds: list[int] | None = None) -> None:
        if caller.dropped:
            return
        try:
            payload = reply.to_json()
        except control.ProtocolError as exc:
            payload = control.Reply(reply.id, False, error=f"the reply is too large: {exc}").to_json()
            fds = None
        try:
            caller.channel.send(payload, fds or ())
        except (control.ChannelFull, OSError) as exc:
            log.warning("dropping pid %d (uid %d): %s", caller.pid, caller.uid, exc)
            self._drop_caller(caller)
            return
        self._flush(caller)

    def _flush(self, caller: Caller) -> None:
        """Write what the caller's socket takes now; never wait for it."""
        try:
            caller.channel.flush()
        except OSError:
            self._drop_caller(caller)
            return
        events = selectors.EVENT_WRITE if caller.channel.pending else selectors.EVENT_READ
        if self.selector.get_key(caller.channel).events != events:
            self.selector.modify(caller.channel, events, caller)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for caller in list(self.callers.values()):
            if caller.channel.pending and now - caller.channel.stalled_since > REPLY_DEADLINE:
                log.warning(
                    "dropping pid %d (uid %d): it read no reply for %.0f s", caller.pid, caller.uid, REPLY_DEADLINE
                )
                self._drop_caller(caller)

    def _drop_caller(self, caller: Caller) -> None:
        if caller.dropped:
            return
        caller.dropped = True
        self.callers.pop(caller.channel.fileno(), None)
        try:
            self.selector.unregister(caller.channel)
        except (KeyError, ValueError):
            pass
        caller.channel.close()
        for function_id in list(caller.functions):
            self._destroy_function(function_id)

    # ---- requests ----------------------------------------------------------------------

    def _status(self, caller: Caller, body: control.Status) -> tuple[object, list[int]]:
        return self.status(), []

    def _shutdown(self, caller: Caller, body: control.Shutdown) -> tuple[object, list[int]]:
        if caller.uid != 0:
            raise RequestError("only root may shut kernelctl down")
        self.running = False
        return None, []

    def _storage_request(self, caller: Caller, body: control.Record) -> tuple[object, list[int]]:
        try:
            return self.storage.handle(body, caller.uid), []
        except StorageRequestError as exc:
            raise RequestError(str(exc)) from None

    # ---- names (kernelctl/naming.py) --------------------------------------------------------

    def _watch_server(self, server: FileServer) -> None:
        self.selector.register(server.channel, selectors.EVENT_READ, server)

    def _unwatch_server(self, server: FileServer) -> None:
        try:
            self.selector.unregister(server.channel)
        except (KeyError, ValueError):
            pass
        for caller in self.callers.values():
            caller.servers.discard(server.server_id)

    def _vsa_owners(self) -> list[tuple[str, int]]:
        registry = self.storage.registry
        return [(vsa.name, vsa.owner_uid) for vsa in registry.list()] if registry is not None else []

    def _vsa_writable(self, name: str, uid: int) -> None:
        try:
            self.storage.check_access(name, uid, True)
        except StorageRequestError as exc:
            raise NamingError(f"EACCES: {exc}") from None

    def _naming(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except NamingError as exc:
            raise RequestError(str(exc)) from None

    def _name_serve(self, caller: Caller, body: control.NameServe, fds: list[int]) -> tuple[object, list[int]]:
        result = self._naming(lambda: self.names.serve(caller.uid, caller.gid, caller.pid, body, fds))
        caller.servers.add(result["server"])
        return result, []

    def _name_publish(self, caller: Caller, body: control.NamePublish) -> tuple[object, list[int]]:
        return self._naming(lambda: self.names.publish(caller.uid, body, caller.servers)), []

    def _name_make(self, caller: Caller, body: control.NameMake) -> tuple[object, list[int]]:
        return self._naming(lambda: self.names.make(caller.uid, caller.gid, body, self._vsa_writable)), []

    def _name_open(self, caller: Caller, body: control.NameOpen) -> tuple[object, list[int]]:
        result, fds = self._naming(lambda: self.names.open(caller.uid, caller.gid, body))
        return result, fds

    def _name_list(self, caller: Caller, body: control.NameList) -> tuple[object, list[int]]:
        return self._naming(lambda: self.names.list(caller.uid, caller.gid, body)), []

    def _name_stat(self, caller: Caller, body: control.NameStat) -> tuple[object, list[int]]:
        return self._naming(lambda: self.names.stat(caller.uid, caller.gid, body)), []

    def _name_remove(self, caller: Caller, body: control.NameRemove) -> tuple[object, list[int]]:
        return self._naming(lambda: self.names.remove(caller.uid, caller.gid, body)), []

    def _check_function_quota(self, caller: Caller, device: str) -> None:
        if caller.uid == 0:
            return  # root is bounded by the device hosts' MAX_FUNCTIONS only
        held = sum(1 for record in self.functions.values() if record.owner_uid == caller.uid)
        if held >= MAX_FUNCTIONS_PER_UID:
            raise RequestError(f"uid {caller.uid} already holds {held} functions (limit {MAX_FUNCTIONS_PER_UID})")
        on_device = sum(1 for record in self.functions.values() if record.device == device)
        if on_device >= MAX_FUNCTIONS - ROOT_RESERVED_FUNCTIONS:
            raise RequestError(
                f"the {device} device holds {on_device} functions; its last {ROOT_RESERVED_FUNCTIONS} "
                f"of {MAX_FUNCTIONS} are kept for root"
            )

    def _host_request(self, kind: str, body: control.Record, fds: list[int]) -> Any:
        host = self.hosts.get(kind)
        if host is None:
            raise RequestError(f"no {kind} device host")
        try:
            return host.request(body, fds, self._on_function_closed)
        except HostError as exc:
            raise RequestError(f"{kind} device host: {exc}") from None

    def _check_claims(self, caller: Caller, filters: tuple[control.Filter, ...]) -> list[tuple[str, int]]:
        claims = [(spec.proto, spec.port) for spec in filters]
        if len(set(claims)) != len(claims):
            raise RequestError("the same port is asked for twice")
        for claim in claims:
            self._check_claim(caller, claim)
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

    def _open_vnic(self, caller: Caller, body: control.OpenVnic) -> tuple[object, list[int]]:
        claims = self._check_claims(caller, body.filters)
        self._check_function_quota(caller, "vnic")
        function_id = self._next_function
        self._next_function += 1
        app_end, device_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._host_request(
                "vnic",
                control.VnicCreateFunction(
                    function_id=function_id,
                    ip=self.topo.vnic_ip,
                    rx_filters=body.filters,
                    queues=body.queues,
                    rx_bps=body.rx_bps,
                    tx_bps=body.tx_bps,
                    owner_pid=caller.pid,
                    owner_uid=caller.uid,
                    name=body.name,
                ),
                [device_end.fileno()],
            )
        except RequestError:
            app_end.close()
            raise
        finally:
            device_end.close()
        record = FunctionRecord(
            function_id, caller.pid, caller.uid, body.name, claims, body.rx_bps, body.tx_bps, time.time()
        )
        self.functions[function_id] = record
        for claim in claims:
            self.claims[claim] = function_id
        caller.functions.add(function_id)
        self._program_rates(record)
        fd = os.dup(app_end.fileno())
        app_end.close()
        return {"function_id": function_id, "ip": self.topo.vnic_ip, "prefix_len": self.topo.subnet_prefix}, [fd]

    def _open_vsa(self, caller: Caller, body: control.OpenVsa) -> tuple[object, list[int]]:
        """Access is checked here, once; then the app talks to the VSIC device host alone."""
        try:
            vsa = self.storage.check_access(body.name, caller.uid, body.write)
        except StorageRequestError as exc:
            raise RequestError(str(exc)) from None
        self._check_function_quota(caller, "vsic")
        function_id = self._next_function
        self._next_function += 1
        app_end, device_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            result = self._host_request(
                "vsic",
                control.VsicCreateFunction(
                    function_id=function_id,
                    extents=tuple((extent.physical_block, extent.block_count) for extent in vsa.extents),
                    read_only=not body.write,
                    iops=body.iops,
                    bps=body.bps,
                    name=body.name,
                    owner_pid=caller.pid,
                    owner_uid=caller.uid,
                ),
                [device_end.fileno()],
            )
        except RequestError:
            app_end.close()
            raise
        finally:
            device_end.close()
        record = FunctionRecord(
            function_id, caller.pid, caller.uid, f"vsa:{body.name}", [], 0, 0, time.time(),
            device="vsic", vsa=body.name, writable=body.write,
        )
        self.functions[function_id] = record
        caller.functions.add(function_id)
        fd = os.dup(app_end.fileno())
        app_end.close()
        capacity = result.get("capacity_blocks") if isinstance(result, dict) else None
        return {"function_id": function_id, "vsa": body.name, "writable": body.write, "capacity_blocks": capacity}, [fd]

    def _vnic_function(self, function_id: int, what: str) -> FunctionRecord:
        record = self.functions.get(function_id)
        if record is None:
            raise RequestError(f"no function {function_id}")
        if record.device != "vnic":
            # A storage function's limits are iops/bps, set when the VSA is opened; a VNIC
            # request must not reach the VNIC host about a function it does not serve.
            raise RequestError(f"function {function_id} is a {record.device} function; {what} is for VNIC functions")
        return record

    def _add_filter(self, caller: Caller, body: control.AddFilter) -> tuple[object, list[int]]:
        if body.function_id not in caller.functions:
            raise RequestError("no such function of yours")
        record = self._vnic_function(body.function_id, "add_filter")
        if len(record.claims) >= MAX_FILTERS_PER_FUNCTION:
            raise RequestError(f"at most {MAX_FILTERS_PER_FUNCTION} filters per function")
        (claim,) = self._check_claims(caller, (control.Filter(body.proto, body.port),))
        self._host_request("vnic", control.HostAddFilter(body.function_id, body.proto, body.port), [])
        record.claims.append(claim)
        self.claims[claim] = body.function_id
        self._program_rates(record)
        return None, []

    def _set_rate(self, caller: Caller, body: control.SetRate) -> tuple[object, list[int]]:
        record = self._vnic_function(body.function_id, "set_rate")
        if caller.uid != 0 and caller.uid != record.owner_uid:
            raise RequestError("only root or the owner may change a function's rate")
        self._host_request("vnic", control.HostSetRate(body.function_id, body.rx_bps, body.tx_bps), [])
        record.rx_bps, record.tx_bps = body.rx_bps, body.tx_bps
        self._program_rates(record)
        return None, []

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
                host.request(control.DestroyFunction(function_id), [], self._on_function_closed)
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
        host.drain_events(self._on_function_closed)

    def _on_function_closed(self, function_id: int) -> None:
        self._reclaim(function_id)

    # ---- status ----------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        device: object = None
        storage_device: object = None
        if self.host is not None:
            try:
                device = self.host.request(control.Stats(), [], self._on_function_closed)
            except Exception as exc:
                device = {"error": str(exc)}
        vsic = self.hosts.get("vsic")
        if vsic is not None:
            try:
                storage_device = vsic.request(control.Stats(), [], self._on_function_closed)
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
            "names": self.names.status(),
            "openflow": None if self.openflow is None else {
                "socket": str(self.topo.run_dir / "openflow.sock"),
                "controllers": len(self.openflow.sessions),
                "refused": self.openflow.refused,
                "counters": dict(self.openflow.switch.counters),
                "flows": self.openflow.switch.status(time.monotonic()),
            },
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="kernelctl daemon (started by 'kernelctl up')")
    parser.add_argument("--instance", default="")
    parser.add_argument("--policy", type=Path, default=None)
    parser.add_argument("--spin", type=float, default=None, help="device host polling window, seconds")
    parser.add_argument("--openflow-tls", type=int, default=None, help="TLS OpenFlow listener port on 127.0.0.1 (0: any)")
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
    try:
        openflow_access.access(policy.source)
    except openflow_access.OpenFlowConfigError as exc:
        print(f"kernelctl: policy: {exc}", file=sys.stderr)
        return 1
    daemon = Daemon(topology_names(args.instance), policy, spin=args.spin, openflow_tls=args.openflow_tls)

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
