"""The name tree and way 1 (the file server RPC) end to end, as root, on one instance:
``kernelctl ls/stat/cat/rm/mkdir``, modes against another uid (setpriv), names withdrawn
when their server dies, the kv server's live names, hostile readers, and a server that
dies under a reader."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from kernelctl.client import ControlClient, ControlError
from kernelctl.fileclient import FileClient, FileRpcError, open_name
from kernelctl.names import Topology
from tests.conftest import KERNELCTL, REPO, kernelctl
from tests.helpers import App, pid_alive
from vdev import control

pytestmark = pytest.mark.root
OTHER = ["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups"]


@pytest.fixture
def topo(names_instance: Topology) -> Topology:
    return names_instance


def run_as_other(topo: Topology, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*OTHER, *KERNELCTL, "--instance", topo.tag, *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def share(topo: Topology, directory: Path, name: str, *extra: str) -> App:
    return App("libos.apps.fileshare", "--instance", topo.tag, "--name", name, str(directory), *extra)


def names_under(topo: Topology, path: str) -> list[str]:
    listing = json.loads(kernelctl(topo.tag, "ls", "-j", path).stdout)
    return [entry["name"] for entry in listing["entries"]]


def listed(client: ControlClient, path: str) -> list[str]:
    result, _ = client.call(control.NameList(path=path))
    return [entry["name"] for entry in result["entries"]]


def wait_gone(topo: Topology, path: str, name: str, within: float) -> float:
    """Seconds until ``path/name`` is withdrawn, asked in-process (a CLI per look would
    spend the budget starting Python)."""
    start = time.monotonic()
    with ControlClient(topo.control_socket) as client:
        while name in listed(client, path):
            assert time.monotonic() - start < within, f"{path}/{name} still there after {within} s"
            time.sleep(0.02)
    return time.monotonic() - start


def test_ls_stat_cat_modes_and_withdrawal(topo: Topology, tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "hello.txt").write_bytes(b"hello, names\n")
    (tmp_path / "sub" / "blob").write_bytes(os.urandom(3 << 20))
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "s").write_bytes(b"s\n")
    with share(topo, tmp_path, "share") as app:
        long = kernelctl(topo.tag, "ls", "-l", "/apps/share").stdout
        assert "-rw-r--r--" in long and "served" in long and "hello.txt" in long and "sub" in long
        assert kernelctl(topo.tag, "cat", "/apps/share/hello.txt").stdout == "hello, names\n"
        out = subprocess.run([*KERNELCTL, "--instance", topo.tag, "cat", "/apps/share/sub/blob"],
                             capture_output=True, timeout=60, cwd=REPO)
        assert out.returncode == 0 and out.stdout == (tmp_path / "sub" / "blob").read_bytes()
        stat = json.loads(kernelctl(topo.tag, "stat", "-j", "/apps/share/hello.txt").stdout)
        assert (stat["kind"], stat["owner_uid"], stat["mode"]) == ("served", 0, 0o644)
        # Another uid: admitted where the mode allows, refused where it does not.
        assert run_as_other(topo, "cat", "/apps/share/hello.txt").stdout == "hello, names\n"
        refused = run_as_other(topo, "rm", "/apps/share/hello.txt")
        assert refused.returncode == 1 and "EACCES" in refused.stderr
        # The server dies (SIGKILL: no goodbye): its names are gone within a second.
        os.kill(app.pid, signal.SIGKILL)
        assert wait_gone(topo, "/apps", "share", within=1.0) < 1.0
    with share(topo, tmp_path, "private", "--mode", "600", "--dir-mode", "700"):
        refused = run_as_other(topo, "cat", "/apps/private/hello.txt")
        assert refused.returncode == 1 and "EACCES" in refused.stderr
        assert run_as_other(topo, "ls", "/apps/private").returncode == 1
        assert "private" in run_as_other(topo, "ls", "/apps").stdout
    assert "private" not in names_under(topo, "/apps")  # SIGTERM: withdrawn as well


def test_sticky_apps_and_mkdir_modes(topo: Topology) -> None:
    kernelctl(topo.tag, "mkdir", "/apps/rootdir")
    made = run_as_other(topo, "mkdir", "/apps/rootdir/x")
    assert made.returncode == 1 and "EACCES" in made.stderr  # root's 0755 directory
    assert run_as_other(topo, "rm", "/apps/rootdir").returncode == 1  # /apps is sticky
    assert run_as_other(topo, "mkdir", "/apps/users-own").returncode == 0
    kernelctl(topo.tag, "rm", "/apps/rootdir")
    assert "rootdir" not in names_under(topo, "/apps")


def test_kv_server_serves_keys_and_info_live(topo: Topology) -> None:
    port = 6300 + os.getpid() % 500
    with App("libos.apps.kv", "--backend", "vnic", "--instance", topo.tag, "--port", str(port)) as app:
        base = f"/apps/kv-{port}"
        assert sorted(names_under(topo, base)) == ["info", "keys"]
        assert kernelctl(topo.tag, "cat", f"{base}/keys").stdout == ""
        for key in ("alpha", "beta", "gamma"):
            subprocess.run(["ip", "netns", "exec", topo.client_netns, "redis-cli", "-h", topo.vnic_ip, "-p",
                            str(port), "set", key, "v"], check=True, capture_output=True, timeout=30)
        assert sorted(kernelctl(topo.tag, "cat", f"{base}/keys").stdout.split()) == ["alpha", "beta", "gamma"]
        info = kernelctl(topo.tag, "cat", f"{base}/info").stdout
        assert f"tcp_port:{port}" in info and "db0:keys=3" in info
        app.stop()
    assert f"kv-{port}" not in names_under(topo, "/apps")


def test_hostile_readers_cost_only_their_connection(topo: Topology, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 100_000)
    with share(topo, tmp_path, "hostile") as app, ControlClient(topo.control_socket) as client:
        attacks = [
            b"\xff" * 64,  # garbage
            b"\x7f\xff\xff\xff" + b"\x01" * 8,  # a length far past the bound
            b"\x00\x00\x00\x05\x02\x00\x00\x00\x01",  # a READ with no body, then silence
            b"\x00\x00\x00\x07",  # truncated header, then gone
        ]
        for attack in attacks:
            _, sock = open_name(client, "/apps/hostile/f")
            assert sock is not None
            sock.sendall(attack)
            sock.close()
        idle = [open_name(client, "/apps/hostile/f")[1] for _ in range(20)]  # readers that never read
        for sock in idle:
            assert sock is not None
            with FileClient(sock, timeout=10) as files:  # out of order: READ before OPEN
                with pytest.raises(FileRpcError) as refused:
                    files.read(1, 0, 10)
                assert refused.value.errno == errno.EBADF
        _, sock = open_name(client, "/apps/hostile/f")
        assert sock is not None
        with FileClient(sock) as files:
            handle, attr = files.open("/apps/hostile/f")
            assert attr.size == 100_000 and b"".join(files.read_all(handle)) == b"x" * 100_000
        # A name the connection was not granted, and a control request with a bad path.
        with pytest.raises(ControlError, match="ENOENT"):
            open_name(client, "/apps/hostile/missing")
        with pytest.raises((ControlError, control.ProtocolError)):
            client.request("name_open", path="/apps/../etc", write=False)
        assert pid_alive(app.pid)
        assert kernelctl(topo.tag, "cat", "/apps/hostile/f").stdout == "x" * 100_000


def test_acting_for_another_uid_is_root_only(topo: Topology) -> None:
    script = (
        "from kernelctl.client import ControlClient, ControlError\n"
        "from kernelctl.fileclient import open_name\n"
        f"c = ControlClient({str(topo.control_socket)!r})\n"
        "try:\n    open_name(c, '/apps', as_uid=0)\nexcept ControlError as e:\n    print(e)\n"
    )
    out = subprocess.run([*OTHER, KERNELCTL[0], "-c", script], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert "EPERM" in out.stdout, out.stderr


def test_a_server_that_dies_gives_its_reader_an_error_not_a_hang(topo: Topology, tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(os.urandom(16 << 20))
    with share(topo, tmp_path, "dying") as app, ControlClient(topo.control_socket) as client:
        _, sock = open_name(client, "/apps/dying/big")
        assert sock is not None
        with FileClient(sock, timeout=30) as files:
            handle, _ = files.open("/apps/dying/big")
            assert len(files.read(handle, 0, 1 << 20)) == 1 << 20
            os.kill(app.pid, signal.SIGKILL)
            start = time.monotonic()
            with pytest.raises(FileRpcError) as failed:
                for offset in range(1 << 20, 16 << 20, 1 << 20):
                    files.read(handle, offset, 1 << 20)
            assert failed.value.errno == errno.EIO and time.monotonic() - start < 1.0
    wait_gone(topo, "/apps", "dying", within=1.0)


def test_bad_serve_requests_are_refused(topo: Topology) -> None:
    with ControlClient(topo.control_socket) as client:
        with pytest.raises(ControlError, match="file descriptors"):
            client.request("name_serve", names=[{"path": "/apps/nofd"}])
        stream_a, stream_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with pytest.raises(ControlError, match="SEQPACKET"):
            client.call(control.NameServe(names=(control.NameSpec(path="/apps/wrongfd", kind="dir"),)),
                        fds=[stream_a.fileno()])
        stream_a.close()
        stream_b.close()
        with pytest.raises(ControlError, match="ENOENT"):
            client.call(control.NamePublish(server=12345, names=(control.NameSpec(path="/apps/x", kind="dir"),)))
        for bad in ({"path": "/apps/x", "mode": 0o77777}, {"path": "x" * 2000}, {"path": "/apps/x", "kind": "vsa"}):
            with pytest.raises(ControlError):
                client.request("name_publish", server=1, names=[bad])
    assert "nofd" not in names_under(topo, "/apps")


def test_durable_kv_snapshot_is_a_store_file_a_grantee_reads(topo: Topology) -> None:
    port = 6800 + os.getpid() % 500
    vsa = f"kvsnap{port}"
    with App("libos.apps.kv", "--backend", "vnic", "--instance", topo.tag, "--port", str(port), "--durable",
             "--vsa", vsa, "--log-size", str(8 << 20)) as app:
        base = f"/apps/kv-{port}"
        assert sorted(names_under(topo, base)) == ["info", "keys", "snapshot"]
        # ~10 MiB of SETs through a 2 MiB log half: the log fills and snapshots.
        subprocess.run(["ip", "netns", "exec", topo.client_netns, "redis-benchmark", "-h", topo.vnic_ip, "-p",
                        str(port), "-t", "set", "-n", "400", "-d", "25000", "-r", "20", "-c", "2", "-q"],
                       check=True, capture_output=True, timeout=120)
        snapshot = subprocess.run([*KERNELCTL, "--instance", topo.tag, "cat", f"{base}/snapshot"],
                                  capture_output=True, timeout=60, cwd=REPO)
        assert snapshot.returncode == 0, snapshot.stderr
        assert snapshot.stdout.startswith(b"ARXKVSN1") and b"SET" in snapshot.stdout
        kernelctl(topo.tag, "vsa", "grant", vsa, "1000", "ro")
        granted = subprocess.run([*OTHER, *KERNELCTL, "--instance", topo.tag, "cat", f"{base}/snapshot"],
                                 capture_output=True, timeout=60, cwd=REPO)
        assert granted.returncode == 0 and granted.stdout[:8] == b"ARXKVSN1", granted.stderr
        app.stop()
    # The server is gone: its served names went with it, the snapshot's name stays.
    assert names_under(topo, f"/apps/kv-{port}") == ["snapshot"]
    # A restart finds its names in place (they are its own) and serves again.
    with App("libos.apps.kv", "--backend", "vnic", "--instance", topo.tag, "--port", str(port), "--durable",
             "--vsa", vsa, "--log-size", str(8 << 20)):
        assert sorted(names_under(topo, f"/apps/kv-{port}")) == ["info", "keys", "snapshot"]
        again = kernelctl(topo.tag, "mkdir", f"/apps/kv-{port}", check=False)
        assert again.returncode == 1 and "EEXIST" in again.stderr


def test_a_uid_runs_a_bounded_number_of_file_servers(topo: Topology) -> None:
    script = (
        "from libos.files import FileServer, MemoryFile, ServerError\n"
        "from kernelctl.naming import MAX_SERVERS_PER_UID\n"
        "servers = []\n"
        "for n in range(MAX_SERVERS_PER_UID + 1):\n"
        "    server = FileServer(%r)\n"
        "    try:\n"
        "        server.start([(f'/apps/quota{n}', MemoryFile(b'x'), 0o644)])\n"
        "    except ServerError as exc:\n"
        "        print(n, exc)\n"
        "        break\n"
        "    servers.append(server)\n"
        "for server in servers:\n"
        "    server.stop()\n"
    ) % topo.tag
    out = subprocess.run([*OTHER, KERNELCTL[0], "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.stdout.startswith("16 EAGAIN"), (out.stdout, out.stderr)
    deadline = time.monotonic() + 5
    while [name for name in names_under(topo, "/apps") if name.startswith("quota")]:
        assert time.monotonic() < deadline, "the stopped servers' names stayed"
        time.sleep(0.05)


def test_one_server_serves_many_readers_at_once(topo: Topology, tmp_path: Path) -> None:
    import hashlib
    import threading

    payload = os.urandom(4 << 20)
    (tmp_path / "f").write_bytes(payload)
    digests: list[str] = []
    errors: list[BaseException] = []

    def read_all() -> None:
        try:
            with ControlClient(topo.control_socket) as client:
                _, sock = open_name(client, "/apps/many/f")
            assert sock is not None
            with FileClient(sock) as files:
                handle, _ = files.open("/apps/many/f")
                digests.append(hashlib.sha256(b"".join(files.read_all(handle, chunk=256 << 10))).hexdigest())
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    with share(topo, tmp_path, "many"):
        readers = [threading.Thread(target=read_all) for _ in range(12)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(timeout=120)
    assert not errors and digests == [hashlib.sha256(payload).hexdigest()] * 12
