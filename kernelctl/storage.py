"""The control plane's storage half: images, the VSA registry, and VSA requests.

``kernelctl up`` attaches the instance's raw image (for the VSIC device host, with direct
I/O) and mounts its ext4 image (the Linux baseline's files); ``down`` releases both and
keeps the files and the registry, so virtual storage areas survive; ``down --purge`` deletes
them too. Requests from applications and the CLI arrive here with the caller's uid, which
the daemon took from ``SO_PEERCRED``.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

from kernelctl.names import Topology
from kernelctl.registry import BLOCK_SIZE, Registry, RegistryError, Vsa
from vm_images import images
from vm_images import instance as instance_images

log = logging.getLogger("kernelctl")

RAW_IMAGE_SIZE = images.DEFAULT_RAW_SIZE
MAX_VSA_BYTES = 1 << 40


class StorageRequestError(Exception):
    """A storage request that is refused; the message goes back to the caller."""


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
    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.paths = image_paths(topo)
        self.attached: instance_images.AttachedImages | None = None
        self.registry: Registry | None = None

    def start(self) -> None:
        self.topo.state_dir.mkdir(parents=True, exist_ok=True)
        self.attached = instance_images.up(self.paths, raw_size=RAW_IMAGE_SIZE)
        if not self.attached.raw_direct_io:
            log.warning("the VSIC image %s has no direct I/O (its file system refused it)", self.paths.raw_path)
        self.registry = Registry(self.topo.registry_path, capacity_blocks=RAW_IMAGE_SIZE // BLOCK_SIZE)

    def stop(self) -> None:
        if self.registry is not None:
            self.registry.close()
            self.registry = None
        instance_images.down(self.paths)
        self.attached = None

    def _registry(self) -> Registry:
        if self.registry is None:
            raise StorageRequestError("storage is not up")
        return self.registry

    def handle(self, op: str, uid: int, message: dict[str, Any]) -> object:
        registry = self._registry()
        try:
            if op == "vsa_create":
                return vsa_dict(registry.create_vsa(_name(message), _size(message), uid))
            if op == "vsa_resize":
                return vsa_dict(registry.resize_vsa(_name(message), _size(message), uid))
            if op == "vsa_delete":
                registry.delete_vsa(_name(message), uid)
                return None
            if op == "vsa_list":
                return {
                    "vsas": [vsa_dict(v) for v in registry.list()],
                    "capacity_bytes": registry.capacity_blocks * BLOCK_SIZE,
                    "free_bytes": registry.free_blocks() * BLOCK_SIZE,
                }
            if op == "vsa_grant":
                mode = message.get("mode")
                if mode not in ("ro", "rw"):
                    raise StorageRequestError("mode is 'ro' or 'rw'")
                return vsa_dict(registry.grant(_name(message), _uid(message), mode, uid))
            if op == "vsa_revoke":
                return vsa_dict(registry.revoke(_name(message), _uid(message), uid))
        except RegistryError as exc:
            raise StorageRequestError(str(exc)) from None
        raise StorageRequestError(f"unknown request {op!r}")

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
        }


def stop_images(topo: Topology) -> None:
    """Release the instance's images whatever state the daemon left them in."""
    instance_images.down(image_paths(topo))


def purge(topo: Topology) -> None:
    """Delete the instance's images and registry (after ``down`` released them)."""
    instance_images.down(image_paths(topo))
    shutil.rmtree(topo.state_dir, ignore_errors=True)


def _name(message: dict[str, Any]) -> str:
    name = message.get("name")
    if not isinstance(name, str):
        raise StorageRequestError("name must be a string")
    return name


def _size(message: dict[str, Any]) -> int:
    size = message.get("size_bytes")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_VSA_BYTES:
        raise StorageRequestError(f"size_bytes must be 1..{MAX_VSA_BYTES}")
    return size


def _uid(message: dict[str, Any]) -> int:
    uid = message.get("uid")
    if not isinstance(uid, int) or isinstance(uid, bool) or uid < 0:
        raise StorageRequestError("uid must be a non-negative number")
    return uid
