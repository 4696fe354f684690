"""The main demo: the bypass path beside the Linux baseline, with real clients.

    sudo bash tools/run demo            # everything up, the demo, everything down again
    sudo bash tools/run demo --keep     # leave the system up to explore (kernelctl down ends it)

Steps: ``kernelctl up`` builds the topology and starts the device host; the same UDP echo
application starts twice, once on the libOS over its own VNIC function (``vnic``) and once on
Linux sockets in the baseline namespace (``linux``); then, from the client namespace, ``ping``
and a plain UDP socket talk to both; last, ``kernelctl status`` shows the functions, filters,
counters and rate limits the control plane set up; then the global names: ``kernelctl ls -l
/apps``, the kv server's live key list read through the FUSE mount, and another uid reading
the kv server's durable snapshot out of its VSA (a grant, way 2).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from kernelctl.names import topology
from tools.nsrun import run_in_netns

REPO = Path(__file__).resolve().parent.parent


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    shown = ["kernelctl", *argv[3:]] if argv[:3] == [sys.executable, "-m", "kernelctl.cli"] else argv
    print("$ " + " ".join(shown), flush=True)
    result = subprocess.run(argv, cwd=REPO, text=True, capture_output=True)
    # redis-benchmark redraws a progress line with carriage returns: keep the final lines.
    lines = (result.stdout + result.stderr).replace("\r", "\n").splitlines()
    shown_lines = [line for line in lines if line.strip() and "rps=" not in line]
    print("\n".join(shown_lines), flush=True)
    if check and result.returncode != 0:
        raise SystemExit(f"demo: {' '.join(argv)} failed")
    return result


def echo_round_trips(address: tuple[str, int], count: int) -> dict[str, float]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(1.0)
    sock.connect(address)
    rtts = []
    intact = 0
    for index in range(count):
        payload = os.urandom(index % 1472 + 1)
        start = time.perf_counter()
        sock.send(payload)
        try:
            reply = sock.recv(2048)
        except TimeoutError:
            continue
        rtts.append((time.perf_counter() - start) * 1e6)
        intact += reply == payload
    sock.close()
    rtts.sort()
    return {
        "sent": count,
        "intact": intact,
        "p50_us": rtts[len(rtts) // 2] if rtts else float("nan"),
        "p99_us": rtts[int(len(rtts) * 0.99)] if rtts else float("nan"),
    }


def refused(address: tuple[str, int]) -> bool:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2.0)
    sock.connect(address)
    sock.send(b"hello?")
    try:
        sock.recv(64)
    except ConnectionRefusedError:
        return True
    except TimeoutError:
        return False
    finally:
        sock.close()
    return False


def start_echo(backend: str, tag: str) -> subprocess.Popen[str]:
    return start_app("libos.apps.echo", backend, tag, "--port", "7")


def start_app(module: str, backend: str, tag: str, *extra: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-u", "-m", module, "--backend", backend, *extra]
    if tag:
        argv += ["--instance", tag]
    print("$ python -m " + " ".join(argv[3:]) + " &", flush=True)
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    print("  " + line.strip(), flush=True)
    if "ready" not in line:
        process.kill()
        raise SystemExit(f"demo: {module} on {backend} did not start: {process.stdout.read()}")
    return process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="leave the system up at the end")
    parser.add_argument("--instance", default="", help="topology instance (default: the DESIGN.md names)")
    parser.add_argument("--count", type=int, default=2000, help="UDP round trips per backend")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("demo: run as root (it builds network namespaces and a tap)", file=sys.stderr)
        return 1
    topo = topology(args.instance)
    kernelctl = [sys.executable, "-m", "kernelctl.cli"] + (["--instance", args.instance] if args.instance else [])
    apps: list[subprocess.Popen[str]] = []
    try:
        banner("1. The control plane comes up: namespaces, bridge, tap, veth, tc roots, the VNIC device host")
        run([*kernelctl, "up"])

        banner("2. The same UDP echo application, on the libOS (vnic) and on Linux sockets (linux)")
        apps = [start_echo("vnic", args.instance), start_echo("linux", args.instance)]

        banner(f"3. ping from the client namespace {topo.client_netns}")
        for ip in (topo.vnic_ip, topo.linux_ip):
            run(["ip", "netns", "exec", topo.client_netns, "ping", "-c", "3", "-i", "0.2", ip])

        banner(f"4. {args.count} UDP datagrams of 1..1472 bytes to each echo server")
        for name, ip in (("vnic ", topo.vnic_ip), ("linux", topo.linux_ip)):
            result = run_in_netns(topo.client_netns, echo_round_trips, (ip, 7), args.count, timeout=300)
            print(
                f"  {name} {ip}: {result['intact']}/{result['sent']} came back intact, "
                f"RTT p50 {result['p50_us']:.0f} us, p99 {result['p99_us']:.0f} us",
                flush=True,
            )
        unclaimed = run_in_netns(topo.client_netns, refused, (topo.vnic_ip, 9999))
        print(f"  a datagram to {topo.vnic_ip}:9999 (no app claimed it): "
              f"{'ICMP port unreachable, the socket sees ECONNREFUSED' if unclaimed else 'no answer'}")

        banner("5. The Redis-compatible server on both backends, durable: real redis-cli and redis-benchmark")
        for backend in ("vnic", "linux"):
            # A small log on the VSA so that the demo's writes fill it and make a snapshot.
            small = ["--vsa", "kv-demo", "--log-size", str(8 << 20)] if backend == "vnic" else []
            apps.append(start_app("libos.apps.kv", backend, args.instance, "--port", "6379", "--durable", *small))
        for name, ip in (("vnic ", topo.vnic_ip), ("linux", topo.linux_ip)):
            client = ["ip", "netns", "exec", topo.client_netns]
            run([*client, "redis-cli", "-h", ip, "-p", "6379", "SET", "greeting", f"hello from {name.strip()}"])
            run([*client, "redis-cli", "-h", ip, "-p", "6379", "GET", "greeting"])
            run([*client, "redis-benchmark", "-h", ip, "-p", "6379", "-t", "set,get", "-n", "2000", "-c", "10", "-q"])
        run([*kernelctl, "vsa", "ls"])

        banner("6. Global names: what the applications publish, and three ways to read them")
        run([*kernelctl, "ls", "-l", "/apps"])
        run([*kernelctl, "ls", "-l", "/apps/kv-6379"])
        names = topo.run_dir / "names"
        print(f"# way 3: any program reads the names through the FUSE mount {names}")
        run(["sh", "-c", f"ls -l {names}/apps/kv-6379 && head -3 {names}/apps/kv-6379/keys && "
                         f"grep -a -E 'tcp_port|db0' {names}/apps/kv-6379/info"])
        print("# way 1: kernelctl cat asks kernelctl once, then reads from the kv server itself")
        run([*kernelctl, "cat", "/apps/kv-6379/info"])
        client = ["ip", "netns", "exec", topo.client_netns]
        run([*client, "redis-benchmark", "-h", topo.vnic_ip, "-p", "6379", "-t", "set", "-n", "3000", "-d", "1000",
             "-r", "300", "-c", "4", "-q"])
        print("# way 2: uid 65534 (nobody), once granted the VSA read-only, reads the snapshot file from it")
        run([*kernelctl, "vsa", "grant", "kv-demo", "65534", "ro"])
        nobody = f"setpriv --reuid 65534 --regid 65534 --clear-groups {sys.executable} -m kernelctl.cli"
        run(["sh", "-c", f"{nobody} {' '.join(kernelctl[3:])} cat /apps/kv-6379/snapshot | "
                         "head -c 120 | tr -c '[:print:]' '.'; echo"])

        banner("7. kernelctl status: functions, filters, counters, rate limits")
        run([*kernelctl, "status"])
    finally:
        for process in apps:
            process.terminate()
            try:
                out, _ = process.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                out, _ = process.communicate()
            for line in out.splitlines():
                print("  " + line)
        if args.keep:
            print("\nThe system stays up; `.venv/bin/kernelctl down` removes it.")
        else:
            banner("8. kernelctl down: every namespace, link, tc rule, process and mount goes (the images stay)")
            run([*kernelctl, "down"], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
