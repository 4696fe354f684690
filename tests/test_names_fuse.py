"""Way 3: the name tree exported with FUSE at /run/arrakis/<instance>/names, used by real
programs (ls -lR, cat, cp, sha256sum, tail -f), as root and as another uid (setpriv);
the owner killed in the middle of a read; and ``kernelctl down`` after the FUSE process was
killed leaves no mount and no process (``running_instance`` checks, tests/conftest.py)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kernelctl import fuse_mount
from kernelctl.names import Topology, topology
from tests.conftest import kernelctl, require_root, running_instance, unique_tag
from tests.helpers import App

pytestmark = pytest.mark.root
OTHER = ["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups"]
SMALL_FILES = 1000  # 10,000 also pass, in 53 s on a loaded 2-core box: too long for the suite


def require_fuse() -> None:
    require_root()
    if not Path("/dev/fuse").exists():
        pytest.skip("the kernel offers no /dev/fuse")


@pytest.fixture
def topo(names_instance: Topology) -> Topology:
    require_fuse()
    return names_instance


def mount(topo: Topology) -> Path:
    point = fuse_mount.mountpoint(topo)
    assert fuse_mount.mounted(point), f"kernelctl up did not mount {point}"
    return point


def share(topo: Topology, directory: Path, name: str, *extra: str) -> App:
    return App("libos.apps.fileshare", "--instance", topo.tag, "--name", name, str(directory), *extra, timeout=60)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_real_programs_read_what_the_owner_wrote(topo: Topology, tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(os.urandom(64 << 20))
    small = tmp_path / "small"
    small.mkdir()
    for number in range(SMALL_FILES):
        (small / f"f{number:05d}").write_bytes(os.urandom(number % 700))
    with share(topo, tmp_path, "data"):
        exported = mount(topo) / "apps" / "data"
        listing = subprocess.run(["ls", "-lR", str(exported)], capture_output=True, text=True, timeout=120, check=True)
        assert f"{64 << 20}" in listing.stdout and "f00999" in listing.stdout
        out = subprocess.run(["sha256sum", str(exported / "big")], capture_output=True, text=True, timeout=120,
                             check=True)
        assert out.stdout.split()[0] == sha256_file(big)
        copied = tmp_path / "copy"
        subprocess.run(["cp", str(exported / "big"), str(copied)], check=True, timeout=120)
        assert sha256_file(copied) == sha256_file(big)
        sums = subprocess.run(["sha256sum", *sorted(str(p) for p in (exported / "small").iterdir())],
                              capture_output=True, text=True, timeout=240, check=True).stdout.splitlines()
        assert len(sums) == SMALL_FILES
        for line in sums:
            digest, path = line.split()
            assert digest == hashlib.sha256((small / Path(path).name).read_bytes()).hexdigest()


def test_modes_hold_for_another_uid(topo: Topology, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"for everyone\n")
    with share(topo, tmp_path, "open"), share(topo, tmp_path, "closed", "--mode", "600"):
        root = mount(topo) / "apps"
        admitted = subprocess.run([*OTHER, "cat", str(root / "open" / "f")], capture_output=True, text=True, timeout=30)
        assert admitted.returncode == 0 and admitted.stdout == "for everyone\n"
        refused = subprocess.run([*OTHER, "cat", str(root / "closed" / "f")], capture_output=True, text=True,
                                 timeout=30)
        assert refused.returncode != 0 and "Permission denied" in refused.stderr
        assert (root / "closed" / "f").read_bytes() == b"for everyone\n"  # root: the owner
        assert subprocess.run([*OTHER, "ls", str(root / "closed")], capture_output=True, timeout=30).returncode == 0


def test_tail_follows_a_growing_file(topo: Topology, tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_bytes(b"first\n")
    with share(topo, tmp_path, "growing"):
        path = mount(topo) / "apps" / "growing" / "log"
        tail = subprocess.Popen(["tail", "-f", "-s", "0.2", str(path)], stdout=subprocess.PIPE, text=True)
        try:
            assert tail.stdout is not None
            assert tail.stdout.readline() == "first\n"
            with open(log, "a") as file:
                file.write("second\n")
            assert tail.stdout.readline() == "second\n"  # pytest-timeout bounds a hang
        finally:
            tail.kill()
            tail.wait()


def test_killing_the_owner_mid_read_is_eio_within_a_second(topo: Topology, tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(os.urandom(64 << 20))
    app = share(topo, tmp_path, "victim")
    try:
        path = mount(topo) / "apps" / "victim" / "big"
        with open(path, "rb", buffering=0) as reader:
            assert len(reader.read(1 << 20)) == 1 << 20
            os.kill(app.pid, signal.SIGKILL)
            start = time.monotonic()
            with pytest.raises(OSError) as failed:
                while reader.read(1 << 20):
                    pass
            assert failed.value.errno == 5 and time.monotonic() - start < 1.0  # EIO
        start = time.monotonic()
        while (mount(topo) / "apps" / "victim").exists():
            assert time.monotonic() - start < 1.0, "the names of a dead owner are still there"
            time.sleep(0.05)
    finally:
        app.stop()


def test_down_after_the_fuse_process_was_killed_leaves_nothing() -> None:
    """Also: lasting names survive down and up, and up repairs a killed export."""
    require_fuse()
    with running_instance(topology(unique_tag())) as topo:
        point = mount(topo)
        kernelctl(topo.tag, "mkdir", "/apps/lasting")
        kill_export(topo)
        with pytest.raises(OSError):
            os.stat(point)  # ENOTCONN: a mount nobody answers
        kernelctl(topo.tag, "down")
        assert not fuse_mount.mounted(point)
        kernelctl(topo.tag, "up")
        assert (mount(topo) / "apps" / "lasting").is_dir()  # the tree survived down and up
        kill_export(topo)
        kernelctl(topo.tag, "up")  # up on a running instance mounts it again
        assert fuse_mount.healthy(topo)
        kill_export(topo)
    # running_instance ran down --purge and failed the test if a mount or process was left.
    assert not fuse_mount.mounted(point)


def kill_export(topo: Topology) -> None:
    pid = int((topo.run_dir / "fuse.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
