"""kernelctl's naming plane (kernelctl/naming.py) without a daemon: servers, opens, the
notes a server gets, a full channel, and withdrawal when a channel closes or speaks."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from kernelctl.naming import FileServer, NamePlane, NamingError
from vdev import control


@pytest.fixture
def plane(tmp_path: Path) -> NamePlane:
    watched: list[FileServer] = []
    plane = NamePlane(watched.append, lambda server: watched.remove(server), lambda: [])
    plane.start(tmp_path / "registry.sqlite")
    return plane


def serve(plane: NamePlane, uid: int = 1000, base: str = "/apps/srv") -> tuple[socket.socket, int]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    body = control.NameServe(names=(control.NameSpec(path=base, kind="dir", mode=0o755),
                                    control.NameSpec(path=f"{base}/f", mode=0o640)))
    result = plane.serve(uid, uid, 4242, body, [theirs.fileno()])
    theirs.close()
    return ours, result["server"]


def test_open_hands_the_server_a_note_and_a_socket(plane: NamePlane) -> None:
    channel, server_id = serve(plane)
    result, fds = plane.open(1000, 1000, control.NameOpen(path="/apps/srv/f"))
    assert result["kind"] == "served" and len(fds) == 1
    data, server_fds, _, _ = socket.recv_fds(channel, 4096, 4)
    note = json.loads(data)
    assert note == {"op": "connect", "path": "/apps/srv/f", "uid": 1000, "gid": 1000, "write": False}
    reader, server_end = socket.socket(fileno=fds[0]), socket.socket(fileno=server_fds[0])
    reader.sendall(b"ping")
    assert server_end.recv(4) == b"ping"  # connected to each other, kernelctl off the path
    with pytest.raises(NamingError, match="EACCES"):  # 0640: others may not
        plane.open(1001, 1001, control.NameOpen(path="/apps/srv/f"))
    with pytest.raises(NamingError, match="EPERM"):
        plane.open(1000, 1000, control.NameOpen(path="/apps/srv/f", as_uid=0))
    assert plane.open(0, 0, control.NameOpen(path="/apps/srv/f", as_uid=1000, as_gid=1000))[0]["kind"] == "served"


def test_a_full_channel_is_busy_and_a_closed_one_withdraws(plane: NamePlane) -> None:
    channel, server_id = serve(plane)
    busy = None
    for _ in range(10_000):  # the server takes no notes: its channel fills
        try:
            _, fds = plane.open(1000, 1000, control.NameOpen(path="/apps/srv/f"))
            control.close_fds(fds)
        except NamingError as exc:
            busy = str(exc)
            break
    assert busy is not None and busy.startswith("EAGAIN")
    channel.close()
    plane.on_channel(plane.servers[server_id])
    assert server_id not in plane.servers
    with pytest.raises(NamingError, match="ENOENT"):
        plane.stat(0, 0, control.NameStat(path="/apps/srv"))


def test_a_server_that_speaks_on_its_channel_is_withdrawn(plane: NamePlane) -> None:
    channel, server_id = serve(plane)
    channel.send(b"hello")
    plane.on_channel(plane.servers[server_id])
    assert server_id not in plane.servers and plane.status()["names"] == 3  # /, /apps, /vsa


def test_serve_checks_its_fd_and_the_uid_bound(plane: NamePlane, monkeypatch: pytest.MonkeyPatch) -> None:
    stream, other = socket.socketpair()
    with pytest.raises(NamingError, match="SEQPACKET"):
        plane.serve(1000, 1000, 1, control.NameServe(names=(control.NameSpec(path="/apps/x"),)), [stream.fileno()])
    monkeypatch.setattr("kernelctl.naming.MAX_SERVERS_PER_UID", 1)
    serve(plane)
    with pytest.raises(NamingError, match="EAGAIN"):
        serve(plane, base="/apps/second")
    serve(plane, uid=0, base="/apps/root")  # root: only the global bound
    stream.close()
    other.close()
