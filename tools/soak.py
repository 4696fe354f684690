"""Soak test (issue 7, item 4): churn, kills and hostile clients around one well-behaved app.

    tools/soak --duration 60 [--seed N] [--json PATH|-]

On a fresh kernelctl instance of its own (a unique tag, ``down --purge`` at the end, even
on failure), for ``--duration`` seconds:

* apps of uid 1000 (``setpriv``) open and close VNIC functions and VSAs at random through
  ``ControlClient.open_vnic``/``open_vsa``, and some are SIGKILLed while they make
  requests; libOS echo apps of uid 1000 are SIGKILLed while hostile traffic reaches them;
* hostile clients of uid 1000 write garbage to the control socket or leave requests
  unread, and send garbage UDP and TCP to the vNIC address, inside the instance's client
  namespace only;
* one well-behaved app (the UDP echo app on the vnic backend) serves a client loop in the
  client namespace. UDP may lose datagrams, so the client retries; lost datagrams are
  counted apart from wrong replies, and a request that no retry answers is a loss.

At the end it checks that the well-behaved app lost no request and got no wrong reply,
that every trusted process (daemon, device hosts) has its pid, and that their fd counts,
their RSS (within ``--rss-slack-mib``), the instance's tc classes, namespaces and loop
devices are back to their starting values. Exit status 1 on any violation.

Only public interfaces: the kernelctl CLI, ``kernelctl.client.ControlClient`` and the
libOS apps. Every process it starts is ended by its pid.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kernelctl.names import Topology, topology

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
UNPRIVILEGED = ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups"]
ECHO_PORT = 7007
MAX_DURATION = 4 * 3600
SETTLE_SECONDS = 30.0  # how long teardown after the last kill may take to show

# ---- scripts the soak runs as other processes --------------------------------------------

# The well-behaved client: numbered requests, each retried until its own reply comes back.
_CLIENT = r"""
import json, os, socket, sys, time
ip, port, duration = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
TRIES, WAIT = 20, 0.25
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.connect((ip, port))
counts = dict(requests=0, answered=0, retries=0, stale=0, wrong=0, unanswered=0, icmp_errors=0)
deadline = time.monotonic() + duration
seq = 0
while time.monotonic() < deadline:
    seq += 1
    body = b"soak %d " % seq + os.urandom(16).hex().encode()
    counts["requests"] += 1
    for attempt in range(TRIES):
        if attempt:
            counts["retries"] += 1  # a datagram (request or reply) was lost
        try:
            sock.send(body)
        except OSError:
            # An ICMP error about an earlier datagram surfaces on the next call of a
            # connected socket: it is a lost datagram, retried like one (after the wait).
            counts["icmp_errors"] += 1
        until = time.monotonic() + WAIT
        got = False
        while not got:
            left = until - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            try:
                reply = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                counts["icmp_errors"] += 1
                continue
            if reply == body:
                got = True
            elif reply.startswith(b"soak ") and int(reply.split()[1]) < seq:
                counts["stale"] += 1  # the answer to an attempt already retried
            else:
                counts["wrong"] += 1
        if got:
            counts["answered"] += 1
            break
    else:
        counts["unanswered"] += 1
print(json.dumps(counts), flush=True)
"""

# Hostile network client (uid 1000, in the client namespace): garbage UDP and TCP.
_HOSTILE_NET = r"""
import json, os, random, socket, sys, time
ip, ports, duration, seed = sys.argv[1], [int(p) for p in sys.argv[2].split(",")], float(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
counts = dict(udp=0, udp_failed=0, tcp=0, tcp_refused=0)
deadline = time.monotonic() + duration
while time.monotonic() < deadline:
    port = rng.choice(ports) if rng.random() < 0.7 else rng.randint(1024, 65535)
    if rng.random() < 0.8:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(os.urandom(rng.randint(0, 1400)), (ip, port))
            counts["udp"] += 1
        except OSError:
            counts["udp_failed"] += 1
    else:
        try:
            with socket.create_connection((ip, port), timeout=0.5) as s:
                s.sendall(os.urandom(rng.randint(1, 4096)))
            counts["tcp"] += 1
        except OSError:
            counts["tcp_refused"] += 1
    time.sleep(rng.uniform(0, 0.01))  # pacing of the attack, not synchronisation
print(json.dumps(counts), flush=True)
"""

# Churn and control-socket abuse (uid 1000): functions and VSAs opened and closed, apps
# killed mid-request, garbage and unread requests on the control socket.
_CHURN = r"""
import json, os, random, signal, socket, subprocess, sys, time
from kernelctl.client import ControlClient, ControlError
path, vsa, duration, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
counts = dict(vnic_opened=0, vsa_opened=0, refused=0, garbage=0, unread=0, killed=0)
KILLED_APP = '''
import sys, time
from kernelctl.client import ControlClient
path, vsa, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = ControlClient(path)
held = [c.open_vnic([("udp", port)])[0]]
try:
    held.append(c.open_vsa(vsa)[0])
except Exception:
    pass
while True:  # requests until SIGKILL lands in the middle of one
    c.status()
'''
deadline = time.monotonic() + duration
while time.monotonic() < deadline:
    action = rng.choice(["vnic", "vsa", "garbage", "unread", "kill"])
    try:
        if action == "vnic":
            with ControlClient(path) as c:
                sock, _facts = c.open_vnic([("udp", rng.randint(20000, 60000))])
                time.sleep(rng.uniform(0, 0.05))  # hold the function a moment
                sock.close()
            counts["vnic_opened"] += 1
        elif action == "vsa":
            with ControlClient(path) as c:
                sock, _facts = c.open_vsa(vsa, write=rng.random() < 0.5)
                sock.close()
            counts["vsa_opened"] += 1
        elif action == "garbage":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(1)
            s.connect(path)
            junk = rng.choice([os.urandom(rng.randint(1, 4096)), b"[" * 5000, b'{"id":1,"op":"nope"}',
                               b'{"id":"x","op":"open_vnic","filters":7}'])
            s.send(junk)
            try:
                s.recv(65536)
            except OSError:
                pass
            s.close()
            counts["garbage"] += 1
        elif action == "unread":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(path)
            s.send(b'{"id":1,"op":"status"}')
            time.sleep(rng.uniform(0, 0.2))  # the reply stays unread meanwhile
            s.close()
            counts["unread"] += 1
        else:
            child = subprocess.Popen([sys.executable, "-c", KILLED_APP, path, vsa, str(rng.randint(20000, 60000))],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.05, 0.5))
            child.send_signal(signal.SIGKILL)
            child.wait()
            counts["killed"] += 1
    except (ControlError, OSError):
        counts["refused"] += 1
print(json.dumps(counts), flush=True)
"""


# ---- what is measured before and after ----------------------------------------------------


@dataclass
class Snapshot:
    processes: dict[int, dict[str, Any]] = field(default_factory=dict)  # pid -> role, fds, rss_kib
    tc_classes: list[str] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)
    loops: list[str] = field(default_factory=list)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(p) for p in (task / "children").read_text().split()]
    except OSError:
        pass
    return found


def _proc_facts(pid: int) -> dict[str, Any] | None:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        rss = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    except (OSError, ValueError):
        return None
    role = " ".join(part.decode(errors="replace") for part in cmdline[:4] if part)
    return {"role": role, "fds": fds, "rss_kib": rss}


def trusted_pids(topo: Topology) -> list[int]:
    """The daemon (its pid file) and the device hosts it started (its children)."""
    try:
        daemon = int(topo.pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return []
    return [daemon, *_children(daemon)]


def snapshot(topo: Topology) -> Snapshot:
    snap = Snapshot()
    for pid in trusted_pids(topo):
        facts = _proc_facts(pid)
        if facts is not None:
            snap.processes[pid] = facts
    for dev in (topo.tap, topo.ifb):
        shown = subprocess.run(["ip", "netns", "exec", topo.client_netns, "tc", "class", "show", "dev", dev],
                               capture_output=True, text=True).stdout
        snap.tc_classes += sorted(f"{dev} {' '.join(line.split()[:3])}" for line in shown.splitlines() if line.strip())
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    snap.netns = sorted(line.split()[0] for line in listed.splitlines()
                        if line.strip() and line.split()[0] in (topo.client_netns, topo.linux_netns))
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    snap.loops = sorted(line for line in loops.splitlines() if str(topo.state_dir) in line)
    return snap


def compare(start: Snapshot, end: Snapshot, rss_slack_kib: int) -> list[str]:
    problems = []
    for pid, before in start.processes.items():
        after = end.processes.get(pid)
        if after is None:
            problems.append(f"trusted process {pid} ({before['role']}) is gone")
            continue
        if after["fds"] != before["fds"]:
            problems.append(f"{before['role']} (pid {pid}): {before['fds']} fds at start, {after['fds']} at the end")
        if after["rss_kib"] > before["rss_kib"] + rss_slack_kib:
            problems.append(f"{before['role']} (pid {pid}): RSS {before['rss_kib']} KiB -> {after['rss_kib']} KiB")
    for pid in set(end.processes) - set(start.processes):
        problems.append(f"new trusted process {pid} ({end.processes[pid]['role']})")
    for name in ("tc_classes", "netns", "loops"):
        if getattr(start, name) != getattr(end, name):
            problems.append(f"{name}: {getattr(start, name)} at start, {getattr(end, name)} at the end")
    return problems


# ---- the run -------------------------------------------------------------------------------


def kernelctl(topo: Topology, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([PYTHON, "-m", "kernelctl.cli", "--instance", topo.tag, *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    if check and done.returncode != 0:
        raise RuntimeError(f"kernelctl {' '.join(args)}: {done.stdout}{done.stderr}")
    return done


def start_echo(topo: Topology, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen([*UNPRIVILEGED, PYTHON, "-m", "libos.apps.echo", "--backend", "vnic",
                             "--instance", topo.tag, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def wait_ready(proc: subprocess.Popen[str], timeout: float = 60) -> None:
    """The echo app prints one line when it serves; anything else (or its exit) is a failure."""
    import selectors

    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise RuntimeError("the echo app did not become ready")
    line = proc.stdout.readline()
    if "ready" not in line:
        raise RuntimeError(f"the echo app did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            parsed: dict[str, Any] = json.loads(line)
            return parsed
    raise RuntimeError(f"no result line in {text[-2000:]!r}")


def run(duration: float, seed: int, rss_slack_kib: int) -> dict[str, Any]:
    topo = topology("s" + secrets.token_hex(3)[:5])
    rng = random.Random(seed)
    started: list[subprocess.Popen[str]] = []
    summary: dict[str, Any] = {"instance": topo.tag, "duration_s": duration, "seed": seed}
    try:
        kernelctl(topo, "up")
        vsa = "soak"
        kernelctl(topo, "vsa", "create", vsa, "8M")
        kernelctl(topo, "vsa", "grant", vsa, "1000", "rw")
        echo = start_echo(topo, ECHO_PORT)
        started.append(echo)
        wait_ready(echo)
        start = snapshot(topo)
        netns_exec = ["ip", "netns", "exec", topo.client_netns]
        client = subprocess.Popen([*netns_exec, PYTHON, "-c", _CLIENT, topo.vnic_ip, str(ECHO_PORT), str(duration)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        hostile = subprocess.Popen([*netns_exec, *UNPRIVILEGED, PYTHON, "-c", _HOSTILE_NET, topo.vnic_ip,
                                    f"{ECHO_PORT},20000,40000", str(duration), str(rng.randrange(1 << 30))],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        churn = subprocess.Popen([*UNPRIVILEGED, PYTHON, "-c", _CHURN, str(topo.control_socket), vsa,
                                  str(duration), str(rng.randrange(1 << 30))],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        started += [client, hostile, churn]
        # Meanwhile: libOS apps of uid 1000 SIGKILLed while hostile traffic reaches them.
        victims = 0
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline - 1:
            victim = start_echo(topo, rng.choice([20000, 40000]))
            started.append(victim)
            time.sleep(rng.uniform(0.2, 2.0))  # let it run (or fail to start) for a while
            stop(victim, signal.SIGKILL)
            victims += 1
        results: dict[str, Any] = {}
        for name, proc in (("client", client), ("hostile_net", hostile), ("churn", churn)):
            out, err = proc.communicate(timeout=duration + 120)
            if proc.returncode != 0:
                raise RuntimeError(f"{name} exited {proc.returncode}: {err[-2000:]}")
            results[name] = last_json(out)
        results["killed_echo_apps"] = victims
        summary["activity"] = results
        # Teardown of killed apps is asynchronous: wait (with a deadline) for the state to
        # come back, then judge the last reading.
        settle_until = time.monotonic() + SETTLE_SECONDS
        while True:
            end = snapshot(topo)
            problems = compare(start, end, rss_slack_kib)
            if not problems or time.monotonic() > settle_until:
                break
            time.sleep(0.5)
        good = results["client"]
        if good["unanswered"] or good["wrong"]:
            problems.append(f"the well-behaved app lost {good['unanswered']} requests, "
                            f"{good['wrong']} wrong replies")
        if good["requests"] == 0:
            problems.append("the well-behaved client made no request")
        if echo.poll() is not None:
            problems.append(f"the well-behaved app exited {echo.returncode}")
        summary.update(start=asdict(start), end=asdict(end), violations=problems)
    except Exception as exc:  # the summary must say what broke; teardown still runs
        summary.setdefault("violations", []).append(f"soak aborted: {exc}")
    finally:
        if summary.get("violations"):
            # The daemon's log (stdout and stderr of it and its hosts) goes with the
            # instance at teardown: keep its tail as evidence.
            try:
                summary["daemon_log_tail"] = (topo.run_dir / "kernelctl.log").read_text(errors="replace")[-6000:]
            except OSError:
                summary["daemon_log_tail"] = ""
        for proc in started:
            stop(proc, signal.SIGKILL if proc is not started[0] else signal.SIGTERM)
        down = kernelctl(topo, "down", "--purge", check=False)
        if down.returncode != 0:
            summary.setdefault("violations", []).append(f"kernelctl down failed: {down.stderr[-500:]}")
    summary["ok"] = not summary.get("violations")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help=f"seconds, 5..{MAX_DURATION}")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--rss-slack-mib", type=int, default=32, help="RSS growth allowed per trusted process")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the summary as JSON ('-': stdout)")
    args = parser.parse_args(argv)
    if not 5 <= args.duration <= MAX_DURATION:
        parser.error(f"--duration must be in 5..{MAX_DURATION} seconds")
    if os.geteuid() != 0:
        parser.error("the soak builds namespaces and taps: run it as root")
    seed = args.seed if args.seed is not None else secrets.randbelow(1 << 30)
    summary = run(args.duration, seed, args.rss_slack_mib * 1024)
    activity = summary.get("activity", {})
    print(f"soak {summary['instance']}: {args.duration:.0f} s, seed {seed}")
    for name, counts in activity.items():
        print(f"  {name}: {counts}")
    for problem in summary.get("violations", []):
        print(f"  VIOLATION: {problem}")
    print("  ok" if summary["ok"] else "  FAILED")
    if args.json == "-":
        print(json.dumps(summary, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
