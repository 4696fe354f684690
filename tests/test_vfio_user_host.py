"""vfio-user robustness against the real device host process (root).

Each bad session gets its function from kernelctl like any app, then sends one kind of bad
message. The device host must answer with an error or close, keep serving, and hold no more
file descriptors after 1,000 such sessions than before.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import time

import pytest

from kernelctl.client import ControlClient
from kernelctl.names import Topology
from tests.helpers import echo_app, run_in_netns
from tests.test_e2e_udp import count_client
from vdev.vfio_user import wire

pytestmark = pytest.mark.root


def host_pid(topo: Topology) -> int:
    out = subprocess.run(["pgrep", "-f", f"vdev.vnic.host --tap {topo.tap} "], capture_output=True, text=True).stdout
    (pid,) = out.split()
    return int(pid)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def version(msg_id: int = 1) -> bytes:
    return wire.encode_message(msg_id, wire.CMD_VERSION, wire.encode_version(0, 2, {"capabilities": {"max_msg_fds": 8}}))


def memfd(size: int) -> int:
    fd = os.memfd_create("bad-session", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    import fcntl

    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


def bad_session(sock: socket.socket, kind: int) -> str:
    """Send one kind of bad input; returns what the host did: 'error <errno>' or 'closed'."""
    sock.settimeout(5.0)
    fds: list[int] = []
    try:
        if kind == 0:  # truncated header, then hang up
            sock.sendall(struct.pack("<HH", 1, wire.CMD_VERSION))
            sock.shutdown(socket.SHUT_WR)
        elif kind == 1:  # msg_size far beyond any limit
            sock.sendall(wire.HEADER.pack(1, wire.CMD_VERSION, 0xFFFFFFF0, wire.TYPE_COMMAND, 0))
        elif kind == 2:  # unknown command after a good VERSION
            sock.sendall(version())
            sock.recv(4096)
            sock.sendall(wire.encode_message(2, 99, b"\0" * 8))
        elif kind == 3:  # file descriptors on a message that takes none
            sock.sendall(version())
            sock.recv(4096)
            fds = [memfd(4096), memfd(4096)]
            socket.send_fds(sock, [wire.encode_message(2, wire.CMD_DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0))], fds)
        elif kind == 4:  # two DMA regions that overlap
            sock.sendall(version())
            sock.recv(4096)
            fds = [memfd(8192), memfd(8192)]
            socket.send_fds(sock, [wire.encode_message(2, wire.CMD_DMA_MAP, wire.encode_dma_map(3, 0, 0x100000, 8192))], fds[:1])
            sock.recv(4096)
            socket.send_fds(sock, [wire.encode_message(3, wire.CMD_DMA_MAP, wire.encode_dma_map(3, 0, 0x101000, 8192))], fds[1:])
        else:  # a DMA region beyond the end of its file
            sock.sendall(version())
            sock.recv(4096)
            fds = [memfd(4096)]
            socket.send_fds(sock, [wire.encode_message(2, wire.CMD_DMA_MAP, wire.encode_dma_map(3, 0, 0x100000, 1 << 20))], fds)
        reply = sock.recv(4096)
    except (ConnectionResetError, BrokenPipeError):
        return "closed"
    finally:
        for fd in fds:
            os.close(fd)
    if len(reply) < wire.HEADER_SIZE:
        return "closed"
    _msg_id, _command, _size, flags, error_no = wire.HEADER.unpack_from(reply)
    return f"error {error_no}" if flags & wire.FLAG_ERROR else "ok"


def test_thousand_bad_sessions_leave_the_device_host_serving_with_flat_fds(instance: Topology) -> None:
    with echo_app("vnic", instance.tag, 7):
        pid = host_pid(instance)
        assert run_in_netns(instance.client_netns, count_client, (instance.vnic_ip, 7), 20) == 20
        before = open_fds(pid)
        outcomes: dict[int, set[str]] = {kind: set() for kind in range(6)}
        with ControlClient(instance.control_socket) as control:
            for session in range(1000):
                sock, _info = control.open_vnic([("udp", 20000 + session % 50)], name="bad")
                kind = session % 6
                outcomes[kind].add(bad_session(sock, kind))
                sock.close()
                if session % 50 == 49:
                    # Ports come back once the device host has seen the sockets close.
                    deadline = time.monotonic() + 20
                    while time.monotonic() < deadline:
                        if not [f for f in control.status()["functions"] if f["name"] == "bad"]:
                            break
                        time.sleep(0.01)
        assert outcomes[0] == {"closed"}
        assert outcomes[1] <= {"closed", f"error {errno.EINVAL}", f"error {errno.EMSGSIZE}"}
        assert all(o.startswith("error") for o in outcomes[2]), outcomes[2]
        assert all(o.startswith("error") or o == "closed" for o in outcomes[3]), outcomes[3]
        assert outcomes[4] == {f"error {errno.EEXIST}"}
        assert all(o.startswith("error") for o in outcomes[5]), outcomes[5]
        # The host closes a dead session's fds when its loop sees the socket close: wait
        # for that with a deadline, then check.
        deadline = time.monotonic() + 20
        while open_fds(pid) > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert host_pid(instance) == pid
        assert open_fds(pid) <= before
        assert run_in_netns(instance.client_netns, count_client, (instance.vnic_ip, 7), 20) == 20
