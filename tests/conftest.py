"""Shared fixtures: throwaway topology instances with unique names, cleaned up even on failure."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kernelctl.names import Topology, topology

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
KERNELCTL = [PYTHON, "-m", "kernelctl.cli"]


# Which test drew which instance tag, so that a leak found at the end of the suite names
# the test that made it.
_TAG_OWNERS: dict[str, str] = {}


def unique_tag() -> str:
    tag = "t" + secrets.token_hex(3)[:5]
    _TAG_OWNERS[tag] = os.environ.get("PYTEST_CURRENT_TEST", "?")
    return tag


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, taps, tc)")
    if not Path("/dev/net/tun").exists():
        pytest.skip("the kernel offers no /dev/net/tun")


def kernelctl(tag: str, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*KERNELCTL, "--instance", tag, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kernelctl {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def leftovers(topo: Topology) -> list[str]:
    """Everything of this instance that is still on the machine."""
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name in (topo.client_netns, topo.linux_netns):
        if any(line.split()[0] == name for line in netns.splitlines() if line.strip()):
            found.append(f"netns {name}")
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    for name in topo.link_names:
        if f": {name}:" in links or f": {name}@" in links:
            found.append(f"link {name}")
    if topo.run_dir.exists():
        found.append(f"dir {topo.run_dir}")
    if topo.state_dir.exists():
        found.append(f"dir {topo.state_dir}")
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    found += [f"loop {line}" for line in loops.splitlines() if str(topo.state_dir) in line]
    mounts = Path("/proc/mounts").read_text()
    found += [f"mount {line}" for line in mounts.splitlines() if str(topo.state_dir) in line]
    # The FUSE export of the name tree (/run/arrakis/<tag>/names) and its process.
    found += [f"mount {line}" for line in mounts.splitlines() if f" {topo.run_dir}/" in line]
    procs_fuse = subprocess.run(["pgrep", "-af", "--", f"kernelctl.fuse_export --instance {topo.tag} "],
                                capture_output=True, text=True).stdout
    found += [f"fuse process {line}" for line in procs_fuse.splitlines() if "pgrep" not in line]
    procs = subprocess.run(["pgrep", "-af", "--", f"--instance {topo.tag}"], capture_output=True, text=True).stdout
    procs += subprocess.run(["pgrep", "-af", "--", f"--tap {topo.tap}"], capture_output=True, text=True).stdout
    found += [f"process {line}" for line in procs.splitlines() if "pgrep" not in line]
    return found


@contextmanager
def running_instance(topo: Topology, *up_args: str) -> Iterator[Topology]:
    """``kernelctl up`` for ``topo`` (with ``up_args``); on the way out ``down --purge``, then
    check that nothing of it is left on the machine (and fail the test if something was)."""
    try:
        kernelctl(topo.tag, "up", *up_args)
        yield topo
    finally:
        kernelctl(topo.tag, "down", "--purge", check=False)
        left = leftovers(topo)
        if left:
            # Clean by force so one failure does not poison the rest of the suite, then fail.
            subprocess.run(["ip", "netns", "del", topo.client_netns], capture_output=True)
            subprocess.run(["ip", "netns", "del", topo.linux_netns], capture_output=True)
            shutil.rmtree(topo.run_dir, ignore_errors=True)
            from kernelctl import storage

            storage.purge(topo)
            pytest.fail(f"kernelctl down left: {left}")


@pytest.fixture
def instance() -> Iterator[Topology]:
    """A running kernelctl instance with its own topology; torn down and checked after."""
    require_root()
    with running_instance(topology(unique_tag())) as topo:
        yield topo


@pytest.fixture(scope="session")
def names_instance() -> Iterator[Topology]:
    """One instance for the name tree's root tests (tests/test_names_*.py): each of them
    uses its own names under /apps, so they share it and its start-up and tear-down."""
    require_root()
    with running_instance(topology(unique_tag())) as topo:
        yield topo


@pytest.fixture
def h11_instance() -> Iterator[Topology]:
    """Like ``instance``, with a tag of the server tests' own ("h11..."), purged after."""
    require_root()
    with running_instance(topology("h11" + secrets.token_hex(2)[:3])) as topo:
        yield topo


_TEST_IMAGES = re.compile(r"/t[0-9a-f]{5}/")
_TEST_NAMES = re.compile(r"(arx-t[0-9a-f]{5}-|vnict[0-9a-f]{5}|arx(br|vb|vl|ifb)t[0-9a-f]{5})")


def suite_leftovers() -> list[str]:
    """Namespaces, links, loop devices and processes that tests made and did not remove."""
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"netns {line.split()[0]}" for line in netns.splitlines() if _TEST_NAMES.match(line)]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    for line in links.splitlines():
        name = line.split(": ")[1].split("@")[0] if ": " in line else ""
        if _TEST_NAMES.fullmatch(name):
            found.append(f"link {name}")
    procs = subprocess.run(["pgrep", "-af", "--", r"--instance t[0-9a-f]{5}|--tap vnict"], capture_output=True, text=True)
    found += [f"process {line}" for line in procs.stdout.splitlines() if "pgrep" not in line]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    found += [f"loop {line}" for line in loops.splitlines() if "arx-" in line or _TEST_IMAGES.search(line)]
    mounts = Path("/proc/mounts").read_text()
    # Loop-mounted images under /var/lib/arrakis/<tag>/ and FUSE exports at /run/arrakis/<tag>/names.
    found += [f"mount {line}" for line in mounts.splitlines() if _TEST_IMAGES.search(line)]
    fuse = subprocess.run(["pgrep", "-af", "--", r"kernelctl.fuse_export --instance t[0-9a-f]{5} "],
                          capture_output=True, text=True).stdout
    found += [f"fuse process {line}" for line in fuse.splitlines() if "pgrep" not in line]
    return found


# What was on the machine before this session started: an earlier run that was cut off
# (a killed CI job, a machine restarted mid-test) leaves instances that this run did not make.
_BEFORE: set[str] = set()


def _purge_dead_instances(left: list[str]) -> None:
    """``down --purge`` every test instance in ``left`` that no process serves any more and
    that is older than any test. A younger one, or one with a live daemon, may belong to a
    test session running beside this one (a developer's, while CI runs on the same box)."""
    for tag in sorted({m.group(1) for item in left for m in re.finditer(r"\b(t[0-9a-f]{5})\b", item)}):
        alive = subprocess.run(["pgrep", "-f", "--", f"--instance {tag}"], capture_output=True, text=True).stdout
        if not alive.strip() and _age_s(tag) > _OLDER_THAN_ANY_TEST_S:
            kernelctl(tag, "down", "--purge", check=False)


# pytest-timeout stops any test after 300 s; module fixtures hold a live daemon.
_OLDER_THAN_ANY_TEST_S = 600.0


def _age_s(tag: str) -> float:
    """Seconds since the youngest of an instance's namespaces and directories was made."""
    topo = topology(tag)
    paths = [Path("/run/netns") / ns for ns in (topo.client_netns, topo.linux_netns)]
    paths += [topo.run_dir, topo.state_dir]
    stamps = [path.stat().st_mtime for path in paths if path.exists()]
    return time.time() - max(stamps) if stamps else float("inf")


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.geteuid() == 0:
        _purge_dead_instances(suite_leftovers())
        _BEFORE.update(suite_leftovers())
        if _BEFORE:
            print("\nleft by an earlier run and still in use or not removable (not counted against this one):\n  "
                  + "\n  ".join(sorted(_BEFORE)))


def _ours(item: str) -> bool:
    """Whether a leftover is this session's: it names a tag one of our tests drew, or no test
    tag at all. Another tag is another session's, still running beside this one."""
    tags = re.findall(r"t[0-9a-f]{5}", item)
    return not tags or any(tag in _TAG_OWNERS for tag in tags)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # The house rule: after the suite nothing of ours is left. A leak fails the run.
    if os.geteuid() != 0:
        return
    left = [item for item in suite_leftovers() if item not in _BEFORE and _ours(item)]
    if left:
        owners = sorted({f"{tag}: {test}" for tag, test in _TAG_OWNERS.items() if any(tag in item for item in left)})
        print("\nthe test suite left these behind:\n  " + "\n  ".join(left))
        if owners:
            print("made by instances of:\n  " + "\n  ".join(owners))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
