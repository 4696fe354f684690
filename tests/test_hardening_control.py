"""Issue 7, defects 4 to 10: an unprivileged caller (uid 1000, through ``setpriv``) attacks
kernelctl's control socket and, through it, the device hosts. After each attack the daemon
and both device hosts still have their pids, and root's ``status`` answers.

One instance serves the whole module (building one costs seconds on a loaded machine);
every test leaves it as it found it: attackers exit, their functions are reclaimed.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from kernelctl.client import ControlClient
from kernelctl.daemon import MAX_CLIENTS_PER_UID, MAX_FUNCTIONS_PER_UID
from kernelctl.names import Topology, topology
from tests.conftest import REPO, kernelctl, require_root, running_instance, unique_tag
from vdev import control

pytestmark = pytest.mark.root

ATTACKER = 1000
OTHER = 1001


@pytest.fixture(scope="module")
def shared() -> Iterator[Topology]:
    require_root()
    with running_instance(topology(unique_tag())) as topo:
        yield topo


@dataclass(frozen=True)
class Pids:
    daemon: int
    vnic: int
    vsic: int


def _child(parent: int, module: str) -> int:
    out = subprocess.run(["pgrep", "-P", str(parent), "-f", module], capture_output=True, text=True).stdout.split()
    assert len(out) == 1, f"{module} children of {parent}: {out}"
    return int(out[0])


def pids(topo: Topology) -> Pids:
    daemon = int(topo.pid_file.read_text())
    return Pids(daemon, _child(daemon, "vdev.vnic.host"), _child(daemon, "vdev.vsic.host"))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def root_status(topo: Topology, within: float = 10.0) -> tuple[dict[str, object], float]:
    start = time.monotonic()
    with ControlClient(topo.control_socket, timeout=within) as client:
        status = client.status()
    return status, time.monotonic() - start


def assert_survived(topo: Topology, before: Pids) -> None:
    """Same pids, all alive, and a normal request (status, and a function) works."""
    assert pids(topo) == before
    assert all(alive(pid) for pid in (before.daemon, before.vnic, before.vsic))
    status, _elapsed = root_status(topo)
    assert isinstance(status["device"], dict) and "error" not in status["device"], status["device"]
    assert isinstance(status["storage_device"], dict) and "error" not in status["storage_device"]
    with ControlClient(topo.control_socket) as client:
        sock, info = client.open_vnic([("udp", 40999)], name="probe")
        sock.close()
        assert info["function_id"] > 0


def as_uid(uid: int, code: str, *args: str, timeout: float = 120) -> dict[str, object]:
    """Run ``code`` as ``uid`` (no other groups, no capabilities); its last stdout line is JSON."""
    result = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def start_as_uid(uid: int, code: str, *args: str) -> subprocess.Popen[str]:
    """Like ``as_uid`` for an attacker that holds what it took until its stdin closes."""
    return subprocess.Popen(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", sys.executable, "-c", textwrap.dedent(code), *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )


def first_line(process: subprocess.Popen[str], timeout: float = 120) -> dict[str, object]:
    """The JSON line the attacker prints once it holds its resources."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([process.stdout], [], [], 1.0)[0]:
            line = process.stdout.readline()
            if line:
                return dict(json.loads(line))
        if process.poll() is not None:
            raise AssertionError(f"attacker exited: {process.stderr.read() if process.stderr else ''}")
    raise AssertionError("the attacker did not report in time")


def finish(process: subprocess.Popen[str]) -> None:
    if process.stdin is not None:
        process.stdin.close()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def functions_of(topo: Topology, uid: int) -> int:
    status, _ = root_status(topo)
    functions: list[dict[str, Any]] = status["functions"]  # type: ignore[assignment]
    return sum(1 for f in functions if f["owner_uid"] == uid)


# A raw client as uid 1000: it sends what it likes and reports the replies it gets.
RAW = """
import json, socket, sys
from vdev import control
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
sock.settimeout(30)
sock.connect(sys.argv[1])
def reply():
    data, fds = control.recv_blocking(sock)
    return json.loads(data)
def status_works():
    control.send_blocking(sock, json.dumps({"id": 99, "op": "status"}).encode())
    answer = reply()
    return answer["ok"] and answer["id"] == 99
"""


def test_deeply_nested_json_is_refused_and_the_connection_lives(shared: Topology) -> None:
    before = pids(shared)
    result = as_uid(ATTACKER, RAW + """
depth = 200000
out = []
# in one datagram (within a part's size), then in parts, then inside an otherwise valid request
for payload in (b"[" * 30000 + b"]" * 30000,
                b"[" * depth + b"]" * depth,
                b'{"id": 1, "op": "status", "x": ' + b"[" * 10000 + b"]" * 10000 + b"}",
                b'{"id": 2, "op": "open_vnic", "filters": ' + b"[" * 5000 + b"]" * 5000 + b"}"):
    control.send_blocking(sock, payload)
    out.append(reply())
print(json.dumps({"replies": out, "then": status_works()}))
""", str(shared.control_socket))
    replies = result["replies"]
    assert isinstance(replies, list) and len(replies) == 4
    assert all(not r["ok"] for r in replies)
    assert all("nested deeper than 32" in r["error"] for r in replies), replies
    assert replies[3]["id"] == 2 or replies[3]["id"] is None
    assert result["then"] is True
    assert_survived(shared, before)


def test_a_huge_message_is_refused_unbuffered_and_the_connection_lives(shared: Topology) -> None:
    before = pids(shared)
    rss_before = _rss(before.daemon)
    result = as_uid(ATTACKER, RAW + """
out = []
# 64 MiB in parts: far over the request bound (and over a message's)
body = b'{"id": 5, "op": "status", "pad": "' + b"a" * (64 << 20) + b'"}'
control.send_blocking(sock, body)
out.append(reply())
# one datagram larger than a part (the daemon's receive buffer truncates it)
sock.send(b'{"id": 6, "op": "status", "pad": "' + b"b" * 150000 + b'"}')
out.append(reply())
print(json.dumps({"replies": out, "then": status_works()}))
""", str(shared.control_socket), timeout=300)
    replies = result["replies"]
    assert isinstance(replies, list)
    assert not replies[0]["ok"] and "larger than" in replies[0]["error"], replies[0]
    assert not replies[1]["ok"] and "larger than" in replies[1]["error"], replies[1]
    assert result["then"] is True
    # The parts past the bound were dropped as they came, not kept.
    assert _rss(before.daemon) - rss_before < 32 << 20
    assert_survived(shared, before)


def _rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_garbage_gets_error_replies_and_the_connection_lives(shared: Topology) -> None:
    before = pids(shared)
    result = as_uid(ATTACKER, RAW + """
import os
garbage = [
    b"\\x7f" + os.urandom(200), b"\\xff\\xfe\\x00", b"\\x02", b"\\x02{}", b"{", b"{}", b"[1, 2]", b'"text"',
    b'{"id": "1", "op": "status"}', b'{"id": -1, "op": "status"}', b'{"id": 1.5, "op": "status"}',
    b'{"id": 1, "op": 7}', b'{"id": 1, "op": "no_such_op"}', b'{"id": 1, "op": "__init__"}',
    b'{"id": 1, "op": "open_vnic", "filters": [{"proto": "udp", "port": 70000}]}',
    b'{"id": 1, "op": "open_vnic", "filters": [{"proto": "udp", "port": true}]}',
    b'{"id": 1, "op": "open_vnic", "filters": "udp/5000"}',
    b'{"id": 1, "op": "open_vnic", "filters": [{"proto": "udp", "port": 5000}], "name": "' + b"n" * 5000 + b'"}',
    b'{"id": 1, "op": "set_rate", "function_id": 1, "rx_bps": 1e300}',
    b'{"id": 1, "op": "vsa_create", "name": "x", "size_bytes": ' + b"9" * 5000 + b'}',
    b'{"id": 1, "op": "vsa_grant", "name": "x", "uid": 0, "mode": "all"}',
    b'{"id": 1, "op": "status", "x": NaN}',
]
out = []
for payload in garbage:
    sock.send(payload)
    out.append(reply())
# a request with file descriptors it does not take
r, w = os.pipe()
socket.send_fds(sock, [b'{"id": 3, "op": "status"}'], [r, w])
out.append(reply())
# a stray part: its message never started, the next one is read normally
sock.send(b"\\x01" + b"x" * 100)
sock.send(b'\\x02"}')
out.append(reply())
print(json.dumps({"replies": out, "then": status_works()}))
""", str(shared.control_socket))
    replies = result["replies"]
    assert isinstance(replies, list)
    for reply in replies[:-2]:
        assert reply["ok"] is False and reply["error"], reply
    assert replies[-2]["ok"] is False and "file descriptors" in replies[-2]["error"]
    assert replies[-1]["ok"] is False
    assert result["then"] is True
    assert_survived(shared, before)


def test_connections_that_never_read_replies_do_not_slow_root_down(shared: Topology) -> None:
    """Defect 8: 40 connections that ask for large replies and never read them. Root's
    ``status`` and ``open_vnic`` still answer within 2 s the whole time, and the daemon drops
    the connections that let their replies sit past ``REPLY_DEADLINE``."""
    before = pids(shared)
    attacker = start_as_uid(ATTACKER, """
import json, socket, sys, time
from kernelctl.client import ControlClient, ControlError
# Wide functions make every status reply large (hundreds of KiB): two fill a socket buffer.
owner = ControlClient(sys.argv[1])
held = [owner.open_vnic([("udp", 25000 + 64 * n + i) for i in range(64)])[0] for n in range(9)]
socks = []
for _ in range(40):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(sys.argv[1])
    sock.setblocking(False)
    socks.append(sock)
request = json.dumps({"id": 1, "op": "status"}).encode()
for _ in range(10):
    for sock in socks:
        try:
            sock.send(request)
        except OSError:
            pass
print(json.dumps({"connections": len(socks)}), flush=True)
import select
for line in sys.stdin:
    # A closed peer shows as POLLHUP without reading (reading would drain the daemon's queue).
    dropped = 0
    for sock in socks:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        dropped += any(mask & select.POLLHUP for _fd, mask in poller.poll(0))
    print(json.dumps({"dropped": dropped}), flush=True)
""", str(shared.control_socket))
    try:
        assert first_line(attacker)["connections"] == 40
        assert attacker.stdin is not None
        worst = 0.0
        dropped = 0
        give_up = time.monotonic() + 90
        # Root keeps working until the daemon has dropped every connection that let a reply
        # sit past the deadline (or refused it: over the uid's bound).
        while dropped < 40 and time.monotonic() < give_up:
            _status, elapsed = root_status(shared, within=10.0)
            worst = max(worst, elapsed)
            with ControlClient(shared.control_socket, timeout=10.0) as client:
                start = time.monotonic()
                sock, _info = client.open_vnic([("udp", 40998)])
                worst = max(worst, time.monotonic() - start)
                sock.close()
            attacker.stdin.write("check\n")
            attacker.stdin.flush()
            dropped = int(first_line(attacker)["dropped"])  # type: ignore[call-overload]
        assert worst < 2.0, f"root waited {worst:.2f} s behind callers that do not read"
        assert dropped == 40
        assert alive(before.daemon)
    finally:
        finish(attacker)
    wait_for(lambda: functions_of(shared, ATTACKER) == 0)
    assert_survived(shared, before)


def test_replies_larger_than_a_datagram_arrive_whole(shared: Topology) -> None:
    """Defect 6: 9 functions of 64 claims each; stats of the VNIC host > one datagram."""
    before = pids(shared)
    holder = start_as_uid(ATTACKER, """
import json, sys
from kernelctl.client import ControlClient, ControlError
client = ControlClient(sys.argv[1])
socks = []
for n in range(9):
    sock, _info = client.open_vnic([("udp", 20000 + 64 * n + i) for i in range(64)], name=f"wide{n}")
    socks.append(sock)
size = len(json.dumps(client.status()))
print(json.dumps({"status_bytes": size}), flush=True)
sys.stdin.read()
""", str(shared.control_socket))
    try:
        size = first_line(holder)["status_bytes"]
        assert isinstance(size, int) and size > 2 * control.CHUNK
        status = json.loads(kernelctl(shared.tag, "status", "-j").stdout)
        mine = [f for f in status["functions"] if f["owner_uid"] == ATTACKER]
        assert len(mine) == 9 and all(len(f["claims"]) == 64 for f in mine)
        filters = [f for f in status["device"]["filters"] if f.get("kind") == "filter"]
        assert len(filters) >= 2 * 9 * 64
    finally:
        finish(holder)
    wait_for(lambda: functions_of(shared, ATTACKER) == 0)
    assert_survived(shared, before)


def test_storage_stats_and_vsa_lists_larger_than_a_datagram_arrive_whole(shared: Topology) -> None:
    """Defects 7 and 9: a VSA in hundreds of extents opened many times, and a VSA list with
    many VSAs and grants: ``status`` and ``vsa ls`` still answer (and ``up`` sees the
    instance as up)."""
    before = pids(shared)
    holes = 300
    with ControlClient(shared.control_socket, timeout=60) as client:
        names = [f"frag{n:04d}-" + "x" * 50 for n in range(2 * holes)]
        unit = 1 << 20  # the registry allocates in 1 MiB extents
        for name in names:
            client.request("vsa_create", name=name, size_bytes=unit)
        for name in names[::2]:
            client.request("vsa_delete", name=name)
        for name in names[1::2][:100]:
            for uid in (2000, 2001, 2002):
                client.request("vsa_grant", name=name, uid=uid, mode="ro")
        big, _ = client.request("vsa_create", name="fragmented", size_bytes=holes * unit)
        assert len(big["extents"]) >= holes // 2
        socks = [client.open_vsa("fragmented", write=False)[0] for _ in range(56)]
        try:
            status = client.status()
            functions = status["storage_device"]["functions"]
            assert len(functions) == 56
            # more than one datagram could ever carry (the default socket buffer, 208 KiB)
            assert len(json.dumps(status["storage_device"])) > 212992
            listing = json.loads(kernelctl(shared.tag, "vsa", "ls", "-j").stdout)
            assert len(listing["vsas"]) == holes + 1
            assert "already up" in kernelctl(shared.tag, "up").stdout
        finally:
            for sock in socks:
                sock.close()
        wait_for(lambda: not client.status()["storage_device"]["functions"])
        for name in [*names[1::2], "fragmented"]:
            client.request("vsa_delete", name=name)
    assert_survived(shared, before)


def test_one_uid_cannot_take_every_function(shared: Topology) -> None:
    """Defect 10: a uid's functions are bounded; another uid can still open one."""
    before = pids(shared)
    holder = start_as_uid(ATTACKER, """
import json, sys
from kernelctl.client import ControlClient, ControlError
client = ControlClient(sys.argv[1])
socks, refusal = [], ""
for n in range(40):
    try:
        socks.append(client.open_vnic([("udp", 21000 + n)])[0])
    except ControlError as exc:
        refusal = str(exc)
        break
# a storage function counts against the same bound
try:
    client.request("vsa_create", name="u1000-quota", size_bytes=4096)
    client.open_vsa("u1000-quota")
    storage = "opened"
except ControlError as exc:
    storage = str(exc)
print(json.dumps({"opened": len(socks), "refusal": refusal, "storage": storage}), flush=True)
sys.stdin.read()
""", str(shared.control_socket))
    try:
        report = first_line(holder)
        assert report["opened"] == MAX_FUNCTIONS_PER_UID
        expected = f"uid {ATTACKER} already holds {MAX_FUNCTIONS_PER_UID} functions (limit {MAX_FUNCTIONS_PER_UID})"
        assert report["refusal"] == expected
        assert report["storage"] == expected
        other = as_uid(OTHER, """
import json, sys
from kernelctl.client import ControlClient, ControlError
with ControlClient(sys.argv[1]) as client:
    sock, info = client.open_vnic([("udp", 22000)])
    print(json.dumps({"function_id": info["function_id"], "status": len(client.status()["functions"])}))
""", str(shared.control_socket))
        assert isinstance(other["function_id"], int)
    finally:
        finish(holder)
    wait_for(lambda: functions_of(shared, ATTACKER) == 0)
    as_uid(ATTACKER, """
import json, sys
from kernelctl.client import ControlClient, ControlError
with ControlClient(sys.argv[1]) as client:
    try:
        client.request("vsa_delete", name="u1000-quota")
    except ControlError:
        pass
print("{}")
""", str(shared.control_socket))
    assert_survived(shared, before)


def test_one_uid_cannot_take_every_connection(shared: Topology) -> None:
    """Defect 10: a uid's control connections are bounded; another uid still connects."""
    before = pids(shared)
    holder = start_as_uid(ATTACKER, """
import json, sys
from kernelctl.client import ControlClient, ControlError
clients, refusals = [], []
for n in range(300):
    try:
        client = ControlClient(sys.argv[1])
        client.status()
        clients.append(client)
    except ControlError as exc:
        refusals.append(str(exc))
print(json.dumps({"held": len(clients), "refusals": refusals[:3], "refused": len(refusals)}), flush=True)
sys.stdin.read()
""", str(shared.control_socket))
    try:
        report = first_line(holder)
        assert report["held"] == MAX_CLIENTS_PER_UID
        assert report["refused"] == 300 - MAX_CLIENTS_PER_UID
        expected = f"uid {ATTACKER} already holds {MAX_CLIENTS_PER_UID} control connections (limit {MAX_CLIENTS_PER_UID})"
        assert report["refusals"] == [expected] * 3
        other = as_uid(OTHER, """
import json, sys
from kernelctl.client import ControlClient, ControlError
with ControlClient(sys.argv[1]) as client:
    print(json.dumps({"functions": len(client.status()["functions"])}))
""", str(shared.control_socket))
        assert isinstance(other["functions"], int)
        _status, elapsed = root_status(shared)
        assert elapsed < 2.0
    finally:
        finish(holder)
    assert_survived(shared, before)


def test_set_rate_on_a_storage_function_is_refused(shared: Topology) -> None:
    """Defect 5: set_rate names a VSIC function; it must not reach the VNIC host."""
    before = pids(shared)
    result = as_uid(ATTACKER, """
import json, sys
from kernelctl.client import ControlClient, ControlError
with ControlClient(sys.argv[1]) as client:
    client.request("vsa_create", name="u1000-rate", size_bytes=4096)
    sock, info = client.open_vsa("u1000-rate")
    errors = []
    for op, fields in (("set_rate", {"rx_bps": 1000, "tx_bps": 1000}), ("add_filter", {"proto": "udp", "port": 23000})):
        try:
            client.request(op, function_id=info["function_id"], **fields)
            errors.append("")
        except ControlError as exc:
            errors.append(str(exc))
    sock.close()
    print(json.dumps({"function_id": info["function_id"], "errors": errors}))
""", str(shared.control_socket))
    function_id = result["function_id"]
    assert result["errors"] == [
        f"function {function_id} is a vsic function; set_rate is for VNIC functions",
        f"function {function_id} is a vsic function; add_filter is for VNIC functions",
    ]
    wait_for(lambda: functions_of(shared, ATTACKER) == 0)
    as_uid(ATTACKER, """
from kernelctl.client import ControlClient, ControlError
import sys
with ControlClient(sys.argv[1]) as client:
    client.request("vsa_delete", name="u1000-rate")
print("{}")
""", str(shared.control_socket))
    assert_survived(shared, before)


@pytest.mark.parametrize("host", ["vnic", "vsic"])
def test_a_device_host_that_stops_answering_is_an_error_not_a_crash(shared: Topology, host: str) -> None:
    """Defect 5: a device host that does not answer in time gives error replies."""
    before = pids(shared)
    stopped = before.vnic if host == "vnic" else before.vsic
    os.kill(stopped, signal.SIGSTOP)
    try:
        result = as_uid(ATTACKER, """
import json, sys, time
from kernelctl.client import ControlClient, ControlError
out = {}
with ControlClient(sys.argv[1], timeout=30) as client:
    for what, call in (
        ("open_vnic", lambda: client.open_vnic([("udp", 24000)])),
        ("open_vsa", lambda: (client.request("vsa_create", name="u1000-stop", size_bytes=4096), client.open_vsa("u1000-stop"))),
        ("status", lambda: client.status()),
    ):
        try:
            value = call()
            out[what] = value if what == "status" else "ok"
        except ControlError as exc:
            out[what] = "error: " + str(exc)
print(json.dumps(out))
""", str(shared.control_socket))
        key = "device" if host == "vnic" else "storage_device"
        status = result["status"]
        assert isinstance(status, dict)
        assert "did not answer" in status[key]["error"]
        refused = "open_vnic" if host == "vnic" else "open_vsa"
        assert str(result[refused]).startswith(f"error: {host} device host: device host did not answer")
        assert alive(before.daemon)
    finally:
        os.kill(stopped, signal.SIGCONT)
    # The late answers are told apart from new ones; functions it made late are reclaimed.
    wait_for(lambda: functions_of(shared, ATTACKER) == 0)
    as_uid(ATTACKER, """
from kernelctl.client import ControlClient, ControlError
import sys
with ControlClient(sys.argv[1]) as client:
    try:
        client.request("vsa_delete", name="u1000-stop")
    except ControlError:
        pass
print("{}")
""", str(shared.control_socket))
    assert_survived(shared, before)
