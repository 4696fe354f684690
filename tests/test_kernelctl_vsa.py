"""kernelctl's storage half as root: images attached by up, VSAs that survive down and up."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from kernelctl import storage
from kernelctl.names import topology
from tests.conftest import kernelctl, leftovers, require_root, unique_tag

pytestmark = pytest.mark.root


def vsas(tag: str) -> dict[str, dict[str, object]]:
    listing = json.loads(kernelctl(tag, "vsa", "ls", "-j").stdout)
    return {v["name"]: v for v in listing["vsas"]}


def test_vsas_survive_down_and_up_and_purge_removes_everything() -> None:
    require_root()
    tag = unique_tag()
    topo = topology(tag)
    try:
        kernelctl(tag, "up")
        paths = storage.image_paths(topo)
        assert paths.raw_path.exists() and paths.ext4_path.exists()
        assert os.path.ismount(topo.baseline_mount)
        attached = subprocess.run(["losetup", "-j", str(paths.raw_path)], capture_output=True, text=True).stdout
        assert "/dev/loop" in attached

        kernelctl(tag, "vsa", "create", "log", "64M")
        kernelctl(tag, "vsa", "create", "data", "8M")
        kernelctl(tag, "vsa", "resize", "data", "16M")
        kernelctl(tag, "vsa", "grant", "data", "1000", "ro")
        refused = kernelctl(tag, "vsa", "create", "log", "1M", check=False)
        assert refused.returncode == 1 and "log" in refused.stderr
        before = vsas(tag)
        assert before["log"]["size_bytes"] == 64 << 20
        assert before["data"]["size_bytes"] == 16 << 20
        assert before["data"]["grants"] == {"1000": "ro"}
        # Two VSAs never overlap on the image.
        blocks = [
            (start, start + count)
            for vsa in before.values()
            for start, count in vsa["extents"]  # type: ignore[attr-defined]
        ]
        blocks.sort()
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(blocks, blocks[1:]))

        kernelctl(tag, "down")
        assert not os.path.ismount(topo.baseline_mount)
        assert subprocess.run(["losetup", "-j", str(paths.raw_path)], capture_output=True, text=True).stdout == ""
        kernelctl(tag, "up")
        assert vsas(tag) == before
        kernelctl(tag, "vsa", "delete", "log")
        assert set(vsas(tag)) == {"data"}
        table = kernelctl(tag, "vsa", "ls").stdout
        assert "data" in table and "1000:ro" in table
    finally:
        kernelctl(tag, "down", "--purge", check=False)
    assert not topo.state_dir.exists()
    assert leftovers(topo) == []
