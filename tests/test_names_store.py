"""Way 2 end to end: a file store on a VSA, named in the tree (kind ``store``), read by a
granted uid through its own read-only VSIC function while the owner keeps writing; and
``kernelctl cat`` of the name, admitted or refused by the name's mode and the VSA's grants."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading

import pytest

from kernelctl import fuse_mount
from kernelctl.client import ControlClient
from kernelctl.names import Topology
from libos.storage.filestore import FileStore
from libos.storage.vsa import open_vsa
from tests.conftest import KERNELCTL, REPO, kernelctl
from vdev import control

pytestmark = pytest.mark.root
OTHER = ["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups"]
LINES = [b"line %06d %s\n" % (n, b"y" * (n % 200)) for n in range(2000)]
FULL = b"".join(LINES)

READER = r"""
import hashlib, sys, time
from libos.storage.filestore import FileStore
from libos.storage.vsa import open_vsa
instance, vsa, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open_vsa(vsa, instance=instance, write=False) as handle:
    store = FileStore(handle.device, read_only=True)
    for _ in range(rounds):
        store.refresh()
        data = store.read("lines") if store.exists("lines") else b""
        print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
        time.sleep(0.01)
"""


@pytest.fixture
def topo(names_instance: Topology) -> Topology:
    return names_instance


def as_other(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*OTHER, *argv], capture_output=True, timeout=timeout, cwd=REPO)


def test_a_grantee_reads_a_prefix_while_the_owner_writes(topo: Topology) -> None:
    kernelctl(topo.tag, "vsa", "create", "shared", "16M")
    kernelctl(topo.tag, "vsa", "grant", "shared", "1000", "ro")
    prefixes = {hashlib.sha256(FULL[:n]).hexdigest(): n for n in _ends()}
    with open_vsa("shared", instance=topo.tag) as vsa:
        store = FileStore(vsa.device)
        store.create("lines")
        store.fsync()
        reader = subprocess.Popen([*OTHER, sys.executable, "-c", READER, topo.tag, "shared", "25"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
        written = threading.Event()

        def write() -> None:
            for at in range(0, len(LINES), 50):
                store.append("lines", b"".join(LINES[at : at + 50]))
                store.fsync()
            written.set()

        writer = threading.Thread(target=write)
        writer.start()
        out, err = reader.communicate(timeout=120)
        writer.join()
        assert reader.returncode == 0, err.decode()
        seen = [line.split() for line in out.decode().splitlines()]
        assert len(seen) == 25
        last = 0
        for length, digest in seen:
            # Whole records only: every state the reader saw is a batch boundary of the owner's
            # appends, with exactly the owner's bytes (never a torn or half-applied record).
            assert prefixes.get(digest) == int(length), f"the reader saw {length} bytes that are no committed prefix"
            assert int(length) >= last
            last = int(length)
        store.close()
    # After the owner is done, the grantee reads it all; a uid without a grant cannot.
    final = as_other(sys.executable, "-c", READER, topo.tag, "shared", "1")
    assert final.stdout.split()[0] == str(len(FULL)).encode()
    kernelctl(topo.tag, "vsa", "revoke", "shared", "1000")
    refused = as_other(sys.executable, "-c", READER, topo.tag, "shared", "1")
    assert refused.returncode != 0 and b"may not read" in refused.stderr


def _ends() -> set[int]:
    ends, total = {0}, 0
    for at in range(0, len(LINES), 50):
        total += len(b"".join(LINES[at : at + 50]))
        ends.add(total)
    return ends


def test_store_names_and_kernelctl_cat(topo: Topology) -> None:
    kernelctl(topo.tag, "vsa", "create", "snapvsa", "8M")
    data = os.urandom(300_000)
    with open_vsa("snapvsa", instance=topo.tag) as vsa:
        store = FileStore(vsa.device)
        store.create("snapshot")
        store.write("snapshot", 0, data)
        store.close()
    kernelctl(topo.tag, "mkdir", "/apps/snapper")
    with ControlClient(topo.control_socket) as client:
        client.call(control.NameMake(path="/apps/snapper/open", kind="store", mode=0o644, target="snapvsa:snapshot"))
        client.call(control.NameMake(path="/apps/snapper/closed", kind="store", mode=0o600, target="snapvsa:snapshot"))
    listing = kernelctl(topo.tag, "ls", "-l", "/apps/snapper").stdout
    assert "store" in listing and "snapvsa:snapshot" in listing
    cat = subprocess.run([*KERNELCTL, "--instance", topo.tag, "cat", "/apps/snapper/open"], capture_output=True,
                         timeout=60, cwd=REPO)
    assert cat.returncode == 0 and cat.stdout == data
    # uid 1000: the name's mode admits it, the VSA's grants do not (yet).
    cli = [*KERNELCTL, "--instance", topo.tag, "cat"]
    no_grant = as_other(*cli, "/apps/snapper/open")
    assert no_grant.returncode != 0 and b"may not read" in no_grant.stderr
    kernelctl(topo.tag, "vsa", "grant", "snapvsa", "1000", "ro")
    granted = as_other(*cli, "/apps/snapper/open")
    assert granted.returncode == 0 and granted.stdout == data
    closed = as_other(*cli, "/apps/snapper/closed")
    assert closed.returncode != 0 and b"EACCES" in closed.stderr
    # Way 2 through the FUSE mount: the export reads as the calling uid, so grants hold there too.
    mounted = fuse_mount.mountpoint(topo) / "apps" / "snapper"
    assert (mounted / "open").read_bytes() == data
    assert as_other("cat", str(mounted / "open")).stdout == data
    assert b"Permission denied" in as_other("cat", str(mounted / "closed")).stderr
    kernelctl(topo.tag, "vsa", "revoke", "snapvsa", "1000")
    revoked = as_other("cat", str(mounted / "open"))
    assert revoked.returncode != 0 and b"Permission denied" in revoked.stderr
    # Only who may write the VSA names files in it.
    made = as_other(*KERNELCTL, "--instance", topo.tag, "mkdir", "/apps/other")
    assert made.returncode == 0
    script = (
        "from kernelctl.client import ControlClient\nfrom vdev import control\n"
        f"c = ControlClient({str(topo.control_socket)!r})\n"
        "c.call(control.NameMake(path='/apps/other/steal', kind='store', target='snapvsa:snapshot'))\n"
    )
    steal = as_other(sys.executable, "-c", script)
    assert steal.returncode != 0 and b"EACCES" in steal.stderr
