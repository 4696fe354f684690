"""Start and stop the FUSE export (``kernelctl.fuse_export``) of one instance's name tree.

``start`` runs it as its own process (so a crash in libfuse or pyfuse3 never takes the
daemon down) and waits until the mount is there; ``stop`` ends it and then makes sure no
mount is left, whether the process exited cleanly, was killed, or hangs: a FUSE mount whose
process died stays in the mount table ("transport endpoint is not connected") until it is
unmounted, so ``stop`` always checks the table and detaches what it finds (``umount -l``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kernelctl.names import Topology
from kernelctl.procs import wait_or_kill

START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0


def mountpoint(topo: Topology) -> Path:
    return topo.run_dir / "names"


def _pid_file(topo: Topology) -> Path:
    return topo.run_dir / "fuse.pid"


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    out, at = [], 0
    while at < len(field):
        if field[at] == "\\" and at + 3 < len(field) and field[at + 1 : at + 4].isdigit():
            out.append(chr(int(field[at + 1 : at + 4], 8)))
            at += 4
        else:
            out.append(field[at])
            at += 1
    return "".join(out)


def mounted(path: Path) -> bool:
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    target = str(path)
    return any(len(fields) > 4 and _unescape(fields[4]) == target for fields in (line.split() for line in lines))


def _export_pid(topo: Topology) -> int | None:
    try:
        pid = int(_pid_file(topo).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"kernelctl.fuse_export" in cmdline else None


def healthy(topo: Topology) -> bool:
    point = mountpoint(topo)
    if _export_pid(topo) is None or not mounted(point):
        return False
    try:
        os.stat(point)
    except OSError:  # ENOTCONN: mounted, but nobody answers
        return False
    return True


def start(topo: Topology) -> str:
    """Mount the tree; returns "" or why it could not be mounted (the daemon runs without)."""
    stop(topo)
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse on this machine"
    point = mountpoint(topo)
    point.mkdir(parents=True, exist_ok=True)
    log_path = topo.run_dir / "fuse.log"
    argv = [sys.executable, "-m", "kernelctl.fuse_export", "--instance", topo.tag, str(point)]
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                   start_new_session=True)
    _pid_file(topo).write_text(f"{process.pid}\n")
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"the FUSE export exited with {process.returncode}: {log_path.read_text()[-600:]}"
        if mounted(point):
            return ""
        time.sleep(0.05)
    stop(topo)
    return "the FUSE export did not mount in time"


def stop(topo: Topology) -> None:
    """No FUSE process and no mount of this instance afterwards, whatever state they were in."""
    pid = _export_pid(topo)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        wait_or_kill(pid, STOP_TIMEOUT, lambda: _export_pid(topo))
    point = mountpoint(topo)
    for _ in range(3):
        if not mounted(point):
            break
        # Lazy: detach now even if a reader still holds a file open in it.
        subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=30)
    try:
        _pid_file(topo).unlink()
    except FileNotFoundError:
        pass
