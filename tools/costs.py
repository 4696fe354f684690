"""The measured per-request cost breakdown of a server (issue 10): where its CPU time goes.

Five parts, all measured:

* ``app``: the application's own logic (``libos/apps/**`` but the event loop and the command
  line glue: the key-value, memcached and echo servers' code);
* ``stack``: the libOS network and storage stack and the device rings it drives
  (``libos/net``, ``libos/driver``, ``libos/fast``, ``libos/storage``, ``vdev``);
* ``runtime``: everything else in the process: the queue API (``libos/api``), the stream
  event loop (``libos/apps/streams.py``), the interpreter's standard library (selectors, socket
  wrappers, ...);
* ``kernel``: the server's kernel time, system calls included;
* ``device_host``: the CPU time of the device host processes (the VNIC and VSIC models).

Totals come from /proc/PID/stat (user and kernel time over the step, as before). Only the
server's user time needs splitting: py-spy samples the server's Python stacks while the step
runs, each sample goes to the part its leaf frame's file belongs to, and the user time is
divided among ``app``, ``stack`` and ``runtime`` in proportion to the samples. Samples that
py-spy drops (``--nonblocking`` reads the stacks without stopping the process, and skips a
stack it catches half-changed) do not matter: only the proportions are used.

Where py-spy is absent or fails, the breakdown falls back to the server's plain ``user`` and
``kernel`` time and says why; a run never fails for want of a profile.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path, PurePosixPath
from types import TracebackType

from tools.benchlib import CLIENT_CPU, pinned_to

SAMPLED = ("app", "stack", "runtime")  # the parts of the server's user time that sampling tells apart
PARTS = (*SAMPLED, "kernel", "device_host")
UNSPLIT = ("user", "kernel", "device_host")  # without samples (or for redis-server: no Python)
RATE = 250  # samples a second: enough for the proportions, little enough not to slow the server
_STACK_DIRS = {"net", "driver", "fast", "storage"}
# In libos/apps but the serving machinery every app shares, not an app's own logic.
_APP_RUNTIME = {"streams.py", "common.py", "workers.py"}


def classify_file(path: str) -> str:
    """The part (``app``, ``stack``, ``runtime``) a source file's CPU time belongs to.

    ``path`` as py-spy names it: absolute with ``--full-filenames`` (as sampled here), else
    relative to the outermost package (``libos/net/stack.py``, ``selectors.py``). The last
    ``libos`` or ``vdev`` directory in it is taken as the package root, so both spellings
    classify the same, wherever the checkout is (even in a directory named ``libos``).
    """
    parts = PurePosixPath(path).parts
    for index in range(len(parts) - 2, -1, -1):
        name = parts[index]
        if name == "vdev":
            return "stack"  # the ring and layout code the libOS imports from vdev (vdev/ring.py)
        if name == "libos":
            inside = parts[index + 1 :]
            if inside[0] == "apps":
                return "runtime" if len(inside) == 2 and inside[1] in _APP_RUNTIME else "app"
            return "stack" if inside[0] in _STACK_DIRS else "runtime"
    return "runtime"


def frame_file(frame: str) -> str:
    """The file of one py-spy frame, ``Func (path/file.py:LINE)``; ``""`` if it names none."""
    open_at = frame.rfind(" (")
    if open_at < 0 or not frame.endswith(")"):
        return ""
    inside = frame[open_at + 2 : -1]
    path, colon, line = inside.rpartition(":")
    return path if colon and line.isdigit() else inside


def count_samples(collapsed: str) -> dict[str, int]:
    """Samples per part from py-spy's raw output (one ``frame;frame;... COUNT`` line a stack),
    each stack counted by its leaf (innermost, last) frame: where the CPU was."""
    counts = dict.fromkeys(SAMPLED, 0)
    for line in collapsed.splitlines():
        stack, _, count = line.strip().rpartition(" ")
        if not stack or not count.isdigit():
            continue  # an empty or foreign line: nothing to count
        leaf = stack.rpartition(";")[2]
        counts[classify_file(frame_file(leaf))] += int(count)
    return counts


def split_user(user_us: float, samples: dict[str, int]) -> dict[str, float]:
    """``user_us`` divided among the sampled parts in proportion to their samples (none: zeros)."""
    total = sum(samples.get(part, 0) for part in SAMPLED)
    if total <= 0:
        return dict.fromkeys(SAMPLED, 0.0)
    return {part: user_us * samples.get(part, 0) / total for part in SAMPLED}


def breakdown(cpu: dict[str, dict[str, float]], samples: dict[str, int] | None) -> dict[str, float]:
    """The cost breakdown (µs per request) from one step's CPU split (``app`` and ``*_host``
    entries of ``{user, kernel}``, as ``CpuSplit`` gives them) and the server's samples.

    With samples, the parts of ``PARTS``; without (None or all zero), those of ``UNSPLIT``.
    Either way the parts add up to the CPU split's total.
    """
    server = cpu.get("app", {"user": 0.0, "kernel": 0.0})
    hosts = sum(p["user"] + p["kernel"] for who, p in cpu.items() if who != "app")
    if samples is None or sum(samples.values()) <= 0:
        return {"user": server["user"], "kernel": server["kernel"], "device_host": float(hosts)}
    return {**split_user(server["user"], samples), "kernel": server["kernel"], "device_host": float(hosts)}


def py_spy() -> str | None:
    """The py-spy executable: the one beside this Python (the .venv), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Sampler:
    """py-spy sampling one process while a ``with`` block runs; never raises.

    After the block, ``samples`` holds the counts per part, or None with ``why`` saying what
    went wrong. ``pid=None`` samples nothing (a server with no Python: ``why`` says so).
    ``keep``: where to copy py-spy's raw stacks, so that a report's numbers can be checked.
    """

    def __init__(self, pid: int | None, why_not: str = "no Python to sample", keep: Path | None = None) -> None:
        self.pid = pid
        self.keep = keep
        self.samples: dict[str, int] | None = None
        self.why = why_not if pid is None else ""
        self._process: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="arx-costs-")
        self._out = Path(self._dir.name) / "stacks.txt"

    def __enter__(self) -> Sampler:
        if self.pid is not None:
            self._start(self.pid)
        return self

    def _start(self, pid: int) -> None:
        executable = py_spy()
        if executable is None:
            self.why = "py-spy is not installed"
            return
        # --full-filenames: py-spy would otherwise shorten a path to its outermost package
        # (directories with an __init__.py), which a namespace package would lose.
        # --duration is only a bound: the sampler is stopped (SIGINT, on which py-spy writes
        # its file) when the step ends. Pinned to the clients' CPU, as the device hosts are,
        # so that it takes no CPU from the server it measures.
        argv = [executable, "record", "--nonblocking", "--rate", str(RATE), "--format", "raw", "--full-filenames",
                "--duration", "3600", "--pid", str(pid), "-o", str(self._out)]
        try:
            self._process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, preexec_fn=pinned_to(CLIENT_CPU))
        except OSError as exc:
            self.why = f"py-spy did not start: {exc}"
            return
        # Wait for its first line ("Sampling process ..."): then it has attached and the step may begin.
        assert self._process.stdout is not None
        ready, _, _ = select.select([self._process.stdout], [], [], 10.0)
        first = os.read(self._process.stdout.fileno(), 4096).decode(errors="replace") if ready else ""
        if "Sampling" not in first:
            self._stop()
            self.why = f"py-spy did not attach: {first.strip()[-300:] or 'no answer in 10 s'}"

    def _stop(self) -> str:
        """Stop py-spy (SIGINT, then SIGKILL); what else it printed."""
        process, self._process = self._process, None
        if process is None:
            return ""
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            out, _ = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            out, _ = process.communicate()
        return out.decode(errors="replace") if out else ""

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._process is not None:
            said = self._stop()
            try:
                text = self._out.read_text()
            except OSError:
                text = ""
            counts = count_samples(text)
            if self.keep is not None and text:
                self.keep.parent.mkdir(parents=True, exist_ok=True)
                self.keep.write_text(text)
            if sum(counts.values()) > 0:
                self.samples = counts
            else:
                self.why = f"py-spy recorded no samples: {said.strip()[-300:] or '(it said nothing)'}"
        self._dir.cleanup()

    def record(self, run: dict[str, object]) -> None:
        """Put the breakdown of ``run`` (which holds ``cpu_us_per_request``) beside it."""
        cpu = run["cpu_us_per_request"]
        assert isinstance(cpu, dict)
        run["cpu_breakdown_us"] = breakdown(cpu, self.samples)
        if self.samples is not None:
            run["cpu_samples"] = dict(self.samples)
            run["cpu_breakdown_method"] = f"py-spy {RATE}/s on the server, user time split by leaf frame"
        else:
            run["cpu_breakdown_method"] = f"user/kernel only: {self.why}"
