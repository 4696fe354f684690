"""The images of one kernelctl instance: what ``kernelctl up`` attaches and ``down`` releases.

Each instance (named by its topology tag, "" for the default) has a raw image for its VSIC
device host and an ext4 image for the Linux baseline. ``up`` creates what is missing,
attaches the raw image with direct I/O and loop-mounts the ext4 one; ``down`` unmounts and
detaches both and keeps the files, because the VSAs and the baseline's data on them must
survive a restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vm_images import images

DEFAULT_EXT4_SIZE = 1 << 30


@dataclass(frozen=True)
class InstanceImages:
    raw_path: Path
    ext4_path: Path
    mountpoint: Path


@dataclass(frozen=True)
class AttachedImages:
    raw_device: str  # the loop device the VSIC device host opens
    raw_direct_io: bool  # False: the loop device fell back to buffered I/O
    ext4_device: str
    mountpoint: Path  # where the baseline keeps its files


def instance_images(
    tag: str, mountpoint: Path, directory: Path = images.DEFAULT_IMAGE_DIR
) -> InstanceImages:
    """Where the images of instance ``tag`` live; ``mountpoint`` is chosen by the caller."""
    suffix = tag or "default"
    return InstanceImages(
        raw_path=directory / f"vsic-{suffix}{images.IMAGE_SUFFIX}",
        ext4_path=directory / f"baseline-{suffix}{images.IMAGE_SUFFIX}",
        mountpoint=mountpoint,
    )


def up(
    paths: InstanceImages,
    raw_size: int = images.DEFAULT_RAW_SIZE,
    ext4_size: int = DEFAULT_EXT4_SIZE,
) -> AttachedImages:
    """Create (if missing), attach and mount the instance's images. Idempotent.

    An existing raw image of another size is an ImageError: resizing it under live VSAs is
    a decision for the registry, not for ``up``. On a failure half-way, whatever this call
    attached is released again.
    """
    images.create_raw(paths.raw_path, raw_size)
    images.create_ext4(paths.ext4_path, ext4_size)
    try:
        raw_device = images.attach(paths.raw_path, direct_io=True)
        ext4_device = images.mount(paths.ext4_path, paths.mountpoint)
    except images.ImageError:
        down(paths)
        raise
    raw_direct_io = any(loop.direct_io for loop in images.loop_devices(paths.raw_path) if loop.device == raw_device)
    return AttachedImages(
        raw_device=raw_device, raw_direct_io=raw_direct_io, ext4_device=ext4_device, mountpoint=paths.mountpoint
    )


def down(paths: InstanceImages) -> None:
    """Unmount and detach everything of the instance; no error when nothing is there."""
    images.umount(paths.mountpoint)
    images.detach(paths.ext4_path)
    images.detach(paths.raw_path)
