"""The control plane's storage half: images, the VSA registry, and VSA requests.

``kernelctl up`` attaches the instance's raw image (for the VSIC device host, with direct
I/O) and mounts its ext4 image (the Linux baseline's files); ``down`` releases both and
keeps the files and the registry, so virtual storage areas survive; ``down --purge`` deletes
them too. Requests from applications and the CLI arrive here with the caller's uid, which
the daemon took from ``SO_PEERCRED``.

The plane gives the registry its two device-side duties (issue 7): ``zero_extents`` zeroes
new space on the loop device before the registry hands it out (``BLKZEROOUT``, which the
kernel guarantees reads back as zeros, and which drops the loop device's page cache for the
range), and ``open_vsas`` (the daemon's function records) names the VSAs that may not be
shrunk or deleted now. The per-uid bounds come from the ``[storage]`` table of the policy
file (see ``parse_storage_limits``), else ``registry.DEFAULT_LIMITS``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import struct
import tomllib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from kernelctl.names import Topology
from kernelctl.policy import Policy
from kernelctl.registry import BLOCK_SIZE, DEFAULT_LIMITS, MAX_UID, Extent, Limits, Registry, RegistryError, Vsa
from vdev import control
from vm_images import images
from vm_images import instance as instance_images

log = logging.getLogger("kernelctl")

RAW_IMAGE_SIZE = images.DEFAULT_RAW_SIZE
MAX_VSA_BYTES = 1 << 40
BLKZEROOUT = 0x127F  # _IO(0x12, 127) in linux/fs.h: zero a byte range of a block device
_RANGE = struct.Struct("=QQ")  # the ioctl's argument: start and length in bytes
_ZERO_CHUNK = 1 << 20  # the write-zeros fallback writes this much at a time
_LIMIT_KEYS = ("max_vsas_per_uid", "max_bytes_per_uid", "max_grants_per_vsa", "max_extents_per_vsa")


class StorageRequestError(Exception):
    """A storage request that is refused; the message goes back to the caller."""


class StorageConfigError(Exception):
    """The policy's ``[storage]`` table is malformed."""


def parse_storage_limits(text: str) -> Limits:
    """The per-uid bounds from the ``[storage]`` table of a policy file; defaults for what it
    leaves out, and all of them without the table::

        [storage]
        max_vsas_per_uid = 16
        max_bytes_per_uid = 536870912
        max_grants_per_vsa = 16
        max_extents_per_vsa = 64
        exempt_uids = [0]        # uids the bounds do not bind

    (Read here rather than in ``kernelctl.policy``, which parses the port rules only and
    ignores other tables.)
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise StorageConfigError(f"policy is not valid TOML: {exc}") from None
    table = document.get("storage", {})
    if not isinstance(table, dict):
        raise StorageConfigError("'storage' must be a table ([storage])")
    unknown = set(table) - {*_LIMIT_KEYS, "exempt_uids"}
    if unknown:
        raise StorageConfigError(f"[storage]: unknown keys {sorted(unknown)}")
    values: dict[str, Any] = {key: table.get(key, getattr(DEFAULT_LIMITS, key)) for key in _LIMIT_KEYS}
    exempt = table.get("exempt_uids", sorted(DEFAULT_LIMITS.exempt_uids))
    if not isinstance(exempt, list) or not all(
        isinstance(uid, int) and not isinstance(uid, bool) and 0 <= uid <= MAX_UID for uid in exempt
    ):
        raise StorageConfigError("[storage]: exempt_uids must be a list of uids")
    try:
        return Limits(**values, exempt_uids=frozenset(exempt))
    except RegistryError as exc:
        raise StorageConfigError(f"[storage]: {exc}") from None


def storage_limits(policy: Policy) -> Limits:
    """The bounds of the policy file ``policy`` was loaded from (defaults for the built-in one)."""
    if policy.source == "built-in":
        return DEFAULT_LIMITS
    try:
        text = Path(policy.source).read_text()
    except OSError as exc:
        raise StorageConfigError(f"cannot read the policy {policy.source}: {exc.strerror}") from None
    return parse_storage_limits(text)


def zero_extents(fd: int, extents: Sequence[Extent]) -> None:
    """Make ``extents`` of the block device (or file) ``fd`` read back as zeros, durably.

    ``BLKZEROOUT`` on a loop device becomes ``fallocate(FALLOC_FL_ZERO_RANGE)`` on its image
    (no data written, the image stays cheap) and falls back inside the kernel to writing
    zeros; it also drops the range from the device's page cache, so no buffered reader sees
    the old data. Where it is not offered at all (a plain file: ENOTTY) zeros are written.
    The ``fsync`` makes the zeros survive a crash that keeps the registry's commit.
    """
    for extent in extents:
        start = extent.physical_block * BLOCK_SIZE
        length = extent.block_count * BLOCK_SIZE
        try:
            fcntl.ioctl(fd, BLKZEROOUT, _RANGE.pack(start, length))
        except OSError as exc:
            if exc.errno not in (errno.ENOTTY, errno.EOPNOTSUPP):
                raise
            _write_zeros(fd, start, length)
    os.fsync(fd)


def _write_zeros(fd: int, start: int, length: int) -> None:
    zeros = bytes(min(length, _ZERO_CHUNK))
    done = 0
    while done < length:
        with memoryview(zeros)[: min(len(zeros), length - done)] as chunk:
            written = os.pwrite(fd, chunk, start + done)
        if written <= 0:
            raise OSError(errno.EIO, f"short write while zeroing byte {start + done}")
        done += written


def image_paths(topo: Topology) -> instance_images.InstanceImages:
    return instance_images.instance_images(topo.tag, topo.baseline_mount, topo.image_dir)


def vsa_dict(vsa: Vsa) -> dict[str, Any]:
    return {
        "name": vsa.name,
        "owner_uid": vsa.owner_uid,
        "size_bytes": vsa.size_bytes,
        "extents": [[extent.physical_block, extent.block_count] for extent in vsa.extents],
        "grants": {str(uid): mode for uid, mode in sorted(dict(vsa.grants).items())},
    }


class StoragePlane:
    """The storage half of the daemon. ``open_vsas`` names the VSAs that functions have open
    now (the daemon's records); ``policy`` supplies the per-uid bounds."""

    def __init__(
        self,
        topo: Topology,
        open_vsas: Callable[[], Iterable[str]] | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.topo = topo
        self.paths = image_paths(topo)
        self.attached: instance_images.AttachedImages | None = None
        self.registry: Registry | None = None
        self._open_vsas = open_vsas
        self._policy = policy
        self.limits = DEFAULT_LIMITS
        self._zero_fd = -1

    def start(self) -> None:
        self.limits = storage_limits(self._policy) if self._policy is not None else DEFAULT_LIMITS
        self.topo.state_dir.mkdir(parents=True, exist_ok=True)
        self.attached = instance_images.up(self.paths, raw_size=RAW_IMAGE_SIZE)
        if not self.attached.raw_direct_io:
            log.warning("the VSIC image %s has no direct I/O (its file system refused it)", self.paths.raw_path)
        # Our own descriptor of the loop device, for zeroing only (the device host has its own).
        self._zero_fd = os.open(self.attached.raw_device, os.O_RDWR | os.O_CLOEXEC)
        self.registry = Registry(
            self.topo.registry_path,
            capacity_blocks=RAW_IMAGE_SIZE // BLOCK_SIZE,
            limits=self.limits,
            zero=self._zero,
        )

    def stop(self) -> None:
        if self.registry is not None:
            self.registry.close()
            self.registry = None
        if self._zero_fd >= 0:
            os.close(self._zero_fd)
            self._zero_fd = -1
        instance_images.down(self.paths)
        self.attached = None

    def _zero(self, extents: Sequence[Extent]) -> None:
        if self._zero_fd < 0:
            raise OSError(errno.ENODEV, "the raw image is not attached")
        zero_extents(self._zero_fd, extents)

    def _registry(self) -> Registry:
        if self.registry is None:
            raise StorageRequestError("storage is not up")
        return self.registry

    def open_names(self) -> frozenset[str]:
        """The VSAs that functions have open now."""
        return frozenset(self._open_vsas()) if self._open_vsas is not None else frozenset()

    def handle(self, request: control.Record, uid: int) -> object:
        """One checked VSA request (``vdev.control``) from ``uid``, by its handler in a table."""
        handlers: dict[type[control.Record], Callable[[Any, int], object]] = {
            control.VsaCreate: lambda q, u: self.create_vsa(u, q.name, q.size_bytes),
            control.VsaResize: lambda q, u: self.resize_vsa(u, q.name, q.size_bytes),
            control.VsaDelete: lambda q, u: self.delete_vsa(u, q.name),
            control.VsaList: lambda q, u: self.list_vsas(u),
            control.VsaGrant: lambda q, u: self.grant(u, q.name, q.uid, q.mode),
            control.VsaRevoke: lambda q, u: self.revoke(u, q.name, q.uid),
        }
        handler = handlers.get(type(request))
        if handler is None:
            raise StorageRequestError(f"not a storage request: {request.OP!r}")
        return handler(request, uid)

    # Each request as a method of its own, with the registry's refusals as StorageRequestError.

    def create_vsa(self, uid: int, name: str, size_bytes: int) -> dict[str, Any]:
        try:
            return vsa_dict(self._registry().create_vsa(name, size_bytes, uid))
        except RegistryError as exc:
            raise StorageRequestError(str(exc)) from None

    def resize_vsa(self, uid: int, name: str, size_bytes: int) -> dict[str, Any]:
        try:
            return vsa_dict(self._registry().resize_vsa(name, size_bytes, uid, busy=self.open_names()))
        except RegistryError as exc:
            raise StorageRequestError(str(exc)) from None

    def delete_vsa(self, uid: int, name: str) -> None:
        try:
            self._registry().delete_vsa(name, uid, busy=self.open_names())
        except RegistryError as exc:
            raise StorageRequestError(str(exc)) from None

    def list_vsas(self, uid: int) -> dict[str, Any]:
        registry = self._registry()
        try:
            vsas, owned_bytes = registry.list(), registry.usage(uid)
            return {
                "vsas": [vsa_dict(v) for v in vsas],
                "capacity_bytes": registry.capacity_blocks * BLOCK_SIZE,
                "free_bytes": registry.free_blocks() * BLOCK_SIZE,
                "limits": self.limits.as_dict(),
                "usage": {"uid": uid, "vsas": owned_bytes[0], "bytes": owned_bytes[1]},
            }
        except RegistryError as exc:
            raise StorageRequestError(str(exc)) from None

    def grant(self, uid: int, name: str, grantee: int, mode: object) -> dict[str, Any]:
        if mode != "ro" and mode != "rw":
            raise StorageRequestError("mode is 'ro' or 'rw'")
        try:
            return vsa_dict(self._registry().grant(name, grantee, mode, uid))
        except RegistryError as exc:
            raise StorageRequestError(str(exc)) from None

    def revoke(self, uid: int, name: str, grantee: int) -> dict[str, Any]:
        try:
            return vsa_dict(self._registry().revoke(name, grantee, uid))
        except RegistryError as exc:
            raise StorageRequestError(str(exc)) from None

    def check_access(self, name: str, uid: int, write: bool) -> Vsa:
        try:
            return self._registry().check_access(name, uid, write)
        except RegistryError as exc:
            raise StorageRequestError(str(exc)) from None

    def status(self) -> dict[str, object]:
        attached = self.attached
        return {
            "raw_image": str(self.paths.raw_path),
            "raw_device": attached.raw_device if attached else None,
            "direct_io": attached.raw_direct_io if attached else None,
            "baseline_mount": str(self.paths.mountpoint),
            "vsas": [vsa_dict(v) for v in self.registry.list()] if self.registry else [],
            "limits": self.limits.as_dict(),
        }


def stop_images(topo: Topology) -> None:
    """Release the instance's images whatever state the daemon left them in."""
    instance_images.down(image_paths(topo))


def purge(topo: Topology) -> None:
    """Delete the instance's images and registry (after ``down`` released them)."""
    instance_images.down(image_paths(topo))
    shutil.rmtree(topo.state_dir, ignore_errors=True)

