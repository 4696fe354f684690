"""Way 3: the name tree exported as a kernel file system, with FUSE (pyfuse3, libfuse 3).

    python -m kernelctl.fuse_export --instance TAG MOUNTPOINT

``kernelctl up`` starts it at ``/run/arrakis/<instance>/names`` and ``kernelctl down`` stops
it and makes sure no mount is left (``kernelctl/fuse_mount.py``). Any Linux program can
then use the names: ``ls -lR``, ``cat``, ``cp``, ``sha256sum``, ``tail -f``.

How a request is answered:

* names, listings and attributes come from kernelctl (``name_stat``/``name_list``); the
  owner uid, gid and mode are the tree's, and the mount uses ``default_permissions``, so
  the kernel refuses (EACCES) what the tree's modes refuse, for every local uid;
* ``open`` of a served file asks kernelctl to open it *for the calling uid* (``as_uid``,
  which only root may ask): access is checked there once more, and the reply is a socket to
  the owner's file server; reads are RPCs on it (way 1), and a server that dies or stops
  answering is EIO for the reader (``kernelctl.fileclient``), within its timeout;
* a served file's size comes from its server (STAT on one pooled connection per name),
  so ``tail -f`` sees a growing file grow. Attributes and entries are cached by the kernel
  for ``CACHE_SECONDS`` only, so names that are withdrawn disappear that fast.

* a file in a VSA's file store (kind ``store``) is read by way 2: at open, the export runs
  ``python -m libos.storage.filecat`` *as the calling uid and gid* (``setpriv``), which
  opens the VSA read-only through that uid's own VSIC function, so the VSA's grants decide
  as they would for the caller itself; its output is then served from memory (at most
  ``MAX_STORE_FILE`` bytes). kernelctl never imports the libOS, so this is a program run,
  not a call. VSAs themselves (``/vsa``) are listed but not readable here (EOPNOTSUPP).

The file system is read-only. pyfuse3 runs on trio; every blocking call (kernelctl, a file
server) goes to a worker thread so one slow server never stalls the others.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from kernelctl import fileproto as fp
from kernelctl.client import ControlClient, ControlError
from kernelctl.fileclient import FileClient, FileRpcError, errno_of, open_name
from kernelctl.names import topology
from vdev import control

log = logging.getLogger("kernelctl.fuse")

CACHE_SECONDS = 0.25  # entry and attribute timeout: withdrawn names vanish this fast
SERVER_TIMEOUT = 5.0  # a file server that does not answer in this long is EIO
POOL_SIZE = 64  # pooled connections for STAT of served files
MAX_READ = 1 << 20
MAX_STORE_FILE = 256 << 20
STORE_READ_TIMEOUT = 60.0
T = TypeVar("T")


class _Pooled:
    """One connection and open handle to a served name, for STAT; one user at a time."""

    def __init__(self, files: FileClient, handle: int) -> None:
        self.files = files
        self.handle = handle
        self.lock = threading.Lock()


class _Open:
    def __init__(self, files: FileClient | None, handle: int, data: bytes = b"") -> None:
        self.files = files  # None: a store file, read whole at open (``data``)
        self.handle = handle
        self.data = data
        self.lock = threading.Lock()


class NamesFs(pyfuse3.Operations):
    def __init__(self, control_path: str, instance: str = "") -> None:
        super().__init__()
        self.control_path = control_path
        self.instance = instance
        self._control: ControlClient | None = None
        self._control_lock = threading.Lock()
        self._paths: dict[int, str] = {pyfuse3.ROOT_INODE: "/"}
        self._inodes: dict[str, int] = {"/": pyfuse3.ROOT_INODE}
        self._next_inode = pyfuse3.ROOT_INODE + 1
        self._pool: OrderedDict[str, _Pooled] = OrderedDict()
        self._pool_lock = threading.Lock()
        self._open: dict[int, _Open] = {}
        self._dirs: dict[int, list[dict[str, Any]]] = {}
        self._next_fh = 1

    # ---- kernelctl (worker threads) --------------------------------------------------------

    def _call(self, body: control.Record) -> Any:
        with self._control_lock:
            for attempt in (1, 2):
                try:
                    if self._control is None:
                        self._control = ControlClient(self.control_path, timeout=10.0)
                    return self._control.call(body)[0]
                except ControlError as exc:
                    if "cannot" not in str(exc) and "closed" not in str(exc) and "reset" not in str(exc):
                        raise pyfuse3.FUSEError(errno_of(exc)) from None
                    if self._control is not None:
                        self._control.close()
                        self._control = None
                    if attempt == 2:
                        raise pyfuse3.FUSEError(errno.EIO) from None
        raise pyfuse3.FUSEError(errno.EIO)

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args)

    # ---- inodes and attributes ---------------------------------------------------------------

    def _inode(self, path: str) -> int:
        inode = self._inodes.get(path)
        if inode is None:
            inode = self._next_inode
            self._next_inode += 1
            self._inodes[path] = inode
            self._paths[inode] = path
        return inode

    def _path(self, inode: int) -> str:
        path = self._paths.get(inode)
        if path is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return path

    def _served_size(self, path: str) -> tuple[int, int]:
        """(size, mtime_ns) from the file's server, over a pooled connection."""
        with self._pool_lock:
            pooled = self._pool.pop(path, None)
        for _attempt in (1, 2):  # a pooled connection may have gone stale: one fresh try
            try:
                if pooled is None:
                    with self._control_lock:
                        if self._control is None:
                            self._control = ControlClient(self.control_path, timeout=10.0)
                        _name, sock = open_name(self._control, path)
                    if sock is None:
                        return 0, 0
                    files = FileClient(sock, timeout=SERVER_TIMEOUT)
                    handle, attr = files.open(path)
                    pooled = _Pooled(files, handle)
                else:
                    with pooled.lock:
                        attr = pooled.files.stat(pooled.handle)
            except (FileRpcError, ControlError):
                if pooled is not None:
                    pooled.files.close_connection()
                    pooled = None
                continue
            self._keep(path, pooled)
            return attr.size, attr.mtime_ns
        raise pyfuse3.FUSEError(errno.ENOENT)

    def _keep(self, path: str, pooled: _Pooled) -> None:
        """Pool ``pooled`` for ``path``, closing the least recently used past POOL_SIZE."""
        with self._pool_lock:
            self._pool[path] = pooled
            while len(self._pool) > POOL_SIZE:
                _old, evicted = self._pool.popitem(last=False)
                evicted.files.close_connection()

    def _attributes(self, name: dict[str, Any]) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        path = name["path"]
        entry.st_ino = self._inode(path)
        mode = int(name["mode"]) & 0o7777
        mtime_ns = int(float(name.get("mtime") or 0) * 1e9)
        size = 0
        if name["kind"] == "dir":
            entry.st_mode = stat.S_IFDIR | mode
            entry.st_nlink = 2
        else:
            entry.st_mode = stat.S_IFREG | mode
            entry.st_nlink = 1
            if name["kind"] == "served":
                size, served_mtime = self._served_size(path)
                mtime_ns = served_mtime or mtime_ns
        entry.st_size = size
        entry.st_uid = int(name["owner_uid"])
        entry.st_gid = int(name["owner_gid"])
        entry.st_blksize = 4096
        entry.st_blocks = (size + 511) // 512
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = mtime_ns
        entry.attr_timeout = CACHE_SECONDS
        entry.entry_timeout = CACHE_SECONDS
        return entry

    def _stat_path(self, path: str) -> pyfuse3.EntryAttributes:
        return self._attributes(self._call(control.NameStat(path=path)))

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._path(parent_inode)
        try:
            leaf = name.decode()
        except UnicodeDecodeError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        if leaf in (".", ".."):
            raise pyfuse3.FUSEError(errno.ENOENT)
        path = (parent.rstrip("/") + "/" + leaf) if leaf else parent
        if len(path) > control.MAX_PATH:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        return await self._thread(self._stat_path, path)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._thread(self._stat_path, self._path(inode))

    async def forget(self, inode_list: Any) -> None:
        for inode, _count in inode_list:
            if inode != pyfuse3.ROOT_INODE:
                path = self._paths.pop(inode, None)
                if path is not None:
                    self._inodes.pop(path, None)

    # ---- directories ---------------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        path = self._path(inode)
        listing = await self._thread(self._call, control.NameList(path=path, as_uid=ctx.uid, as_gid=ctx.gid))
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = list(listing["entries"])
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs.get(fh, [])
        for index in range(start_id, len(entries)):
            entry = entries[index]
            attr = pyfuse3.EntryAttributes()
            attr.st_ino = self._inode(entry["path"])
            attr.st_mode = (stat.S_IFDIR if entry["kind"] == "dir" else stat.S_IFREG) | (int(entry["mode"]) & 0o7777)
            attr.st_uid, attr.st_gid = int(entry["owner_uid"]), int(entry["owner_gid"])
            attr.st_mtime_ns = attr.st_ctime_ns = attr.st_atime_ns = int(float(entry.get("mtime") or 0) * 1e9)
            # A listing does not ask every server for its file's size: these attributes are
            # not to be cached, so a stat that follows (ls -l) comes to getattr for it.
            attr.attr_timeout = 0
            attr.entry_timeout = 0
            if not pyfuse3.readdir_reply(token, entry["name"].encode(), attr, index + 1):
                return

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # ---- files ---------------------------------------------------------------------------------

    def _open_served(self, path: str, uid: int, gid: int) -> _Open:
        with self._control_lock:
            try:
                if self._control is None:
                    self._control = ControlClient(self.control_path, timeout=10.0)
                name, sock = open_name(self._control, path, as_uid=uid, as_gid=gid)
            except ControlError as exc:
                raise pyfuse3.FUSEError(errno_of(exc)) from None
        if sock is None:
            if name.get("kind") == "store":
                return _Open(None, 0, self._read_store(path, uid, gid))
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP if name.get("kind") != "dir" else errno.EISDIR)
        files = FileClient(sock, timeout=SERVER_TIMEOUT)
        try:
            handle, _attr = files.open(path)
        except FileRpcError as exc:
            files.close_connection()
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        return _Open(files, handle)

    def _read_store(self, path: str, uid: int, gid: int) -> bytes:
        """Way 2, as the caller: its uid maps the VSA (its grants decide) and reads the file."""
        argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                sys.executable, "-m", "libos.storage.filecat", "--instance", self.instance,
                "--max-bytes", str(MAX_STORE_FILE), path]
        try:
            done = subprocess.run(argv, capture_output=True, timeout=STORE_READ_TIMEOUT,
                                  cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        except (OSError, subprocess.TimeoutExpired):
            raise pyfuse3.FUSEError(errno.EIO) from None
        if done.returncode != 0:
            denied = b"may not" in done.stderr or b"EACCES" in done.stderr
            too_big = b"more than" in done.stderr
            raise pyfuse3.FUSEError(errno.EACCES if denied else errno.EFBIG if too_big else errno.EIO)
        if len(done.stdout) > MAX_STORE_FILE:
            raise pyfuse3.FUSEError(errno.EFBIG)
        return done.stdout

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        opened = await self._thread(self._open_served, self._path(inode), ctx.uid, ctx.gid)
        fh = self._next_fh
        self._next_fh += 1
        self._open[fh] = opened
        # direct_io: every read reaches the server, so a growing file is read to its end.
        return pyfuse3.FileInfo(fh=fh, direct_io=True)

    def _read(self, opened: _Open, offset: int, size: int) -> bytes:
        if opened.files is None:
            return opened.data[offset : offset + size]
        with opened.lock:
            try:
                return opened.files.read(opened.handle, offset, min(size, MAX_READ))
            except FileRpcError as exc:
                raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    async def read(self, fh: int, off: int, size: int) -> bytes:
        opened = self._open.get(fh)
        if opened is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return await self._thread(self._read, opened, off, size)

    async def release(self, fh: int) -> None:
        opened = self._open.pop(fh, None)
        if opened is not None and opened.files is not None:
            opened.files.close_connection()  # closing the connection closes its handles

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_namemax = fp.MAX_NAME
        return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="export kernelctl's name tree with FUSE")
    parser.add_argument("--instance", default="")
    parser.add_argument("mountpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fuse[%(process)d] %(message)s")
    topo = topology(args.instance)
    fs = NamesFs(str(topo.control_socket), args.instance)
    options = set(pyfuse3.default_options)
    options |= {"fsname=arrakis-names", "subtype=arrakis", "default_permissions", "allow_other", "ro"}
    os.makedirs(args.mountpoint, exist_ok=True)
    pyfuse3.init(fs, args.mountpoint, options)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _sig in signals:
                    nursery.cancel_scope.cancel()
                    return

    try:
        print("fuse: ready", flush=True)
        trio.run(run)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
