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
from collections.abc import Callable
from typing import Any

from kernelctl.names import Topology
from kernelctl.registry import BLOCK_SIZE, Registry, RegistryError, Vsa
from vdev import control
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

    def handle(self, request: control.Record, uid: int) -> object:
        """One checked VSA request (``vdev.control``) from ``uid``, by its handler in a table."""
        registry = self._registry()
        handlers: dict[type[control.Record], Callable[[Registry, Any, int], object]] = {
            control.VsaCreate: lambda r, q, u: vsa_dict(r.create_vsa(q.name, q.size_bytes, u)),
            control.VsaResize: lambda r, q, u: vsa_dict(r.resize_vsa(q.name, q.size_bytes, u)),
            control.VsaDelete: lambda r, q, u: r.delete_vsa(q.name, u),
            control.VsaList: lambda r, q, u: _vsa_list(r),
            control.VsaGrant: lambda r, q, u: vsa_dict(r.grant(q.name, q.uid, q.mode, u)),
            control.VsaRevoke: lambda r, q, u: vsa_dict(r.revoke(q.name, q.uid, u)),
        }
        handler = handlers.get(type(request))
        if handler is None:
            raise StorageRequestError(f"not a storage request: {request.OP!r}")
        try:
            return handler(registry, request, uid)
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
        }


def stop_images(topo: Topology) -> None:
    """Release the instance's images whatever state the daemon left them in."""
    instance_images.down(image_paths(topo))


def purge(topo: Topology) -> None:
    """Delete the instance's images and registry (after ``down`` released them)."""
    instance_images.down(image_paths(topo))
    shutil.rmtree(topo.state_dir, ignore_errors=True)


def _vsa_list(registry: Registry) -> dict[str, object]:
    return {
        "vsas": [vsa_dict(v) for v in registry.list()],
        "capacity_bytes": registry.capacity_blocks * BLOCK_SIZE,
        "free_bytes": registry.free_blocks() * BLOCK_SIZE,
    }
