"""Benchmark (not a test): reading another application's files, and small durable files.

    sudo tools/bench files [--json PATH] [--mib 64] [--small 300]

On its own instance:

* a file of ``--mib`` MiB on the baseline's ext4 image is read whole (1 MiB reads) by
  ``cat`` straight from ext4 (the page cache is warm for every variant), through the file
  server RPC (way 1: ``libos.apps.fileshare`` serves it; the reader is ``kernelctl cat``), through the
  FUSE mount (way 3: ``cat`` on ``/run/arrakis/<instance>/names``), and, from a file store
  on a VSA, by a read-only reader mapping the VSA (way 2);
* ``--small`` files of 4 KiB are created, written and made durable one by one: in the file
  store on a VSA (create + write + fsync), and on the ext4 image (open O_CREAT + write +
  fsync of the file and of its directory, which ext4 needs for the name to be durable);
  then as many 4 KiB appends to one file, each made durable (append + fsync; write +
  fdatasync).

Prints a table and writes JSON. Figures depend on the machine: on a small shared one the
device hosts, the FUSE process and the readers compete for the same cores.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kernelctl import fuse_mount
from kernelctl.names import topology
from libos.storage.filestore import FileStore
from libos.storage.vsa import open_vsa
from tools.benchlib import REPO, have_root, kernelctl, machine_info, write_json


def timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def cat_to_null(path: Path) -> str:
    out = subprocess.run(["sh", "-c", f"cat '{path}' | sha256sum"], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--small", type=int, default=300)
    args = parser.parse_args(argv)
    if not have_root():
        return 1
    tag = "bf" + secrets.token_hex(2)
    topo = topology(tag)
    results: dict[str, Any] = {"machine": machine_info(), "mib": args.mib, "small_files": args.small}
    size = args.mib << 20
    data = os.urandom(size)
    digest = hashlib.sha256(data).hexdigest()
    share: subprocess.Popen[str] | None = None
    try:
        kernelctl(tag, "up")
        folder = topo.baseline_mount / "bench-files"
        folder.mkdir(parents=True, exist_ok=True)
        big = folder / "big"
        big.write_bytes(data)
        os.sync()
        cat_to_null(big)  # warm the page cache once for all
        reads: dict[str, float] = {}
        seconds, got = timed(lambda: cat_to_null(big))
        assert got == digest
        reads["cat from ext4"] = seconds

        share = subprocess.Popen([sys.executable, "-u", "-m", "libos.apps.fileshare", "--instance", tag,
                                  "--name", "bench", str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert share.stdout is not None and "ready" in share.stdout.readline()
        cli = f"{sys.executable} -m kernelctl.cli --instance {tag} cat /apps/bench/big"
        seconds, got = timed(lambda: subprocess.run(["sh", "-c", f"{cli} | sha256sum"], capture_output=True,
                                                    text=True, check=True, cwd=REPO).stdout.split()[0])
        assert got == digest
        reads["way 1: kernelctl cat (file server RPC)"] = seconds
        mounted = fuse_mount.mountpoint(topo) / "apps" / "bench" / "big"
        seconds, got = timed(lambda: cat_to_null(mounted))
        assert got == digest
        reads["way 3: cat through the FUSE mount"] = seconds

        kernelctl(tag, "vsa", "create", "benchstore", f"{3 * args.mib + 16}M")
        with open_vsa("benchstore", instance=tag) as vsa:
            owner = FileStore(vsa.device)
            owner.create("big")
            owner.write("big", 0, data)
            owner.fsync()
            with open_vsa("benchstore", instance=tag, write=False) as shared:

                def read_shared() -> str:
                    store = FileStore(shared.device, read_only=True)
                    return hashlib.sha256(store.read("big")).hexdigest()

                seconds, got = timed(read_shared)
            assert got == digest
            reads["way 2: a read-only reader of the VSA's file store (replay included)"] = seconds

            block = os.urandom(4096)

            def store_small() -> None:
                for index in range(args.small):
                    name = f"s{index:06d}"
                    owner.create(name)
                    owner.write(name, 0, block)
                    owner.fsync()

            store_seconds, _ = timed(store_small)
            owner.create("appended")

            def store_append() -> None:
                for _ in range(args.small):
                    owner.append("appended", block)
                    owner.fsync()

            store_append_seconds, _ = timed(store_append)
            owner.close()
        small_dir = folder / "small"
        small_dir.mkdir(exist_ok=True)
        dir_fd = os.open(small_dir, os.O_RDONLY | os.O_DIRECTORY)

        def ext4_small() -> None:
            for index in range(args.small):
                fd = os.open(small_dir / f"s{index:06d}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.write(fd, block)
                os.fsync(fd)
                os.close(fd)
                os.fsync(dir_fd)

        ext4_seconds, _ = timed(ext4_small)
        os.close(dir_fd)
        append_fd = os.open(folder / "appended", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

        def ext4_append() -> None:
            for _ in range(args.small):
                os.write(append_fd, block)
                os.fdatasync(append_fd)

        ext4_append_seconds, _ = timed(ext4_append)
        os.close(append_fd)

        print(f"\nreading {args.mib} MiB (sha256 checked), warm page cache; "
              f"machine: {results['machine']}")
        print(f"{'path':<72} {'seconds':>8} {'MiB/s':>8} {'vs ext4':>8}")
        base = reads["cat from ext4"]
        for name, seconds in reads.items():
            print(f"{name:<72} {seconds:8.3f} {args.mib / seconds:8.1f} {seconds / base:8.1f}x")
        print(f"\n{args.small} small files (4 KiB), each created, written and made durable")
        print(f"{'store':<72} {'files/s':>8}")
        print(f"{'file store on a VSA (create + write + fsync)':<72} {args.small / store_seconds:8.0f}")
        print(f"{'ext4 on the loop image (create + write + fsync file + fsync dir)':<72} {args.small / ext4_seconds:8.0f}")
        print(f"\n{args.small} appends of 4 KiB to one file, each made durable")
        print(f"{'store':<72} {'appends/s':>9}")
        print(f"{'file store on a VSA (append + fsync)':<72} {args.small / store_append_seconds:9.0f}")
        print(f"{'ext4 on the loop image (write O_APPEND + fdatasync)':<72} {args.small / ext4_append_seconds:9.0f}")
        results["read_seconds"] = reads
        results["small_files_per_second"] = {"filestore_vsa": args.small / store_seconds,
                                             "ext4": args.small / ext4_seconds}
        results["appends_per_second"] = {"filestore_vsa": args.small / store_append_seconds,
                                         "ext4": args.small / ext4_append_seconds}
        write_json(args.json, results)
    finally:
        if share is not None:
            share.terminate()
            share.wait(timeout=20)
        kernelctl(tag, "down", "--purge", check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
