"""Read a file of a VSA's file store by its global name (way 2, the shared VSA).

    python -m libos.storage.filecat [--instance TAG] PATH

kernelctl checks the name (``name_open``: its mode, for this uid) and says which VSA and
file it is; the VSA is then opened read-only (``open_vsa``: the VSA's grants decide, again
at kernelctl), the store replayed from the device, and the file written to stdout. From
the open on, no request goes through kernelctl: the reads are this process's own VSIC
descriptors. ``kernelctl cat`` runs this for names of kind ``store``.
"""

from __future__ import annotations

import argparse
import sys
from typing import BinaryIO

from kernelctl.client import ControlClient, ControlError
from kernelctl.fileclient import open_name
from kernelctl.names import topology
from libos.storage.filestore import FileStore, FileStoreError
from libos.storage.vsa import open_vsa


def store_target(target: str) -> tuple[str, str]:
    vsa, sep, file = target.partition(":")
    if not sep or not vsa or not file:
        raise ValueError(f"bad store target {target!r}: VSA:FILE")
    return vsa, file


DEFAULT_MAX_BYTES = 1 << 30
CHUNK = 1 << 20


def read_store_file(instance: str, path: str, out: BinaryIO, max_bytes: int = DEFAULT_MAX_BYTES) -> int:
    """Write the file named ``path`` to ``out`` in chunks; its size. The store is its
    owner's: a file larger than ``max_bytes`` (a hostile owner's 1 TiB hole) is refused."""
    with ControlClient(topology(instance).control_socket) as client:
        name, sock = open_name(client, path)
    if sock is not None:
        sock.close()
    if name.get("kind") != "store":
        raise ValueError(f"{path} is a {name.get('kind')} name, not a file of a store")
    vsa_name, file = store_target(str(name.get("target", "")))
    with open_vsa(vsa_name, instance=instance, write=False) as vsa:
        store = FileStore(vsa.device, read_only=True)
        try:
            size = store.stat(file).size
            if size > max_bytes:
                raise ValueError(f"{path} holds {size} bytes, more than {max_bytes}")
            for offset in range(0, size, CHUNK):
                out.write(store.read(file, offset, CHUNK))
            return size
        finally:
            store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m libos.storage.filecat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instance", default="")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="refuse larger files")
    parser.add_argument("path")
    args = parser.parse_args(argv)
    try:
        read_store_file(args.instance, args.path, sys.stdout.buffer, args.max_bytes)
        sys.stdout.buffer.flush()
    except (ControlError, FileStoreError, ValueError, OSError) as exc:
        print(f"filecat: {args.path}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
