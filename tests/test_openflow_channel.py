"""The OpenFlow channel (kernelctl/openflow/channel.py) in a selector loop of its own, no
root: a controller that never reads is paused, not buffered without bound; a closing one
does not keep the loop awake; sessions and their fds go away with their peers."""

from __future__ import annotations

import os
import selectors
import socket
import time
from pathlib import Path

from kernelctl.openflow import channel as channel_module
from kernelctl.openflow.channel import READ_PAUSE, OpenFlowChannel
from kernelctl.openflow.messages import FeaturesRequest, Hello, MultipartRequest
from kernelctl.openflow.constants import MultipartType
from kernelctl.openflow.switch import Switch
from tests.test_openflow_switch import FakeDatapath


def make(tmp_path: Path) -> tuple[OpenFlowChannel, selectors.BaseSelector, Path]:
    selector = selectors.DefaultSelector()
    switch = Switch(FakeDatapath(), 1, {"mfr": "m", "hw": "h", "sw": "s", "serial": "x", "dp": "d"})
    channel = OpenFlowChannel(switch, selector, lambda uid: uid == os.geteuid())
    path = tmp_path / "openflow.sock"
    channel.listen_unix(path)
    return channel, selector, path


def turn(channel: OpenFlowChannel, selector: selectors.BaseSelector, timeout: float = 0.01) -> None:
    for key, mask in selector.select(timeout=0 if channel.busy() else timeout):
        key.data(mask)
    channel.tick(time.monotonic())


def test_a_controller_that_never_reads_is_paused(tmp_path: Path) -> None:
    channel, selector, path = make(tmp_path)
    greedy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    greedy.connect(str(path))
    greedy.setblocking(False)
    # Port descriptions are 16 times the request's size: the replies outgrow what is read.
    request = MultipartRequest(1, MultipartType.DESC).emit()
    greedy.send(Hello(1).emit())
    pushed = 0
    blocked = 0
    while blocked < 20:  # until its socket buffer is full and stays full
        try:
            pushed += greedy.send(request * 64)
        except BlockingIOError:
            blocked += 1
        turn(channel, selector)
    (session,) = channel.sessions.values()
    # It is paused: its output stopped growing near READ_PAUSE (plus one turn's replies),
    # and what it still sends waits in its own socket buffer.
    assert READ_PAUSE <= session.conn.pending_output < READ_PAUSE + 64 * 1100 + (1 << 16)
    assert not channel.busy()
    assert pushed > 0
    # A session whose output does not move for STALL_DEADLINE is closed.
    session.stalled_since -= channel_module.STALL_DEADLINE + 1
    turn(channel, selector)
    assert channel.sessions == {}
    greedy.close()
    for _ in range(50):
        turn(channel, selector)
    assert channel.sessions == {}
    channel.close()
    assert not path.exists()


def test_a_closing_session_does_not_keep_the_loop_awake(tmp_path: Path) -> None:
    channel, selector, path = make(tmp_path)
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.connect(str(path))
    # The first message is not HELLO: an error, then the session must close; the requests
    # after it are never served.
    peer.send(FeaturesRequest(1).emit() * 20)
    for _ in range(20):
        turn(channel, selector)
    assert not channel.busy()
    assert channel.sessions == {}
    data = peer.recv(200)
    assert data[:2] == b"\x04\x00" and data[16:18] == b"\x04\x01"  # our HELLO, then the error
    peer.close()
    channel.close()


def test_refused_uids_and_fds(tmp_path: Path) -> None:
    selector = selectors.DefaultSelector()
    switch = Switch(FakeDatapath(), 1, {"mfr": "m", "hw": "h", "sw": "s", "serial": "x", "dp": "d"})
    channel = OpenFlowChannel(switch, selector, lambda uid: False)
    path = tmp_path / "openflow.sock"
    channel.listen_unix(path)
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(100):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as peer:
            peer.connect(str(path))
            turn(channel, selector)
    assert channel.refused == 100 and channel.sessions == {}
    assert len(os.listdir("/proc/self/fd")) <= fds
    assert channel_module.MAX_SESSIONS > 0
    channel.close()
